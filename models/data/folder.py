"""Real image datasets read from disk: the shared base and the "folder + labels CSV" layout.

Layout read by :class:`FolderDataset` (and written by ``SynthDerm.export``)::

    root/labels.csv                      image,label[,split][,group]
    root/images/<id>[.png|.jpg|...]
    root/artifacts.csv | artifacts.json  optional annotations (models.data.annotations)
    root/masks/<artifact>/<id>.png       optional masks, non-zero = artifact (models.data.masks)

Splits (:mod:`medaudit.models.data.splits`): a split file given with ``splits=``, else the CSV's
``split`` column, else a seeded group-aware split when the samples have groups (a ``group``
column: patient, lesion), else the paper's seeded split (method.md §8). A given split that puts
one group in two splits is refused. Images are converted to RGB and, when a size is asked for,
resized square with bicubic as the paper's ISIC loader does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medaudit.models.data.annotations import (
    STYLES_FILE,
    Annotations,
    default_annotation_file,
    read_annotations,
    read_styles,
)
from medaudit.models.data.files import (
    IMAGE_EXTENSIONS,
    cell,
    check_image,
    check_unique,
    column,
    image_size,
    line,
    read_csv,
    read_mask,
    read_rgb,
    refuse_extra_columns,
    require_root,
    resolve_images,
    sorted_names,
)
from medaudit.models.data.masks import MASKS_DIR, NO_MASKS, MaskFolder, overall_source
from medaudit.models.data.splits import (
    SPLITS,
    check_groups,
    group_split,
    paper_split,
    paper_split_names,
    read_split_file,
    split_report,
)
from medaudit.models.errors import ConfigError, DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASKS_DIR",
    "SPLITS",
    "FolderDataset",
    "ImageDataset",
    "LabelTable",
    "cell",
    "column",
    "paper_split",
    "read_csv",
    "read_mask",
    "read_rgb",
    "require_root",
    "resolve_images",
]

#: ``progress(description, total) -> advance(n)``.
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class LabelTable:
    """One row per sample, as a dataset adapter read it from its CSV or folders."""

    ids: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    #: ``"train"``/``"val"``/``"test"`` per sample, or None for a computed split.
    splits: tuple[str, ...] | None = None
    #: Patient / lesion per sample, or None (every sample its own group).
    groups: tuple[str, ...] | None = None
    #: Where each sample was listed (``"labels.csv line 7"``), for error messages.
    origins: tuple[str, ...] = ()
    #: File name of each sample's masks (``masks/<artifact>/<key>.png``); default: id sans extension.
    keys: tuple[str, ...] = ()
    #: Image file of each sample relative to the image folder, where it is not the id.
    files: tuple[str, ...] = ()
    #: What a given split is called in errors (``"labels.csv column 'split'"``).
    split_source: str = ""
    #: What a group is: ``"patient"``, ``"lesion"`` or ``"group"``.
    group_kind: str = "group"
    #: Classes that may have no samples (ISIC 2019's UNK); any other empty class is refused.
    allow_empty: tuple[str, ...] = ()
    #: The file the labels came from, named when a class is empty.
    source: str = ""
    #: Images the files list but the adapter leaves out (a class outside a subset, a lateral
    #: view, an uncertain label ignored): annotations, masks and split files may name them.
    left_out: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------- datasets


class ImageDataset:
    """Labelled images on disk: the behaviour every adapter shares.

    Satisfies :class:`~medaudit.models.data.protocol.AnnotatedDataset`.

    Args:
        root: The dataset folder.
        table: The adapter's rows.
        image_dir: Folder the ids are relative to.
        extensions: Extensions tried when an id has none.
        annotations: Annotation file (CSV or JSON); default ``root/artifacts.csv`` or
            ``root/artifacts.json`` when present.
        artifacts: The dataset's artifact names; annotations naming others are refused. None:
            any well-formed name.
        masks: Mask folder; default ``root/masks``.
        splits: Split file ``image,split``, overriding the adapter's split.
        seed: Seed of the group-aware split.

    Attributes:
        root: The dataset folder.
        labels: Class index per sample (int64).
        label_names: Class names; ``labels`` index into them.
        paths: Image file per sample.
        split_of: ``"train"``/``"val"``/``"test"`` per sample.
        groups: Patient / lesion per sample (its own id where the layout has none).
        masks: The :class:`~medaudit.models.data.masks.MaskFolder`.
        annotations: The :class:`~medaudit.models.data.annotations.Annotations` read.
    """

    def __init__(
        self,
        root: Path,
        table: LabelTable,
        image_dir: Path,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        annotations: str | Path | None = None,
        *,
        artifacts: Sequence[str] | None = None,
        masks: str | Path | None = None,
        splits: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        self.root = root
        self._ids = table.ids
        n = len(table.ids)
        self.origins = table.origins or tuple(f"{table.source or root} row {k + 1}" for k in range(n))
        self.labels = np.asarray(table.labels, dtype=np.int64)
        self.label_names = table.label_names
        _refuse_empty_classes(table, self.labels)
        self.paths = resolve_images(image_dir, table.files or table.ids, extensions, self.origins)
        self.keys = table.keys or tuple(_stem(sid, extensions) for sid in table.ids)
        self._has_groups = table.groups is not None
        self.groups = table.groups if table.groups is not None else table.ids
        self.group_kind = table.group_kind
        self._aliases = {k: i for i, k in enumerate(self.keys)}
        self._left_out = set(table.left_out) | {_stem(s, extensions) for s in table.left_out}
        self.split_of = self._split(table, splits, seed)
        self.vocabulary = tuple(artifacts) if artifacts is not None else None
        self.masks = MaskFolder(Path(masks) if masks is not None else root / MASKS_DIR)
        self.annotations = self._load_annotations(annotations)
        self._artifacts = self.annotations.by_artifact
        self._styles = self._load_styles()

    def _split(self, table: LabelTable, split_file: str | Path | None, seed: int) -> np.ndarray:
        if split_file is not None:
            out = read_split_file(Path(split_file), self._ids, self._aliases, self._left_out)
            source = f"split file {split_file}"
        elif table.splits is not None:
            out, source = np.asarray(table.splits), table.split_source or "the split column"
        elif self._has_groups:
            return group_split(self.labels, self.groups, seed)
        else:
            return paper_split_names(len(self._ids))
        check_groups(out, self.groups, self._ids, source, self.group_kind)
        return out

    def _load_annotations(self, path: str | Path | None) -> Annotations:
        """The given file (must exist), else ``root/artifacts.{csv,json}`` when present, else none."""
        if path is None:
            path = default_annotation_file(self.root)
            if path is None:
                return Annotations()
        return read_annotations(path, self._ids, self._aliases, self.vocabulary, tuple(self._left_out))

    def _load_styles(self) -> dict[str, dict[int, str]]:
        """``root/artifact_styles.json`` when present (each annotated artifact's look per image), else
        none."""
        path = self.root / STYLES_FILE
        if not path.is_file():
            return {}
        return read_styles(path, self._ids, self._artifacts, self._aliases, tuple(self._left_out))

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
        return read_rgb(self.paths[i], size, self.origins[i])

    def config(self) -> dict[str, Any] | None:
        """None: the data is read from disk, there is no generator config to record."""
        return None

    def split_report(self) -> dict[str, Any]:
        """Images and groups per split and class, and how many groups lie in several splits (0)."""
        rep = split_report(self.labels, self.label_names, self.split_of, self.groups)
        rep["group_kind"] = self.group_kind if self._has_groups else "image"
        return rep

    # ------------------------------------------------------------------ annotations and masks

    def artifact_ids(self, split: str = "all") -> dict[str, list[int]]:
        """``{artifact: [indices]}`` from the annotation file, restricted to ``split``."""
        keep = set(self.indices(split).tolist())
        return {a: [i for i in idx if i in keep] for a, idx in self._artifacts.items()}

    @property
    def styled(self) -> bool:
        """Whether a style file names the looks of the annotated artifacts (per-style audit)."""
        return bool(self._styles)

    def artifact_styles(self, split: str = "all") -> dict[str, dict[int, str]]:
        """``{artifact: {index: "artifact/style"}}`` of ``split``'s images with a style on file."""
        keep = set(self.indices(split).tolist())
        return {a: {i: s for i, s in v.items() if i in keep} for a, v in self._styles.items()}

    @property
    def has_masks(self) -> bool:
        """Whether the mask folder exists, so :meth:`mask` can answer."""
        return self.masks.exists

    @property
    def mask_source(self) -> str:
        """``"ground_truth"``, ``"derived"`` (if any artifact's are) or ``"none"``.

        Per artifact: :meth:`mask_source_of`.
        """
        names = set(self._artifacts) | set(self.masks.artifacts())
        return overall_source({a: self.mask_source_of(a) for a in names})

    def mask_source_of(self, artifact: str) -> str:
        """Where ``artifact``'s masks came from: ``"ground_truth"``, ``"derived"`` or ``"none"``."""
        return self.masks.source(artifact) if self.masks.exists else NO_MASKS

    def mask(self, i: int, artifact: str, size: int | None = None) -> np.ndarray:
        """H×W bool mask of ``artifact`` in image ``i`` (``masks/<artifact>/<key>.png``).

        All False when the sample is not annotated with the artifact and has no mask file
        (method.md §5.4: the mask is zeros where there is no artifact).

        Raises:
            DatasetError: No masks folder, an artifact neither annotated nor on disk, an
                annotated sample whose mask file is missing, or a mask unreadable or of another
                size than its image.
        """
        if not self.masks.exists:
            raise DatasetError(f"no mask folder {self.masks.root}")
        path = self.masks.path(self.keys[i], artifact)
        if path is not None:
            expect = image_size(self.paths[i], self.origins[i])
            return read_mask(path, size, expect, f"{self.paths[i]} ({self.origins[i]})")
        want = self.masks.root / artifact / f"{self.keys[i]}.png"
        if not self.masks.has(artifact):
            if artifact not in self._artifacts:
                known = ", ".join(self._artifacts) or "none"
                raise DatasetError(
                    f"no mask {want} and {artifact!r} is not an annotated artifact; annotated: {known}"
                )
            raise DatasetError(
                f"{self.masks.root} has no masks of {artifact!r} (no folder {self.masks.root / artifact}): "
                "draw them, or derive them from the model with `medaudit localize --export-masks`"
            )
        if i in self._artifacts.get(artifact, ()):
            raise DatasetError(
                f"{self.origins[i]}: sample {self._ids[i]!r} is annotated with {artifact!r} "
                f"but {want} is missing"
            )
        return np.zeros(self._image_size(i, size), dtype=bool)

    def _image_size(self, i: int, size: int | None) -> tuple[int, int]:
        return (size, size) if size is not None else image_size(self.paths[i], self.origins[i])

    def validate(self, progress: Progress | None = None) -> dict[str, Any]:
        """Read every image and mask once: what a build would otherwise trip over halfway.

        Returns:
            ``{"images": n, "masks": n, "mask_sources": {artifact: source}}``.

        Raises:
            DatasetError: An unreadable image, a mask folder of an artifact no image is annotated
                with, an annotated image without its mask, a mask for an image not annotated with
                its artifact, or a mask of the wrong size; each naming the row and the file.
        """
        adv = progress("check images", len(self)) if progress else None
        sizes = []
        for i in range(len(self)):
            sizes.append(check_image(self.paths[i], self.origins[i]))
            if adv:
                adv(1)
        n_masks = 0
        sources = {}
        for a in self.masks.artifacts() if self.masks.exists else ():
            if a not in self._artifacts:
                known = ", ".join(self._artifacts) or "none"
                raise DatasetError(
                    f"mask folder {self.masks.root / a} names artifact {a!r}, which no image is annotated "
                    f"with; annotated: {known}"
                )
        for a, idx in self._artifacts.items():
            sources[a] = self.mask_source_of(a)
            if sources[a] == NO_MASKS:
                continue
            carriers = set(idx)
            for key in sorted(self.masks.keys(a) - {self.keys[i] for i in carriers} - self._left_out):
                j = self._aliases.get(key)
                what = f"image {self._ids[j]!r} ({self.origins[j]})" if j is not None else "no image"
                raise DatasetError(
                    f"mask {self.masks.root / a / (key + '.png')} marks {a!r} on {what}, which the "
                    f"annotations ({self.annotations.path}) do not list with {a!r}"
                )
            for i in idx:
                p = self.masks.path(self.keys[i], a)
                if p is None:
                    raise DatasetError(
                        f"{self.origins[i]}: image {self._ids[i]!r} is annotated with {a!r}, whose masks "
                        f"are in {self.masks.root / a}, but its mask {self.keys[i]}.png is missing"
                    )
                read_mask(p, None, sizes[i], f"{self.paths[i]} ({self.origins[i]})")
                n_masks += 1
        return {"images": len(self), "masks": n_masks, "mask_sources": sources}

    def as_torch(self, split: str = "all", size: int | None = None) -> TorchImages:
        """A ``torch.utils.data.Dataset`` of ``(uint8 3×H×W tensor, label)`` over ``split``."""
        return TorchImages(self, self.indices(split), size)


def _refuse_empty_classes(table: LabelTable, labels: np.ndarray) -> None:
    counts = np.bincount(labels, minlength=len(table.label_names))
    empty = [
        n for n, c in zip(table.label_names, counts, strict=True) if c == 0 and n not in table.allow_empty
    ]
    if empty:
        raise DatasetError(
            f"{table.source or 'the dataset'}: class {empty[0]!r} has no images "
            f"(classes: {', '.join(f'{n} {c}' for n, c in zip(table.label_names, counts, strict=True))}); "
            "drop it from the class list or add its images"
        )


class FolderDataset(ImageDataset):
    """A "folder + labels CSV" dataset; reads ``SynthDerm.export`` output back.

    Args:
        root: Dataset folder.
        csv: Labels CSV, relative to ``root``.
        image_col: Column with the image id, with or without extension.
        label_col: Column with the class name.
        split_col: Column of ``train``/``val``/``test``. The default ``"split"`` is used when the
            CSV has it; any other name must exist. None ignores the column.
        image_dir: Image folder relative to ``root``; None for ``root`` itself.
        extensions: Extensions tried when an id has none.
        labels: Class names in index order; default sorted unique values of ``label_col``
            (numerically when all are integers).
        artifacts_file: Annotation file (CSV or JSON); default ``root/artifacts.{csv,json}``.
        group_col: Column of the patient / lesion; the default ``"group"`` is used when present.
        allow_empty: Classes of ``labels`` that may have no images.
        **options: ``artifacts``, ``masks``, ``splits``, ``seed`` of :class:`ImageDataset`.

    Raises:
        DatasetError: Missing root/CSV/images, missing or unexpected columns, an empty CSV, an
            empty cell, a label outside ``labels``, an unknown split value, a duplicated id, an
            empty class, or a split that puts a group in two splits.
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
        group_col: str | None = "group",
        allow_empty: Sequence[str] = (),
        **options: Any,
    ) -> None:
        path = require_root(root)
        cols = _Columns(image_col, label_col, split_col, group_col)
        table = _read_folder_table(path / csv, cols, labels, tuple(allow_empty))
        folder = path / image_dir if image_dir is not None else path
        super().__init__(path, table, folder, extensions, artifacts_file, **options)


@dataclass(frozen=True)
class _Columns:
    image: str
    label: str
    split: str | None
    group: str | None


def _read_folder_table(
    path: Path, cols: _Columns, labels: Sequence[str] | None, allow_empty: tuple[str, ...]
) -> LabelTable:
    header, rows = read_csv(path)
    ci, cl = column(path, header, cols.image), column(path, header, cols.label)
    for named in (cols.split, cols.group):  # a column asked for by name must exist
        if named is not None and named not in ("split", "group"):
            column(path, header, named)
    split_col = (
        cols.split if cols.split is not None and (cols.split != "split" or "split" in header) else None
    )
    group_col = (
        cols.group if cols.group is not None and (cols.group != "group" or "group" in header) else None
    )
    used = [cols.image, cols.label, *(c for c in (split_col, group_col) if c)]
    skipped = {"split"} if cols.split is None else set()  # split_col=None: the column is ignored
    refuse_extra_columns(
        path, [h for h in header if h not in skipped], used, " (a patient or lesion column: group_col=<name>)"
    )
    ids = tuple(cell(path, rows, r, ci, cols.image) for r in range(len(rows)))
    where = tuple(line(path, r) for r in range(len(rows)))
    check_unique(path, ids, where)
    raw = [cell(path, rows, r, cl, cols.label) for r in range(len(rows))]
    names = tuple(labels) if labels is not None else sorted_names(set(raw))
    index = {name: k for k, name in enumerate(names)}
    for r, value in enumerate(raw):
        if value not in index:
            raise DatasetError(f"{line(path, r)}: label {value!r} not in labels ({', '.join(names)})")
    splits = None
    if split_col is not None:
        cs = column(path, header, split_col)
        splits = tuple(cell(path, rows, r, cs, split_col) for r in range(len(rows)))
        for r, value in enumerate(splits):
            if value not in SPLITS:
                raise DatasetError(f"{line(path, r)}: split {value!r} not one of {', '.join(SPLITS)}")
    groups = None
    if group_col is not None:
        cg = column(path, header, group_col)
        groups = tuple(cell(path, rows, r, cg, group_col) for r in range(len(rows)))
    return LabelTable(
        ids,
        tuple(index[v] for v in raw),
        names,
        splits,
        groups,
        where,
        split_source=f"{path} column {split_col!r}",
        allow_empty=allow_empty,
        source=str(path),
    )


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
