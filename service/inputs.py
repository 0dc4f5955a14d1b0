"""Decoding and validation of uploaded images: bytes in, H×W×3 uint8 RGB out, or a 4xx error.

Formats: PNG, JPEG (incl. MPO), TIFF, GIF, and DICOM Part-10 files (via pydicom). Everything bad
raises an :class:`~service.errors.InvalidImageError` subclass, never anything else.

Decisions (see also the ``notes`` every :class:`DecodedImage` carries back to the client):

* **The bytes decide the format.** The format is detected from magic bytes; the declared content
  type is compared with it and a mismatch becomes a note, not an error. ``curl --data-binary``
  declares ``application/x-www-form-urlencoded`` unless told otherwise, and browsers label by file
  extension: refusing those would refuse good images, while decoding by what the bytes are is no
  less safe. Bytes that are none of the five formats get a 415 that names the declared type.
* **Limits before decoding.** Bytes are checked against ``max_bytes`` first; width×height (and,
  for DICOM, frames) from the header are checked against ``max_pixels`` before any pixel is decoded.
  PIL's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``, error *and* warning) maps to the
  same 413, so the effective limit is the smaller of the two.
* **One frame or none.** Animated GIF/PNG and multi-page TIFF are refused (422): which frame a
  medical audit should look at is the caller's decision, not ours. MPO (camera JPEGs that bundle a
  preview) gives its primary image, with a note. A multi-frame DICOM gives the frame asked for
  (``frame``, default the first, with a note that names the frame count); :func:`decode_dicom`
  decodes several (``frames``), up to a limit (the DICOM endpoints' ``frames=all``).
* **Tiny images are accepted** (down to ``min_side``, default 1 px) and upscaled to the model size
  by :func:`to_model_input`, with a note when they are smaller than :data:`SMALL_SIDE`.
* **Alpha is composited on black** (premultiplied: ``rgb·α``). Transparent means "no signal", and
  dermatoscope vignettes, which the models have seen, are black.
* **Bit depths are scaled, never clipped.** 16-bit grey → ``/257`` (65535 → 255), and 32-bit int or
  float grey are read as 8-bit when none exceeds 255, else as 16-bit: exactly what the training
  loader does (``medaudit.models.data.folder.read_rgb``), so served inputs match trained ones.
* **DICOM**: modality LUT (rescale slope/intercept), then the first VOI LUT or window
  (LINEAR, LINEAR_EXACT, SIGMOID; PS3.3 C.11.2), else min–max of the modality values; MONOCHROME1
  is inverted; YBR is converted to RGB by pydicom; PALETTE COLOR goes through its LUT. Compressed
  transfer syntaxes decode through pydicom's plugins (pylibjpeg: JPEG, JPEG 2000, HTJ2K, RLE;
  pyjpegls: JPEG-LS); one with no decoder (MPEG/HEVC video, JPEG 2000 Part 2, JPIP, an unknown
  UID) is a 415 that names it.
* **EXIF orientation** is applied (the image is what a viewer shows).

Thread-safety: decoder warnings are collected with :func:`warnings.catch_warnings`, which is
process-global before Python 3.14; under concurrent decoding a warning may land in another
request's notes. Errors are unaffected: every limit is checked from the header first.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medaudit.models.data.geometry import Geometry
from medaudit.models.errors import ConfigError
from medaudit.service.errors import (
    EmptyImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidImageError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

#: format id -> canonical content type.
FORMATS: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "tiff": "image/tiff",
    "gif": "image/gif",
    "dicom": "application/dicom",
}
_CONTENT_TYPES: dict[str, str] = {
    **{ct: fmt for fmt, ct in FORMATS.items()},
    "image/jpg": "jpeg",
    "image/pjpeg": "jpeg",
    "image/tif": "tiff",
    "image/x-tiff": "tiff",
    "image/dicom": "dicom",
    "application/dicom+dcm": "dicom",
}
#: content types that say nothing about the format.
_GENERIC = {"", "application/octet-stream", "binary/octet-stream", "application/x-www-form-urlencoded"}
_PIL_FORMATS: dict[str, list[str]] = {
    "png": ["PNG"],
    "jpeg": ["JPEG", "MPO"],
    "tiff": ["TIFF"],
    "gif": ["GIF"],
}
#: images with a side below this get a note that they will be upscaled a lot.
SMALL_SIDE = 32
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr")


@dataclass(frozen=True)
class Limits:
    """Per-request input limits (``MEDAUDIT_MAX_BYTES``, ``…_MAX_PIXELS``, ``…_MIN_IMAGE_SIDE``)."""

    max_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    min_side: int = 1

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "min_side"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Limits.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload.

    Attributes:
        rgb: H×W×3 uint8, read-only, after EXIF orientation and colour conversion.
        source_format: One of :data:`FORMATS` ("png", "jpeg", "tiff", "gif", "dicom").
        original_size: (height, width) as stored in the file, before EXIF orientation.
        mode: The source's pixel model: PIL mode ("I;16", "CMYK", …) or, for DICOM, the photometric
            interpretation and bits ("MONOCHROME2/16").
        notes: What was done that the client may want to know (conversions, mismatches, fallbacks).
    """

    rgb: np.ndarray
    source_format: str
    original_size: tuple[int, int]
    mode: str
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        a = self.rgb
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"DecodedImage.rgb must be H×W×3 uint8, got {a.shape} {a.dtype}")
        a.setflags(write=False)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of :attr:`rgb`."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def detect_format(data: bytes) -> str | None:
    """The format id the magic bytes announce, or ``None``."""
    # DICM first: the 128-byte DICOM preamble may itself hold a TIFF header (dual-format files).
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


