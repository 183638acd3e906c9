"""Training runs through the Kubernetes launcher against the kmock API emulator.

kmock stores objects but runs nothing, so FakeKubelet plays the nodes: it runs each Job's
container command as a local process (with the Secret's keys in its environment), enforces the
Job's deadline and the container's memory limit (killing it the way the OOM killer does), writes
the pod's termination and the Job's conditions back, and retries up to backoffLimit. An Indexed
Job gets one pod per index, each with JOB_COMPLETION_INDEX as the Job controller sets it; all
of them are on this machine, so the fake cluster DNS resolves their names to 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import free_port
from ilf.datasets import put_dataset

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "ilf"
RECORDS = [{"prompt": f"Write a function that triples then adds {i}.\n",
            "completion": f"def f(x):\n    return 3 * x + {i}\n"} for i in range(8)]
SMALL = {"batch_size": 4, "epochs": 1, "max_seq_len": 64, "lora_rank": 4}
LONG = {"batch_size": 1, "epochs": 50, "max_seq_len": 64, "lora_rank": 4}


class Emulator:
    """kmock's Kubernetes emulator on a local port, served from its own event loop thread."""

    def __init__(self):
        import kmock
        self.kmock = kmock
        self.url = f"http://127.0.0.1:{free_port()}"
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "kmock did not start"

    async def _serve(self):
        kmock = self.kmock

        class ApiServer(kmock.KubernetesEmulator):
            """kmock's emulator, plus what an API server gives every object it creates: a uid."""

            async def _handle(self, request):
                if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                    request.data.setdefault("metadata", {}).setdefault("uid", str(uuid.uuid4()))
                return await super()._handle(request)

        async with ApiServer() as emulator, kmock.Server(emulator, port=int(self.url.rsplit(":", 1)[1])):
            verbs = {"list", "get", "create", "patch", "delete"}
            emulator.resources["batch/v1/jobs"] = kmock.ResourceInfo(kind="Job", namespaced=True, verbs=verbs,
                                                                     subresources={"status"})
            emulator.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True, verbs=verbs,
                                                               subresources={"status"})
            emulator.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=verbs)
            emulator.resources["v1/services"] = kmock.ResourceInfo(kind="Service", namespaced=True, verbs=verbs)
            self.loop, self.stopped = asyncio.get_running_loop(), asyncio.Event()
            self.ready.set()
            await self.stopped.wait()

    def close(self):
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(timeout=10)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def _rss(pid: int) -> int:
    """Resident memory of the trainer (one process, so this is what its cgroup would count)."""
    try:
        line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


