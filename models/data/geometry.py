"""How an image becomes a model's input, and back: one geometry for serving, building and auditing.

A model spec says how its images were fitted to the input size (``ModelCfg.resize``):

* ``"resize"`` stretches to the size with bicubic (medaudit's own models, the paper's ISIC loader);
* ``"center_crop"`` resizes the short side to ``side / crop_pct`` keeping the aspect ratio, then
  cuts the centre: torchvision's and timm's eval transform, with their rounding, so a model
  trained with it sees the same pixels.

The service (:func:`medaudit.service.inputs.to_model_input`), the build's data and the offline
audit (:func:`model_view`, a view of a dataset) and DICOM out (:func:`to_source_grid`) all use this
module, so the pixels a model sees in a build are the pixels it sees when served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

POLICIES = ("resize", "center_crop")


@dataclass(frozen=True)
class Geometry:
    """A model's input size (height, width) and resize policy (``ModelCfg.resize``, ``crop_pct``)."""

    size: tuple[int, int]
    policy: str = "resize"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"resize policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.size[0] < 1 or self.size[1] < 1:
            raise ValueError(f"model input size must be positive, got {self.size!r}")

    @classmethod
    def of(cls, cfg: Any, size: int | None = None) -> Geometry:
        """The geometry of a ``ModelCfg`` (or anything with ``resize``, ``crop_pct``,
        ``input_size``), at ``size`` when given."""
        side = size if size is not None else int(cfg.input_size[-1])
        return cls((side, side), getattr(cfg, "resize", "resize"), getattr(cfg, "crop_pct", 0.875))

    def layout(self, ih: int, iw: int) -> tuple[int, int, int, int]:
        """For an ih×iw source: the resized (rows, cols) and the crop's (top, left)."""
        h, w = self.size
        if self.policy != "center_crop":
            return h, w, 0, 0
        short = math.floor(max(h, w) / self.crop_pct)
        rh, rw = (int(short * ih / iw), short) if iw <= ih else (short, int(short * iw / ih))
        if rh < h or rw < w:
            raise ValueError(f"crop_pct={self.crop_pct} leaves {rh}×{rw}, smaller than the input {h}×{w}")
        return rh, rw, int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))

    def image(self, rgb: np.ndarray) -> np.ndarray:
        """An H×W×3 uint8 image as the model's input: a new (height, width, 3) uint8 array."""
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected H×W×3 uint8, got {rgb.shape} {rgb.dtype}")
        return self._fit(rgb, Image.Resampling.BICUBIC)

    def mask(self, m: np.ndarray) -> np.ndarray:
        """An H×W mask on the model's input grid, by nearest neighbour so it stays binary."""
        if m.ndim != 2:
            raise ValueError(f"expected an H×W mask, got {m.shape}")
        grey = (np.asarray(m) > 0).astype(np.uint8) * 255
        return self._fit(grey, Image.Resampling.NEAREST) > 127

    def _fit(self, a: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        h, w = self.size
        rh, rw, top, left = self.layout(*a.shape[:2])
        if a.shape[:2] != (rh, rw):
            a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((rw, rh), resample))
        return np.array(a[top : top + h, left : left + w], dtype=a.dtype, copy=True)


def to_source_grid(a: np.ndarray, source: tuple[int, int], geometry: Geometry) -> np.ndarray:
    """A model-size (h, w, …) array on the source's (rows, cols) grid, by nearest neighbour: each
    source pixel takes the value of the model pixel it became in :meth:`Geometry.image`; pixels a
    centre crop cut off get 0."""
    h, w = geometry.size
    ih, iw = source
    if a.shape[:2] != (h, w):
        raise ValueError(f"expected a {h}×{w} model-size array, got {a.shape}")
    rh, rw, top, left = geometry.layout(ih, iw)
    rows = np.floor((np.arange(ih) + 0.5) * rh / ih).astype(np.int64) - top
    cols = np.floor((np.arange(iw) + 0.5) * rw / iw).astype(np.int64) - left
    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out = np.zeros((ih, iw, *a.shape[2:]), dtype=a.dtype)
    out[np.ix_(ok_r, ok_c)] = a[np.ix_(rows[ok_r], cols[ok_c])]
    return out


class _Fitted:
    """A dataset whose ``load_image(i, size)`` and ``mask(i, artifact, size)`` fit the full image
    with a centre-crop geometry instead of stretching it; everything else is the dataset's."""

    def __init__(self, ds: Any, policy: str, crop_pct: float) -> None:
        self._ds, self._policy, self._crop_pct = ds, policy, crop_pct

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def __len__(self) -> int:
        return len(self._ds)

    def _geometry(self, size: int) -> Geometry:
        return Geometry((size, size), self._policy, self._crop_pct)

    def load_image(self, i: int, size: int | None = None) -> np.ndarray:
        full = self._ds.load_image(i)
        return full if size is None else self._geometry(size).image(full)

    def mask(self, i: int, artifact: str, size: int | None = None) -> np.ndarray:
        full = self._ds.mask(i, artifact)
        return full if size is None else self._geometry(size).mask(full)


def model_view(ds: Any, cfg: Any) -> Any:
    """``ds`` read the way the model ``cfg`` (a ``ModelCfg``) fits images: the dataset itself when
    it stretches (every dataset's ``load_image(i, size)`` does), else a view that centre-crops
    images and masks as :meth:`Geometry.image` and :meth:`Geometry.mask` do."""
    policy = getattr(cfg, "resize", "resize") if cfg is not None else "resize"
    if policy == "resize":
        return ds
    return _Fitted(ds, policy, float(getattr(cfg, "crop_pct", 0.875)))
