"""Where a trainer job runs: a local process or a Kubernetes batch/v1 Job, behind one interface.

A launcher starts `python -m trainer --store URL --run-id ID` and later reports how it is doing.
What it needs to find the job again after a service restart is the `handle` it returns, which the
run manager keeps in the run's state.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ilf import config
from services.training.config import TrainingConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 30


@dataclass
class JobStatus:
    phase: str                      # pending, running, succeeded, failed
    reason: str = ""                # why it failed: exit code, OOM, deadline
    log_tail: list[str] = field(default_factory=list)


def trainer_command(store_url: str, run_id: str, python: str = "python", torchrun: list[str] | None = None) -> list[str]:
    """`python -m trainer ...`, or with torchrun's flags `torchrun FLAGS -m trainer ...` (several processes)."""
    start = [python] if torchrun is None else ["torchrun", *torchrun]
    return [*start, "-m", "trainer", "--store", store_url, "--run-id", run_id]


def exit_reason(exit_code: int) -> str:
    """Why a trainer exited, in words; 137 and SIGKILL are what the OOM killer leaves behind."""
    if exit_code in (137, -signal.SIGKILL):
        return f"OOMKilled: the trainer ran out of memory or was killed (exit code {exit_code})"
    if exit_code < 0:
        return f"the trainer was stopped by signal {signal.Signals(-exit_code).name} (exit code {exit_code})"
    return f"the trainer crashed with exit code {exit_code}"


class Launcher(ABC):
    name: str

    @abstractmethod
    def launch(self, run_id: str, store_url: str) -> dict:
        """Starts the job; returns its handle."""

    @abstractmethod
    def status(self, run_id: str, handle: dict) -> JobStatus: ...

    @abstractmethod
    def cancel(self, run_id: str, handle: dict) -> None: ...


class LocalProcessLauncher(Launcher):
    """The trainer as a child process in its own session, with its output in a log file.

    The process outlives a restart of the service; a restarted service finds it by pid (checked
    against its command line) and, once it is gone, reads the outcome the trainer recorded.
    """
    name = "local"

    def __init__(self, log_dir: str | Path | None = None, deadline_s: float | None = None):
        self.log_dir = Path(log_dir or config.get("ILF_TRAINING_LOG_DIR"))
        self.deadline_s = config.get("ILF_TRAINING_DEADLINE_S") if deadline_s is None else deadline_s
        self.processes: dict[str, subprocess.Popen] = {}

    def launch(self, run_id, store_url):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{run_id}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(trainer_command(store_url, run_id, sys.executable), cwd=REPO_ROOT, env=env,
                                       stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes[run_id] = process
        return {"launcher": self.name, "pid": process.pid, "log": str(log_path), "started_at": time.time()}

    def status(self, run_id, handle):
        tail = _tail(Path(handle["log"]))
        process = self.processes.get(run_id)
        exit_code = process.poll() if process else None
        alive = exit_code is None if process else _is_trainer(handle["pid"], run_id)
        if alive:
            if time.time() - handle["started_at"] > self.deadline_s:
                self._kill(run_id, handle["pid"])
                return JobStatus("failed", f"DeadlineExceeded: the run took longer than {self.deadline_s:.0f} s", tail)
            return JobStatus("running", log_tail=tail)
        if exit_code is None:  # not our child (the service restarted): its exit code is lost
            return JobStatus("exited", "the trainer process ended while the service was not watching it", tail)
        if exit_code == 0:
            return JobStatus("succeeded", log_tail=tail)
        return JobStatus("failed", exit_reason(exit_code), tail)

    def cancel(self, run_id, handle):
        self._kill(run_id, handle["pid"])

    def _kill(self, run_id: str, pid: int) -> None:
        process = self.processes.get(run_id)
        if process is None and not _is_trainer(pid, run_id):
            return
        try:
            os.killpg(pid, signal.SIGTERM)  # the trainer leads its own session: this reaches its children too
        except ProcessLookupError:
            return
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(pid, signal.SIGKILL)
                process.wait()


def _is_trainer(pid: int, run_id: str) -> bool:
    """Whether pid is still this run's trainer (and not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    zombie = "\nState:\tZ" in status
    return not zombie and b"trainer" in cmdline and run_id.encode() in cmdline


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    # tqdm redraws its bar with carriage returns: keep only the last state of each line
    return list(deque((line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()), maxlen=lines))


def make_launcher(settings: TrainingConfig | None = None) -> Launcher:
    settings = settings or TrainingConfig.from_env()
    if settings.launcher == "kubernetes":
        from services.training.kubernetes import KubernetesJobLauncher
        return KubernetesJobLauncher(settings=settings.kubernetes)
    return LocalProcessLauncher(settings.log_dir, settings.deadline_s)
