"""Server and client plumbing shared by every service: health, reflection, error mapping."""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from ilf import auth, config, metrics, tls
from ilf.errors import IlfError, InvalidArgument

log = logging.getLogger(__name__)


def channel_options() -> list[tuple[str, int]]:
    """Larger messages are refused with RESOURCE_EXHAUSTED before any handler runs."""
    limit = int(config.get("ILF_GRPC_MAX_MESSAGE_BYTES"))
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


# Calls a client may safely send again when a replica goes away before answering: they read, or they write
# what their content names (the same feedback is one record, the same tasks one task set).
IDEMPOTENT_METHODS = {
    "ilf.v1.Generation": ("Generate", "GenerateStream", "LoadModel", "GetModelStatus"),
    "ilf.v1.Refinement": ("Refine", "GetModelStatus"),
    "ilf.v1.Execution": ("Execute", "ExecuteBatch", "GetSandboxInfo"),
    "ilf.v1.Training": ("GetRun", "WatchRun", "ListRuns"),
    "ilf.v1.Feedback": ("SubmitFeedback", "GetFeedback", "ListFeedback", "ExportDataset", "ImportPaperAnnotations",
                        "ImportTaskSet", "GetTaskSet", "ListTaskSets", "ListQueue"),
    "grpc.health.v1.Health": ("Check",),
}
# CANCELLED too: a server that stops kills the calls that reached it but no handler yet, and the client sees
# CANCELLED, not UNAVAILABLE (seen in CI: one of ~40 calls while a replica stopped under load). A call the client
# itself cancels is never retried, so for these methods CANCELLED from the server only means "send it again".
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
# Per-call balancing: every replica behind the name (a headless Service's pod addresses) gets its share of
# calls, instead of one long-lived HTTP/2 connection carrying all of them to one pod. Throttling stops retrying
# while most calls fail (a service that is down, not one replica going away), so retries never pile up.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": service, "method": method} for service, names in IDEMPOTENT_METHODS.items()
                               for method in names],
                      "retryPolicy": RETRY_POLICY}],
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}
# Target schemes gRPC resolves itself; any other address is a host:port for the DNS resolver.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def client_target(address: str) -> str:
    """`host:port` as `dns:///host:port`, which re-resolves the name to all its addresses; schemes stay."""
    return address if address.startswith(_SCHEMES) else f"dns:///{address}"


