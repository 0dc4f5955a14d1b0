"""A mixed archive on disk for ``medaudit scan`` tests and benchmarks: synthderm images spread over
site folders as PNG, JPEG and DICOM (RGB secondary capture), plus a few corrupt files, the way a
hospital export mixes them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SITES = ("site_a/2024", "site_a/2025", "site_b", "site_c/ward_1")
#: What each bad file is: a truncated PNG, a text file named like a JPEG, an empty DICOM.
CORRUPT = ("truncated.png", "not_an_image.jpg", "empty.dcm")


def write_mixed_folder(root: Path, n: int, size: int = 32, seed: int = 0, corrupt: int = 3) -> Path:
    """``n`` synthderm images (the ``ch`` variant: band-aids on benign images, as trained) under
    ``root``, cycling through PNG, JPEG and DICOM and through :data:`SITES`, plus ``corrupt`` bad
    files (cycling through :data:`CORRUPT`) in ``root/bad``. Returns ``root``."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.testing.dicom import source

    ds = SynthDerm(SynthDermConfig(size=size, seed=seed, n_train=n, n_val=1, n_test=1))
    for i in range(n):
        rgb = ds.sample(i, "ch").image
        d = root / SITES[i % len(SITES)]
        d.mkdir(parents=True, exist_ok=True)
        kind = i % 3
        if kind == 0:
            Image.fromarray(rgb).save(d / f"img{i:05d}.png")
        elif kind == 1:
            Image.fromarray(rgb).save(d / f"img{i:05d}.jpg", quality=95)
        else:
            (d / f"img{i:05d}.dcm").write_bytes(source("rgb", size, size, pixels=np.ascontiguousarray(rgb)))
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    for j in range(corrupt):
        name = CORRUPT[j % len(CORRUPT)]
        path = bad / f"{j:03d}_{name}"
        if name.endswith(".png"):
            buf = io.BytesIO()
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
            path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        elif name.endswith(".jpg"):
            path.write_text("this is not an image\n")
        else:
            path.write_bytes(b"")
    return root
