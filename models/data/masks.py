"""Artifact masks on disk: ``masks/<artifact>/<image>.png``, and where they came from.

Layout (one folder per artifact; masks are optional, per artifact)::

    masks/<artifact>/<key>.png            non-zero = artifact pixel, the image's own size
    masks/<artifact>/mask_source.json     optional: {"source": "derived", ...provenance}

``<key>`` is the sample's id without its image extension (a CheXpert key is
``patientX_studyY_viewZ_frontal``, the authors' naming, method.md §8); a key with a sub-folder
(class folders: ``polyps/abc``) nests. The older flat layout ``masks/<key>_<artifact>.png`` (what
synthderm exported before) is still read.

A mask folder without ``mask_source.json`` holds masks a person drew: ``"ground_truth"``.
``medaudit localize --export-masks`` writes ``"derived"`` masks (binarised CAV-conditioned
heatmaps, method.md §2) with that file, so the build and the cards can say which masks RRR and
the IoU figures used.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medaudit.models.data.files import read_mask
from medaudit.models.data.protocol import MASK_SOURCES
from medaudit.models.errors import DatasetError

MASKS_DIR = "masks"
SOURCE_FILE = "mask_source.json"
#: Where an artifact's masks came from (``AnnotatedDataset.mask_source``), by name.
GROUND_TRUTH, DERIVED, NO_MASKS = MASK_SOURCES


class MaskFolder:
    """The masks under one folder (a dataset's ``masks/``, or held-back true masks elsewhere)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def exists(self) -> bool:
        return self.root.is_dir()

    @cached_property
    def _flat(self) -> frozenset[str]:
        """File names directly in the folder: the legacy ``<key>_<artifact>.png`` masks."""
        if not self.exists:
            return frozenset()
        with os.scandir(self.root) as it:
            return frozenset(e.name for e in it if e.is_file() and e.name.endswith(".png"))

    def artifacts(self) -> tuple[str, ...]:
        """Artifacts with a mask folder of their own, sorted."""
        if not self.exists:
            return ()
        with os.scandir(self.root) as it:
            return tuple(sorted(e.name for e in it if e.is_dir()))

    def has(self, artifact: str) -> bool:
        """Whether ``artifact`` has masks here (its folder, or legacy flat files)."""
        if (self.root / artifact).is_dir():
            return True
        suffix = f"_{artifact}.png"
        return any(n.endswith(suffix) for n in self._flat)

    def source(self, artifact: str) -> str:
        """``"ground_truth"``, ``"derived"`` or ``"none"`` (no masks for ``artifact``)."""
        if not self.has(artifact):
            return NO_MASKS
        prov = self.provenance(artifact)
        return str(prov.get("source", GROUND_TRUTH)) if prov else GROUND_TRUTH

    def provenance(self, artifact: str) -> dict[str, Any] | None:
        """The artifact's ``mask_source.json``, or None when there is none.

        Raises:
            DatasetError: The file is not a JSON object with a known ``source``.
        """
        path = self.root / artifact / SOURCE_FILE
        if not path.is_file():
            return None
        try:
            prov = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"cannot read {path}: {e}") from e
        if not isinstance(prov, dict) or prov.get("source") not in (GROUND_TRUTH, DERIVED):
            raise DatasetError(
                f'{path}: expected {{"source": "ground_truth" | "derived", ...}}; got {prov!r:.200}'
            )
        return prov

    def path(self, key: str, artifact: str) -> Path | None:
        """The mask file of sample ``key`` for ``artifact``, or None when there is none."""
        p = self.root / artifact / f"{key}.png"
        if p.is_file():
            return p
        flat = f"{key}_{artifact}.png"
        return self.root / flat if flat in self._flat else None

    def keys(self, artifact: str) -> set[str]:
        """Keys with a mask file in ``artifact``'s folder (nested keys included)."""
        base = self.root / artifact
        if not base.is_dir():
            return set()
        return {p.relative_to(base).with_suffix("").as_posix() for p in base.rglob("*.png")}

    def read(
        self,
        key: str,
        artifact: str,
        size: int | None = None,
        expect: tuple[int, int] | None = None,
        image: str = "",
    ) -> np.ndarray | None:
        """The mask of ``key`` as H×W bool (see :func:`~medaudit.models.data.files.read_mask`), or None."""
        p = self.path(key, artifact)
        return None if p is None else read_mask(p, size, expect, image)

    def write(self, key: str, artifact: str, mask: np.ndarray) -> Path:
        """Write one H×W mask (non-zero = artifact) as an 8-bit PNG, 0 or 255."""
        p = self.root / artifact / f"{key}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(p)
        return p

    def mark(self, artifact: str, source: str, **provenance: Any) -> Path:
        """Record where ``artifact``'s masks came from (``mask_source.json``)."""
        if source not in (GROUND_TRUTH, DERIVED):
            raise DatasetError(f"mask source {source!r}; valid: {GROUND_TRUTH}, {DERIVED}")
        p = self.root / artifact / SOURCE_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"source": source, **provenance}, indent=1, default=str))
        return p


def overall_source(sources: dict[str, str]) -> str:
    """One word for a dataset's masks: ``"none"`` when no artifact has masks, else the weakest
    source among those that have: ``"derived"`` as soon as one artifact's masks are derived (a
    card must not claim drawn masks for them), ``"ground_truth"`` otherwise."""
    have = {s for s in sources.values() if s != NO_MASKS}
    if not have:
        return NO_MASKS
    return DERIVED if DERIVED in have else GROUND_TRUTH
