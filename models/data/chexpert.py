"""CheXpert chest X-rays as published (method.md §8): ``train.csv``/``valid.csv`` and patient folders.

Layout::

    root/train.csv, root/valid.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,<finding columns...>
    root/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg

``Path`` is resolved against ``root`` as written, or without its first component (the
authors' loader strips it, so ``root`` may be the ``CheXpert-v1.0-small`` folder itself). Finding
columns hold 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned).

A **binary task** is one finding column (``task=Cardiomegaly``): 1 is the positive class, 0 and
blank the negative (``blank=ignore`` leaves blank rows out instead). Uncertain labels need an
**explicit policy** as soon as the task column has any: ``uncertain=zeros`` (U-Zeros, the
authors' choice), ``ones`` (U-Ones) or ``ignore`` (those images are left out); without one the
adapter refuses and says how many rows are uncertain. The **patient** (``patientNNNNN`` in the
path) is the group: splits never put one patient in two splits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medaudit.models.data.files import cell, column, line, read_csv, require_root
from medaudit.models.data.folder import ImageDataset, LabelTable
from medaudit.models.data.splits import group_split
from medaudit.models.errors import DatasetError

CSV_FILES = ("train.csv", "valid.csv")
#: Columns that describe the image; every other column is a finding.
META_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
#: The 14 findings of CheXpert v1.0, for the error that lists what a task may be.
FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)  # fmt: skip
#: Uncertain-label policies: U-Zeros, U-Ones, U-Ignore.
UNCERTAIN = {"zeros": 0, "ones": 1, "ignore": None}
BLANK = {"zeros": 0, "ignore": None}
VIEWS = ("frontal", "lateral", "all")
SPLIT_MODES = ("patient", "official")
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}
_PATIENT = re.compile(r"(?:^|/)(patient\d+)(?:/|$)")


class CheXpert(ImageDataset):
    """CheXpert as a binary task on one finding column, split by patient.

    Args:
        root: The dataset folder (holding ``train.csv``; ``valid.csv`` is read when present).
        task: The finding column whose 1 is the positive class.
        uncertain: Policy for -1 in the task column: ``"zeros"``, ``"ones"`` or ``"ignore"``;
            required when the column has any -1.
        blank: ``"zeros"`` (not mentioned = negative, the default) or ``"ignore"``.
        views: ``"frontal"`` (the default, as the authors), ``"lateral"`` or ``"all"``.
        split: ``"patient"``: a seeded patient-level split over both files (10 % val, 10 % test);
            ``"official"``: ``valid.csv`` is the test split, ``train.csv`` is split by patient
            into train and val.
        labels: Names of the (negative, positive) classes; default ``("not <task>", "<task>")``.
        annotations: Annotation file; default ``root/artifacts.{csv,json}``.
        **options: ``artifacts``, ``masks``, ``splits``, ``seed`` of
            :class:`~medaudit.models.data.folder.ImageDataset`.

    Raises:
        DatasetError: A missing CSV, column or image; the two CSVs with different columns; a
            finding value other than 1/0/-1/blank; uncertain labels without a policy; a path
            without ``patientNNNNN``; a duplicated path; an empty class; each naming file and line.
    """

    def __init__(
        self,
        root: str | Path,
        task: str,
        uncertain: str | None = None,
        *,
        blank: str = "zeros",
        views: str = "frontal",
        split: str = "patient",
        labels: Sequence[str] | None = None,
        annotations: str | Path | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        for name, value, valid in (
            ("uncertain", uncertain, (*UNCERTAIN, None)),
            ("blank", blank, tuple(BLANK)),
            ("views", views, VIEWS),
            ("split", split, SPLIT_MODES),
        ):
            if value not in valid:
                choices = ", ".join(v for v in valid if v is not None)
                raise DatasetError(f"CheXpert {name}={value!r}; valid: {choices}")
        path = require_root(root)
        names = tuple(labels) if labels is not None else (f"not {task}", task)
        if len(names) != 2:
            raise DatasetError(f"CheXpert labels={list(names)}: a binary task has two class names")
        rows, left = _read_rows(path, task, uncertain, blank, views)
        table = _table(path, rows, names, left)
        if split == "official":
            official = _official_split(table, rows, seed)
            table = replace(table, splits=official, split_source="the official split (valid.csv = test)")
        super().__init__(path, table, path, (".jpg", ".jpeg", ".png"), annotations, seed=seed, **options)


def _read_rows(
    path: Path, task: str, uncertain: str | None, blank: str, views: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Kept rows as ``{file, where, id, label, csv}``, from ``train.csv`` then ``valid.csv``, and
    the paths (and keys) of the rows left out by the view and label filters."""
    out: list[dict[str, Any]] = []
    left: list[str] = []
    first_header: list[str] | None = None
    strip: bool | None = None
    for name in CSV_FILES:
        csv_path = path / name
        if name == "valid.csv" and not csv_path.is_file():
            continue
        header, rows = read_csv(csv_path, "CheXpert CSV")
        if first_header is not None and header != first_header:
            raise DatasetError(f"{csv_path} has other columns than train.csv: {', '.join(header)}")
        first_header = header
        cp = column(csv_path, header, "Path")
        if task in META_COLUMNS or task not in header:
            findings = [h for h in header if h not in META_COLUMNS]
            raise DatasetError(
                f"task {task!r} is not a finding column of {csv_path}; its findings: {', '.join(findings)}"
            )
        ct = header.index(task)
        cv = column(csv_path, header, "Frontal/Lateral") if views != "all" else -1
        _check_findings(csv_path, header, rows)
        uncertain_rows = [r for r, row in enumerate(rows) if _value(row, ct) == -1]
        if uncertain_rows and uncertain is None:
            raise DatasetError(
                f"{line(csv_path, uncertain_rows[0])}: {task} is -1 (uncertain) there and in "
                f"{len(uncertain_rows) - 1} more rows; choose how to read them: uncertain=zeros (U-Zeros), "
                "uncertain=ones (U-Ones) or uncertain=ignore (leave those images out)"
            )
        for r, row in enumerate(rows):
            where = line(csv_path, r)
            p = cell(csv_path, rows, r, cp, "Path")
            v = _value(row, ct)
            label = UNCERTAIN[str(uncertain)] if v == -1 else (BLANK[blank] if v is None else v)
            if label is None or (cv >= 0 and cell(csv_path, rows, r, cv, "Frontal/Lateral").lower() != views):
                left.extend((p, _key(p)))
                continue
            if strip is None:  # decided once, on the first kept row
                strip = not (path / p).is_file() and "/" in p and (path / p.split("/", 1)[1]).is_file()
            out.append(
                {
                    "id": p,
                    "file": p.split("/", 1)[1] if strip else p,
                    "where": where,
                    "label": label,
                    "csv": name,
                }
            )
    return out, left


