"""Every MBPP gold program passes its tests through the sandbox, except the three known failures."""
from __future__ import annotations

import time

from ilf import data
from services.execution.executor import Program
from test_execution import executor  # noqa: F401 - the shared executor fixture

# ../shared/data/README.md: set ordering in the expected value (341, 642), sys.getsizeof (596).
KNOWN_FAILURES = {341, 596, 642}


def test_all_gold_programs(executor):
    tasks = data.mbpp()
    # Task 123 needs about 6 s of CPU; 30 s leaves room for a machine busy with other work.
    programs = [Program(t.code, t.tests, t.test_setup_code, timeout_s=30, request_id=str(task_id))
                for task_id, t in tasks.items()]
    started = time.monotonic()
    failing = {int(o.request_id): o for finished in executor.execute_batch(programs) for o in finished if not o.passed}
    elapsed = time.monotonic() - started
    assert set(failing) == KNOWN_FAILURES, {k: v.tests for k, v in failing.items() if k not in KNOWN_FAILURES}
    assert len(tasks) == 974 and elapsed < 60
