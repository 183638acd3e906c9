"""OpenAI's HTTP protocol over a Backend: what the `openai` client, and tools built on it, speak.

Routes: GET /v1/models (every loaded version, the serving one first), GET /v1/models/{model},
POST /v1/completions, POST /v1/chat/completions (the model's chat template renders the messages), and
POST /v1/load_lora_adapter (vLLM's runtime adapter API; operator role): `lora_name` is a registered
version id, loaded from the store (`lora_path` is accepted and not read).

`model` names a loaded version; omitted or empty, the serving one. Parameters: n, temperature, top_p,
max_tokens (max_completion_tokens in chat), stop, seed, stream (server-sent events ending with
`data: [DONE]`, usage in a last chunk with stream_options.include_usage), and vLLM's top_k and
repetition_penalty. Unset ones take the service's defaults (ilf.sampling), the same on every protocol:
greedy and 256 new tokens, where OpenAI's own API samples at temperature 1 and stops completions at 16
tokens. n > 1 needs a temperature above 0. Other OpenAI parameters are refused when set to anything
but their neutral value; unknown ones are refused. The text ends before a stop sequence, as OpenAI's
does; finish_reason is "stop" (end of sequence or a stop sequence; vLLM's stop_reason says which:
null or the sequence) or "length".

Errors are OpenAI's {"error": {"message", "type", "param", "code"}}: 400 for a bad request (param names
the field), 401 and 403 for tokens, 404 for an unknown or unloaded model, 429 when the queue is full.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from aiohttp import web

from ilf.errors import IlfError, InvalidArgument, InvalidField, NotFound
from ilf.modeling import Sample
from ilf.sampling import Sampling

from .backends import Backend
from .detokenize import cut_at_stop
from .http_server import Protocol, Route, events, first_stop, json_body, stop_sequences, typed
from .request import GenerationHandle

log = logging.getLogger(__name__)

# (HTTP status, OpenAI error type) per ilf error; anything else is a 500
ERRORS = {"INVALID_ARGUMENT": (400, "invalid_request_error"), "FAILED_PRECONDITION": (400, "invalid_request_error"),
          "NOT_FOUND": (404, "invalid_request_error"), "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
          "UNAVAILABLE": (503, "server_error")}
# the OpenAI name of a field of Sampling, where it differs
PARAMETER_NAMES = {"max_new_tokens": "max_tokens"}
# OpenAI parameters this server does not implement, with the values that ask for nothing (null always does)
NEUTRAL = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
           "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
           "tool_choice": ("none",), "response_format": ({"type": "text"},)}
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}   # no bearing on the text
SAMPLING = {"model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options",
            "top_k", "repetition_penalty"}
KNOWN = {False: {"prompt", *SAMPLING, *NEUTRAL, *IGNORED},
         True: {"messages", "max_completion_tokens", *SAMPLING, *NEUTRAL, *IGNORED}}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def sampling_from_openai(body: dict, *, chat: bool) -> Sampling:
    """The request's sampling parameters; unset ones take Sampling's defaults."""
    for name in sorted(set(body) - KNOWN[chat]):
        raise InvalidField(name, "is not a parameter this server knows (unrecognized request argument)")
    for name, neutral in NEUTRAL.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise InvalidField(name, "is not supported by this server")
    defaults = Sampling()
    max_tokens = typed(body, "max_completion_tokens", int) if chat else None
    max_tokens = typed(body, "max_tokens", int) if max_tokens is None else max_tokens

    def given(name: str, kind: type, default):
        value = typed(body, name, kind)
        return default if value is None else value
    stop = stop_sequences(body, "stop", one_string_allowed=True)
    return Sampling(n=given("n", int, defaults.n), temperature=given("temperature", float, defaults.temperature),
                    top_p=given("top_p", float, defaults.top_p), top_k=given("top_k", int, defaults.top_k),
                    max_new_tokens=defaults.max_new_tokens if max_tokens is None else max_tokens,
                    stop=defaults.stop if stop is None else stop,
                    repetition_penalty=given("repetition_penalty", float, defaults.repetition_penalty),
                    seed=typed(body, "seed", int))


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidField("prompt", "must be a string (one prompt per request; token ids are not accepted)")
    return prompt


def chat_messages(body: dict) -> list[dict]:
    """The messages as {"role", "content"} with text content, for the chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidField("messages", "must be a non-empty list of {role, content} objects")
    normalized = []
    for number, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise InvalidField("messages", f"[{number}].role must be one of {', '.join(ROLES)}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                              and isinstance(p.get("text"), str) for p in content):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise InvalidField("messages", f"[{number}].content must be a string or a list of text parts")
        normalized.append({"role": ROLES[role], "content": content})
    return normalized


def error_response(status: int, message: str, error_type: str, *, param: str | None = None,
                   code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": error_type, "param": param, "code": code}},
                             status=status)


def _error(error: Exception) -> web.Response:
    status, error_type = ERRORS.get(getattr(error, "code_name", ""), (500, "server_error"))
    if isinstance(error, InvalidField):
        return error_response(status, str(error), error_type, param=error.field)
    if not isinstance(error, IlfError):
        log.error("generation failed", exc_info=error)
    return error_response(status, str(error), error_type,
                          code="model_not_found" if isinstance(error, NotFound) else None)


def finish(completion: Sample, streamed: str, stop: tuple[str, ...]) -> dict:
    """finish_reason, and vLLM's stop_reason: the stop sequence that ended the sample, or null."""
    return {"finish_reason": "length" if completion.finish_reason == "length" else "stop",
            "stop_reason": first_stop(streamed, stop) if completion.finish_reason == "stop" else None}


def usage(completions: list[Sample]) -> dict:
    prompt = completions[0].prompt_tokens if completions else 0
    generated = sum(c.generated_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class StopFilter:
    """Streams one sample's text as its final text reads: nothing of a stop sequence leaves, and nothing that may
    still turn out to begin one leaves before that is settled."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.raw = ""        # every token's text so far
        self.sent = 0        # characters of raw already streamed

    def push(self, text: str) -> str:
        self.raw += text
        cut, stopped = cut_at_stop(self.raw, self.stop)
        end = len(cut) if stopped else len(self.raw) - self._open_stop()
        delta, self.sent = self.raw[self.sent:end], max(self.sent, end)
        return delta

    def _open_stop(self) -> int:
        """Length of the longest end of raw that begins some stop sequence."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.raw.endswith(s[:k])), default=0)

    def finish(self, final_text: str) -> str:
        """What the sample's final text has beyond what was streamed."""
        delta, self.sent = final_text[self.sent:], len(final_text)
        return delta


class OpenAIProtocol(Protocol):
    def __init__(self, backend: Backend):
        self.backend = backend

    def routes(self) -> list[Route]:
        return [Route("GET", "/v1/models", self._models), Route("GET", "/v1/models/{model}", self._model),
                Route("POST", "/v1/completions", self._completions),
                Route("POST", "/v1/chat/completions", self._chat_completions),
                Route("POST", "/v1/load_lora_adapter", self._load_adapter, role="operator")]

    def refusal(self, status: int, message: str) -> web.Response:
        if status == 401:
            return error_response(401, message, "authentication_error", code="invalid_api_key")
        return error_response(status, message, "permission_error")

    async def _model_ids(self) -> list[str]:
        status = await asyncio.to_thread(self.backend.status)
        serving = [status["serving_version"]] if status["serving_version"] else []
        return serving + [v for v in status["loaded_versions"] if v != status["serving_version"]]

    @staticmethod
    def _model_entry(version: str) -> dict:
        return {"id": version, "object": "model", "created": int(time.time()), "owned_by": "ilf"}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_entry(v) for v in await self._model_ids()]})

    async def _model(self, request: web.Request) -> web.Response:
        version = request.match_info["model"]
        if version not in await self._model_ids():
            return _error(NotFound(f"model {version!r} is not loaded (GET /v1/models lists the loaded ones)"))
        return web.json_response(self._model_entry(version))

    async def _load_adapter(self, request: web.Request) -> web.Response:
        try:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise InvalidArgument("the body must be a JSON object with `lora_name`")
            version = typed(body, "lora_name", str)
            typed(body, "lora_path", str)   # accepted and not read: a version's files come from the store
            if not version:
                raise InvalidField("lora_name", "must name a registered model version")
            await asyncio.to_thread(self.backend.load, version)
        except Exception as error:  # noqa: BLE001 - every error is an OpenAI error body
            return _error(error)
        return web.Response(text=f"Success: LoRA adapter '{version}' added successfully.")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise InvalidArgument("the body must be a JSON object")
            sampling = sampling_from_openai(body, chat=chat)
            stream, options = typed(body, "stream", bool), typed(body, "stream_options", dict) or {}
            model = typed(body, "model", str) or ""
            handle = self._submit(body, sampling, model, chat=chat)
        except Exception as error:  # noqa: BLE001 - every error is an OpenAI error body
            return _error(error)
        reply = Reply(handle, sampling.stop, chat=chat)
        try:
            if stream:
                return await reply.stream(request, include_usage=bool(options.get("include_usage")))
            return await reply.unary()
        finally:
            if not handle.done:
                handle.cancel()

    def _submit(self, body: dict, sampling: Sampling, model: str, *, chat: bool) -> GenerationHandle:
        messages, prompt = (chat_messages(body), "") if chat else (None, completion_prompt(body))
        try:
            return (self.backend.submit_chat(messages, sampling, model) if chat
                    else self.backend.submit(prompt, sampling, model))
        except InvalidField as error:  # the backend names Sampling's fields: say them as OpenAI does
            name = "messages" if error.field == "prompt" else PARAMETER_NAMES.get(error.field, error.field)
            raise InvalidField(name, error.rule) from None


