"""Tiny datasets for the test_datasets_* modules: a three-class synthderm with lesions of several
photographs, and small hand-written tables and images."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig

#: 72 images at 32 px: every class, lesions of 1-4 photographs, band-aids, rulers.
TINY = SynthDermConfig.preset("isic_like", size=32, n_train=48, n_val=12, n_test=12, seed=6)


def tiny() -> SynthDerm:
    return SynthDerm(TINY)


def rgb(seed: int, h: int = 8, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def folder(root: Path, n: int = 6, header: Sequence[str] = ("image", "label"), extra=None) -> Path:
    """``n`` PNGs img00.. with labels a/b alternating; ``extra(i)`` adds cells to row i."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rgb(i)).save(root / "images" / f"img{i:02d}.png")
    rows = [[f"img{i:02d}", "ab"[i % 2], *(extra(i) if extra else [])] for i in range(n)]
    write_csv(root / "labels.csv", header, rows)
    return root
