"""ISIC 2019 dermoscopy as published (method.md §8): ground-truth CSV, metadata CSV, JPEGs.

Layout::

    root/ISIC_2019_Training_GroundTruth.csv   image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK (one-hot)
    root/ISIC_2019_Training_Metadata.csv      image,age_approx,anatom_site_general,lesion_id,sex
    root/ISIC_2019_Training_Input/<image>.jpg (or root/Train/, the paper's name)

The metadata's ``lesion_id`` groups the several photographs of one lesion: with it, the split
is lesion-aware (no lesion in two splits, :func:`~medaudit.models.data.splits.group_split`); an
image with an empty ``lesion_id`` is its own group. Without the metadata file (or with
``metadata=False``) the paper's seeded split is used, as the authors do, although it can put two
photographs of one lesion in train and test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medaudit.models.data.files import (
    cell,
    check_unique,
    column,
    line,
    read_csv,
    refuse_extra_columns,
    require_root,
)
from medaudit.models.data.folder import ImageDataset, LabelTable
from medaudit.models.errors import DatasetError

#: The ground-truth CSV's one-hot columns, in the paper's class order (UNK is empty).
ISIC_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
#: The metadata CSV's columns as published; ``image`` and ``lesion_id`` are the ones read.
METADATA_COLUMNS = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
#: Image folders tried in order: the paper's name, then the official zip's.
IMAGE_DIRS = ("Train", "ISIC_2019_Training_Input")
#: ``classes`` presets -> label names. "mel_vs_rest" is melanoma against every other class;
#: "rest" is not "benign": it holds BCC and SCC, which are malignant.
CLASS_SETS: dict[str, tuple[str, ...]] = {"all": ISIC_CLASSES, "mel_vs_rest": ("rest", "MEL")}


class ISIC2019(ImageDataset):
    """The ISIC 2019 training set.

    Args:
        root: The dataset folder.
        classes: ``"all"`` (the nine classes), ``"mel_vs_rest"`` (rest, MEL), or a subset in the
            order wanted, ``"NV,MEL,BCC"`` or a sequence: images of other classes are left out.
        artifacts_file: Annotation file (CSV or JSON, :mod:`~medaudit.models.data.annotations`),
            e.g. the paper's ``data/artifacts_isic.json``; default ``root/artifacts.{csv,json}``.
        metadata: Read ``ISIC_2019_Training_Metadata.csv`` for lesion groups when it exists
            (True), or ignore it (False: the paper's split).
        **options: ``artifacts``, ``masks``, ``splits``, ``seed`` of
            :class:`~medaudit.models.data.folder.ImageDataset`.

    Raises:
        DatasetError: Missing root, CSV, image folder or images; missing or unexpected columns; a
            row whose one-hot values are not 0/1 or do not hold exactly one 1; an unknown class in
            ``classes``; an empty class; a metadata row of an image the ground truth lacks, or a
            ground-truth image without a metadata row; each naming the file and line.
    """

    def __init__(
        self,
        root: str | Path,
        classes: str | Sequence[str] = "all",
        artifacts_file: str | Path | None = None,
        *,
        metadata: bool = True,
        **options: Any,
    ) -> None:
        names = _class_names(classes)
        path = require_root(root)
        table, listed = _read_ground_truth(path / GROUND_TRUTH, classes, names)
        if metadata and (path / METADATA).is_file():
            table = _with_lesions(table, path / METADATA, listed)
        super().__init__(path, table, _image_dir(path), (".jpg", ".jpeg", ".png"), artifacts_file, **options)


def _class_names(classes: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str) and classes in CLASS_SETS:
        return CLASS_SETS[classes]
    names = tuple(
        c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()
    )
    bad = [c for c in names if c not in ISIC_CLASSES]
    if bad or len(names) < 2 or len(set(names)) != len(names):
        what = f"unknown class {bad[0]!r}" if bad else "give at least two distinct classes"
        raise DatasetError(
            f"unknown ISIC2019 classes {classes!r}; valid: {', '.join(CLASS_SETS)}, or a subset of "
            f"{','.join(ISIC_CLASSES)} such as NV,MEL,BCC ({what})"
        )
    return names


def _image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"no ISIC2019 image folder in {root}; expected one of: {', '.join(IMAGE_DIRS)}")


def _read_ground_truth(
    path: Path, classes: str | Sequence[str], names: tuple[str, ...]
) -> tuple[LabelTable, set[str]]:
    """The rows of the classes asked for, and every image the CSV lists."""
    header, rows = read_csv(path, "ground-truth CSV")
    ci = column(path, header, "image")
    cols = [column(path, header, name) for name in ISIC_CLASSES]
    refuse_extra_columns(path, header, ("image", *ISIC_CLASSES), " (the published one-hot file)")
    ids, labels, where, left_out = [], [], [], []
    listed = set()
    for r in range(len(rows)):
        image = cell(path, rows, r, ci, "image")
        listed.add(image)
        k = _class_of(path, r, rows[r], cols, image)
        if classes == "mel_vs_rest":
            k = int(k == ISIC_CLASSES.index("MEL"))
        elif classes != "all":
            if ISIC_CLASSES[k] not in names:
                left_out.append(image)  # a class outside the subset
                continue
            k = names.index(ISIC_CLASSES[k])
        ids.append(image)
        labels.append(k)
        where.append(line(path, r))
    if not ids:
        raise DatasetError(f"{path}: no image of the classes {', '.join(names)}")
    check_unique(path, ids, where)
    allow = ("UNK",) if classes == "all" else ()
    table = LabelTable(
        tuple(ids),
        tuple(labels),
        names,
        origins=tuple(where),
        allow_empty=allow,
        source=str(path),
        left_out=tuple(left_out),
    )
    return table, listed


def _with_lesions(table: LabelTable, path: Path, listed: set[str]) -> LabelTable:
    """``table`` with its lesion groups from the metadata CSV."""
    header, rows = read_csv(path, "metadata CSV")
    ci, cl = column(path, header, "image"), column(path, header, "lesion_id")
    refuse_extra_columns(path, header, METADATA_COLUMNS, " (the published metadata file)")
    lesion: dict[str, str] = {}
    for r, row in enumerate(rows):
        image = cell(path, rows, r, ci, "image")
        if image in lesion:
            raise DatasetError(f"{line(path, r)}: image {image!r} is listed again")
        lesion[image] = row[cl] if cl < len(row) else ""
    for r, row in enumerate(rows):
        if row[ci] not in listed:
            raise DatasetError(f"{line(path, r)}: image {row[ci]!r} is not in the ground-truth CSV")
    missing = [(sid, w) for sid, w in zip(table.ids, table.origins, strict=True) if sid not in lesion]
    if missing:
        sid, w = missing[0]
        raise DatasetError(
            f"{w}: image {sid!r} has no row in {path} ({len(missing)} images lack one); "
            "give every image a row (lesion_id may be empty) or pass metadata=false"
        )
    groups = tuple(lesion[sid] or sid for sid in table.ids)
    return replace(table, groups=groups, group_kind="lesion")


def _class_of(path: Path, r: int, row: Sequence[str], cols: Sequence[int], image: str) -> int:
    """The class index of a one-hot row, checked to hold exactly one 1."""
    values = [
        _one_hot_value(path, r, row, c, name, image) for c, name in zip(cols, ISIC_CLASSES, strict=True)
    ]
    hot = [k for k, v in enumerate(values) if v == 1.0]
    if len(hot) != 1:
        names = ", ".join(ISIC_CLASSES[k] for k in hot) or "none"
        raise DatasetError(
            f"{line(path, r)}: image {image!r} must have exactly one class set to 1, has {names}"
        )
    return hot[0]


def _one_hot_value(path: Path, r: int, row: Sequence[str], c: int, name: str, image: str) -> float:
    raw = row[c] if c < len(row) else ""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value not in (0.0, 1.0):
        raise DatasetError(
            f"{line(path, r)}: image {image!r} has {name}={raw!r}; one-hot values must be 0 or 1"
        )
    return value
