"""The plain Python API of the execution service: validate, run in the sandbox pool, decide verdicts."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Iterable, Iterator

from ilf.config import Section, nested, setting
from ilf.grpc_util import ServerConfig
from ilf.errors import InvalidArgument
from services.execution.checks import (
    MAX_RESULT_ITEMS, EvaluationLimit, HoleError, Meter, NotATest, ResultTooLarge, TestPlan, Unsupported,
    decode_hole, names_bound_by, plan_test)
from services.execution.compare import compared
from services.execution.isolation import MAX_RESULT_BYTES, Isolation, Layer, Limits
from services.execution.pool import WorkerFailed, WorkerPool

log = logging.getLogger(__name__)


class Verdict(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Program:
    program: str | bytes
    tests: tuple[str, ...] | list[str]
    test_setup_code: str | bytes = ""
    timeout_s: float = 0.0  # 0: the service's default
    memory_mb: int = 0      # 0: the service's default
    request_id: str = ""


@dataclass
class TestOutcome:
    index: int
    verdict: Verdict
    error_type: str = ""
    error_message: str = ""
    duration_s: float = 0.0
    actual: str = ""           # FAILED comparisons: repr of the program's value, and of what it was compared with
    expected: str = ""


@dataclass
class Outcome:
    request_id: str
    passed: bool
    tests: list[TestOutcome]
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    error_type: str = ""       # the program (or test setup) failed before any test ran
    error_message: str = ""


@dataclass(frozen=True)
class Settings(Section):
    """The execution service's settings, parsed once at start-up (limits and defaults of every execution)."""
    LABEL: ClassVar[str] = "execution"
    workers: int = setting("ILF_EXECUTION_WORKERS")          # 0: one per CPU
    default_timeout_s: float = setting("ILF_EXECUTION_TIMEOUT_S")
    max_timeout_s: float = setting("ILF_EXECUTION_MAX_TIMEOUT_S")
    default_memory_mb: int = setting("ILF_EXECUTION_MEMORY_MB")
    max_memory_mb: int = setting("ILF_EXECUTION_MAX_MEMORY_MB")
    max_program_bytes: int = setting("ILF_EXECUTION_MAX_PROGRAM_BYTES")
    max_tests: int = setting("ILF_EXECUTION_MAX_TESTS")
    max_batch: int = setting("ILF_EXECUTION_MAX_BATCH")
    scratch_mb: int = setting("ILF_EXECUTION_SCRATCH_MB")
    max_processes: int = setting("ILF_EXECUTION_MAX_PROCESSES")
    max_open_files: int = setting("ILF_EXECUTION_MAX_OPEN_FILES")
    max_file_mb: int = setting("ILF_EXECUTION_MAX_FILE_MB")
    max_output_bytes: int = setting("ILF_EXECUTION_MAX_OUTPUT_BYTES")
    require_sandbox: bool = setting("ILF_EXECUTION_REQUIRE_SANDBOX")
    batch_memory_mb: int = setting("ILF_EXECUTION_BATCH_MEMORY_MB")
    port: int = setting("ILF_EXECUTION_PORT")
    server: ServerConfig = nested(ServerConfig)

    def __post_init__(self):
        if not self.workers:
            object.__setattr__(self, "workers", os.cpu_count() or 1)

    @property
    def batch_window(self) -> int:
        """Programs of one batch queued or finished but not yet streamed at once: the most that fits
        ILF_EXECUTION_BATCH_MEMORY_MB when each fills its result channel and both output captures."""
        per_program = MAX_RESULT_BYTES + 2 * self.max_output_bytes + self.max_tests * 4096
        return max(1, (self.batch_memory_mb << 20) // per_program)


# The smallest memory limit a Python interpreter can run under at all.
MIN_MEMORY_MB = 64


@dataclass
class _Job:
    program: Program
    plans: list[TestPlan]
    timeout_s: float
    message: dict = field(default_factory=dict)


class Executor:
    """Runs programs against their asserts in the sandbox pool; thread-safe."""

    def __init__(self, settings: Settings | None = None, *, use_bwrap: bool = True):
        self.settings = settings = settings or Settings.from_env()
        limits = Limits(settings.default_timeout_s, settings.default_memory_mb, settings.scratch_mb,
                        settings.max_processes, settings.max_open_files, settings.max_file_mb,
                        settings.max_output_bytes)
        self.isolation = Isolation.probe(limits, use_bwrap=use_bwrap)
        for layer in self.isolation.layers:
            log.info("isolation layer %-20s %s  %s", layer.name, "ACTIVE  " if layer.active else "INACTIVE", layer.detail)
        if settings.require_sandbox and not self.isolation.bwrap:
            raise RuntimeError("ILF_EXECUTION_REQUIRE_SANDBOX is set but bwrap cannot sandbox programs here")
        self.pool = WorkerPool(self.isolation, settings.workers, settings.max_memory_mb)

    @property
    def layers(self) -> list[Layer]:
        return self.isolation.layers

    def close(self) -> None:
        self.pool.close()

    def execute(self, program: Program) -> Outcome:
        job = self._prepare(program)
        return _outcome(job, self.pool.submit(job.message))

    def execute_batch(self, programs: Iterable[Program]) -> "Batch":
        """Validates and queues every program; iterate the returned batch for the outcomes.

        Each program is queued as soon as it is validated, so the workers start while the rest of
        a large batch is still being checked; an invalid program raises InvalidArgument here and
        cancels what was queued (what already ran is discarded).
        """
        programs = list(programs)
        if not programs:
            raise InvalidArgument("a batch needs at least one program")
        if len(programs) > self.settings.max_batch:
            raise InvalidArgument(f"a batch holds at most {self.settings.max_batch} programs "
                                  f"(ILF_EXECUTION_MAX_BATCH), got {len(programs)}")
        batch = Batch(self.pool, self.settings.batch_window)
        try:
            for program in programs:
                batch.add(self._prepare(program))
        except InvalidArgument:
            batch.cancel()
            raise
        return batch

    def _prepare(self, request: Program) -> _Job:
        settings = self.settings
        program = _text(request.program, "program", settings.max_program_bytes)
        setup = _text(request.test_setup_code, "test_setup_code", settings.max_program_bytes)
        if not program.strip():
            raise InvalidArgument("program is empty")
        tests = list(request.tests)
        if not tests:
            raise InvalidArgument("at least one test is needed")
        if len(tests) > settings.max_tests:
            raise InvalidArgument(f"at most {settings.max_tests} tests per program (ILF_EXECUTION_MAX_TESTS), "
                                  f"got {len(tests)}")
        timeout_s = request.timeout_s or settings.default_timeout_s
        if not (math.isfinite(timeout_s) and 0 < timeout_s <= settings.max_timeout_s):
            raise InvalidArgument(f"timeout_s must be in (0, {settings.max_timeout_s:g}] seconds "
                                  f"(ILF_EXECUTION_MAX_TIMEOUT_S; 0 means the default "
                                  f"{settings.default_timeout_s:g}), got {request.timeout_s}")
        memory_mb = request.memory_mb or settings.default_memory_mb
        if not MIN_MEMORY_MB <= memory_mb <= settings.max_memory_mb:
            raise InvalidArgument(f"memory_mb must be in [{MIN_MEMORY_MB}, {settings.max_memory_mb}] "
                                  f"(ILF_EXECUTION_MAX_MEMORY_MB; 0 means the default "
                                  f"{settings.default_memory_mb}), got {request.memory_mb}")
        # The program is parsed only if one of its tests needs its names, and then once.
        bindings = functools.cache(lambda: names_bound_by(program, setup))
        plans = []
        for index, test in enumerate(tests):
            test = _text(test, f"tests[{index}]", settings.max_program_bytes)
            try:
                plans.append(plan_test(test, bindings, has_setup=bool(setup.strip())))
            except NotATest as error:
                raise InvalidArgument(f"tests[{index}]: {error}") from None
        message = {"program": program, "setup": setup, "holes": [[[h.source, h.mode] for h in p.holes] for p in plans],
                   "timeout_s": timeout_s, "memory_mb": memory_mb}
        return _Job(request, plans, timeout_s, message)


class Batch:
    """Queued programs of one ExecuteBatch call. Iterating yields the outcomes as they finish, each
    time those finished since the last yield (not in request order, at most MAX_CHUNK_BYTES of output
    each); cancel() drops the ones that have not started, from any thread (a client that went away).

    At most `window` programs are in the pool or finished and not yet taken at once: the rest wait here,
    as small validated jobs, so a client that reads slowly holds at most `window` replies in memory, and
    every outcome is released once it has been handed out."""

    def __init__(self, pool: WorkerPool, window: int):
        self.pool, self.window = pool, window
        self.lock = threading.Lock()
        self.waiting: deque[_Job] = deque()
        self.submitted: dict[Future, _Job] = {}
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.total = 0
        self.cancelled = False

    def add(self, job: _Job) -> None:
        with self.lock:
            self.total += 1
            if len(self.submitted) < self.window:
                self._submit(job)
            else:
                self.waiting.append(job)

    def _submit(self, job: _Job) -> None:
        future = self.pool.submit(job.message)
        self.submitted[future] = job
        future.add_done_callback(self.finished.put)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            self.waiting.clear()
            submitted = list(self.submitted)
        for future in submitted:
            future.cancel()

    def __iter__(self) -> Iterator[list[Outcome]]:
        try:
            remaining = self.total
            while remaining:
                taken = [self.finished.get()]
                while len(taken) < remaining and not self.finished.empty():
                    taken.append(self.finished.get())
                remaining -= len(taken)
                if any(future.cancelled() for future in taken):
                    return
                with self.lock:
                    jobs = [self.submitted.pop(future) for future in taken]
                    while self.waiting and len(self.submitted) < self.window and not self.cancelled:
                        self._submit(self.waiting.popleft())
                chunks = _chunks([_outcome(job, future) for job, future in zip(jobs, taken)])
                del jobs, taken  # the replies go with their futures
                while chunks:
                    yield chunks.pop(0)  # and each outcome with the chunk the caller was given
        finally:
            self.cancel()  # the caller stopped early: drop what has not started


# One streamed message's worth of outcomes (the gRPC message limit is far above it).
MAX_CHUNK_BYTES = 8 << 20


def _chunks(outcomes: list[Outcome]) -> list[list[Outcome]]:
    chunks, size = [[]], 0
    for outcome in outcomes:
        weight = len(outcome.stdout) + len(outcome.stderr) + sum(
            len(t.error_type) + len(t.error_message) + 64 for t in outcome.tests)
        if chunks[-1] and size + weight > MAX_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(outcome)
        size += weight
    return chunks


def _outcome(job: _Job, future: Future) -> Outcome:
    """The outcome of a finished job; a sandbox that failed (or answered garbage) makes every test an error."""
    request_id = job.program.request_id
    try:
        reply = future.result()
    except WorkerFailed as error:
        return _sandbox_failure(job.plans, request_id, str(error))
    try:
        return decide(job.plans, reply, request_id)
    except Exception:  # noqa: BLE001 - a bug here must cost this program its verdicts, never the batch
        log.exception("cannot decide the verdicts of %s", request_id or "a program")
        return _sandbox_failure(job.plans, request_id, "the service could not read this program's results")


def _sandbox_failure(plans: list[TestPlan], request_id: str, message: str) -> Outcome:
    tests = [TestOutcome(i, Verdict.ERROR, "SandboxFailure", message) for i in range(len(plans))]
    return Outcome(request_id, False, tests, 0.0, error_type="SandboxFailure", error_message=message)


# What a worker's reply holds, by exact type.
_REPLY_FIELDS = {"results": (str,), "arrivals": (list,), "results_truncated": (bool,), "timed_out": (bool,),
                 "signal": (int,), "exit_code": (int,), "duration_s": (int, float), "stdout": (str,),
                 "stderr": (str,), "output_truncated": (bool,)}


def decide(plans: list[TestPlan], reply: dict, request_id: str = "") -> Outcome:
    """Verdicts from a worker's reply. Only values cross the sandbox boundary; the comparisons with the
    expected values happen here, so nothing the program does can forge a pass. Everything in the reply is
    treated as hostile: anything malformed makes this program's tests errors, and nothing else."""
    if type(reply) is not dict or any(type(reply.get(k)) not in kinds for k, kinds in _REPLY_FIELDS.items()):
        return _sandbox_failure(plans, request_id, "the sandbox sent a malformed reply")
    outcomes: dict[int, TestOutcome] = {}
    load_error: list[str] | None = None
    previous = 0.0
    meter, budget = Meter(), [MAX_RESULT_ITEMS]
    for line, arrived in zip(reply["results"][:MAX_RESULT_BYTES].split("\n"), reply["arrivals"]):
        try:
            message = json.loads(line)
            if type(message) is not dict or type(arrived) not in (int, float):
                raise ValueError("not a result")
            if "load_error" in message or "setup_error" in message:
                parts = message.get("load_error") or message.get("setup_error")
                if type(parts) is not list or len(parts) != 2 or not all(type(p) is str for p in parts):
                    raise ValueError("not an error")
                load_error = [part[:2000] for part in parts]
                break
            index, values = message.get("test"), message.get("values")
            if type(index) is not int or not 0 <= index < len(plans) or index in outcomes or type(values) is not list:
                raise ValueError("unexpected test index")
        except (ValueError, RecursionError):
            break  # the program wrote into the result channel: nothing after this point is believed
        duration, previous = max(arrived - previous, 0.0), arrived
        outcomes[index] = _judge(plans[index], values, index, duration, meter, budget)
    missing_reason = _missing_reason(reply, load_error)
    tests = [_refused(plan, i) or outcomes.get(i) or TestOutcome(i, *missing_reason) for i, plan in enumerate(plans)]
    return Outcome(
        request_id=request_id, passed=all(t.verdict is Verdict.PASSED for t in tests), tests=tests,
        duration_s=float(reply["duration_s"]), stdout=reply["stdout"], stderr=reply["stderr"],
        output_truncated=reply["output_truncated"],
        error_type=load_error[0] if load_error else "", error_message=load_error[1] if load_error else "")


def _refused(plan: TestPlan, index: int) -> TestOutcome | None:
    if plan.refusal:
        return TestOutcome(index, Verdict.ERROR, "UnsupportedTest",
                           f"the service cannot evaluate this test outside the sandbox: {plan.refusal}")
    return None


def _judge(plan: TestPlan, values: list, index: int, duration: float, meter: Meter, budget: list[int]) -> TestOutcome:
    def error(error_type: str, message: str) -> TestOutcome:
        return TestOutcome(index, Verdict.ERROR, error_type, message[:2000], duration)
    if len(values) != len(plan.holes):
        return error("MalformedResult", "the sandbox reported the wrong number of values")
    try:
        decoded = [decode_hole(value, meter, budget) for value in values]
    except ResultTooLarge as too_large:
        return error("ResultTooLarge", str(too_large))
    except ValueError as malformed:  # a forged or odd value is this test's error
        return error("MalformedResult", str(malformed))
    try:
        passed = plan.verdict(decoded, meter)
    except HoleError as raised:  # the program's code raised where the test needed its value
        return error(raised.error_type, str(raised))
    except Unsupported as refusal:
        return error("UnsupportedTest", f"the service cannot evaluate this test outside the sandbox: {refusal}")
    except EvaluationLimit as limit:
        return error("EvaluationLimit", str(limit))
    except Exception as raised:  # noqa: BLE001 - the test itself raised (a TypeError comparing, say)
        return error(type(raised).__name__, str(raised))
    if passed:
        return TestOutcome(index, Verdict.PASSED, duration_s=duration)
    actual, expected = compared(plan.source, [hole.source for hole in plan.holes], decoded)
    return TestOutcome(index, Verdict.FAILED, "AssertionError", "", duration, actual, expected)


def _missing_reason(reply: dict, load_error: list[str] | None) -> tuple:
    """Why a test has no result: the program did not load, ran out of time, or died."""
    if load_error:
        return Verdict.ERROR, *load_error
    if reply["timed_out"]:
        return Verdict.TIMEOUT, "Timeout", "the program ran past its time limit"
    if reply["signal"]:
        return Verdict.ERROR, "Crash", f"the program was killed by signal {reply['signal']}"
    if reply["results_truncated"]:
        return Verdict.ERROR, "ResultTooLarge", "the results exceeded the size the harness accepts"
    return Verdict.ERROR, "NoResult", f"the program exited (status {reply['exit_code']}) before this test finished"


def _text(value: str | bytes, what: str, limit: int) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(f"{what} is not valid UTF-8 (byte {error.start})") from None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise InvalidArgument(f"{what} is not valid UTF-8 (character {error.start})") from None
    if size > limit:
        raise InvalidArgument(f"{what} is {size} bytes; the limit is {limit} (ILF_EXECUTION_MAX_PROGRAM_BYTES)")
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character")
    return value
