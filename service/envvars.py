"""Parsing helpers shared by every settings class that reads ``MEDAUDIT_*`` variables.

Errors are :class:`medaudit.models.errors.ConfigError` naming the variable and the value, so a bad
deployment setting fails at start with a message the operator can act on.
"""

from __future__ import annotations

from collections.abc import Mapping

from medaudit.models.errors import ConfigError


def positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    """``env[name]`` as an integer ≥ 1 (``_`` separators allowed), or ``default`` when unset."""
    if name not in env:
        return default
    s = env[name].strip().replace("_", "")
    try:
        v = int(s)
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, got {env[name]!r}") from None
    if v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {env[name]!r}")
    return v
