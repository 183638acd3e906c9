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
    Setting("ILF_MODEL_CACHE", "{ILF_HOME}/models", "Local cache of converted and downloaded model files."),
    Setting("ILF_DATA_DIR", "", "Folder holding mbpp.jsonl and surge_annotations.jsonl; empty: download them."),
    Setting("ILF_BASE_MODEL", "embedded:smollm2-135m-instruct",
            "Base model source: embedded:smollm2-135m-instruct, a Hugging Face id, or a local folder."),
    Setting("ILF_GENERATION_MODEL", "",
            "Model version the generation service serves at start; empty: the serving pointer, else the base model."),
    Setting("ILF_REFINEMENT_MODEL", "",
            "Model version the refinement service serves at start; empty: its serving pointer, else the base model."),
    Setting("ILF_GENERATION_PORT", "50051", "gRPC port of the generation service."),
    Setting("ILF_REFINEMENT_PORT", "50052", "gRPC port of the refinement service."),
    Setting("ILF_EXECUTION_PORT", "50053", "gRPC port of the execution service."),
    Setting("ILF_TRAINING_PORT", "50054", "gRPC port of the training service."),
    Setting("ILF_GENERATION_ADDR", "localhost:50051", "Where clients reach the generation service."),
    Setting("ILF_REFINEMENT_ADDR", "localhost:50052", "Where clients reach the refinement service."),
    Setting("ILF_EXECUTION_ADDR", "localhost:50053", "Where clients reach the execution service."),
    Setting("ILF_TRAINING_ADDR", "localhost:50054", "Where clients reach the training service."),
    Setting("ILF_BIND_HOST", "127.0.0.1", "Address the gRPC servers bind to (0.0.0.0 in containers)."),
    Setting("ILF_TRAINING_LAUNCHER", "local", "How training runs start: local (a process) or kubernetes (a batch/v1 Job)."),
    Setting("ILF_DEVICE", "auto", "torch device for models: auto, cpu or cuda."),
    Setting("ILF_TORCH_THREADS", "0", "torch intra-op threads; 0 keeps torch's default."),
]}


def get(name: str) -> str:
    return SETTINGS[name].get()


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{s.name}` | `{s.default}` | {s.help} |" for s in SETTINGS.values()]
    return "\n".join(rows)
