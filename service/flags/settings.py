"""``MEDAUDIT_FLAG_*`` settings of the flag pipeline, parsed once like
:class:`medaudit.service.config.Settings`.

Light on purpose (no redis import): :class:`medaudit.service.config.Settings` holds a :class:`FlagSettings`
as ``settings.flags``.

=================================  ==========================================================
``MEDAUDIT_FLAG_POLICY``           per-concept flag policy, e.g. ``share=0.2,ruler:enabled=0``
                                   (see :mod:`medaudit.service.flags.policy`; default: every concept,
                                   share 0.2)
``MEDAUDIT_FLAG_PREFIX``           Redis key prefix (default ``medaudit``)
``MEDAUDIT_FLAG_MAXLEN``           approximate stream length cap, entries (default 100 000)
``MEDAUDIT_FLAG_TTL``              lifetime of heatmaps, masks and features, s (default 7 days);
                                   also the window in which a re-published request is recognised
``MEDAUDIT_FLAG_SPOOL_DIR``        local spool for events Redis did not take (default
                                   ``~/.local/state/medaudit/flag-spool``)
``MEDAUDIT_FLAG_QUEUE``            in-memory queue between requests and the publisher thread
                                   (default 1000 requests)
``MEDAUDIT_FLAG_GROUP``            the workers' consumer group (default ``medaudit-review``)
``MEDAUDIT_FLAG_MIN_IDLE_MS``      a pending entry idle this long is reclaimed from its consumer
                                   (default 60 000; above the slowest handler)
``MEDAUDIT_FLAG_MAX_DELIVERIES``   deliveries before an entry goes to the dead-letter stream
                                   (default 5)
``MEDAUDIT_SUBJECT_SECRET``        keys the HMAC-SHA256 a flag stores of ``X-Subject-Key``
                                   (unset: plain sha256); shared with the DICOM routes
=================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medaudit.models.errors import ConfigError
from medaudit.service.envvars import positive_int
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.policy import POLICY_VAR, ConceptPolicy, PolicyConfig

PREFIX = "MEDAUDIT_FLAG_"
#: Variable names (after ``MEDAUDIT_``) these settings read: for
#: ``medaudit.service.config.unknown_variables``.
NAMES = (
    "FLAG_POLICY",
    "FLAG_PREFIX",
    "FLAG_MAXLEN",
    "FLAG_TTL",
    "FLAG_SPOOL_DIR",
    "FLAG_QUEUE",
    "FLAG_GROUP",
    "FLAG_MIN_IDLE_MS",
    "FLAG_MAX_DELIVERIES",
)
DEFAULT_TTL_S = 7 * 24 * 3600


def default_spool_dir() -> Path:
    """``$XDG_STATE_HOME/medaudit/flag-spool`` (``~/.local/state/…``): survives reboots, unlike /tmp."""
    import os

    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "medaudit" / "flag-spool"


@dataclass(frozen=True)
class FlagSettings:
    """The flag pipeline's settings (see the module docstring for the variables)."""

    policy_spec: str = ""
    prefix: str = "medaudit"
    maxlen: int = 100_000
    ttl_s: int = DEFAULT_TTL_S
    spool_dir: Path | None = None
    queue_size: int = 1000
    group: str = "medaudit-review"
    min_idle_ms: int = 60_000
    max_deliveries: int = 5
    subject_secret: str | None = field(default=None, repr=False)  # MEDAUDIT_SUBJECT_SECRET

    def __post_init__(self) -> None:
        try:
            FlagKeys(self.prefix)
        except ConfigError as e:
            raise ConfigError(f"{PREFIX}PREFIX: {e}") from None
        self.policy()  # validates the spec now rather than on the first flag
        if not self.group or any(c.isspace() for c in self.group):
            raise ConfigError(f"{PREFIX}GROUP must be a non-empty name without spaces, got {self.group!r}")

    @property
    def keys(self) -> FlagKeys:
        return FlagKeys(self.prefix)

    def policy(self, default_share: float | None = None) -> PolicyConfig:
        """The flag policy; ``default_share`` (``Settings.flag_share``) seeds the default share."""
        base = ConceptPolicy() if default_share is None else ConceptPolicy(share=default_share)
        return PolicyConfig.parse(self.policy_spec, base, source=POLICY_VAR)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FlagSettings:
        """Reads ``MEDAUDIT_FLAG_*``; empty values count as unset.

        Raises:
            ConfigError: A value that does not parse or is out of range, naming the variable.
        """
        env = {k: v for k, v in environ.items() if v.strip() != ""}
        spool = env.get(PREFIX + "SPOOL_DIR")
        return cls(
            policy_spec=env.get(PREFIX + "POLICY", ""),
            prefix=env.get(PREFIX + "PREFIX", cls.prefix).strip(),
            maxlen=positive_int(env, PREFIX + "MAXLEN", cls.maxlen),
            ttl_s=positive_int(env, PREFIX + "TTL", cls.ttl_s),
            spool_dir=Path(spool) if spool else None,
            queue_size=positive_int(env, PREFIX + "QUEUE", cls.queue_size),
            group=env.get(PREFIX + "GROUP", cls.group).strip(),
            min_idle_ms=positive_int(env, PREFIX + "MIN_IDLE_MS", cls.min_idle_ms),
            max_deliveries=positive_int(env, PREFIX + "MAX_DELIVERIES", cls.max_deliveries),
            subject_secret=env.get("MEDAUDIT_SUBJECT_SECRET"),
        )