def decode_image(
    data: bytes, content_type: str | None = None, limits: Limits | None = None, frame: int = 1
) -> DecodedImage:
    """Decode and validate one uploaded image.

    Args:
        data: The request body.
        content_type: The declared ``Content-Type`` (parameters allowed), or ``None``.
        limits: Byte, pixel and side limits; defaults to :class:`Limits()`.
        frame: Of a multi-frame DICOM, which frame (1-based).

    Returns:
        The image as RGB uint8 with what was done in ``notes``.

    Raises:
        EmptyImageError: No bytes (400).
        PayloadTooLargeError: More than ``max_bytes`` (413).
        ImageTooLargeError: The header declares more than ``max_pixels`` (413).
        UnsupportedMediaTypeError: Not a supported format, or a DICOM transfer syntax / colour model
            with no decoder (415).
        InvalidImageError: Truncated or corrupt, animated, no pixel data, no such frame (422).
        ImageTooSmallError: A side below ``min_side`` (422).
    """
    return _decode(data, content_type, limits or Limits(), [frame])[1][0]


def decode_dicom(
    data: bytes, limits: Limits | None = None, frames: list[int] | None = None, max_frames: int = 1
) -> tuple[Any, list[DecodedImage]]:
    """Decode frames of a DICOM Part-10 file: its parsed dataset and one image per frame asked for.

    Args:
        data: The file.
        limits: As for :func:`decode_image`.
        frames: 1-based frame numbers; ``None`` for every frame.
        max_frames: The most frames one call decodes (``frames=None`` on a longer file is a 422).

    Raises:
        As :func:`decode_image`; bytes that are not DICOM are a 415.
    """
    if detect_format(bytes(data[:132])) != "dicom":
        raise UnsupportedMediaTypeError(
            "the body is not a DICOM Part-10 file (no DICM preamble)", declared=FORMATS["dicom"]
        )
    return _decode(data, FORMATS["dicom"], limits or Limits(), frames, max_frames)


