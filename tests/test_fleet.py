"""Several replicas behind one DNS name: per-call balancing, retries, every replica promoted, canaries.

Two replicas of a service listen on 127.0.0.2 and 127.0.0.3 (the same port) and a small DNS server on loopback
answers one name with both addresses, so clients go through gRPC's real DNS resolver (c-ares, pointed at that
server by the target's authority: dns://127.0.0.1:PORT/NAME:PORT) and its real round_robin balancer.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import socket
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest

import torch

from conftest import EmptyConfig, free_port
from ilf import tasksets
from ilf.grpc_util import Server, ServerConfig, channel, client_target
from ilf.registry import ModelVersion, Registry
from ilf.store import open_store
from ilf.v1 import common_pb2, execution_pb2, execution_pb2_grpc, generation_pb2, generation_pb2_grpc
from ilf.fleet import read_reports
from loop import fleet
from loop.clients import Clients
from loop.settings import RoundSettings
from test_generation import PROMPT, make_lora

HOSTS = ("127.0.0.2", "127.0.0.3")
NAME = "replicas.ilf.test"


class DnsServer:
    """Answers A queries for `name` with `addresses` (and any other query with no answer), over UDP on loopback."""

    def __init__(self, name: str, addresses: tuple[str, ...]):
        self.name, self.addresses = name.lower(), addresses
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def target(self, port: int) -> str:
        return f"dns://127.0.0.1:{self.port}/{self.name}:{port}"

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.socket.recvfrom(512)
            except OSError:  # closed
                return
            self.socket.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        labels, offset = [], 12
        while query[offset]:
            labels.append(query[offset + 1:offset + 1 + query[offset]].decode())
            offset += query[offset] + 1
        qtype = struct.unpack(">H", query[offset + 1:offset + 3])[0]
        question = query[12:offset + 5]
        known = ".".join(labels).lower() == self.name
        records = [b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 1, 4) + socket.inet_aton(a)
                   for a in self.addresses] if known and qtype == 1 else []
        flags = 0x8180 | (0 if known else 3)   # a response, recursion available; NXDOMAIN for other names
        return query[:2] + struct.pack(">HHHHH", flags, 1, len(records), 0, 0) + question + b"".join(records)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def dns():
    server = DnsServer(NAME, HOSTS)
    yield server
    server.close()


@pytest.fixture
def fleet_env(ilf_env, monkeypatch):
    monkeypatch.setenv("ILF_AUTH", "off")          # 127.0.0.2 is not a bind address auth=auto leaves open
    monkeypatch.setenv("ILF_SERVING_POLL_S", "0.2")
    monkeypatch.setenv("ILF_EXECUTION_WORKERS", "1")
    return ilf_env


class CallCounter(grpc.ServerInterceptor):
    """Counts the calls that reach one replica, by method."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        with self.lock:
            self.calls[handler_call_details.method.rsplit("/", 1)[-1]] += 1
        return continuation(handler_call_details)


@dataclasses.dataclass
class Replica:
    server: Server
    counter: CallCounter
    host: str
    stopped: bool = False

    @property
    def backend(self):
        return self.server.service.backend

    def stop(self, grace: float | None = None) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.stop(grace)


def start_replicas(make_service, port: int) -> list[Replica]:
    replicas = []
    for host, service in zip(HOSTS, make_service()):
        counter = CallCounter()
        settings = dataclasses.replace(ServerConfig.from_env(), bind_host=host, drain_s=5)
        server = Server(service, EmptyConfig(port, settings), interceptors=[counter])
        server.start()
        replicas.append(Replica(server, counter, host))
    for replica in replicas:
        assert replica.server.ready.wait(120), f"the replica on {replica.host} did not load"
    return replicas


def generation_replicas(port: int, loaders=(None, None)) -> list[Replica]:
    from services.generation.backends import TransformersBackend
    from services.generation.models import ModelManager
    from services.generation.server import GenerationService

    def services():
        for loader in loaders:
            registry = Registry(open_store())
            manager = ModelManager(registry, max_loaded=4, **({"loader": loader} if loader else {}))
            yield GenerationService(TransformersBackend(registry, manager=manager), None)
    return start_replicas(services, port)


def execution_replicas(port: int) -> list[Replica]:
    from services.execution.executor import Executor
    from services.execution.server import ExecutionService
    return start_replicas(lambda: (ExecutionService(Executor()) for _ in HOSTS), port)


