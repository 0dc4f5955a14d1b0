"""The flag event on the stream (versioned) and the Redis key layout of the flag pipeline.

One event per flagging concept of one audited request: ``flag_id = f"{request_id}:{concept}"``.
The stream carries ids, numbers and object keys only, never the image: the heatmap PNG, the
concept's mask PNG and the feature vector live under their own keys with a TTL
(:class:`FlagKeys`), and the event references them.

Field values are strings (Redis stream fields are bytes); :meth:`FlagEvent.to_fields` and
:meth:`FlagEvent.from_fields` are exact inverses, and ``from_fields`` refuses an entry of another
schema version or with a missing or malformed field (:class:`EventFormatError`), which the worker
treats as a poison entry.

Bump :data:`SCHEMA_VERSION` when a field changes meaning or is removed; adding an optional field
with a default does not need a bump.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from medaudit.models.errors import ConfigError
from medaudit.service.errors import EventFormatError

SCHEMA_VERSION = 1
#: Request ids become part of Redis keys and URLs: no whitespace, no slash, bounded length.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def subject_hash(subject_key: str | None, secret: str | None = None) -> str:
    """A hex digest of the caller's ``X-Subject-Key``, so the raw key never reaches Redis ("" if
    none): HMAC-SHA256 keyed with ``secret`` (``MEDAUDIT_SUBJECT_SECRET``) when one is set, since
    a subject key is often a patient or accession number, few enough to hash every candidate and
    match an unkeyed sha256; plain sha256 without a secret."""
    if not subject_key:
        return ""
    if secret:
        return hmac.new(secret.encode(), subject_key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(subject_key.encode()).hexdigest()


def check_request_id(request_id: str) -> str:
    """Refuses a request id that cannot be part of a key and a URL path segment."""
    if not _REQUEST_ID.match(request_id):
        raise ValueError(
            f"request id {request_id!r} must be 1-128 characters of letters, digits and . _ : @ + -"
        )
    return request_id


@dataclass(frozen=True)
class FlagKeys:
    """Every Redis key the pipeline uses, under one prefix (tests use a unique prefix each).

    Attributes:
        prefix: Key prefix (``MEDAUDIT_FLAG_PREFIX``, default ``medaudit``).
    """

    prefix: str = "medaudit"

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ConfigError(
                f"flag key prefix {self.prefix!r} must be 1-64 characters of letters, digits and . _ : -"
            )

    @property
    def stream(self) -> str:
        """The flag stream (``XADD … MAXLEN ~``)."""
        return f"{self.prefix}:flags"

    @property
    def dlq(self) -> str:
        """Dead-letter stream: entries that failed ``max_deliveries`` times."""
        return f"{self.prefix}:flags:dlq"

    def review(self, flag_id: str) -> str:
        """One flag's review record (a hash), written by the worker."""
        return f"{self.prefix}:review:{flag_id}"

    @property
    def open_index(self) -> str:
        """Sorted set of open flag ids, scored by flag time (ms)."""
        return f"{self.prefix}:reviews:open"

    @property
    def resolved_index(self) -> str:
        """Sorted set of resolved flag ids, scored by resolution time (ms)."""
        return f"{self.prefix}:reviews:resolved"

    def published(self, request_id: str) -> str:
        """Idempotency marker: set when a request's flags were added to the stream."""
        return f"{self.prefix}:published:{request_id}"

    def blob(self, request_id: str, kind: str) -> str:
        """Binary objects of one request: ``heatmap`` (the blend), ``image`` (the bare model-size
        input), ``heat_layer`` (the heatmap alone, RGBA), ``features``, ``mask:<concept>``."""
        return f"{self.prefix}:blob:{request_id}:{kind}"

    def scan_pattern(self) -> str:
        """Matches every key under this prefix (``SCAN MATCH``; for tests and clean-up)."""
        return f"{self.prefix}:*"


