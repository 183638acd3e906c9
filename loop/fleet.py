"""Promotion across every replica, and canaries that promote or roll back on measured pass@1.

Promoting moves the channel's serving pointer; each replica follows it (ilf.fleet) and reports what it serves, so
`promote` waits on the reports until every live replica serves the version, or says which did not by the
deadline and why. A canary names a candidate in the pointer for a share of new requests on every replica, while
pass@1 of the serving version and the candidate is measured on held-out tasks; the measurement decides.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ilf import tasksets
from ilf.fleet import ReplicaReport, live_reports
from ilf.registry import Registry
from loop.clients import Clients
from loop.evaluation import Evaluation, evaluate, evaluation_tasks
from loop.settings import RoundSettings

log = logging.getLogger(__name__)

CHANNELS = ("generation", "refinement")
WAIT_POLL_S = 0.2


@dataclass
class FleetWait:
    """How the live replicas stood when a wait ended."""
    ok: bool                              # every live replica got there
    seconds: float
    replicas: list[ReplicaReport] = field(default_factory=list)
    lagging: list[ReplicaReport] = field(default_factory=list)   # live ones that did not

    def describe(self, goal: str) -> str:
        if not self.replicas:
            return f"no live replica reported (they {goal} when they start)"
        if self.ok:
            return f"all {len(self.replicas)} replica(s) {goal} after {self.seconds:.1f} s"
        return f"{len(self.lagging)} of {len(self.replicas)} replica(s) did not within {self.seconds:.0f} s: " + "; ".join(
            f"{r.replica} serves {r.serving_version}" + (f" (error: {r.error})" if r.error else "") for r in self.lagging)


def wait_for_fleet(registry: Registry, channel: str, pointer: dict, done: Callable[[ReplicaReport], bool],
                   deadline_s: float) -> FleetWait:
    """Waits until every live replica is `done`, or every one that is not has failed to apply `pointer` (it said
    why in its report), or the deadline passes."""
    started = time.monotonic()

    def failed(report: ReplicaReport) -> bool:
        return bool(report.error) and report.pointer_updated_at == pointer.get("updated_at")
    while True:
        live = live_reports(registry, channel)
        lagging = [r for r in live if not done(r)]
        elapsed = time.monotonic() - started
        if not lagging or all(map(failed, lagging)) or elapsed >= deadline_s:
            return FleetWait(not lagging, elapsed, live, lagging)
        time.sleep(WAIT_POLL_S)


@dataclass
class Promotion:
    version: str
    wait: FleetWait
    restored: str = ""   # the version the pointer went back to when no replica could load this one

    @property
    def ok(self) -> bool:
        return self.wait.ok


def promote(registry: Registry, channel: str, version: str, deadline_s: float) -> Promotion:
    """Moves the pointer to `version` and waits until every live replica serves it. When none could load it, the
    pointer goes back, so replicas that start later do not try it either."""
    pointer = registry.promote(channel, version, reason="ilf promote")
    return _settled(registry, channel, pointer, version, deadline_s)


def rollback(registry: Registry, channel: str, deadline_s: float) -> Promotion:
    pointer = registry.rollback(channel)
    return _settled(registry, channel, pointer, pointer["version"], deadline_s)


def _settled(registry: Registry, channel: str, pointer: dict, version: str, deadline_s: float) -> Promotion:
    wait = wait_for_fleet(registry, channel, pointer, lambda r: r.serving_version == version, deadline_s)
    if wait.replicas and len(wait.lagging) == len(wait.replicas) and all(r.error for r in wait.lagging):
        restored = registry.rollback(channel)["version"]
        log.warning("no replica could load %s: the %s pointer is back on %s", version, channel, restored)
        return Promotion(version, wait, restored)
    return Promotion(version, wait)


@dataclass
class CanaryResult:
    version: str
    serving_version: str
    share: float
    margin: float
    promoted: bool
    reason: str
    started: FleetWait                    # every replica routing the share to the candidate
    ended: FleetWait | None = None        # every replica serving the outcome
    serving: Evaluation | None = None
    candidate: Evaluation | None = None


def canary(clients: Clients, registry: Registry, version: str, share: float, settings: RoundSettings, *,
           margin: float, deadline_s: float) -> CanaryResult:
    """Serves `version` to `share` of new generation requests on every replica, measures pass@1 of it and of the
    serving version on the held-out tasks `settings` names (both versions, the same tasks and seeds), then
    promotes it when it is at most `margin` worse, else ends the canary. Any failure ends the canary too."""
    tasks = evaluation_tasks(tasksets.TaskSets(registry.store).get(settings.task_set), settings)
    pointer = registry.start_canary("generation", version, share)
    serving_version = pointer["version"]
    result = CanaryResult(version, serving_version, share, margin, False, "",
                          wait_for_fleet(registry, "generation", pointer, lambda r: r.canary_version == version,
                                         deadline_s))
    try:
        if not result.started.ok:
            result.reason = f"the canary did not start: {result.started.describe('route it')}"
        else:
            result.serving = evaluate(clients, tasks, settings, serving_version, label=f"pass@1 of {serving_version}")
            result.candidate = evaluate(clients, tasks, settings, version, label=f"pass@1 of {version}")
            measured, baseline = result.candidate.pass_at[1], result.serving.pass_at[1]
            result.promoted = measured >= baseline - margin
            result.reason = (f"pass@1 {measured:.3f} against {baseline:.3f} of {serving_version} on {len(tasks)} "
                             f"{settings.eval_split} tasks of {settings.task_set} (margin {margin:g})")
    except BaseException:
        registry.end_canary("generation", reason=f"canary {version} ended: the measurement failed")
        raise
    if result.promoted:
        final = registry.promote("generation", version, reason=f"canary passed: {result.reason}")
        result.ended = wait_for_fleet(registry, "generation", final, lambda r: r.serving_version == version, deadline_s)
    else:
        final = registry.end_canary("generation", reason=f"canary rolled back: {result.reason}")
        result.ended = wait_for_fleet(registry, "generation", final,
                                      lambda r: not r.canary_version and r.serving_version == serving_version,
                                      deadline_s)
    log.info("canary %s %s: %s", version, "promoted" if result.promoted else "rolled back", result.reason)
    return result
