"""Parsing helpers shared by every settings class that reads ``MEDAUDIT_*`` variables.

Errors are :class:`medaudit.models.errors.ConfigError` naming the variable and the value, so a bad
deployment setting fails at start with a message the operator can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def unit_float(env: Mapping[str, str], name: str, default: float) -> float:
    """``env[name]`` as a number in [0, 1] (a rate or a share), or ``default`` when unset."""
    if name not in env:
        return default
    try:
        v = float(env[name])
    except ValueError:
        raise ConfigError(f"{name} must be a number in [0, 1], got {env[name]!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {env[name]!r}")
    return v


def choice(env: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    """``env[name]`` (case-insensitive) as one of ``choices``, or ``default`` when unset."""
    if name not in env:
        return default
    v = env[name].strip().lower()
    if v not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {env[name]!r}")
    return v
