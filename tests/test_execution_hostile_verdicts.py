"""Hostile programs against the verdict and against the service that decides it, one class of attack each:

- the expected side of an assert evaluated (or reachable) inside the sandbox;
- a float tolerance where the expected value is exact (and none where it is a float);
- lazy values where the test consumes them (a correct program passes);
- work the service would do on data the program chose;
- malformed result frames;
- the memory a batch holds.

Every program is run by `contained`: it gets the asserted verdicts, no sandbox worker is restarted, unrelated
calls keep their usual latency while it runs (nothing holds the GIL), and the next ordinary program is judged
right.
"""
from __future__ import annotations

import gc
import statistics
import textwrap
import threading
import time
import weakref

import grpc
import pytest

from ilf.grpc_util import channel
from ilf.v1 import execution_pb2, execution_pb2_grpc
from services.execution.executor import Executor, Outcome, Program, Settings, Verdict
from services.execution.server import build_server
from test_execution import DOUBLE, executor  # noqa: F401 - the shared executor fixture

PASSED, FAILED, ERROR, TIMEOUT = Verdict.PASSED, Verdict.FAILED, Verdict.ERROR, Verdict.TIMEOUT
UNRELATED = Program(DOUBLE, ["assert double(21) == 42"])
# Beyond the usual latency of an unrelated call, what a loaded 2-core machine may add; a program that made the
# service compute on its data for seconds, or held the GIL, exceeds it.
LATENCY_MARGIN_S = 1.0
LONGEST_GIL_GAP_S = 0.5


def ordinary_program_is_judged_right(executor) -> None:
    probe = "import os\n" + DOUBLE
    for _ in range(executor.pool.size):
        outcome = executor.execute(Program(probe, ["assert double(21) == 42", "assert double(1) == 3",
                                                   "assert os.listdir('/tmp') == []"]))
        assert [t.verdict for t in outcome.tests] == [PASSED, FAILED, PASSED], outcome


_usual: list[float] = []


def usual_latency(executor) -> float:
    if not _usual:
        executor.execute(UNRELATED)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            assert executor.execute(UNRELATED).passed
            latencies.append(time.monotonic() - started)
        _usual.append(statistics.median(latencies))
    return _usual[0]


def contained(executor, program: str, tests: list[str], expected: list, **options) -> Outcome:
    """Runs a hostile program while another client keeps calling and a thread keeps time; asserts the verdicts,
    the unrelated calls' latency, that the GIL was never held for long, that no worker was restarted, and that
    the next ordinary program is judged right. `expected` holds a verdict (or a set of verdicts) per test."""
    usual = usual_latency(executor)
    restarts = executor.pool.restarts
    done, latencies, gaps, results = threading.Event(), [], [], []

    def unrelated():
        while not done.is_set():
            started = time.monotonic()
            outcome = executor.execute(UNRELATED)
            latencies.append(time.monotonic() - started)
            assert outcome.passed, outcome

    def clock():
        last = time.monotonic()
        while not done.wait(0.005):
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    helpers = [threading.Thread(target=unrelated, daemon=True), threading.Thread(target=clock, daemon=True)]
    for helper in helpers:
        helper.start()
    hostile = threading.Thread(target=lambda: results.append(executor.execute(Program(
        textwrap.dedent(program), tests, timeout_s=options.pop("timeout_s", 3), **options))), daemon=True)
    hostile.start()
    hostile.join(60)
    time.sleep(0.05)
    done.set()
    for helper in helpers:
        helper.join(30)
    assert results, "the hostile program's execution did not return within 60 s"
    outcome = results[0]
    assert all(t.verdict in (wanted if isinstance(wanted, set) else {wanted})
               for t, wanted in zip(outcome.tests, expected, strict=True)), outcome
    assert latencies, "no unrelated call completed while the hostile program ran"
    assert max(latencies) < usual + LATENCY_MARGIN_S, (max(latencies), usual)
    assert max(gaps) < LONGEST_GIL_GAP_S, f"a thread of the service waited {max(gaps):.2f} s"
    assert executor.pool.restarts == restarts, "a sandbox worker died"
    ordinary_program_is_judged_right(executor)
    return outcome


