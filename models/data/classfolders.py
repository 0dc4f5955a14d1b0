"""Class folders, the HyperKvasir layout (method.md §8): the folder an image lies in is its class.

Layout::

    root/<class>/<image>.jpg
    root/<organ>/<category>/<class>/<image>.jpg     nested category folders (HyperKvasir)
    root/artifacts.csv, root/masks/<artifact>/...   optional, as for every layout

``level="leaf"`` (the default) takes the folder holding the image as its class (HyperKvasir's
``polyps``, ``cecum``...); ``level=N`` the N-th folder below ``root`` (``level=1``: the top
folders, with every image below one in that class). ``masks/`` and hidden folders are not
classes. Class names are sorted; ``classes=a,b`` keeps those classes, in that order. There are
no patients in this layout: ``groups=<csv>`` (``image,group``) gives them where they are known.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medaudit.models.data.files import (
    IMAGE_EXTENSIONS,
    cell,
    column,
    line,
    read_csv,
    refuse_extra_columns,
    require_root,
    sorted_names,
)
from medaudit.models.data.folder import ImageDataset, LabelTable
from medaudit.models.data.masks import MASKS_DIR
from medaudit.models.errors import DatasetError


class ClassFolders(ImageDataset):
    """Images sorted into one folder per class.

    Args:
        root: The dataset folder.
        level: ``"leaf"`` or the depth (1 = the top folders) of the folder that names the class.
        classes: Classes to keep, in label order (comma-separated or a sequence); default all,
            sorted.
        groups: CSV ``image,group`` (patient, video) for a group-aware split; every image once.
        annotations: Annotation file; default ``root/artifacts.{csv,json}``.
        **options: ``artifacts``, ``masks``, ``splits``, ``seed`` of
            :class:`~medaudit.models.data.folder.ImageDataset`.

    Raises:
        DatasetError: No images, an image outside any class folder, one leaf name in two places,
            an unknown or empty class, or a bad groups file.
    """

    def __init__(
        self,
        root: str | Path,
        level: str | int = "leaf",
        classes: str | Sequence[str] | None = None,
        groups: str | Path | None = None,
        annotations: str | Path | None = None,
        **options: Any,
    ) -> None:
        path = require_root(root)
        depth = _level(level)
        files = _list_images(path, depth)
        table = _table(path, files, depth, classes)
        if groups is not None:
            table = _with_groups(table, Path(groups))
        super().__init__(path, table, path, IMAGE_EXTENSIONS, annotations, **options)


def _level(level: str | int) -> int | None:
    if level == "leaf":
        return None
    try:
        depth = int(level)
    except (TypeError, ValueError):
        depth = 0
    if depth < 1:
        raise DatasetError(f"class folder level={level!r}; valid: leaf, or 1, 2, ... (the folder depth)")
    return depth


def _list_images(root: Path, depth: int | None) -> list[str]:
    """Relative posix paths of every image below ``root`` (sorted), masks/ and hidden folders aside."""
    exts = {e.lower() for e in IMAGE_EXTENSIONS}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not (rel == Path(".") and d == MASKS_DIR)
        )
        for name in sorted(filenames):
            if Path(name).suffix.lower() in exts:
                p = (rel / name).as_posix()
                if len(Path(p).parts) < 2 or (depth is not None and len(Path(p).parts) <= depth):
                    raise DatasetError(
                        f"image {root / p} is not inside a class folder (level={depth or 'leaf'}): "
                        "move it into one, or set level"
                    )
                out.append(p)
    if not out:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {root}")
    return out


def _table(
    root: Path, files: list[str], depth: int | None, classes: str | Sequence[str] | None
) -> LabelTable:
    where: dict[str, str] = {}
    cls_of = []
    for p in files:
        parts = Path(p).parts
        name = parts[-2] if depth is None else parts[depth - 1]
        folder = "/".join(parts[:-1] if depth is None else parts[:depth])
        if where.setdefault(name, folder) != folder:
            raise DatasetError(
                f"class {name!r} is the folder {root / where[name]} and {root / folder}: leaf names must be "
                "unique; set level=N to take the class from the N-th folder instead"
            )
        cls_of.append(name)
    found = sorted_names(set(cls_of))
    if classes is None:
        names = found
    else:
        names = tuple(
            c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()
        )
        unknown = [c for c in names if c not in found]
        if unknown:
            raise DatasetError(
                f"class {unknown[0]!r} has no images: no class folder of that name under {root}; "
                f"class folders: {', '.join(found)}"
            )
    keep = [k for k, c in enumerate(cls_of) if c in names]
    ids = tuple(files[k] for k in keep)
    return LabelTable(
        ids,
        tuple(names.index(cls_of[k]) for k in keep),
        names,
        origins=tuple(f"{root / files[k]} (class folder {where[cls_of[k]]})" for k in keep),
        source=str(root),
        left_out=tuple(files[k] for k in range(len(files)) if cls_of[k] not in names),
    )


def _with_groups(table: LabelTable, path: Path) -> LabelTable:
    header, rows = read_csv(path, "groups CSV")
    ci, cg = column(path, header, "image"), column(path, header, "group")
    refuse_extra_columns(path, header, ("image", "group"))
    group: dict[str, str] = {}
    index = set(table.ids)
    for r in range(len(rows)):
        image, g = cell(path, rows, r, ci, "image"), cell(path, rows, r, cg, "group")
        if image in table.left_out:
            continue
        if image not in index:
            raise DatasetError(
                f"{line(path, r)}: image {image!r} is not in the dataset (ids are paths below root)"
            )
        if image in group:
            raise DatasetError(f"{line(path, r)}: image {image!r} is listed again")
        group[image] = g
    missing = [sid for sid in table.ids if sid not in group]
    if missing:
        raise DatasetError(f"{path} gives no group for {len(missing)} images (first: {missing[0]!r})")
    return replace(table, groups=tuple(group[sid] for sid in table.ids))