class FakeKubelet:
    def __init__(self, api_url: str, log_dir: Path):
        from kubernetes import client
        configuration = client.Configuration()
        configuration.host = api_url
        api = client.ApiClient(configuration)
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        self.log_dir = log_dir
        # job name -> {manifest, pods, process (index 0's), attempt, failures, started}
        self.jobs: dict[str, dict] = {}
        self.seen_manifests: list = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def close(self):
        self.stopped.set()
        self.thread.join(timeout=10)
        for job in self.jobs.values():
            self._kill(job)

    def _loop(self):
        while not self.stopped.wait(0.2):
            existing = {j.metadata.name: j for j in self.batch.list_namespaced_job(NAMESPACE).items}
            for name, job in existing.items():
                if name not in self.jobs:
                    self.seen_manifests.append(job)
                    self.jobs[name] = {"manifest": job, "pods": [], "process": None, "attempt": 0, "failures": 0,
                                       "started": time.monotonic(), "done": False}
                    self.batch.patch_namespaced_job_status(name, NAMESPACE, {"status": {"startTime": _now()}})
                    self._start_pods(name)
            for name, state in self.jobs.items():
                if state["done"]:
                    continue
                if name not in existing:  # deleted: the pods go with it
                    self._kill(state)
                    state["done"] = True
                    continue
                self._watch(name, state)

    def _start_pods(self, name: str):
        """The Job's pods: one, or one per completion index of an Indexed Job, all started together."""
        state = self.jobs[name]
        job = state["manifest"]
        container = job.spec.template.spec.containers[0]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.update({e.name: e.value for e in container.env or []})
        for source in container.env_from or []:
            secret = self.core.read_namespaced_secret(source.secret_ref.name, NAMESPACE)
            env.update({k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()})
            env.update(secret.string_data or {})
        indexed = job.spec.completion_mode == "Indexed"
        rendezvous_port = free_port()  # pod 0's rendezvous port, here on the one machine all pods share
        state["attempt"] += 1
        state["pods"] = []
        for index in range(job.spec.completions if indexed else 1):
            pod_env = {**env, "JOB_COMPLETION_INDEX": str(index)} if indexed else env
            command = [self._expand(arg, pod_env, rendezvous_port) for arg in container.command]
            executable = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
            command = executable.get(command[0], command[:1]) + command[1:]
            pod = f"{name}-{state['attempt']}" + (f"-{index}" if indexed else "")
            with open(self.log_dir / f"{pod}.log", "wb") as log:
                process = subprocess.Popen(command, cwd=REPO, env=pod_env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
            state["pods"].append({"name": pod, "process": process})
            self.core.create_namespaced_pod(NAMESPACE, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": NAMESPACE, "labels": job.spec.template.metadata.labels},
                "spec": {"containers": [{"name": container.name, "image": container.image}]},
                "status": {"phase": "Running"}})
        state["process"] = state["pods"][0]["process"]
        state["memory_limit"] = _bytes(container.resources.limits["memory"])
        self.batch.patch_namespaced_job_status(name, NAMESPACE, {"status": {"active": len(state["pods"])}})

    @staticmethod
    def _expand(arg: str, env: dict, rendezvous_port: int) -> str:
        """$(VAR) expanded as the kubelet does; a pod's DNS name (<host>.<subdomain>) resolved as cluster DNS would."""
        arg = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
        if arg.startswith("--master-addr="):
            return "--master-addr=127.0.0.1"
        return f"--master-port={rendezvous_port}" if arg.startswith("--master-port=") else arg

    def _watch(self, name: str, state: dict):
        job = state["manifest"]
        deadline = job.spec.active_deadline_seconds
        if deadline and time.monotonic() - state["started"] > deadline:
            self._kill(state)
            return self._finish(name, state, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
        ended = []
        for pod in state["pods"]:
            reason = None
            if _rss(pod["process"].pid) > state["memory_limit"]:
                os.killpg(pod["process"].pid, signal.SIGKILL)
                pod["process"].wait()
                reason = "OOMKilled"
            exit_code = pod["process"].poll()
            if exit_code is not None:
                ended.append((pod, 128 + signal.SIGKILL if exit_code == -signal.SIGKILL else exit_code, reason))
        failed = [(pod, code, reason) for pod, code, reason in ended if code != 0]
        if not failed and len(ended) < len(state["pods"]):
            return
        if failed:  # the other pods of the group fail with it (at their next collective); end them now
            self._kill(state)
        for pod, exit_code, reason in failed or ended:
            self.core.patch_namespaced_pod_status(pod["name"], NAMESPACE, {"status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [{"name": "trainer", "image": "", "imageID": "", "ready": False,
                                       "restartCount": 0, "state": {"terminated": {
                                           "exitCode": exit_code,
                                           "reason": reason or ("Completed" if exit_code == 0 else "Error")}}}]}})
        if not failed:
            return self._finish(name, state, "Complete", None, None)
        state["failures"] += len(failed)
        if state["failures"] > job.spec.backoff_limit:
            return self._finish(name, state, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        self._start_pods(name)

    def _finish(self, name, state, condition, reason, message):
        state["done"] = True
        self.batch.patch_namespaced_job_status(name, NAMESPACE, {"status": {
            "active": 0, "failed": state["failures"], "succeeded": len(state["pods"]) if condition == "Complete" else 0,
            "conditions": [{"type": condition, "status": "True", "reason": reason, "message": message,
                            "lastTransitionTime": _now()}]}})

    @staticmethod
    def _kill(state):
        for pod in state["pods"]:
            if pod["process"].poll() is None:
                os.killpg(pod["process"].pid, signal.SIGKILL)
                pod["process"].wait()


@pytest.fixture
def cluster(ilf_env, local_registry, monkeypatch):
    from kubernetes import client
    emulator = Emulator()
    monkeypatch.setenv("ILF_TRAINING_LAUNCHER", "kubernetes")
    monkeypatch.setenv("ILF_TRAINING_K8S_API", emulator.url)
    monkeypatch.setenv("ILF_TRAINING_K8S_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("ILF_TRAINING_K8S_IMAGE", "registry.example/ilf:test")
    monkeypatch.setenv("ILF_TRAINING_K8S_SECRET", "ilf-s3")
    monkeypatch.setenv("ILF_TRAINING_K8S_MEMORY", "4Gi")
    monkeypatch.setenv("ILF_TRAINING_K8S_BACKOFF_LIMIT", "0")
    configuration = client.Configuration()
    configuration.host = emulator.url
    client.CoreV1Api(client.ApiClient(configuration)).create_namespaced_secret(NAMESPACE, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ilf-s3", "namespace": NAMESPACE},
        "stringData": {"ILF_S3_ACCESS_KEY": "from-the-secret"}})
    kubelet = FakeKubelet(emulator.url, ilf_env)
    base = local_registry.ensure_base(os.environ["ILF_BASE_MODEL"])
    dataset = put_dataset(local_registry.store, RECORDS, name="triples")
    yield {"kubelet": kubelet, "registry": local_registry, "store": local_registry.store, "base": base.version,
           "dataset": dataset}
    kubelet.close()
    emulator.close()


def manager():
    from ilf.store import open_store
    from services.training.launchers import make_launcher
    from services.training.runs import RunManager
    runs = RunManager(open_store(), make_launcher(), poll_s=0.2)
    runs.start()
    return runs


def wait_until(runs, run_id, states, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = runs.get(run_id)
        if run["state"] in states:
            return run
        time.sleep(0.2)
    raise TimeoutError(f"{run_id} is {runs.get(run_id)['state']}")


FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def test_a_real_trainer_run_goes_through_a_kubernetes_job(cluster, monkeypatch):
    import kubernetes_validate
    monkeypatch.setenv("ILF_TRAINING_K8S_GPUS", "1")
    monkeypatch.setenv("ILF_TRAINING_K8S_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true"}')
    monkeypatch.setenv("ILF_TRAINING_K8S_TOLERATIONS",
                       '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]')
    runs = manager()
    try:
        run = runs.submit(cluster["dataset"], cluster["base"], SMALL, "refinement")
        final = wait_until(runs, run["run_id"], FINAL)
    finally:
        runs.stop()
    assert final["state"] == "SUCCEEDED", final["error"]
    record = cluster["registry"].get(final["output_model_version"])
    assert record.kind == "lora" and record.lineage["purpose"] == "refinement"

    (job,) = cluster["kubelet"].seen_manifests
    manifest = cluster["kubelet"].batch.api_client.sanitize_for_serialization(job)
    kubernetes_validate.validate(manifest, "1.32", strict=True)
    spec, container = job.spec, job.spec.template.spec.containers[0]
    assert job.metadata.labels["ilf.run-id"] == run["run_id"] == spec.template.metadata.labels["ilf.run-id"]
    assert container.image == "registry.example/ilf:test"
    assert container.command[1:4] == ["-m", "trainer", "--store"] and run["run_id"] in container.command
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.env_from[0].secret_ref.name == "ilf-s3"
    assert spec.backoff_limit == 0 and spec.active_deadline_seconds == 86400 and spec.ttl_seconds_after_finished > 0
    assert spec.template.spec.restart_policy == "Never"
    assert spec.template.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert spec.template.spec.tolerations[0].key == "nvidia.com/gpu"


def test_crash_in_the_pod_fails_the_run_with_the_exit_code(cluster):
    cluster["store"].put("datasets/broken.jsonl", b"not json\n")
    runs = manager()
    try:
        run = runs.submit("datasets/broken.jsonl", cluster["base"], SMALL)
        final = wait_until(runs, run["run_id"], FINAL)
    finally:
        runs.stop()
    assert final["state"] == "FAILED"
    assert "BackoffLimitExceeded" in final["error"] and "exit code 1" in final["error"]
    assert "JSONDecodeError" in final["error"]


def test_pod_over_its_memory_limit_is_oom_killed(cluster, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_K8S_MEMORY", "150Mi")  # less than the trainer needs to import torch
    runs = manager()
    try:
        run = runs.submit(cluster["dataset"], cluster["base"], SMALL)
        final = wait_until(runs, run["run_id"], FINAL)
    finally:
        runs.stop()
    assert final["state"] == "FAILED" and "OOMKilled" in final["error"] and "137" in final["error"]
    assert cluster["registry"].serving_version("generation") is None  # nothing served was touched


def test_job_past_its_deadline_fails_the_run(cluster, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_DEADLINE_S", "3")
    runs = manager()
    try:
        run = runs.submit(cluster["dataset"], cluster["base"], LONG)
        final = wait_until(runs, run["run_id"], FINAL)
    finally:
        runs.stop()
    assert final["state"] == "FAILED" and "DeadlineExceeded" in final["error"]


def test_cancel_deletes_the_job(cluster):
    from kubernetes.client.exceptions import ApiException
    runs = manager()
    try:
        run = runs.submit(cluster["dataset"], cluster["base"], LONG)
        wait_until(runs, run["run_id"], ("RUNNING",))
        assert runs.cancel(run["run_id"])["state"] == "CANCELLED"
    finally:
        runs.stop()
    job = runs.get(run["run_id"])["handle"]["job"]
    with pytest.raises(ApiException) as caught:
        cluster["kubelet"].batch.read_namespaced_job(job, NAMESPACE)
    assert caught.value.status == 404


def test_restarted_service_keeps_watching_the_job(cluster):
    first = manager()
    run = first.submit(cluster["dataset"], cluster["base"], {**SMALL, "epochs": 3})
    wait_until(first, run["run_id"], ("RUNNING",))
    first.stop()
    second = manager()  # a new service process reads the run back from the store
    try:
        final = wait_until(second, run["run_id"], FINAL)
    finally:
        second.stop()
    assert final["state"] == "SUCCEEDED", final["error"]
    assert len(cluster["kubelet"].seen_manifests) == 1  # the same Job, not a second one


def test_a_retried_pod_resumes_from_the_last_checkpoint(cluster, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_K8S_BACKOFF_LIMIT", "1")
    monkeypatch.setenv("ILF_TRAINER_CHECKPOINT_STEPS", "2")
    runs = manager()
    try:
        run = runs.submit(cluster["dataset"], cluster["base"], {**LONG, "epochs": 2})  # 16 steps
        checkpoint = f"runs/{run['run_id']}/checkpoint.pt"
        deadline = time.monotonic() + 120
        while not cluster["store"].exists(checkpoint) and time.monotonic() < deadline:
            time.sleep(0.2)
        (pod,) = cluster["kubelet"].jobs.values()
        os.killpg(pod["process"].pid, signal.SIGKILL)  # the node loses the pod mid-run
        final = wait_until(runs, run["run_id"], FINAL)
    finally:
        runs.stop()
    assert final["state"] == "SUCCEEDED", final["error"]
    assert cluster["kubelet"].jobs[final["handle"]["job"]]["attempt"] == 2
    metrics = cluster["registry"].get(final["output_model_version"]).metrics
    assert metrics["resumed_at_step"] >= 2 and metrics["steps"] == 16


def validated(obj) -> dict:
    """obj as the API server stores it, checked strictly against Kubernetes 1.32's schema."""
    import kubernetes_validate
    from kubernetes import client
    manifest = client.ApiClient().sanitize_for_serialization(obj)
    kubernetes_validate.validate(manifest, "1.32", strict=True)
    return manifest


def two_process_run(cluster) -> tuple[dict, dict]:
    """A small LoRA run, submitted and followed to its end: the run as submitted and as it ended, in 2 processes."""
    runs = manager()
    try:
        run = runs.submit(cluster["dataset"], cluster["base"], SMALL)
        final = wait_until(runs, run["run_id"], FINAL)
    finally:
        runs.stop()
    assert final["state"] == "SUCCEEDED", final["error"]
    assert cluster["registry"].get(final["output_model_version"]).metrics["processes"] == 2
    return run, final


def test_a_multi_gpu_job_runs_one_trainer_process_per_gpu(cluster, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_K8S_GPUS", "2")  # two ranks on the CPU here (gloo), one per GPU on a GPU node
    run, final = two_process_run(cluster)

    (job,) = cluster["kubelet"].seen_manifests
    manifest = validated(job)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:5] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "trainer"]
    assert run["run_id"] in container["command"] and container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "completionMode" not in manifest["spec"]  # one node: a plain Job, read as before
    assert container["volumeMounts"] == [{"name": "shm", "mountPath": "/dev/shm"}]
    assert pod["volumes"] == [{"name": "shm", "emptyDir": {"medium": "Memory"}}]


def test_a_multi_node_job_is_an_indexed_job_whose_pods_meet_through_a_headless_service(cluster, monkeypatch):
    monkeypatch.setenv("ILF_TRAINING_K8S_NODES", "2")  # two pods of one trainer process each
    monkeypatch.setenv("ILF_TRAINING_K8S_BACKOFF_LIMIT", "1")
    run, final = two_process_run(cluster)
    assert cluster["kubelet"].jobs[final["handle"]["job"]]["attempt"] == 1  # both pods, once

    (job,) = cluster["kubelet"].seen_manifests
    manifest = validated(job)
    spec, name = manifest["spec"], manifest["metadata"]["name"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 2  # one restart of the group: both nodes' pods
    pod = spec["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=1"] and command[6:8] == ["-m", "trainer"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    service = validated(cluster["kubelet"].core.read_namespaced_service(name, NAMESPACE))
    # Pod 0's DNS name: hostname <job>-0 (the Indexed Job's), subdomain the headless Service.
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert f"--master-addr={name}-0.{name}" in command and "--master-port=29500" in command
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (owner,) = service["metadata"]["ownerReferences"]  # deleted with the Job, by its TTL or a cancel
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", name, job.metadata.uid)
