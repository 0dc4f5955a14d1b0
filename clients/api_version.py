"""The version of the service's HTTP contract this client speaks, and the header that names it."""

from __future__ import annotations

__all__ = ["API_HEADER", "API_VERSION"]

#: The API this client speaks. The service names its own in the ``X-Medaudit-API`` header of every
#: answer; a different major version is refused (:class:`~medaudit.clients.errors.IncompatibleServer`),
#: a newer minor is fine.
API_VERSION = "1.1"
#: The response header carrying the service's API version (lower case, as httpx normalises it).
API_HEADER = "x-medaudit-api"
