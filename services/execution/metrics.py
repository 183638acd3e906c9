"""The execution service's Prometheus metrics (deploy/README.md, "Metrics")."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from ilf.metrics import Sampled

PROGRAMS = Counter("ilf_execution_programs", "Programs run against their tests, by verdict: passed, or the worst "
                   "test verdict (timeout, then error, then failed).", ["verdict"])
TESTS = Counter("ilf_execution_tests", "Tests run, by verdict.", ["verdict"])
DURATION = Histogram("ilf_execution_duration_seconds", "Wall time of one program and its tests in the sandbox.",
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60))
# Read from the Executor when scraped.
EXECUTORS = (
    Sampled("ilf_execution_sandbox_restarts", "Sandbox worker processes replaced after one died or hung.",
            lambda e: e.pool.restarts, counter=True),
    Sampled("ilf_execution_workers", "Sandboxed worker processes.", lambda e: e.pool.size),
    Sampled("ilf_execution_isolation_layer_active", "1 for each isolation layer in force, 0 for one this node "
            "does not allow.", lambda e: {(layer.name,): float(layer.active) for layer in e.layers},
            labels=("layer",)),
)


def verdict_of(outcome) -> str:
    """passed, or the worst verdict among the program's tests."""
    if outcome.passed:
        return "passed"
    verdicts = {test.verdict.value for test in outcome.tests}
    return next((v for v in ("timeout", "error") if v in verdicts), "failed")


def record(outcome) -> None:
    """Counts one program's outcome (an executor.Outcome)."""
    PROGRAMS.labels(verdict_of(outcome)).inc()
    for test in outcome.tests:
        TESTS.labels(test.verdict.value).inc()
    DURATION.observe(outcome.duration_s)
