"""The annotation queue: failing programs of a model, waiting for feedback.

Every object is immutable, so the queue survives restarts and loses nothing:

    feedback/queue/items/<item id>.json            a failing program: task, text, the model version that
                                                   wrote it, its per-test results (written once)
    feedback/queue/events/<item id>/<seq>.json     its state changes in order: leased, skipped, answered

An item's state is its events folded in order. Events are numbered; writing number n fails when it
exists, so two writers can never both change an item from the same state (the loser re-reads and
tries again). An item id hashes task set, task and program text: one item per distinct program.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ilf.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ilf.store import ArtifactStore

ITEMS_PREFIX = "feedback/queue/items/"
EVENTS_PREFIX = "feedback/queue/events/"
QUEUED, LEASED, ANSWERED = "queued", "leased", "answered"
STATES = (QUEUED, LEASED, ANSWERED)
DEFAULT_LEASE_S = 600.0
MAX_LEASE_S = 86400.0
WRITE_ATTEMPTS = 5


@dataclass(frozen=True)
class Item:
    item_id: str
    task_set: str
    task_id: int
    program: str
    model_version: str                      # the model version that wrote the program
    tests: tuple[dict, ...] = ()            # per test: test, index, verdict, error_type, error_message, actual, expected
    load_error: str = ""
    created_at: float = 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tests": list(self.tests)}

    @classmethod
    def from_dict(cls, value: dict) -> "Item":
        return cls(**{**value, "tests": tuple(value.get("tests", ()))})


def item_id_of(task_set: str, task_id: int, program: str) -> str:
    return hashlib.sha256(json.dumps([task_set, task_id, program]).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str                    # leased, skipped or answered
    at: float
    lease_id: str = ""
    annotator_id: str = ""
    expires_at: float = 0.0      # leased
    reason: str = ""             # skipped
    record_id: str = ""          # answered
    author_kind: str = ""        # answered: human or model


@dataclass
class State:
    state: str = QUEUED
    lease_id: str = ""
    leased_by: str = ""
    lease_expires_at: float = 0.0
    skipped_by: list[str] = field(default_factory=list)
    record_id: str = ""
    answered_by: str = ""


def fold(events: list[Event], now: float) -> State:
    """The state the events leave an item in at time `now`."""
    state = State()
    for event in events:
        if event.kind == "answered":
            return State(ANSWERED, skipped_by=state.skipped_by, record_id=event.record_id,
                         answered_by=event.author_kind)
        if event.kind == "leased":
            state.lease_id, state.leased_by, state.lease_expires_at = event.lease_id, event.annotator_id, event.expires_at
        elif event.kind == "skipped":
            state.skipped_by.append(event.annotator_id)
            if event.lease_id == state.lease_id:
                state.lease_id, state.leased_by, state.lease_expires_at = "", "", 0.0
    if state.lease_id and state.lease_expires_at > now:
        state.state = LEASED
    return state


class Queue:
    """The queue over a store; items and events are read once at start and written through."""

    def __init__(self, store: ArtifactStore, clock=time.time):
        self.store = store
        self.clock = clock
        self._lock = threading.RLock()
        self._items: dict[str, Item] = {}
        self._events: dict[str, list[Event]] = defaultdict(list)
        self._item_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        # One listing for items and events alike (a local store's listing walks the whole store).
        for key in store.list("feedback/queue/"):
            if not key.endswith(".json"):
                continue
            if key.startswith(ITEMS_PREFIX):
                item = Item.from_dict(store.get_json(key))
                self._items[item.item_id] = item
            elif key.startswith(EVENTS_PREFIX):
                self._events[key[len(EVENTS_PREFIX):].split("/")[0]].append(Event(**store.get_json(key)))
        for events in self._events.values():
            events.sort(key=lambda e: e.seq)

    def _read_events(self, item_id: str) -> list[Event]:
        keys = [k for k in self.store.list(f"{EVENTS_PREFIX}{item_id}/") if k.endswith(".json")]
        return sorted((Event(**self.store.get_json(k)) for k in keys), key=lambda e: e.seq)

    # items

    def add(self, item: Item) -> tuple[Item, bool]:
        """Queues the item unless one with its id exists; returns the stored item and whether it is new."""
        with self._lock:
            if item.item_id in self._items:
                return self._items[item.item_id], False
        try:
            self.store.put_json(f"{ITEMS_PREFIX}{item.item_id}.json", item.to_dict())
        except AlreadyExists:  # another process queued it
            item = Item.from_dict(self.store.get_json(f"{ITEMS_PREFIX}{item.item_id}.json"))
            with self._lock:
                self._items[item.item_id] = item
                self._events[item.item_id] = self._read_events(item.item_id)
            return item, False
        with self._lock:
            self._items[item.item_id] = item
        return item, True

    def get(self, item_id: str) -> tuple[Item, State]:
        with self._lock:
            item = self._items.get(item_id)
            if item is None:
                raise NotFound(f"no queue item {item_id!r}")
            return item, fold(self._events[item_id], self.clock())

    def list(self, task_set: str = "", state: str = "", limit: int = 0) -> list[tuple[Item, State]]:
        """Matching items, oldest first."""
        if state and state not in STATES:
            raise InvalidArgument(f"state must be one of {STATES}, got {state!r}")
        now = self.clock()
        with self._lock:
            rows = [(item, fold(self._events[item.item_id], now)) for item in
                    sorted(self._items.values(), key=lambda i: (i.created_at, i.item_id))
                    if not task_set or item.task_set == task_set]
        rows = [(item, s) for item, s in rows if not state or s.state == state]
        return rows[:limit or None]

    # state changes

    def _append(self, item_id: str, change) -> State:
        """Writes the event change(state, seq) returns as the item's next one; when another writer took that
        number first, re-reads the events and asks change() again. change() raises to refuse."""
        for _ in range(WRITE_ATTEMPTS):
            with self._lock:
                events = list(self._events[item_id])
            event = change(fold(events, self.clock()), len(events))
            try:
                self.store.put_json(f"{EVENTS_PREFIX}{item_id}/{event.seq:06d}.json", dataclasses.asdict(event))
            except AlreadyExists:
                with self._lock:
                    self._events[item_id] = self._read_events(item_id)
                continue
            with self._lock:
                self._events[item_id].append(event)
                return fold(self._events[item_id], self.clock())
        raise FailedPrecondition(f"queue item {item_id} kept changing while it was written; try again")

    def lease(self, annotator_id: str, *, task_set: str = "", item_id: str = "",
              lease_s: float = DEFAULT_LEASE_S) -> tuple[Item, State]:
        """Takes an item for annotator_id until the lease expires: the given one, else the oldest queued item
        the annotator has not skipped. Asking again while holding an unexpired lease returns that lease."""
        if not annotator_id.strip():
            raise InvalidArgument("annotator_id is empty")
        if not 0 <= lease_s <= MAX_LEASE_S:
            raise InvalidArgument(f"lease_seconds must be between 0 and {MAX_LEASE_S:.0f}, got {lease_s}")
        lease_s = lease_s or DEFAULT_LEASE_S
        rows = [] if item_id else self.list(task_set=task_set)
        held = [i.item_id for i, s in rows if s.state == LEASED and s.leased_by == annotator_id]
        candidates = [item_id] if item_id else held + [
            i.item_id for i, s in rows if s.state == QUEUED and annotator_id not in s.skipped_by]
        for candidate in candidates:
            item, _ = self.get(candidate)

            def take(state: State, seq: int) -> Event:
                if state.state == ANSWERED:
                    raise FailedPrecondition(f"queue item {candidate} is already answered (record {state.record_id})")
                if state.state == LEASED and state.leased_by != annotator_id:
                    raise FailedPrecondition(f"queue item {candidate} is leased by {state.leased_by} until "
                                             f"{time.strftime('%H:%M:%S', time.gmtime(state.lease_expires_at))} UTC")
                if state.state == LEASED:
                    raise _AlreadyHeld()
                return Event(seq, "leased", self.clock(), lease_id=secrets.token_hex(8), annotator_id=annotator_id,
                             expires_at=self.clock() + lease_s)
            try:
                return item, self._append(candidate, take)
            except _AlreadyHeld:
                return self.get(candidate)
            except FailedPrecondition:
                if item_id:
                    raise
        raise NotFound(f"no queued item for {annotator_id}" + (f" in task set {task_set}" if task_set else ""))

    def skip(self, item_id: str, lease_id: str, reason: str = "") -> tuple[Item, State]:
        """Gives the item back; it is not offered to this annotator again."""
        item, _ = self.get(item_id)

        def release(state: State, seq: int) -> Event:
            _require_lease(item_id, state, lease_id)
            return Event(seq, "skipped", self.clock(), lease_id=lease_id, annotator_id=state.leased_by,
                         reason=reason[:500])
        return item, self._append(item_id, release)

    def item_lock(self, item_id: str) -> threading.Lock:
        """Held while an answer is checked, so one process never checks two answers to one item at once."""
        with self._lock:
            return self._item_locks[item_id]

    def check_lease(self, item_id: str, lease_id: str) -> None:
        _require_lease(item_id, self.get(item_id)[1], lease_id)

    def answered(self, item_id: str, record_id: str, author_kind: str, *, lease_id: str = "") -> State:
        """Closes the item with the feedback record; a human answer needs the lease, a model one an unheld item."""
        def close(state: State, seq: int) -> Event:
            if author_kind == "human":
                _require_lease(item_id, state, lease_id)
            elif state.state != QUEUED:
                raise FailedPrecondition(f"queue item {item_id} is {state.state}: the model answers only queued items")
            return Event(seq, "answered", self.clock(), lease_id=lease_id, record_id=record_id, author_kind=author_kind)
        return self._append(item_id, close)


class _AlreadyHeld(Exception):
    pass


def _require_lease(item_id: str, state: State, lease_id: str) -> None:
    """The lease must be the item's last one and not given back; an expired one still counts while no one
    else has leased the item since."""
    if state.state == ANSWERED:
        raise FailedPrecondition(f"queue item {item_id} is already answered (record {state.record_id})")
    if not lease_id:
        raise InvalidArgument("lease_id is empty: lease the item first (LeaseItem)")
    if state.lease_id != lease_id:
        holder = f"; {state.leased_by} holds it now" if state.state == LEASED else ""
        raise FailedPrecondition(f"lease {lease_id} on queue item {item_id} is no longer valid{holder}")
