"""Prometheus metrics: the per-RPC interceptor every Server adds, values read at scrape time, the HTTP port.

Each process serves the standard text format on one port (ILF_METRICS_PORT, started by the Server). Names
follow Prometheus conventions with an `ilf_` prefix: counters end in `_total`, durations are seconds, sizes
bytes. Services define their own metrics in services/<name>/metrics.py with prometheus_client's classes, and
`Sampled` for values that live in an object (a queue length, a pool's restarts) and are read when scraped.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import defaultdict
from typing import Any, Callable

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# Latency buckets from a health check (milliseconds) to a long evaluation batch (many minutes).
RPC_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)

RPCS_HANDLED = Counter("ilf_grpc_server_handled", "gRPC calls finished, by service, method and status code.",
                       ["grpc_service", "grpc_method", "grpc_code"])
RPC_DURATION = Histogram("ilf_grpc_server_handling_seconds", "Time from a call's arrival to its last message.",
                         ["grpc_service", "grpc_method"], buckets=RPC_SECONDS)
RPCS_IN_FLIGHT = Gauge("ilf_grpc_server_in_flight", "gRPC calls running now.", ["grpc_service", "grpc_method"])


class Sampled:
    """A metric family whose values are read from live objects when Prometheus scrapes.

    `read(obj)` returns a number, or {label values: number}; the values of every tracked object are summed
    (a process normally has one of each; tests may run several). Objects are held weakly, so a closed
    service's object drops out by itself.
    """

    def __init__(self, name: str, documentation: str, read: Callable[[Any], float | dict[tuple[str, ...], float]],
                 *, labels: tuple[str, ...] = (), counter: bool = False, registry=REGISTRY):
        self.name, self.documentation, self.read, self.labels, self.counter = name, documentation, read, labels, counter
        self._objects: weakref.WeakSet = weakref.WeakSet()
        registry.register(self)

    def track(self, obj) -> None:
        self._objects.add(obj)

    def _family(self):
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        return kind(self.name, self.documentation, labels=list(self.labels))

    def describe(self):
        return [self._family()]

    def collect(self):
        totals: dict[tuple[str, ...], float] = defaultdict(float)
        for obj in list(self._objects):
            try:
                value = self.read(obj)
            except Exception:  # noqa: BLE001 - a scrape must not fail because one object is half closed
                log.debug("reading %s failed", self.name, exc_info=True)
                continue
            for key, number in (value.items() if isinstance(value, dict) else [((), value)]):
                totals[key] += number
        family = self._family()
        for key, number in sorted(totals.items()):
            family.add_metric(list(key), number)
        yield family


def track(obj, families: tuple[Sampled, ...]) -> None:
    """Reads obj's values into each of the families from now on."""
    for family in families:
        family.track(obj)


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _code(context: grpc.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    if isinstance(error, GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name if error is not None else grpc.StatusCode.OK.name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by final status code and times it; the outermost interceptor, so refused calls count."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        inner = getattr(handler, kind)

        def finished(context, started: float, error: BaseException | None) -> None:
            RPCS_IN_FLIGHT.labels(service, method).dec()
            RPC_DURATION.labels(service, method).observe(time.perf_counter() - started)
            RPCS_HANDLED.labels(service, method, _code(context, error)).inc()

        def unary(request, context):
            RPCS_IN_FLIGHT.labels(service, method).inc()
            started, error = time.perf_counter(), None
            try:
                return inner(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                finished(context, started, error)

        def stream(request, context):
            RPCS_IN_FLIGHT.labels(service, method).inc()
            started, error = time.perf_counter(), None
            try:
                yield from inner(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                finished(context, started, error)
        return getattr(grpc, f"{kind}_rpc_method_handler")(stream if kind.endswith("_stream") else unary,
                                                           handler.request_deserializer, handler.response_serializer)


_http_lock = threading.Lock()
_http_port: int | None = None


def serve_http(port: int, host: str) -> int:
    """Starts the process's /metrics endpoint once (a second Server in the process shares it); returns its port."""
    global _http_port
    with _http_lock:
        if _http_port is None:
            server, _ = start_http_server(port, addr=host)
            _http_port = server.server_port
            log.info("metrics on http://%s:%d/metrics", host, _http_port)
        elif port not in (0, _http_port):
            log.warning("metrics already served on port %d; not also on %d", _http_port, port)
        return _http_port
