"""A scan's SOURCE as an ordered list of :class:`Item`: a folder tree, an adapter spec or a list file.

* A **folder** is walked recursively; every file whose extension is an image's or DICOM's (or a
  file with no extension, as PACS exports write DICOM) is an item, hidden files and folders are
  skipped. Its ``folder`` is the parent folder relative to the root (the site or series).
* An **adapter spec** ``KIND:PATH?OPTIONS`` (``folder:``, ``isic2019:``, ``chexpert:``,
  ``classfolders:``; docs/data.md) gives the dataset's images in dataset order, each with its
  true ``label`` and ``group``.
* A **list file** (``.txt``/``.lst``/``.csv``: one path a line, ``#`` comments; a CSV's first
  column, header ``path``) names files; relative paths are taken from the list file's folder.

Items are sorted (folders) or kept in the source's order (adapters, lists), so that the same
source gives the same list; :mod:`.output` stores the list at the scan's start, and a resumed
scan reads it back instead of listing again.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from medaudit.models.errors import MedauditError

#: Extensions of the files a folder scan takes (lower case); files without one are taken too.
SCAN_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".dcm", ".dicom")
LIST_SUFFIXES = (".txt", ".lst", ".csv")


class ScanSourceError(MedauditError):
    """A SOURCE that names nothing scannable (missing, empty, unknown kind)."""


@dataclass(frozen=True)
class Item:
    """One image of the source.

    Attributes:
        id: Stable name: the path relative to the root (folders, lists) or the dataset's id.
        path: The file (absolute).
        folder: Parent folder relative to the root: the site / series the report groups by.
        label: True class name when the source knows it (adapters), else ``None``.
        group: Patient / lesion group when the source knows it (adapters), else ``None``.
    """

    id: str
    path: str
    folder: str
    label: str | None = None
    group: str | None = None


def _wanted(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (suffix in SCAN_EXTENSIONS or suffix == "")


def list_folder(root: Path) -> list[Item]:
    """Every image or DICOM file under ``root``, sorted by relative path."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if _wanted(name):
                p = Path(dirpath) / name
                rel = p.relative_to(root)
                parent = rel.parent.as_posix()
                items.append(Item(rel.as_posix(), str(p.resolve()), "." if parent == "" else parent))
    items.sort(key=lambda it: it.id)
    return items


def list_file(path: Path) -> list[Item]:
    """The files a list file names, in its order (duplicates refused: each image once)."""
    base = path.parent
    rows: list[str] = []
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(f)
            for k, row in enumerate(reader):
                if not row or (k == 0 and row[0].strip().lower() == "path"):
                    continue
                rows.append(row[0].strip())
        else:
            rows = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    items, seen = [], set()
    for r in rows:
        if r in seen:
            raise ScanSourceError(f"{path} names {r!r} twice; a scan takes each image once")
        seen.add(r)
        p = Path(r) if Path(r).is_absolute() else base / r
        parent = Path(r).parent.as_posix()
        items.append(Item(r, str(p.resolve()), "." if parent == "" else parent))
    return items


def list_adapter(spec: str) -> list[Item]:
    """The images of a dataset adapter (``KIND:PATH?OPTIONS``), in dataset order."""
    from medaudit.models.data.folder import ImageDataset
    from medaudit.models.data.registry import open_dataset

    ds = open_dataset(spec)
    if not isinstance(ds, ImageDataset):
        raise ScanSourceError(
            f"{spec!r} renders its images in memory; a scan reads files: export it first "
            "(medaudit data export) and scan the folder"
        )
    root = Path(ds.root).resolve()
    out = []
    for i, (sid, p) in enumerate(zip(ds.ids, ds.paths, strict=True)):
        path = Path(p).resolve()
        try:
            parent = path.parent.relative_to(root).as_posix()
        except ValueError:  # an image outside the root: group it by its own folder
            parent = path.parent.as_posix()
        out.append(
            Item(
                str(sid),
                str(path),
                parent or ".",
                str(ds.label_names[int(ds.labels[i])]),
                str(ds.groups[i]),
            )
        )
    return out


def list_source(source: str) -> list[Item]:
    """The items of ``source`` (see the module docstring).

    Raises:
        ScanSourceError: Nothing there, no images in it, or an adapter kind that is not one.
    """
    from medaudit.models.data.registry import SCHEMES, parse_spec

    p = Path(source)
    if p.is_dir():
        items = list_folder(p.resolve())
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        items = list_file(p.resolve())
    elif (":" in source or source.partition("?")[0] == "synthderm") and not p.exists():
        kind = parse_spec(source)[0]
        if kind == "synthderm":
            raise ScanSourceError(
                "synthderm renders its images in memory; a scan reads files: export it first "
                "(medaudit data export) and scan the folder"
            )
        items = list_adapter(source)
    else:
        raise ScanSourceError(
            f"SOURCE {source!r} is neither a folder, a list file ({', '.join(LIST_SUFFIXES)}) nor a "
            f"dataset spec ({', '.join(SCHEMES)})"
        )
    if not items:
        raise ScanSourceError(f"SOURCE {source!r} holds no image files ({', '.join(SCAN_EXTENSIONS)})")
    return items
