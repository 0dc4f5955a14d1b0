"""The audit's two stages: what runs on the engine's device, and the host encoding after it.

An audit (:meth:`medaudit.service.audit.AuditEngine.audit`) is :meth:`~medaudit.service.audit.
AuditEngine.audit_raw`, the critical path (LRP calls, concept scoring, the overlay blend, one
host copy of their arrays: a :class:`RawAudit`), then :meth:`~medaudit.service.audit.AuditEngine.
finish`, the host work (mask binarisation, PNG encoding), which a caller may run on another thread
while the next batch is on the device (``medaudit scan --heatmaps`` does).

* :class:`DeviceScorer`: a bank's concept scores, percentiles, presence and relevance shares
  (method.md §1.4, §2.1) as torch ops on the engine's device; the engine uses it where that
  device is not the host (on the CPU it scores with the bank's own numpy code, as before).
* :func:`overlay_pixels`: :func:`overlay` for a batch, in torch on the device: the same float64
  operations in the same order, so the same uint8 pixels, and one (B, H, W, 3) uint8 copy to the
  host instead of a float64 heatmap per image.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from medaudit.models.xai.concepts import ConceptBank, relevance_share

# --------------------------------------------------------------------------------- images -> PNG


def png_base64(arr: np.ndarray) -> str:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) (RGBA) array -> base64 PNG.

    zlib level 1: a 128 px heatmap overlay encodes in 1.2 ms instead of 4.9 ms (PIL's default 6)
    for 6% more bytes; an audit encodes one overlay per image plus one mask per present concept.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def overlay(rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """The image with a heatmap blended in: red where relevance is positive, blue where negative."""
    h = np.asarray(heatmap, dtype=np.float64)
    m = float(np.abs(h).max())
    h = h / m if m > 0 else np.zeros_like(h)
    colour = np.zeros((*h.shape, 3))
    colour[..., 0] = np.clip(h, 0, 1)
    colour[..., 2] = np.clip(-h, 0, 1)
    weight = alpha * np.abs(h)[..., None]
    out = (1 - weight) * rgb.astype(np.float64) + weight * 255.0 * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_pixels(rgb: torch.Tensor, heatmaps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """:func:`overlay` of a batch where the tensors are: (B, H, W, 3) uint8 images and (B, H, W)
    heatmaps -> (B, H, W, 3) uint8.

    Bit-identical to :func:`overlay` image by image: float64 throughout, each operation a separate
    IEEE-rounded elementwise op in numpy's order (no fused multiply-add), the per-image max exact,
    ``round`` half to even as ``np.rint``. Tested on the CPU; on CUDA the same float64 ops are
    IEEE-rounded too, which no test here has checked (no GPU).
    """
    h = heatmaps.to(torch.float64)
    m = h.abs().amax(dim=(1, 2), keepdim=True)
    h = torch.where(m > 0, h / torch.where(m > 0, m, torch.ones_like(m)), torch.zeros_like(h))
    zero = torch.zeros_like(h)
    colour = torch.stack([h.clamp(0, 1), zero, (-h).clamp(0, 1)], dim=-1)
    weight = (alpha * h.abs())[..., None]
    out = (1 - weight) * rgb.to(torch.float64) + weight * 255.0 * colour
    return torch.round(out).clamp(0, 255).to(torch.uint8)


def heat_layer(heatmap: np.ndarray) -> np.ndarray:
    """The heatmap alone as an RGBA layer (H, W, 4) uint8: red where relevance is positive, blue
    where negative, colour and alpha both |h| / max|h|. Drawn over the image at opacity ``a`` it
    gives exactly :func:`overlay` with ``alpha=a`` (up to rounding), so a viewer can toggle it."""
    h = np.asarray(heatmap, dtype=np.float64)
    m = float(np.abs(h).max()) if h.size else 0.0
    h = h / m if m > 0 else np.zeros_like(h)
    out = np.zeros((*h.shape, 4), dtype=np.uint8)
    out[..., 0] = np.rint(255.0 * np.clip(h, 0, 1))
    out[..., 2] = np.rint(255.0 * np.clip(-h, 0, 1))
    out[..., 3] = np.rint(255.0 * np.abs(h))
    return out


# --------------------------------------------------------------------------------- scoring


@dataclass(frozen=True, eq=False)
class HostScores:
    """A batch's concept scores on the host, concepts as columns in bank order (B, K).

    ``threshold`` is (K,); ``pick`` (B,) the first present concept of each image (-1: none).
    """

    names: tuple[str, ...]
    score: np.ndarray
    percentile: np.ndarray
    present: np.ndarray
    threshold: np.ndarray
    share: np.ndarray

    @property
    def pick(self) -> np.ndarray:
        return np.where(self.present.any(1), self.present.argmax(1), -1)

    @classmethod
    def from_bank(
        cls, bank: ConceptBank, pooled: np.ndarray, class_rel: np.ndarray, fpr: float | None
    ) -> HostScores:
        """The bank's own numpy scoring (:meth:`ConceptBank.score`, :func:`relevance_share`)."""
        scores = bank.score(pooled, fpr)
        names = tuple(bank)
        return cls(
            names,
            np.stack([scores[c].score for c in names], 1),
            np.stack([scores[c].percentile for c in names], 1),
            np.stack([np.asarray(scores[c].present, dtype=bool) for c in names], 1),
            np.asarray([scores[c].threshold for c in names], dtype=np.float64),
            np.stack([relevance_share(class_rel, bank[c].v) for c in names], 1),
        )


