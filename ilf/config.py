"""Every setting is one environment variable with a default; `ilf config` prints the table.

Compose files, Kubernetes manifests and the docs use exactly these names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str

    def get(self) -> str:
        value = os.environ.get(self.name)
        if value is not None:
            return value
        # Defaults may name {ILF_HOME}, resolved at read time so one variable moves all local state.
        home = os.environ.get("ILF_HOME") or "~/.cache/ilf"
        return os.path.expanduser(self.default.replace("{ILF_HOME}", home))


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("ILF_HOME", "~/.cache/ilf", "Root folder for local state (store, model cache, data downloads)."),
    Setting("ILF_STORE", "file://{ILF_HOME}/store",
            "Artifact store URL: file:///path or s3://bucket (with ILF_S3_ENDPOINT)."),
    Setting("ILF_S3_ENDPOINT", "", "host:port of the S3/MinIO server for s3:// stores."),
    Setting("ILF_S3_ACCESS_KEY", "", "S3 access key."),
    Setting("ILF_S3_SECRET_KEY", "", "S3 secret key."),
    Setting("ILF_S3_SECURE", "false", "Use HTTPS to reach the S3 server."),
    Setting("ILF_S3_REGION", "us-east-1", "S3 region."),
    Setting("ILF_S3_RETRY_S", "30", "How long one object-store request is retried (with backoff) while S3 is unreachable."),
    Setting("ILF_MODEL_CACHE", "{ILF_HOME}/models", "Local cache of converted and downloaded model files."),
    Setting("ILF_DATA_DIR", "", "Folder holding mbpp.jsonl and surge_annotations.jsonl; empty: download them."),
    Setting("ILF_BASE_MODEL", "embedded:smollm2-135m-instruct",
            "Base model source: embedded:smollm2-135m-instruct, a Hugging Face id, or a local folder."),
    Setting("ILF_GENERATION_MODEL", "",
            "Model version the generation service serves at start; empty: the serving pointer, else the base model."),
    Setting("ILF_REFINEMENT_MODEL", "",
            "Model version the refinement service serves at start; empty: its serving pointer, else the base model."),
    Setting("ILF_PROMPT_STRIP", "true",
            "End prompts at the `def` line without its newline (the model writes it; better on small BPE models)."),
    Setting("ILF_REFINEMENT_GENERATION_ADDR", "",
            "Generation service that serves pi_Refine's weights for the refinement service; empty: ILF_GENERATION_ADDR."),
    Setting("ILF_GENERATION_PORT", "50051", "gRPC port of the generation service."),
    Setting("ILF_GENERATION_BACKEND", "transformers",
            "Generation backend: transformers (in process) or tgi (a remote TGI server at ILF_GENERATION_TGI_URL)."),
    Setting("ILF_GENERATION_TGI_URL", "", "Base URL of the TGI server the tgi backend calls, e.g. http://host:8080."),
    Setting("ILF_GENERATION_HTTP_PORT", "",
            "Port of the generation service's TGI-protocol HTTP endpoint (generate, generate_stream; "
            "checks the same bearer tokens as gRPC, /health excepted); empty: off."),
    Setting("ILF_GENERATION_MAX_QUEUE", "64", "Requests that may wait for a batch slot; more get RESOURCE_EXHAUSTED."),
    Setting("ILF_GENERATION_MAX_BATCH_ROWS", "64", "Samples decoded together in one continuous batch."),
    Setting("ILF_GENERATION_MAX_N", "64", "Largest n (samples per request)."),
    Setting("ILF_GENERATION_MAX_NEW_TOKENS", "2048", "Largest max_new_tokens per request."),
    Setting("ILF_GENERATION_MAX_LOADED", "3", "Model versions kept in memory (the serving one included)."),
    Setting("ILF_REFINEMENT_PORT", "50052", "gRPC port of the refinement service."),
    Setting("ILF_EXECUTION_PORT", "50053", "gRPC port of the execution service."),
    Setting("ILF_TRAINING_PORT", "50054", "gRPC port of the training service."),
    Setting("ILF_FEEDBACK_PORT", "50055", "gRPC port of the feedback service."),
    Setting("ILF_GENERATION_ADDR", "localhost:50051", "Where clients reach the generation service."),
    Setting("ILF_REFINEMENT_ADDR", "localhost:50052", "Where clients reach the refinement service."),
    Setting("ILF_EXECUTION_ADDR", "localhost:50053", "Where clients reach the execution service."),
    Setting("ILF_TRAINING_ADDR", "localhost:50054", "Where clients reach the training service."),
    Setting("ILF_FEEDBACK_ADDR", "localhost:50055", "Where clients reach the feedback service."),
    Setting("ILF_BIND_HOST", "127.0.0.1", "Address the gRPC servers bind to (0.0.0.0 in containers)."),
    Setting("ILF_AUTH", "auto",
            "Bearer-token auth: on, off, or auto (on with ILF_AUTH_TOKENS_FILE, off on a loopback bind, "
            "else the services refuse to start)."),
    Setting("ILF_AUTH_TOKENS_FILE", "",
            "Tokens the services accept: JSON [{token, role, name}] or lines `token role [name]`; role client or operator."),
    Setting("ILF_AUTH_TOKEN", "", "Bearer token clients (and services calling services, over gRPC or TGI HTTP) send."),
    Setting("ILF_TLS_CERT", "", "PEM certificate of this server, also presented as client certificate when set."),
    Setting("ILF_TLS_KEY", "", "PEM private key of ILF_TLS_CERT."),
    Setting("ILF_TLS_CA", "", "PEM CA bundle: clients use TLS and verify servers with it; servers verify client certificates."),
    Setting("ILF_TLS_CLIENT_AUTH", "none", "none, or required: servers demand a client certificate signed by ILF_TLS_CA."),
    Setting("ILF_GRPC_MAX_MESSAGE_BYTES", str(64 * 1024 * 1024),
            "Largest gRPC message sent or received; larger requests get RESOURCE_EXHAUSTED."),
    Setting("ILF_EXECUTION_WORKERS", "0", "Sandboxed worker processes of the execution service; 0: one per CPU."),
    Setting("ILF_EXECUTION_TIMEOUT_S", "3", "Default wall-clock limit per program (the paper's 3 s)."),
    Setting("ILF_EXECUTION_MAX_TIMEOUT_S", "60", "Largest wall-clock limit a request may ask for."),
    Setting("ILF_EXECUTION_MEMORY_MB", "1024", "Default address-space limit per program."),
    Setting("ILF_EXECUTION_MAX_MEMORY_MB", "4096", "Largest address-space limit a request may ask for."),
    Setting("ILF_EXECUTION_MAX_PROGRAM_BYTES", "100000", "Largest program, test setup or test (UTF-8 bytes)."),
    Setting("ILF_EXECUTION_MAX_TESTS", "100", "Most tests per program."),
    Setting("ILF_EXECUTION_MAX_BATCH", "2000", "Most programs per ExecuteBatch call."),
    Setting("ILF_EXECUTION_SCRATCH_MB", "16", "Size of each sandbox's private /tmp (tmpfs)."),
    Setting("ILF_EXECUTION_MAX_PROCESSES", "32", "Processes and threads a program may have (RLIMIT_NPROC, pids cgroup)."),
    Setting("ILF_EXECUTION_MAX_OPEN_FILES", "64", "Open files per program (RLIMIT_NOFILE)."),
    Setting("ILF_EXECUTION_MAX_FILE_MB", "8", "Largest file a program may write (RLIMIT_FSIZE)."),
    Setting("ILF_EXECUTION_MAX_OUTPUT_BYTES", "65536", "Captured stdout and stderr each; the rest is dropped and flagged."),
    Setting("ILF_EXECUTION_REQUIRE_SANDBOX", "false", "Refuse to start when bwrap cannot sandbox programs."),
    Setting("ILF_TRAINING_LAUNCHER", "local", "How training runs start: local (a process) or kubernetes (a batch/v1 Job)."),
    Setting("ILF_TRAINING_MAX_CONCURRENT", "1", "Training runs started at once; later ones wait QUEUED."),
    Setting("ILF_TRAINING_POLL_S", "1.0", "Seconds between checks of running training runs."),
    Setting("ILF_TRAINING_DEADLINE_S", "86400", "A training run fails with DeadlineExceeded after this many seconds."),
    Setting("ILF_TRAINING_LOG_DIR", "{ILF_HOME}/training-logs", "Where the local launcher writes each trainer's output."),
    Setting("ILF_TRAINING_K8S_API", "",
            "Kubernetes API URL for training Jobs; empty: the in-cluster service account, else ~/.kube/config."),
    Setting("ILF_TRAINING_K8S_NAMESPACE", "default", "Namespace of the training Jobs."),
    Setting("ILF_TRAINING_K8S_IMAGE", "ilf:latest", "Container image of the training Jobs (has `python -m trainer`)."),
    Setting("ILF_TRAINING_K8S_SECRET", "ilf-s3", "Secret whose keys (ILF_S3_*) become the trainer's environment."),
    Setting("ILF_TRAINING_K8S_GPUS", "0", "nvidia.com/gpu limit of a training Job; 0 on CPU clusters."),
    Setting("ILF_TRAINING_K8S_NODE_SELECTOR", "",
            'nodeSelector of training Job pods as JSON, e.g. {"nvidia.com/gpu.present": "true"}; empty: none.'),
    Setting("ILF_TRAINING_K8S_TOLERATIONS", "",
            'tolerations of training Job pods as a JSON list, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", '
            '"effect": "NoSchedule"}]; empty: none.'),
    Setting("ILF_TRAINING_K8S_BACKOFF_LIMIT", "1", "Pod retries of a training Job before it fails (a retry resumes)."),
    Setting("ILF_TRAINING_K8S_TTL_S", "86400", "Seconds a finished training Job is kept before Kubernetes deletes it."),
    Setting("ILF_TRAINING_K8S_CPU", "2", "CPU request of a training Job."),
    Setting("ILF_TRAINING_K8S_MEMORY", "16Gi", "Memory limit of a training Job."),
    Setting("ILF_TRAINER_CHECKPOINT_STEPS", "20", "The trainer checkpoints to the store every this many optimizer steps."),
    Setting("ILF_TRAINER_MICRO_BATCH_TOKENS", "4096",
            "Token budget of one forward pass (rows x longest row); optimizer steps accumulate micro-batches."),
    Setting("ILF_TRAINER_GRADIENT_CHECKPOINTING", "true",
            "Recompute each layer's activations during the backward pass instead of keeping them: less memory, "
            "same gradients."),
    Setting("ILF_DEVICE", "auto", "torch device for models: auto, cpu or cuda."),
    Setting("ILF_TORCH_THREADS", "0", "torch intra-op threads; 0 keeps torch's default."),
]}


def get(name: str) -> str:
    return SETTINGS[name].get()


def enabled(name: str) -> bool:
    """A yes/no setting: 1, true or yes (any case) turn it on."""
    return get(name).strip().lower() in ("1", "true", "yes")


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.name}` | `{s.default}` | {s.help} |" for s in SETTINGS.values()]
    return "\n".join(rows)
