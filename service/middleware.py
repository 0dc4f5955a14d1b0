"""ASGI middleware of the service that is not about errors or uploads: the API version header.

Every HTTP answer carries ``X-Medaudit-API: <major>.<minor>``, the version of the HTTP contract
(the OpenAPI document's ``info.version``). medaudit-client refuses a service whose major differs
from its own; a minor adds fields and routes and breaks nobody.
"""

from __future__ import annotations

from typing import Any

#: The HTTP contract's version. Bump the major when a route, field or status changes meaning or
#: disappears (and medaudit-client's ``API_VERSION`` with it); the minor for additions.
API_VERSION = "1.0"
API_HEADER = b"x-medaudit-api"


class ApiVersionHeader:
    """Adds ``X-Medaudit-API`` to every HTTP response start, whoever answered (route, framework
    error, OpenAPI document)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != API_HEADER]
                message = {**message, "headers": [*headers, (API_HEADER, API_VERSION.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_version)
