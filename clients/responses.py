"""The service's answers as frozen dataclasses, and the parsers that build them from its JSON.

Shapes follow ``service/api.py`` (:mod:`medaudit.service.audit`): base64 PNGs arrive as bytes, the
raw float16 heatmap as a read-only numpy array (numpy imported only when one is asked for). A parser
raises ``KeyError``/``TypeError``/``ValueError`` on a body that is not that JSON; the client turns
those into :class:`~medaudit.clients.errors.ResponseFormatError`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "AuditResponse",
    "CompareResponse",
    "ConceptScore",
    "FlagDecision",
    "FlagThresholds",
    "ModelCard",
    "ModelInfo",
    "ModelsResponse",
    "PredictResponse",
    "Prediction",
    "Review",
    "ReviewPage",
    "RouteInfo",
    "ShadowAgreement",
    "ShadowInfo",
    "parse_audit",
    "parse_card",
    "parse_compare",
    "parse_models",
    "parse_predict",
    "parse_review",
    "parse_reviews",
    "parse_route",
]


@dataclass(frozen=True)
class Prediction:
    """One version's prediction: the label, its index, and every class's probability."""

    version: str
    label: str
    class_index: int
    probabilities: Mapping[str, float]

    @property
    def probability(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label]


@dataclass(frozen=True)
class ShadowInfo:
    """The shadow version's label for the same request, and whether it agrees."""

    version: str
    label: str
    agree: bool


@dataclass(frozen=True)
class ConceptScore:
    """One concept (artifact) on the image.

    Attributes:
        concept: Concept name.
        score: CAV score at the bank's layer.
        percentile: Among clean validation images (0-100).
        present: ``score`` above ``threshold``.
        threshold: The presence threshold at the configured false-positive rate.
        relevance_share: Share of the predicted class's relevance along the concept, [0, 1].
        mask_png: PNG bytes of the concept's localization mask (present concepts only).
    """

    concept: str
    score: float
    percentile: float
    present: bool
    threshold: float
    relevance_share: float
    mask_png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FlagDecision:
    """Whether the result goes to review, one reason per flagging concept."""

    flagged: bool
    reasons: tuple[str, ...] = ()
    concepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class PredictResponse:
    """``POST /predict``.

    Attributes:
        request_id: The request's id (sent or assigned by the service).
        version: The version that answered.
        via: How it was chosen: ``explicit`` (asked for), ``hash`` (subject key) or ``random``.
        prediction: Its prediction.
        shadow: The shadow version's answer, if the deployment has one.
        notes: What the service did to the image (format mismatch, upscaling, DICOM windowing...).
    """

    request_id: str
    version: str
    via: str
    prediction: Prediction
    shadow: ShadowInfo | None
    notes: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class AuditResponse:
    """``POST /audit``, or one version's entry of ``POST /compare``.

    Attributes:
        request_id: The request's id.
        version: The version that audited.
        via: How it was chosen; ``None`` in a comparison (every version there was asked for).
        prediction: The prediction the heatmap explains.
        heatmap_png: PNG bytes: the model-size input with the class heatmap overlaid (red
            positive, blue negative relevance); ``None`` for a screen without heatmap.
        heatmap: The raw (H, W) float16 heatmap, read-only, when asked for (``raw_heatmap=True``).
        layer: The concept bank's layer.
        concepts: One score per concept of the version's bank.
        flag: The flag decision.
        shadow: The shadow version's answer (``None`` without a shadow, and in comparisons).
        notes: What the service did to the image.
        detail: ``"full"`` (an audit) or ``"scores"`` (a screen: ``audit(detail="scores")``).
        heatmap_reason: Why the heatmap was computed: ``requested``, or for a screen ``flagged``
            or ``sampled``; ``None`` for a screen without heatmap (and in comparisons).
    """

    request_id: str
    version: str
    via: str | None
    prediction: Prediction
    heatmap_png: bytes | None = field(repr=False)
    heatmap: np.ndarray | None = field(repr=False)
    layer: str
    concepts: tuple[ConceptScore, ...]
    flag: FlagDecision
    shadow: ShadowInfo | None
    notes: tuple[str, ...]
    detail: str = "full"
    heatmap_reason: str | None = None

    def concept(self, name: str) -> ConceptScore:
        """The score of concept ``name``.

        Raises:
            KeyError: A concept the version's bank does not have (the message lists those it has).
        """
        for c in self.concepts:
            if c.concept == name:
                return c
        raise KeyError(
            f"no concept {name!r}; this version scores: {', '.join(c.concept for c in self.concepts)}"
        )


