"""Starts the services as separate local processes (the embedded deployment)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ilf import config
from ilf.grpc_util import wait_healthy

SERVICES = ("execution", "generation", "refinement", "training", "feedback")
LOCAL_WEB_PORT = 8055     # the annotation page of `ilf demo` and `ilf up` unless ILF_FEEDBACK_HTTP_PORT names one


class LocalServices:
    """Context manager: each service in its own process, logs under log_dir, stopped on exit."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None, ports: dict[str, int] | None = None,
                 startup_timeout_s: float = 600.0, metrics_ports: dict[str, int] | None = None,
                 web_port: int | None = None):
        self.log_dir = Path(log_dir)
        self.env = {**os.environ, **(env or {})}
        self.ports = ports or {name: int(config.get(f"ILF_{name.upper()}_PORT")) for name in SERVICES}
        self.metrics_ports = metrics_ports or {}   # each process has its own /metrics port (ILF_METRICS_PORT)
        # The feedback service's annotation page: on for the local deployment; on explicit ports (tests) only when asked.
        configured = config.get("ILF_FEEDBACK_HTTP_PORT")
        self.web_port = web_port if web_port is not None or ports else (
            LOCAL_WEB_PORT if configured is None else configured)
        self.startup_timeout_s = startup_timeout_s
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def addresses(self) -> dict[str, str]:
        return {name: f"127.0.0.1:{port}" for name, port in self.ports.items()}

    @property
    def web_url(self) -> str | None:
        return f"http://127.0.0.1:{self.web_port}" if self.web_port is not None else None

    def _start(self, name: str) -> None:
        env = dict(self.env)
        for service, port in self.ports.items():
            env[f"ILF_{service.upper()}_PORT"] = str(port)
            env[f"ILF_{service.upper()}_ADDR"] = self.addresses[service]
        if name in self.metrics_ports:
            env["ILF_METRICS_PORT"] = str(self.metrics_ports[name])
        env["ILF_FEEDBACK_HTTP_PORT"] = str(self.web_port) if name == "feedback" and self.web_port is not None else ""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[1])

    def restart(self, name: str) -> None:
        """Stops one service (SIGTERM, as an orchestrator would) and starts it again."""
        self.processes[name].terminate()
        self.processes[name].wait(timeout=60)
        self._start(name)
        self._wait(name, time.monotonic() + self.startup_timeout_s)

    def __enter__(self) -> "LocalServices":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in SERVICES:
                self._start(name)
            deadline = time.monotonic() + self.startup_timeout_s
            for name in SERVICES:
                self._wait(name, deadline)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait(self, name: str, deadline: float) -> None:
        while True:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"the {name} service exited with code {self.processes[name].returncode}; "
                                   f"see {self.log_dir / (name + '.log')}")
            try:
                wait_healthy(self.addresses[name], timeout_s=2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {name} service did not become healthy; see {self.log_dir}") from None

    def __exit__(self, *exc) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