def _decode(
    data: bytes, content_type: str | None, limits: Limits, frames: list[int] | None, max_frames: int = 1
) -> tuple[Any, list[DecodedImage]]:
    if not data:
        raise EmptyImageError("the request body is empty; send the image bytes")
    check_body_size(len(data), limits)
    fmt = detect_format(bytes(data[:132]))
    notes: list[str] = []
    declared = _declared_format(content_type)
    if fmt is None:
        raise UnsupportedMediaTypeError(
            f"the bytes are not one of {', '.join(FORMATS)} (declared content type {content_type!r}, "
            f"first bytes {bytes(data[:8]).hex()}); DICOM must be a Part-10 file with the DICM preamble",
            declared=content_type,
            supported=sorted(FORMATS.values()),
        )
    if declared is not None and declared != fmt:
        notes.append(f"declared content type {content_type!r} but the bytes are {fmt}; decoded as {fmt}")
    ds = None
    try:
        with _collect_warnings(notes):
            if fmt == "dicom":
                ds, rgbs, original, mode = _decode_dicom(bytes(data), limits, notes, frames, max_frames)
            else:
                rgb, original, mode = _decode_pil(bytes(data), fmt, limits, notes)
                rgbs = [rgb]
    except InvalidImageError:
        raise
    except Exception as e:  # a decoder's own failure on hostile bytes is the client's 4xx
        raise InvalidImageError(f"cannot decode the {fmt} image: {_short(e)}", format=fmt) from e
    h, w = rgbs[0].shape[:2]
    if min(h, w) < limits.min_side:
        raise ImageTooSmallError(
            f"the image is {w}×{h} px; each side must be at least {limits.min_side} px",
            width=w,
            height=h,
            min_side=limits.min_side,
        )
    if min(h, w) < SMALL_SIDE:
        notes.append(f"small image ({w}×{h} px): it is upscaled to the model's input size")
    return ds, [DecodedImage(np.ascontiguousarray(rgb), fmt, original, mode, tuple(notes)) for rgb in rgbs]


def check_body_size(size: int, limits: Limits) -> None:
    """Raises :class:`PayloadTooLargeError` (413) when a body of ``size`` bytes is over the limit:
    callers that hold a file or a declared length check it before reading the bytes."""
    if size > limits.max_bytes:
        raise PayloadTooLargeError(
            f"the body has {size} bytes, more than the limit of {limits.max_bytes}",
            size_bytes=size,
            max_bytes=limits.max_bytes,
        )


def to_model_input(
    img: DecodedImage | np.ndarray,
    size: int | tuple[int, int],
    policy: str = "resize",
    crop_pct: float = 0.875,
) -> np.ndarray:
    """Resize to the model's input size with bicubic (method.md §9, §12).

    ``policy="resize"`` (medaudit's own models) stretches to the size with no crop: exactly what
    the training loader does (``medaudit.models.data.folder.read_rgb(path, size)``).
    ``policy="center_crop"`` (a model spec's, for models trained with torchvision's or timm's eval
    transform) resizes the short side to ``side / crop_pct``, keeping the aspect ratio, and cuts
    the centre. Normalisation (mean/std of :class:`medaudit.models.registry.ModelCfg`) is the
    predictor's step, not this one.

    Args:
        img: A :class:`DecodedImage` or an H×W×3 uint8 array.
        size: Side of the square model input, or (height, width).
        policy: ``"resize"`` or ``"center_crop"`` (``ModelCfg.resize``).
        crop_pct: The crop's share of the resized image (``ModelCfg.crop_pct``).

    Returns:
        A new, writable height×width×3 uint8 array.
    """
    rgb = img.rgb if isinstance(img, DecodedImage) else img
    h, w = (size, size) if isinstance(size, int) else size
    return Geometry((h, w), policy, crop_pct).image(rgb)


# -- helpers ---------------------------------------------------------------------------------------


