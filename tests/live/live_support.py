"""What the tests/live suites share: the :class:`Live` handle on the served process, its settings,
and validation of response bodies against the service's own OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jsonschema

from medaudit.service.process import Server

SALT = "live-salt"
MAX_BYTES = 8 * 2**20
MAX_PIXELS = 20_000_000


@dataclass(frozen=True)
class Live:
    """The live service and what the tests need to talk to it."""

    server: Server
    client_key: str
    reviewer_key: str
    prefix: str

    @property
    def base(self) -> str:
        return self.server.base

    def client(self, key: str | None = "client", timeout: float = 60.0) -> httpx.Client:
        """An HTTP client sending the client's key (``key="client"``), the reviewer's, another
        string as the key, or (``None``) no key at all."""
        secret = {"client": self.client_key, "reviewer": self.reviewer_key}.get(key or "", key)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def openapi(self) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/openapi.json", timeout=10)
        r.raise_for_status()
        return dict(r.json())


def response_validator(live: Live) -> Callable[[str, Any], None]:
    """``validate(path, body)``: raises :class:`jsonschema.ValidationError` unless ``body`` is the
    documented 200 body of ``POST path`` (or ``GET path`` for the read-only routes)."""
    doc = live.openapi()
    validators: dict[str, jsonschema.Draft202012Validator] = {}
    for path, ops in doc["paths"].items():
        op = ops.get("post") or ops.get("get")
        schema = op["responses"]["200"].get("content", {}).get("application/json", {}).get("schema")
        if schema is not None:
            validators[path] = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})

    def validate(path: str, body: Any) -> None:
        validators[path].validate(body)

    return validate
