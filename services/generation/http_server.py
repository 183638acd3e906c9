"""The generation service's HTTP port: TGI's routes (tgi_http.py) and OpenAI's (openai_http.py) over one Backend.

One aiohttp app on its own thread and event loop. Both protocols check the same bearer tokens as gRPC: a route
needs the client role unless it is open (/health, for probes) or an operator's (loading a model version). Each
protocol answers in its own error shape, the refusals of this module included.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator

from aiohttp import web

from ilf.auth import configured_tokens, grants
from ilf.errors import InvalidArgument, InvalidField
from ilf.http import BackgroundSite, Handler

from .request import GenerationHandle, TokenEvent

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: str | None = "client"     # None: open to anyone; "operator": changes what the service serves


class Protocol:
    """One protocol's routes and its error shape."""

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def refusal(self, status: int, message: str) -> web.Response:
        """The protocol's error body for an authentication (401) or authorization (403) refusal."""
        raise NotImplementedError


async def json_body(request: web.Request):
    """The parsed body; InvalidArgument (a 4xx, never a 500) when it is not JSON."""
    text = await request.text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"the request body is not valid JSON ({error}); send a JSON object with "
                              "`Content-Type: application/json`") from None


async def events(handle: GenerationHandle) -> AsyncIterator[TokenEvent]:
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


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a JSON object",
          list: "a list"}


def typed(body: dict, name: str, kind: type):
    """body[name] if it is of kind (an int passes as a float), None when absent or null; else InvalidField."""
    value = body.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise InvalidField(name, f"must be {_KINDS[kind]}, got {json.dumps(value)[:80]}")
    return value


def stop_sequences(body: dict, name: str, *, one_string_allowed: bool) -> tuple[str, ...] | None:
    """A list of strings (or, where the protocol allows it, one string) as a tuple; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if one_string_allowed and isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidField(name, "must be a list of strings" + (" or a string" if one_string_allowed else ""))
    return tuple(value)


def first_stop(text: str, stop: tuple[str, ...]) -> str | None:
    """The stop sequence whose first occurrence in text ends first (the one that stopped a streamed sample)."""
    found = [(text.find(s) + len(s), s) for s in stop if s in text]
    return min(found)[1] if found else None


class HttpServer(BackgroundSite):
    """Runs the protocols' routes on one port, on its own thread and event loop."""

    def __init__(self, protocols: list[Protocol], *, host: str, port: int = 0):
        # handler_cancellation: a client that disconnects cancels its handler, which cancels the generation
        super().__init__("generation-http", host=host, port=port, handler_cancellation=True)
        self._tokens = configured_tokens(host)
        self._routes = {(route.method, route.path): (route, protocol)
                        for protocol in protocols for route in protocol.routes()}

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        resource = request.match_info.route.resource
        found = self._routes.get((request.method, resource.canonical if resource else ""))
        if found is None or self._tokens is None or found[0].role is None:
            return await handler(request)
        route, protocol = found
        caller = self._tokens.caller_for(request.headers.get("Authorization", ""))
        if caller is None:
            return protocol.refusal(401, "a valid bearer token is required (header `Authorization: Bearer <token>`)")
        if not grants(caller.role, route.role):
            return protocol.refusal(403, f"{route.method} {route.path} needs the {route.role} role; "
                                         f"{caller.name} is a {caller.role}")
        return await handler(request)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        app.add_routes([web.route(route.method, route.path, route.handler) for route, _ in self._routes.values()])
        return app

    def listening(self) -> None:
        log.info("listening on %s for HTTP (TGI and OpenAI routes; no TLS, auth %s)", self.url,
                 "on" if self._tokens else "off")
