"""API-key authentication with two roles: ``client`` (audit requests) ⊂ ``reviewer`` (review queue).

Keys are stored only as ``HMAC-SHA256(salt, key)`` hex digests. API keys are long random tokens
(:func:`generate_key`: 256 bits), not passwords, so a fast keyed hash is enough: a slow KDF
(scrypt/PBKDF2) protects low-entropy secrets and would cost milliseconds per request. The salt is
per deployment (``MEDAUDIT_API_KEY_SALT``), so digests leaked from one deployment's config do not
match another's.

Spec format (``MEDAUDIT_API_KEYS`` or one entry per line in ``MEDAUDIT_API_KEYS_FILE``)::

    client:3f1c…(64 hex),reviewer:9ab0…(64 hex)

Keys never appear in logs or error messages; a :class:`Principal` carries ``key_id``, a short
fingerprint of the stored digest, for logs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from medaudit.models.errors import ConfigError
from medaudit.service.errors import AuthError, ForbiddenError

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.IntEnum):
    """Ordered roles: a higher role may do everything a lower one may."""

    CLIENT = 1
    REVIEWER = 2

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            valid = ", ".join(r.name.lower() for r in cls)
            raise ConfigError(f"unknown role {name.strip()!r}; valid roles: {valid}") from None

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    """Who made a request. ``key_id`` is a non-secret fingerprint, safe to log."""

    role: Role
    key_id: str

    def require(self, role: Role) -> None:
        """Raises :class:`ForbiddenError` (403) unless this principal has at least ``role``."""
        if self.role < role:
            raise ForbiddenError(
                f"this endpoint needs role {role}; key {self.key_id} has role {self.role}",
                role=str(self.role),
                required=str(role),
            )


#: Who a request is when authentication is switched off (``MEDAUDIT_AUTH=off``, local demos).
ANONYMOUS = Principal(Role.REVIEWER, "anonymous")


@dataclass(frozen=True)
class KeyEntry:
    """One stored key: its role and ``HMAC-SHA256(salt, key)`` hex digest."""

    role: Role
    digest: str

    @property
    def key_id(self) -> str:
        return "k_" + self.digest[:10]

    def __repr__(self) -> str:  # the digest is not the key, but keep config dumps short and dull
        return f"KeyEntry(role={self.role}, key_id={self.key_id})"


def hash_key(key: str, salt: str) -> str:
    """The stored form of an API key: ``HMAC-SHA256(salt, key)`` as 64 hex characters."""
    return hmac.new(salt.encode(), key.encode(), hashlib.sha256).hexdigest()


def generate_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return "mda_" + secrets.token_urlsafe(32)


def parse_key_spec(spec: str, source: str = "MEDAUDIT_API_KEYS") -> tuple[KeyEntry, ...]:
    """Parse ``role:hex,role:hex`` (commas or newlines; ``#`` starts a comment).

    Raises:
        ConfigError: An entry without ``:``, an unknown role, a digest that is not 64 hex
            characters, or the same digest twice. Messages name ``source`` and the entry number,
            never the digest.
    """
    entries: list[KeyEntry] = []
    seen: set[str] = set()
    items = [i.split("#", 1)[0].strip() for line in spec.splitlines() for i in line.split(",")]
    for n, item in enumerate((i for i in items if i), start=1):
        role_s, sep, digest = item.partition(":")
        if not sep:
            raise ConfigError(f"{source}: entry {n} is not 'role:sha256hex'")
        role = Role.parse(role_s)
        digest = digest.strip().lower()
        if not _HEX64.match(digest):
            raise ConfigError(
                f"{source}: entry {n} ({role}) is not a 64-character hex digest; "
                "store hash_key(key, salt), never the key itself"
            )
        if digest in seen:
            raise ConfigError(f"{source}: entry {n} ({role}) repeats an earlier key")
        seen.add(digest)
        entries.append(KeyEntry(role, digest))
    return tuple(entries)


class KeyStore:
    """Verifies presented API keys against stored digests.

    Args:
        entries: Stored keys.
        salt: The deployment's salt, the one the digests were made with.
    """

    def __init__(self, entries: Iterable[KeyEntry], salt: str) -> None:
        self._entries = tuple(entries)
        self._salt = salt

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"KeyStore({len(self._entries)} keys)"

    def authenticate(self, header_value: str | None) -> Principal:
        """The principal for an ``Authorization: Bearer <key>`` value (or a bare key).

        Every stored digest is compared in constant time, without stopping at a match, so timing
        says nothing about which entry (if any) matched.

        Raises:
            AuthError: Missing, malformed or unknown key (401). The key is never in the message.
        """
        key = _extract_key(header_value)
        presented = hash_key(key, self._salt).encode()
        match: KeyEntry | None = None
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest.encode()):
                match = entry
        if match is None:
            log.info("authentication failed: the presented API key matches no stored key")
            raise AuthError("invalid API key")
        return Principal(match.role, match.key_id)


def _extract_key(header_value: str | None) -> str:
    if header_value is None or not header_value.strip():
        raise AuthError("missing API key; send 'Authorization: Bearer <key>'")
    parts = header_value.strip().split()
    if len(parts) == 2 and parts[0].lower() == "bearer":
        return parts[1]
    if len(parts) == 1 and ":" not in parts[0]:
        return parts[0]
    # Name the scheme only when it is a well-known one: anything else might be (part of) a key.
    known = {"basic", "digest", "token", "apikey", "negotiate", "hoba", "mutual"}
    what = f"scheme {parts[0]!r}" if parts[0].lower() in known else "a value that is not 'Bearer <key>'"
    raise AuthError(f"unsupported credentials: {what}; send 'Authorization: Bearer <key>'")