def stop(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.stop(0)


class Load:
    """Client threads calling `call()` in a loop until stopped; every failure is kept."""

    def __init__(self, call, threads: int = 4):
        self.call, self.stopped = call, threading.Event()
        self.results, self.failures = [], []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.results.append((time.monotonic(), self.call()))
            except Exception as error:  # noqa: BLE001 - counted; the test fails on any
                self.failures.append(repr(error))

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()


def generate(stub, **params):
    return stub.Generate(generation_pb2.GenerateRequest(
        prompt=PROMPT, params=common_pb2.SamplingParams(n=1, max_new_tokens=params.pop("max_new_tokens", 2), **params)),
        timeout=60)


def test_client_addresses_resolve_every_replica():
    assert client_target("generation:50051") == "dns:///generation:50051"
    assert client_target("127.0.0.1:50051") == "dns:///127.0.0.1:50051"
    for target in ("dns:///generation:50051", "dns://10.0.0.10:53/generation:50051", "ipv4:127.0.0.1:1", "unix:/s"):
        assert client_target(target) == target


def spread_then_stop_one(replicas: list[Replica], call, method: str, calls: int = 40) -> dict:
    """`calls` sequential calls land on both replicas; then one replica stops under load and no call fails."""
    for _ in range(calls):
        call()
    split = [r.counter.calls[method] for r in replicas]
    assert sum(split) == calls and min(split) >= calls * 0.3, f"calls per replica: {split}"
    with Load(call) as load:
        time.sleep(1.0)
        before = len(load.results)
        replicas[0].stop()   # drains: calls in flight finish, new ones go to the other replica
        stopped_at = time.monotonic()
        time.sleep(1.5)
    assert load.failures == [], load.failures[:3]
    after = [t for t, _ in load.results if t > stopped_at + 0.2]
    assert before > 0 and after, "calls must go on while and after one replica stops"
    return {"sequential split": split, "calls under load": len(load.results), "after the stop": len(after)}


def test_execution_calls_spread_over_replicas_and_survive_one_stopping(fleet_env, dns):
    port = free_port()
    replicas = execution_replicas(port)
    try:
        stub = execution_pb2_grpc.ExecutionStub(channel(dns.target(port)))
        request = execution_pb2.ExecuteRequest(program="def f():\n    return 1\n", tests=["assert f() == 1"])

        def execute():
            reply = stub.Execute(request, timeout=30)
            assert reply.passed
            return reply
        figures = spread_then_stop_one(replicas, execute, "Execute")
        print(f"execution over two replicas: {figures}")
    finally:
        stop(replicas)


def test_generation_calls_spread_over_replicas_and_survive_one_stopping(fleet_env, dns):
    port = free_port()
    replicas = generation_replicas(port)
    try:
        stub = generation_pb2_grpc.GenerationStub(channel(dns.target(port)))
        figures = spread_then_stop_one(replicas, lambda: generate(stub), "Generate")
        print(f"generation over two replicas: {figures}")
    finally:
        stop(replicas)


def fails_to_load(failing: str):
    """A loader that runs out of memory on one version, as a replica on a smaller node would."""
    from ilf.modeling import load_version

    def load(registry, version):
        if version == failing:
            raise MemoryError(f"not enough memory for {version} on this node")
        return load_version(registry, version)
    return load


def served_versions(replicas: list[Replica]) -> list[str]:
    return [r.backend.models.describe()["serving_version"] for r in replicas]


def test_promote_reaches_every_replica_under_load(fleet_env, dns, local_registry, tiny_model_dir, tmp_path, capsys,
                                                  monkeypatch):
    from cli.main import main
    port = free_port()
    base = local_registry.ensure_base(str(tiny_model_dir)).version
    for i in (1, 2, 3):
        make_lora(local_registry, base, tiny_model_dir, tmp_path / f"lora-{i}", f"lora-{i}", seed=i)
    replicas = generation_replicas(port, loaders=(None, fails_to_load("lora-3")))
    stub = generation_pb2_grpc.GenerationStub(channel(dns.target(port)))
    try:
        with Load(lambda: generate(stub).model_version) as load:
            time.sleep(0.5)
            promotion = fleet.promote(local_registry, "generation", "lora-1", deadline_s=60)
            assert promotion.ok and len(promotion.wait.replicas) == 2, promotion.wait.describe("serve lora-1")
            with capsys.disabled():
                print(f"both replicas served lora-1 {promotion.wait.seconds:.2f} s after the pointer moved")
            assert served_versions(replicas) == ["lora-1", "lora-1"]
            promoted_at = time.monotonic()
            time.sleep(0.5)
        assert load.failures == [], load.failures[:3]
        assert {v for t, v in load.results if t > promoted_at} == {"lora-1"}
        assert {v for t, v in load.results} == {base, "lora-1"}

        assert main(["promote", "lora-2", "--deadline", "60"]) == 0
        assert "all 2 replica(s) serve lora-2" in capsys.readouterr().out

        # The second replica cannot load lora-3: it keeps serving lora-2 and says why; promote names it.
        with Load(lambda: generate(stub).model_version) as load:
            assert main(["promote", "lora-3", "--deadline", "60"]) == 1
        out = capsys.readouterr().out
        failing = replicas[1].backend.follower.replica
        assert "1 of 2 replica(s) did not" in out and f"{failing} serves lora-2" in out and "not enough memory" in out
        assert load.failures == [] and served_versions(replicas) == ["lora-3", "lora-2"]
        assert main(["models", "status"]) == 0
        status = capsys.readouterr().out
        assert "generation: pointer at lora-3" in status and status.count("live") == 2
        assert "not enough memory for lora-3" in status

        # A version no replica can load: the pointer goes back, so replicas that start later do not try it.
        make_lora(local_registry, base, tiny_model_dir, tmp_path / "bad", "lora-bad", seed=9)
        (Path(local_registry.store.root) / "models" / "lora-bad" / "adapter_model.safetensors").write_bytes(b"x")
        promotion = fleet.promote(local_registry, "generation", "lora-bad", deadline_s=60)
        assert not promotion.ok and promotion.restored == "lora-3"
        assert local_registry.serving_version("generation") == "lora-3"
        assert all("lora-bad" in r.error for r in promotion.wait.lagging)
    finally:
        stop(replicas)
    # Stopped replicas remove their reports: nobody waits for them.
    assert read_reports(local_registry, "generation") == []


def eos_model(registry: Registry, tiny_model_dir: Path, target: Path, version: str) -> str:
    """A full version whose every logit is 0, so greedy decoding writes end-of-text (token 0) at once: the program
    is the prompt alone. On tasks whose prompt is already a solution it passes every test."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    base = registry.ensure_base(str(tiny_model_dir)).version
    registry.register(ModelVersion(version=version, kind="full", base_version=base), files_dir=target)
    return version


def solved_task_set(registry: Registry, count: int = 6) -> str:
    """Tasks whose code prefix is the whole solution: a model that writes nothing passes, one that writes
    anything but a comment after `return i` does not."""
    tasks = [tasksets.Task(task_id=i, text=f"Write a function that returns {i}.", tests=(f"assert f{i}() == {i}",),
                           split="dev", code_prefix=f"def f{i}():\n    return {i}") for i in range(1, count + 1)]
    return tasksets.TaskSets(registry.store).put(tasks, "solved")[0].name


def binomial_interval(p: float, n: int, z: float = 3.29) -> tuple[float, float]:
    """The normal approximation's two-sided 99.9% interval of a share of n draws."""
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


def test_canary_share_and_decision(fleet_env, dns, local_registry, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from cli.main import main
    from services.execution.executor import Executor
    from services.execution.server import ExecutionService
    port = free_port()
    serving = eos_model(local_registry, tiny_model_dir, tmp_path / "eos-a", "eos-a")
    candidate = eos_model(local_registry, tiny_model_dir, tmp_path / "eos-b", "eos-b")
    local_registry.promote("generation", serving)
    replicas = generation_replicas(port)
    execution = Server(ExecutionService(Executor()),
                       EmptyConfig(free_port(), dataclasses.replace(ServerConfig.from_env(), bind_host=HOSTS[0])))
    execution.start()
    stub = generation_pb2_grpc.GenerationStub(channel(dns.target(port)))
    try:
        assert execution.ready.wait(60)
        # 20% of new requests on every replica go to the candidate; responses name their version.
        pointer = local_registry.start_canary("generation", candidate, 0.2)
        routed = fleet.wait_for_fleet(local_registry, "generation", pointer, lambda r: r.canary_version == candidate, 30)
        assert routed.ok and len(routed.replicas) == 2, routed.describe("route it")
        requests = 400
        with Load(lambda: generate(stub, max_new_tokens=1).model_version, threads=4) as load:
            while len(load.results) < requests:
                time.sleep(0.05)
        versions = [v for _, v in load.results[:requests]]
        share = versions.count(candidate) / requests
        low, high = binomial_interval(0.2, requests)
        with capsys.disabled():
            print(f"canary share: {share:.3f} of {requests} responses named {candidate} "
                  f"(99.9% interval {low:.3f}-{high:.3f})")
        assert load.failures == [] and set(versions) == {serving, candidate} and low <= share <= high
        assert all(r.counter.calls["Generate"] > requests * 0.3 for r in replicas)
        local_registry.end_canary("generation", reason="share measured")

        # Measured on held-out tasks: a random model writes garbage after `return i` and fails them, so its canary
        # is worse than the margin and rolls back by itself.
        settings = RoundSettings(task_set=solved_task_set(local_registry), eval_split="dev", eval_tasks=0,
                                 max_new_tokens=8, concurrency=2)
        random_model = local_registry.ensure_base(str(tiny_model_dir)).version
        clients = Clients.connect(generation=dns.target(port), execution=f"{HOSTS[0]}:{execution.port}")
        result = fleet.canary(clients, local_registry, random_model, 0.5, settings, margin=0.2, deadline_s=60)
        assert result.serving.pass_at[1] == 1.0 and result.candidate.pass_at[1] < 0.8, result.reason
        assert not result.promoted and result.ended.ok
        assert "canary" not in local_registry.serving("generation")
        assert served_versions(replicas) == [serving, serving]
        assert all(not r.backend.models.describe()["canary_version"] for r in replicas)

        # As good as the serving version (within the margin): the canary completes, every replica serves it.
        monkeypatch.setenv("ILF_GENERATION_ADDR", dns.target(port))
        monkeypatch.setenv("ILF_EXECUTION_ADDR", f"{HOSTS[0]}:{execution.port}")
        assert main(["promote", candidate, "--canary", "0.2", "--task-set", settings.task_set, "--eval-tasks", "0",
                     "--max-new-tokens", "8", "--margin", "0.2", "--deadline", "60"]) == 0
        out = capsys.readouterr().out
        assert f"promoted: pass@1 1.000 against 1.000 of {serving}" in out and "all 2 replica(s) serve eos-b" in out
        assert served_versions(replicas) == [candidate, candidate]
        assert local_registry.serving_version("generation") == candidate
    finally:
        stop(replicas)
        execution.stop(0)


def test_refinement_replicas_follow_their_pointer_and_generation_keeps_pi_refine_loaded(
        fleet_env, local_registry, tiny_model_dir, tmp_path):
    from services.generation.server import build_server as generation_server
    from services.refinement.config import RefinementConfig
    from services.refinement.server import build_server as refinement_server
    generation = generation_server(0)
    generation.start()
    assert generation.ready.wait(120)
    refinement = refinement_server(0, RefinementConfig.from_env(generation_addr=f"127.0.0.1:{generation.port}"))
    refinement.start()
    try:
        assert refinement.ready.wait(120)
        base = local_registry.ensure_base(str(tiny_model_dir)).version
        pi_refine = make_lora(local_registry, base, tiny_model_dir, tmp_path / "refine", "refine-1", seed=4)
        promotion = fleet.promote(local_registry, "refinement", pi_refine, deadline_s=60)
        assert promotion.ok and len(promotion.wait.replicas) == 1, promotion.wait.describe(f"serve {pi_refine}")
        assert refinement.service.refiner.version == pi_refine
        # Whichever generation replica a Refine call reaches has pi_Refine loaded: each follows that pointer too.
        models = generation.service.backend.models
        deadline = time.monotonic() + 30
        while pi_refine not in models.describe()["loaded_versions"]:
            assert time.monotonic() < deadline, models.describe()
            time.sleep(0.1)
        assert models.describe()["serving_version"] == base   # loaded for refinement, not served
    finally:
        refinement.stop(0)
        generation.stop(0)


def test_a_call_the_server_cancels_before_answering_is_sent_again():
    """A stopping server kills calls that reached it before any handler: the client sees CANCELLED and, for an
    idempotent method, sends the call again."""
    from concurrent import futures
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    class CancelsOnce(health_pb2_grpc.HealthServicer):
        calls = 0

        def Check(self, request, context):
            CancelsOnce.calls += 1
            if CancelsOnce.calls == 1:
                context.abort(grpc.StatusCode.CANCELLED, "server shutting down")
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(CancelsOnce(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        reply = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{port}")).Check(health_pb2.HealthCheckRequest(),
                                                                              timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING and CancelsOnce.calls == 2
    finally:
        server.stop(0)
