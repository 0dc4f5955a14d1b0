"""Real image datasets read from disk: a generic "folder + labels CSV" layout and its shared base.

Layout read by :class:`FolderDataset` (and written by ``SynthDerm.export``)::

    root/labels.csv                  image,label[,split]
    root/images/<id>[.png|.jpg|...]
    root/artifacts.json              optional, {artifact: [ids]} (models.data.annotations)
    root/masks/<id>_<artifact>.png   optional, non-zero = artifact pixel

Conventions follow method.md §8: when the CSV has no split column, samples are split with
``default_rng(0)``: 10% val, then 10% test from the rest (sorted random choices), train the rest.
Images are converted to RGB and, when a size is asked for, resized square with bicubic as the
paper's ISIC loader does.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from medaudit.models.data.annotations import load_artifact_ids
from medaudit.models.errors import ConfigError, DatasetError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
ARTIFACTS_FILE = "artifacts.json"
MASKS_DIR = "masks"
#: How many missing/bad entries an error message lists before it only counts them.
_SHOW = 5
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class LabelTable:
    """One row per sample, as a dataset adapter read it from its CSV."""

    ids: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    #: ``"train"``/``"val"``/``"test"`` per sample, or None for the paper's seeded split.
    splits: tuple[str, ...] | None = None


# ---------------------------------------------------------------------------------------- splits


def paper_split(n: int, val: float = 0.1, test: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's split of ``n`` samples into sorted (train, val, test) indices (method.md §8).

    Mirrors ``base_dataset.do_train_val_test_split`` call for call, including drawing the test
    set from the *unsorted* set difference, so that the same ``n`` gives the paper's indices.
    """
    rng = np.random.default_rng(0)
    idxs_all = np.arange(n)
    idxs_val = np.array(sorted(rng.choice(idxs_all, size=int(np.round(n * val)), replace=False)), np.int64)
    idxs_left = np.array(list(set(idxs_all) - set(idxs_val)), np.int64)
    idxs_test = np.array(sorted(rng.choice(idxs_left, size=int(np.round(n * test)), replace=False)), np.int64)
    idxs_train = np.array(sorted(set(idxs_left) - set(idxs_test)), np.int64)
    return idxs_train, idxs_val, idxs_test


def _split_names(n: int) -> np.ndarray:
    out = np.empty(n, dtype="<U5")
    for name, idx in zip(SPLITS, paper_split(n), strict=True):
        out[idx] = name
    return out


# ------------------------------------------------------------------------------------------- CSV


