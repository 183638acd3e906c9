"""Training runs as plain Python: accepting, launching, monitoring, restarts.

A run lives in the store: runs/<id>/spec.json (immutable: what to train, an ilf.training_spec.RunSpec)
and runs/<id>/state.json (overwritten as it moves QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED),
next to what the trainer writes there (progress.json, checkpoint.pt, metrics.json, loss_curve.png). A restarted
service reads the states back and keeps watching the runs that had not ended.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Iterator

from ilf.errors import FailedPrecondition, NotFound
from ilf.registry import Registry, new_version_id
from ilf.store import ArtifactStore
from ilf.training_spec import RunSpec, with_defaults
from services.training.launchers import JobStatus, Launcher

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL = (SUCCEEDED, FAILED, CANCELLED)
PROGRESS_FIELDS = ("phase", "step", "total_steps", "epoch", "loss", "tokens_per_second", "eta_seconds")


class RunManager:
    def __init__(self, store: ArtifactStore, launcher: Launcher, *, max_concurrent: int = 1, poll_s: float = 1.0):
        self.store, self.registry, self.launcher = store, Registry(store), launcher
        self.max_concurrent, self.poll_s = max_concurrent, poll_s
        self.changed = threading.Condition()
        self.states: dict[str, dict] = {}
        self.specs: dict[str, dict] = {}  # the JSON form of each run's RunSpec
        for key in store.list("runs/"):
            if key.endswith("/state.json") and key.count("/") == 2:
                state = store.get_json(key)
                self.states[state["run_id"]] = state
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # requests
    def submit(self, dataset: str, base_model_version: str, hyperparameters: dict, purpose: str = "") -> dict:
        """Accepts a run; unset (zero) hyperparameters and purpose take their defaults."""
        hp = with_defaults(hyperparameters)
        purpose = purpose or "generation"
        run_id = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        now = time.time()
        spec = RunSpec(run_id=run_id, dataset=dataset, base_model_version=base_model_version, hyperparameters=hp,
                       output_version=new_version_id(f"{purpose[:3]}-{hp.method}"), purpose=purpose, created_at=now)
        if not self.store.exists(dataset):
            raise NotFound(f"dataset {dataset!r} does not exist in the store")
        self.registry.get(base_model_version)  # NotFound unless registered
        self.store.put_json(f"runs/{run_id}/spec.json", spec.to_json())
        self.specs[run_id] = spec.to_json()
        state = {"run_id": run_id, "state": QUEUED, "created_at": now, "updated_at": now, "progress": {},
                 "log_tail": [], "error": "", "output_model_version": "", "handle": None}
        self._save(state)
        self._wake.set()
        return self.get(run_id)

    def get(self, run_id: str) -> dict:
        with self.changed:
            if run_id not in self.states:
                raise NotFound(f"training run {run_id!r} does not exist")
            return {**self.spec(run_id), **self.states[run_id]}

    def spec(self, run_id: str) -> dict:
        if run_id not in self.specs:  # immutable, so read once
            self.specs[run_id] = self.store.get_json(f"runs/{run_id}/spec.json")
        return self.specs[run_id]

    def list(self) -> list[dict]:
        with self.changed:
            ids = sorted(self.states, key=lambda i: self.states[i]["created_at"])
        return [self.get(i) for i in ids]

    def cancel(self, run_id: str) -> dict:
        with self.changed:  # marked first, so the monitor cannot record the killed job as failed
            state = self.get(run_id)
            if state["state"] in FINAL:
                raise FailedPrecondition(f"run {run_id} already ended ({state['state']})")
            self._update(run_id, state=CANCELLED, error="cancelled by request")
        if state["handle"]:
            self.launcher.cancel(run_id, state["handle"])
        return self.get(run_id)

    def watch(self, run_id: str, is_active=lambda: True) -> Iterator[dict]:
        """The run now, then each time it changes, until it ends (or the caller goes away)."""
        last = None
        while is_active():
            with self.changed:
                current = self.get(run_id)
                if current["updated_at"] == last:
                    self.changed.wait(timeout=1.0)
                    continue
            last = current["updated_at"]
            yield current
            if current["state"] in FINAL:
                return

    # monitoring
    def start(self) -> None:
        self._thread = threading.Thread(target=self._monitor, name="training-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _monitor(self) -> None:
        while not self._stopped.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - one bad poll (store hiccup) must not end monitoring
                log.exception("monitoring training runs failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def poll(self) -> None:
        """One pass: refresh running runs, then start queued ones while slots are free."""
        with self.changed:
            unfinished = sorted((s for s in self.states.values() if s["state"] not in FINAL),
                                key=lambda s: s["created_at"])
        running = 0
        for state in unfinished:
            if state["handle"]:
                running += self._refresh(state["run_id"]) not in FINAL
        for state in unfinished:
            if not state["handle"] and running < self.max_concurrent and not self._stopped.is_set():
                self._launch(state["run_id"])
                running += 1

    def _launch(self, run_id: str) -> None:
        try:
            handle = self.launcher.launch(run_id, self.store.url)
        except Exception as error:  # noqa: BLE001 - a launch that cannot happen fails the run, with why
            log.exception("launching %s failed", run_id)
            self._update(run_id, state=FAILED, error=f"could not launch the trainer: {error}")
            return
        log.info("launched %s with the %s launcher", run_id, self.launcher.name)
        self._update(run_id, handle=handle)
        self._refresh(run_id)

    def _refresh(self, run_id: str) -> str:
        state = self.get(run_id)
        job = self.launcher.status(run_id, state["handle"])
        progress = self._progress(run_id)
        fields = {"progress": {k: progress[k] for k in PROGRESS_FIELDS if k in progress},
                  "log_tail": progress.get("log") or job.log_tail}
        if job.phase in ("succeeded", "failed", "exited"):
            fields.update(self._outcome(state, job, progress))
        else:  # a Job waiting for its pod stays QUEUED
            fields["state"] = RUNNING if job.phase == "running" else QUEUED
        with self.changed:
            current = self.states[run_id]
            changed = {k: v for k, v in fields.items() if current.get(k) != v}
            if changed and current["state"] not in FINAL:  # a cancel may have landed meanwhile
                self._update(run_id, **changed)
            return self.states[run_id]["state"]

    def _outcome(self, state: dict, job: JobStatus, progress: dict) -> dict:
        output = state["output_version"]
        registered = self.store.exists(f"models/{output}/MANIFEST.json")
        if registered:  # the trainer registers last, so the model is complete whatever happened after
            return {"state": SUCCEEDED, "output_model_version": output, "error": ""}
        reason = job.reason or "the trainer exited without registering a model"
        if progress.get("error"):
            reason = f"{reason}: {progress['error']}"
        return {"state": FAILED, "error": reason, "log_tail": job.log_tail or progress.get("log", [])}

    def _progress(self, run_id: str) -> dict:
        try:
            return self.store.get_json(f"runs/{run_id}/progress.json")
        except (NotFound, ValueError):  # not written yet, or a torn write on a non-atomic store: next poll
            return {}

    # state
    def _update(self, run_id: str, **fields) -> None:
        with self.changed:
            state = {**self.states[run_id], **fields, "updated_at": time.time()}
            self._save(state)

    def _save(self, state: dict) -> None:
        with self.changed:
            self.store.put_json(f"runs/{state['run_id']}/state.json", state, overwrite=True)
            self.states[state["run_id"]] = state
            self.changed.notify_all()
