"""Reading the files a dataset is made of: CSV tables, images and masks, with errors that name them.

Every adapter (folder, ISIC 2019, CheXpert, class folders) reads through these helpers, so a bad
cell, a missing image or an unreadable file is reported the same way everywhere: the file, the
CSV line where there is one, and the fix.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from medaudit.models.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: How many missing/bad entries an error message lists before it only counts them.
SHOW = 5
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def require_root(root: str | Path) -> Path:
    """``root`` as a Path, or a DatasetError when it is not a folder."""
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} does not exist or is not a folder")
    return path


def line(path: Path, r: int) -> str:
    """Where data row ``r`` (0-based, after the header) of a CSV is: ``"<path> line <r + 2>"``."""
    return f"{path} line {r + 2}"


# ------------------------------------------------------------------------------------------- CSV


def read_csv(path: Path, what: str = "labels CSV") -> tuple[list[str], list[list[str]]]:
    """Header and non-blank rows of a CSV, values stripped.

    Raises:
        DatasetError: The file is missing or unreadable, empty, or has a header but no rows.
    """
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: CSVs saved by Excel
            table = [[v.strip() for v in row] for row in csv.reader(f) if any(v.strip() for v in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {what} {path}: {e}") from e
    if not table:
        raise DatasetError(f"{what} {path} is empty: no header row")
    if len(table) == 1:
        raise DatasetError(f"{what} {path} has a header ({', '.join(table[0])}) but no rows")
    return table[0], table[1:]


def column(path: Path, header: Sequence[str], name: str) -> int:
    """Position of column ``name``; a DatasetError naming the columns that exist otherwise."""
    if name not in header:
        raise DatasetError(f"column {name!r} not in {path}; columns: {', '.join(header)}")
    return list(header).index(name)


def refuse_extra_columns(path: Path, header: Sequence[str], known: Sequence[str], hint: str = "") -> None:
    """A DatasetError naming the columns of ``header`` outside ``known`` (and duplicated ones).

    An extra column is refused rather than ignored: it is usually a class or a split the reader
    would otherwise drop without a word.
    """
    dupes = sorted({h for h in header if list(header).count(h) > 1})
    if dupes:
        raise DatasetError(f"{path}: column {dupes[0]!r} appears more than once in the header")
    extra = [h for h in header if h not in known]
    if extra:
        raise DatasetError(
            f"{path}: unexpected column{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}; "
            f"this layout's columns are {', '.join(known)}{hint}"
        )


def cell(path: Path, rows: Sequence[Sequence[str]], r: int, c: int, name: str) -> str:
    """Non-empty value of row ``r``, column ``c``; errors give the CSV line number."""
    value = rows[r][c] if c < len(rows[r]) else ""
    if not value:
        raise DatasetError(f"{line(path, r)}: empty value in column {name!r}")
    return value


def check_unique(path: Path, ids: Sequence[str], where: Sequence[str] = ()) -> None:
    """A DatasetError naming the first duplicated id (with both of its lines when known)."""
    seen: dict[str, int] = {}
    dupes: list[str] = []
    for k, sid in enumerate(ids):
        if sid in seen and not dupes and where:
            first = where[seen[sid]]
            raise DatasetError(f"{where[k]}: image {sid!r} is listed again (first at {first})")
        if sid in seen:
            dupes.append(sid)
        seen.setdefault(sid, k)
    if dupes:
        raise DatasetError(f"{path}: {len(dupes)} duplicated image ids (first: {', '.join(dupes[:SHOW])})")


def sorted_names(values: set[str]) -> tuple[str, ...]:
    """Sorted label names; numerically when every name is an integer ("2" before "10")."""
    if all(v.lstrip("-").isdigit() for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


# ---------------------------------------------------------------------------------------- images


def resolve_images(
    image_dir: Path, ids: Sequence[str], extensions: Sequence[str], where: Sequence[str] = ()
) -> tuple[Path, ...]:
    """The file of each id: ``<id>`` if it carries an allowed extension, else ``<id><ext>``.

    The folder is listed once rather than probed per id, so large datasets resolve quickly.

    Args:
        image_dir: The image folder.
        ids: Sample ids, possibly with a sub-folder (``"a/b.png"``).
        extensions: Extensions tried when an id has none.
        where: Per id, where it was listed (``"labels.csv line 7"``), for the error message.

    Raises:
        DatasetError: The folder is missing, or some ids have no file: the first is named with its
            line and the file looked for, and up to five are listed.
    """
    if not image_dir.is_dir():
        raise DatasetError(f"image folder {image_dir} does not exist")
    with os.scandir(image_dir) as it:
        present = {e.name for e in it}
    paths: list[Path] = []
    missing: list[int] = []
    for k, sid in enumerate(ids):
        name = _find_name(image_dir, sid, present, extensions)
        if name is None:
            missing.append(k)
        else:
            paths.append(image_dir / name)
    if missing:
        first = missing[0]
        at = f"{where[first]}: " if where else ""
        shown = ", ".join(ids[k] for k in missing[:SHOW])
        raise DatasetError(
            f"{at}image {ids[first]!r} is listed but absent: no {image_dir / ids[first]}"
            f"{'' if Path(ids[first]).suffix else '[' + '|'.join(extensions) + ']'}; "
            f"{len(missing)} images missing from {image_dir} (first {min(len(missing), SHOW)}: {shown}); "
            f"looked for <id> and <id> + one of {', '.join(extensions)}"
        )
    return tuple(paths)


def _find_name(image_dir: Path, sid: str, present: set[str], extensions: Sequence[str]) -> str | None:
    exts = [e.lower() for e in extensions]
    candidates = [sid] if Path(sid).suffix.lower() in exts else []
    candidates += [sid + e for e in extensions] + [sid + e.upper() for e in extensions]
    for name in candidates:
        # ids with a sub-folder ("a/b.png") are not in the top-level listing: probe those.
        if name in present or ("/" in name and (image_dir / name).is_file()):
            return name
    return None


def read_rgb(path: Path, size: int | None = None, where: str = "") -> np.ndarray:
    """An image file as H×W×3 uint8 RGB, optionally resized to ``size``² with bicubic.

    16-bit grey images are scaled to 8 bit (PIL's own conversion would clip them at 255); 32-bit
    int/float grey images are taken as 8-bit values when none exceeds 255, else as 16-bit ones.

    Args:
        path: The file.
        size: Square side to resize to, or None.
        where: Where the image was listed (``"labels.csv line 7"``), prefixed to errors.

    Raises:
        DatasetError: The file is missing, unreadable or not a valid image.
    """
    at = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            rgb = _to_rgb(im)
    except FileNotFoundError as e:
        raise DatasetError(f"{at}image file {path} does not exist") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{at}cannot read image {path}: {e}") from e
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).copy()


def check_image(path: Path, where: str = "") -> tuple[int, int]:
    """Decode ``path`` cheaply (JPEGs at reduced scale) to prove it readable; its (height, width).

    Raises:
        DatasetError: The file is missing, truncated or not an image.
    """
    at = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            w, h = im.size
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))  # JPEG: decode at 1/8, still reads it all
            im.load()
    except FileNotFoundError as e:
        raise DatasetError(f"{at}image file {path} does not exist") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{at}cannot read image {path}: {e}") from e
    return h, w


def image_size(path: Path, where: str = "") -> tuple[int, int]:
    """(height, width) of an image from its header."""
    at = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError as e:
        raise DatasetError(f"{at}image file {path} does not exist") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{at}cannot read image {path}: {e}") from e
    return h, w


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT or im.mode == "I" or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def read_mask(
    path: Path, size: int | None, expect: tuple[int, int] | None = None, image: str = ""
) -> np.ndarray:
    """A mask PNG as H×W bool (non-zero = artifact), resized with nearest so it stays binary.

    Args:
        path: The mask file.
        size: Square side to resize to, or None.
        expect: The (height, width) of its image: a mask of another size is refused, since it
            cannot be laid over the image without guessing.
        image: The image's file, named in that error.

    Raises:
        DatasetError: The mask is unreadable or of the wrong size.
    """
    try:
        with Image.open(path) as im:
            grey = _to_rgb(im).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e
    if expect is not None and (grey.size[1], grey.size[0]) != expect:
        raise DatasetError(
            f"mask {path} is {grey.size[1]}×{grey.size[0]} (h×w) but its image {image} is "
            f"{expect[0]}×{expect[1]}: a mask must have its image's size"
        )
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(grey) > 0