def _check_findings(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Every finding column holds 1/0/-1/blank; anything else is a column this layout has not."""
    for c, name in enumerate(header):
        if name in META_COLUMNS:
            continue
        for r, row in enumerate(rows):
            raw = row[c] if c < len(row) else ""
            if raw not in _VALUES:
                raise DatasetError(
                    f"{line(path, r)}: column {name!r} has {raw!r}; CheXpert finding columns hold 1, 0, -1 "
                    f"or blank, and the other columns are {', '.join(META_COLUMNS)}: remove or rename "
                    "the column"
                )


def _value(row: Sequence[str], c: int) -> int | None:
    return _VALUES[row[c] if c < len(row) else ""]


def _table(path: Path, rows: list[dict[str, Any]], names: tuple[str, ...], left: list[str]) -> LabelTable:
    if not rows:
        raise DatasetError(f"{path}: no image left after the view and label filters")
    seen: dict[str, str] = {}
    groups, keys = [], []
    for row in rows:
        if row["id"] in seen:
            raise DatasetError(
                f"{row['where']}: path {row['id']!r} is listed again (first at {seen[row['id']]})"
            )
        seen[row["id"]] = row["where"]
        m = _PATIENT.search(row["id"])
        if m is None:
            raise DatasetError(
                f"{row['where']}: no patient in path {row['id']!r}; CheXpert paths hold a folder patientNNNNN"
            )
        groups.append(m.group(1))
        keys.append(_key(row["file"]))
    return LabelTable(
        tuple(r["id"] for r in rows),
        tuple(int(r["label"]) for r in rows),
        names,
        groups=tuple(groups),
        origins=tuple(r["where"] for r in rows),
        keys=tuple(keys),
        files=tuple(r["file"] for r in rows),
        group_kind="patient",
        source=str(path / CSV_FILES[0]),
        left_out=tuple(left),
    )


def _key(path: str) -> str:
    """``patientX_studyY_viewZ_frontal``: the authors' key of a CheXpert image (mask file names)."""
    return "_".join(Path(path).with_suffix("").parts[-3:])


def _official_split(table: LabelTable, rows: list[dict[str, Any]], seed: int) -> tuple[str, ...]:
    """valid.csv is test; train.csv is split by patient into train and val."""
    from_valid = np.array([r["csv"] == "valid.csv" for r in rows])
    if not from_valid.any():
        raise DatasetError("split=official needs valid.csv beside train.csv (it is the test split)")
    out = np.full(len(rows), "test", dtype="<U5")
    train_idx = np.flatnonzero(~from_valid)
    assert table.groups is not None
    out[train_idx] = group_split(
        np.asarray(table.labels)[train_idx], [table.groups[i] for i in train_idx], seed, val=0.1, test=0.0
    )
    return tuple(out.tolist())
