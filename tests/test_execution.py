"""Execution service: verdict logic, input validation and the gRPC surface."""
from __future__ import annotations

import dataclasses
import os
import time

import grpc
import pytest

from ilf.errors import InvalidArgument
from ilf.grpc_util import channel
from ilf.v1 import execution_pb2, execution_pb2_grpc
from services.execution.checks import Hole, Meter, approx_equal, names_bound_by, plan_test
from services.execution.executor import Executor, Program, Settings, Verdict
from services.execution.pool import WorkerFailed
from services.execution.server import build_server

DOUBLE = "def double(x):\n    return x * 2\n"


@pytest.fixture(scope="module")
def executor():
    """A real executor with its sandboxed workers; other test_execution* modules import this."""
    running = Executor()
    yield running
    running.close()


def verdicts(outcome):
    return [t.verdict for t in outcome.tests]


def test_per_test_verdicts_with_types_messages_and_durations(executor):
    outcome = executor.execute(Program(
        DOUBLE + "print('hello')\n",
        ["assert double(2) == 4", "assert double(3) == 7", "assert double(None) == 0", "assert triple(1) == 3"]))
    assert verdicts(outcome) == [Verdict.PASSED, Verdict.FAILED, Verdict.ERROR, Verdict.ERROR]
    assert not outcome.passed
    assert outcome.tests[2].error_type == "TypeError" and "NoneType" in outcome.tests[2].error_message
    assert outcome.tests[3].error_type == "NameError"
    assert all(t.duration_s >= 0 for t in outcome.tests) and outcome.duration_s > 0
    assert outcome.stdout == "hello\n"


def test_all_passed_and_run_order_code_then_setup_then_asserts(executor):
    outcome = executor.execute(Program(
        "class Box:\n    def __init__(self, v):\n        self.v = v\ndef unbox(b):\n    return b.v\n",
        ["assert unbox(box) == 5", "assert unbox(Box(1)) + 1 == 2"], test_setup_code="box = Box(5)"))
    assert outcome.passed, outcome


def test_load_failure_marks_every_test_error(executor):
    outcome = executor.execute(Program("def broken(:\n    pass\n", ["assert broken() == 1", "assert 1 == 1"]))
    assert verdicts(outcome) == [Verdict.ERROR, Verdict.ERROR]
    assert outcome.error_type == "SyntaxError" and outcome.error_message


def test_timeout_keeps_earlier_verdicts(executor):
    outcome = executor.execute(Program(
        "import time\ndef slow(x):\n    if x:\n        time.sleep(60)\n    return x\n",
        ["assert slow(0) == 0", "assert slow(1) == 1", "assert slow(0) == 0"], timeout_s=1))
    assert verdicts(outcome) == [Verdict.PASSED, Verdict.TIMEOUT, Verdict.TIMEOUT]
    assert 1 <= outcome.duration_s < 3


def test_memory_limit(executor):
    outcome = executor.execute(Program("def big():\n    return len(bytearray(300 << 20))\n",
                                       ["assert big() == 300 << 20"], memory_mb=128))
    assert outcome.tests[0].error_type == "MemoryError"


def test_floats_compare_approximately_only_where_the_expected_value_is_a_float():
    assert approx_equal(0.1 + 0.2, 0.3)
    assert approx_equal([1.0, (2.0000000001, "a")], [1, (2.0, "a")])
    assert not approx_equal(1.001, 1.0)
    assert not approx_equal([1, 2], (1, 2))
    assert approx_equal({"a": 0.30000000000000004}, {"a": 0.3})
    # An exact expected value is compared exactly, in both directions of the error.
    assert not approx_equal(float(10**17 + 1), 10**17 + 1) and not approx_equal(3.000001, 3)
    assert not approx_equal(2.999999, 3) and approx_equal(3.0, 3)
    assert approx_equal(3.000001, 3.0) and approx_equal(2.999999, 3.0) and not approx_equal(3.00001, 3.0)
    assert not approx_equal([0.3, 2.0000001], [0.3, 2]) and approx_equal([0.3, 2.0000001], [0.3, 2.0])


def test_plan_keeps_expected_values_out_of_the_sandbox():
    plan = plan_test("assert sorted(f(x, [1, 2])) == sorted([3, 4])", lambda: names_bound_by("def f(a, b): pass"))
    assert plan.holes == (Hole("f(x, [1, 2])", "iterate"),)
    assert plan.verdict([[4, 3]], Meter()) and not plan.verdict([[4, 4]], Meter())
    # A builtin the program rebinds is its entry point, never a function applied to the program's values.
    entry_point = plan_test("assert set(1, 2) == {1}", lambda: names_bound_by("def set(*x): return x"))
    assert entry_point.holes == (Hole("set(1, 2)"),)
    for test in ("assert set(f(1)) == {1}", "assert f(1) == set(1)"):
        shadowed = plan_test(test, lambda: names_bound_by("def set(x): return x\ndef f(x): return x"))
        assert not shadowed.holes and "rebinds" in shadowed.refusal


