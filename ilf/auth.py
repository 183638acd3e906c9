"""Bearer-token authentication and role checks for every gRPC server, and the token clients send.

Tokens come from ILF_AUTH_TOKENS_FILE (a Kubernetes Secret mounts it): JSON
(`[{"token": ..., "role": ..., "name": ...}]`, or that list under "tokens") or lines `token role [name]`.
A `client` may generate, refine, execute and submit or read feedback; an `annotator` may read the annotation
queue and answer it (the people behind the annotation page), nothing else; an `operator` may call everything.
Health and reflection stay open so probes and grpcurl work without a token.
"""
from __future__ import annotations

import contextvars
import fnmatch
import hmac
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from ilf import config

log = logging.getLogger(__name__)

ROLES = ("client", "annotator", "operator")
OPEN_METHODS = ("grpc.health.v1.Health/*", "grpc.reflection.v1alpha.ServerReflection/*",
                "grpc.reflection.v1.ServerReflection/*")
# The one method -> role table. A method matching none of these needs `operator`, so a new RPC is
# closed until someone decides it is safe for clients.
CLIENT_METHODS = (
    "ilf.v1.Generation/Generate", "ilf.v1.Generation/GenerateStream", "ilf.v1.Generation/GetModelStatus",
    "ilf.v1.Refinement/Refine", "ilf.v1.Refinement/GetModelStatus",
    "ilf.v1.Execution/*",
    "ilf.v1.Feedback/Submit*", "ilf.v1.Feedback/Get*", "ilf.v1.Feedback/List*", "ilf.v1.Feedback/GenerateFeedback",
)
# An annotator reads the queue and writes feedback: no generation, execution, exports or model-written feedback.
ANNOTATOR_METHODS = (
    "ilf.v1.Feedback/ListQueue", "ilf.v1.Feedback/LeaseItem", "ilf.v1.Feedback/SkipItem", "ilf.v1.Feedback/AnswerItem",
    "ilf.v1.Feedback/SubmitFeedback",
)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("ilf_caller", default=None)


def caller() -> Caller | None:
    """Who made the current RPC (None when auth is off); servicers may use it to scope data."""
    return _caller.get()


def required_role(method: str) -> str | None:
    """None for open methods, else the least role that may call `method` ("/pkg.Service/Method")."""
    method = method.lstrip("/")
    if any(fnmatch.fnmatchcase(method, pattern) for pattern in OPEN_METHODS):
        return None
    if any(fnmatch.fnmatchcase(method, pattern) for pattern in CLIENT_METHODS):
        return "client"
    return "operator"


def grants(role: str, needed: str) -> bool:
    """Whether a caller of `role` may use what needs `needed`: the operator everything, the others their own."""
    return role == "operator" or role == needed


def permits(role: str, method: str) -> bool:
    """Whether a caller of `role` may call `method` ("/pkg.Service/Method")."""
    needed = required_role(method)
    return (needed is None or grants(role, needed)
            or role == "annotator" and any(fnmatch.fnmatchcase(method.lstrip("/"), p) for p in ANNOTATOR_METHODS))


def parse_tokens(text: str) -> list[tuple[str, Caller]]:
    """(token, caller) pairs from the tokens file's text; raises ValueError naming the bad entry."""
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        entries = json.loads(stripped)
        entries = entries["tokens"] if isinstance(entries, dict) else entries
        rows = [(e["token"], e["role"], e.get("name", "")) for e in entries]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) not in (2, 3):
                raise ValueError(f"tokens file line {number}: expected `token role [name]`")
            rows.append((fields[0], fields[1], fields[2] if len(fields) == 3 else ""))
    tokens = []
    for index, (token, role, name) in enumerate(rows, 1):
        if role not in ROLES:
            raise ValueError(f"tokens file entry {index}: role must be one of {ROLES}, got {role!r}")
        if len(token) < 16:
            raise ValueError(f"tokens file entry {index}: tokens must have at least 16 characters")
        tokens.append((token, Caller(name or f"{role}-{index}", role)))
    return tokens


