"""gRPC servicer of the generation service, a thin layer over a Backend."""
from __future__ import annotations

import logging
import threading

from ilf import config
from ilf.grpc_util import Server, setup_logging
from ilf.registry import Registry
from ilf.store import open_store
from ilf.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from .backends import Backend, make_backend
from .request import Settings, TokenEvent
from .tgi_http import TgiHttpServer

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": common_pb2.FINISH_REASON_LENGTH, "eos": common_pb2.FINISH_REASON_EOS,
                  "stop": common_pb2.FINISH_REASON_STOP}


def settings_from_proto(params: common_pb2.SamplingParams) -> Settings:
    """Applies the proto's 'zero means default' rules; n and max_new_tokens have no default."""
    return Settings(n=params.n, temperature=params.temperature, top_p=params.top_p or 1.0, top_k=params.top_k,
                    max_new_tokens=params.max_new_tokens, stop=tuple(params.stop),
                    repetition_penalty=params.repetition_penalty or 1.0,
                    seed=params.seed if params.HasField("seed") else None)


def completion_proto(sample, seed: int | None) -> common_pb2.Completion:
    return common_pb2.Completion(text=sample.text, finish_reason=FINISH_REASONS[sample.finish_reason],
                                 generated_tokens=sample.generated_tokens, prompt_tokens=sample.prompt_tokens,
                                 seed=seed)


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    def _submit(self, request, context):
        handle = self.backend.submit(request.prompt, settings_from_proto(request.params), request.model_version)
        context.add_callback(handle.cancel)   # a cancelled or timed-out call stops its rows
        return handle

    def Generate(self, request, context):
        handle = self._submit(request, context)
        samples = handle.result()
        return generation_pb2.GenerateResponse(
            completions=[completion_proto(s, handle.seeds[i]) for i, s in enumerate(samples)],
            model_version=handle.model_version)

    def GenerateStream(self, request, context):
        handle = self._submit(request, context)
        event: TokenEvent
        for event in handle:
            yield generation_pb2.GenerateStreamResponse(
                index=event.index, token_text=event.text, token_id=event.token_id,
                completion=completion_proto(event.completion, handle.seeds[event.index]) if event.completion else None,
                model_version=handle.model_version)

    def LoadModel(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.load(request.model_version))

    def SwitchModel(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.switch(request.model_version))

    def Rollback(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.rollback())

    def GetModelStatus(self, request, context):
        return generation_pb2.ModelStatus(**self.backend.status())


class GenerationServer(Server):
    """The gRPC server plus the optional TGI HTTP endpoint, both over one backend."""

    def __init__(self, port: int, backend: Backend, http_port: int | None):
        super().__init__(["ilf.v1.Generation"], port)
        self.backend = backend
        self.add(generation_pb2_grpc.add_GenerationServicer_to_server, GenerationServicer(backend))
        self.http = TgiHttpServer(backend, port=http_port) if http_port is not None else None
        self.ready = threading.Event()
        threading.Thread(target=self._start_backend, name="load-model", daemon=True).start()

    def start(self) -> None:
        super().start()
        if self.http:
            self.http.start()

    def _start_backend(self) -> None:
        try:
            self.backend.start()
        except Exception:  # noqa: BLE001 - stays NOT_SERVING, and the log says why
            log.exception("the generation backend failed to start")
            return
        self.set_serving(True)
        self.ready.set()

    def close(self) -> None:
        if self.http:
            self.http.stop()
        self.backend.close()


def build_server(port: int, *, backend: Backend | None = None) -> GenerationServer:
    """The server, not started; the first model loads in the background and health turns SERVING after it."""
    http_port = config.get("ILF_GENERATION_HTTP_PORT")
    return GenerationServer(port, backend or make_backend(Registry(open_store())),
                            int(http_port) if http_port else None)


def main(argv=None) -> None:
    setup_logging()
    server = build_server(int(config.get("ILF_GENERATION_PORT")))
    server.run_until_signal(on_stop=server.close)
