"""Every setting is one environment variable with a kind, a default and a help line; `ilf config` prints them.

A setting is parsed and checked once, when a service (or command) builds its frozen config object at start-up
(`Section.from_env`); a bad value stops the start with one line naming the variable. Compose files, Kubernetes
manifests and the docs use exactly these names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar


class ConfigError(ValueError):
    """A setting's value cannot be used; the message names the variable and what it accepts."""


@dataclass(frozen=True)
class Kind:
    """How a setting's text becomes a value: `parse` raises ValueError with what it accepts."""
    name: str
    parse: Callable[[str], Any]


def _bounded(number: Callable[[str], float], name: str, low=None, high=None) -> Kind:
    def parse(text: str):
        try:
            value = number(text.strip())
        except ValueError:
            raise ValueError(f"must be an {name}" if name == "int" else f"must be a {name}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be at least {low}")
        return value
    return Kind(name, parse)


def integer(low: int | None = None, high: int | None = None) -> Kind:
    return _bounded(int, "int", low, high)


def number(low: float | None = None, high: float | None = None) -> Kind:
    return _bounded(float, "float", low, high)


def optional(kind: Kind) -> Kind:
    """Empty text means unset (None)."""
    return Kind(f"{kind.name} or empty", lambda text: kind.parse(text) if text.strip() else None)


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


BOOL = Kind("bool", _boolean)
AUTO_BOOL = Kind("auto or bool", lambda text: None if text.strip().lower() == "auto" else _boolean(text))  # None: auto
TEXT = Kind("text", lambda text: text)
PORT = integer(0, 65535)


