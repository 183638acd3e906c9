"""A pool of pre-started sandboxed fork-servers, so no execution pays for an interpreter start.

Each worker is one sandbox (bwrap, cgroups) holding one warm Python that forks a child per
program. The service never trusts a worker to stay alive: a worker that dies, hangs or answers
garbage is killed and replaced, and its job is reported as a sandbox failure.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import select
import signal
import struct
import subprocess
import threading
import time
from collections import deque
from concurrent.futures import Future
from itertools import count
from pathlib import Path

from services.execution.isolation import SANDBOX_ENV, Isolation

log = logging.getLogger(__name__)

# Time a worker gets beyond the job's own timeout (killing leftovers, wiping scratch).
REPLY_GRACE_S = 5.0
START_TIMEOUT_S = 30.0
MAX_REPLY_BYTES = 32 << 20
# Headroom above the largest allowed program for the fork-server itself.
CGROUP_MEMORY_HEADROOM_MB = 256
# Jobs written to a worker at once: the next one waits in the pipe, so the checker starts it as soon
# as it has answered instead of waiting for the service to read the reply and write another job.
PIPELINE_DEPTH = 2


class WorkerFailed(RuntimeError):
    """The sandbox died or stopped answering; the job's verdicts are unknown."""


class Worker:
    _serial = count()

    def __init__(self, isolation: Isolation, max_memory_mb: int):
        self.isolation = isolation
        self.uid = isolation.uids.acquire() if isolation.uids else None
        self.cgroups = self._make_cgroups(max_memory_mb)
        try:
            self.process = subprocess.Popen(
                isolation.worker_command(self.cgroups, self.uid), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=SANDBOX_ENV, cwd="/", start_new_session=True)
        except OSError:
            for group in self.cgroups:
                _remove_cgroup(group)
            if self.uid is not None:
                isolation.uids.release(self.uid)
            raise
        self.pipe_bytes = _widen_pipe(self.process.stdin.fileno())
        try:
            hello = self._read(time.monotonic() + START_TIMEOUT_S)
            scratch = "/tmp" if isolation.bwrap else self._private_scratch()
            self._write(isolation.sandbox_config(hello["hello"], scratch))
            self._read(time.monotonic() + START_TIMEOUT_S)
        except Exception:
            self.stop()
            raise

    def _private_scratch(self) -> str:
        import tempfile
        folder = tempfile.mkdtemp(prefix="ilf-execution-")
        os.chmod(folder, 0o1777)
        self.fallback_scratch = folder
        return folder

    def _make_cgroups(self, max_memory_mb: int) -> list[Path]:
        groups = []
        name = f"ilf-execution-{os.getpid()}-{next(self._serial)}"
        limits = {"memory": {"memory.limit_in_bytes": (max_memory_mb + CGROUP_MEMORY_HEADROOM_MB) << 20},
                  "pids": {"pids.max": self.isolation.limits.max_processes + 8}}
        for controller, root in self.isolation.cgroup_roots.items():
            group = root / name
            try:
                group.mkdir()
                for key, value in limits[controller].items():
                    (group / key).write_text(str(value))
            except OSError as error:
                log.warning("cgroup %s not usable: %s", group, error)
                _remove_cgroup(group)
                continue
            groups.append(group)
        return groups

    def send(self, job: dict, *, behind_another: bool = False) -> bool:
        """Writes the job. Behind another job, only if it fits in the pipe at once: the checker reads
        it only after answering the first one, and a blocked write here could not read that answer."""
        body = json.dumps(job).encode()
        if behind_another and len(body) + 4 > self.pipe_bytes:
            return False
        self._write_frame(body)
        return True

    def receive(self, job: dict) -> dict:
        """The reply to `job`, the oldest job sent and not yet answered (the checker runs them in order)."""
        return self._read(time.monotonic() + job["timeout_s"] + REPLY_GRACE_S)

    def _write(self, message: dict) -> None:
        self._write_frame(json.dumps(message).encode())

    def _write_frame(self, body: bytes) -> None:
        try:
            self.process.stdin.write(struct.pack(">I", len(body)) + body)
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError) as error:
            raise WorkerFailed(f"sandbox worker is gone ({error})") from None

    def _read(self, deadline: float) -> dict:
        header = self._read_exactly(4, deadline)
        (size,) = struct.unpack(">I", header)
        if size > MAX_REPLY_BYTES:
            raise WorkerFailed("sandbox worker sent an oversized reply")
        try:
            return json.loads(self._read_exactly(size, deadline))
        except ValueError:
            raise WorkerFailed("sandbox worker sent a malformed reply") from None

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        data = bytearray()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WorkerFailed("sandbox worker stopped answering")
            chunk = os.read(fd, size - len(data))
            if not chunk:
                raise WorkerFailed(f"sandbox worker died (exit status {self.process.poll()})")
            data += chunk
        return bytes(data)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        for group in self.cgroups:
            _remove_cgroup(group)
        if self.uid is not None:  # its processes are gone with the cgroups: the next worker may have the uid
            self.isolation.uids.release(self.uid)
            self.uid = None
        scratch = getattr(self, "fallback_scratch", None)
        if scratch:
            import shutil
            shutil.rmtree(scratch, ignore_errors=True)


