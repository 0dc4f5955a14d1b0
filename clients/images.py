"""Images as request bodies: what the client accepts (:data:`ImageInput`), the content type it
declares (:func:`sniff_content_type`), and the encoding of in-memory images (:func:`encode_image`).

numpy and Pillow are optional (medaudit-client[arrays]) and imported inside the functions that need
them.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image as PILImage

__all__ = ["ImageInput", "encode_image", "sniff_content_type"]

#: What :func:`encode_image` accepts: a path, encoded bytes, a PIL image or a uint8/uint16 array.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage | np.ndarray"


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
_SUFFIXES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".gif": "image/gif",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
}
OCTET = "application/octet-stream"


def sniff_content_type(data: bytes, suffix: str = "") -> str:
    """The content type of encoded image bytes: magic bytes first, then the file suffix.

    The service decodes by magic bytes too, so the declared type is a courtesy; bytes that are none
    of the five formats go as ``application/octet-stream`` and get the service's 415.
    """
    # DICOM first: its 128-byte preamble is free-form, and dual-format files put a TIFF header there.
    if data[128:132] == b"DICM":
        return "application/dicom"
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    return _SUFFIXES.get(suffix.lower(), OCTET)


def encode_image(image: ImageInput) -> tuple[bytes, str]:
    """Request body and content type for an image given as a path, bytes, PIL image or array.

    Files and bytes are sent as they are (the service reads DICOM, TIFF, ... itself); PIL images
    and arrays are encoded as PNG, which is lossless.

    Raises:
        FileNotFoundError: A path that does not exist.
        TypeError: Anything else than the types above.
        ValueError: An array PNG cannot hold (float, wrong shape).
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data, sniff_content_type(data)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()
        return data, sniff_content_type(data, path.suffix)
    # numpy and Pillow are optional (medaudit-client[arrays]): an array or PIL image can only have
    # been passed in if its module is already imported.
    numpy = sys.modules.get("numpy")
    pil = sys.modules.get("PIL.Image")
    if numpy is not None and isinstance(image, numpy.ndarray):
        return _array_png(image), "image/png"
    if pil is not None and isinstance(image, pil.Image):
        return _pil_png(image), "image/png"
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")


def _array_png(arr: np.ndarray) -> bytes:
    import numpy as np

    Image = _pillow()

    ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    ok_dtype = arr.dtype == np.uint8 or (arr.dtype == np.uint16 and arr.ndim == 2)
    if not (ok_shape and ok_dtype):
        raise ValueError(
            f"array images must be uint8 (H, W), (H, W, 3) or (H, W, 4), or uint16 (H, W); got "
            f"{arr.dtype} {arr.shape}: scale to uint8 first"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return _pil_png(Image.fromarray(np.ascontiguousarray(arr)))


def _pil_png(img: PILImage) -> bytes:
    buf = io.BytesIO()
    if img.mode not in ("1", "L", "LA", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, float...: modes PNG cannot store
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "encoding an array as PNG needs Pillow: pip install 'medaudit-client[arrays]'"
        ) from e
    return Image
