"""Server and client plumbing shared by every service: health, reflection, error mapping."""
from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ilf import auth, config, tls
from ilf.errors import IlfError, InvalidArgument

log = logging.getLogger(__name__)


def channel_options() -> list[tuple[str, int]]:
    """Larger messages are refused with RESOURCE_EXHAUSTED before any handler runs."""
    limit = int(config.get("ILF_GRPC_MAX_MESSAGE_BYTES"))
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


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


class Server:
    """A gRPC server with health checking, reflection, authentication, TLS and the error interceptor."""

    def __init__(self, service_names: Iterable[str], port: int, *, host: str | None = None,
                 max_workers: int = 32, interceptors: Iterable[grpc.ServerInterceptor] = ()):
        self.service_names = list(service_names)
        host = host or config.get("ILF_BIND_HOST")
        credentials = tls.server_credentials()
        # Checked first, so a refused call never reaches (or parses for) the service.
        authenticate = [checker] if (checker := auth.server_interceptor(host)) else []
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=[*authenticate, *interceptors, ErrorInterceptor()],
            # Without SO_REUSEPORT a second server on a taken port fails instead of silently sharing it.
            options=[*channel_options(), ("grpc.so_reuseport", 0)])
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc_server)
        address = f"{host}:{port}"
        try:
            self.port = (self.grpc_server.add_secure_port(address, credentials) if credentials
                         else self.grpc_server.add_insecure_port(address))
        except RuntimeError as error:  # grpc's way of saying the address is taken
            raise OSError(f"cannot listen on {address}: {error}") from None
        self.set_serving(False)

    def add(self, add_to_server: Callable, servicer) -> None:
        add_to_server(servicer, self.grpc_server)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def start(self) -> None:
        self.grpc_server.start()
        log.info("serving %s on port %d", ", ".join(self.service_names), self.port)

    def run_until_signal(self, on_stop: Callable[[], None] | None = None) -> None:
        """Serves until SIGTERM or SIGINT, then drains in-flight calls for up to 10 s."""
        stopped = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopped.set())
        self.start()
        stopped.wait()
        self.set_serving(False)
        if on_stop:
            on_stop()
        self.grpc_server.stop(grace=10).wait()


def channel(address: str) -> grpc.Channel:
    """A channel with the TLS and bearer token the settings give (ILF_TLS_*, ILF_AUTH_TOKEN)."""
    credentials = tls.channel_credentials()
    plain = (grpc.secure_channel(address, credentials, options=channel_options()) if credentials
             else grpc.insecure_channel(address, options=channel_options()))
    return auth.client_channel(plain)


def wait_healthy(address: str, timeout_s: float = 120.0, service: str = "") -> None:
    """Blocks until the server at address reports SERVING, or raises TimeoutError."""
    import time
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


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
