"""gRPC servicer of the generation service, a thin layer over a Backend."""
from __future__ import annotations

import logging

from ilf.grpc_util import Server, Service, serve
from ilf.registry import Registry
from ilf.sampling import Sampling
from ilf.store import open_store
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from .backends import Backend, make_backend
from .config import GenerationConfig
from .http_server import HttpServer
from .openai_http import OpenAIProtocol
from .request import TokenEvent
from .tgi_http import TgiProtocol

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": common_pb2.FINISH_REASON_LENGTH, "eos": common_pb2.FINISH_REASON_EOS,
                  "stop": common_pb2.FINISH_REASON_STOP}


def completion_proto(sample, seed: int | None) -> common_pb2.Completion:
    return common_pb2.Completion(text=sample.text, finish_reason=FINISH_REASONS[sample.finish_reason],
                                 generated_tokens=sample.generated_tokens, prompt_tokens=sample.prompt_tokens,
                                 seed=seed)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    def _submit(self, request, context):
        handle = self.backend.submit(request.prompt, Sampling.from_proto(request.params), request.model_version)
        context.add_callback(handle.cancel)   # a cancelled or timed-out call stops its rows
        return handle

    def Generate(self, request, context):
        handle = self._submit(request, context)
        samples = handle.result()
        return generation_pb2.GenerateResponse(
            completions=[completion_proto(s, handle.seeds[i]) for i, s in enumerate(samples)],
            model_version=handle.model_version, dtype=handle.dtype)

    def GenerateStream(self, request, context):
        handle = self._submit(request, context)
        event: TokenEvent
        for event in handle:
            yield generation_pb2.GenerateStreamResponse(
                index=event.index, token_text=event.text, token_id=event.token_id,
                completion=completion_proto(event.completion, handle.seeds[event.index]) if event.completion else None,
                model_version=handle.model_version, dtype=handle.dtype)

    def LoadModel(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.load(request.model_version))

    def SwitchModel(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.switch(request.model_version))

    def Rollback(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.rollback())

    def GetModelStatus(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.status())


class GenerationService(Service):
    """The gRPC servicer plus the optional HTTP endpoint (TGI and OpenAI routes), all over one backend."""
    names = ("ilf.v1.Generation",)

    def __init__(self, backend: Backend, http_port: int | None, *, bind_host: str = "127.0.0.1"):
        self.backend = backend
        self.http = (HttpServer([TgiProtocol(backend), OpenAIProtocol(backend)], host=bind_host, port=http_port)
                     if http_port is not None else None)

    def add_to(self, grpc_server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(self.backend), grpc_server)

    def load(self) -> str:
        if self.http:
            self.http.start()
        self.backend.start()
        status, info = self.backend.status(), self.backend.model_info()
        return (f"{status['backend']} backend serving {status['serving_version']}"
                f" ({info.get('dtype') or 'dtype unknown'} on {info.get('device_type') or 'an unknown device'})")

    def close(self) -> None:
        if self.http:
            self.http.stop()
        self.backend.close()


def build_server(port: int | None = None, *, backend: Backend | None = None,
                 settings: GenerationConfig | None = None) -> Server:
    """The server, not started; on start the first model loads in the background and health turns SERVING."""
    settings = settings or GenerationConfig.from_env()
    service = GenerationService(backend or make_backend(Registry(open_store()), settings), settings.http_port,
                                bind_host=settings.server.bind_host)
    return Server(service, settings, port)


def main(argv=None) -> None:
    serve(build_server)
