"""Authentication, roles, TLS and mutual TLS, and the message size limit, on real service servers."""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ilf import auth
from conftest import empty_server
from ilf.grpc_util import Server, channel
from ilf.v1 import execution_pb2, execution_pb2_grpc, training_pb2, training_pb2_grpc
from services.execution.executor import Executor
from services.execution.server import build_server as build_execution
from services.training.server import build_server as build_training

CLIENT_TOKEN = "client-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"
DOUBLE = "def double(x):\n    return x * 2\n"


@pytest.fixture
def tokens_file(tmp_path, monkeypatch):
    path = tmp_path / "tokens"
    path.write_text(f"# token role name\n{CLIENT_TOKEN} client team-a\n{OPERATOR_TOKEN} operator ops\n")
    monkeypatch.setenv("ILF_AUTH_TOKENS_FILE", str(path))
    return path


@pytest.fixture(scope="module")
def executor():
    running = Executor()
    yield running
    running.close()


def serve(server: Server):
    server.start()
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def training(ilf_env, tokens_file):
    server = build_training(0)
    yield serve(server)
    server.stop(0)


@pytest.fixture
def execution(executor, tokens_file):
    server = build_execution(0, executor)
    yield serve(server)
    server.stop(0)


def call_code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def with_token(monkeypatch, address: str, token: str | None) -> grpc.Channel:
    if token is None:
        monkeypatch.delenv("ILF_AUTH_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ILF_AUTH_TOKEN", token)
    return channel(address)