# --- The expected side is the service's: lying objects, patched modules and builtins ---------------

FORGERIES = {
    "lying_subtraction_and_abs": ("""
        class Lie:
            def __sub__(self, other): return 0
            __rsub__ = __sub__
            def __abs__(self): return 0
            def __lt__(self, other): return True
        def f(x): return Lie()
        """, "assert abs(f(1) - 2.5) < 1e-9", ERROR),
    "lying_difference_equal_to_zero": ("""
        class Lie:
            def __sub__(self, other): return 0
        def f(x): return Lie()
        """, "assert f(1) - 7 == 0", ERROR),
    "float_subclass_that_equals_everything": ("""
        class Lie(float):
            def __eq__(self, other): return True
            __hash__ = float.__hash__
        def f(x): return Lie(0.0)
        """, "assert round(f(1), 2) == 3.14", ERROR),
    "list_subclass_that_equals_everything": ("""
        class Lie(list):
            def __iter__(self): return iter([1, 2, 3])
            def __eq__(self, other): return True
        def f(x): return Lie([9])
        """, "assert f(1) == [1, 2, 3]", ERROR),
    "len_that_lies": ("""
        class Lie:
            def __len__(self): return 3
        def f(x): return Lie()
        """, "assert len(f(1)) == 3", ERROR),
    "str_subclass_with_a_lying_method": ("""
        class Lie(str):
            def lower(self): return 'abc'
        def f(x): return Lie('XYZ')
        """, "assert f(1).lower() == 'abc'", ERROR),
    "patched_math_isclose": ("""
        import math
        math.isclose = lambda *args, **kwargs: True
        def f(x): return 0.5
        """, "assert math.isclose(f(1), 0.25)", FAILED),
    "patched_math_on_the_expected_side": ("""
        import math
        math.floor = lambda x: 99
        def f(x): return 99
        """, "assert f(3.5) == math.floor(3.5)", FAILED),
    "patched_builtins_round_and_abs": ("""
        import builtins
        builtins.round = lambda *args: 3.14
        builtins.abs = lambda x: 0
        def f(x): return 1.0
        """, "assert round(f(1), 2) == 3.14 and abs(f(1)) == 0", FAILED),
    "fake_math_module": ("""
        class FakeMath:
            @staticmethod
            def floor(x): return 'same'
        math = FakeMath()
        def f(x): return 'same'
        """, "assert f(3.5) == math.floor(3.5)", ERROR),
    "expected_value_from_a_comprehension_over_the_program": ("""
        def f(x): return x
        """, "assert [f(i) for i in range(3)] == [0, 1, 2]", ERROR),
    "rebound_sorted_applied_to_the_program": ("""
        def sorted(values, **options): return [1, 2, 3]
        def f(x): return [9]
        """, "assert sorted(f(1)) == [1, 2, 3]", ERROR),
    "rebound_sum_on_the_expected_side": ("""
        def sum(values): return 'same'
        def f(x): return 'same'
        """, "assert f(3) == sum([1, 2])", ERROR),
    "generator_of_lying_items_to_all": ("""
        class Truthy:
            def __bool__(self): return True
        def f(x): return (Truthy() for _ in range(3))
        """, "assert all(f(1))", ERROR),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_program_cannot_reach_the_expected_side(executor, name):
    program, test, verdict = FORGERIES[name]
    outcome = contained(executor, program, [test, "assert 2 + 2 == 4"], [verdict, PASSED])
    if name in ("fake_math_module", "expected_value_from_a_comprehension_over_the_program",
                "rebound_sorted_applied_to_the_program", "rebound_sum_on_the_expected_side"):
        assert outcome.tests[0].error_type == "UnsupportedTest" and "outside the sandbox" in outcome.tests[0].error_message


def test_an_expected_value_from_setup_code_is_refused(executor):
    outcome = contained(executor, "def f(x): return x\n", ["assert f(3) == expected", "assert f(3) == 3"],
                        [ERROR, PASSED], test_setup_code="expected = sorted([3])[0]")
    assert outcome.tests[0].error_type == "UnsupportedTest" and "test_setup_code" in outcome.tests[0].error_message


CORRECT_SHAPES = [
    ("import math\ndef f(x): return 0.1 + 0.2", "assert math.isclose(f(1), 0.3)"),
    ("def f(x): return 2.5", "assert abs(f(1) - 2.5) < 1e-9"),
    ("def f(x): return 7", "assert f(1) - 7 == 0"),
    ("def f(x): return 3.14159", "assert round(f(1), 2) == 3.14"),
    ("def f(x): return [3, 1, 2]", "assert sorted(f(1)) == [1, 2, 3]"),
    ("import math\ndef f(x): return 3", "assert f(3.5) == math.floor(3.5)"),
    ("from math import *\ndef f(x): return 3", "assert f(3.5) == floor(3.5)"),
    ("def f(x): return 'XYZ'", "assert f(1).lower() == 'xyz' and len(f(1)) == 3"),
    ("def f(x): return [(2, 'b'), (1, 'a')]", "assert sorted(f(1), key=lambda t: t[1])[0] == (1, 'a')"),
    ("def f(x): return {'a': 1}", "assert f(1).get('a') == 1 and 'a' in f(1) and isinstance(f(1), dict)"),
    ("def sum(a, b): return a - b", "assert sum(10, 4) == 6"),
    ("def f(x): return None", "assert f(1) is None or f(1)[0] == 1"),
    ("from collections import Counter\ndef f(x): return 'aab'", "assert Counter(f(1)) == {'a': 2, 'b': 1}"),
    ("def f(x): return 5", "assert f'{f(1):>3}' == '  5' and str(f(1)) == '5' and type(f(1)) is int"),
    ("def f(x): return 3.14159", "assert '%.2f' % f(1) == '3.14' and '{:.2f}'.format(f(1)) == '3.14'"),
    ("def f(x): return 'x' * 5_000_000", "assert f(1) == 'x' * 5_000_000"),
    ("def f(x): return list(range(90_000))", "assert sorted(f(1), reverse=True)[::-1] == list(range(90_000))"),
]


@pytest.mark.parametrize("program, test", CORRECT_SHAPES)
def test_correct_programs_pass_the_same_shapes_of_test(executor, program, test):
    outcome = executor.execute(Program(program, [test]))
    assert outcome.passed, outcome


# --- A float tolerance only where the expected value is a float --------------------------------------

TOLERANCE = [
    ("def f(a, b): return float(a + b)", "assert f(10**17, 1) == 100000000000000001", FAILED),
    ("def f(a, b): return a + b", "assert f(10**17, 1) == 100000000000000001", PASSED),
    ("def f(a, b): return float(a + b)", "assert 100000000000000001 == f(10**17, 1)", FAILED),
    ("def f(): return 3.000001", "assert f() == 3", FAILED),
    ("def f(): return 2.999999", "assert f() == 3", FAILED),
    ("def f(): return 3.0", "assert f() == 3", PASSED),
    ("def f(): return 3.000001", "assert f() == 3.0", PASSED),
    ("def f(): return 2.999999", "assert 3.0 == f()", PASSED),
    ("def f(): return 3.0001", "assert f() == 3.0", FAILED),
    ("def f(): return 0.1 + 0.2", "assert f() == 0.3", PASSED),
    ("def f(): return [0.1 + 0.2, 2.0000001]", "assert f() == [0.3, 2]", FAILED),
    ("def f(): return [0.1 + 0.2, 2.0]", "assert f() == [0.3, 2]", PASSED),
    ("def f(): return {'x': 2.0000001}", "assert f() == {'x': 2}", FAILED),
    ("def f(): return {'x': 2.0000001}", "assert f() == {'x': 2.0}", PASSED),
    ("def f(): return 1e-13", "assert f() == 0.0", PASSED),
    ("def f(): return 1", "assert f() != 1.0000001", FAILED),
]


@pytest.mark.parametrize("program, test, verdict", TOLERANCE)
def test_floats_are_approximate_only_where_the_expected_value_is_a_float(executor, program, test, verdict):
    contained(executor, program, [test], [verdict])


# --- Lazy values where the test consumes them ------------------------------------------------------

LAZY = [
    ("def f(): return (x > 0 for x in [1, 2, 3])", "assert all(f())", PASSED),
    ("def f(): return (x > 0 for x in [1, -2, 3])", "assert all(f())", FAILED),
    ("def f(): return map(str.isdigit, ['a', '1'])", "assert any(f())", PASSED),
    ("def f(): return filter(None, [0, 0])", "assert not any(f())", PASSED),
    ("import itertools\ndef f(): return itertools.count(1)", "assert any(f())", PASSED),
    ("import itertools\ndef f(): return itertools.count(0)", "assert all(f())", FAILED),
    ("def f(): return range(5)", "assert sum(f()) == 10 and sorted(f(), reverse=True)[0] == 4", PASSED),
    ("def f(): return {3: 'a', 1: 'b'}.keys()", "assert sorted(f()) == [1, 3] and f() == {1, 3}", PASSED),
    ("def f(): return (x * x for x in range(4))", "assert set(f()) == {0, 1, 4, 9}", PASSED),
    ("def f(): return (x for x in [3, 1])", "assert all(x > 0 for x in f())", PASSED),
    ("def f(): return zip('ab', [1, 2])", "assert dict(f()) == {'a': 1, 'b': 2}", PASSED),
    ("def f(): return reversed([1, 2])", "assert list(f()) == [2, 1] and max(f()) == 2", PASSED),
]


@pytest.mark.parametrize("program, test, verdict", LAZY)
def test_lazy_values_are_consumed_where_the_test_consumes_them(executor, program, test, verdict):
    contained(executor, program, [test], [verdict])


# --- Work the service would do on data the program chose --------------------------------------------

SERVICE_WORK = {
    "huge_range_to_sum": ("def f(): return range(10**18)", "assert sum(f()) == 1", ERROR),
    "huge_range_to_sorted": ("def f(): return range(10**18)", "assert sorted(f()) == [1]", ERROR),
    "huge_range_to_set": ("def f(): return range(10**18)", "assert set(f()) == {1}", ERROR),
    "huge_range_to_max": ("def f(): return range(10**18)", "assert max(f()) == 1", ERROR),
    "huge_range_to_all": ("def f(): return range(10**18)", "assert all(f())", FAILED),
    "huge_range_in_a_comprehension": ("def f(): return range(10**18)", "assert all(x >= 0 for x in f())", ERROR),
    "huge_integer_squared": ("def f(): return 7 ** 20000", "assert f() * f() * f() * f() == 1", ERROR),
    "huge_integer_power": ("def f(): return 3", "assert f() ** 10**12 == 1", ERROR),
    "huge_shift": ("def f(): return 3", "assert f() << 10**12 == 1", ERROR),
    "repeated_text": ("def f(): return 'ab'", "assert f() * 10**10 == ''", ERROR),
    "repeated_list_then_walked": ("def f(): return list(range(1000))", "assert str([f()] * 10**5) == ''", ERROR),
    "quadratic_sum_of_lists": ("def f(): return [[i] * 20 for i in range(3000)]", "assert sum(f(), []) == []", ERROR),
    "sort_by_a_key_of_many_items": ("def f(): return list(range(90000))",
                                    "assert sorted(f(), key=lambda v: -v)[0] == -1", FAILED),
    "nested_deeper_than_reported": ("""
        def f():
            value = []
            for _ in range(500):
                value = [value]
            return value
        """, "assert f() == []", ERROR),
    "too_many_items_in_all": ("def f(): return [[0] * 1000] * 200", "assert f() == []", ERROR),
    "pad_to_a_huge_width": ("def f(): return 'x'", "assert f().rjust(10**9) == 'x'", ERROR),
    "format_to_a_huge_width": ("def f(): return 1", "assert f'{f():>999999999}' == '1'", ERROR),
    "factorial_of_a_huge_number": ("import math\ndef f(): return 10**7", "assert math.factorial(f()) == 1", ERROR),
    "round_to_a_huge_negative_precision": ("def f(): return 5", "assert round(f(), -10**9) == 0", ERROR),
    "percent_format_to_a_huge_width": ("def f(): return 5", "assert '%999999999d' % f() == '5'", ERROR),
    "percent_format_width_from_the_arguments": ("def f(): return 5", "assert '%*d' % (10**9, f()) == '5'", ERROR),
    "format_method_reaching_attributes": ("def f(): return 5", "assert '{0.__class__}'.format(f()) == '5'", ERROR),
}


@pytest.mark.parametrize("name", sorted(SERVICE_WORK))
def test_the_service_never_does_unbounded_work_on_a_programs_data(executor, name):
    program, test, verdict = SERVICE_WORK[name]
    started = time.monotonic()
    outcome = contained(executor, program, [test, "assert 2 + 2 == 4"], [verdict, PASSED])
    assert time.monotonic() - started < 20
    if verdict is ERROR:
        assert outcome.tests[0].error_type in ("EvaluationLimit", "ResultTooLarge", "OverflowError",
                                               "UnsupportedTest"), outcome


def test_many_tests_share_one_budget_of_result_items(executor):
    tests = [f"assert len(f({i})) == 30000" for i in range(6)]
    outcome = contained(executor, "def f(x): return list(range(30000))", tests,
                        [PASSED, PASSED, PASSED, ERROR, ERROR, ERROR])
    assert outcome.tests[3].error_type in ("OverflowError", "ResultTooLarge"), outcome


# --- Malformed result frames ----------------------------------------------------------------------

# Python expressions of what each program writes on the result channel (fd 3) before it exits.
FRAMES = {
    "values_not_a_list": r"""b'{"test": 0, "values": 5}\n'""",
    "a_list_for_a_message": r"""b'["load_error"]\n'""",
    "load_error_not_a_pair": r"""b'{"load_error": 7}\n'""",
    "setup_error_of_numbers": r"""b'{"setup_error": [1, 2]}\n'""",
    "collection_of_a_number": r"""b'{"test": 0, "values": [["l", 5]]}\n'""",
    "error_of_numbers": r"""b'{"test": 0, "values": [["E", 1, 2]]}\n'""",
    "unhashable_dict_key": r"""b'{"test": 0, "values": [["d", [[["l", []], ["n"]]]]]}\n'""",
    "huge_integer": r"""b'{"test": 0, "values": [["i", "' + b'f' * 100000 + b'"]]}\n'""",
    "float_overflow": r"""b'{"test": 0, "values": [["f", "0x1p99999"]]}\n'""",
    "nested_json": r"""b'[' * 100000 + b']' * 100000 + b'\n'""",
    "not_utf8": r"""b'{"test": 0, "values": [["s", "\xff\xfe"]]}\n'""",
    "test_index_not_an_int": r"""b'{"test": "0", "values": []}\n'""",
    "forged_pass_then_exit": r"""b'{"test": 0, "values": [["T"]]}\n{"test": 1, "values": [["T"]]}\n'""",
}
FRAME_PROGRAM = """
    import os
    frame = {frame}
    while frame:
        frame = frame[os.write(3, frame):]
    os._exit(0)
    def f(x):
        return 0
    """


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_a_malformed_result_frame_is_an_error_of_that_program_only(executor, name):
    program = FRAME_PROGRAM.format(frame=FRAMES[name])
    outcome = contained(executor, program, ["assert f(1) == 4", "assert f(1) == 0"], [{ERROR, FAILED}] * 2)
    assert outcome.tests[0].error_type != "SandboxFailure"


@pytest.fixture(scope="module")
def stub(executor):
    server = build_server(0, executor)
    server.start()
    with channel(f"127.0.0.1:{server.port}") as ch:
        yield execution_pb2_grpc.ExecutionStub(ch)
    server.stop(0)  # the shared executor outlives this server


def test_malformed_frames_never_abort_a_batch_stream(stub):
    requests = [execution_pb2.ExecuteRequest(program=textwrap.dedent(FRAME_PROGRAM.format(frame=frame)),
                                             tests=["assert f(1) == 4"], request_id=f"bad-{name}")
                for name, frame in sorted(FRAMES.items())]
    requests += [execution_pb2.ExecuteRequest(program=DOUBLE, tests=[f"assert double({i}) == {2 * i}"],
                                              request_id=f"good-{i}") for i in range(10)]
    replies = {r.request_id: r for message in stub.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests),
                                                                timeout=120)
               for r in message.results}
    assert set(replies) == {r.request_id for r in requests}
    assert all(replies[f"good-{i}"].passed for i in range(10))
    assert not any(replies[r].passed for r in replies if r.startswith("bad-"))
    for name in FRAMES:  # each alone through Execute: an answer, never INTERNAL
        reply = stub.Execute(requests[sorted(FRAMES).index(name)], timeout=60)
        assert reply.tests[0].verdict in (execution_pb2.VERDICT_ERROR, execution_pb2.VERDICT_FAILED)


