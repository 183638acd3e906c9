"""TGI's HTTP protocol (generate and generate_stream, as the `text-generation` client speaks it) over a Backend.

Routes: POST / (a list of one response, or server-sent events when "stream" is true), POST /generate,
POST /generate_stream, GET /info, GET /health. Errors are {"error", "error_type"} with TGI's status codes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import AsyncIterator

from aiohttp import web

from ilf import config
from ilf.auth import configured_tokens
from ilf.errors import IlfError, InvalidArgument

from .backends import Backend
from .request import GenerationHandle, Settings, TokenEvent

log = logging.getLogger(__name__)

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
# (HTTP status, TGI error_type) per ilf error
ERRORS = {"INVALID_ARGUMENT": (422, "validation"), "RESOURCE_EXHAUSTED": (429, "overloaded"),
          "UNAVAILABLE": (503, "generation")}
UNSUPPORTED = ("typical_p", "top_n_tokens", "grammar", "truncate", "frequency_penalty")


def settings_from_tgi(parameters: dict) -> tuple[Settings, bool]:
    """TGI parameters as Settings, and whether to return the prompt with the text."""
    p = parameters or {}
    for name in UNSUPPORTED:
        if p.get(name) is not None:
            raise InvalidArgument(f"`{name}` is not supported by this server")
    if p.get("watermark") or p.get("decoder_input_details"):
        raise InvalidArgument("`watermark` and `decoder_input_details` are not supported by this server")
    if (p.get("best_of") or 1) > 1:
        raise InvalidArgument("`best_of` > 1 is not supported; ask the gRPC API for n samples")
    sampling = bool(p.get("do_sample")) or any(p.get(k) is not None for k in ("temperature", "top_p", "top_k"))
    try:
        settings = Settings(
            n=1, temperature=float(p.get("temperature") or 1.0) if sampling else 0.0,
            top_p=float(p.get("top_p") or 1.0), top_k=int(p.get("top_k") or 0),
            max_new_tokens=int(p.get("max_new_tokens") or 20), stop=tuple(p.get("stop") or ()),
            repetition_penalty=float(p.get("repetition_penalty") or 1.0),
            seed=int(p["seed"]) if p.get("seed") is not None else None)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"bad parameter: {error}") from None
    return settings, bool(p.get("return_full_text"))


def _token(event: TokenEvent) -> dict:
    return {"id": event.token_id, "text": event.text, "logprob": event.logprob, "special": event.special}


def _error_response(error: Exception) -> web.Response:
    status, error_type = ERRORS.get(getattr(error, "code_name", ""), (424, "generation"))
    if not isinstance(error, IlfError):
        log.exception("generation failed", exc_info=error)
    return web.json_response({"error": str(error), "error_type": error_type}, status=status)


async def _events(handle: GenerationHandle) -> AsyncIterator[TokenEvent]:
    """The handle's events without blocking the event loop: the producer thread wakes it."""
    loop = asyncio.get_running_loop()
    arrived = asyncio.Event()
    handle.set_waker(lambda: loop.call_soon_threadsafe(arrived.set))
    while not handle.done:
        event = handle.poll()
        if event is None:
            await arrived.wait()
            arrived.clear()
            continue
        yield event


class TgiHttpServer:
    """Runs the aiohttp app on its own thread and event loop."""

    def __init__(self, backend: Backend, *, host: str | None = None, port: int = 0):
        self.backend = backend
        self.host = host or config.get("ILF_BIND_HOST")
        self.port = port
        self._tokens = configured_tokens(self.host)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tgi-http", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._started.wait(timeout=30)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._started.set()
        self._loop.run_forever()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        """Every route but /health needs a known bearer token (any role: these are client calls)."""
        if self._tokens is not None and request.path != "/health" \
                and self._tokens.caller_for(request.headers.get("Authorization", "")) is None:
            return web.json_response({"error": "a valid bearer token is required (header `Authorization: "
                                               "Bearer <token>`)", "error_type": "unauthorized"}, status=401)
        return await handler(request)

    async def _listen(self) -> None:
        app = web.Application(middlewares=[self._authenticate])
        app.add_routes([web.post("/", self._root), web.post("/generate", self._generate),
                        web.post("/generate_stream", self._generate_stream),
                        web.get("/info", self._info), web.get("/health", self._health)])
        # handler_cancellation: a client that disconnects cancels its handler, which cancels the generation
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("TGI HTTP endpoint on %s", self.url)

    # routes
    async def _root(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("stream"):
            return await self._stream(request, body)
        return await self._unary(body, as_list=True)

    async def _generate(self, request: web.Request) -> web.Response:
        return await self._unary(await request.json(), as_list=False)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, await request.json())

    async def _info(self, request: web.Request) -> web.Response:
        status = self.backend.status()
        return web.json_response({"model_id": status["serving_version"], "model_dtype": "float32",
                                  "max_best_of": 1, "max_stop_sequences": 16, "router": "ilf-generation",
                                  "version": "ilf.v1", "backend": status["backend"]})

    async def _health(self, request: web.Request) -> web.Response:
        serving = bool(self.backend.status()["serving_version"])
        return web.json_response({}, status=200 if serving else 503)

    def _submit(self, body: dict) -> tuple[GenerationHandle, str]:
        """Starts the request; returns its handle and the prompt when the reply must include it."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            raise InvalidArgument("the body must be a JSON object with a string `inputs`")
        settings, full_text = settings_from_tgi(body.get("parameters"))
        handle = self.backend.submit(body["inputs"], settings)
        return handle, body["inputs"] if full_text else ""

    async def _unary(self, body: dict, *, as_list: bool) -> web.Response:
        handle = None
        try:
            handle, prefix = self._submit(body)
            events = [event async for event in _events(handle)]
            completion = events[-1].completion   # n = 1: the last event ends the only sample
            reply = {"generated_text": prefix + completion.text}
            if (body.get("parameters") or {}).get("details"):
                reply["details"] = {"finish_reason": FINISH_REASONS[completion.finish_reason],
                                    "generated_tokens": completion.generated_tokens, "seed": handle.seeds[0],
                                    "prefill": [], "tokens": [_token(event) for event in events]}
            return web.json_response([reply] if as_list else reply)
        except Exception as error:  # noqa: BLE001 - every error is a TGI error body
            return _error_response(error)
        finally:
            if handle is not None and not handle.done:
                handle.cancel()

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        try:
            handle, prefix = self._submit(body)
        except Exception as error:  # noqa: BLE001
            return _error_response(error)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            async for event in _events(handle):
                message = {"index": 0, "token": _token(event), "top_tokens": None, "generated_text": None,
                           "details": None}
                if event.completion is not None:
                    message["generated_text"] = prefix + event.completion.text
                    message["details"] = {"finish_reason": FINISH_REASONS[event.completion.finish_reason],
                                          "generated_tokens": event.completion.generated_tokens,
                                          "seed": handle.seeds[0]}
                await response.write(f"data:{json.dumps(message)}\n\n".encode())
        except IlfError as error:
            status, error_type = ERRORS.get(error.code_name, (424, "generation"))
            await response.write(f"data:{json.dumps({'error': str(error), 'error_type': error_type})}\n\n".encode())
        finally:
            if not handle.done:
                handle.cancel()
        await response.write_eof()
        return response