@dataclass(frozen=True)
class FlagEvent:
    """One flagging concept of one audited request, as it travels on the stream.

    Attributes:
        flag_id: ``f"{request_id}:{concept}"``: the review record's key and the idempotency key
            of the worker.
        request_id: The HTTP request's id (``X-Request-ID``).
        created_at: UTC ISO 8601 time of the audit.
        created_ms: The same as Unix milliseconds (sort key of the review index).
        model_version: The answering version.
        layer: The concept bank's CAV layer (where ``features`` were taken).
        concept: The flagging concept.
        score, threshold, percentile, relevance_share: From the concept score.
        severity: ``low``, ``medium`` or ``high`` (:mod:`medaudit.service.flags.policy`).
        reasons: Human-readable reasons.
        label, probability: The answering version's prediction.
        subject_hash: :func:`subject_hash` of ``X-Subject-Key``; "" when the request had none.
        corrected_disagrees: "1"/"0" when a corrected version was asked, "" otherwise.
        corrected_version, corrected_label, corrected_probability: That corrected (shadow)
            version's name, label and the probability of its label ("", "", None when none was
            asked, and on events written before these fields existed).
        heatmap_key, mask_key, features_key: Object keys ("" when absent). ``heatmap_key`` is the
            image with the class heatmap blended in (what ``/reviews`` and ``medaudit review``
            hand out).
        image_key, heat_layer_key: The bare model-size input (RGB PNG) and the class heatmap as
            its own layer (RGBA PNG: red positive, blue negative, alpha = |relevance| / max), so
            a viewer can show the image with the heatmap toggled off; "" on older events.
        features_dim: Length of the float32 feature vector under ``features_key`` (0: none).
        schema: :data:`SCHEMA_VERSION`.
    """

    flag_id: str
    request_id: str
    created_at: str
    created_ms: int
    model_version: str
    layer: str
    concept: str
    score: float
    threshold: float
    percentile: float
    relevance_share: float
    severity: str
    reasons: tuple[str, ...]
    label: str
    probability: float
    subject_hash: str = ""
    corrected_disagrees: str = ""
    corrected_version: str = ""
    corrected_label: str = ""
    corrected_probability: float | None = None
    heatmap_key: str = ""
    mask_key: str = ""
    features_key: str = ""
    features_dim: int = 0
    image_key: str = ""
    heat_layer_key: str = ""
    schema: int = SCHEMA_VERSION

    def to_fields(self) -> dict[str, str]:
        """Stream fields: every attribute as a string (``reasons`` as a JSON list, None as "")."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = ""
            elif f.name == "reasons":
                out[f.name] = json.dumps(list(v))
            elif isinstance(v, float):
                out[f.name] = repr(v)
            else:
                out[f.name] = str(v)
        return out

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> FlagEvent:
        """Inverse of :meth:`to_fields`; accepts bytes or str keys and values.

        Raises:
            EventFormatError: Another schema version, a missing field, or a value that does not
                parse. The message names the field.
        """
        d = {_text(k): _text(v) for k, v in raw.items()}
        if d.get("schema") != str(SCHEMA_VERSION):
            raise EventFormatError(
                f"flag event schema {d.get('schema')!r} is not {SCHEMA_VERSION}; fields: {sorted(d)[:20]}"
            )
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                if f.default is not MISSING:  # has a default: an optional field
                    continue
                raise EventFormatError(f"flag event lacks field {f.name!r}")
            v = d[f.name]
            try:
                if f.name == "reasons":
                    parsed = json.loads(v)
                    if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                        raise ValueError("not a list of strings")
                    kw[f.name] = tuple(parsed)
                elif f.type == "float | None" and v == "":
                    kw[f.name] = None
                elif f.type in ("float", float, "float | None"):
                    x = float(v)
                    if not math.isfinite(x):
                        raise ValueError("not finite")
                    kw[f.name] = x
                elif f.type in ("int", int):
                    kw[f.name] = int(v)
                else:
                    kw[f.name] = v
            except ValueError as e:
                raise EventFormatError(f"flag event field {f.name!r} = {v[:80]!r}: {e}") from None
        ev = cls(**kw)
        if ev.flag_id != f"{ev.request_id}:{ev.concept}":
            raise EventFormatError(
                f"flag event id {ev.flag_id!r} is not request id + ':' + concept "
                f"({ev.request_id!r}, {ev.concept!r})"
            )
        return ev

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["reasons"] = list(self.reasons)
        return d


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)