# --- The memory a batch holds ----------------------------------------------------------------------

@pytest.fixture
def small_batches(monkeypatch):
    """A two-worker executor whose batches may hold about 20 MB: two programs at a time."""
    monkeypatch.setenv("ILF_EXECUTION_WORKERS", "2")
    monkeypatch.setenv("ILF_EXECUTION_BATCH_MEMORY_MB", "20")
    running = Executor(Settings.from_env())
    assert running.settings.batch_window == 2
    yield running
    running.close()


FLOODS = {
    "output_flood": "import sys\nsys.stdout.write('x' * 200000)\nsys.stderr.write('y' * 200000)\n"
                    "def f(x):\n    return x\n",
    "result_flood": "def f(x):\n    return ['z' * 60] * 90000 if x else x\n",
}


@pytest.mark.parametrize("name", sorted(FLOODS))
def test_a_batch_holds_at_most_its_window_and_releases_each_result(small_batches, name):
    programs = [Program(FLOODS[name], ["assert f(0) == 0", "assert len(f(1)) > 0"], request_id=str(i))
                for i in range(12)]
    batch = small_batches.execute_batch(programs)
    time.sleep(1.5)  # nobody reads: no more than the window may run or wait finished
    assert len(batch.submitted) <= 2 and len(batch.waiting) >= 10
    seen, released = [], []
    for chunk in batch:
        for outcome in chunk:
            seen.append(outcome.request_id)
            released.append(weakref.ref(outcome))
        del chunk, outcome
        gc.collect()
        assert all(ref() is None for ref in released), "the batch keeps an outcome it handed out"
        assert len(batch.submitted) <= 2
    assert sorted(seen, key=int) == [str(i) for i in range(12)]
    ordinary_program_is_judged_right(small_batches)


def test_a_batch_larger_than_its_window_still_streams_every_result_over_grpc(small_batches):
    server = build_server(0, small_batches)
    server.start()
    try:
        with channel(f"127.0.0.1:{server.port}") as ch:
            stub = execution_pb2_grpc.ExecutionStub(ch)
            requests = [execution_pb2.ExecuteRequest(program=DOUBLE, tests=[f"assert double({i}) == {2 * i}"],
                                                     request_id=str(i)) for i in range(30)]
            replies = [r for message in stub.ExecuteBatch(execution_pb2.ExecuteBatchRequest(requests=requests),
                                                          timeout=120) for r in message.results]
            assert sorted(int(r.request_id) for r in replies) == list(range(30)) and all(r.passed for r in replies)
            with pytest.raises(grpc.RpcError) as error:
                stub.Execute(execution_pb2.ExecuteRequest(program="", tests=["assert 1 == 1"]), timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
