"""The trainer as a Kubernetes batch/v1 Job, created and read with the `kubernetes` client.

The Job's pod gets the store's S3 credentials from a Secret (envFrom), a GPU limit when asked,
and the label ilf.run-id that links Job, pods and run. Its outcome comes from the Job's
conditions (Complete, or Failed with DeadlineExceeded / BackoffLimitExceeded), and a failed
pod's termination (OOMKilled, exit code) says why.

A pod with several GPUs runs `torchrun --standalone --nproc-per-node N`, one trainer process per
GPU. A run on several nodes is an Indexed Job of one pod per node: pod i (hostname <job>-i)
is torchrun's node i, and all meet at pod 0 through a headless Service named after the Job,
which gives each pod a DNS name. We chose this over a Kubeflow Trainer TrainJob because it needs
nothing installed in the cluster beyond batch/v1 (TrainJob needs the Trainer operator, JobSet and
a ClusterTrainingRuntime), its state is read from Job conditions exactly as for one pod, and its
manifests validate against the plain Kubernetes schema. What TrainJob would add is restarting
the whole group at once when one pod fails; here the others fail at their next collective, and
the Job controller restarts them (backoffLimit counts every node's pods), resuming together from
the last checkpoint.
"""
from __future__ import annotations

import time

from ilf import config
from services.training.config import KubernetesConfig
from services.training.launchers import JobStatus, Launcher, exit_reason, trainer_command

RUN_LABEL = "ilf.run-id"
RENDEZVOUS_PORT = 29500  # torchrun's default master port, on pod 0 of a multi-node Job
# Trainer settings the Job inherits from the service, so both sides agree on them.
FORWARDED_SETTINGS = ("ILF_TRAINER_CHECKPOINT_STEPS", "ILF_TRAINER_MICRO_BATCH_TOKENS",
                      "ILF_TRAINER_GRADIENT_CHECKPOINTING", "ILF_DEVICE", "ILF_TORCH_THREADS", "ILF_S3_SECURE",
                      "ILF_S3_REGION")


def job_name(run_id: str) -> str:
    return f"ilf-train-{run_id}"[:63]


def api_client(host: str = ""):
    """A client for ILF_TRAINING_K8S_API if set, else the in-cluster service account, else kubeconfig."""
    from kubernetes import client, config as kube_config
    if host:
        configuration = client.Configuration()
        configuration.host = host
        return client.ApiClient(configuration)
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    return client.ApiClient()


def placement(settings: KubernetesConfig) -> dict:
    """nodeSelector and tolerations of the trainer pod (JSON settings), e.g. to land on tainted GPU nodes."""
    chosen = {"nodeSelector": settings.node_selector, "tolerations": settings.tolerations}
    return {key: value for key, value in chosen.items() if value}


def pod_command(run_id: str, store_url: str, gpus: int, nodes: int) -> list[str]:
    """The trainer alone, or torchrun with one process per GPU on one node or on each of several."""
    if nodes > 1:
        # Kubernetes expands $(JOB_COMPLETION_INDEX), which the Job controller sets in each pod of an Indexed Job.
        return trainer_command(store_url, run_id, torchrun=[
            f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}", "--node-rank=$(JOB_COMPLETION_INDEX)",
            f"--master-addr={job_name(run_id)}-0.{job_name(run_id)}", f"--master-port={RENDEZVOUS_PORT}"])
    if gpus > 1:
        return trainer_command(store_url, run_id, torchrun=["--standalone", f"--nproc-per-node={gpus}"])
    return trainer_command(store_url, run_id)


def job_manifest(run_id: str, store_url: str, settings: KubernetesConfig) -> dict:
    gpus, nodes = settings.gpus, settings.nodes
    limits = {"memory": settings.memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    labels = {RUN_LABEL: run_id, "app.kubernetes.io/name": "ilf-trainer", "app.kubernetes.io/part-of": "ilf"}
    container = {
        "name": "trainer",
        "image": settings.image,
        "command": pod_command(run_id, store_url, gpus, nodes),
        "env": [{"name": name, "value": config.SETTINGS[name].raw()} for name in FORWARDED_SETTINGS],
        "envFrom": [{"secretRef": {"name": settings.secret}}],
        "resources": {"requests": {"cpu": settings.cpu, "memory": limits["memory"]},
                      "limits": limits},
    }
    pod = {"restartPolicy": "Never", "containers": [container], **placement(settings)}
    if gpus > 1 or nodes > 1:
        # NCCL passes data between the processes of a pod through /dev/shm, which is 64 MiB by default.
        container["volumeMounts"] = [{"name": "shm", "mountPath": "/dev/shm"}]
        pod["volumes"] = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
    spec = {
        # A retried pod resumes from the run's last checkpoint in the store; when one node's pod fails, the others
        # fail with it, so a restart of the group costs up to `nodes` pod failures.
        "backoffLimit": settings.backoff_limit * nodes,
        "activeDeadlineSeconds": int(settings.deadline_s),
        "ttlSecondsAfterFinished": int(settings.ttl_s),
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if nodes > 1:
        spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
        pod["subdomain"] = job_name(run_id)  # pod i is <job>-i.<job>: the headless Service's DNS names
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(run_id), "namespace": settings.namespace, "labels": labels},
        "spec": spec,
    }


