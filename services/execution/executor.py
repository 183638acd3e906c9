"""The plain Python API of the execution service: validate, run in the sandbox pool, decide verdicts."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Iterator

from ilf import config
from ilf.errors import InvalidArgument
from services.execution.checks import NotATest, TestPlan, decode, names_bound_by, plan_test
from services.execution.isolation import Isolation, Layer, Limits
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
class Settings:
    workers: int
    default_timeout_s: float
    max_timeout_s: float
    default_memory_mb: int
    max_memory_mb: int
    max_program_bytes: int
    max_tests: int
    max_batch: int
    scratch_mb: int
    max_processes: int
    max_open_files: int
    max_file_mb: int
    max_output_bytes: int
    require_sandbox: bool

    @classmethod
    def from_env(cls) -> "Settings":
        def number(name: str, kind=int):
            return kind(config.get(f"ILF_EXECUTION_{name}"))
        return cls(
            workers=number("WORKERS") or os.cpu_count() or 1,
            default_timeout_s=number("TIMEOUT_S", float), max_timeout_s=number("MAX_TIMEOUT_S", float),
            default_memory_mb=number("MEMORY_MB"), max_memory_mb=number("MAX_MEMORY_MB"),
            max_program_bytes=number("MAX_PROGRAM_BYTES"), max_tests=number("MAX_TESTS"),
            max_batch=number("MAX_BATCH"), scratch_mb=number("SCRATCH_MB"),
            max_processes=number("MAX_PROCESSES"), max_open_files=number("MAX_OPEN_FILES"),
            max_file_mb=number("MAX_FILE_MB"), max_output_bytes=number("MAX_OUTPUT_BYTES"),
            require_sandbox=config.enabled("ILF_EXECUTION_REQUIRE_SANDBOX"))


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
        batch = Batch(self.pool)
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
        untrusted = functools.cache(lambda: names_bound_by(program, setup))
        plans = []
        for index, test in enumerate(tests):
            test = _text(test, f"tests[{index}]", settings.max_program_bytes)
            try:
                plans.append(plan_test(test, untrusted))
            except NotATest as error:
                raise InvalidArgument(f"tests[{index}]: {error}") from None
        message = {"program": program, "setup": setup, "holes": [list(p.holes) for p in plans],
                   "timeout_s": timeout_s, "memory_mb": memory_mb}
        return _Job(request, plans, timeout_s, message)


class Batch:
    """Queued programs of one ExecuteBatch call. Iterating yields the outcomes as they finish, each
    time all those finished since the last yield (not in request order); cancel() drops the ones
    that have not started, from any thread (a client that went away)."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.jobs: dict[Future, _Job] = {}
        self.finished: queue.SimpleQueue = queue.SimpleQueue()

    def add(self, job: _Job) -> None:
        future = self.pool.submit(job.message)
        self.jobs[future] = job
        future.add_done_callback(self.finished.put)

    def cancel(self) -> None:
        for future in self.jobs:
            future.cancel()

    def __iter__(self) -> Iterator[list[Outcome]]:
        try:
            remaining = len(self.jobs)
            while remaining:
                chunk = [self.finished.get()]
                while len(chunk) < remaining and not self.finished.empty():
                    chunk.append(self.finished.get())
                remaining -= len(chunk)
                if any(future.cancelled() for future in chunk):
                    return
                yield [_outcome(self.jobs[future], future) for future in chunk]
        finally:
            self.cancel()  # the caller stopped early: drop what has not started


def _outcome(job: _Job, future: Future) -> Outcome:
    """The outcome of a finished job; a sandbox that failed makes every test an error."""
    request_id = job.program.request_id
    try:
        reply = future.result()
    except WorkerFailed as error:
        tests = [TestOutcome(i, Verdict.ERROR, "SandboxFailure", str(error)) for i in range(len(job.plans))]
        return Outcome(request_id, False, tests, 0.0, error_type="SandboxFailure", error_message=str(error))
    return decide(job.plans, reply, request_id)


def decide(plans: list[TestPlan], reply: dict, request_id: str = "") -> Outcome:
    """Verdicts from a worker's reply. Only values cross the sandbox boundary; the comparisons
    with the expected values happen here, so nothing the program does can forge a pass."""
    outcomes: dict[int, TestOutcome] = {}
    load_error: list[str] | None = None
    previous = 0.0
    lines = reply["results"].split("\n")
    for line, arrived in zip(lines, reply["arrivals"]):
        try:
            message = json.loads(line)
            if "load_error" in message or "setup_error" in message:
                load_error = [str(part)[:2000] for part in message.get("load_error") or message["setup_error"]][:2]
                break
            index = message["test"]
            if type(index) is not int or not 0 <= index < len(plans) or index in outcomes:
                raise ValueError("unexpected test index")
        except (ValueError, KeyError, TypeError):
            break  # the program wrote into the result channel: nothing after this point is believed
        duration, previous = max(arrived - previous, 0.0), arrived
        outcomes[index] = _judge(plans[index], message, index, duration)
    missing_reason = _missing_reason(reply, load_error)
    tests = [outcomes.get(i) or TestOutcome(i, *missing_reason) for i in range(len(plans))]
    return Outcome(
        request_id=request_id, passed=all(t.verdict is Verdict.PASSED for t in tests), tests=tests,
        duration_s=reply["duration_s"], stdout=reply["stdout"], stderr=reply["stderr"],
        output_truncated=reply["output_truncated"],
        error_type=load_error[0] if load_error else "", error_message=load_error[1] if load_error else "")


def _judge(plan: TestPlan, message: dict, index: int, duration: float) -> TestOutcome:
    if "error" in message:
        error_type, error_message = (str(part)[:2000] for part in message["error"][:2])
        return TestOutcome(index, Verdict.ERROR, error_type, error_message, duration)
    try:
        values = [decode(value) for value in message["values"]]
        if len(values) != len(plan.holes):
            raise ValueError("wrong number of values")
        passed = plan.verdict(values)
    except Exception as error:  # noqa: BLE001 - a forged or odd value is this test's error
        return TestOutcome(index, Verdict.ERROR, type(error).__name__, str(error)[:2000], duration)
    if passed:
        return TestOutcome(index, Verdict.PASSED, duration_s=duration)
    return TestOutcome(index, Verdict.FAILED, "AssertionError", "", duration)


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
