"""Synthderm written to disk in the layouts people download, so every adapter reads data whose
shortcut is known: the folder + labels CSV layout, ISIC 2019 as published, and CheXpert's CSVs
with patient folders.

Every export writes the images, ``artifacts.csv`` (``image,artifacts``) and ``synthderm.json`` (the
generator config, the layout and the spec that opens it); a styled synthderm (``styles=split``)
also ``artifact_styles.json``, each image's ``{artifact: style}``. Masks (``masks/<artifact>/<key>.png``,
:mod:`~medaudit.models.data.masks`) go beside the data, or to ``mask_dir`` to hold them back (the
hospital case: annotations only, true masks kept to score derived ones), or nowhere.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from medaudit.models.data.annotations import STYLES_FILE, write_annotations
from medaudit.models.data.isic import GROUND_TRUTH, ISIC_CLASSES, METADATA, METADATA_COLUMNS
from medaudit.models.data.masks import MASKS_DIR, MaskFolder
from medaudit.models.errors import ConfigError

if TYPE_CHECKING:
    from medaudit.models.data.synthetic import SynthDerm

LAYOUTS = ("folder", "isic2019", "chexpert")
#: ISIC 2019 column of each synthderm lesion kind.
ISIC_COLUMN = {"benign": "NV", "malignant": "MEL", "bcc": "BCC"}
ISIC_IMAGE_DIR = "ISIC_2019_Training_Input"
CHEXPERT_PREFIX = "CheXpert-v1.0-small"
_SITES = ("anterior torso", "posterior torso", "upper extremity", "lower extremity", "head/neck")
Progress = Callable[[int], None] | None


def export(
    ds: SynthDerm,
    root: str | Path,
    layout: str = "folder",
    variant: str = "ch",
    attack: str = "band_aid",
    *,
    masks: bool = True,
    mask_dir: str | Path | None = None,
    progress: Progress = None,
) -> Path:
    """Write ``ds`` to ``root`` in ``layout`` (see the module docstring and docs/data.md).

    Args:
        ds: The synthderm dataset.
        root: Target folder (created).
        layout: ``"folder"``, ``"isic2019"`` or ``"chexpert"``.
        variant, attack: Which images (:meth:`SynthDerm.sample`).
        masks: Write the true masks; False writes none.
        mask_dir: Where the masks go instead of ``root/masks`` (held back from the dataset).
        progress: Called with 1 per image written.

    Returns:
        ``root``.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown export layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = None if not masks else MaskFolder(Path(mask_dir) if mask_dir is not None else root / MASKS_DIR)
    names = _names(ds, layout)
    carriers: dict[str, list[int]] = {}
    for i in range(len(ds)):
        s = ds.sample(i, variant, attack)
        target = root / names.files[i]
        target.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(s.image)
        if target.suffix == ".jpg":
            img.save(target, quality=95)
        else:
            img.save(target, optimize=False, compress_level=1)
        for art, m in s.masks.items():
            carriers.setdefault(art, []).append(i)
            if store is not None:
                store.write(names.keys[i], art, m)
        if progress is not None:
            progress(1)
    write_annotations(root / "artifacts.csv", names.ids, carriers)
    if ds.styled:  # each image's artifact styles, beside its annotations
        styles = {names.ids[i]: dict(st) for i, st in enumerate(_styles_of(ds, variant, attack)) if st}
        (root / STYLES_FILE).write_text(json.dumps(styles, indent=1))
    _tables(ds, root, layout, names)
    meta = {"layout": layout, "variant": variant, "open_with": names.spec(root), **ds.cfg.to_dict()}
    meta["masks"] = "none" if store is None else str(store.root)
    (root / "synthderm.json").write_text(json.dumps(meta, indent=1))
    return root


class _Names:
    """Per sample: its id (as the layout's CSV writes it), its image file and its mask key."""

    def __init__(self, ids: Sequence[str], files: Sequence[str], keys: Sequence[str], spec: str) -> None:
        self.ids, self.files, self.keys, self._spec = list(ids), list(files), list(keys), spec

    def spec(self, root: Path) -> str:
        return self._spec.format(root=root.resolve())


def _styles_of(ds: SynthDerm, variant: str, attack: str) -> list[dict[str, str]]:
    """Per image, ``{artifact: style}`` of the artifacts ``variant`` draws on it."""
    return [{a: ds.style_of(i, a) for a in ds.artifacts_of(i, variant, attack)} for i in range(len(ds))]