def rendezvous_service(job: dict, uid: str) -> dict:
    """The headless Service that gives a multi-node Job's pods DNS names; deleted with the Job it belongs to."""
    metadata = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": metadata["name"], "namespace": metadata["namespace"], "labels": metadata["labels"],
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": metadata["name"],
                                          "uid": uid, "blockOwnerDeletion": False}]},
        "spec": {
            "clusterIP": "None",
            "selector": {RUN_LABEL: metadata["labels"][RUN_LABEL]},
            # Pods have no readiness probe to pass: their names resolve as soon as they have an address.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


class KubernetesJobLauncher(Launcher):
    name = "kubernetes"

    def __init__(self, api=None, settings: KubernetesConfig | None = None):
        from kubernetes import client
        self.settings = settings or KubernetesConfig.from_env()
        api = api or api_client(self.settings.api)
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        self.namespace = self.settings.namespace

    def launch(self, run_id, store_url):
        from kubernetes.client.exceptions import ApiException
        manifest = job_manifest(run_id, store_url, self.settings)
        name = manifest["metadata"]["name"]
        try:
            job = self.batch.create_namespaced_job(self.namespace, manifest)
        except ApiException as error:
            if error.status != 409:  # 409: created before a service restart; keep that Job
                raise
            job = self.batch.read_namespaced_job(name, self.namespace)
        if manifest["spec"].get("completionMode") == "Indexed":
            try:
                self.core.create_namespaced_service(self.namespace, rendezvous_service(manifest, job.metadata.uid))
            except ApiException as error:
                if error.status != 409:
                    raise
        return {"launcher": self.name, "job": manifest["metadata"]["name"], "namespace": self.namespace,
                "started_at": time.time()}

    def status(self, run_id, handle):
        from kubernetes.client.exceptions import ApiException
        try:
            job = self.batch.read_namespaced_job(handle["job"], handle["namespace"])
        except ApiException as error:
            if error.status == 404:  # deleted by hand, or by its TTL while the service was down
                return JobStatus("exited", f"the Job {handle['job']} no longer exists")
            raise
        conditions = {c.type: c for c in (job.status.conditions or []) if c.status == "True"} if job.status else {}
        if "Complete" in conditions:
            return JobStatus("succeeded")
        if "Failed" in conditions:
            failed = conditions["Failed"]
            reason = f"{failed.reason or 'Failed'}: {failed.message or 'the Job failed'}"
            # Past the deadline Kubernetes kills the pod itself: its exit code would only mislead.
            pod_reason = "" if failed.reason == "DeadlineExceeded" else self._pod_failure(run_id, handle["namespace"])
            return JobStatus("failed", f"{reason}; {pod_reason}" if pod_reason else reason)
        active = job.status and (job.status.active or job.status.start_time)
        return JobStatus("running" if active else "pending")

    def _pod_failure(self, run_id: str, namespace: str) -> str:
        """How the Job's failed pods ended: OOMKilled if any was, else a failed pod's exit code."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{RUN_LABEL}={run_id}").items
        ended = [container.state.terminated for pod in pods if (pod.metadata.labels or {}).get(RUN_LABEL) == run_id
                 for container in (pod.status and pod.status.container_statuses) or []
                 if container.state and container.state.terminated and container.state.terminated.exit_code]
        for terminated in ended:
            if terminated.reason == "OOMKilled":
                return f"OOMKilled: the trainer exceeded its memory limit (exit code {terminated.exit_code})"
        return exit_reason(ended[-1].exit_code) if ended else ""

    def cancel(self, run_id, handle):
        from kubernetes.client.exceptions import ApiException
        try:  # Background propagation deletes the Job's pods too
            self.batch.delete_namespaced_job(handle["job"], handle["namespace"], propagation_policy="Background")
        except ApiException as error:
            if error.status != 404:
                raise
