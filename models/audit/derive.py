"""Masks derived from concepts where none are drawn (method.md §2, §4.6 ``source_masks: bin``).

For each image annotated with an artifact: the CAV-conditioned LRP heatmap of the artifact's CAV
(fitted on the annotations, :mod:`~medaudit.models.audit.annotated`; §2.1: R = ReLU(A) ⊙ v at ℓ,
propagated to the input), binarised (§2.2: blur k=7, σ=8, Otsu), at the model's input size, then
laid over the image at its own size (nearest, undoing the model's resize or centre crop).
:func:`export_masks` writes them in the dataset's mask layout (``masks/<artifact>/<key>.png``)
and marks the artifact's masks ``"derived"`` with their provenance, so RRR, the IoU figures and
the cards know what they use. Where true masks exist (synthderm, or masks held back), every
derived mask is scored by IoU against them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from medaudit.models.audit.annotated import AnnotationCav
from medaudit.models.audit.options import Progress
from medaudit.models.data.geometry import Geometry, to_source_grid
from medaudit.models.data.masks import DERIVED, GROUND_TRUTH, MaskFolder
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.errors import DatasetError
from medaudit.models.registry import ModelCfg
from medaudit.models.xai.localize import concept_mask, family_mask_pooling, iou
from medaudit.models.xai.lrp import ConceptTarget, Explainer

#: ``truth(i) -> H×W bool at the model's input size``, or None where image i has no true mask.
Truth = Callable[[int], np.ndarray | None]


@dataclass(frozen=True, eq=False)
class DerivedMask:
    """One image's derived mask: at the model's input size and at the image's own size."""

    index: int
    mask: np.ndarray  # input size, bool
    full: np.ndarray  # the image's size, bool
    iou: float | None


def derive_masks(
    model: nn.Module,
    cfg: ModelCfg,
    ds: AnnotatedDataset,
    fitted: AnnotationCav,
    indices: Sequence[int],
    *,
    truth: Truth | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> Iterator[DerivedMask]:
    """Derived masks of ``fitted.artifact`` for ``indices`` (see the module docstring)."""
    geometry = Geometry.of(cfg)  # the model's resize/crop policy, undone for the full-size mask
    explainer = Explainer(model, cfg)
    target = ConceptTarget(fitted.layer, torch.tensor(fitted.v, dtype=torch.float32))
    pooling = family_mask_pooling(cfg.canonizer)
    adv = progress(f"localize {fitted.artifact}", len(indices)) if progress and len(indices) else None
    for s in range(0, len(indices), batch_size):
        b = [int(i) for i in indices[s : s + batch_size]]
        full = [ds.load_image(i) for i in b]
        x = np.stack([geometry.image(im) for im in full])
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        hm = explainer.explain(cfg.normalize(xt), [target], logits=False).heatmaps[0].double().numpy()
        for j, i in enumerate(b):
            m = concept_mask(hm[j], x[j], pooling) > 0
            gt = truth(i) if truth is not None else None
            score = iou(m, gt) if gt is not None and gt.any() else None
            big = to_source_grid(m, full[j].shape[:2], geometry)
            yield DerivedMask(i, m, big, score)
        if adv:
            adv(len(b))


def export_masks(
    model: nn.Module,
    cfg: ModelCfg,
    ds: AnnotatedDataset,
    fitted: AnnotationCav,
    folder: MaskFolder,
    *,
    keys: Sequence[str],
    truth: Truth | None = None,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the derived masks of every image annotated with ``fitted.artifact`` into ``folder``.

    Args:
        model, cfg: The classifier.
        ds: The dataset.
        fitted: The artifact's CAV.
        folder: The mask layout to write (the dataset's ``masks/`` or another).
        keys: Mask file name per sample index.
        truth: True masks, when known: each derived mask is scored by IoU.
        overwrite: Replace masks a person drew (refused otherwise).
        provenance: Recorded in ``mask_source.json`` beside the masks (model, dataset...).
        progress: Progress callback.

    Returns:
        The summary: images written, IoU mean / median / n (all and per split) when scored.

    Raises:
        DatasetError: ``folder`` already holds ground-truth masks of the artifact and not
            ``overwrite``.
    """
    art = fitted.artifact
    refuse_drawn(folder, art, overwrite)
    old = folder.root / art
    if old.is_dir():  # derived masks of images no longer annotated must not linger
        for p in old.rglob("*.png"):
            p.unlink()
    carriers = sorted(ds.artifact_ids("all").get(art, []))
    split_of = {int(i): s for s in ("train", "val", "test") for i in ds.indices(s)}
    scores: dict[str, list[float]] = {"all": []}
    areas = []
    for d in derive_masks(model, cfg, ds, fitted, carriers, truth=truth, progress=progress):
        folder.write(keys[d.index], art, d.full)
        areas.append(float(d.mask.mean()))
        if d.iou is not None:
            scores["all"].append(d.iou)
            scores.setdefault(split_of.get(d.index, "?"), []).append(d.iou)
    summary: dict[str, Any] = {
        "artifact": art,
        "images": len(carriers),
        "mean_mask_area": float(np.mean(areas)) if areas else None,
        "iou": {s: _stats(v) for s, v in scores.items() if v},
    }
    folder.mark(
        art,
        DERIVED,
        method="binarised CAV-conditioned LRP heatmap (method.md §2.1-2.2): blur k=7 sigma=8, Otsu",
        layer=fitted.layer,
        cav=fitted.cav.meta(),
        cav_scope=[ds.label_names[k] for k in fitted.scope],
        input_size=cfg.input_size[-1],
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        summary=summary,
        **(provenance or {}),
    )
    return summary


def refuse_drawn(folder: MaskFolder, artifact: str, overwrite: bool = False) -> None:
    """Refuse to write derived masks over masks a person drew, unless ``overwrite``.

    Raises:
        DatasetError: ``folder`` holds ground-truth masks of ``artifact``.
    """
    if folder.has(artifact) and folder.source(artifact) == GROUND_TRUTH and not overwrite:
        raise DatasetError(
            f"{folder.root / artifact} holds masks a person drew (no mask_source.json says 'derived'); "
            "derived masks would replace them: write them elsewhere (--masks-dir) or pass --force"
        )


def _stats(v: list[float]) -> dict[str, float]:
    a = np.asarray(v, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "n": int(len(a))}