def _widen_pipe(fd: int) -> int:
    """Grows a pipe towards 1 MiB (Linux F_SETPIPE_SZ) and returns its size in bytes."""
    f_setpipe_sz, f_getpipe_sz = 1031, 1032
    try:
        fcntl.fcntl(fd, f_setpipe_sz, 1 << 20)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size: keep the default
    try:
        return fcntl.fcntl(fd, f_getpipe_sz)
    except OSError:
        return 4096  # not Linux: the smallest pipe POSIX allows


def _remove_cgroup(group: Path) -> None:
    """Kills what is left in the group (a daemonised fork bomb, say), then removes it."""
    for _ in range(100):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
    log.warning("could not remove cgroup %s", group)


class WorkerPool:
    """Runs jobs on `size` sandboxed workers; jobs queue in FIFO order."""

    def __init__(self, isolation: Isolation, size: int, max_memory_mb: int):
        self.isolation = isolation
        self.max_memory_mb = max_memory_mb
        self.size = size
        self.jobs: queue.Queue = queue.Queue()
        self.restarts = 0
        self._threads = [threading.Thread(target=self._serve, args=(i,), name=f"execution-worker-{i}", daemon=True)
                         for i in range(size)]
        self._workers: list[Worker | None] = [None] * size
        for index in range(size):
            self._workers[index] = Worker(isolation, max_memory_mb)
        for thread in self._threads:
            thread.start()

    def submit(self, job: dict) -> Future:
        future: Future = Future()
        self.jobs.put((job, future))
        return future

    def _serve(self, index: int) -> None:
        in_flight: deque = deque()  # (job, future) written to this worker, oldest first
        unsent: deque = deque()     # taken from the queue, to write (again, after a worker failed)
        while True:
            while len(in_flight) < PIPELINE_DEPTH:
                if not unsent:
                    try:
                        item = self.jobs.get(block=not in_flight)
                    except queue.Empty:
                        break
                    if item is None:  # close(): answer what the worker already has, then stop
                        while in_flight:
                            self._finish_oldest(index, in_flight, unsent)
                        for _, future in unsent:
                            future.set_exception(WorkerFailed("the execution service is shutting down"))
                        return
                    if not item[1].set_running_or_notify_cancel():
                        continue
                    unsent.append(item)
                job, future = unsent[0]
                worker = self._workers[index] or self._replace(index)
                try:
                    if worker is None:
                        raise WorkerFailed("no sandbox worker could be started")
                    if not worker.send(job, behind_another=bool(in_flight)):
                        break  # too large to wait in the pipe: send it once the worker is idle
                except WorkerFailed as error:
                    unsent.popleft()
                    future.set_exception(error)
                    self._replace(index)
                    continue
                in_flight.append(unsent.popleft())
            if in_flight:
                self._finish_oldest(index, in_flight, unsent)

    def _finish_oldest(self, index: int, in_flight: deque, unsent: deque) -> None:
        """Reads the oldest job's reply. If the worker fails, that job fails with it; the jobs queued
        behind it never started, so they go to the replacement worker."""
        job, future = in_flight.popleft()
        try:
            future.set_result(self._workers[index].receive(job))
        except Exception as error:  # noqa: BLE001 - a pool thread must survive anything
            if not isinstance(error, WorkerFailed):
                log.exception("execution worker %d failed", index)
            future.set_exception(error)
            unsent.extendleft(reversed(in_flight))
            in_flight.clear()
            self._replace(index)

    def _replace(self, index: int) -> Worker | None:
        old, self._workers[index] = self._workers[index], None
        if old:
            old.stop()
        self.restarts += 1
        try:
            self._workers[index] = Worker(self.isolation, self.max_memory_mb)
        except Exception:  # noqa: BLE001 - retried on the next job
            log.exception("could not restart execution worker %d", index)
        return self._workers[index]

    def close(self) -> None:
        for _ in self._threads:
            self.jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        for worker in self._workers:
            if worker:
                worker.stop()
