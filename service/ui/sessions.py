"""Browser sessions of the reviewer workbench: a reviewer key buys a short-lived session cookie.

The key is sent once (``POST /ui/session``), checked by the service's own key store for the
reviewer role, and never stored: the browser gets a random 256-bit token in a cookie (HttpOnly,
SameSite=Strict, ``Secure`` when the request came over TLS, path ``/ui``), and Redis keeps
``<prefix>:ui:session:<sha256(token)>`` with the key's non-secret id, the session's CSRF token and
its start time. A session ends after :data:`IDLE_S` without a request or :data:`MAX_AGE_S` after it
began, whichever comes first, or at logout. Sessions live in Redis, not in a replica's memory, so
any replica answers any session and a logout is immediate everywhere.

CSRF: every state change (POST) must carry ``X-CSRF-Token`` equal to the session's token (the page
reads it from ``GET /ui/api/me``; a cross-site page cannot read it) and must not come from another
origin (``Origin`` and ``Sec-Fetch-Site``, which browsers set and pages cannot forge). The cookie's
SameSite=Strict already keeps it off cross-site requests; the token check holds without it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from medaudit.service.errors import AuthError, CrossSiteRequestError
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.review import _available, _text

COOKIE = "medaudit_ui"
#: A session ends after this long without a request…
IDLE_S = 30 * 60
#: …and this long after it began, whatever its use.
MAX_AGE_S = 8 * 3600


@dataclass(frozen=True)
class Session:
    """A signed-in reviewer: the key's fingerprint (for the review record) and the CSRF token."""

    key_id: str
    csrf: str
    started: float


def _key(keys: FlagKeys, token: str) -> str:
    return f"{keys.prefix}:ui:session:{hashlib.sha256(token.encode()).hexdigest()}"


def start(client: redis.Redis, keys: FlagKeys, key_id: str, now: float | None = None) -> tuple[str, Session]:
    """A new session for ``key_id``: ``(cookie token, session)``."""
    token = secrets.token_urlsafe(32)
    s = Session(key_id, secrets.token_urlsafe(32), time.time() if now is None else now)
    with _available():
        client.hset(
            _key(keys, token), mapping={"key_id": s.key_id, "csrf": s.csrf, "started": repr(s.started)}
        )
        client.expire(_key(keys, token), IDLE_S)
    return token, s


def current(client: redis.Redis, keys: FlagKeys, token: str | None, now: float | None = None) -> Session:
    """The live session of a cookie token, its idle timer restarted.

    Raises:
        AuthError: No cookie, or a session that ended or never was (401: sign in again).
    """
    if not token or len(token) > 100:
        raise AuthError("no reviewer session; sign in with a reviewer key at /ui/")
    with _available():
        raw = client.hgetall(_key(keys, token))
        if not raw:
            raise AuthError("the reviewer session ended; sign in again at /ui/")
        d = {_text(k): _text(v) for k, v in raw.items()}
        s = Session(d["key_id"], d["csrf"], float(d["started"]))
        if (time.time() if now is None else now) - s.started > MAX_AGE_S:
            client.delete(_key(keys, token))
            raise AuthError("the reviewer session reached its maximum age; sign in again at /ui/")
        client.expire(_key(keys, token), IDLE_S)
    return s


def end(client: redis.Redis, keys: FlagKeys, token: str | None) -> None:
    """Ends the session (logout); nothing happens for an unknown token."""
    if token and len(token) <= 100:
        with _available():
            client.delete(_key(keys, token))


def check_same_origin(headers: Mapping[str, str], host: str) -> None:
    """Refuses a state change a page of another origin sent (:class:`CrossSiteRequestError`, 403).

    ``Sec-Fetch-Site`` (sent by current browsers, never settable by a page) must be
    ``same-origin`` or ``none`` (typed by the user) when present; ``Origin`` (sent by browsers on
    every POST) must name this host when present (either scheme: behind a TLS proxy the service
    sees plain HTTP). A request with neither comes from no browser and carries no cookie a browser
    would add; the session and token checks still apply to it.
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise CrossSiteRequestError(f"a {site} request may not change anything here")
    origin = headers.get("origin")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        raise CrossSiteRequestError("the request came from another origin")


def check_csrf(session: Session, presented: str | None) -> None:
    """Refuses a state change without the session's CSRF token (403)."""
    if not presented or not hmac.compare_digest(presented.encode(), session.csrf.encode()):
        raise CrossSiteRequestError("missing or wrong X-CSRF-Token; reload the page")
