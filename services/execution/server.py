"""gRPC front of the execution service: converts messages and delegates to the Executor."""
from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from ilf.errors import InvalidArgument
from ilf.grpc_util import Server, Service, serve
from ilf.metrics import track
from ilf.v1 import execution_pb2, execution_pb2_grpc
from services.execution import metrics
from services.execution.executor import Executor, Outcome, Program, Settings, Verdict

log = logging.getLogger(__name__)

SERVICE_NAME = execution_pb2.DESCRIPTOR.services_by_name["Execution"].full_name
VERDICTS = {
    Verdict.PASSED: execution_pb2.VERDICT_PASSED, Verdict.FAILED: execution_pb2.VERDICT_FAILED,
    Verdict.ERROR: execution_pb2.VERDICT_ERROR, Verdict.TIMEOUT: execution_pb2.VERDICT_TIMEOUT,
}


class UnreadableRequest:
    """Stands in for a request protobuf could not parse (non-UTF-8 in a string field, say),
    so the handler can answer INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    def __init__(self, error: Exception):
        self.error = error


def lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return UnreadableRequest(error)
    return parse


def to_program(request: execution_pb2.ExecuteRequest) -> Program:
    return Program(program=request.program, tests=list(request.tests), test_setup_code=request.test_setup_code,
                   timeout_s=request.timeout_s, memory_mb=request.memory_mb, request_id=request.request_id)


def to_response(outcome: Outcome) -> execution_pb2.ExecuteResponse:
    metrics.record(outcome)   # every outcome the service sends passes here, from Execute and ExecuteBatch
    return execution_pb2.ExecuteResponse(
        request_id=outcome.request_id, passed=outcome.passed, duration_s=outcome.duration_s,
        stdout=outcome.stdout, stderr=outcome.stderr, output_truncated=outcome.output_truncated,
        error_type=outcome.error_type, error_message=outcome.error_message,
        tests=[execution_pb2.TestResult(index=t.index, verdict=VERDICTS[t.verdict], error_type=t.error_type,
                                        error_message=t.error_message, duration_s=t.duration_s,
                                        actual=t.actual, expected=t.expected)
               for t in outcome.tests])


def readable(request):
    if isinstance(request, UnreadableRequest):
        raise InvalidArgument(f"request could not be parsed (strings must be valid UTF-8): {request.error}")
    return request


class ExecutionServicer(execution_pb2_grpc.ExecutionServicer):
    def __init__(self, executor: Executor):
        self.executor = executor

    def Execute(self, request, context):
        return to_response(self.executor.execute(to_program(readable(request))))

    def ExecuteBatch(self, request, context):
        batch = self.executor.execute_batch(to_program(r) for r in readable(request).requests)
        context.add_callback(batch.cancel)  # the client went away: drop what has not started
        for outcomes in batch:
            yield execution_pb2.ExecuteBatchResponse(results=[to_response(outcome) for outcome in outcomes])

    def GetSandboxInfo(self, request, context):
        return execution_pb2.SandboxInfo(
            workers=self.executor.pool.size,
            layers=[execution_pb2.IsolationLayer(name=layer.name, active=layer.active, detail=layer.detail)
                    for layer in self.executor.layers])


def add_servicer(servicer: ExecutionServicer, server: grpc.Server) -> None:
    """Like the generated add_ExecutionServicer_to_server, with requests parsed leniently."""
    def handler(kind, method, request_class, response_class):
        return kind(method, request_deserializer=lenient(request_class),
                    response_serializer=response_class.SerializeToString)
    handlers = {
        "Execute": handler(grpc.unary_unary_rpc_method_handler, servicer.Execute,
                           execution_pb2.ExecuteRequest, execution_pb2.ExecuteResponse),
        "ExecuteBatch": handler(grpc.unary_stream_rpc_method_handler, servicer.ExecuteBatch,
                                execution_pb2.ExecuteBatchRequest, execution_pb2.ExecuteBatchResponse),
        "GetSandboxInfo": handler(grpc.unary_unary_rpc_method_handler, servicer.GetSandboxInfo,
                                  execution_pb2.GetSandboxInfoRequest, execution_pb2.SandboxInfo),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])


class ExecutionService(Service):
    """The servicer over an executor; closes the executor on stop when it made it."""
    names = (SERVICE_NAME,)

    def __init__(self, executor: Executor, owns_executor: bool = True):
        self.owns_executor = owns_executor
        self.executor = executor
        track(self.executor, metrics.EXECUTORS)

    def add_to(self, grpc_server) -> None:
        add_servicer(ExecutionServicer(self.executor), grpc_server)

    def load(self) -> str:
        layers = self.executor.layers
        active = [layer.name for layer in layers if layer.active]
        missing = [layer.name for layer in layers if not layer.active]
        return (f"{self.executor.pool.size} sandboxed workers; isolation {', '.join(active) or 'none'}"
                + (f"; NOT active: {', '.join(missing)}" if missing else ""))

    def close(self) -> None:
        if self.owns_executor:
            self.executor.close()


def build_server(port: int | None = None, executor: Executor | None = None) -> Server:
    """A server, not started; its sandbox workers are already running (a given executor is the caller's to close)."""
    if executor is None:
        executor = Executor(Settings.from_env())
        return Server(ExecutionService(executor), executor.settings, port)
    return Server(ExecutionService(executor, owns_executor=False), executor.settings, port)


def main(argv=None) -> None:
    serve(build_server)
