"""Dashboard sessions: a random token in an HttpOnly cookie stands for the admin key, which never leaves the login.

Kept in this process's memory with an expiry: a session opened on one replica or worker is unknown to the others
(the operator logs in again there). Each session has its own CSRF token, which state-changing requests must send in
the X-Tiergate-CSRF header as well as the cookie (the cookie is SameSite=Strict too).
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request

from backends.errors import PermissionDenied

COOKIE = "tiergate_session"
CSRF_HEADER = "x-tiergate-csrf"
SAFE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    expires_at: float  # epoch seconds


class Sessions:
    def __init__(self, lifetime_s: float = 8 * 3600, most: int = 1000) -> None:
        self.lifetime_s = lifetime_s
        self.most = most  # oldest dropped beyond this: logins cannot grow memory without bound
        self._open: dict[str, Session] = {}

    def open(self, now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        self._drop_expired(now)
        while len(self._open) >= self.most:
            del self._open[next(iter(self._open))]
        token = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(24), now + self.lifetime_s)
        self._open[token] = session
        return token, session

    def find(self, token: str | None, now: float | None = None) -> Session | None:
        if not token:
            return None
        session = self._open.get(token)
        if session is None:
            return None
        if session.expires_at <= (time.time() if now is None else now):
            del self._open[token]
            return None
        return session

    def close(self, token: str | None) -> None:
        if token:
            self._open.pop(token, None)

    def _drop_expired(self, now: float) -> None:
        for token in [token for token, session in self._open.items() if session.expires_at <= now]:
            del self._open[token]


def sessions_of(request: Request) -> Sessions:
    found: Sessions = request.app.state.sessions
    return found


def session_of(request: Request) -> Session | None:
    """The request's dashboard session (by its cookie); for a state-changing method, only with its CSRF header."""
    session = sessions_of(request).find(request.cookies.get(COOKIE))
    if session is None:
        return None
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise PermissionDenied(
                f"A dashboard session must send its CSRF token in the {CSRF_HEADER} header", code="csrf_required"
            )
    return session
