"""Fine-tuning datasets: JSONL of {prompt, completion, ...} records, stored content-addressed."""
from __future__ import annotations

import hashlib
import json

from ilf.errors import InvalidArgument
from ilf.store import ArtifactStore


def put_dataset(store: ArtifactStore, records: list[dict], *, name: str = "dataset") -> str:
    """Stores the records once under datasets/<name>-<sha256>.jsonl and returns that key."""
    if not records:
        raise InvalidArgument("a dataset needs at least one record")
    for record in records:
        if not record.get("prompt") or not record.get("completion"):
            raise InvalidArgument("every dataset record needs a prompt and a completion")
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    key = f"datasets/{name}-{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
    if not store.exists(key):
        store.put(key, body)
    return key


def read_dataset(store: ArtifactStore, key: str) -> list[dict]:
    return [json.loads(line) for line in store.get(key).decode().splitlines() if line.strip()]
