"""The feedback service's Prometheus metrics (deploy/README.md, "Metrics")."""
from __future__ import annotations

from prometheus_client import Counter

from ilf.metrics import Sampled
from services.feedback.queue import STATES

RECORDS = Counter("ilf_feedback_records_created", "Feedback records this process stored, by author kind.",
                  ["author_kind"])
# Read from the annotation Queue when scraped.
QUEUE = (
    Sampled("ilf_feedback_queue_items", "Annotation queue items, by state.",
            lambda q: {(state,): float(count) for state, count in _states(q).items()}, labels=("state",)),
)


def _states(queue) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for _, state in queue.list():
        counts[state.state] += 1
    return counts
