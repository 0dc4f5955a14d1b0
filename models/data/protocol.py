"""What the offline audit needs of a dataset, as one :class:`AnnotatedDataset` protocol.

Synthderm (:class:`~medaudit.models.data.synthetic.SynthDerm`) and every reader of real data
(:class:`~medaudit.models.data.folder.ImageDataset`: the folder + labels CSV layout, ISIC 2019,
CheXpert and class folders; open any with :func:`~medaudit.models.data.registry.open_dataset`)
satisfy it, so code that takes an ``AnnotatedDataset`` never asks which dataset it holds
(architecture.md, "Real data and real models are first-class").

Indices are positions ``0 .. len(labels) - 1`` in dataset order; images and masks are returned
as NumPy arrays at the size asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: The values of :attr:`AnnotatedDataset.mask_source` / :meth:`AnnotatedDataset.mask_source_of`.
MASK_SOURCES = ("ground_truth", "derived", "none")


@runtime_checkable
class AnnotatedDataset(Protocol):
    """Labelled images with artifact annotations and optional ground-truth artifact masks."""

    @property
    def labels(self) -> np.ndarray:
        """Class index per sample, int64, shape (N,)."""
        ...

    @property
    def label_names(self) -> Sequence[str]:
        """Class names in index order; ``labels`` index into them."""
        ...

    @property
    def ids(self) -> Sequence[str]:
        """Sample names in index order, as the dataset's files write them (review sheets and
        annotation files name images by them)."""
        ...

    @property
    def groups(self) -> Sequence[str]:
        """Patient or lesion per sample (the sample's own id where the layout has none). No
        group lies in two splits: the adapters split by group and refuse a given split that
        does not (:mod:`~medaudit.models.data.splits`)."""
        ...

    @property
    def has_masks(self) -> bool:
        """Whether :meth:`mask` can answer (artifact masks exist, of any source)."""
        ...

    @property
    def mask_source(self) -> str:
        """Where the dataset's artifact masks came from, for the build and the model cards:

        * ``"ground_truth"``: drawn by a person (or, for synthderm, the exact pixels it drew);
        * ``"derived"``: binarised CAV-conditioned heatmaps written by ``medaudit localize
          --export-masks`` (method.md §2), recorded in ``masks/<artifact>/mask_source.json``;
        * ``"none"``: no masks; RRR and the IoU metrics have nothing to use.

        When artifacts differ (drawn ruler masks, derived band-aid masks) it answers the weaker,
        ``"derived"``; code about one artifact (a build, a card) asks :meth:`mask_source_of`.
        """
        ...

    def mask_source_of(self, artifact: str) -> str:
        """:attr:`mask_source` of one artifact: ``"ground_truth"``, ``"derived"`` or ``"none"``."""
        ...

    def indices(self, split: str = "all") -> np.ndarray:
        """Sorted indices of ``split``: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.

        Raises:
            ConfigError: An unknown split name.
        """
        ...

    def artifact_ids(self, split: str = "all") -> dict[str, list[int]]:
        """``{artifact: [indices]}`` of the samples in ``split`` annotated with each artifact."""
        ...

    def load_image(self, i: int, size: int | None = None) -> np.ndarray:
        """Image ``i`` as H×W×3 uint8 RGB, resized to ``size``² with bicubic when given."""
        ...

    def mask(self, i: int, artifact: str, size: int | None = None) -> np.ndarray:
        """H×W bool ground-truth mask of ``artifact`` in image ``i`` (nearest resize to ``size``²).

        All False where the sample does not carry the artifact (method.md §5.4).

        Raises:
            DatasetError: The dataset has no masks (:attr:`has_masks` is False), does not know
                ``artifact``, or cannot read the mask.
        """
        ...

    def config(self) -> dict[str, Any] | None:
        """The JSON-able configuration that regenerates the data (synthderm's generator config),
        or None for data read from disk; reports record it."""
        ...