def test_role_table_covers_every_rpc_and_closes_unknown_ones():
    from ilf.v1 import common_pb2  # noqa: F401 - the services' files import it
    from ilf.v1 import generation_pb2, refinement_pb2
    roles = {f"{s.full_name}/{m.name}": auth.required_role(f"/{s.full_name}/{m.name}")
             for module in (generation_pb2, refinement_pb2, execution_pb2, training_pb2)
             for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert {m for m, role in roles.items() if role == "client"} == {
        "ilf.v1.Generation/Generate", "ilf.v1.Generation/GenerateStream", "ilf.v1.Generation/GetModelStatus",
        "ilf.v1.Refinement/Refine", "ilf.v1.Refinement/GetModelStatus", "ilf.v1.Execution/Execute",
        "ilf.v1.Execution/ExecuteBatch", "ilf.v1.Execution/GetSandboxInfo"}
    assert roles["ilf.v1.Generation/SwitchModel"] == roles["ilf.v1.Training/SubmitRun"] == "operator"
    assert auth.required_role("/ilf.v1.Feedback/SubmitFeedback") == "client"
    assert auth.required_role("/ilf.v1.Feedback/ExportDataset") == "operator"
    assert auth.required_role("/ilf.v1.Generation/SomethingNew") == "operator"
    assert auth.required_role("/grpc.health.v1.Health/Check") is None


def test_tokens_file_formats_and_errors():
    as_lines = auth.parse_tokens(f"{CLIENT_TOKEN} client team-a\n\n# comment\n{OPERATOR_TOKEN} operator\n")
    as_json = auth.parse_tokens(json.dumps({"tokens": [{"token": CLIENT_TOKEN, "role": "client", "name": "team-a"},
                                                       {"token": OPERATOR_TOKEN, "role": "operator"}]}))
    assert as_lines == as_json == [(CLIENT_TOKEN, auth.Caller("team-a", "client")),
                                   (OPERATOR_TOKEN, auth.Caller("operator-2", "operator"))]
    with pytest.raises(ValueError, match="role must be one of"):
        auth.parse_tokens(f"{CLIENT_TOKEN} admin")
    with pytest.raises(ValueError, match="at least 16 characters"):
        auth.parse_tokens("short client")


def test_missing_wrong_and_insufficient_tokens(training, execution, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    list_runs = training_pb2.ListRunsRequest()
    for token, code in [(None, grpc.StatusCode.UNAUTHENTICATED), ("not-a-known-token-at-all", grpc.StatusCode.UNAUTHENTICATED),
                        (CLIENT_TOKEN, grpc.StatusCode.PERMISSION_DENIED), (OPERATOR_TOKEN, grpc.StatusCode.OK)]:
        with with_token(monkeypatch, training, token) as ch:
            assert call_code(lambda: training_pb2_grpc.TrainingStub(ch).ListRuns(list_runs, timeout=10)) == code
    run = execution_pb2.ExecuteRequest(program=DOUBLE, tests=["assert double(2) == 4"])
    for token, code in [(None, grpc.StatusCode.UNAUTHENTICATED), (CLIENT_TOKEN, grpc.StatusCode.OK),
                        (OPERATOR_TOKEN, grpc.StatusCode.OK)]:
        with with_token(monkeypatch, execution, token) as ch:
            assert call_code(lambda: execution_pb2_grpc.ExecutionStub(ch).Execute(run, timeout=30)) == code
    # a streaming RPC is refused the same way
    with with_token(monkeypatch, execution, None) as ch:
        batch = execution_pb2.ExecuteBatchRequest(requests=[run])
        assert call_code(lambda: list(execution_pb2_grpc.ExecutionStub(ch).ExecuteBatch(batch, timeout=30))) \
            == grpc.StatusCode.UNAUTHENTICATED
    # health and reflection need no token
    with with_token(monkeypatch, training, None) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        answers = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert "ilf.v1.Training" in {s.name for s in next(answers).list_services_response.service}
    assert CLIENT_TOKEN not in caplog.text and OPERATOR_TOKEN not in caplog.text


def test_permission_denied_names_the_role_not_the_token(training, monkeypatch):
    with with_token(monkeypatch, training, CLIENT_TOKEN) as ch:
        with pytest.raises(grpc.RpcError) as error:
            training_pb2_grpc.TrainingStub(ch).SubmitRun(training_pb2.SubmitRunRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator role" in error.value.details() and "team-a" in error.value.details()
    assert CLIENT_TOKEN not in error.value.details()


def test_rotated_tokens_file_takes_effect_without_restart(training, tokens_file, monkeypatch):
    new_token = "rotated-operator-token-0123456789"
    tokens_file.write_text(f"{new_token} operator\n")
    for token, code in [(OPERATOR_TOKEN, grpc.StatusCode.UNAUTHENTICATED), (new_token, grpc.StatusCode.OK)]:
        with with_token(monkeypatch, training, token) as ch:
            assert call_code(lambda: training_pb2_grpc.TrainingStub(ch).ListRuns(
                training_pb2.ListRunsRequest(), timeout=10)) == code


def test_refuses_to_serve_beyond_loopback_without_a_decision(ilf_env, monkeypatch, tokens_file):
    monkeypatch.delenv("ILF_AUTH_TOKENS_FILE")
    with pytest.raises(RuntimeError, match="without authentication"):
        empty_server(host="0.0.0.0")
    monkeypatch.setenv("ILF_AUTH", "on")
    with pytest.raises(RuntimeError, match="without authentication"):
        empty_server(host="127.0.0.1")
    monkeypatch.setenv("ILF_AUTH", "off")
    empty_server(host="0.0.0.0").stop(0)
    monkeypatch.setenv("ILF_AUTH", "auto")
    empty_server(host="127.0.0.1").stop(0)  # loopback: only local processes connect


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all made here."""
    folder = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", "/CN=ilf-test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=folder)
    for name, extensions in [("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")]:
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)
        (folder / f"{name}.ext").write_text(extensions + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-out", f"{name}.pem", *(["-extfile", f"{name}.ext"] if extensions else []), cwd=folder)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", "/CN=someone-else", "-keyout", "other-ca.key", "-out", "other-ca.pem", cwd=folder)
    return folder


def tls_env(monkeypatch, folder: Path, name: str | None, ca: str = "ca.pem") -> None:
    monkeypatch.setenv("ILF_TLS_CA", str(folder / ca))
    for setting, suffix in [("ILF_TLS_CERT", "pem"), ("ILF_TLS_KEY", "key")]:
        if name:
            monkeypatch.setenv(setting, str(folder / f"{name}.{suffix}"))
        else:
            monkeypatch.delenv(setting, raising=False)


def health_code(address: str) -> grpc.StatusCode:
    with channel(address) as ch:
        return call_code(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5))


@pytest.mark.parametrize("client_auth", ["none", "required"])
def test_tls_and_mutual_tls(executor, certificates, monkeypatch, client_auth):
    monkeypatch.setenv("ILF_TLS_CLIENT_AUTH", client_auth)
    tls_env(monkeypatch, certificates, "server")
    server = build_execution(0, executor)
    address = serve(server)
    try:
        tls_env(monkeypatch, certificates, "client")
        assert health_code(address) == grpc.StatusCode.OK
        with channel(address) as ch:
            reply = execution_pb2_grpc.ExecutionStub(ch).Execute(
                execution_pb2.ExecuteRequest(program=DOUBLE, tests=["assert double(2) == 4"]), timeout=30)
            assert reply.passed
        tls_env(monkeypatch, certificates, None)  # TLS without a client certificate
        assert health_code(address) == (grpc.StatusCode.OK if client_auth == "none" else grpc.StatusCode.UNAVAILABLE)
        tls_env(monkeypatch, certificates, "client", ca="other-ca.pem")  # a server we do not trust
        assert health_code(address) == grpc.StatusCode.UNAVAILABLE
        for setting in ("ILF_TLS_CA", "ILF_TLS_CERT", "ILF_TLS_KEY"):  # plaintext against a TLS server
            monkeypatch.delenv(setting)
        assert health_code(address) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_tokens_over_mutual_tls(executor, certificates, tokens_file, monkeypatch):
    monkeypatch.setenv("ILF_TLS_CLIENT_AUTH", "required")
    tls_env(monkeypatch, certificates, "server")
    server = build_execution(0, executor)
    address = serve(server)
    try:
        tls_env(monkeypatch, certificates, "client")
        from loop.clients import Clients
        for token, code in [(None, grpc.StatusCode.UNAUTHENTICATED), (CLIENT_TOKEN, grpc.StatusCode.OK)]:
            if token:
                monkeypatch.setenv("ILF_AUTH_TOKEN", token)
            stub = Clients.connect(execution=address).execution
            assert call_code(lambda: stub.GetSandboxInfo(execution_pb2.GetSandboxInfoRequest(), timeout=10)) == code
    finally:
        server.stop(0)


def test_oversized_messages_are_resource_exhausted(executor, monkeypatch):
    monkeypatch.setenv("ILF_GRPC_MAX_MESSAGE_BYTES", "4096")
    server = build_execution(0, executor)
    address = serve(server)
    monkeypatch.setenv("ILF_GRPC_MAX_MESSAGE_BYTES", str(1 << 20))  # the client may send it; the server refuses
    try:
        with channel(address) as ch:
            stub = execution_pb2_grpc.ExecutionStub(ch)
            with pytest.raises(grpc.RpcError) as error:
                stub.Execute(execution_pb2.ExecuteRequest(program="x = 1\n" * 2000, tests=["assert x"]), timeout=30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Execute(execution_pb2.ExecuteRequest(program="x = 1\n", tests=["assert x"]), timeout=30).passed
    finally:
        server.stop(0)
