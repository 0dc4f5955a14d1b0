"""The hostile-input corpus, shared by the decoder's unit tests (tests/unit/test_inputs.py) and the
HTTP suite (tests/live/test_hostile_http.py): hand-crafted headers, truncations, seeded byte mutations
of valid files, and pydicom's bundled test files. Deterministic (seeded), generated on import.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder

from medaudit.service.errors import (
    AuditError,
    EmptyImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from medaudit.service.inputs import Limits
from medaudit.testing.dicom import with_transfer_syntax

RNG_SEED = 0


def dcm_path(name: str) -> str:
    # download=False: pydicom fetches non-bundled files from the network; the tests must not.
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"{name} is not bundled with pydicom {pydicom.__version__}"
    return path


def dcm(name: str) -> bytes:
    return Path(dcm_path(name)).read_bytes()


def ds_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose IHDR declares ``width×height`` and a tiny, wrong IDAT: a bomb candidate."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def gradient(h: int = 40, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=2).astype(np.uint8)


def valid_samples() -> dict[str, bytes]:
    rgb = Image.fromarray(gradient())
    return {
        "png": save(rgb, "PNG"),
        "jpeg": save(rgb, "JPEG", quality=90),
        "gif": save(rgb.convert("P"), "GIF"),
        "tiff": save(rgb, "TIFF"),
        "dicom": dcm("MR_small.dcm"),
    }


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 255 - 80 * i)) for i in range(3)]
    return save(frames[0], "GIF", save_all=True, append_images=frames[1:])


def hostile() -> list[tuple[str, bytes, str | None, Limits, type[AuditError]]]:
    v = valid_samples()
    rng = np.random.default_rng(RNG_SEED)
    no_pixels, huge, hsv = (pydicom.dcmread(dcm_path("MR_small.dcm")) for _ in range(3))
    del no_pixels.PixelData
    huge.Rows, huge.Columns = 60000, 60000
    hsv.PhotometricInterpretation = "HSV"
    rgb16 = Image.fromarray(gradient())
    cases: list[tuple[str, bytes, str | None, Limits, type[AuditError]]] = [
        ("empty", b"", None, Limits(), EmptyImageError),
        ("random", rng.bytes(2048), None, Limits(), UnsupportedMediaTypeError),
        ("random-declared-png", rng.bytes(512), "image/png", Limits(), UnsupportedMediaTypeError),
        ("text", b"hello, this is not an image", "text/plain", Limits(), UnsupportedMediaTypeError),
        ("over-max-bytes", v["png"], "image/png", Limits(max_bytes=100), PayloadTooLargeError),
        ("png-truncated", v["png"][: len(v["png"]) // 2], None, Limits(), InvalidImageError),
        ("png-signature-only", v["png"][:8], None, Limits(), InvalidImageError),
        (
            "png-bad-crc",
            v["png"][:40] + bytes([v["png"][40] ^ 0xFF]) + v["png"][41:],
            None,
            Limits(),
            InvalidImageError,
        ),
        ("png-100000x100000", png_header(100_000, 100_000), "image/png", Limits(), ImageTooLargeError),
        # above PIL's 2×MAX_IMAGE_PIXELS: its DecompressionBombError, not our check, fires first
        (
            "png-pil-bomb-error",
            png_header(15_000, 15_000),
            None,
            Limits(max_pixels=10**9),
            ImageTooLargeError,
        ),
        # between MAX_IMAGE_PIXELS and 2×: PIL only warns; the warning must become the 413
        (
            "png-pil-bomb-warning",
            png_header(10_000, 10_000),
            None,
            Limits(max_pixels=10**9),
            ImageTooLargeError,
        ),
        ("png-zero-size", png_header(0, 0), None, Limits(), InvalidImageError),
        (
            "png-animated",
            save(rgb16, "PNG", save_all=True, append_images=[rgb16.rotate(90)]),
            None,
            Limits(),
            InvalidImageError,
        ),
        ("jpeg-truncated", v["jpeg"][: len(v["jpeg"]) // 2], "image/jpeg", Limits(), InvalidImageError),
        ("jpeg-magic-only", b"\xff\xd8\xff" + b"\x00" * 64, None, Limits(), InvalidImageError),
        ("gif-animated", animated_gif(), "image/gif", Limits(), InvalidImageError),
        ("gif-header-only", b"GIF89a" + rng.bytes(16), None, Limits(), InvalidImageError),
        ("tiff-header-only", b"II*\x00" + rng.bytes(32), None, Limits(), InvalidImageError),
        (
            "tiff-multipage",
            save(rgb16, "TIFF", save_all=True, append_images=[rgb16]),
            None,
            Limits(),
            InvalidImageError,
        ),
        ("too-small", save(Image.new("RGB", (1, 1)), "PNG"), None, Limits(min_side=2), ImageTooSmallError),
        ("dicom-no-pixeldata", ds_bytes(no_pixels), "application/dicom", Limits(), InvalidImageError),
        ("dicom-huge-declared", ds_bytes(huge), None, Limits(), ImageTooLargeError),
        ("dicom-hsv", ds_bytes(hsv), None, Limits(), UnsupportedMediaTypeError),
        ("dicom-truncated", dcm("MR_truncated.dcm"), None, Limits(), InvalidImageError),
        # multi-frame files decode their first frame (tests/unit/test_dicom_io.py); video does not
        (
            "dicom-mpeg4-video",
            with_transfer_syntax(dcm("MR_small.dcm"), pydicom.uid.MPEG4HP41),
            None,
            Limits(),
            UnsupportedMediaTypeError,
        ),
        (
            "dicom-unknown-syntax",
            with_transfer_syntax(dcm("MR_small.dcm"), "1.2.840.10008.1.2.4.110"),
            None,
            Limits(),
            UnsupportedMediaTypeError,
        ),
        (
            "dicom-preamble-garbage",
            b"\x00" * 128 + b"DICM" + rng.bytes(256),
            None,
            Limits(),
            InvalidImageError,
        ),
        ("dicom-12bit-jpeg", dcm("JPEG-lossy.dcm"), None, Limits(), UnsupportedMediaTypeError),
        ("dicom-no-meta", dcm("no_meta.dcm"), "application/dicom", Limits(), UnsupportedMediaTypeError),
    ]
    if not get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        cases.append(
            (
                "dicom-jpeg-ls-no-handler",
                dcm("MR_small_jpeg_ls_lossless.dcm"),
                None,
                Limits(),
                UnsupportedMediaTypeError,
            )
        )
    return cases


HOSTILE = hostile()
MUTANTS_PER_FORMAT = 12


def mutants() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(RNG_SEED + 1)
    out = []
    for fmt, data in valid_samples().items():
        for i in range(MUTANTS_PER_FORMAT):
            b = bytearray(data)
            start = 132 if fmt == "dicom" else 8  # keep the magic so the decoder, not detection, is hit
            for pos in rng.integers(start, len(b), size=1 + i % 4):
                b[pos] = int(rng.integers(0, 256))
            if i % 3 == 2:
                b = b[: int(rng.integers(start + 1, len(b)))]
            out.append((f"{fmt}-{i}", bytes(b)))
    return out


MUTANTS = mutants()