def _declared_format(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct in _GENERIC:
        return None
    return _CONTENT_TYPES.get(ct, ct or None)


def _short(e: BaseException, n: int = 200) -> str:
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= n else msg[: n - 1] + "…"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@contextmanager
def _collect_warnings(notes: list[str]) -> Iterator[None]:
    """Decoder warnings become notes; PIL's decompression-bomb warning becomes a 413."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            raise ImageTooLargeError(f"decompression-bomb guard: {w.message}")
        text = f"decoder warning: {_short(w.message, 160)}"  # type: ignore[arg-type]
        if text not in notes:
            notes.append(text)


def _check_pixels(h: int, w: int, limits: Limits, frames: int = 1) -> None:
    if h < 1 or w < 1:
        raise InvalidImageError(f"the header declares an empty image ({w}×{h} px)", width=w, height=h)
    if h * w * frames > limits.max_pixels:
        raise ImageTooLargeError(
            f"the header declares {w}×{h} px ({h * w * frames} pixels), more than the limit of "
            f"{limits.max_pixels}",
            width=w,
            height=h,
            pixels=h * w * frames,
            max_pixels=limits.max_pixels,
        )


# -- PNG / JPEG / TIFF / GIF -----------------------------------------------------------------------


def _decode_pil(data: bytes, fmt: str, limits: Limits, notes: list[str]) -> tuple[np.ndarray, Any, str]:
    try:
        with warnings.catch_warnings():
            # raise at open, before a single pixel of a would-be bomb is allocated
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_PIL_FORMATS[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"decompression-bomb guard: {e}", max_pixels=limits.max_pixels) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidImageError(f"cannot read the {fmt} header: {_short(e)}", format=fmt) from e
    with im:
        w, h = im.size
        _check_pixels(h, w, limits)
        n_frames = int(getattr(im, "n_frames", 1))
        if im.format == "MPO":
            notes.append(f"MPO file with {n_frames} images: the primary image is used")
        elif n_frames > 1:
            kind = {"gif": "animated GIF", "png": "animated PNG", "tiff": "multi-page TIFF"}.get(fmt, fmt)
            raise InvalidImageError(
                f"{kind} with {n_frames} frames; send a single frame (e.g. as PNG)",
                format=fmt,
                frames=n_frames,
            )
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InvalidImageError(
                f"the {fmt} image is truncated or corrupt: {_short(e)}", format=fmt
            ) from e
        oriented = _apply_orientation(im, notes)
        return _pil_to_rgb(oriented, notes), (h, w), im.mode


def _apply_orientation(im: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = im.getexif().get(0x0112)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            out = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied")
            return out
    except Exception as e:  # malformed EXIF must not lose an otherwise good image
        notes.append(f"EXIF orientation ignored: {_short(e, 100)}")
    return im


def _pil_to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = a / 257.0
            notes.append(f"{mode} grey scaled to 8 bit (/257)")
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        if int(alpha.min(initial=255)) < 255:
            notes.append("transparent pixels composited on black")
        return ((rgba[:, :, :3] * alpha + 127) // 255).astype(np.uint8)
    if mode in _PLAIN_MODES:
        if mode == "CMYK":
            notes.append("CMYK converted to RGB without colour management")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    try:
        out = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise UnsupportedMediaTypeError(
            f"pixel mode {mode!r} cannot be converted to RGB; supported modes: "
            f"{', '.join((*_PLAIN_MODES, *_ALPHA_MODES, *_SIXTEEN_BIT, 'I', 'F'))}",
            mode=mode,
        ) from e
    notes.append(f"pixel mode {mode} converted to RGB by PIL")
    return out


# -- DICOM -----------------------------------------------------------------------------------------

_MONO = ("MONOCHROME1", "MONOCHROME2")
_RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")
_PHOTOMETRIC = (*_MONO, *_RGB_LIKE, "PALETTE COLOR")


def _decode_dicom(
    data: bytes, limits: Limits, notes: list[str], frames: list[int] | None, max_frames: int
) -> tuple[Any, list[np.ndarray], Any, str]:
    import pydicom  # deferred: only DICOM requests pay for it
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidImageError(f"cannot parse the DICOM file: {_short(e)}", format="dicom") from e
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise UnsupportedMediaTypeError(
                f"DICOM {other[0]} (floating-point pixels) is not supported; send integer PixelData",
                format="dicom",
            )
        raise InvalidImageError(
            "the DICOM file has no PixelData element (is it an image object?)", format="dicom"
        )
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, ValueError, TypeError) as e:
        raise InvalidImageError(
            f"the DICOM file has invalid Rows/Columns/NumberOfFrames: {_short(e)}", format="dicom"
        ) from e
    _check_pixels(rows, cols, limits, n_frames)
    wanted = _frames_wanted(frames, n_frames, max_frames, notes)
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if pi not in _PHOTOMETRIC:
        raise UnsupportedMediaTypeError(
            f"DICOM photometric interpretation {pi!r} is not supported; supported: {', '.join(_PHOTOMETRIC)}",
            format="dicom",
            photometric_interpretation=pi,
        )
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        raise InvalidImageError("the DICOM file meta has no TransferSyntaxUID", format="dicom")
    if not ts.is_transfer_syntax:
        raise UnsupportedMediaTypeError(
            f"DICOM transfer syntax {ts} is not one pydicom knows; send it uncompressed or as "
            "JPEG, JPEG-LS, JPEG 2000 or RLE",
            format="dicom",
            transfer_syntax=str(ts),
        )
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as e:
            raise UnsupportedMediaTypeError(
                f"DICOM transfer syntax {ts.name} ({ts}) has no pixel decoder here; send it "
                "uncompressed or as JPEG, JPEG-LS, JPEG 2000 or RLE",
                format="dicom",
                transfer_syntax=str(ts),
            ) from e
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "none listed"
            raise UnsupportedMediaTypeError(
                f"DICOM transfer syntax {ts.name} ({ts}) cannot be decoded here: no decoder plugin is "
                f"installed ({missing}); send it uncompressed or as JPEG/JPEG 2000/RLE",
                format="dicom",
                transfer_syntax=str(ts),
            )
    try:
        arr = ds.pixel_array
    except RuntimeError as e:
        cls = UnsupportedMediaTypeError if "not support" in str(e) else InvalidImageError
        raise cls(f"cannot decode DICOM pixel data ({ts.name}): {_short(e, 300)}", format="dicom") from e
    except (ValueError, AttributeError, KeyError, TypeError, NotImplementedError) as e:
        raise InvalidImageError(f"cannot decode DICOM pixel data: {_short(e, 300)}", format="dicom") from e
    bits = int(ds.get("BitsAllocated", arr.dtype.itemsize * 8))
    mode = f"{pi}/{bits}"
    out = []
    for k in wanted:
        a = arr[k - 1] if n_frames > 1 else arr
        if pi in _MONO:
            out.append(_dicom_mono(a, ds, pi, notes))
        elif pi == "PALETTE COLOR":
            out.append(_dicom_palette(a, ds, notes))
        else:
            out.append(_dicom_rgb(a, ds, notes))
    del ds.PixelData  # the caller keeps the header (DICOM out), not a second copy of the pixels
    return ds, out, (rows, cols), mode


def _frames_wanted(frames: list[int] | None, n: int, max_frames: int, notes: list[str]) -> list[int]:
    """The 1-based frame numbers to decode (``None``: all), checked against the file and the limit."""
    if frames is None:
        if n > max_frames:
            raise InvalidImageError(
                f"multi-frame DICOM with {n} frames, more than the {max_frames} audited per instance "
                "(MEDAUDIT_DICOM_MAX_FRAMES); ask for frames=first or a list such as frames=1,2",
                format="dicom",
                frames=n,
                max_frames=max_frames,
            )
        frames = list(range(1, n + 1))
    bad = [f for f in frames if not 1 <= f <= n]
    if bad:
        raise InvalidImageError(
            f"frame {bad[0]} asked for, but the DICOM file has frames 1 to {n}", format="dicom", frames=n
        )
    if len(frames) > max(max_frames, 1):
        raise InvalidImageError(
            f"{len(frames)} frames asked for, more than the limit of {max_frames} per instance",
            format="dicom",
            max_frames=max_frames,
        )
    if n > 1:
        which = "frame " + ", ".join(map(str, frames)) if len(frames) < n else "every frame"
        notes.append(f"multi-frame DICOM with {n} frames: {which} decoded")
    return list(frames)


def _dicom_mono(arr: np.ndarray, ds: Any, pi: str, notes: list[str]) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if arr.ndim != 2:
        raise InvalidImageError(
            f"{pi} pixel data has shape {arr.shape}, expected rows×columns", format="dicom"
        )
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        notes.append("DICOM modality LUT / rescale applied")
    unit = _voi_to_unit(values, ds, notes)
    if pi == "MONOCHROME1":
        unit = 1.0 - unit
        notes.append("MONOCHROME1 inverted")
    g = np.rint(unit * 255.0).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def _voi_to_unit(values: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    """Values of interest mapped to [0, 1]: VOI LUT, else window, else min–max (PS3.3 C.11.2)."""
    try:
        if ds.get("VOILUTSequence"):
            from pydicom.pixels.processing import apply_voi

            # integral stored values as integers: pydicom's LUT lookup warns on floats
            whole = values.astype(np.int64) if np.array_equal(values, np.rint(values)) else values
            out = np.asarray(apply_voi(whole, ds, index=0), dtype=np.float64)
            lut = _lut_data(ds.VOILUTSequence[0])
            lo, hi = float(lut.min()), float(lut.max())
            notes.append("DICOM VOI LUT applied")
            return np.clip((out - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(out)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            return _window(values, ds, notes)
    except InvalidImageError:
        raise
    except Exception as e:  # a malformed VOI must not lose the image: fall back, and say so
        notes.append(f"DICOM VOI ignored ({_short(e, 120)})")
    lo, hi = float(values.min()), float(values.max())
    notes.append("no DICOM VOI LUT or window: scaled by min–max")
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _lut_data(item: Any) -> np.ndarray:
    """A LUT's entries: LUT Data is US (a list) or OW (bytes of 8- or 16-bit entries)."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        bits = int(item.LUTDescriptor[2])
        return np.frombuffer(data, dtype="<u2" if bits > 8 else "u1").astype(np.float64)
    return np.asarray(
        data if isinstance(data, list | tuple) or hasattr(data, "__len__") else [data], np.float64
    )


def _first(v: Any) -> float:
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return float(v[0])
    return float(v)


def _window(x: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if func == "LINEAR":  # C.11.2.1.2.1
        if w < 1:
            raise ValueError(f"LINEAR window width {w} < 1")
        if w == 1:
            out = (x > c - 0.5).astype(np.float64)
        else:
            out = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    elif func == "LINEAR_EXACT":  # C.11.2.1.3.2
        if w <= 0:
            raise ValueError(f"LINEAR_EXACT window width {w} <= 0")
        out = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    elif func == "SIGMOID":  # C.11.2.1.3.1
        if w <= 0:
            raise ValueError(f"SIGMOID window width {w} <= 0")
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    else:
        raise ValueError(f"VOI LUT function {func!r} (supported: LINEAR, LINEAR_EXACT, SIGMOID)")
    notes.append(f"DICOM window applied (center {c:g}, width {w:g}, {func})")
    return out


def _dicom_rgb(arr: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidImageError(
            f"colour pixel data has shape {arr.shape}, expected rows×columns×3", format="dicom"
        )
    pi = str(ds.PhotometricInterpretation).upper()
    if pi != "RGB":
        notes.append(f"DICOM {pi} converted to RGB")
    if arr.dtype == np.uint8:
        return np.asarray(arr)
    stored = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    top = float(2**stored - 1)
    notes.append(f"{stored}-bit colour scaled to 8 bit")
    return np.clip(np.rint(arr.astype(np.float64) / top * 255.0), 0, 255).astype(np.uint8)


def _dicom_palette(arr: np.ndarray, ds: Any, notes: list[str]) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = np.asarray(apply_color_lut(arr, ds))
    notes.append("DICOM PALETTE COLOR mapped through its LUT")
    if rgb.dtype == np.uint8:
        return rgb
    return np.clip(np.rint(rgb.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