@dataclass(frozen=True, eq=False)
class CompareResponse:
    """``POST /compare``: audits by several versions, in the order asked, with their agreement."""

    request_id: str
    versions: tuple[str, ...]
    results: Mapping[str, AuditResponse]
    labels_agree: bool
    flags_agree: bool
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    """One served version, from ``GET /models/``."""

    version: str
    tag: str
    weight: float
    concepts: tuple[str, ...]
    cav_layer: str
    input_size: tuple[int, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ShadowAgreement:
    """Counted agreement of one (answering version, shadow version) pair since the service started."""

    version: str
    shadow: str
    agree: int
    disagree: int


@dataclass(frozen=True)
class FlagThresholds:
    """The deployment's flag rule: relevance share above which a present concept flags, and FPR."""

    relevance_share: float
    fpr: float | None


@dataclass(frozen=True)
class ModelsResponse:
    """``GET /models/``: the served versions with their A/B weights, the shadow and its agreement."""

    request_id: str
    versions: tuple[ModelInfo, ...]
    shadow: str | None
    shadow_agreement: tuple[ShadowAgreement, ...]
    flag_thresholds: FlagThresholds

    def __getitem__(self, version: str) -> ModelInfo:
        for m in self.versions:
            if m.version == version:
                return m
        raise KeyError(f"{version!r} is not served; served: {', '.join(m.version for m in self.versions)}")


@dataclass(frozen=True, eq=False)
class ModelCard:
    """``GET /models/{version}``: one version's model card (its JSON as a dict)."""

    request_id: str
    version: str
    tag: str
    card: Mapping[str, Any]


@dataclass(frozen=True)
class RouteInfo:
    """``GET /models/_route``: which version would answer these headers, and how it was chosen."""

    request_id: str
    version: str
    shadow: str | None
    via: str


@dataclass(frozen=True, eq=False)
class Review:
    """One flag of the review queue (``GET /reviews/{flag_id}``, or an item of a page).

    The typed fields are the ones every record has; ``record`` is the whole JSON record (scores,
    reasons, thresholds, the corrected version's answer...). ``heatmap_png``/``mask_png`` are set
    when the flag was fetched with its images and they have not expired.
    """

    flag_id: str
    request_id: str
    model_version: str
    concept: str
    status: str
    verdict: str | None
    reviewer: str | None
    record: Mapping[str, Any] = field(repr=False)
    heatmap_png: bytes | None = field(default=None, repr=False)
    mask_png: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class ReviewPage:
    """``GET /reviews/``: one page of flags (``open`` oldest first, ``resolved`` newest first)."""

    request_id: str
    status: str
    total: int
    offset: int
    limit: int
    items: tuple[Review, ...]


def _b64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def _prediction(d: Mapping[str, Any]) -> Prediction:
    return Prediction(
        version=str(d["version"]),
        label=str(d["label"]),
        class_index=int(d["class_index"]),
        probabilities={str(k): float(v) for k, v in d["probabilities"].items()},
    )


def _shadow(d: Mapping[str, Any] | None) -> ShadowInfo | None:
    return None if d is None else ShadowInfo(str(d["version"]), str(d["label"]), bool(d["agree"]))


def _raw_heatmap(d: Mapping[str, Any] | None) -> np.ndarray | None:
    if d is None:
        return None
    try:
        import numpy as np
    except ImportError as e:
        raise ImportError(
            "the raw float16 heatmap is returned as a numpy array: pip install 'medaudit-client[arrays]'"
        ) from e
    if d.get("dtype") != "float16":
        raise ValueError(f"raw heatmap dtype {d.get('dtype')!r}, expected float16")
    return np.frombuffer(base64.b64decode(d["data"]), dtype="<f2").reshape([int(n) for n in d["shape"]])


def _audit(
    d: Mapping[str, Any],
    *,
    request_id: str,
    version: str,
    via: str | None,
    shadow: ShadowInfo | None,
    notes: tuple[str, ...],
) -> AuditResponse:
    return AuditResponse(
        request_id=request_id,
        version=version,
        via=via,
        prediction=_prediction(d["prediction"]),
        heatmap_png=_b64(d.get("heatmap_png")),
        heatmap=_raw_heatmap(d.get("heatmap")),
        layer=str(d["layer"]),
        concepts=tuple(
            ConceptScore(
                concept=str(c["concept"]),
                score=float(c["score"]),
                percentile=float(c["percentile"]),
                present=bool(c["present"]),
                threshold=float(c["threshold"]),
                relevance_share=float(c["relevance_share"]),
                mask_png=_b64(c.get("mask_png")),
            )
            for c in d["concepts"]
        ),
        flag=FlagDecision(
            flagged=bool(d["flag"]["flagged"]),
            reasons=tuple(str(r) for r in d["flag"]["reasons"]),
            concepts=tuple(str(c) for c in d["flag"]["concepts"]),
        ),
        shadow=shadow,
        notes=notes,
        detail=str(d.get("detail", "full")),
        heatmap_reason=d.get("heatmap_reason"),
    )


def parse_predict(d: Mapping[str, Any]) -> PredictResponse:
    """``POST /predict`` JSON -> :class:`PredictResponse`."""
    return PredictResponse(
        request_id=str(d["request_id"]),
        version=str(d["version"]),
        via=str(d["via"]),
        prediction=_prediction(d["prediction"]),
        shadow=_shadow(d.get("shadow")),
        notes=tuple(str(n) for n in d.get("notes") or ()),
    )


def parse_audit(d: Mapping[str, Any]) -> AuditResponse:
    """``POST /audit`` JSON -> :class:`AuditResponse`."""
    return _audit(
        d,
        request_id=str(d["request_id"]),
        version=str(d["version"]),
        via=str(d["via"]),
        shadow=_shadow(d.get("shadow")),
        notes=tuple(str(n) for n in d.get("notes") or ()),
    )


def parse_compare(d: Mapping[str, Any]) -> CompareResponse:
    """``POST /compare`` JSON -> :class:`CompareResponse`."""
    rid, notes = str(d["request_id"]), tuple(str(n) for n in d.get("notes") or ())
    versions = tuple(str(v) for v in d["versions"])
    return CompareResponse(
        request_id=rid,
        versions=versions,
        results={
            v: _audit(d["results"][v], request_id=rid, version=v, via=None, shadow=None, notes=notes)
            for v in versions
        },
        labels_agree=bool(d["agreement"]["label"]),
        flags_agree=bool(d["agreement"]["flag"]),
        notes=notes,
    )


def parse_models(d: Mapping[str, Any]) -> ModelsResponse:
    """``GET /models/`` JSON -> :class:`ModelsResponse`."""
    ft = d["flag_thresholds"]
    return ModelsResponse(
        request_id=str(d["request_id"]),
        versions=tuple(
            ModelInfo(
                version=str(m["version"]),
                tag=str(m["tag"]),
                weight=float(m["weight"]),
                concepts=tuple(str(c) for c in m["concepts"]),
                cav_layer=str(m["cav_layer"]),
                input_size=tuple(int(n) for n in m["input_size"]),
                labels=tuple(str(x) for x in m["labels"]),
            )
            for m in d["versions"]
        ),
        shadow=None if d.get("shadow") is None else str(d["shadow"]),
        shadow_agreement=tuple(
            ShadowAgreement(str(a["version"]), str(a["shadow"]), int(a["agree"]), int(a["disagree"]))
            for a in d.get("shadow_agreement") or ()
        ),
        flag_thresholds=FlagThresholds(
            float(ft["relevance_share"]), None if ft.get("fpr") is None else float(ft["fpr"])
        ),
    )


def parse_route(d: Mapping[str, Any]) -> RouteInfo:
    """``GET /models/_route`` JSON -> :class:`RouteInfo`."""
    shadow = d.get("shadow")
    return RouteInfo(
        str(d["request_id"]), str(d["version"]), None if shadow is None else str(shadow), str(d["via"])
    )


def parse_review(d: Mapping[str, Any]) -> Review:
    """``GET /reviews/{flag_id}`` JSON (or an item of a page) -> :class:`Review`."""
    return Review(
        flag_id=str(d["flag_id"]),
        request_id=str(d.get("request_id", "")),
        model_version=str(d.get("model_version", "")),
        concept=str(d.get("concept", "")),
        status=str(d["status"]),
        verdict=str(d["verdict"]) if d.get("verdict") else None,
        reviewer=str(d["reviewer"]) if d.get("reviewer") else None,
        record=dict(d),
        heatmap_png=_b64(d.get("heatmap_png")),
        mask_png=_b64(d.get("mask_png")),
    )


def parse_reviews(d: Mapping[str, Any]) -> ReviewPage:
    """``GET /reviews/`` JSON -> :class:`ReviewPage`."""
    return ReviewPage(
        request_id=str(d.get("request_id", "")),
        status=str(d["status"]),
        total=int(d["total"]),
        offset=int(d["offset"]),
        limit=int(d["limit"]),
        items=tuple(parse_review(x) for x in d["items"]),
    )


def parse_card(d: Mapping[str, Any]) -> ModelCard:
    """``GET /models/{version}`` JSON -> :class:`ModelCard`."""
    return ModelCard(str(d["request_id"]), str(d["version"]), str(d["tag"]), dict(d["card"]))
