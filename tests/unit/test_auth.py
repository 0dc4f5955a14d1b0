"""API keys: hashed storage, roles, constant-time verification, and keys never in logs or errors."""

from __future__ import annotations

import logging

import pytest

from medaudit.models.errors import ConfigError
from medaudit.service.auth import (
    ANONYMOUS,
    KeyEntry,
    KeyStore,
    Principal,
    Role,
    generate_key,
    hash_key,
    parse_key_spec,
)
from medaudit.service.errors import AuthError, ForbiddenError

SALT = "deployment-salt"
CLIENT_KEY = "mda_client-secret-key-0123456789abcdefghijklmnop"
REVIEWER_KEY = "mda_reviewer-secret-key-0123456789abcdefghijklm"


@pytest.fixture
def store() -> KeyStore:
    spec = f"client:{hash_key(CLIENT_KEY, SALT)},reviewer:{hash_key(REVIEWER_KEY, SALT)}"
    return KeyStore(parse_key_spec(spec), SALT)


def test_hash_key_is_salted_hmac_sha256() -> None:
    import hashlib
    import hmac

    assert hash_key("k", "s") == hmac.new(b"s", b"k", hashlib.sha256).hexdigest()
    assert hash_key("k", "s") != hash_key("k", "t") and len(hash_key("k", "s")) == 64


def test_generate_key_is_long_and_unique() -> None:
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50 and all(len(k) >= 40 for k in keys)


def test_authenticate_bearer_and_bare(store: KeyStore) -> None:
    p = store.authenticate(f"Bearer {CLIENT_KEY}")
    assert p.role is Role.CLIENT and p.key_id.startswith("k_") and CLIENT_KEY not in p.key_id
    assert store.authenticate(f"  bearer   {REVIEWER_KEY} ").role is Role.REVIEWER
    assert store.authenticate(REVIEWER_KEY) == store.authenticate(f"Bearer {REVIEWER_KEY}")
    assert p.key_id == KeyEntry(Role.CLIENT, hash_key(CLIENT_KEY, SALT)).key_id


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "Bearer", "Bearer wrong-key", "Basic dXNlcjpwYXNz", f"Bearer {CLIENT_KEY} extra"],
)
def test_bad_credentials_are_401(store: KeyStore, header: str | None) -> None:
    with pytest.raises(AuthError) as ei:
        store.authenticate(header)
    assert ei.value.status == 401 and ei.value.to_json()["error"] == "unauthorized"
    assert ei.value.headers()["WWW-Authenticate"].startswith("Bearer")


def test_roles_are_ordered() -> None:
    reviewer, client = Principal(Role.REVIEWER, "k_1"), Principal(Role.CLIENT, "k_2")
    reviewer.require(Role.CLIENT)
    reviewer.require(Role.REVIEWER)
    client.require(Role.CLIENT)
    with pytest.raises(ForbiddenError) as ei:
        client.require(Role.REVIEWER)
    assert ei.value.status == 403 and ei.value.to_json()["required"] == "reviewer"
    assert ANONYMOUS.role is Role.REVIEWER


def test_keys_never_appear_in_logs_or_errors(store: KeyStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    near_miss = CLIENT_KEY[:-1] + "X"
    texts = []
    for header in (f"Bearer {near_miss}", near_miss, f"{near_miss} {near_miss}", f"Token {near_miss}"):
        with pytest.raises(AuthError) as ei:
            store.authenticate(header)
        texts += [str(ei.value), repr(ei.value.to_json())]
    p = store.authenticate(f"Bearer {CLIENT_KEY}")
    with pytest.raises(ForbiddenError) as fe:
        p.require(Role.REVIEWER)
    texts += [str(fe.value), repr(p), repr(store), caplog.text]
    for secret in (CLIENT_KEY, near_miss, REVIEWER_KEY, hash_key(CLIENT_KEY, SALT)):
        assert all(secret not in t for t in texts), secret
    assert "matches no stored key" in caplog.text


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("client", "entry 1 is not 'role:sha256hex'"),
        ("admin:" + "0" * 64, "unknown role 'admin'; valid roles: client, reviewer"),
        ("client:" + CLIENT_KEY, "entry 1 .* not a 64-character hex digest"),
        ("client:" + "a" * 64 + ",reviewer:" + "a" * 64, "entry 2 .* repeats"),
    ],
)
def test_bad_spec_names_entry_not_secret(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as ei:
        parse_key_spec(spec)
    assert CLIENT_KEY not in str(ei.value)


def test_spec_accepts_lines_comments_and_case() -> None:
    d1, d2 = hash_key("one", SALT), hash_key("two", SALT)
    entries = parse_key_spec(f"# keys\nclient:{d1.upper()}  # ci\n\n REVIEWER : {d2}\n")
    assert [(e.role, e.digest) for e in entries] == [(Role.CLIENT, d1), (Role.REVIEWER, d2)]