class Reply:
    """One request's response, whole or as server-sent events, in the completions or the chat shape."""

    def __init__(self, handle: GenerationHandle, stop: tuple[str, ...], *, chat: bool):
        self.handle, self.stop, self.chat = handle, stop, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], *, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.handle.model_version,
                "system_fingerprint": None, "choices": choices}

    def _choice(self, index: int, text: str | None, *, chunk: bool, role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": None}
        content = {"role": "assistant", "content": text or ""} if role or not chunk else \
            ({"content": text} if text is not None else {})
        return {"index": index, "delta" if chunk else "message": content, "logprobs": None, "finish_reason": None}

    async def unary(self) -> web.Response:
        streamed, completions = [""] * self.handle.n, {}
        try:
            async for event in events(self.handle):
                streamed[event.index] += event.text
                if event.completion is not None:
                    completions[event.index] = event.completion
        except Exception as error:  # noqa: BLE001
            return _error(error)
        ordered = [completions[i] for i in range(self.handle.n)]
        choices = [{**self._choice(i, c.text, chunk=False), **finish(c, streamed[i], self.stop)}
                   for i, c in enumerate(ordered)]
        return web.json_response({**self._envelope(choices, chunk=False), "usage": usage(ordered)})

    async def stream(self, request: web.Request, *, include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        extra = {"usage": None} if include_usage else {}

        async def send(payload) -> None:
            await response.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())
        filters = [StopFilter(self.stop) for _ in range(self.handle.n)]
        completions: dict[int, Sample] = {}
        try:
            if self.chat:
                await send({**self._envelope([self._choice(i, "", chunk=True, role=True)
                                              for i in range(self.handle.n)], chunk=True), **extra})
            async for event in events(self.handle):
                text = filters[event.index].push(event.text)
                ended = {}
                if event.completion is not None:
                    completions[event.index] = event.completion
                    text += filters[event.index].finish(event.completion.text)
                    ended = finish(event.completion, filters[event.index].raw, self.stop)
                if text or ended:
                    choice = {**self._choice(event.index, text or None, chunk=True), **ended}
                    await send({**self._envelope([choice], chunk=True), **extra})
            if include_usage:
                await send({**self._envelope([], chunk=True),
                            "usage": usage([completions[i] for i in range(self.handle.n)])})
        except Exception as error:  # noqa: BLE001 - the stream has started: the error is its last event
            status, error_type = ERRORS.get(getattr(error, "code_name", ""), (500, "server_error"))
            await send({"error": {"message": str(error), "type": error_type, "param": None, "code": status}})
        await send("[DONE]")
        await response.write_eof()
        return response
