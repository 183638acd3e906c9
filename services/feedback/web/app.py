"""The annotation page: server-rendered HTML over the feedback service's core, on its own thread and event loop.

Every route names the role it needs (annotator or operator; the operator may use everything) and the guard
checks it before the handler runs: without a session a page redirects to the sign-in form and a script call gets
401, both without a byte of data; a session of another role gets 403. Every POST carries the session's CSRF token
(the sign-in form a token of its own, in a cookie). Nothing is loaded from outside the service: the styles, the
script and the highlighting's colours are served under /static/.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from ilf import config
from ilf.auth import TokenFile
from ilf.errors import FailedPrecondition, IlfError, InvalidArgument, NotFound
from ilf.http import BackgroundSite, Handler
from ilf.v1 import common_pb2
from services.feedback.checks import check_text
from services.feedback.collect import per_test_results
from services.feedback.queue import ANSWERED, LEASED
from services.feedback.service import FeedbackService
from services.feedback.web import views
from services.feedback.web.sessions import LIFETIME_S, Session, Sessions, SignInRefused, same_secret

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "ilf_session"
SIGNIN_COOKIE = "ilf_signin"      # the sign-in form's CSRF token, before a session exists
CSRF_HEADER = "X-CSRF-Token"
SESSION = web.RequestKey("session", object)     # the request's Session, or None: set by the guard
HTTP_STATUS = {"INVALID_ARGUMENT": 422, "NOT_FOUND": 404, "FAILED_PRECONDITION": 409, "ALREADY_EXISTS": 409,
               "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503}
SECURITY_HEADERS = {
    # Only this service's own files; no inline script or style, no framing, forms post back here only.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
}
COLLECT_DEFAULTS = {"n": 4, "max_tasks": 0, "temperature": 0.8, "max_new_tokens": 128}

@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: str | None = "annotator"      # None: open (the sign-in form, static files)


class JsonError(Exception):
    """Raised by script routes: answered as {"error": ...} instead of a page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _local_path(target: str) -> str:
    """target when it is a path on this site (no scheme, host or protocol-relative //), else the queue."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/queue"


class AnnotationPage:
    def __init__(self, service: FeedbackService, *, tokens: TokenFile | None, lease_s: float,
                 ssl_context: ssl.SSLContext | None = None):
        self.service = service
        self.sessions = Sessions(tokens)
        self.lease_s = lease_s
        self.ssl_context = ssl_context
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                            undefined=jinja2.StrictUndefined)
        self.templates.filters.update(utc=views.utc, ago=views.ago, python=views.highlighted_inline)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="feedback-web")
        self.routes = [
            Route("GET", "/signin", self.signin_form, role=None),
            Route("POST", "/signin", self.signin, role=None),
            Route("POST", "/signout", self.signout),
            Route("GET", "/", self.home),
            Route("GET", "/queue", self.queue_page),
            Route("GET", "/next", self.next_item),
            Route("GET", "/items/{item_id}", self.item_page),
            Route("POST", "/items/{item_id}/run", self.run_tests),
            Route("POST", "/items/{item_id}/answer", self.answer),
            Route("POST", "/items/{item_id}/skip", self.skip),
            Route("GET", "/progress", self.progress_page),
            Route("GET", "/admin", self.admin_page, role="operator"),
            Route("POST", "/admin/collect", self.collect, role="operator"),
            Route("GET", "/static/highlight.css", self.highlight_css, role=None),
        ]

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=4 * self.service.checks.max_program_chars)
        self._roles = {app.router.add_route(r.method, r.path, r.handler): r.role for r in self.routes}
        self._roles.update((route, None) for route in app.router.add_static("/static/", HERE / "static"))
        return app

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the guard

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Not found and method-not-allowed answers have routes of their own: closed like any page.
        role = self._roles.get(request.match_info.route, "annotator")
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        request[SESSION] = session
        if role is not None and session is None:
            response = self._anonymous(request)
        elif role is not None and not session.may(role):
            response = self._page("error.html", request, status=403, title="Not for your role",
                                  message=f"This page needs the {role} role; {session.caller.name} is an "
                                          f"{session.caller.role}.")
        elif request.method == "POST" and not await self._csrf_ok(request, session):
            response = web.Response(status=403, text="the form is stale or did not come from this site: reload the "
                                                     "page and try again")
        else:
            response = await self._handled(request, handler)
        response.headers.update(SECURITY_HEADERS)
        if not request.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    async def _handled(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as answer:   # aiohttp's own 404 and 405
            return web.Response(status=answer.status, text=answer.text)
        except JsonError as error:
            return web.json_response({"error": str(error)}, status=error.status)
        except IlfError as error:
            return self._page("error.html", request, status=HTTP_STATUS.get(error.code_name, 500),
                              title="That did not work", message=str(error))

    def _anonymous(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return redirect("/signin?" + urlencode({"next": request.path_qs}))
        return web.json_response({"error": "sign in first"}, status=401)

    async def _csrf_ok(self, request: web.Request, session: Session | None) -> bool:
        if request.path == "/signin":
            expected = request.cookies.get(SIGNIN_COOKIE, "")
        elif session is None:
            return False
        else:
            expected = session.csrf
        given = request.headers.get(CSRF_HEADER, "")
        if not given and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            given = str((await request.post()).get("csrf", ""))
        return bool(expected) and same_secret(given, expected)

    # ------------------------------------------------------------ helpers

    async def _call(self, function, *args, **kwargs):
        """Runs a blocking call of the core (store, execution service) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(function, *args,
                                                                                               **kwargs))

    def _page(self, template: str, request: web.Request, *, status: int = 200, **values) -> web.Response:
        session: Session | None = request.get(SESSION)
        body = self.templates.get_template(template).render(
            session=session, auth_on=self.sessions.auth_on, path=request.path, **values)
        return web.Response(text=body, status=status, content_type="text/html")

    def _saved_notice(self, item_id: str, viewer: str) -> dict | None:
        """The record the viewer's last answer made (shown once after a submit), if item_id is theirs."""
        if not item_id:
            return None
        try:
            item, state = self.service.queue.get(item_id)
            record = self.service.records.get(state.record_id) if state.state == ANSWERED else None
        except (NotFound, InvalidArgument):
            return None
        if record is None or record.annotator_id != viewer:
            return None
        return {"item": item, "record": record}

    # ------------------------------------------------------------ sign-in

    async def signin_form(self, request: web.Request) -> web.Response:
        if request[SESSION]:
            return redirect("/queue")
        return self._signin_page(request)

    def _signin_page(self, request: web.Request, error: str = "", status: int = 200) -> web.Response:
        token = request.cookies.get(SIGNIN_COOKIE) or secrets.token_urlsafe(32)
        response = self._page("signin.html", request, status=status, csrf=token, error=error,
                              next=_local_path(request.query.get("next", "/queue")))
        response.set_cookie(SIGNIN_COOKIE, token, max_age=3600, httponly=True, samesite="Strict", path="/signin",
                            secure=_secure(request))
        return response

    async def signin(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            session = self.sessions.sign_in(token=str(form.get("token", "")), name=str(form.get("name", "")))
        except SignInRefused as refusal:
            return self._signin_page(request, str(refusal), status=401)
        log.info("signed in %s (%s) on the annotation page", session.caller.name, session.caller.role)
        response = redirect(_local_path(str(form.get("next", "/queue"))))
        response.set_cookie(SESSION_COOKIE, session.session_id, max_age=int(LIFETIME_S), httponly=True,
                            samesite="Lax", path="/", secure=_secure(request))
        response.del_cookie(SIGNIN_COOKIE, path="/signin")
        return response

    async def signout(self, request: web.Request) -> web.Response:
        self.sessions.sign_out(request[SESSION].session_id)
        response = redirect("/signin")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def home(self, request: web.Request) -> web.Response:
        return redirect("/queue")

    # ------------------------------------------------------------ the queue

    async def queue_page(self, request: web.Request) -> web.Response:
        query = request.query
        selection = views.QueueSelection(task_set=query.get("task_set", ""), split=query.get("split", ""),
                                         state=query.get("state", ""), model_version=query.get("model_version", ""))
        viewer = request[SESSION].caller.name
        view = await self._call(views.queue_view, self.service, selection)
        saved = await self._call(self._saved_notice, query.get("saved", ""), viewer)
        return self._page("queue.html", request, view=view, selection=selection, saved=saved,
                          empty=query.get("empty") == "1", states=views.PAGE_STATES)

    async def next_item(self, request: web.Request) -> web.Response:
        """Leases the next item for the viewer (the one they hold, else the oldest they have not skipped)."""
        task_set, saved = request.query.get("task_set", ""), request.query.get("saved", "")
        extra = {"saved": saved} if saved else {}
        try:
            item, _ = await self._call(self.service.queue.lease, request[SESSION].caller.name, task_set=task_set,
                                       lease_s=self.lease_s)
        except NotFound:
            return redirect("/queue?" + urlencode({"empty": "1", **extra}))
        return redirect(f"/items/{item.item_id}" + (f"?{urlencode(extra)}" if extra else ""))

    async def item_page(self, request: web.Request) -> web.Response:
        """Opening an item leases it to the viewer unless it is answered or someone else holds it."""
        viewer = request[SESSION].caller.name
        item, state = await self._call(self.service.queue.get, request.match_info["item_id"])
        if state.state != ANSWERED and not (state.state == LEASED and state.leased_by != viewer):
            try:
                item, state = await self._call(self.service.queue.lease, viewer, item_id=item.item_id,
                                               lease_s=self.lease_s)
            except FailedPrecondition:   # someone took or answered it a moment ago
                item, state = await self._call(self.service.queue.get, item.item_id)
        return await self._item_response(request, item, state)

    async def _item_response(self, request: web.Request, item, state, *, status: int = 200, error: str = "",
                             feedback: str = "", refinement: str | None = None, attach: bool = False):
        viewer = request[SESSION].caller.name
        view = await self._call(views.item_view, self.service, item, state, viewer)
        record = await self._call(self.service.records.get, state.record_id) if state.record_id else None
        saved = await self._call(self._saved_notice, request.query.get("saved", ""), viewer)
        return self._page("item.html", request, status=status, view=view, record=record, saved=saved, error=error,
                          feedback=feedback, refinement=item.program if refinement is None else refinement,
                          attach=attach, program_html=views.highlighted(item.program))

    async def run_tests(self, request: web.Request) -> web.Response:
        """Runs a program against the item's tests in the sandbox (the execution service); per-test results."""
        try:
            body = await request.json()
        except ValueError:
            raise JsonError(400, "send a JSON object {\"program\": ...}") from None
        program = body.get("program") if isinstance(body, dict) else None
        if not isinstance(program, str):
            raise JsonError(400, "program must be a string")
        try:
            check_text("program", program, self.service.checks.max_program_chars)
            item, _ = await self._call(self.service.queue.get, request.match_info["item_id"])
            task = (await self._call(self.service.task_sets.get, item.task_set)).task(item.task_id)
            [result] = await self._call(self.service.checks.run_each, [(task, program)])
        except IlfError as error:
            raise JsonError(HTTP_STATUS.get(error.code_name, 500), str(error)) from None
        if isinstance(result, IlfError):
            raise JsonError(HTTP_STATUS.get(result.code_name, 500), str(result))
        load_error = f"{result.error_type}: {result.error_message}".strip(": ") if result.error_type else ""
        tests = list(per_test_results(task, result))
        html = self.templates.get_template("macros.html").module.test_rows(tests)
        return web.json_response({"passed": result.passed, "load_error": load_error, "tests": tests, "html": str(html)})

    async def answer(self, request: web.Request) -> web.Response:
        form = await request.post()
        viewer = request[SESSION].caller.name
        item_id = request.match_info["item_id"]
        # Browsers send a textarea's line breaks as CRLF; programs and feedback are stored with LF.
        feedback, refinement = (str(form.get(name, "")).replace("\r\n", "\n") for name in ("feedback", "refinement"))
        attach = form.get("attach") == "on"
        try:
            await self._call(self.service.answer, item_id, str(form.get("lease_id", "")), viewer, feedback,
                             refinement if attach else "")
        except IlfError as refusal:   # the checks said no, or the execution service is down: keep what was typed
            item, state = await self._call(self.service.queue.get, item_id)
            return await self._item_response(request, item, state, status=HTTP_STATUS.get(refusal.code_name, 500),
                                              error=str(refusal), feedback=feedback, refinement=refinement,
                                              attach=attach)
        log.info("%s answered queue item %s", viewer, item_id)
        return redirect("/next?" + urlencode({"saved": item_id}))

    async def skip(self, request: web.Request) -> web.Response:
        form = await request.post()
        await self._call(self.service.queue.skip, request.match_info["item_id"], str(form.get("lease_id", "")),
                         str(form.get("reason", "")))
        return redirect("/next")

    # ------------------------------------------------------------ progress and operators

    async def progress_page(self, request: web.Request) -> web.Response:
        return self._page("progress.html", request, view=await self._call(views.progress_view, self.service))

    async def admin_page(self, request: web.Request, *, collected=None, error: str = "",
                         values: dict | None = None) -> web.Response:
        task_sets = await self._call(self.service.task_sets.list)
        leased = await self._call(self.service.queue.list, state=LEASED)
        return self._page("admin.html", request, status=422 if error else 200, task_sets=task_sets, leased=leased,
                          collected=collected, error=error, values=values or COLLECT_DEFAULTS)

    async def collect(self, request: web.Request) -> web.Response:
        """Samples the serving model on a task set's train split and queues the failing programs (Collect)."""
        form = await request.post()
        values = dict(COLLECT_DEFAULTS)
        try:
            for name, default in COLLECT_DEFAULTS.items():
                values[name] = type(default)(form.get(name, default))
        except ValueError:
            return await self.admin_page(request, error="samples, tasks and tokens are whole numbers, temperature "
                                                        "a number", values=values)
        params = common_pb2.SamplingParams(n=values["n"], temperature=values["temperature"],
                                           max_new_tokens=values["max_new_tokens"], seed=0)
        try:
            collected = await self._call(self.service.collect, str(form.get("task_set", "")), params,
                                         max_tasks=values["max_tasks"])
        except IlfError as error:
            return await self.admin_page(request, error=str(error), values=values)
        return await self.admin_page(request, collected=collected, values=values)

    async def highlight_css(self, request: web.Request) -> web.Response:
        return web.Response(text=views.HIGHLIGHT_CSS, content_type="text/css")


def ssl_context() -> ssl.SSLContext | None:
    """HTTPS with the service's own certificate (ILF_TLS_CERT, ILF_TLS_KEY) when it has one."""
    cert, key = config.get("ILF_TLS_CERT"), config.get("ILF_TLS_KEY")
    if not (cert and key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class WebServer(BackgroundSite):
    """The annotation page on one port, on its own thread and event loop."""

    def __init__(self, page: AnnotationPage, *, host: str, port: int = 0):
        super().__init__("feedback-web", host=host, port=port, ssl_context=page.ssl_context, access_log=None)
        self.page = page

    def application(self) -> web.Application:
        return self.page.application()

    def start(self) -> None:
        try:
            super().start()
        except OSError as error:
            raise OSError(f"the annotation page {error}") from None

    def stop(self) -> None:
        super().stop()
        self.page.close()

    def listening(self) -> None:
        log.info("annotation page at %s (auth %s)", self.url, "on" if self.page.sessions.auth_on else
                 "off: anyone who can reach it signs in with a name")
