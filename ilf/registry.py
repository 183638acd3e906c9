"""Model registry on the artifact store: immutable versions with lineage, and serving pointers.

A version lives at models/<version>/ (files + MANIFEST.json whose `info` is the version record);
a base version records only where its weights come from. serving/<channel>.json is the one
mutable object per channel: the serving version and the history that rollback walks back.
"""
from __future__ import annotations

import getpass
import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ilf.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ilf.store import ArtifactStore

KINDS = ("base", "lora", "full")
_VERSION_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")


@dataclass
class ModelVersion:
    version: str
    kind: str                       # base: weights from `source`; lora/full: files in the store
    source: str = ""                # base only: embedded:NAME, a Hugging Face id or a local folder
    base_version: str = ""          # lora/full: the version it was trained from
    created_at: float = field(default_factory=time.time)
    lineage: dict = field(default_factory=dict)  # dataset, run, hyperparameters, feedback records
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: dict) -> "ModelVersion":
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})


def validate_version_id(version: str) -> str:
    if not _VERSION_ID.fullmatch(version or ""):
        raise InvalidArgument(f"model version {version!r} is not a valid id (lowercase letters, digits, . _ -)")
    return version


def new_version_id(prefix: str = "v") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def base_version_id(source: str) -> str:
    """Stable id for a base model source, so registering it twice is a no-op."""
    name = re.sub(r"[^a-z0-9]+", "-", source.rsplit("/", 1)[-1].split(":")[-1].lower()).strip("-")[:48]
    return f"base-{name}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"


class Registry:
    def __init__(self, store: ArtifactStore):
        self.store = store

    # versions
    def ensure_base(self, source: str, check: Callable[[str], object] | None = None) -> ModelVersion:
        """The base version of a source, registered first if needed; `check` (which raises when the source cannot
        be loaded) runs before registering, so a model that never loaded is never listed."""
        version = base_version_id(source)
        if not self.store.exists(f"models/{version}/MANIFEST.json"):
            if check:
                check(source)
            record = ModelVersion(version=version, kind="base", source=source)
            try:
                self.store.put_json(f"models/{version}/MANIFEST.json",
                                    {"files": {}, "info": asdict(record), "published_at": time.time()})
            except AlreadyExists:
                pass  # another service registered it between our check and our write: theirs is the same base
        return self.get(version)

    def register(self, record: ModelVersion, files_dir: Path | None = None) -> ModelVersion:
        """Publishes a new immutable version; its files become visible with its manifest."""
        validate_version_id(record.version)
        if record.kind not in KINDS:
            raise InvalidArgument(f"model kind must be one of {KINDS}, got {record.kind!r}")
        if record.kind != "base":
            self.get(record.base_version)  # a version's base must exist
            if files_dir is None:
                raise InvalidArgument(f"a {record.kind} version needs its files")
        if files_dir is None:
            self.store.put_json(f"models/{record.version}/MANIFEST.json",
                                {"files": {}, "info": asdict(record), "published_at": time.time()})
        else:
            self.store.publish_dir(f"models/{record.version}", files_dir, asdict(record))
        return record

    def get(self, version: str) -> ModelVersion:
        validate_version_id(version)
        try:
            return ModelVersion.from_dict(self.store.read_manifest(f"models/{version}")["info"])
        except NotFound:
            raise NotFound(f"model version {version!r} is not registered") from None

    def list(self) -> list[ModelVersion]:
        keys = [k for k in self.store.list("models/") if k.count("/") == 2 and k.endswith("/MANIFEST.json")]
        return sorted((self.get(k.split("/")[1]) for k in keys), key=lambda v: v.created_at)

    def fetch_files(self, version: str, dest: Path) -> Path:
        self.store.fetch_dir(f"models/{version}", dest)
        return dest

    def chain(self, version: str) -> list[ModelVersion]:
        """The version and its ancestors, the base model last."""
        chain = [self.get(version)]
        while chain[-1].kind != "base":
            chain.append(self.get(chain[-1].base_version))
        return chain

    # serving pointers
    def serving(self, channel: str) -> dict | None:
        try:
            return self.store.get_json(f"serving/{channel}.json")
        except NotFound:
            return None

    def serving_version(self, channel: str) -> str | None:
        pointer = self.serving(channel)
        return pointer["version"] if pointer else None

    def promote(self, channel: str, version: str, *, by: str | None = None, reason: str = "") -> dict:
        self.get(version)
        pointer = self.serving(channel) or {"version": None, "history": []}
        history = pointer["history"] + ([pointer["version"]] if pointer["version"] else [])
        updated = {"version": version, "history": history[-50:], "updated_at": time.time(),
                   "by": by or _whoami(), "reason": reason}
        self.store.put_json(f"serving/{channel}.json", updated, overwrite=True)
        self._log_event(channel, updated)
        return updated

    def rollback(self, channel: str, *, by: str | None = None) -> dict:
        pointer = self.serving(channel)
        if not pointer or not pointer["history"]:
            raise FailedPrecondition(f"channel {channel!r} has no earlier version to roll back to")
        previous = pointer["history"][-1]
        updated = {"version": previous, "history": pointer["history"][:-1], "updated_at": time.time(),
                   "by": by or _whoami(), "reason": f"rollback from {pointer['version']}"}
        self.store.put_json(f"serving/{channel}.json", updated, overwrite=True)
        self._log_event(channel, updated)
        return updated

    def start_canary(self, channel: str, version: str, share: float, *, by: str | None = None) -> dict:
        """Keeps the serving version and names a candidate for `share` of new requests; the next promote or
        rollback of the channel ends the canary, and so does end_canary."""
        self.get(version)
        if not 0 < share < 1:
            raise InvalidArgument(f"a canary share must be between 0 and 1 (exclusive), got {share}")
        pointer = self.serving(channel)
        if not pointer:
            raise FailedPrecondition(f"channel {channel!r} serves nothing yet: promote a first version")
        if pointer["version"] == version:
            raise FailedPrecondition(f"channel {channel!r} already serves {version}")
        updated = {**pointer, "canary": {"version": version, "share": share}, "updated_at": time.time(),
                   "by": by or _whoami(), "reason": f"canary {version} at {share:.0%}"}
        self.store.put_json(f"serving/{channel}.json", updated, overwrite=True)
        self._log_event(channel, updated)
        return updated

    def end_canary(self, channel: str, *, reason: str, by: str | None = None) -> dict:
        """Every request goes to the serving version again."""
        pointer = self.serving(channel)
        if not pointer or "canary" not in pointer:
            raise FailedPrecondition(f"channel {channel!r} runs no canary")
        updated = {k: v for k, v in pointer.items() if k != "canary"}
        updated.update(updated_at=time.time(), by=by or _whoami(), reason=reason)
        self.store.put_json(f"serving/{channel}.json", updated, overwrite=True)
        self._log_event(channel, updated)
        return updated

    def _log_event(self, channel: str, pointer: dict) -> None:
        # An append-only audit trail: one immutable object per change of a serving pointer.
        self.store.put_json(f"serving-log/{channel}/{time.time():.6f}-{secrets.token_hex(2)}.json", pointer)

    def events(self, channel: str) -> list[dict]:
        return [self.store.get_json(k) for k in self.store.list(f"serving-log/{channel}/")]


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"