def test_plans_are_shared_by_programs_that_bind_the_same_test_names():
    test = "assert sorted(f(1)) == [1]"
    first = plan_test(test, lambda: names_bound_by("def f(x):\n    y = x\n    return [y]"))
    other_locals = plan_test(test, lambda: names_bound_by("def f(z):\n    sorted = z\n    return [z]"))
    assert other_locals is first and first.holes == (Hole("f(1)", "iterate"),)  # the cached plan
    rebinds_sorted = plan_test(test, lambda: names_bound_by("def f(x): return [x]\nsorted = list"))
    assert rebinds_sorted.refusal and rebinds_sorted is not first
    # A test that calls no builtin the service would apply itself never needs the program's names.
    assert plan_test("assert f(1) == [1]", lambda: pytest.fail("the program was parsed")).holes == (Hole("f(1)"),)


def test_holes_keep_their_exact_source_across_lines_and_non_ascii_text():
    plan = plan_test("assert f('é', [1,\n        2]) == g(\n  3)", lambda: names_bound_by("def f(*a): pass\ndef g(x): pass"))
    assert [hole.source for hole in plan.holes] == ["f('é', [1,\n        2])", "g(\n  3)"]


@pytest.mark.parametrize("program, tests, limit", [
    ("", ["assert 1 == 1"], "empty"),
    ("   \n", ["assert 1 == 1"], "empty"),
    (b"\xff\xfe", ["assert 1 == 1"], "UTF-8"),
    ("x = 1\n" * 100_000, ["assert 1 == 1"], "ILF_EXECUTION_MAX_PROGRAM_BYTES"),
    ("x = 1", [], "at least one test"),
    ("x = 1", ["assert x == 1"] * 101, "ILF_EXECUTION_MAX_TESTS"),
    ("x = 1", ["x == 1"], "assert statement"),
    ("x = 1", ["assert x =="], "not valid Python"),
])
def test_bad_input_names_the_limit(executor, program, tests, limit):
    with pytest.raises(InvalidArgument, match=limit):
        executor.execute(Program(program, tests))


@pytest.mark.parametrize("timeout_s, memory_mb, limit", [
    (-1, 0, "ILF_EXECUTION_MAX_TIMEOUT_S"), (1e9, 0, "ILF_EXECUTION_MAX_TIMEOUT_S"),
    (float("nan"), 0, "timeout_s"), (0, 10, "memory_mb"), (0, 1 << 30, "ILF_EXECUTION_MAX_MEMORY_MB"),
])
def test_bad_limits(executor, timeout_s, memory_mb, limit):
    with pytest.raises(InvalidArgument, match=limit):
        executor.execute(Program("x = 1", ["assert x == 1"], timeout_s=timeout_s, memory_mb=memory_mb))


@pytest.fixture(scope="module")
def grpc_channel(executor):
    server = build_server(0, executor)
    server.start()
    with channel(f"127.0.0.1:{server.port}") as ch:
        yield ch
    server.stop(0)  # the shared executor outlives this server


@pytest.fixture(scope="module")
def stub(grpc_channel):
    return execution_pb2_grpc.ExecutionStub(grpc_channel)


def test_grpc_execute(stub):
    reply = stub.Execute(execution_pb2.ExecuteRequest(
        program=DOUBLE, tests=["assert double(2) == 4", "assert double(2) == 5"], request_id="r1"))
    assert reply.request_id == "r1" and not reply.passed
    assert [t.verdict for t in reply.tests] == [execution_pb2.VERDICT_PASSED, execution_pb2.VERDICT_FAILED]


def test_grpc_batch_streams_every_result(stub):
    requests = [execution_pb2.ExecuteRequest(program=DOUBLE, tests=[f"assert double({i}) == {2 * i}"],
                                             request_id=str(i)) for i in range(20)]
    replies = [r for finished in stub.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests))
               for r in finished.results]
    assert sorted(int(r.request_id) for r in replies) == list(range(20))
    assert all(r.passed for r in replies)


