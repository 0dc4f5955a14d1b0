"""A concept's CAV fitted on a dataset's own annotations (method.md §1.1), for retrieval and masks.

The retrieval → relabel → refit loop (method.md §1, §6) and the derived masks (§2) both start
here: φ(x) = max-pooled activations at layer ℓ of the training images within the class scope,
labelled t = 1 for the images annotated with the artifact, and a CAV fitted on them (``svm``
for retrieval and localization, §1.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medaudit.models.audit.options import Progress
from medaudit.models.corrections.base import pooled_activations
from medaudit.models.data.annotations import require_artifact
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.errors import ConfigError
from medaudit.models.registry import ModelCfg
from medaudit.models.xai.cav import Cav, fit_cav

#: Images loaded and pushed through the model at once.
BATCH = 32


@dataclass(frozen=True, eq=False)
class AnnotationCav:
    """A CAV fitted on annotations, with what it was fitted on.

    Attributes:
        artifact: The concept.
        layer: The hook point ℓ.
        cav: The fitted CAV (unit ``v``, kind, counts).
        scope: Class indices whose training images were used.
        train_index: The training images used, in order.
    """

    artifact: str
    layer: str
    cav: Cav
    scope: tuple[int, ...]
    train_index: np.ndarray

    @property
    def v(self) -> np.ndarray:
        return np.asarray(self.cav.v, dtype=np.float64)


def images(ds: AnnotatedDataset, idx: Sequence[int] | np.ndarray, size: int) -> torch.Tensor:
    """Images ``idx`` of ``ds`` at ``size``² as a uint8 (N, 3, size, size) tensor."""
    arr = np.stack([ds.load_image(int(i), size) for i in idx])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def pooled(
    model: nn.Module,
    cfg: ModelCfg,
    ds: AnnotatedDataset,
    idx: np.ndarray,
    layer: str,
    progress: Progress | None = None,
    what: str = "activations",
) -> np.ndarray:
    """φ(x) at ``layer`` (float64, (N, C)) of images ``idx``, loaded :data:`BATCH` at a time."""
    size = cfg.input_size[-1]
    adv = progress(what, len(idx)) if progress and len(idx) else None
    out = []
    for s in range(0, len(idx), BATCH):
        b = idx[s : s + BATCH]
        out.append(pooled_activations(model, cfg, layer, images(ds, b, size), batch_size=BATCH))
        if adv:
            adv(len(b))
    if not out:
        raise ConfigError(f"no images to compute activations at {layer!r} on")
    return np.concatenate(out)


def scope_of(ds: AnnotatedDataset, classes: Sequence[str] | None) -> tuple[int, ...]:
    """Class indices of ``classes`` (names), or every class when None.

    Raises:
        ConfigError: A name that is not a class of the dataset.
    """
    names = list(ds.label_names)
    if not classes:
        return tuple(range(len(names)))
    bad = [c for c in classes if c not in names]
    if bad:
        raise ConfigError(f"cav scope: {bad[0]!r} is not a class; classes: {', '.join(names)}")
    return tuple(names.index(c) for c in classes)


def annotation_cav(
    model: nn.Module,
    cfg: ModelCfg,
    ds: AnnotatedDataset,
    artifact: str,
    layer: str,
    *,
    kind: str = "svm",
    scope: tuple[int, ...] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> AnnotationCav:
    """Fit ``artifact``'s CAV at ``layer`` on the training images within ``scope`` (method.md §1.1).

    Raises:
        DatasetError: No image is annotated with ``artifact``.
        ConfigError: ``layer`` is not a hook point, or the training images in scope lack images
            with or without the artifact.
    """
    require_artifact(ds.artifact_ids("all"), artifact)
    if layer not in cfg.hook_points:
        raise ConfigError(f"{cfg.arch} has no hook point {layer!r}; valid: {', '.join(cfg.hook_points)}")
    scope = scope if scope is not None else tuple(range(len(ds.label_names)))
    train = np.asarray(ds.indices("train"))
    train = train[np.isin(np.asarray(ds.labels)[train], scope)]
    carriers = set(ds.artifact_ids("train").get(artifact, []))
    t = np.array([int(int(i) in carriers) for i in train], dtype=np.int64)
    if t.sum() == 0 or t.sum() == len(t):
        classes = ", ".join(ds.label_names[k] for k in scope)
        raise ConfigError(
            f"the CAV of {artifact!r} needs training images of classes {classes} with and without it; "
            f"there are {int(t.sum())} with and {int(len(t) - t.sum())} without: annotate more "
            "(medaudit annotate)"
        )
    acts = pooled(model, cfg, ds, train, layer, progress, f"φ at {layer} (train)")
    return AnnotationCav(artifact, layer, fit_cav(acts, t, kind=kind, seed=seed), scope, train)
