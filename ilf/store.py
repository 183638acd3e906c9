"""Artifact store: a local folder or an S3/MinIO bucket behind one interface.

Artifacts are immutable: `put` refuses to overwrite unless asked (only mutable state such as
run state and serving pointers asks). Single objects are published atomically (a temporary
file renamed into place, or one S3 PUT); a folder of files becomes visible only when its
MANIFEST.json, written last and listing every file's sha256, exists.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path

from ilf import config
from ilf.errors import AlreadyExists, IlfError, InvalidArgument, NotFound, Unavailable

MANIFEST = "MANIFEST.json"


class CorruptArtifact(IlfError):
    code_name = "DATA_LOSS"


class ArtifactStore(ABC):
    url: str

    @abstractmethod
    def put(self, key: str, data: bytes, *, overwrite: bool = False) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under prefix, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Removes a key (gone already is fine): only for the few objects that describe the present, such as
        replica reports, never for artifacts."""

    def put_json(self, key: str, value, *, overwrite: bool = False) -> None:
        self.put(key, json.dumps(value, indent=2, sort_keys=True).encode(), overwrite=overwrite)

    def get_json(self, key: str):
        return json.loads(self.get(key))

    def publish_dir(self, prefix: str, local_dir: Path, info: dict | None = None) -> dict:
        """Uploads every file under local_dir, then the manifest that makes them visible."""
        prefix = prefix.rstrip("/")
        if self.exists(f"{prefix}/{MANIFEST}"):
            raise AlreadyExists(f"artifact {prefix} already exists")
        files = {}
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            data = path.read_bytes()
            self.put(f"{prefix}/{rel}", data, overwrite=True)  # invisible until the manifest exists
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        manifest = {"files": files, "info": info or {}, "published_at": time.time()}
        self.put_json(f"{prefix}/{MANIFEST}", manifest)
        return manifest

    def read_manifest(self, prefix: str) -> dict:
        try:
            return self.get_json(f"{prefix.rstrip('/')}/{MANIFEST}")
        except NotFound:
            raise NotFound(f"artifact {prefix} does not exist (no manifest)") from None

    def fetch_dir(self, prefix: str, local_dir: Path) -> dict:
        """Downloads a published folder, checking every file against the manifest."""
        prefix = prefix.rstrip("/")
        manifest = self.read_manifest(prefix)
        local_dir = Path(local_dir)
        for rel, meta in manifest["files"].items():
            target = local_dir / rel
            if target.exists() and _sha256_file(target) == meta["sha256"]:
                continue
            data = self.get(f"{prefix}/{rel}")
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CorruptArtifact(f"{prefix}/{rel} does not match its manifest checksum")
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(target, data)
        return manifest


def _checked_key(key: str) -> str:
    """Keys often come from requests: refuse the ones no store can hold, as the caller's error."""
    if not key or "\x00" in key or len(key.encode()) > 1024:
        raise InvalidArgument(f"artifact key {key[:100]!r} is empty, too long or contains a NUL character")
    return key


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(target: Path, data: bytes, *, overwrite: bool = True) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if target exists, so no writer ever replaces an artifact
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / _checked_key(key)).resolve()
        if self.root not in path.parents:
            raise InvalidArgument(f"artifact key {key!r} leaves the store")
        return path

    def put(self, key, data, *, overwrite=False):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _atomic_write(path, data, overwrite=overwrite)
        except FileExistsError:
            raise AlreadyExists(f"artifact {key} already exists and artifacts are immutable") from None

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"artifact {key} does not exist") from None

    def exists(self, key):
        return self._path(key).is_file()

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix):
        base = self.root
        return sorted(
            p.relative_to(base).as_posix() for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-") and p.relative_to(base).as_posix().startswith(prefix)
        )


# S3 error codes that say "try again", as opposed to answers about the object itself.
_TRANSIENT_S3_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerError")


class S3Store(ArtifactStore):
    """A bucket on S3 or MinIO through the minio SDK; each request is retried while the server is unreachable.

    Retrying one request is safe: every write is a whole object, so a repeated PUT stores the same bytes.
    """

    def __init__(self, bucket: str, endpoint: str, access_key: str, secret_key: str, *,
                 secure: bool = False, region: str = "us-east-1", prefix: str = "", retry_s: float | None = None):
        from minio import Minio
        from minio.error import S3Error
        self._s3_error = S3Error
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        self.bucket, self.endpoint = bucket, endpoint
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.retry_s = float(config.get("ILF_S3_RETRY_S")) if retry_s is None else retry_s
        if not self._retrying(lambda: self.client.bucket_exists(bucket)):
            self._retrying(lambda: self.client.make_bucket(bucket))

    def _key(self, key: str) -> str:
        return self.prefix + _checked_key(key)

    def _transient(self, error: Exception) -> bool:
        from minio.error import ServerError
        from urllib3.exceptions import HTTPError
        if isinstance(error, self._s3_error):
            return error.code in _TRANSIENT_S3_CODES
        return isinstance(error, (ServerError, HTTPError, ConnectionError, TimeoutError))

    def _retrying(self, operation):
        """operation(), retried with exponential backoff for up to retry_s while the server is unreachable."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.25
        while True:
            try:
                return operation()
            except Exception as error:  # noqa: BLE001 - sorted by _transient
                if not self._transient(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise Unavailable(f"object store {self.endpoint} unreachable for "
                                      f"{self.retry_s:.0f} s: {type(error).__name__}: {error}") from error
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def put(self, key, data, *, overwrite=False):
        if not overwrite and self.exists(key):
            raise AlreadyExists(f"artifact {key} already exists and artifacts are immutable")
        self._retrying(lambda: self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data)))

    def get(self, key):
        def read():
            response = self.client.get_object(self.bucket, self._key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        try:
            return self._retrying(read)
        except self._s3_error as error:
            if error.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"artifact {key} does not exist") from None
            raise

    def exists(self, key):
        try:
            self._retrying(lambda: self.client.stat_object(self.bucket, self._key(key)))
            return True
        except self._s3_error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def list(self, prefix):
        def names():
            return [o.object_name for o in self.client.list_objects(self.bucket, prefix=self.prefix + prefix,
                                                                    recursive=True)]
        return sorted(name[len(self.prefix):] for name in self._retrying(names))

    def delete(self, key):
        self._retrying(lambda: self.client.remove_object(self.bucket, self._key(key)))


def open_store(url: str | None = None) -> ArtifactStore:
    """The store named by url (default ILF_STORE): file:///path or s3://bucket/optional/prefix."""
    url = url or config.get("ILF_STORE")
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme else url)
    if parsed.scheme == "s3":
        endpoint = config.get("ILF_S3_ENDPOINT")
        if not endpoint:
            raise ValueError("an s3:// store needs ILF_S3_ENDPOINT (host:port)")
        return S3Store(parsed.netloc, endpoint, config.get("ILF_S3_ACCESS_KEY"), config.get("ILF_S3_SECRET_KEY"),
                       secure=config.get("ILF_S3_SECURE"), region=config.get("ILF_S3_REGION"),
                       prefix=parsed.path)
    raise ValueError(f"unknown store URL scheme in {url!r}")
