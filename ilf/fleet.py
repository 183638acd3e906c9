"""Replicas that follow their channel's serving pointer, and the reports they leave in the store.

The serving pointer (ilf.registry) says which version a channel serves, and during a canary which candidate
gets what share of new requests. Every generation and refinement replica reads it every ILF_SERVING_POLL_S,
applies a change (a hot swap with the usual guarantees: a failed load keeps the old version), and writes what
it serves to fleet/<channel>/<replica>.json, which `ilf models status` and `ilf promote` read. A replica that
stops removes its report; one that died stops refreshing it, counts as gone, and its report is removed by the
next replica of the channel that starts a day later.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ilf.errors import NotFound
from ilf.registry import Registry

log = logging.getLogger(__name__)

PREFIX = "fleet/"
# A version that failed to load is tried again this long after, in case the cause (a full disk, the store
# being away) has passed; a new pointer is tried at once.
RETRY_FAILED_S = 60.0
# Reports of replicas that died are kept this long for `ilf models status`, then removed.
GONE_KEPT_S = 86400.0


def replica_name() -> str:
    """The host (a pod's name on Kubernetes), the process and a random part: unique even for in-process replicas."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class ReplicaReport:
    replica: str
    channel: str
    serving_version: str
    loaded_versions: list[str] = field(default_factory=list)
    canary_version: str = ""
    canary_share: float = 0.0
    pointer_version: str = ""     # what the pointer named when this replica last applied it
    pointer_updated_at: float | None = None   # and that pointer's updated_at
    error: str = ""               # why applying the pointer failed ("" when it worked)
    poll_s: float = 0.0
    updated_at: float = 0.0

    def alive(self, now: float | None = None) -> bool:
        """Reported lately: three missed polls (plus slack for a slow store) mean gone."""
        now = time.time() if now is None else now
        return now - self.updated_at <= 3 * self.poll_s + 10

    @classmethod
    def from_dict(cls, value: dict) -> "ReplicaReport":
        return cls(**{k: value[k] for k in cls.__dataclass_fields__ if k in value})


def read_reports(registry: Registry, channel: str) -> list[ReplicaReport]:
    """Every report of the channel's replicas, newest first (gone ones included)."""
    reports = []
    for key in registry.store.list(f"{PREFIX}{channel}/"):
        try:
            reports.append(ReplicaReport.from_dict(registry.store.get_json(key)))
        except (NotFound, ValueError):  # a torn write on a non-atomic store: the next one is whole
            continue
    return sorted(reports, key=lambda r: -r.updated_at)


def live_reports(registry: Registry, channel: str) -> list[ReplicaReport]:
    now = time.time()
    return [r for r in read_reports(registry, channel) if r.alive(now)]


def _named(pointer: dict) -> str:
    canary = pointer.get("canary")
    return pointer["version"] + (f", canary {canary['version']} at {canary['share']:.0%}" if canary else "")


class PointerFollower:
    """Polls a channel's serving pointer on a thread of its own and calls `apply(pointer)` when it changes.

    `apply` raises to say the change could not be made (the replica keeps what it served); the change is tried
    again after RETRY_FAILED_S. `describe()` gives the report's serving fields; without it nothing is reported.
    """

    def __init__(self, registry: Registry, channel: str, apply: Callable[[dict], None], poll_s: float, *,
                 describe: Callable[[], dict] | None = None, replica: str | None = None):
        self.registry, self.channel, self.apply, self.poll_s = registry, channel, apply, poll_s
        self.describe = describe
        self.replica = replica or replica_name()
        self.applied_at: float | None = None    # the pointer's updated_at last applied (or tried)
        self.pointer_version = ""
        self.error = ""
        self._retry_at = 0.0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pointer: dict | None = None, first: Callable[[dict], None] | None = None) -> None:
        """Follows the pointer's changes after `pointer`, the one the replica started on, of which `first` applies
        what starting did not (a canary); without `pointer` the first poll applies whatever the pointer says."""
        if self.poll_s <= 0:
            return
        if pointer is not None:
            self._apply(pointer, first or self.apply)
        if self.describe:
            self._report()
            self._remove_long_gone()
        self._thread = threading.Thread(target=self._run, name=f"follow-{self.channel}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops polling and removes this replica's report, so nobody waits for it."""
        self._stopped.set()
        if not self._thread:
            return
        self._thread.join(timeout=10)
        if self.describe:
            try:
                self.registry.store.delete(self._key(self.replica))
            except Exception:  # noqa: BLE001 - stopping must not fail; the report ages out instead
                log.warning("could not remove the report of %s", self.replica, exc_info=True)

    def _run(self) -> None:
        while not self._stopped.wait(self.poll_s):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the store may be away for a while: keep serving, try next poll
                log.exception("following the %s serving pointer failed", self.channel)

    def sync(self) -> None:
        """One poll: apply the pointer if it changed (or a failed change is due again), then report."""
        pointer = self.registry.serving(self.channel)
        changed = pointer is not None and pointer.get("updated_at") != self.applied_at
        if pointer is not None and (changed or (self.error and time.monotonic() >= self._retry_at)):
            self._apply(pointer, self.apply)
        if self.describe:
            self._report()

    def _apply(self, pointer: dict, apply: Callable[[dict], None]) -> None:
        self.applied_at, self.pointer_version = pointer.get("updated_at"), pointer["version"]
        try:
            apply(pointer)
            self.error = ""
        except Exception as error:  # noqa: BLE001 - the replica keeps serving what it served; reported
            self.error = f"{type(error).__name__}: {error}"
            self._retry_at = time.monotonic() + RETRY_FAILED_S
            log.warning("could not follow the %s pointer (%s): %s", self.channel, _named(pointer), error)

    def _key(self, replica: str) -> str:
        return f"{PREFIX}{self.channel}/{replica}.json"

    def _report(self) -> None:
        report = ReplicaReport(replica=self.replica, channel=self.channel, pointer_version=self.pointer_version,
                               pointer_updated_at=self.applied_at, error=self.error, poll_s=self.poll_s,
                               updated_at=time.time(), **self.describe())
        self.registry.store.put_json(self._key(self.replica), asdict(report), overwrite=True)

    def _remove_long_gone(self) -> None:
        for report in read_reports(self.registry, self.channel):
            if time.time() - report.updated_at > GONE_KEPT_S:
                self.registry.store.delete(self._key(report.replica))
