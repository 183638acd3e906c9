"""Random and malformed requests at every service: each gets a proper status and the service stays healthy.

"Proper" means anything but INTERNAL and UNKNOWN, the statuses of an unhandled error. Requests are
random protobuf messages built from each method's descriptor, and random bytes sent as the raw
request. Servers run in this process on the tiny model; example counts are small for 2-core machines.
"""
from __future__ import annotations

import importlib

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilf.grpc_util import channel

IMPROPER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_INTS = {
    FieldDescriptor.CPPTYPE_INT32: (-2 ** 31, 2 ** 31 - 1), FieldDescriptor.CPPTYPE_INT64: (-2 ** 63, 2 ** 63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2 ** 32 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2 ** 64 - 1),
}
TEXT = st.one_of(st.text(max_size=64), st.sampled_from(["", "def f(x):\n    return x\n", "assert f(1) == 1",
                                                        "\x00", "x" * 20000, "import os; os._exit(3)"]))


def field_values(field, depth: int):
    cpp = field.cpp_type
    if cpp in _INTS:
        low, high = _INTS[cpp]
        value = st.one_of(st.integers(max(low, -3), 8), st.integers(low, high))  # small ones pass validation
    elif cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        value = st.one_of(st.floats(-2, 5, width=32), st.floats(width=32))
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        value = st.booleans()
    elif cpp == FieldDescriptor.CPPTYPE_ENUM:
        value = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 100))
    elif cpp == FieldDescriptor.CPPTYPE_STRING:
        value = st.binary(max_size=64) if field.type == FieldDescriptor.TYPE_BYTES else TEXT
    else:
        value = messages(field.message_type, depth + 1)
    if field.is_repeated:
        return st.lists(value, max_size=3)
    return value


@st.composite
def _message(draw, descriptor, depth: int):
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and depth >= 3 or not draw(st.booleans()):
            continue
        value = draw(field_values(field, depth))
        if field.is_repeated:
            target = getattr(message, field.name)
            for item in value:
                target.add().CopyFrom(item) if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE else target.append(item)
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(value)
        else:
            setattr(message, field.name, value)
    return message


def messages(descriptor, depth: int = 0):
    return _message(descriptor, depth)


def requests(service):
    """(method, serialized request) pairs: well-formed random messages, or random bytes."""
    by_method = [st.tuples(st.just(m), messages(m.input_type).map(lambda msg: msg.SerializeToString()))
                 for m in service.methods]
    raw = st.tuples(st.sampled_from(list(service.methods)), st.binary(max_size=256))
    return st.one_of(*by_method, raw)


def call(ch: grpc.Channel, service, method, payload: bytes) -> grpc.StatusCode:
    path = f"/{service.full_name}/{method.name}"
    identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        if method.server_streaming:
            for _ in ch.unary_stream(path, **identity)(payload, timeout=8):
                pass
        else:
            ch.unary_unary(path, **identity)(payload, timeout=8)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert error.code() not in IMPROPER, f"{method.name}({payload[:200]!r}): {error.code()} {error.details()}"
        return error.code()


def fuzz_service(address: str, module_name: str, service_name: str, health_service: str) -> None:
    service = importlib.import_module(f"ilf.v1.{module_name}").DESCRIPTOR.services_by_name[service_name]
    with channel(address) as ch:
        @FUZZ
        @given(requests(service))
        def check(request):
            call(ch, service, *request)
        check()
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=health_service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def started(server):
    server.start()
    return f"127.0.0.1:{server.port}"


def test_execution(ilf_env):
    from ilf.v1 import execution_pb2, execution_pb2_grpc
    from services.execution.server import build_server
    server = build_server(0)
    try:
        address = started(server)
        fuzz_service(address, "execution_pb2", "Execution", "ilf.v1.Execution")
        with channel(address) as ch:
            assert execution_pb2_grpc.ExecutionStub(ch).Execute(execution_pb2.ExecuteRequest(
                program="x = 1\n", tests=["assert x == 1"]), timeout=30).passed
    finally:
        server.stop()


def test_generation(ilf_env):
    from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc
    from services.generation.server import build_server
    server = build_server(0)
    try:
        address = started(server)
        assert server.ready.wait(120)
        fuzz_service(address, "generation_pb2", "Generation", "ilf.v1.Generation")
        with channel(address) as ch:
            reply = generation_pb2_grpc.GenerationStub(ch).Generate(generation_pb2.GenerateRequest(
                prompt="def f(x):", params=common_pb2.SamplingParams(n=2, temperature=0.8, max_new_tokens=4)), timeout=60)
            assert len(reply.completions) == 2
    finally:
        server.stop(0)


def wait_serving(address: str, service: str) -> None:
    from ilf.grpc_util import wait_healthy
    wait_healthy(address, timeout_s=120, service=service)


def test_refinement(ilf_env, monkeypatch):
    from services.generation.server import build_server as build_generation
    from services.refinement.server import build_server
    generation = build_generation(0)
    server = None
    try:
        monkeypatch.setenv("ILF_GENERATION_ADDR", started(generation))  # pi_Refine's weights are served there
        server = build_server(0)
        address = started(server)
        wait_serving(address, "ilf.v1.Refinement")
        fuzz_service(address, "refinement_pb2", "Refinement", "ilf.v1.Refinement")
    finally:
        if server:
            server.stop(0)
        generation.stop(0)


def test_training(ilf_env):
    from services.training.server import build_server
    server = build_server(0)
    try:
        fuzz_service(started(server), "training_pb2", "Training", "ilf.v1.Training")
    finally:
        server.stop(0)


def test_feedback(ilf_env):
    from services.feedback.server import build_server
    server = build_server(0)
    try:
        fuzz_service(started(server), "feedback_pb2", "Feedback", "ilf.v1.Feedback")
    finally:
        server.stop(0)
