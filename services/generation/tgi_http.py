"""TGI's HTTP protocol (generate and generate_stream, as the `text-generation` client speaks it) over a Backend.

Routes: POST / (a list of one response, or server-sent events when "stream" is true), POST /generate,
POST /generate_stream, GET /info, GET /health. Errors are {"error", "error_type"} with TGI's status codes;
a body that is not JSON, or a parameter of the wrong type, is a 422 `validation` error like any bad value.

Unset parameters take the service's defaults (ilf.sampling: greedy, 256 new tokens), the same as gRPC's.
As in TGI, sampling is on with `do_sample` or any of temperature != 1, top_k, top_p < 1; temperature 0
means greedy (TGI refuses it). A sample that hit a stop sequence ends with it, as in TGI (the gRPC and
OpenAI protocols end before it).
"""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from ilf.errors import IlfError, InvalidArgument, InvalidField
from ilf.modeling import Sample
from ilf.sampling import Sampling

from .backends import Backend
from .http_server import Protocol, Route, events, first_stop, json_body, stop_sequences, typed
from .request import MAX_STOP_SEQUENCES, GenerationHandle, TokenEvent

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
# (HTTP status, TGI error_type) per ilf error
ERRORS = {"INVALID_ARGUMENT": (422, "validation"), "RESOURCE_EXHAUSTED": (429, "overloaded"),
          "NOT_FOUND": (404, "not_found"), "UNAVAILABLE": (503, "generation")}
# What TGI's parameters may hold; the ones this server does not implement are refused when set.
UNSUPPORTED = ("typical_p", "top_n_tokens", "grammar", "truncate", "frequency_penalty", "adapter_id")
KNOWN = {"best_of", "decoder_input_details", "details", "do_sample", "max_new_tokens", "repetition_penalty",
         "return_full_text", "seed", "stop", "temperature", "top_k", "top_p", "watermark", *UNSUPPORTED}


def sampling_from_tgi(parameters) -> tuple[Sampling, bool]:
    """TGI parameters as Sampling (unset ones take its defaults), and whether to return the prompt with the text."""
    p = {} if parameters is None else parameters
    if not isinstance(p, dict):
        raise InvalidField("parameters", "must be a JSON object")
    unknown = sorted(set(p) - KNOWN)
    if unknown:
        raise InvalidField(unknown[0], f"is not a TGI parameter (known: {', '.join(sorted(KNOWN))})")
    for name in UNSUPPORTED:
        if p.get(name) is not None:
            raise InvalidField(name, "is not supported by this server")
    for name in ("watermark", "decoder_input_details"):
        if typed(p, name, bool):
            raise InvalidField(name, "is not supported by this server")
    if (typed(p, "best_of", int) or 1) > 1:
        raise InvalidField("best_of", "> 1 is not supported; ask the gRPC or OpenAI API for n samples")
    temperature, top_p, top_k = typed(p, "temperature", float), typed(p, "top_p", float), typed(p, "top_k", int)
    warped = temperature not in (None, 1.0) or bool(top_k) or (top_p is not None and top_p < 1.0)
    sample = bool(typed(p, "do_sample", bool)) or warped
    defaults = Sampling()
    max_new_tokens, repetition_penalty = typed(p, "max_new_tokens", int), typed(p, "repetition_penalty", float)
    stop = stop_sequences(p, "stop", one_string_allowed=False)
    sampling = Sampling(
        temperature=(1.0 if temperature is None else temperature) if sample else defaults.temperature,
        top_p=defaults.top_p if top_p is None else top_p, top_k=top_k or defaults.top_k,
        max_new_tokens=defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
        stop=defaults.stop if stop is None else stop,
        repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
        seed=typed(p, "seed", int))
    return sampling, bool(typed(p, "return_full_text", bool))


def tgi_text(completion: Sample, streamed: str, stop: tuple[str, ...]) -> str:
    """TGI's generated_text: a sample that hit a stop sequence keeps it (ours ends before it)."""
    matched = first_stop(streamed, stop) if completion.finish_reason == "stop" else None
    return completion.text + matched if matched else completion.text


def _token(event: TokenEvent) -> dict:
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}


def _error_body(error: Exception) -> tuple[dict, int]:
    status, error_type = ERRORS.get(getattr(error, "code_name", ""), (424, "generation"))
    if not isinstance(error, IlfError):
        log.error("generation failed", exc_info=error)
    return {"error": str(error), "error_type": error_type}, status


def _error_response(error: Exception) -> web.Response:
    body, status = _error_body(error)
    return web.json_response(body, status=status)


