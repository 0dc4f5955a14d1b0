"""What gets audited: a dataset, seen through the :class:`AnnotatedDataset` protocol.

:class:`AuditSource` reads any :class:`~medaudit.models.data.protocol.AnnotatedDataset` at the
model's input size and keeps its artifact annotations as per-sample membership arrays;
:func:`choose_samples` picks the audited samples of each split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medaudit.models.audit.options import SPLITS, AuditOptions
from medaudit.models.data.protocol import AnnotatedDataset


class AuditSource:
    """A dataset at the model's input size, with its annotations as boolean arrays.

    Args:
        dataset: Any :class:`AnnotatedDataset`.
        size: The model's input side; images and masks are resized to ``size``².

    Attributes:
        label_names: Class names in index order.
        has_masks: Whether the dataset has ground-truth artifact masks.
        labels: Class index per sample (int64).
        membership: Per annotated artifact, a bool array over samples: carries it or not.
    """

    def __init__(self, dataset: AnnotatedDataset, size: int) -> None:
        self.ds = dataset
        self.size = size
        self.label_names: tuple[str, ...] = tuple(dataset.label_names)
        self.has_masks = dataset.has_masks
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        n = len(self.labels)
        self.membership: dict[str, np.ndarray] = {}
        for art, ids in dataset.artifact_ids("all").items():
            m = np.zeros(n, dtype=bool)
            m[np.asarray(ids, dtype=np.int64)] = True
            self.membership[art] = m

    def indices(self, split: str) -> np.ndarray:
        """Sorted sample indices of ``split``."""
        return np.asarray(self.ds.indices(split))

    def images(self, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Images ``idx`` as a uint8 (N, 3, size, size) tensor."""
        arr = np.stack([self.ds.load_image(int(i), self.size) for i in idx])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def mask(self, i: int, artifact: str) -> np.ndarray | None:
        """Ground-truth mask of ``artifact`` in image ``i``; None when the dataset has none."""
        if not self.has_masks:
            return None
        return self.ds.mask(i, artifact, self.size)

    def carried(self, i: int) -> tuple[str, ...]:
        """The annotated artifacts sample ``i`` carries."""
        return tuple(a for a, m in self.membership.items() if m[i])


def choose_samples(
    src: AuditSource, opts: AuditOptions
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
    """The audited indices per split (a seeded subset where ``opts.max_per_split`` caps a split)
    and per split ``{"audited": n, "available": n}``."""
    rng = np.random.default_rng([opts.seed, 0xA0D17])
    chosen, counts = {}, {}
    for split in SPLITS:
        idx = src.indices(split)
        cap = opts.max_per_split.get(split)
        if cap is not None and 0 < cap < len(idx):
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        chosen[split] = idx
        counts[split] = {"audited": int(len(idx)), "available": int(len(src.indices(split)))}
    return chosen, counts