class TokenFile:
    """The tokens file, re-read when it changes (a rotated Secret takes effect without a restart)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._tokens: list[tuple[str, Caller]] = []
        self._reload()

    def _reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            self._tokens = parse_tokens(self.path.read_text())
            self._stamp = stamp
            log.info("loaded %d tokens from %s", len(self._tokens), self.path)

    def caller_for(self, authorization: str) -> Caller | None:
        """The caller an `Authorization: Bearer <token>` value names, or None."""
        scheme, _, token = authorization.partition(" ")
        return self.lookup(token.strip()) if scheme.lower() == "bearer" else None

    def lookup(self, token: str) -> Caller | None:
        with self._lock:
            try:
                self._reload()
            except (OSError, ValueError) as error:  # keep the last good tokens; say why once per change
                log.error("keeping the previous tokens: cannot read %s: %s", self.path, error)
        found = None
        for known, who in self._tokens:  # compare against every token so timing tells nothing
            if hmac.compare_digest(known.encode(), token.encode()):
                found = who
        return found


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind as `handler` that answers `code` without parsing the request."""
    def deny(request, context):
        context.abort(code, message)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    # The stand-in request is not None, which gRPC would take for a parse failure (INTERNAL).
    return make[handler.request_streaming, handler.response_streaming](
        deny, request_deserializer=lambda data: b"", response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED without a known bearer token, PERMISSION_DENIED when its role is too low."""

    def __init__(self, tokens: TokenFile):
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        needed = required_role(handler_call_details.method)
        if handler is None or needed is None:
            return handler
        who = self.tokens.caller_for(dict(handler_call_details.invocation_metadata or ()).get("authorization", ""))
        if who is None:
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED,
                           "a valid bearer token is required (metadata `authorization: Bearer <token>`)")
        if not permits(who.role, handler_call_details.method):
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"{handler_call_details.method} needs the {needed} role; {who.name} is a {who.role}")
        return with_caller(handler, who)


def with_caller(handler, who: Caller):
    """The handler, with caller() returning `who` while it runs."""
    def wrap(behavior, streaming):
        if streaming:
            def run_stream(request, context):
                token = _caller.set(who)
                try:
                    yield from behavior(request, context)
                finally:
                    _caller.reset(token)
            return run_stream

        def run(request, context):
            token = _caller.set(who)
            try:
                return behavior(request, context)
            finally:
                _caller.reset(token)
        return run
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True), handler.request_deserializer, handler.response_serializer)
    return handler  # no streaming-request RPCs exist; they run without caller()


def server_interceptor(bind_host: str) -> AuthInterceptor | None:
    """The interceptor the settings ask for (see configured_tokens)."""
    tokens = configured_tokens(bind_host)
    return AuthInterceptor(tokens) if tokens else None


def client_headers() -> dict[str, str]:
    """HTTP headers carrying ILF_AUTH_TOKEN, for the HTTP APIs (TGI) that services call."""
    token = config.get("ILF_AUTH_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def configured_tokens(bind_host: str) -> TokenFile | None:
    """The tokens a server on bind_host checks, or None when auth is off; refuses to serve beyond
    loopback without a decision.

    ILF_AUTH=on needs ILF_AUTH_TOKENS_FILE; off disables checks; auto (default) is on with a tokens
    file, off on a loopback bind (only local processes can connect), and an error otherwise.
    """
    mode = config.get("ILF_AUTH").lower()
    path = config.get("ILF_AUTH_TOKENS_FILE")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"ILF_AUTH must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None
    if path:
        return TokenFile(path)
    if mode == "auto" and bind_host in LOOPBACK_HOSTS:
        return None
    raise RuntimeError(f"refusing to serve on {bind_host} without authentication: set ILF_AUTH_TOKENS_FILE "
                       "(see deploy/README.md) or ILF_AUTH=off to run without it")


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


def client_channel(ch: grpc.Channel) -> grpc.Channel:
    """The channel sending ILF_AUTH_TOKEN on every call, when that is set."""
    token = config.get("ILF_AUTH_TOKEN")
    return grpc.intercept_channel(ch, _BearerToken(token)) if token else ch