class TgiProtocol(Protocol):
    def __init__(self, backend: Backend):
        self.backend = backend

    def routes(self) -> list[Route]:
        return [Route("POST", "/", self._root), Route("POST", "/generate", self._generate),
                Route("POST", "/generate_stream", self._generate_stream), Route("GET", "/info", self._info),
                Route("GET", "/health", self._health, role=None)]

    def refusal(self, status: int, message: str) -> web.Response:
        return web.json_response({"error": message, "error_type": "unauthorized" if status == 401 else "forbidden"},
                                 status=status)

    async def _root(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await json_body(request)
        except InvalidArgument as error:
            return _error_response(error)
        if isinstance(body, dict) and body.get("stream"):
            return await self._stream(request, body)
        return await self._unary(body, as_list=True)

    async def _generate(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
        except InvalidArgument as error:
            return _error_response(error)
        return await self._unary(body, as_list=False)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await json_body(request)
        except InvalidArgument as error:
            return _error_response(error)
        return await self._stream(request, body)

    async def _info(self, request: web.Request) -> web.Response:
        """TGI's Info, with what this service knows (null where it does not) and the backend's name."""
        status = await asyncio.to_thread(self.backend.status)
        model = self.backend.model_info()
        return web.json_response({
            "model_id": status["serving_version"], "model_sha": None, "model_dtype": model.get("dtype"),
            "model_device_type": model.get("device_type"), "model_pipeline_tag": "text-generation",
            "max_input_tokens": model["max_total_tokens"] - 1 if model.get("max_total_tokens") else None,
            "max_total_tokens": model.get("max_total_tokens"), "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES, "max_client_batch_size": 1, "router": "ilf-generation",
            "version": "ilf.v1", "sha": None, "docker_label": None, "backend": status["backend"]})

    async def _health(self, request: web.Request) -> web.Response:
        serving = bool((await asyncio.to_thread(self.backend.status))["serving_version"])
        return web.json_response({}, status=200 if serving else 503)

    def _submit(self, body) -> tuple[GenerationHandle, Sampling, str]:
        """Starts the request; returns its handle, its sampling and the prompt when the reply must include it."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            raise InvalidField("inputs", "must be a string (the body is a JSON object with `inputs` and "
                                         "optional `parameters`)")
        sampling, full_text = sampling_from_tgi(body.get("parameters"))
        handle = self.backend.submit(body["inputs"], sampling)
        return handle, sampling, body["inputs"] if full_text else ""

    async def _unary(self, body, *, as_list: bool) -> web.Response:
        handle = None
        try:
            handle, sampling, prefix = self._submit(body)
            streamed = [event async for event in events(handle)]
            completion = streamed[-1].completion   # n = 1: the last event ends the only sample
            reply = {"generated_text": prefix + tgi_text(completion, "".join(e.text for e in streamed),
                                                         sampling.stop)}
            if (body.get("parameters") or {}).get("details"):
                reply["details"] = {"finish_reason": FINISH_REASONS[completion.finish_reason],
                                    "generated_tokens": completion.generated_tokens, "seed": handle.seeds[0],
                                    "dtype": handle.dtype, "prefill": [],
                                    "tokens": [_token(event) for event in streamed]}
            return web.json_response([reply] if as_list else reply)
        except Exception as error:  # noqa: BLE001 - every error is a TGI error body
            return _error_response(error)
        finally:
            if handle is not None and not handle.done:
                handle.cancel()

    async def _stream(self, request: web.Request, body) -> web.StreamResponse:
        try:
            handle, sampling, prefix = self._submit(body)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        streamed = ""
        try:
            async for event in events(handle):
                streamed += event.text
                message = {"index": 0, "token": _token(event), "top_tokens": None, "generated_text": None,
                           "details": None}
                if event.completion is not None:
                    message["generated_text"] = prefix + tgi_text(event.completion, streamed, sampling.stop)
                    message["details"] = {"finish_reason": FINISH_REASONS[event.completion.finish_reason],
                                          "generated_tokens": event.completion.generated_tokens,
                                          "seed": handle.seeds[0], "dtype": handle.dtype}
                await response.write(f"data:{json.dumps(message)}\n\n".encode())
        except Exception as error:  # noqa: BLE001 - the stream has started: the error is its last event
            await response.write(f"data:{json.dumps(_error_body(error)[0])}\n\n".encode())
        finally:
            if not handle.done:
                handle.cancel()
        await response.write_eof()
        return response
