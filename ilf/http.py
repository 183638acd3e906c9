"""An aiohttp application served on its own thread and event loop: the services' HTTP ports (generation's TGI and
OpenAI routes, the feedback service's annotation page) start and stop it beside their gRPC server."""
from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BackgroundSite:
    """Subclasses build the application; `start` returns once the port listens (OSError if it cannot)."""

    def __init__(self, name: str, *, host: str, port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 **runner_options):
        self.host, self.port, self.ssl_context = host, port, ssl_context
        self._runner_options = runner_options
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._runner: web.AppRunner | None = None
        self._error: OSError | None = None

    def application(self) -> web.Application:
        raise NotImplementedError

    def listening(self) -> None:
        """Called once the port listens (self.port is the bound one): the subclass's log line."""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        self._started.wait(timeout=30)
        if self._error:
            raise OSError(f"cannot listen on {self.host}:{self.port} for HTTP: {self._error}")

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._listen())
        except OSError as error:
            self._error = error
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        self._runner = web.AppRunner(self.application(), **self._runner_options)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.listening()