def choice(*options: str) -> Kind:
    def parse(text: str) -> str:
        word = text.strip().lower()
        if word not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return word
    return Kind("|".join(options), parse)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError("must be a duration such as 30, 30s, 5m or 1h (seconds without a unit)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


DURATION = Kind("duration", _duration)


def _path(text: str) -> Path | None:
    return Path(text).expanduser().absolute() if text.strip() else None


PATH = Kind("path", _path)


def _json(expected: type) -> Kind:
    def parse(text: str):
        try:
            value = json.loads(text) if text.strip() else expected()
        except json.JSONDecodeError as error:
            raise ValueError(f"is not valid JSON: {error}") from None
        if not isinstance(value, expected):
            raise ValueError(f"must be a JSON {expected.__name__}")
        return value
    return Kind(f"JSON {expected.__name__}", parse)


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str
    kind: Kind = TEXT

    def raw(self) -> str:
        """The text in effect: the variable when set, else the default with its folders filled in."""
        value = os.environ.get(self.name)
        return value if value is not None else _expand_default(self.default)

    def value(self):
        text = self.raw()
        try:
            return self.kind.parse(text)
        except ValueError as error:
            raise ConfigError(f"{self.name}={text!r}: {error}") from None


_XDG_FALLBACKS = {"XDG_DATA_HOME": "~/.local/share", "XDG_CACHE_HOME": "~/.cache"}


def _expand_default(default: str) -> str:
    """Defaults may name another setting ({ILF_HOME}, {ILF_GENERATION_ADDR}) or {XDG_DATA_HOME} and {XDG_CACHE_HOME},
    resolved at read time so one variable moves a whole tree; folders are made absolute, so a file:// URL built
    from them has the right number of slashes (a `~` inside a URL is never expanded)."""
    def filled(match: re.Match) -> str:
        name = match.group(1)
        if name in _XDG_FALLBACKS:
            return os.path.abspath(os.path.expanduser(os.environ.get(name) or _XDG_FALLBACKS[name]))
        text = SETTINGS[name].raw()
        return os.path.abspath(os.path.expanduser(text)) if SETTINGS[name].kind is PATH else text
    return os.path.expanduser(re.sub(r"\{((?:ILF|XDG)_[A-Z0-9_]+)\}", filled, default))


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("ILF_HOME", "{XDG_DATA_HOME}/ilf",
            "Folder of durable local state: the local store (feedback, model versions, the serving log) and logs.", PATH),
    Setting("ILF_CACHE", "{XDG_CACHE_HOME}/ilf",
            "Folder of what can be rebuilt: converted and fetched models, data downloads.", PATH),
    Setting("ILF_STORE", "file://{ILF_HOME}/store",
            "Artifact store URL: file:///path or s3://bucket (with ILF_S3_ENDPOINT)."),
    Setting("ILF_S3_ENDPOINT", "", "host:port of the S3/MinIO server for s3:// stores."),
    Setting("ILF_S3_ACCESS_KEY", "", "S3 access key."),
    Setting("ILF_S3_SECRET_KEY", "", "S3 secret key."),
    Setting("ILF_S3_SECURE", "false", "Use HTTPS to reach the S3 server.", BOOL),
    Setting("ILF_S3_REGION", "us-east-1", "S3 region."),
    Setting("ILF_S3_RETRY_S", "30", "How long one object-store request is retried (with backoff) while S3 is unreachable.", DURATION),
    Setting("ILF_MODEL_CACHE", "{ILF_CACHE}/models", "Local cache of converted and downloaded model files.", PATH),
    Setting("ILF_DATA_DIR", "", "Folder holding mbpp.jsonl and surge_annotations.jsonl; empty: download them.", PATH),
    Setting("ILF_BASE_MODEL", "embedded:smollm2-135m-instruct",
            "Base model source: embedded:smollm2-135m-instruct, a Hugging Face id, or a local folder. Used when the "
            "store's serving pointer is empty: on an existing store the pointer wins (logged at start); switch with "
            "`ilf promote VERSION`, pin with ILF_GENERATION_MODEL, or start on a new ILF_STORE."),
    Setting("ILF_GENERATION_MODEL", "",
            "Model version the generation service serves at start; empty: the serving pointer, else the base model."),
    Setting("ILF_REFINEMENT_MODEL", "",
            "Model version the refinement service serves at start; empty: its serving pointer, else the base model."),
    Setting("ILF_PROMPT_STRIP", "true",
            "End prompts at the `def` line without its newline (the model writes it; better on small BPE models).", BOOL),
    Setting("ILF_REFINEMENT_GENERATION_ADDR", "{ILF_GENERATION_ADDR}",
            "Generation service that serves pi_Refine's weights for the refinement service."),
    Setting("ILF_REFINEMENT_MAX_N", "64", "Largest n (refinements per request).", integer(1)),
    Setting("ILF_REFINEMENT_MAX_NEW_TOKENS", "1024", "Largest max_new_tokens of a refinement request.", integer(1)),
    Setting("ILF_FEEDBACK_ACCEPT_TEST_SPLIT", "false",
            "Store feedback on tasks of a test split (no round trains on it, and it would leak held-out tasks); "
            "refused with FAILED_PRECONDITION by default.", BOOL),
    Setting("ILF_MAX_FEEDBACK_CHARS", "8000", "Longest feedback text the feedback and refinement services accept.",
            integer(1)),
    Setting("ILF_MAX_PROGRAM_CHARS", "64000", "Longest program the feedback and refinement services accept.",
            integer(1)),
    Setting("ILF_GENERATION_PORT", "50051", "gRPC port of the generation service.", PORT),
    Setting("ILF_GENERATION_BACKEND", "transformers",
            "Generation backend: transformers (in process), tgi (a remote TGI server at ILF_GENERATION_TGI_URL) or "
            "openai (vLLM, SGLang or any OpenAI-compatible server at ILF_GENERATION_OPENAI_URL).",
            choice("transformers", "tgi", "openai")),
    Setting("ILF_GENERATION_TGI_URL", "", "Base URL of the TGI server the tgi backend calls, e.g. http://host:8080."),
    Setting("ILF_GENERATION_OPENAI_URL", "",
            "Base URL of the OpenAI-compatible server the openai backend calls, e.g. http://host:8000/v1."),
    Setting("ILF_GENERATION_OPENAI_TOKEN", "{ILF_AUTH_TOKEN}",
            "Bearer token (API key) the openai backend sends: vLLM's --api-key, or an operator token of the "
            "generation service it calls; empty: none."),
    Setting("ILF_GENERATION_OPENAI_ADAPTER_DIR", "{ILF_MODEL_CACHE}/versions",
            "Where the openai backend puts a LoRA version's files for the remote server to load (vLLM's lora_path): "
            "the remote server must see this folder at the same path.", PATH),
    Setting("ILF_GENERATION_HTTP_PORT", "",
            "Port of the generation service's HTTP endpoint: TGI's routes (generate, generate_stream, info) and "
            "OpenAI's (/v1/models, /v1/completions, /v1/chat/completions); checks the same bearer tokens as gRPC, "
            "/health excepted; empty: off.", optional(PORT)),
    Setting("ILF_GENERATION_MAX_QUEUE", "64", "Requests that may wait for a batch slot; more get RESOURCE_EXHAUSTED.", integer(1)),
    Setting("ILF_GENERATION_MAX_BATCH_ROWS", "64", "Samples decoded together in one continuous batch.", integer(1)),
    Setting("ILF_GENERATION_MAX_N", "64", "Largest n (samples per request).", integer(1)),
    Setting("ILF_GENERATION_MAX_NEW_TOKENS", "2048", "Largest max_new_tokens per request.", integer(1)),
    Setting("ILF_GENERATION_MAX_LOADED", "3", "Model versions kept in memory (the serving one included).", integer(1)),
    Setting("ILF_REFINEMENT_PORT", "50052", "gRPC port of the refinement service.", PORT),
    Setting("ILF_EXECUTION_PORT", "50053", "gRPC port of the execution service.", PORT),
    Setting("ILF_TRAINING_PORT", "50054", "gRPC port of the training service.", PORT),
    Setting("ILF_FEEDBACK_PORT", "50055", "gRPC port of the feedback service.", PORT),
    Setting("ILF_FEEDBACK_HTTP_PORT", "", "Port of the feedback service's annotation page (sign-in with an annotator "
            "or operator token; HTTPS with ILF_TLS_CERT); empty: off.", optional(PORT)),
    Setting("ILF_FEEDBACK_LEASE_S", "10m", "How long a queue item opened on the annotation page stays with its annotator.",
            DURATION),
    Setting("ILF_GENERATION_ADDR", "localhost:50051", "Where clients reach the generation service."),
    Setting("ILF_REFINEMENT_ADDR", "localhost:50052", "Where clients reach the refinement service."),
    Setting("ILF_EXECUTION_ADDR", "localhost:50053", "Where clients reach the execution service."),
    Setting("ILF_TRAINING_ADDR", "localhost:50054", "Where clients reach the training service."),
    Setting("ILF_FEEDBACK_ADDR", "localhost:50055", "Where clients reach the feedback service."),
    Setting("ILF_BIND_HOST", "127.0.0.1", "Address the gRPC servers bind to (0.0.0.0 in containers)."),
    Setting("ILF_AUTH", "auto",
            "Bearer-token auth: on, off, or auto (on with ILF_AUTH_TOKENS_FILE, off on a loopback bind, "
            "else the services refuse to start).", choice("auto", "on", "off")),
    Setting("ILF_AUTH_TOKENS_FILE", "",
            "Tokens the services accept: JSON [{token, role, name}] or lines `token role [name]`; role client, annotator or operator.", PATH),
    Setting("ILF_AUTH_TOKEN", "", "Bearer token clients (and services calling services, over gRPC or TGI HTTP) send."),
    Setting("ILF_TLS_CERT", "", "PEM certificate of this server, also presented as client certificate when set.", PATH),
    Setting("ILF_TLS_KEY", "", "PEM private key of ILF_TLS_CERT.", PATH),
    Setting("ILF_TLS_CA", "", "PEM CA bundle: clients use TLS and verify servers with it; servers verify client certificates.", PATH),
    Setting("ILF_TLS_CLIENT_AUTH", "none", "none, or required: servers demand a client certificate signed by ILF_TLS_CA.", choice("none", "required")),
    Setting("ILF_GRPC_WORKERS", "32", "Threads of each gRPC server for calls of its services.", integer(1)),
    Setting("ILF_GRPC_MAX_PROBE_STREAMS", "8",
            "Health-watch and reflection streams (which need no token) a server runs at once, on threads of their "
            "own; more get RESOURCE_EXHAUSTED.", integer(1)),
    Setting("ILF_GRPC_MAX_PROBE_STREAMS_PER_PEER", "4", "The same bound per client host.", integer(1)),
    Setting("ILF_GRPC_DRAIN_S", "10", "How long a stopping server lets in-flight calls finish.", DURATION),
    Setting("ILF_GRPC_MAX_MESSAGE_BYTES", str(64 * 1024 * 1024),
            "Largest gRPC message sent or received; larger requests get RESOURCE_EXHAUSTED.", integer(1024)),
    Setting("ILF_GRPC_MAX_CONNECTION_AGE_S", "300", "Servers close each client connection after this long (calls in flight finish), so clients re-resolve DNS and spread calls over new replicas too.", DURATION),
    Setting("ILF_METRICS_PORT", "", "Port of this process's Prometheus /metrics endpoint, on ILF_BIND_HOST; empty: off.", optional(PORT)),
    Setting("ILF_SERVING_POLL_S", "2", "How often each generation and refinement replica reads its serving pointer (promotions, rollbacks, canaries) and reports what it serves; 0: never.", DURATION),
    Setting("ILF_EXECUTION_WORKERS", "0", "Sandboxed worker processes of the execution service; 0: one per CPU.", integer(0)),
    Setting("ILF_EXECUTION_TIMEOUT_S", "3", "Default wall-clock limit per program (the paper's 3 s).", number(0.001)),
    Setting("ILF_EXECUTION_MAX_TIMEOUT_S", "60", "Largest wall-clock limit a request may ask for.", number(0.001)),
    Setting("ILF_EXECUTION_MEMORY_MB", "1024", "Default address-space limit per program.", integer(16)),
    Setting("ILF_EXECUTION_MAX_MEMORY_MB", "4096", "Largest address-space limit a request may ask for.", integer(16)),
    Setting("ILF_EXECUTION_MAX_PROGRAM_BYTES", "100000", "Largest program, test setup or test (UTF-8 bytes).", integer(1)),
    Setting("ILF_EXECUTION_MAX_TESTS", "100", "Most tests per program.", integer(1)),
    Setting("ILF_EXECUTION_MAX_BATCH", "2000", "Most programs per ExecuteBatch call.", integer(1)),
    Setting("ILF_EXECUTION_BATCH_MEMORY_MB", "512", "Memory one ExecuteBatch call may hold in results not yet streamed: it bounds how many of its programs are queued at once.", integer(16)),
    Setting("ILF_EXECUTION_SCRATCH_MB", "16", "Size of each sandbox's private /tmp (tmpfs).", integer(1)),
    Setting("ILF_EXECUTION_MAX_PROCESSES", "32", "Processes and threads a program may have (RLIMIT_NPROC, pids cgroup).", integer(1)),
    Setting("ILF_EXECUTION_MAX_OPEN_FILES", "64", "Open files per program (RLIMIT_NOFILE).", integer(4)),
    Setting("ILF_EXECUTION_MAX_FILE_MB", "8", "Largest file a program may write (RLIMIT_FSIZE).", integer(0)),
    Setting("ILF_EXECUTION_MAX_OUTPUT_BYTES", "65536", "Captured stdout and stderr each; the rest is dropped and flagged.", integer(0)),
    Setting("ILF_EXECUTION_REQUIRE_SANDBOX", "false", "Refuse to start when bwrap cannot sandbox programs.", BOOL),
    Setting("ILF_TRAINING_LAUNCHER", "local", "How training runs start: local (a process) or kubernetes (a batch/v1 Job).", choice("local", "kubernetes")),
    Setting("ILF_TRAINING_MAX_CONCURRENT", "1", "Training runs started at once; later ones wait QUEUED.", integer(1)),
    Setting("ILF_TRAINING_POLL_S", "1.0", "Seconds between checks of running training runs.", DURATION),
    Setting("ILF_TRAINING_DEADLINE_S", "86400", "A training run fails with DeadlineExceeded after this many seconds.", DURATION),
    Setting("ILF_TRAINING_LOG_DIR", "{ILF_HOME}/training-logs", "Where the local launcher writes each trainer's output.", PATH),
    Setting("ILF_TRAINING_K8S_API", "",
            "Kubernetes API URL for training Jobs; empty: the in-cluster service account, else ~/.kube/config."),
    Setting("ILF_TRAINING_K8S_NAMESPACE", "default", "Namespace of the training Jobs."),
    Setting("ILF_TRAINING_K8S_IMAGE", "ilf:latest", "Container image of the training Jobs (has `python -m trainer`)."),
    Setting("ILF_TRAINING_K8S_SECRET", "ilf-s3", "Secret whose keys (ILF_S3_*) become the trainer's environment."),
    Setting("ILF_TRAINING_K8S_GPUS", "0", "nvidia.com/gpu limit of each training Job pod; above 1, the pod runs one trainer process per GPU (torchrun); 0 on CPU clusters.", integer(0)),
    Setting("ILF_TRAINING_K8S_NODES", "1", "Pods of a training Job, one per node; above 1, an Indexed Job whose pods meet through a headless Service and train as one (torchrun, ILF_TRAINING_K8S_GPUS processes each).", integer(1, 64)),
    Setting("ILF_TRAINING_K8S_NODE_SELECTOR", "",
            'nodeSelector of training Job pods as JSON, e.g. {"nvidia.com/gpu.present": "true"}; empty: none.', _json(dict)),
    Setting("ILF_TRAINING_K8S_TOLERATIONS", "",
            'tolerations of training Job pods as a JSON list, e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", '
            '"effect": "NoSchedule"}]; empty: none.', _json(list)),
    Setting("ILF_TRAINING_K8S_BACKOFF_LIMIT", "1", "Pod retries of a training Job before it fails (a retry resumes).", integer(0)),
    Setting("ILF_TRAINING_K8S_TTL_S", "86400", "Seconds a finished training Job is kept before Kubernetes deletes it.", DURATION),
    Setting("ILF_TRAINING_K8S_CPU", "2", "CPU request of a training Job."),
    Setting("ILF_TRAINING_K8S_MEMORY", "16Gi", "Memory limit of a training Job."),
    Setting("ILF_TRAINER_CHECKPOINT_STEPS", "20", "The trainer checkpoints to the store every this many optimizer steps.", integer(1)),
    Setting("ILF_TRAINER_MICRO_BATCH_TOKENS", "2048",
            "Token budget of one forward pass (rows x longest row); optimizer steps accumulate micro-batches.", integer(1)),
    Setting("ILF_TRAINER_GRADIENT_CHECKPOINTING", "auto",
            "Recompute each layer's activations during the backward pass instead of keeping them: less memory, "
            "same gradients, about 1.3x the time. auto: on when a micro-batch's estimated activations exceed a third "
            "of the memory available after loading (logged).", AUTO_BOOL),
    Setting("ILF_DEVICE", "auto", "torch device for models: auto, cpu or cuda.", choice("auto", "cpu", "cuda")),
    Setting("ILF_DTYPE", "auto", "Model dtype for serving and training: auto (bfloat16 on CUDA and on CPUs with native "
            "bf16 arithmetic, AVX512_BF16 or AMX; else float32), float32, bfloat16 or float16. The trainer keeps float32 "
            "weights and runs its products in bf16 autocast whenever this resolves to a 16-bit dtype.",
            choice("auto", "float32", "bfloat16", "float16")),
    Setting("ILF_TORCH_THREADS", "0", "torch intra-op threads; 0 keeps torch's default.", integer(0)),
    Setting("ILF_PROMOTE_MARGIN", "0", "A round switches serving to its candidate only if pass@1 dropped by at most "
            "this much (0: any drop refuses it); `--promote-margin` overrides it.", number()),
    Setting("ILF_RETRAIN_ARGS", "", "Flags `ilf retrain` reads before its own command line, for running it as a "
            "service (compose, Kubernetes), e.g. `--task-set ts-... --min-new-feedback 20`."),
]}


