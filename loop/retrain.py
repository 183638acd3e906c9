"""Continuous retraining: start an ILF round by itself once enough new feedback has arrived.

What the policy keeps in the store:

    policy/retraining.json          the one mutable pointer: the last finished round, the round running now
                                    (if any), and when a failed round may be tried again
    policy/attempts/<round>.json    one immutable record per round it started: finished or failed, and why

A round writes its report.json last, so a restarted policy tells a round that finished (never started
again) from one that was running when the policy stopped (a failed attempt, retried later). Serving
switches only inside a round, after the candidate's whole evaluation, so a stopped or failed round never
leaves a half-evaluated model serving.
"""
from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import Counter, Gauge

from ilf.errors import AlreadyExists, NotFound
from ilf.grpc_util import timestamp
from ilf.store import ArtifactStore
from ilf.v1 import feedback_pb2
from loop.clients import Clients
from loop.round import new_round_id, run_round
from loop.settings import RoundSettings

log = logging.getLogger(__name__)

STATE_KEY = "policy/retraining.json"
ATTEMPTS_PREFIX = "policy/attempts/"
FRESH = {"last_round_started_at": 0.0, "round_id": "", "running": None, "retry_after": 0.0, "failures": 0,
         "min_new_feedback": None}

# On the process's /metrics (ILF_METRICS_PORT), so an operator sees failing rounds without reading logs.
ROUNDS = Counter("ilf_retrain_rounds", "Rounds the retraining policy started, by how they ended.", ["status"])
FAILURES_IN_A_ROW = Gauge("ilf_retrain_failures_in_a_row", "Rounds that failed since the last one that finished.")
LAST_FINISHED = Gauge("ilf_retrain_last_finished_round_start_timestamp_seconds",
                      "When the last round that finished started (unix seconds).")


def new_feedback_count(clients: Clients, since: float, task_set: str = "", authors: str = "human") -> int:
    """Feedback records on the task set's train split (any task set when empty) created at or after `since`;
    human ones only unless authors is "any"."""
    author = feedback_pb2.AUTHOR_KIND_HUMAN if authors == "human" else feedback_pb2.AUTHOR_KIND_UNSPECIFIED
    return len(clients.feedback.ListFeedback(feedback_pb2.ListFeedbackRequest(filter=feedback_pb2.FeedbackFilter(
        split="train", author_kind=author, since=timestamp(since), task_set=task_set)), timeout=600).records)


def policy_state(store: ArtifactStore) -> dict:
    try:
        return {**FRESH, **store.get_json(STATE_KEY)}
    except NotFound:
        return dict(FRESH)


def _save(store: ArtifactStore, state: dict) -> dict:
    # The threshold stays in every state written, so the annotation page can say how many records are still due.
    if state.get("min_new_feedback") is None:
        state = {**state, "min_new_feedback": policy_state(store)["min_new_feedback"]}
    store.put_json(STATE_KEY, state, overwrite=True)
    return state


def _record_attempt(store: ArtifactStore, round_id: str, **outcome) -> None:
    ROUNDS.labels(outcome["status"]).inc()
    try:
        store.put_json(f"{ATTEMPTS_PREFIX}{round_id}.json", {"round_id": round_id, "recorded_at": time.time(),
                                                              **outcome})
    except AlreadyExists:
        pass  # recorded before a restart that came ahead of saving the state


def attempts(store: ArtifactStore) -> list[dict]:
    return [store.get_json(k) for k in store.list(ATTEMPTS_PREFIX) if k.endswith(".json")]


def _finished(state: dict, running: dict) -> dict:
    FAILURES_IN_A_ROW.set(0)
    LAST_FINISHED.set(running["started_at"])
    return {**FRESH, "last_round_started_at": running["started_at"], "round_id": running["round_id"],
            "new_feedback": running["new_feedback"]}


def _failed(store: ArtifactStore, state: dict, running: dict, error: str, retry_seconds: float) -> dict:
    _record_attempt(store, running["round_id"], status="failed", started_at=running["started_at"],
                    new_feedback=running["new_feedback"], error=error)
    log.error("round %s failed (%s); retrying in %.0f s", running["round_id"], error, retry_seconds)
    FAILURES_IN_A_ROW.set(state["failures"] + 1)
    return {**state, "running": None, "retry_after": time.time() + retry_seconds, "failures": state["failures"] + 1,
            "last_error": error}


def recover(store: ArtifactStore, retry_seconds: float) -> dict:
    """The state after a restart: a round that was running either finished (its report exists) or failed."""
    state = policy_state(store)
    running = state["running"]
    if not running:
        return state
    try:
        report = store.get_json(f"reports/{running['round_id']}/report.json")
    except NotFound:
        return _save(store, _failed(store, state, running, "interrupted: the policy stopped while the round ran",
                                    retry_seconds))
    _record_attempt(store, running["round_id"], status="finished", started_at=running["started_at"],
                    new_feedback=running["new_feedback"], outcome=report["outcome"])
    return _save(store, _finished(state, running))


def _attempt(settings: RoundSettings, clients: Clients, store: ArtifactStore, state: dict, count: int,
             retry_seconds: float) -> tuple[dict, dict | None]:
    """Runs one round; returns the new state and the report (None when the round failed)."""
    running = {"round_id": new_round_id(), "started_at": time.time(), "new_feedback": count}
    state = _save(store, {**state, "running": running})
    log.info("%d new feedback records since %s: starting round %s", count, state["last_round_started_at"],
             running["round_id"])
    try:
        report = run_round(settings, clients, store, round_id=running["round_id"])
    except Exception as error:  # noqa: BLE001 - any failure is recorded and retried later, never fatal
        details = error.details() if isinstance(error, grpc.RpcError) else str(error)
        return _save(store, _failed(store, state, running, f"{type(error).__name__}: {details}", retry_seconds)), None
    _record_attempt(store, running["round_id"], status="finished", started_at=running["started_at"],
                    new_feedback=count, outcome=report["outcome"])
    return _save(store, _finished(state, running)), report


def retrain_when_due(settings: RoundSettings, clients: Clients, store: ArtifactStore, *, min_new_feedback: int,
                     poll_seconds: float = 60.0, max_rounds: int = 1, max_wait_seconds: float | None = None,
                     retry_seconds: float = 600.0) -> list[dict]:
    """Polls the feedback service; runs a round whenever min_new_feedback records on the task set's train split
    arrived since the last finished round started; a failed round is tried again after retry_seconds.

    Returns the reports of the rounds that finished. Stops after max_rounds of them, or after
    max_wait_seconds without one.
    """
    reports, idle_since = [], time.monotonic()
    state = _save(store, {**recover(store, retry_seconds), "min_new_feedback": min_new_feedback})
    while len(reports) < max_rounds:
        try:
            count = new_feedback_count(clients, state["last_round_started_at"], settings.task_set,
                                       settings.feedback_authors)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("the feedback service is unreachable (%s); asking again later", error.details())
            count = -1
        if count >= min_new_feedback and time.time() >= state["retry_after"]:
            state, report = _attempt(settings, clients, store, state, count, retry_seconds)
            if report:
                reports.append(report)
                idle_since = time.monotonic()
            continue
        if max_wait_seconds is not None and time.monotonic() - idle_since > max_wait_seconds:
            break
        time.sleep(poll_seconds)
    return reports
