"""Continuous retraining: start an ILF round by itself once enough new human feedback has arrived."""
from __future__ import annotations

import logging
import time

from ilf.errors import NotFound
from ilf.store import ArtifactStore
from ilf.v1 import feedback_pb2
from loop.clients import Clients
from loop.round import run_round
from loop.settings import RoundSettings

log = logging.getLogger(__name__)

STATE_KEY = "policy/retraining.json"


def new_feedback_count(clients: Clients, since: float) -> int:
    """Human feedback records on MBPP_Train tasks created at or after `since`."""
    return len(clients.feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(filter=feedback_pb2.FeedbackFilter(
        split="train", author_kind=feedback_pb2.AUTHOR_KIND_HUMAN, since=since)), timeout=600).records)


def retrain_when_due(settings: RoundSettings, clients: Clients, store: ArtifactStore, *, min_new_feedback: int,
                     poll_seconds: float = 60.0, max_rounds: int = 1, max_wait_seconds: float | None = None) -> list[dict]:
    """Polls the feedback service; runs a round whenever min_new_feedback records arrived since the last one.

    The time of the last round lives in the store, so a restarted policy does not retrain twice.
    Stops after max_rounds rounds, or after max_wait_seconds without one.
    """
    reports, idle_since = [], time.monotonic()
    while len(reports) < max_rounds:
        try:
            since = store.get_json(STATE_KEY)["last_round_started_at"]
        except NotFound:
            since = 0.0
        count = new_feedback_count(clients, since)
        if count >= min_new_feedback:
            started = time.time()
            log.info("%d new feedback records since %s: starting a round", count, since)
            report = run_round(settings, clients, store)
            store.put_json(STATE_KEY, {"last_round_started_at": started, "round_id": report["round_id"],
                                       "new_feedback": count}, overwrite=True)
            reports.append(report)
            idle_since = time.monotonic()
        elif max_wait_seconds is not None and time.monotonic() - idle_since > max_wait_seconds:
            break
        else:
            time.sleep(poll_seconds)
    return reports