@dataclass(frozen=True, eq=False)
class DeviceScores:
    """:class:`HostScores`' arrays as tensors on the engine's device (``share`` filled later)."""

    score: torch.Tensor
    percentile: torch.Tensor
    present: torch.Tensor

    @property
    def pick(self) -> torch.Tensor:
        """Each image's first present concept, -1 where none is (indexes a zero seed row last)."""
        any_ = self.present.any(1)
        first = self.present.to(torch.int8).argmax(1)  # the first maximum: the first present
        return torch.where(any_, first, torch.full_like(first, -1))


class DeviceScorer:
    """A bank's scoring and relevance shares as torch ops on ``device`` (method.md §1.4, §2.1).

    The same quantities as :meth:`ConceptBank.score` and :func:`relevance_share`, in float64: the
    thresholds and the unit CAVs are computed once on the host by the bank's own numpy code, the
    per-image work (dot products, percentile look-ups, presence, shares) runs on the device, and a
    batch crosses to the host once (:meth:`to_host`). Dot products and sums are reduced in
    torch's order, not numpy's, so scores and shares agree to ~1e-15 relative, not bit for bit
    (tests/unit/test_audit_stages.py); a presence or percentile can differ only for a score
    within that of a threshold or a clean score.
    """

    def __init__(self, bank: ConceptBank, fpr: float | None, device: torch.device) -> None:
        rate = bank.target_fpr if fpr is None else fpr
        #: The FPR asked for (``None``: the bank's own), as the engine holds it.
        self.fpr = fpr
        self.names = tuple(bank)
        vs = [np.asarray(bank[c].v, dtype=np.float64) for c in self.names]
        self.v = torch.tensor(np.stack(vs), dtype=torch.float64, device=device)  # (K, C)
        unit = np.stack([v / float(np.linalg.norm(v)) for v in vs])  # as relevance_share does
        self.unit = torch.tensor(unit, dtype=torch.float64, device=device)
        self.thresholds = np.asarray([bank.threshold(c, rate) for c in self.names], dtype=np.float64)
        self._thr = torch.tensor(self.thresholds, dtype=torch.float64, device=device)
        self._clean = [
            torch.tensor(np.asarray(bank[c].clean_scores, dtype=np.float64), device=device)
            for c in self.names
        ]
        # built once here: a tensor made from a host list per call is a host-to-device copy that
        # torch synchronises, the host sync between the forward and the backward this avoids
        self._lengths = torch.tensor([len(c) for c in self._clean], dtype=torch.float64, device=device)

    def score(self, pooled: torch.Tensor) -> DeviceScores:
        """(B, C) pooled activations -> scores, percentiles, presence, each (B, K)."""
        s = pooled.detach().to(torch.float64) @ self.v.T
        idx = torch.stack(
            [torch.searchsorted(c, s[:, k].contiguous(), right=True) for k, c in enumerate(self._clean)], 1
        )
        return DeviceScores(s, 100.0 * idx.to(torch.float64) / self._lengths, s > self._thr)

    def shares(self, class_rel: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
        """(B, C) channel relevance (float64) -> (B, K) relevance shares in [0, 1]."""
        rel = class_rel.to(torch.float64)
        proj = (rel @ self.unit.T).clamp(min=0.0)
        return (proj**2 / ((rel**2).sum(1, keepdim=True) + eps)).clamp(0.0, 1.0)

    def to_host(
        self, s: DeviceScores, class_rel: torch.Tensor, *extra: torch.Tensor
    ) -> tuple[HostScores, list[np.ndarray]]:
        """The scores with their shares, and each ``extra`` (B, n) tensor as float64, in one copy."""
        share = self.shares(class_rel)
        parts = [s.score, s.percentile, s.present.to(torch.float64), share]
        parts += [t.detach().to(torch.float64).reshape(len(s.score), -1) for t in extra]
        host = torch.cat(parts, 1).cpu().numpy()
        k = len(self.names)
        cols = np.cumsum([p.shape[1] for p in parts])[:-1]
        score, pct, present, share_np, *rest = np.split(host, cols, axis=1)
        assert score.shape[1] == k
        return HostScores(self.names, score, pct, present > 0.5, self.thresholds, share_np), rest


# --------------------------------------------------------------------------------- the raw audit


@dataclass(eq=False)
class RawAudit:
    """What :meth:`~medaudit.service.audit.AuditEngine.audit_raw` leaves for the host stage.

    Attributes:
        predictions: One per image.
        scores: The batch's concept scores and shares.
        pooled: φ(x) at the CAV layer, float64 (B, C).
        rgb: The model-size inputs (B, H, W, 3) uint8.
        overlays: The blended overlays (B, H, W, 3) uint8, if asked for and not withheld.
        heatmaps: The raw class heatmaps, float16 (B, H, W), if asked for and not withheld.
        concept_heat: ``(image, concept) -> (H, W) float64`` concept-conditioned heatmaps of the
            present concepts, binarised into masks on the host stage.
    """

    predictions: Sequence[Any]
    scores: HostScores
    pooled: np.ndarray
    rgb: np.ndarray
    overlays: np.ndarray | None = None
    heatmaps: np.ndarray | None = None
    concept_heat: Mapping[tuple[int, str], np.ndarray] = field(default_factory=dict)