def test_the_loop_splits_more_programs_than_one_batch_may_hold(executor):
    from types import SimpleNamespace

    from loop.clients import Clients
    from loop.evaluation import execute
    limited = Executor(dataclasses.replace(executor.settings, max_batch=3, workers=1))
    server = build_server(0, limited)
    server.start()
    try:
        with channel(f"127.0.0.1:{server.port}") as ch:
            clients = Clients(None, None, execution_pb2_grpc.ExecutionStub(ch), None, None)
            task = SimpleNamespace(test_setup_code="", tests=["assert double(2) == 4"])
            programs = {str(i): (DOUBLE if i % 2 else "def double(x):\n    return x\n", task) for i in range(7)}
            with pytest.raises(grpc.RpcError, match="at most 3 programs"):   # what one call of 7 meets
                execute(clients, programs, timeout_s=5, batch=7)
            assert execute(clients, programs, timeout_s=5, batch=3) == {str(i): bool(i % 2) for i in range(7)}
    finally:
        server.stop(0)
        limited.close()


def test_grpc_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Execute(execution_pb2.ExecuteRequest(program="", tests=["assert 1 == 1"]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in error.value.details()


def test_grpc_non_utf8_bytes_are_invalid_argument(grpc_channel):
    # Field 1 (program) holding bytes that are not UTF-8, as a foreign client could send them.
    raw = b"\x0a\x02\xff\xfe" + execution_pb2.ExecuteRequest(tests=["assert 1 == 1"]).SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        grpc_channel.unary_unary("/ilf.v1.Execution/Execute")(raw, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in error.value.details()


def test_grpc_sandbox_info(stub):
    info = stub.GetSandboxInfo(execution_pb2.GetSandboxInfoRequest())
    names = {layer.name for layer in info.layers}
    assert {"network_namespace", "seccomp", "rlimits", "cgroup_memory"} <= names
    assert info.workers >= 1


@pytest.fixture
def one_worker(monkeypatch):
    """An executor with a single sandbox, so consecutive jobs share its pipe."""
    monkeypatch.setenv("ILF_EXECUTION_WORKERS", "1")
    running = Executor(Settings.from_env())
    yield running
    running.close()


def test_job_waiting_behind_one_that_kills_the_worker_runs_on_its_replacement(one_worker):
    import signal
    slow = one_worker.pool.submit(one_worker._prepare(Program(
        "import time\ntime.sleep(30)\n", ["assert 1 == 1"])).message)
    waiting = Program(DOUBLE, ["assert double(2) == 4"], request_id="waiting")
    behind = one_worker.pool.submit(one_worker._prepare(waiting).message)
    time.sleep(1.0)  # the first job is running and the second sits in the worker's pipe
    os.killpg(one_worker.pool._workers[0].process.pid, signal.SIGKILL)
    with pytest.raises(WorkerFailed, match="died"):
        slow.result(timeout=60)
    assert behind.result(timeout=60)["exit_code"] == 0 and one_worker.pool.restarts == 1
    assert one_worker.execute(waiting).passed


def test_job_too_large_for_the_pipe_waits_until_the_worker_is_idle(one_worker):
    one_worker.pool._workers[0].pipe_bytes = 64  # every job frame is larger
    programs = [Program(DOUBLE, [f"assert double({i}) == {2 * i}"], request_id=str(i)) for i in range(6)]
    outcomes = [o for finished in one_worker.execute_batch(programs) for o in finished]
    assert sorted(o.request_id for o in outcomes if o.passed) == [str(i) for i in range(6)]


def test_an_invalid_program_fails_its_batch_and_what_was_queued_is_dropped(one_worker):
    slow = Program("import time\ntime.sleep(1)\n", ["assert 1 == 1"], request_id="slow")
    queued = [Program("import time\ntime.sleep(0.5)\n", ["assert 1 == 1"], request_id=str(i)) for i in range(20)]
    with pytest.raises(InvalidArgument, match="empty"):
        one_worker.execute_batch([slow, *queued, Program("", ["assert 1 == 1"])])
    # The queued programs (10 s of sleeping) were cancelled: the next program waits only for the
    # ones the worker had already taken.
    started = time.monotonic()
    assert one_worker.execute(Program(DOUBLE, ["assert double(2) == 4"])).passed
    assert time.monotonic() - started < 3.0


def test_a_client_that_cancels_a_batch_stops_its_queued_programs(one_worker):
    server = build_server(0, one_worker)
    server.start()
    try:
        with channel(f"127.0.0.1:{server.port}") as ch:
            stub = execution_pb2_grpc.ExecutionStub(ch)
            sleepy = [execution_pb2.ExecuteRequest(program="import time\ntime.sleep(0.5)\n", tests=["assert 1 == 1"],
                                                   request_id=str(i)) for i in range(20)]
            call = stub.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=sleepy))
            assert next(call).results[0].passed
            call.cancel()
            # 9 s of sleeping programs were still queued; the next call waits only for what the worker holds.
            started = time.monotonic()
            assert stub.Execute(execution_pb2.ExecuteRequest(program=DOUBLE, tests=["assert double(1) == 2"])).passed
            assert time.monotonic() - started < 3.0
    finally:
        server.stop(0)