def client_options() -> list[tuple[str, int | str]]:
    """What every caller dials with: message limits, round_robin and retries of idempotent calls."""
    limit = int(config.get("ILF_GRPC_MAX_MESSAGE_BYTES"))
    # A call is retried only while its request fits the retry buffer; ours may be as large as a message.
    return [*channel_options(), ("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1),
            ("grpc.per_rpc_retry_buffer_size", limit)]


def _abort(context: grpc.ServicerContext, error: Exception):
    if isinstance(error, IlfError):
        context.abort(getattr(grpc.StatusCode, error.code_name), str(error))
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class _Unparsable:
    """Stands in for a request protobuf could not parse, so it gets INVALID_ARGUMENT, not gRPC's INTERNAL."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, or anything else protobuf raises
            return _Unparsable(error)
    return parse if deserializer else None


def _parsed(request):
    if isinstance(request, _Unparsable):
        raise InvalidArgument(f"the request could not be parsed (strings must be valid UTF-8): {request.error}")
    return request


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns the plain functions' exceptions, and unparsable requests, into gRPC statuses with their message."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                try:
                    return inner(_parsed(request), context)
                except Exception as error:  # noqa: BLE001 - every error becomes a status
                    if isinstance(error, grpc.RpcError) or context.code() is not None:
                        raise
                    _abort(context, error)
            return grpc.unary_unary_rpc_method_handler(
                unary, _tolerant(handler.request_deserializer), handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                try:
                    yield from inner_stream(_parsed(request), context)
                except Exception as error:  # noqa: BLE001
                    if isinstance(error, grpc.RpcError) or context.code() is not None:
                        raise
                    _abort(context, error)
            return grpc.unary_stream_rpc_method_handler(
                stream, _tolerant(handler.request_deserializer), handler.response_serializer)
        return handler


@dataclass(frozen=True)
class ServerConfig(config.Section):
    """What every gRPC server of the system shares."""
    LABEL: ClassVar[str] = "server"
    bind_host: str = config.setting("ILF_BIND_HOST")
    workers: int = config.setting("ILF_GRPC_WORKERS")
    max_probe_streams: int = config.setting("ILF_GRPC_MAX_PROBE_STREAMS")
    max_probe_streams_per_peer: int = config.setting("ILF_GRPC_MAX_PROBE_STREAMS_PER_PEER")
    drain_s: float = config.setting("ILF_GRPC_DRAIN_S")
    max_connection_age_s: float = config.setting("ILF_GRPC_MAX_CONNECTION_AGE_S")
    metrics_port: int | None = config.setting("ILF_METRICS_PORT")


# Health checking and reflection need no token, so without a bound of their own a stranger's open Health.Watch
# streams could hold every worker thread and starve authenticated calls.
PROBE_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)


class ProbeLimit(grpc.ServerInterceptor):
    """Bounds concurrent health and reflection streams, in all and per peer; beyond it they get RESOURCE_EXHAUSTED.

    The server has that many threads more than `workers`, so probes never take capacity from real calls."""

    def __init__(self, total: int, per_peer: int):
        self.total, self.per_peer = total, per_peer
        self.lock = threading.Lock()
        self.active: dict[str, int] = {}

    @contextlib.contextmanager
    def _slot(self, context):
        peer = context.peer().rsplit(":", 1)[0]   # the host: one client opening many connections is one peer
        with self.lock:
            admitted = sum(self.active.values()) < self.total and self.active.get(peer, 0) < self.per_peer
            if admitted:
                self.active[peer] = self.active.get(peer, 0) + 1
        if not admitted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many health or reflection streams (at most {self.total} in all and {self.per_peer} "
                          "per peer: ILF_GRPC_MAX_PROBE_STREAMS, ILF_GRPC_MAX_PROBE_STREAMS_PER_PEER)")
        try:
            yield
        finally:
            with self.lock:
                self.active[peer] -= 1
                if not self.active[peer]:
                    del self.active[peer]

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.lstrip("/").startswith(PROBE_SERVICES):
            return handler
        # Only streams can hold a thread for long; a unary Check is answered at once.
        kind = "unary_stream" if handler.unary_stream else "stream_stream" if handler.stream_stream else None
        if kind is None:
            return handler
        inner = getattr(handler, kind)

        def stream(request, context):
            with self._slot(context):
                yield from inner(request, context)
        return getattr(grpc, f"{kind}_rpc_method_handler")(stream, handler.request_deserializer,
                                                           handler.response_serializer)


class Reflection(reflection.ReflectionServicer):
    """Server reflection that also resolves method names (`grpcurl describe ilf.v1.Execution.Execute`): protobuf's
    upb descriptor pool finds services and messages by symbol but not methods, so a method resolves to the file of
    its service."""

    def _file_containing_symbol(self, request, fully_qualified_name):
        try:
            method = self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            return super()._file_containing_symbol(request, fully_qualified_name)
        return super()._file_containing_symbol(request, method.containing_service.full_name)


class Service:
    """What a Server hosts; every service has the same lifecycle.

    start: the port is bound and health answers NOT_SERVING; `load()` runs in the background (a model, the
    sandbox workers, run monitoring); SERVING once it returns, and the process exits non-zero if it raises.
    stop: NOT_SERVING, in-flight calls drain for ILF_GRPC_DRAIN_S, then `close()`.
    """
    names: tuple[str, ...] = ()

    def add_to(self, grpc_server: grpc.Server) -> None:
        raise NotImplementedError

    def load(self) -> str:
        """Blocks until the service can answer calls; returns what it loaded, for the `ready` log line."""
        return ""

    def close(self) -> None:
        """Stops what the service runs besides its gRPC handlers."""


class Server:
    """A gRPC server with health checking, reflection, authentication, TLS, metrics, the error interceptor and the
    probe limit, around one Service."""

    def __init__(self, service: Service, config_of_service: config.Section, port: int | None = None, *,
                 interceptors: Iterable[grpc.ServerInterceptor] = ()):
        """`config_of_service` is the service's frozen config object: its `port` (unless `port` is given) and its
        `server` settings are used here, and all of it is logged once, as the first line of the start."""
        log.info("%s", config_of_service.describe())
        port = config_of_service.port if port is None else port
        self.service = service
        self.settings: ServerConfig = config_of_service.server
        self.service_names = list(service.names)
        host = self.settings.bind_host
        credentials = tls.server_credentials()
        # Checked first, so a refused call never reaches (or parses for) the service.
        authenticate = [checker] if (checker := auth.server_interceptor(host)) else []
        probes = ProbeLimit(self.settings.max_probe_streams, self.settings.max_probe_streams_per_peer)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.settings.workers + self.settings.max_probe_streams),
            interceptors=[metrics.MetricsInterceptor(), probes, *authenticate, *interceptors, ErrorInterceptor()],
            # Without SO_REUSEPORT a second server on a taken port fails instead of silently sharing it.
            options=[*channel_options(), ("grpc.so_reuseport", 0),
                     ("grpc.max_connection_age_ms", int(self.settings.max_connection_age_s * 1000))])
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            Reflection([*self.service_names, *PROBE_SERVICES], pool=descriptor_pool.Default()), self.grpc_server)
        self.address = f"{host}:{port}"
        try:
            self.port = (self.grpc_server.add_secure_port(self.address, credentials) if credentials
                         else self.grpc_server.add_insecure_port(self.address))
        except RuntimeError as error:  # grpc's way of saying the address is taken
            raise OSError(f"cannot listen on {self.address}: {error}") from None
        self.security = f"TLS {'on' if credentials else 'off'}, auth {'on' if authenticate else 'off'}"
        service.add_to(self.grpc_server)
        self.set_serving(False)
        self.ready = threading.Event()
        self.metrics_port: int | None = None   # set by start() when ILF_METRICS_PORT is
        self.load_failed: BaseException | None = None
        self._ended = threading.Event()   # loaded or failed

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def start(self) -> None:
        if self.settings.metrics_port is not None:
            self.metrics_port = metrics.serve_http(self.settings.metrics_port, self.settings.bind_host)
        self.grpc_server.start()
        log.info("listening on %s:%d (%s) for %s", self.settings.bind_host, self.port, self.security,
                 ", ".join(self.service_names))
        threading.Thread(target=self._load, name="load", daemon=True).start()

    def _load(self) -> None:
        started = time.monotonic()
        log.info("loading")
        try:
            loaded = self.service.load()
        except Exception as error:  # noqa: BLE001 - one line says why; run_until_signal exits non-zero
            self.load_failed = error
            log.error("cannot serve: %s", error)
            log.debug("load failure", exc_info=True)
        else:
            self.set_serving(True)
            self.ready.set()
            log.info("ready after %.1f s%s", time.monotonic() - started, f": {loaded}" if loaded else "")
        self._ended.set()

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, in-flight calls drain for `grace` seconds (default ILF_GRPC_DRAIN_S), then the service closes."""
        grace = self.settings.drain_s if grace is None else grace
        log.info("draining for up to %.0f s", grace)
        self.set_serving(False)
        self.grpc_server.stop(grace).wait()
        self.service.close()
        log.info("stopped")

    def run_until_signal(self) -> int:
        """Serves until SIGTERM or SIGINT (exit status 0) or until the service fails to load (status 1)."""
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        self.start()
        while not stopping.wait(0.5):
            if self._ended.is_set() and self.load_failed:
                break
        self.stop()
        return 1 if self.load_failed else 0


def serve(build: Callable[[], Server]) -> None:
    """A service's main: logging, the server built from its settings (a bad setting is one line and status 2),
    then served until a signal; exits with the server's status."""
    setup_logging()
    try:
        server = build()
    except (config.ConfigError, OSError, ValueError, RuntimeError) as error:
        log.error("cannot start: %s", error)
        sys.exit(2)
    sys.exit(server.run_until_signal())


def channel(address: str) -> grpc.Channel:
    """The one way callers dial a service: TLS and bearer token as the settings give (ILF_TLS_*, ILF_AUTH_TOKEN),
    the name resolved to every replica, calls balanced round-robin and idempotent ones retried (client_options)."""
    credentials = tls.channel_credentials()
    target, options = client_target(address), client_options()
    plain = (grpc.secure_channel(target, credentials, options=options) if credentials
             else grpc.insecure_channel(target, options=options))
    return auth.client_channel(plain)


def wait_healthy(address: str, timeout_s: float = 120.0, service: str = "") -> None:
    """Blocks until the server at address reports SERVING, or raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not serving after {timeout_s:.0f} s")
            time.sleep(0.2)


def free_port() -> int:
    """A TCP port free on loopback right now (for local deployments, tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timestamp(unix_seconds: float | None) -> Timestamp | None:
    """A contract Timestamp (RFC 3339 in JSON, as grpcurl prints it); None (unset) for no time."""
    if not unix_seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix_seconds * 1e9))
    return stamp


def unix_seconds(stamp: Timestamp) -> float:
    """Seconds since the epoch of a Timestamp field; 0.0 when unset."""
    return stamp.ToNanoseconds() / 1e9


def setup_logging() -> None:
    """INFO lines on stderr; `force`, because `ilf serve` has already set up quieter logging for its own use."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
