"""Artifact annotations as people make them: which artifacts each image shows.

Three file formats are read, all mapped to ``{artifact: [sample indices]}``:

* **CSV** ``image,artifacts``: one row per image, artifact names separated by ``;`` (an empty cell:
  none). What a reviewer fills in a spreadsheet, and what ``medaudit annotate --apply`` writes.
* **JSON by image** ``{"ISIC_0000003": ["band_aid", "ruler"], ...}``.
* **JSON by artifact** ``{"band_aid": ["ISIC_0000003", ...]}``: the paper's files (method.md §8,
  ``data/artifacts_isic.json``). An entry is a sample id, with or without its image extension, or
  an int row index (``SynthDerm.artifact_ids``, the paper's HyperKvasir file). A JSON object is
  read by artifact when none of its keys names an image.

Artifact names become mask folders and concept names, so they are checked: lower-case letters,
digits and ``_``; two spellings of one name (``band_aid`` and ``bandaid``) are refused; and when
the dataset declares its artifacts (``artifacts=band_aid,ruler``), any other name is refused with
the closest valid one. Every error names the file and the row.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medaudit.models.data.files import SHOW, column, line, read_csv, refuse_extra_columns
from medaudit.models.errors import DatasetError

#: Default annotation files beside the labels, tried in this order.
DEFAULT_FILES = ("artifacts.csv", "artifacts.json")
CSV_COLUMNS = ("image", "artifacts")
_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")
#: Lookup value of a name the dataset knows but left out (a class outside a subset, a lateral
#: view): its annotations are skipped, not refused.
_SKIP = -1
_SHOW = SHOW


@dataclass(frozen=True)
class Annotations:
    """What an annotation file says, as row indices.

    Attributes:
        by_artifact: ``{artifact: sorted unique indices}``.
        path: The file read, or None.
        format: ``"csv"``, ``"json_by_image"``, ``"json_by_artifact"`` or ``"none"``.
    """

    by_artifact: dict[str, list[int]] = field(default_factory=dict)
    path: Path | None = None
    format: str = "none"


def default_annotation_file(root: Path) -> Path | None:
    """``root/artifacts.csv`` or ``root/artifacts.json`` when one exists; None when neither.

    Raises:
        DatasetError: Both exist (which one is meant cannot be guessed).
    """
    found = [root / n for n in DEFAULT_FILES if (root / n).is_file()]
    if len(found) > 1:
        raise DatasetError(
            f"both {found[0]} and {found[1]} exist: keep one, or name it with annotations=<file>"
        )
    return found[0] if found else None


def read_annotations(
    path: str | Path,
    ids: Sequence[str],
    aliases: Mapping[str, int] | None = None,
    vocabulary: Sequence[str] | None = None,
    left_out: Sequence[str] = (),
) -> Annotations:
    """Read an annotation file (CSV, JSON by image, or JSON by artifact) against a dataset's ids.

    Args:
        path: The file; ``.csv`` or ``.json``.
        ids: Sample ids in dataset order; position is the row index.
        aliases: Other accepted names per sample index (ids without extension, mask keys).
        vocabulary: The dataset's declared artifacts; None accepts any well-formed name.
        left_out: Images of the files that the dataset leaves out (other classes, other views):
            their annotations are skipped.

    Raises:
        DatasetError: A missing or unreadable file, missing or extra CSV columns, an unknown image,
            an image listed twice, a malformed or undeclared artifact name, or two spellings of
            one name; each naming the file and the row or key.
    """
    path = Path(path)
    lookup = {**{sid: _SKIP for sid in left_out}, **(aliases or {}), **{sid: i for i, sid in enumerate(ids)}}
    if path.suffix.lower() == ".csv":
        by_image, where = _read_csv(path, lookup)
        fmt = "csv"
    elif path.suffix.lower() == ".json":
        raw = _read_json(path)
        if raw and not any(k in lookup or _strip_ext(k) in lookup for k in raw):
            if not _any_sample(raw, lookup, len(ids)):
                first = next(iter(raw))
                raise DatasetError(
                    f"{path}: none of its keys is an image of the dataset (first: {first!r}) and no "
                    "entry names one; is it the annotation file of another dataset?"
                )
            by_artifact = load_artifact_ids(path, ids, aliases=lookup)
            _check_names({a: f"{path}: key {a!r}" for a in by_artifact}, vocabulary)
            return Annotations(by_artifact, path, "json_by_artifact")
        by_image, where = _by_image_json(path, raw, lookup)
        fmt = "json_by_image"
    else:
        raise DatasetError(f"annotation file {path}: expected a .csv (image,artifacts) or .json file")
    first_use: dict[str, str] = {}
    out: dict[str, set[int]] = {}
    for i, names in by_image.items():
        for a in names:
            first_use.setdefault(a, where[i])
            out.setdefault(a, set()).add(i)
    _check_names(first_use, vocabulary)
    return Annotations({a: sorted(out[a]) for a in sorted(out)}, path, fmt)


def _read_csv(path: Path, lookup: Mapping[str, int]) -> tuple[dict[int, list[str]], dict[int, str]]:
    header, rows = read_csv(path, "annotation CSV")
    ci, ca = column(path, header, "image"), column(path, header, "artifacts")
    refuse_extra_columns(path, header, CSV_COLUMNS, "; write one row per image: image,artifacts (a;b)")
    by_image: dict[int, list[str]] = {}
    where: dict[int, str] = {}
    for r, row in enumerate(rows):
        name = row[ci] if ci < len(row) else ""
        if not name:
            raise DatasetError(f"{line(path, r)}: empty value in column 'image'")
        i = _lookup(name, lookup)
        if i is None:
            raise DatasetError(f"{line(path, r)}: image {name!r} is not in the dataset")
        if i == _SKIP:
            continue
        if i in where:
            raise DatasetError(f"{line(path, r)}: image {name!r} is listed again (first at {where[i]})")
        where[i] = line(path, r)
        cell = row[ca] if ca < len(row) else ""
        by_image[i] = [a.strip() for a in cell.split(";") if a.strip()]
    return by_image, where


def _by_image_json(
    path: Path, raw: Mapping[str, Any], lookup: Mapping[str, int]
) -> tuple[dict[int, list[str]], dict[int, str]]:
    by_image: dict[int, list[str]] = {}
    where: dict[int, str] = {}
    for key, names in raw.items():
        i = _lookup(key, lookup)
        if i is None:
            raise DatasetError(f"{path}: key {key!r} is not an image of the dataset")
        if i == _SKIP:
            continue
        if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
            raise DatasetError(
                f"{path}: image {key!r} maps to {names!r:.80}; expected a list of artifact names"
            )
        if i in where:
            raise DatasetError(f"{path}: image {key!r} is listed twice (also as {where[i].split(': ')[-1]})")
        where[i] = f"{path}: image {key!r}"
        by_image[i] = [a.strip() for a in names if a.strip()]
    return by_image, where


def _check_names(first_use: Mapping[str, str], vocabulary: Sequence[str] | None) -> None:
    """Refuse malformed names, two spellings of one name, and names outside ``vocabulary``."""
    spelled: dict[str, str] = {}
    for a, where in first_use.items():
        if not _NAME.fullmatch(a):
            fix = re.sub(r"[^a-z0-9_]+", "_", a.lower()).strip("_") or "a name"
            raise DatasetError(
                f"{where}: artifact name {a!r} is not lower-case letters, digits and _; write {fix!r}"
            )
        flat = a.replace("_", "")
        if flat in spelled and spelled[flat] != a:
            other = spelled[flat]
            raise DatasetError(
                f"{where}: artifact {a!r} and {other!r} (first at {first_use[other]}) look like one "
                "artifact spelled two ways; use one name"
            )
        spelled[flat] = a
        if vocabulary is not None and a not in vocabulary:
            close = difflib.get_close_matches(a, list(vocabulary), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DatasetError(
                f"{where}: unknown artifact {a!r}{hint}; the dataset's artifacts: {', '.join(vocabulary)}"
            )


def write_annotations(
    path: str | Path, ids: Sequence[str], by_artifact: Mapping[str, Sequence[int]], fmt: str = "csv"
) -> Path:
    """Write annotations atomically (a temporary file renamed over ``path``).

    Args:
        path: Target file.
        ids: Sample ids in dataset order.
        by_artifact: ``{artifact: indices}``.
        fmt: ``"csv"`` (every image, one row each), ``"json_by_image"`` (annotated images only) or
            ``"json_by_artifact"`` (the paper's form).
    """
    path = Path(path)
    per_image: dict[int, list[str]] = {}
    for a in sorted(by_artifact):
        for i in sorted(set(by_artifact[a])):
            per_image.setdefault(int(i), []).append(a)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            w.writerows([sid, ";".join(per_image.get(i, []))] for i, sid in enumerate(ids))
    elif fmt == "json_by_image":
        tmp.write_text(json.dumps({ids[i]: names for i, names in sorted(per_image.items())}, indent=1))
    elif fmt == "json_by_artifact":
        tmp.write_text(
            json.dumps({a: [ids[i] for i in sorted(set(v))] for a, v in by_artifact.items()}, indent=1)
        )
    else:
        raise DatasetError(f"annotation format {fmt!r}; valid: csv, json_by_image, json_by_artifact")
    os.replace(tmp, path)
    return path


def require_artifact(
    by_artifact: Mapping[str, Sequence[int]], name: str, source: str = "the dataset"
) -> None:
    """Refuse an artifact no image is annotated with, naming the annotated ones and the closest.

    Raises:
        DatasetError: ``name`` is not annotated on any image.
    """
    if by_artifact.get(name):
        return
    have = [a for a, v in by_artifact.items() if v]
    close = difflib.get_close_matches(name, have, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(f"{a} ({len(by_artifact[a])})" for a in have) or "none"
    raise DatasetError(f"no image of {source} is annotated with {name!r}{hint}; annotated: {listed}")


# ------------------------------------------------------------------------------ artifact styles

#: The optional style file beside the annotations (what a styled synthderm export writes).
STYLES_FILE = "artifact_styles.json"
_STYLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*")


def read_styles(
    path: str | Path,
    ids: Sequence[str],
    by_artifact: Mapping[str, Sequence[int]],
    aliases: Mapping[str, int] | None = None,
    left_out: Sequence[str] = (),
) -> dict[str, dict[int, str]]:
    """Read a style file ``{image: {artifact: style}}`` against a dataset and its annotations.

    A style names a look of an artifact (``"round-white"``, ``"light-on-dark"``): the audit reports
    each concept per style, seen in training or not (docs/data.md). Styles come back as
    ``"artifact/style"`` (a value already written so is kept). An image may leave out styles of its
    artifacts; a style for an artifact the annotations do not list on that image is refused.

    Returns:
        ``{artifact: {index: "artifact/style"}}``.

    Raises:
        DatasetError: An unreadable file, an unknown image, a value that is not an object of
            strings, a malformed style, or a style for an artifact the image is not annotated with;
            each naming the file and the image.
    """
    path = Path(path)
    raw = _read_json(path, "style", "{image: {artifact: style}}")
    lookup = {**{sid: _SKIP for sid in left_out}, **(aliases or {}), **{sid: i for i, sid in enumerate(ids)}}
    carried = {a: set(v) for a, v in by_artifact.items()}
    out: dict[str, dict[int, str]] = {}
    for key, styles in raw.items():
        i = _lookup(key, lookup)
        if i is None:
            raise DatasetError(f"{path}: key {key!r} is not an image of the dataset")
        if i == _SKIP:
            continue
        if not isinstance(styles, dict) or not all(isinstance(v, str) for v in styles.values()):
            raise DatasetError(f"{path}: image {key!r} maps to {styles!r:.80}; expected {{artifact: style}}")
        for art, style in styles.items():
            if i not in carried.get(art, ()):
                raise DatasetError(
                    f"{path}: image {key!r} has a style for {art!r}, but the annotations do not list "
                    f"{art!r} on it"
                )
            name = style.strip().removeprefix(f"{art}/")
            if not _STYLE.fullmatch(name):
                raise DatasetError(
                    f"{path}: image {key!r}: style {style!r} of {art!r} is not a name (letters, digits, "
                    "space, _ . + -)"
                )
            out.setdefault(art, {})[i] = f"{art}/{name}"
    return out


# ----------------------------------------------------------------------- JSON by artifact (paper)


def load_artifact_ids(
    path: str | Path,
    ids: Sequence[str],
    stems: Sequence[str] = (),
    *,
    aliases: Mapping[str, int] | None = None,
) -> dict[str, list[int]]:
    """Read and validate a JSON file ``{artifact: [id or row index, ...]}`` (the paper's form).

    Args:
        path: The JSON file.
        ids: Sample ids in dataset order; position is the row index.
        stems: Optional second name per sample (the id without its extension), also accepted.
        aliases: Other accepted names, each mapped to its sample index.

    Returns:
        ``{artifact: sorted unique row indices}``, in the file's artifact order.

    Raises:
        DatasetError: The file is missing or not JSON, is not an object, an artifact's value is not
            a list, or an entry names no sample (up to five unknown entries are listed).
    """
    path = Path(path)
    raw = _read_json(path)
    lookup = {name: i for i, name in enumerate(stems)}
    lookup.update(aliases or {})
    lookup.update({name: i for i, name in enumerate(ids)})
    out: dict[str, list[int]] = {}
    unknown: list[str] = []
    for artifact, entries in raw.items():
        if not isinstance(entries, list):
            raise DatasetError(
                f"{path}: artifact {artifact!r} maps to {type(entries).__name__}; "
                "expected a list of sample ids"
            )
        found = {_index_of(e, lookup, len(ids)) for e in entries}
        unknown += [f"{artifact}:{e!r}" for e in entries if _index_of(e, lookup, len(ids)) is None]
        out[artifact] = sorted(i for i in found if i is not None and i != _SKIP)
    if unknown:
        shown = ", ".join(unknown[:_SHOW])
        raise DatasetError(
            f"{path}: {len(unknown)} unknown sample ids (first {min(len(unknown), _SHOW)}: {shown})"
        )
    return out


def _read_json(
    path: Path, what: str = "annotation", shape: str = "an object {artifact: [ids]}"
) -> dict[str, Any]:
    """A JSON object read from an artifact ``what`` file (annotations, styles), refused by name when
    missing, unreadable or not an object (``shape`` says what it should be)."""
    if not path.is_file():
        raise DatasetError(f"artifact {what} file {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot read artifact {what}s as JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: top level is {type(raw).__name__}; expected {shape}")
    return raw


def _strip_ext(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _lookup(name: str, lookup: Mapping[str, int]) -> int | None:
    found = lookup.get(name)
    return found if found is not None else lookup.get(_strip_ext(name))


def _any_sample(raw: Mapping[str, Any], lookup: Mapping[str, int], n: int) -> bool:
    return any(
        isinstance(v, list) and any(_index_of(e, lookup, n) is not None for e in v) for v in raw.values()
    )


def _index_of(entry: Any, lookup: Mapping[str, int], n: int) -> int | None:
    """Row index of one annotation entry, or None when it names no sample."""
    if isinstance(entry, str):
        # "ISIC_0000005.jpg" names the sample "ISIC_0000005" too: retry without the extension.
        found = lookup.get(entry)
        return found if found is not None or "." not in entry else lookup.get(entry.rsplit(".", 1)[0])
    if isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry < n:
        return entry
    return None