def _names(ds: SynthDerm, layout: str) -> _Names:
    n = len(ds)
    if layout == "folder":
        ids = [f"synth_{i:06d}" for i in range(n)]
        return _Names(ids, [f"images/{s}.png" for s in ids], ids, "folder:{root}")
    if layout == "isic2019":
        ids = [f"ISIC_{i:07d}" for i in range(n)]
        classes = ",".join(_isic_columns(ds))
        return _Names(
            ids, [f"{ISIC_IMAGE_DIR}/{s}.jpg" for s in ids], ids, "isic2019:{root}?classes=" + classes
        )
    ids, keys = [], []
    study = np.zeros(n, dtype=np.int64)
    seen: dict[int, int] = {}
    for i in range(n):
        lesion = int(ds.lesion_of[i])
        seen[lesion] = seen.get(lesion, 0) + 1
        study[i] = seen[lesion]
        part = "valid" if ds.split_of[i] == "test" else "train"
        ids.append(f"{CHEXPERT_PREFIX}/{part}/patient{lesion + 1:05d}/study{study[i]}/view1_frontal.jpg")
        keys.append(f"patient{lesion + 1:05d}_study{study[i]}_view1_frontal")
    from medaudit.models.data.synthetic import KINDS

    task = next((c for c in ds.label_names if KINDS[c] == "malignant"), ds.label_names[-1])
    labels = ",".join(ds.label_names) if len(ds.label_names) == 2 and task == ds.label_names[1] else ""
    spec = (
        "chexpert:{root}?task="
        + task
        + "&uncertain=ones&split=official"
        + (f"&labels={labels}" if labels else "")
    )
    return _Names(ids, ids, keys, spec)


def _isic_columns(ds: SynthDerm) -> list[str]:
    from medaudit.models.data.synthetic import KINDS

    cols = [ISIC_COLUMN[KINDS[c]] for c in ds.label_names]
    if len(set(cols)) != len(cols):
        raise ConfigError(f"classes {ds.label_names} map to ISIC columns {cols}: two classes share one")
    return cols


def _tables(ds: SynthDerm, root: Path, layout: str, names: _Names) -> None:
    rng = np.random.default_rng([ds.cfg.seed, 0xE4907])
    if layout == "folder":
        grouped = not ds.cfg.plain
        header = ["image", "label", "split", *(["group"] if grouped else [])]
        rows: list[list[Any]] = [
            [sid, ds.label_names[int(ds.labels[i])], ds.split_of[i], *([ds.groups[i]] if grouped else [])]
            for i, sid in enumerate(names.ids)
        ]
        _write(root / "labels.csv", header, rows)
    elif layout == "isic2019":
        cols = _isic_columns(ds)
        gt = [
            [sid, *(f"{float(c == cols[int(ds.labels[i])]):.1f}" for c in ISIC_CLASSES)]
            for i, sid in enumerate(names.ids)
        ]
        _write(root / GROUND_TRUTH, ["image", *ISIC_CLASSES], gt)
        meta = []
        for i, sid in enumerate(names.ids):
            lesion = int(ds.lesion_of[i])
            lrng = np.random.default_rng([ds.cfg.seed, 0x5173, lesion])  # per lesion: one patient's age, sex
            age, site, sex = (
                int(lrng.integers(6, 18)) * 5,
                _SITES[int(lrng.integers(len(_SITES)))],
                ("female", "male")[int(lrng.integers(2))],
            )
            meta.append([sid, age, site, f"IL_{lesion:07d}", sex])
        _write(root / METADATA, list(METADATA_COLUMNS), meta)
    else:
        _chexpert_tables(ds, root, names, rng)


def _chexpert_tables(ds: SynthDerm, root: Path, names: _Names, rng: np.random.Generator) -> None:
    """One finding column per class: 1 for the image's class, 0 otherwise; then, as in CheXpert's
    labeller, 5 % of the positives of every class but the first become uncertain (-1) and 30 % of
    the zeros blank."""
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *ds.label_names]
    by_csv: dict[str, list[list[Any]]] = {"train.csv": [], "valid.csv": []}
    for i, sid in enumerate(names.ids):
        y = int(ds.labels[i])
        cells: list[str] = []
        for k in range(len(ds.label_names)):
            if k == y:
                cells.append("-1.0" if k > 0 and rng.random() < 0.05 else "1.0")
            else:
                cells.append("" if rng.random() < 0.3 else "0.0")
        lrng = np.random.default_rng([ds.cfg.seed, 0x5173, int(ds.lesion_of[i])])
        sex, age = ("Female", "Male")[int(lrng.integers(2))], int(lrng.integers(18, 90))
        view = ("AP", "PA")[int(rng.integers(2))]
        by_csv["valid.csv" if ds.split_of[i] == "test" else "train.csv"].append(
            [sid, sex, age, "Frontal", view, *cells]
        )
    for name, rows in by_csv.items():
        _write(root / name, header, rows)


def _write(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
