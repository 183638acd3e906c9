"""Prometheus metrics: what the interceptor counts, and a real Prometheus scraping every service after traffic."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import empty_server, free_port
from ilf.grpc_util import channel
from ilf.metrics import Sampled
from ilf.v1 import (common_pb2, execution_pb2, feedback_pb2, generation_pb2, refinement_pb2, training_pb2)
from loop.clients import Clients
from loop.local import SERVICES, LocalServices


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The samples of a /metrics page, by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_call_is_counted_by_status_and_timed(monkeypatch):
    monkeypatch.setenv("ILF_METRICS_PORT", "0")
    server = empty_server()
    server.start()
    try:
        assert server.ready.wait(10) and server.metrics_port
        health = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{server.port}"))
        ok = ("ilf_grpc_server_handled_total", (("grpc_code", "OK"), ("grpc_method", "Check"),
                                                ("grpc_service", "grpc.health.v1.Health")))
        not_found = ("ilf_grpc_server_handled_total", (("grpc_code", "NOT_FOUND"), ("grpc_method", "Check"),
                                                       ("grpc_service", "grpc.health.v1.Health")))
        timed = ("ilf_grpc_server_handling_seconds_count", (("grpc_method", "Check"),
                                                            ("grpc_service", "grpc.health.v1.Health")))
        before = scrape(server.metrics_port)
        health.Check(health_pb2.HealthCheckRequest(service="ilf.v1.Test"))
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(service="ilf.v1.NoSuchService"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        after = scrape(server.metrics_port)
        assert after[ok] - before.get(ok, 0) == 1 and after[not_found] - before.get(not_found, 0) == 1
        assert after[timed] - before.get(timed, 0) == 2
    finally:
        server.stop(0)


def test_sampled_values_sum_live_objects_and_forget_dead_ones():
    class Pool:
        def __init__(self, size):
            self.size = size
    family = Sampled("ilf_test_pool_size", "Test pools.", lambda p: p.size)
    try:
        first, second = Pool(2), Pool(3)
        family.track(first)
        family.track(second)
        assert REGISTRY.get_sample_value("ilf_test_pool_size") == 5
        del second
        assert REGISTRY.get_sample_value("ilf_test_pool_size") == 2
    finally:
        REGISTRY.unregister(family)


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        pytest.skip("prometheus is not installed (`make setup` installs Debian's prometheus package as root)")
    return found


class Prometheus:
    """A real Prometheus server scraping `targets` ({job: port on loopback}) every second."""

    def __init__(self, root, targets: dict[str, int]):
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                                     for job, port in targets.items()]}
        (root / "prometheus.yml").write_text(json.dumps(config))   # JSON is YAML
        self.process = subprocess.Popen(
            [prometheus_binary(), f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(root / "prometheus.log", "ab"), stderr=subprocess.STDOUT)
        self.log = root / "prometheus.log"
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Prometheus did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        reply = json.load(urllib.request.urlopen(url, timeout=10))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def by_job(self, promql: str) -> dict[str, float]:
        return {r["metric"].get("job", ""): float(r["value"][1]) for r in self.query(promql)}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def test_prometheus_scrapes_every_service(tmp_path, tiny_model_dir):
    prometheus_binary()
    env = {"ILF_HOME": str(tmp_path / "home"), "ILF_CACHE": str(tmp_path / "cache"),
           "ILF_STORE": f"file://{tmp_path / 'store'}", "ILF_BASE_MODEL": str(tiny_model_dir), "ILF_DEVICE": "cpu",
           "ILF_TORCH_THREADS": "1", "ILF_EXECUTION_WORKERS": "1"}
    ports = {name: free_port() for name in SERVICES}
    metrics_ports = {name: free_port() for name in SERVICES}
    with LocalServices(tmp_path / "logs", env=env, ports=ports, metrics_ports=metrics_ports,
                       startup_timeout_s=300) as services:
        prometheus = Prometheus(tmp_path, metrics_ports)
        try:
            clients = Clients.connect(**services.addresses)
            params = common_pb2.SamplingParams(n=1, max_new_tokens=4)
            clients.generation.Generate(generation_pb2.GenerateRequest(prompt="def add(a, b):", params=params))
            clients.refinement.Refine(refinement_pb2.RefineRequest(
                task=common_pb2.Task(task_id=11), failing_program="def f():\n    return 0\n",
                feedback="Return the right value.", params=params))
            assert clients.execution.Execute(execution_pb2.ExecuteRequest(
                program="def f():\n    return 1\n", tests=["assert f() == 1"])).passed
            clients.training.ListRuns(training_pb2.ListRunsRequest())
            clients.feedback.ListQueue(feedback_pb2.ListQueueRequest())

            calls = 'sum by (job) (ilf_grpc_server_handled_total{grpc_service=~"ilf.v1.*", grpc_code="OK"})'
            deadline = time.monotonic() + 60
            while set(prometheus.by_job(calls)) != set(SERVICES):
                assert time.monotonic() < deadline, f"scraped so far: {prometheus.by_job(calls)}"
                time.sleep(0.5)
            expected = {
                'ilf_generation_decode_tokens_total': "generation",
                'ilf_generation_prefill_tokens_total': "generation",
                'ilf_generation_time_to_first_token_seconds_count': "generation",
                'ilf_generation_model_serving': "generation",
                'ilf_generation_model_loaded': "generation",
                'ilf_generation_requests_total': "generation",
                'ilf_generation_queue_length': "generation",
                'ilf_generation_running_rows': "generation",
                'ilf_generation_kv_cache_bytes': "generation",
                'ilf_execution_programs_total{verdict="passed"}': "execution",
                'ilf_execution_tests_total{verdict="passed"}': "execution",
                'ilf_execution_duration_seconds_count': "execution",
                'ilf_execution_isolation_layer_active': "execution",
                'ilf_execution_sandbox_restarts_total': "execution",
                'ilf_training_runs': "training",
                'ilf_feedback_queue_items': "feedback",
                'ilf_grpc_server_handling_seconds_count{grpc_method="Refine"}': "refinement",
            }
            for promql, job in expected.items():
                assert job in prometheus.by_job(promql), f"{promql}: {prometheus.query(promql)}"
            assert prometheus.by_job("ilf_generation_decode_tokens_total")["generation"] >= 4
            assert prometheus.by_job('ilf_execution_programs_total{verdict="passed"}')["execution"] >= 1
        finally:
            prometheus.stop()