def get(name: str):
    """The setting's parsed, checked value (ConfigError names the variable when it is unusable)."""
    return SETTINGS[name].value()


def setting(name: str, **field_options) -> Any:
    """A field of a Section read from the setting `name` (checked to exist when the section is defined)."""
    if name not in SETTINGS:
        raise KeyError(f"no setting {name}")
    return dataclasses.field(metadata={"setting": name}, **field_options)


def nested(section_type: type) -> Any:
    """A field holding another Section (the server settings every service shares, say)."""
    return dataclasses.field(metadata={"section": section_type})


class Section:
    """Base of the frozen config object each service builds once at start-up and passes down.

    Subclasses are frozen dataclasses whose fields are `setting(...)`s; `from_env` parses every one of them
    (overrides replace a field, for tests and for callers that know better); `describe` is the start-up log line.
    """
    LABEL: ClassVar[str] = "config"

    @classmethod
    def from_env(cls, **overrides):
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in overrides:
                values[field.name] = overrides[field.name]
            elif "setting" in field.metadata:
                values[field.name] = get(field.metadata["setting"])
            elif "section" in field.metadata:
                values[field.name] = field.metadata["section"].from_env()
        return cls(**values)

    def describe(self) -> str:
        def shown(field, value):
            secret = field.metadata.get("setting", "").endswith(("SECRET_KEY", "ACCESS_KEY", "TOKEN"))
            return "***" if secret and value else value
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            parts.append(value.describe() if isinstance(value, Section) else f"{field.name}={shown(field, value)}")
        return f"{self.LABEL}: " + " ".join(parts)



def markdown_table() -> str:
    rows = ["| variable | kind | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.kind.name} | `{s.default}` | {s.help} |" for s in SETTINGS.values()]
    return "\n".join(rows)


def effective_table() -> str:
    """Every setting with the value in effect now and where it came from (for `ilf config`)."""
    rows = ["| variable | value | from | check |", "|---|---|---|---|"]
    for s in SETTINGS.values():
        value = s.raw()
        try:
            s.value()
            check = "ok"
        except ConfigError as error:
            check = f"**invalid**: {str(error).split(': ', 1)[1]}"
        if value and s.name.endswith(("SECRET_KEY", "ACCESS_KEY", "TOKEN")):
            value = "***"
        rows.append(f"| `{s.name}` | `{value}` | {'environment' if s.name in os.environ else 'default'} | {check} |")
    return "\n".join(rows)
