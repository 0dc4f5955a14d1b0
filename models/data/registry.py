"""Open a dataset from one spec string, the form the CLI and configs carry: ``KIND:PATH?OPTIONS``.

``synthderm`` is the embedded synthetic default (``synthderm?preset=isic_like&size=96`` for its
three-class form, ``synthderm?styles=split`` for artifacts in style families split by split);
``folder:``, ``isic2019:``, ``chexpert:`` and ``classfolders:`` read real data
from disk. Options follow a ``?`` as ``key=value`` pairs joined by ``&``, e.g.
``chexpert:/data/chexpert?task=Cardiomegaly&uncertain=zeros`` or
``isic2019:/data/isic?classes=NV,MEL,BCC&annotations=review/artifacts.csv``. A relative path in
an option is taken from the current folder, or from the dataset root when it is not there.
Every kind returns an :class:`~medaudit.models.data.protocol.AnnotatedDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medaudit.models.data.artifact_styles import STYLE_MODES
from medaudit.models.data.chexpert import CheXpert
from medaudit.models.data.classfolders import ClassFolders
from medaudit.models.data.folder import FolderDataset, ImageDataset
from medaudit.models.data.isic import ISIC2019
from medaudit.models.data.synthetic import PRESETS, SynthDerm, SynthDermConfig
from medaudit.models.errors import DatasetError

SCHEMES = ("synthderm", "isic2019:<path>", "folder:<path>", "chexpert:<path>", "classfolders:<path>")


def _text(v: str) -> str:
    return v


def _int(v: str) -> int:
    return int(v)


def _list(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def _bool(v: str) -> bool:
    if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(v)
    return v.lower() in ("true", "1", "yes")


#: Options every on-disk kind takes (paths are resolved in :func:`open_dataset`).
_PATHS = ("annotations", "masks", "splits", "groups")
_COMMON: dict[str, Callable[[str], Any]] = {
    "annotations": _text,
    "artifacts": _list,
    "masks": _text,
    "splits": _text,
    "seed": _int,
}
OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "folder": {
        **_COMMON,
        "csv": _text,
        "image_col": _text,
        "label_col": _text,
        "split_col": _text,
        "group_col": _text,
        "image_dir": _text,
        "labels": _list,
        "allow_empty": _list,
    },
    "isic2019": {**_COMMON, "classes": _text, "metadata": _bool},
    "chexpert": {
        **_COMMON,
        "task": _text,
        "uncertain": _text,
        "blank": _text,
        "views": _text,
        "split": _text,
        "labels": _list,
    },
    "classfolders": {**_COMMON, "level": _text, "classes": _list, "groups": _text},
    # n_train/n_val/n_test: a smaller (or larger) synthderm for a quick try or a test; styles:
    # artifact style families (house, split, all; models/data/artifact_styles.py)
    "synthderm": {
        **{k: _int for k in ("size", "seed", "n_train", "n_val", "n_test")},
        "preset": _text,
        "styles": _text,
    },
}
_CLASSES: dict[str, Callable[..., ImageDataset]] = {
    "folder": FolderDataset,
    "isic2019": ISIC2019,
    "chexpert": CheXpert,
    "classfolders": ClassFolders,
}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"KIND:PATH?k=v&k2=v2"`` -> (kind, path, {k: v}); ``"synthderm?k=v"`` has no path."""
    head, _, query = spec.partition("?")
    kind, sep, path = head.partition(":")
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DatasetError(f"dataset spec {spec!r}: option {pair!r} is not key=value")
        if key in options:
            raise DatasetError(f"dataset spec {spec!r}: option {key!r} given twice")
        options[key.strip()] = value.strip()
    if kind == "synthderm" and sep:
        raise DatasetError(f"dataset spec {spec!r}: synthderm takes no path; valid: {', '.join(SCHEMES)}")
    return kind, path, options


def open_dataset(spec: str, **overrides: Any) -> SynthDerm | ImageDataset:
    """The dataset a spec names.

    Args:
        spec: ``"KIND:PATH?OPTIONS"`` (see the module docstring).
        **overrides: Options as Python values, taking precedence over the spec's.

    Raises:
        DatasetError: An unknown kind or option, a bad option value, a path missing or given where
            none is taken, or any error of the dataset itself.
    """
    kind, path, raw = parse_spec(spec)
    if kind not in OPTIONS:
        raise DatasetError(f"unknown dataset spec {spec!r}; valid: {', '.join(SCHEMES)}")
    options = _convert(spec, kind, raw)
    options.update(overrides)
    if kind == "synthderm":
        return _synthderm(spec, options)
    if not path:
        raise DatasetError(f"dataset spec {spec!r} has no path; write {kind}:<path>")
    root = Path(path)
    for key in _PATHS:
        if isinstance(options.get(key), str):
            options[key] = _resolve(root, options[key])
    return _CLASSES[kind](root, **options)


def _convert(spec: str, kind: str, raw: Mapping[str, str]) -> dict[str, Any]:
    valid = OPTIONS[kind]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in valid:
            raise DatasetError(
                f"dataset spec {spec!r}: unknown option {key!r} for {kind}; valid: {', '.join(valid)}"
            )
        try:
            out[key] = valid[key](value)
        except ValueError:
            raise DatasetError(
                f"dataset spec {spec!r}: option {key}={value!r} is not a valid value"
            ) from None
    return out


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() or p.exists() or not (root / p).exists() else root / p


def _synthderm(spec: str, options: dict[str, Any]) -> SynthDerm:
    preset = options.pop("preset", "binary")
    if preset not in PRESETS:
        raise DatasetError(f"dataset spec {spec!r}: preset {preset!r}; valid: {', '.join(PRESETS)}")
    if options.get("styles", "house") not in STYLE_MODES:
        raise DatasetError(
            f"dataset spec {spec!r}: styles {options['styles']!r}; valid: {', '.join(STYLE_MODES)}"
        )
    return SynthDerm(SynthDermConfig.preset(preset, **options))


def label_order_hint(name: str, labels: Sequence[str]) -> str:
    """How to make dataset spec ``name`` take a model's class order (``labels``), where its kind
    has an option for it; otherwise what fixes the data's classes."""
    head = name.partition("?")[0]
    kind = head.partition(":")[0]
    for option in ("labels", "classes"):
        if option in OPTIONS.get(kind, {}):
            return f"{kind} data takes the model's order as an option: {head}?{option}={','.join(labels)}"
    if kind == "synthderm":
        return (
            "synthderm draws fixed classes (preset=isic_like: nevus, melanoma, bcc): give a spec those "
            "labels to try the model on it, or --data your own dataset"
        )
    return f"{kind} data fixes its class order"
