"""ISIC2019 dermoscopy (method.md §8): one-hot ground-truth CSV plus a folder of JPEGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medaudit.models.data.folder import ImageDataset, LabelTable, cell, column, read_csv, require_root
from medaudit.models.errors import DatasetError

#: The ground-truth CSV's one-hot columns, in the paper's class order (UNK is empty).
ISIC_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
#: Image folders tried in order: the paper's name, then the official zip's.
IMAGE_DIRS = ("Train", "ISIC_2019_Training_Input")
#: ``classes`` option -> label names. "mel_vs_rest" is melanoma against every other class;
#: "rest" is not "benign": it holds BCC and SCC, which are malignant.
CLASS_SETS: dict[str, tuple[str, ...]] = {"all": ISIC_CLASSES, "mel_vs_rest": ("rest", "MEL")}


class ISIC2019(ImageDataset):
    """The ISIC 2019 training set with the paper's seeded 80/10/10 split.

    Expects ``<root>/ISIC_2019_Training_GroundTruth.csv`` (column ``image`` plus one-hot columns
    MEL … UNK) and images at ``<root>/Train/<image>.jpg``. When ``Train/`` is missing, the folder
    the official zip extracts to, ``<root>/ISIC_2019_Training_Input/``, is used instead, so the
    paper's rename/link step is not needed. Ids are the CSV's image names (some end in
    ``_downsampled``).

    Args:
        root: The dataset folder.
        classes: ``"all"`` for the nine classes, or ``"mel_vs_rest"`` for (rest, MEL).
        artifacts_file: Annotation JSON ``{artifact: [image names]}``, e.g. the paper's
            ``data/artifacts_isic.json``; default ``<root>/artifacts.json`` when present.

    Raises:
        DatasetError: Missing root, CSV, image folder or images; missing class columns; a row
            whose one-hot values are not 0/1 or do not hold exactly one 1 (named by image).
    """

    def __init__(
        self, root: str | Path, classes: str = "all", artifacts_file: str | Path | None = None
    ) -> None:
        if classes not in CLASS_SETS:
            raise DatasetError(f"unknown ISIC2019 classes {classes!r}; valid: {', '.join(CLASS_SETS)}")
        path = require_root(root)
        table = _read_ground_truth(path / GROUND_TRUTH, classes)
        super().__init__(path, table, _image_dir(path), (".jpg",), artifacts_file)


def _image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"no ISIC2019 image folder in {root}; expected one of: {', '.join(IMAGE_DIRS)}")


def _read_ground_truth(path: Path, classes: str) -> LabelTable:
    header, rows = read_csv(path)
    ci = column(path, header, "image")
    cols = [column(path, header, name) for name in ISIC_CLASSES]
    ids = tuple(cell(path, rows, r, ci, "image") for r in range(len(rows)))
    labels = tuple(_class_of(path, rows[r], cols, ids[r]) for r in range(len(rows)))
    if classes == "mel_vs_rest":
        labels = tuple(int(k == ISIC_CLASSES.index("MEL")) for k in labels)
    return LabelTable(ids, labels, CLASS_SETS[classes])


def _class_of(path: Path, row: Sequence[str], cols: Sequence[int], image: str) -> int:
    """The class index of a one-hot row (its argmax), checked to hold exactly one 1."""
    values = [_one_hot_value(path, row, c, name, image) for c, name in zip(cols, ISIC_CLASSES, strict=True)]
    hot = [k for k, v in enumerate(values) if v == 1.0]
    if len(hot) != 1:
        names = ", ".join(ISIC_CLASSES[k] for k in hot) or "none"
        raise DatasetError(f"{path}: image {image!r} must have exactly one class set to 1, has {names}")
    return hot[0]


def _one_hot_value(path: Path, row: Sequence[str], c: int, name: str, image: str) -> float:
    raw = row[c] if c < len(row) else ""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        raise DatasetError(f"{path}: image {image!r} has {name}={raw!r}; one-hot values must be 0 or 1")
    return value
