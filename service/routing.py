"""A/B assignment of requests to model versions, plus an optional shadow version.

Assignment is *weighted rendezvous hashing* (Thaler & Ravishankar 1998; the weighted form of
Schindelhauer & Schomaker 2005): for a subject key k, each version v with weight w_v > 0 draws
``u_v = H(salt, v, k)`` uniform in (0, 1) from SHA-256, and the key goes to the version with the
smallest ``-ln(u_v) / w_v``. Those are independent exponentials with rates w_v, so
``P(v) = w_v / Σw``. Unlike cumulative ranges over [0, 1), changing one version's weight only moves
keys to or from *that* version, and adding a version only takes keys from the others: a subject
never flips between two versions whose weights did not change.

An explicit version (a request header) always wins; a request without a key is assigned at random
with the same weights.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from medaudit.models.errors import ConfigError
from medaudit.service.errors import UnknownModelVersionError

Via = Literal["explicit", "hash", "random"]


@dataclass(frozen=True)
class Route:
    """Where one request goes.

    Attributes:
        version: The version that answers.
        shadow: A version that also sees the request (answer discarded), or ``None``.
        via: How ``version`` was chosen: a low-cardinality metrics label.
    """

    version: str
    shadow: str | None
    via: Via

    def to_json(self) -> dict[str, str | None]:
        return {"version": self.version, "shadow": self.shadow, "via": self.via}


class Router:
    """Deterministic weighted A/B assignment over served versions.

    Args:
        weights: Version -> non-negative weight; a version with weight 0 is served only when asked
            for explicitly (or as the shadow). Normalised to sum 1.
        shadow: A served version that also receives every request, or ``None``.
        salt: Mixed into the hash; change it to reshuffle all subjects (a new experiment).
        rng: Source for key-less requests (seed it in tests).

    Raises:
        ConfigError: Empty or non-string versions, negative / non-finite weights, zero total, or a
            shadow that is not served.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        shadow: str | None = None,
        *,
        salt: str = "",
        rng: random.Random | None = None,
    ) -> None:
        if not weights:
            raise ConfigError("A/B weights are empty; give at least one version a positive weight")
        clean: dict[str, float] = {}
        for version, w in weights.items():
            if not isinstance(version, str) or not version.strip():
                raise ConfigError(f"A/B version names must be non-empty strings, got {version!r}")
            try:
                wf = float(w)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"A/B weight of {version!r} must be a number, got {w!r}") from e
            if not math.isfinite(wf) or wf < 0:
                raise ConfigError(f"A/B weight of {version!r} must be finite and >= 0, got {w!r}")
            clean[version] = wf
        total = sum(clean.values())
        if total <= 0:
            raise ConfigError(f"A/B weights sum to 0 ({clean}); give at least one version a positive weight")
        self._weights = {v: w / total for v, w in sorted(clean.items())}
        self._active = [(v, w) for v, w in self._weights.items() if w > 0]
        if shadow is not None and shadow not in self._weights:
            raise ConfigError(
                f"shadow version {shadow!r} is not served; served versions: {', '.join(self._weights)}"
            )
        self.shadow = shadow
        self._salt = salt.encode()
        self._rng = rng or random.Random()

    @property
    def versions(self) -> tuple[str, ...]:
        """Every served version, sorted."""
        return tuple(self._weights)

    @property
    def weights(self) -> dict[str, float]:
        """Normalised weights (sum 1), sorted by version."""
        return dict(self._weights)

    def _uniform(self, version: str, key: str) -> float:
        h = hashlib.sha256(self._salt + b"\x00" + version.encode() + b"\x00" + key.encode()).digest()
        return (int.from_bytes(h[:8], "big") + 0.5) / 2.0**64  # in (0, 1), never 0

    def assign(self, subject_key: str | None) -> str:
        """The version for a subject: deterministic for a key, weighted-random without one."""
        if subject_key is None:
            versions, ws = zip(*self._active, strict=True)
            return self._rng.choices(versions, weights=ws)[0]
        return min(self._active, key=lambda vw: -math.log(self._uniform(vw[0], subject_key)) / vw[1])[0]

    def choose(self, explicit: str | None, subject_key: str | None) -> str:
        """An explicit version if given (it must be served), else :meth:`assign`.

        Raises:
            UnknownModelVersionError: ``explicit`` is not a served version (404, lists the valid ones).
        """
        return self.route(explicit, subject_key).version

    def route(self, explicit: str | None, subject_key: str | None) -> Route:
        """Like :meth:`choose`, with the shadow and how the version was chosen."""
        explicit = explicit.strip() if explicit else None
        key = subject_key if subject_key else None
        if explicit:
            if explicit not in self._weights:
                raise UnknownModelVersionError(explicit, self._weights)
            version, via = explicit, "explicit"
        else:
            version, via = self.assign(key), ("hash" if key is not None else "random")
        shadow = self.shadow if self.shadow != version else None
        return Route(version, shadow, via)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"Router(weights={self._weights}, shadow={self.shadow!r})"
