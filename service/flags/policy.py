"""When an audited prediction becomes a flag for human review: a pure function of its concept scores.

A concept flags when the artifact is **there** and the prediction **uses** it:

* *present*: the score is above the concept bank's calibrated threshold (``ConceptScore.present``,
  set at the configured false-positive rate), and its calibrated percentile is at least
  ``min_percentile`` (0 by default: the bank's threshold alone decides);
* *relied on*: the concept carries more than ``share`` of the class relevance at the CAV layer
  (strictly more: a share equal to the threshold does not flag), **or** the caller says that the
  corrected version (e.g. a ClArC shadow) disagrees with the answering one, which is direct
  behavioural evidence that the artifact changed the answer.

Presence alone is not enough: a band-aid that the model ignores is no reason to doubt the answer.

Severity counts the strong signals: share ≥ ``high_share``, percentile ≥ ``high_percentile``, and a
disagreeing corrected version. None: ``low``; one: ``medium``; two or more: ``high``.

Every threshold is configurable per concept (:class:`PolicyConfig`), e.g.
``MEDAUDIT_FLAG_POLICY="share=0.2,band_aid:share=0.15,ruler:enabled=0"``.

This is the one place a flag is decided: the audit engine only scores. The module is
transport-free and imports no torch: the scores are duck-typed (:class:`ScoreLike`),
so :class:`medaudit.service.audit.ConceptScore` and test doubles both work.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, cast

from medaudit.models.errors import ConfigError

#: The variable a policy spec usually comes from (named in parse errors).
POLICY_VAR = "MEDAUDIT_FLAG_POLICY"
_CONCEPT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ScoreLike(Protocol):
    """What the policy reads from one concept's score (:class:`medaudit.service.audit.ConceptScore`)."""

    @property
    def concept(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def percentile(self) -> float: ...
    @property
    def present(self) -> bool: ...
    @property
    def threshold(self) -> float: ...
    @property
    def relevance_share(self) -> float: ...


class HasConcepts(Protocol):
    """An audit result (:class:`medaudit.service.audit.AuditResult`): anything with ``concepts``."""

    @property
    def concepts(self) -> Iterable[ScoreLike]: ...


class Severity(enum.IntEnum):
    """Ordered, so the worst of several flags is ``max``."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Severity:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown severity {name!r}; valid: low, medium, high") from None


@dataclass(frozen=True)
class ConceptPolicy:
    """Thresholds for one concept.

    Attributes:
        enabled: False: the concept never flags (e.g. a concept known to be harmless).
        share: Relevance share above which the prediction relies on the concept, in [0, 1].
        min_percentile: Calibrated percentile the score must also reach, in [0, 100].
        high_share: Share from which reliance counts as a strong signal, in [0, 1].
        high_percentile: Percentile from which presence counts as a strong signal, in [0, 100].
    """

    enabled: bool = True
    share: float = 0.2
    min_percentile: float = 0.0
    high_share: float = 0.5
    high_percentile: float = 99.0

    def __post_init__(self) -> None:
        for name, hi in (
            ("share", 1.0),
            ("high_share", 1.0),
            ("min_percentile", 100.0),
            ("high_percentile", 100.0),
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= hi):
                raise ConfigError(f"{name} must lie in [0, {hi:g}], got {v!r}")


#: Spec keys -> (field, parser). Short names because specs are typed into environment variables.
_KEYS: dict[str, str] = {
    "enabled": "enabled",
    "share": "share",
    "min_pct": "min_percentile",
    "high_share": "high_share",
    "high_pct": "high_percentile",
}


@dataclass(frozen=True)
class PolicyConfig:
    """Defaults plus per-concept overrides. Frozen and hashable: built once at start.

    Attributes:
        default: Thresholds for every concept without an override.
        overrides: ``(concept, policy)`` pairs; each override starts from ``default``.
    """

    default: ConceptPolicy = field(default_factory=ConceptPolicy)
    overrides: tuple[tuple[str, ConceptPolicy], ...] = ()

    def __post_init__(self) -> None:
        names = [c for c, _ in self.overrides]
        if len(set(names)) != len(names):
            raise ConfigError(f"the flag policy overrides a concept twice: {', '.join(names)}")

    def for_concept(self, concept: str) -> ConceptPolicy:
        return dict(self.overrides).get(concept, self.default)

    def check_concepts(self, known: Iterable[str], source: str = POLICY_VAR) -> None:
        """Raises ConfigError for an override naming a concept no served bank has (a typo).

        Call it at start with the union of the served banks' concepts.
        """
        known_set = set(known)
        unknown = [c for c, _ in self.overrides if c not in known_set]
        if unknown:
            raise ConfigError(
                f"{source} names concepts no served concept bank has: {', '.join(unknown)}; "
                f"known concepts: {', '.join(sorted(known_set)) or '(none)'}"
            )

    @classmethod
    def parse(cls, spec: str, default: ConceptPolicy | None = None, source: str = POLICY_VAR) -> PolicyConfig:
        """Parses ``key=value`` items (defaults) and ``concept:key=value`` items (overrides).

        Items are separated by commas or semicolons; order does not matter (overrides start from
        the final defaults). Keys: ``enabled`` (on/off), ``share``, ``min_pct``, ``high_share``,
        ``high_pct``. Example: ``share=0.2,band_aid:share=0.15,ruler:enabled=0``.

        Args:
            spec: The spec; empty means ``default`` for everything.
            default: Defaults the spec's default items change (e.g. the service's flag share).
            source: Named in error messages (the environment variable).

        Raises:
            ConfigError: An item without ``=``, an unknown key, a bad concept name, a value that
                does not parse or is out of range, or a key set twice for the same scope.
        """
        base: dict[str, Any] = {}
        per: dict[str, dict[str, Any]] = {}
        for item in (i.strip() for i in re.split(r"[,;]", spec)):
            if not item:
                continue
            lhs, sep, raw = item.partition("=")
            if not sep or not lhs.strip() or not raw.strip():
                raise ConfigError(f"{source}: {item!r} is not 'key=value' or 'concept:key=value'")
            concept, colon, key = lhs.strip().rpartition(":")
            key = key.strip()
            if key not in _KEYS:
                raise ConfigError(
                    f"{source}: unknown key {key!r} in {item!r}; valid keys: {', '.join(_KEYS)}"
                )
            scope = base
            if colon:
                concept = concept.strip()
                if not _CONCEPT.match(concept):
                    raise ConfigError(f"{source}: {concept!r} in {item!r} is not a concept name")
                scope = per.setdefault(concept, {})
            fname = _KEYS[key]
            if fname in scope:
                where = f"concept {concept!r}" if colon else "the defaults"
                raise ConfigError(f"{source}: {key} is set twice for {where}")
            scope[fname] = _value(fname, raw.strip(), item, source)
        try:
            dflt = replace(default or ConceptPolicy(), **base)
        except ConfigError as e:
            raise ConfigError(f"{source}: defaults: {e}") from None
        overrides = []
        for concept, kw in per.items():
            try:
                overrides.append((concept, replace(dflt, **kw)))
            except ConfigError as e:
                raise ConfigError(f"{source}: concept {concept!r}: {e}") from None
        return cls(dflt, tuple(overrides))

    def to_spec(self) -> str:
        """The spec that :meth:`parse` turns back into this config (every field, explicit)."""
        rev = {f: k for k, f in _KEYS.items()}

        def items(p: ConceptPolicy, prefix: str) -> list[str]:
            out = []
            for f in fields(p):
                v = getattr(p, f.name)
                out.append(
                    f"{prefix}{rev[f.name]}={('on' if v else 'off') if isinstance(v, bool) else repr(v)}"
                )
            return out

        parts = items(self.default, "")
        for c, p in self.overrides:
            parts += items(p, f"{c}:")
        return ",".join(parts)


def _value(fname: str, raw: str, item: str, source: str) -> bool | float:
    if fname == "enabled":
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{source}: {item!r}: enabled must be on/off, true/false, 1/0 or yes/no")
    try:
        v = float(raw)
    except ValueError:
        raise ConfigError(f"{source}: {item!r}: {raw!r} is not a number") from None
    return v


@dataclass(frozen=True)
class ConceptFlag:
    """One concept that flags a prediction, with why.

    Attributes:
        concept: The concept (artifact) name.
        score: ⟨φ(x), v⟩.
        threshold: The bank's presence threshold the score exceeded.
        percentile: Calibrated percentile among clean validation scores.
        relevance_share: Its share of the class relevance at the CAV layer.
        severity: See the module docstring.
        reasons: Human-readable sentences, presence first, then each reliance signal.
        relied_on: Which reliance signals held: ``"share"`` and/or ``"corrected_disagrees"``.
    """

    concept: str
    score: float
    threshold: float
    percentile: float
    relevance_share: float
    severity: Severity
    reasons: tuple[str, ...]
    relied_on: tuple[str, ...]


@dataclass(frozen=True)
class PolicyDecision:
    """The flags of one audit result (empty: not flagged)."""

    flags: tuple[ConceptFlag, ...] = ()

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    @property
    def severity(self) -> Severity | None:
        """The worst severity among the flags, or None when not flagged."""
        return max((f.severity for f in self.flags), default=None)

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(f.concept for f in self.flags)

    def to_json(self) -> dict[str, Any]:
        """The response's ``flag``: each flag, plus flat ``concepts`` and ``reasons`` lists
        (``"concept: reason"``) for clients that only list them."""
        return {
            "flagged": self.flagged,
            "severity": None if self.severity is None else str(self.severity),
            "flags": [
                {
                    "concept": f.concept,
                    "severity": str(f.severity),
                    "reasons": list(f.reasons),
                    "relied_on": list(f.relied_on),
                }
                for f in self.flags
            ],
            "concepts": list(self.concepts),
            "reasons": [f"{f.concept}: {r}" for f in self.flags for r in f.reasons],
        }


def evaluate(
    result: HasConcepts | Iterable[ScoreLike],
    policy: PolicyConfig | None = None,
    corrected_disagrees: bool | None = None,
) -> PolicyDecision:
    """Decides which concepts flag an audit result (see the module docstring). Pure.

    Args:
        result: An :class:`medaudit.service.audit.AuditResult`, or its concept scores.
        policy: Thresholds; the defaults of :class:`ConceptPolicy` when None.
        corrected_disagrees: Whether a corrected version's label differs from the answering
            version's for this input; None when no corrected version was asked.

    Returns:
        One :class:`ConceptFlag` per flagging concept, in the order of the scores.
    """
    policy = policy or PolicyConfig()
    scores = cast("Iterable[ScoreLike]", getattr(result, "concepts", result))
    flags = []
    for c in scores:
        p = policy.for_concept(c.concept)
        if not (p.enabled and c.present and c.percentile >= p.min_percentile):
            continue
        by_share = c.relevance_share > p.share
        relied = (("share",) if by_share else ()) + (("corrected_disagrees",) if corrected_disagrees else ())
        if not relied:
            continue
        reasons = [
            f"{c.concept} present: score {c.score:.3g} > threshold {c.threshold:.3g} "
            f"(percentile {c.percentile:.1f} among clean images)"
        ]
        if by_share:
            reasons.append(
                f"the prediction relies on it: {c.relevance_share:.0%} of the class relevance "
                f"(> {p.share:.0%})"
            )
        if corrected_disagrees:
            reasons.append("the artifact-corrected version gives a different label")
        strong = (
            int(c.relevance_share >= p.high_share)
            + int(c.percentile >= p.high_percentile)
            + int(bool(corrected_disagrees))
        )
        severity = Severity.LOW if strong == 0 else Severity.MEDIUM if strong == 1 else Severity.HIGH
        flags.append(
            ConceptFlag(
                concept=c.concept,
                score=float(c.score),
                threshold=float(c.threshold),
                percentile=float(c.percentile),
                relevance_share=float(c.relevance_share),
                severity=severity,
                reasons=tuple(reasons),
                relied_on=relied,
            )
        )
    return PolicyDecision(tuple(flags))


__all__ = [
    "POLICY_VAR",
    "ConceptFlag",
    "ConceptPolicy",
    "PolicyConfig",
    "PolicyDecision",
    "ScoreLike",
    "Severity",
    "evaluate",
]