def require_root(root: str | Path) -> Path:
    """``root`` as a Path, or a DatasetError when it is not a folder."""
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"dataset root {path} does not exist or is not a folder")
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and non-blank rows of a CSV, values stripped.

    Raises:
        DatasetError: The file is missing or unreadable, empty, or has a header but no rows.
    """
    if not path.is_file():
        raise DatasetError(f"labels CSV {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: CSVs saved by Excel
            table = [[v.strip() for v in row] for row in csv.reader(f) if any(v.strip() for v in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read labels CSV {path}: {e}") from e
    if not table:
        raise DatasetError(f"labels CSV {path} is empty: no header row")
    if len(table) == 1:
        raise DatasetError(f"labels CSV {path} has a header ({', '.join(table[0])}) but no rows")
    return table[0], table[1:]


def column(path: Path, header: Sequence[str], name: str) -> int:
    """Position of column ``name``; a DatasetError naming the columns that exist otherwise."""
    if name not in header:
        raise DatasetError(f"column {name!r} not in {path}; columns: {', '.join(header)}")
    return list(header).index(name)


def cell(path: Path, rows: Sequence[Sequence[str]], r: int, c: int, name: str) -> str:
    """Non-empty value of row ``r``, column ``c``; errors give the CSV line number."""
    value = rows[r][c] if c < len(rows[r]) else ""
    if not value:
        raise DatasetError(f"{path} line {r + 2}: empty value in column {name!r}")
    return value


def _sorted_names(values: set[str]) -> tuple[str, ...]:
    """Sorted label names; numerically when every name is an integer ("2" before "10")."""
    if all(v.lstrip("-").isdigit() for v in values):
        return tuple(sorted(values, key=int))
    return tuple(sorted(values))


# ---------------------------------------------------------------------------------------- images


def resolve_images(image_dir: Path, ids: Sequence[str], extensions: Sequence[str]) -> tuple[Path, ...]:
    """The file of each id: ``<id>`` if it carries an allowed extension, else ``<id><ext>``.

    The folder is listed once rather than probed per id, so large datasets resolve quickly.

    Raises:
        DatasetError: The folder is missing, or some ids have no file (up to five are listed).
    """
    if not image_dir.is_dir():
        raise DatasetError(f"image folder {image_dir} does not exist")
    with os.scandir(image_dir) as it:
        present = {e.name for e in it}
    paths: list[Path] = []
    missing: list[str] = []
    for sid in ids:
        name = _find_name(image_dir, sid, present, extensions)
        if name is None:
            missing.append(sid)
        else:
            paths.append(image_dir / name)
    if missing:
        shown = ", ".join(missing[:_SHOW])
        raise DatasetError(
            f"{len(missing)} images missing from {image_dir} (first {min(len(missing), _SHOW)}: {shown}); "
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


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """An image file as H×W×3 uint8 RGB, optionally resized to ``size``² with bicubic.

    16-bit grey images are scaled to 8 bit (PIL's own conversion would clip them at 255); 32-bit
    int/float grey images are taken as 8-bit values when none exceeds 255, else as 16-bit ones.

    Raises:
        DatasetError: The file is missing, unreadable or not a valid image.
    """
    try:
        with Image.open(path) as im:
            rgb = _to_rgb(im)
    except FileNotFoundError as e:
        raise DatasetError(f"image file {path} does not exist") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT or im.mode == "I" or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = a / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _read_mask(path: Path, size: int | None) -> np.ndarray:
    """A mask PNG as H×W bool (non-zero = artifact), resized with nearest so it stays binary."""
    try:
        with Image.open(path) as im:
            grey = _to_rgb(im).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read mask {path}: {e}") from e
    if size is not None and grey.size != (size, size):
        grey = grey.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(grey) > 0


# ------------------------------------------------------------------------------------- datasets


class ImageDataset:
    """Labelled images on disk: the behaviour :class:`FolderDataset` and ``ISIC2019`` share.

    Satisfies :class:`~medaudit.models.data.protocol.AnnotatedDataset`.

    Attributes:
        root: The dataset folder.
        labels: Class index per sample (int64).
        label_names: Class names; ``labels`` index into them.
        paths: Image file per sample.
        split_of: ``"train"``/``"val"``/``"test"`` per sample.
    """

    def __init__(
        self,
        root: Path,
        table: LabelTable,
        image_dir: Path,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        artifacts_file: str | Path | None = None,
    ) -> None:
        self.root = root
        self._ids = table.ids
        self.labels = np.asarray(table.labels, dtype=np.int64)
        self.label_names = table.label_names
        self.paths = resolve_images(image_dir, table.ids, extensions)
        n = len(table.ids)
        self.split_of = np.asarray(table.splits) if table.splits is not None else _split_names(n)
        self._stems = tuple(_stem(sid, extensions) for sid in table.ids)
        self._artifacts = self._load_annotations(artifacts_file)

    def _load_annotations(self, artifacts_file: str | Path | None) -> dict[str, list[int]]:
        """Explicit file (must exist), else ``root/artifacts.json`` when present, else none."""
        if artifacts_file is None:
            default = self.root / ARTIFACTS_FILE
            if not default.is_file():
                return {}
            artifacts_file = default
        return load_artifact_ids(artifacts_file, self._ids, self._stems)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> tuple[str, ...]:
        """Sample ids as written in the CSV, in dataset order."""
        return self._ids

    def indices(self, split: str = "all") -> np.ndarray:
        """Sorted sample indices of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"all"``)."""
        if split == "all":
            return np.arange(len(self))
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, all")
        return np.flatnonzero(self.split_of == split)

    def class_weights(self, split: str = "all") -> np.ndarray:
        """``max_j n_j / n_k`` per class (method.md §8); 0 for a class with no samples."""
        counts = np.bincount(self.labels[self.indices(split)], minlength=len(self.label_names))
        safe = np.where(counts > 0, counts, 1)
        return np.where(counts > 0, counts.max() / safe, 0.0)

    def load_image(self, i: int, size: int | None = None) -> np.ndarray:
        """Image ``i`` as H×W×3 uint8 RGB, resized to ``size``² (bicubic) when given."""
        return read_rgb(self.paths[i], size)

    @property
    def has_masks(self) -> bool:
        """Whether ``root/masks/`` exists, so :meth:`mask` can answer."""
        return (self.root / MASKS_DIR).is_dir()

    def config(self) -> dict[str, Any] | None:
        """None: the data is read from disk, there is no generator config to record."""
        return None

    def artifact_ids(self, split: str = "all") -> dict[str, list[int]]:
        """``{artifact: [indices]}`` from the annotation file, restricted to ``split``."""
        keep = set(self.indices(split).tolist())
        return {a: [i for i in idx if i in keep] for a, idx in self._artifacts.items()}

    def mask(self, i: int, artifact: str, size: int | None = None) -> np.ndarray:
        """H×W bool mask of ``artifact`` in image ``i`` from ``masks/<id>_<artifact>.png``.

        All False when the sample is not annotated with the artifact and has no mask file
        (method.md §5.4: the mask is zeros where there is no artifact).

        Raises:
            DatasetError: No masks folder, an artifact neither annotated nor on disk, or an
                annotated sample whose mask file is missing or unreadable.
        """
        masks = self.root / MASKS_DIR
        if not masks.is_dir():
            raise DatasetError(f"no mask folder {masks}")
        path = masks / f"{self._stems[i]}_{artifact}.png"
        if path.is_file():
            return _read_mask(path, size)
        if artifact in self._artifacts and i in self._artifacts[artifact]:
            raise DatasetError(
                f"sample {self._ids[i]!r} is annotated with {artifact!r} but {path} is missing"
            )
        if artifact not in self._artifacts:
            known = ", ".join(self._artifacts) or "none"
            raise DatasetError(
                f"no mask {path} and {artifact!r} is not an annotated artifact; annotated: {known}"
            )
        return np.zeros(self._image_size(i, size), dtype=bool)

    def _image_size(self, i: int, size: int | None) -> tuple[int, int]:
        if size is not None:
            return size, size
        try:
            with Image.open(self.paths[i]) as im:
                w, h = im.size
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {self.paths[i]}: {e}") from e
        return h, w

    def as_torch(self, split: str = "all", size: int | None = None) -> TorchImages:
        """A ``torch.utils.data.Dataset`` of ``(uint8 3×H×W tensor, label)`` over ``split``."""
        return TorchImages(self, self.indices(split), size)


class FolderDataset(ImageDataset):
    """A "folder + labels CSV" dataset; reads ``SynthDerm.export`` output back.

    Args:
        root: Dataset folder.
        csv: Labels CSV, relative to ``root``.
        image_col: Column with the image id, with or without extension.
        label_col: Column with the class name.
        split_col: Column of ``train``/``val``/``test``. The default ``"split"`` is used when the
            CSV has it and the paper's seeded split otherwise; any other name must exist. None
            ignores the column and always uses the seeded split.
        image_dir: Image folder relative to ``root``; None for ``root`` itself.
        extensions: Extensions tried when an id has none.
        labels: Class names in index order; default sorted unique values of ``label_col``
            (numerically when all are integers).
        artifacts_file: Annotation JSON; default ``root/artifacts.json`` when present.

    Raises:
        DatasetError: Missing root/CSV/images, unknown columns, an empty CSV, an empty cell, a
            label outside ``labels``, an unknown split value or a duplicated id.
    """

    def __init__(
        self,
        root: str | Path,
        csv: str = "labels.csv",
        image_col: str = "image",
        label_col: str = "label",
        split_col: str | None = "split",
        image_dir: str | None = "images",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        labels: Sequence[str] | None = None,
        artifacts_file: str | Path | None = None,
    ) -> None:
        path = require_root(root)
        table = _read_folder_table(path / csv, image_col, label_col, split_col, labels)
        folder = path / image_dir if image_dir is not None else path
        super().__init__(path, table, folder, extensions, artifacts_file)


def _read_folder_table(
    path: Path, image_col: str, label_col: str, split_col: str | None, labels: Sequence[str] | None
) -> LabelTable:
    header, rows = read_csv(path)
    ci, cl = column(path, header, image_col), column(path, header, label_col)
    ids = tuple(cell(path, rows, r, ci, image_col) for r in range(len(rows)))
    _check_unique(path, ids)
    raw = [cell(path, rows, r, cl, label_col) for r in range(len(rows))]
    names = tuple(labels) if labels is not None else _sorted_names(set(raw))
    index = {name: k for k, name in enumerate(names)}
    for r, value in enumerate(raw):
        if value not in index:
            raise DatasetError(f"{path} line {r + 2}: label {value!r} not in labels ({', '.join(names)})")
    splits = _read_splits(path, header, rows, split_col)
    return LabelTable(ids, tuple(index[v] for v in raw), names, splits)


def _read_splits(
    path: Path, header: Sequence[str], rows: Sequence[Sequence[str]], split_col: str | None
) -> tuple[str, ...] | None:
    if split_col is None or (split_col == "split" and split_col not in header):
        return None
    cs = column(path, header, split_col)
    splits = tuple(cell(path, rows, r, cs, split_col) for r in range(len(rows)))
    for r, value in enumerate(splits):
        if value not in SPLITS:
            raise DatasetError(f"{path} line {r + 2}: split {value!r} not one of {', '.join(SPLITS)}")
    return splits


def _check_unique(path: Path, ids: Sequence[str]) -> None:
    seen: set[str] = set()
    dupes: list[str] = []
    for sid in ids:
        if sid in seen:
            dupes.append(sid)
        seen.add(sid)
    if dupes:
        raise DatasetError(f"{path}: {len(dupes)} duplicated image ids (first: {', '.join(dupes[:_SHOW])})")


def _stem(sid: str, extensions: Sequence[str]) -> str:
    suffix = Path(sid).suffix
    return sid[: -len(suffix)] if suffix and suffix.lower() in {e.lower() for e in extensions} else sid


class TorchImages(Dataset):
    """``(uint8 3×H×W tensor, int label)`` pairs over a subset of an :class:`ImageDataset`."""

    def __init__(self, data: ImageDataset, indices: np.ndarray, size: int | None = None) -> None:
        self.data, self.index, self.size = data, indices, size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = int(self.index[j])
        x = torch.from_numpy(self.data.load_image(i, self.size)).permute(2, 0, 1).contiguous()
        return x, int(self.data.labels[i])
