"""Artifact annotations: JSON ``{artifact: [sample ids]}`` (method.md §8, "common conventions").

The paper maps annotation ids through the dataset's ``get_all_ids()``; here an entry is either a
sample id as written in the labels CSV, with or without an image extension, or an int row index,
which is what ``SynthDerm.artifact_ids`` and the paper's HyperKvasir file contain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medaudit.models.errors import DatasetError

#: How many unknown ids an error message lists before it only counts them.
_SHOW = 5


def load_artifact_ids(
    path: str | Path, ids: Sequence[str], stems: Sequence[str] = ()
) -> dict[str, list[int]]:
    """Read and validate an annotation file against a dataset's sample ids.

    Args:
        path: The JSON file, ``{artifact: [id or row index, ...]}``.
        ids: Sample ids in dataset order; position is the row index.
        stems: Optional second name per sample (the id without its extension), also accepted.

    Returns:
        ``{artifact: sorted unique row indices}``, in the file's artifact order.

    Raises:
        DatasetError: The file is missing or not JSON, is not an object, an artifact's value is not
            a list, or an entry names no sample (up to five unknown entries are listed).
    """
    path = Path(path)
    raw = _read_json(path)
    lookup = {name: i for i, name in enumerate(stems)}
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
        out[artifact] = sorted(i for i in found if i is not None)
    if unknown:
        shown = ", ".join(unknown[:_SHOW])
        raise DatasetError(
            f"{path}: {len(unknown)} unknown sample ids (first {min(len(unknown), _SHOW)}: {shown})"
        )
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"artifact annotation file {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot read artifact annotations as JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DatasetError(
            f"{path}: top level is {type(raw).__name__}; expected an object {{artifact: [ids]}}"
        )
    return raw


def _index_of(entry: Any, lookup: dict[str, int], n: int) -> int | None:
    """Row index of one annotation entry, or None when it names no sample."""
    if isinstance(entry, str):
        # "ISIC_0000005.jpg" names the sample "ISIC_0000005" too: retry without the extension.
        found = lookup.get(entry)
        return found if found is not None or "." not in entry else lookup.get(entry.rsplit(".", 1)[0])
    if isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry < n:
        return entry
    return None
