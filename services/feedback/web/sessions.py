"""Sessions of the annotation page.

A bearer token from the tokens file, given once in the sign-in form, becomes a random session id in an HttpOnly,
SameSite cookie (Secure over HTTPS); the token never goes back to the browser. Each session has its own CSRF token,
which every form post and script call must carry. Sessions live in this process's memory, so sign-out ends one at
once, as do the idle limit and the token leaving the tokens file (or changing role); a restart signs everyone out
(their leases stay until they expire).

With auth off (ILF_AUTH=off, or a loopback bind without a tokens file, as in `make demo`) the form asks for a name
only and the session may do everything, as every gRPC caller may then.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from ilf.auth import Caller, TokenFile, grants
from services.feedback.checks import MAX_ANNOTATOR_CHARS

IDLE_S = 8 * 3600.0           # a session unused this long ends
LIFETIME_S = 24 * 3600.0      # and every session ends after this long
PAGE_ROLES = ("annotator", "operator")


class SignInRefused(Exception):
    """The reason a sign-in failed, for the form."""


@dataclass
class Session:
    session_id: str
    caller: Caller
    csrf: str
    token: str              # the bearer token it was made from; empty with auth off
    created_at: float
    last_seen: float

    def may(self, role: str) -> bool:
        return grants(self.caller.role, role)


def same_secret(given: str, expected: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


class Sessions:
    def __init__(self, tokens: TokenFile | None, clock=time.time):
        self.tokens = tokens
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    @property
    def auth_on(self) -> bool:
        return self.tokens is not None

    def sign_in(self, token: str = "", name: str = "") -> Session:
        """A new session for the token's caller (auth on) or for `name` (auth off); SignInRefused says why not."""
        if self.tokens is None:
            name = name.strip()
            if not name or len(name) > MAX_ANNOTATOR_CHARS or not name.isprintable():
                raise SignInRefused(f"give a name of 1 to {MAX_ANNOTATOR_CHARS} printable characters")
            caller = Caller(name, "operator")
        else:
            caller = self.tokens.lookup(token.strip()) if token.strip() else None
            if caller is None:
                raise SignInRefused("that token is not in the tokens file")
            if not any(grants(caller.role, role) for role in PAGE_ROLES):
                raise SignInRefused(f"the annotation page needs an annotator or operator token; {caller.name} is a "
                                    f"{caller.role}")
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), caller, secrets.token_urlsafe(32), token.strip(), now, now)
        with self._lock:
            self._sweep(now)
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        """The live session of that id, or None (unknown, signed out, idle too long, or its token revoked)."""
        now = self.clock()
        with self._lock:
            session = self._sessions.get(session_id) if session_id else None
            if session is None:
                return None
            if not self._alive(session, now):
                del self._sessions[session_id]
                return None
            session.last_seen = now
            return session

    def _alive(self, session: Session, now: float) -> bool:
        return not _expired(session, now) and (self.tokens is None or self.tokens.lookup(session.token) == session.caller)

    def _sweep(self, now: float) -> None:
        for session_id in [s.session_id for s in self._sessions.values() if _expired(s, now)]:
            del self._sessions[session_id]

    def sign_out(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)


def _expired(session: Session, now: float) -> bool:
    return now - session.last_seen > IDLE_S or now - session.created_at > LIFETIME_S
