"""The scan folder: ``manifest.json``, ``items.parquet`` (the item list, fixed at the start) and
``shards/part-NNNNNN.parquet``, one per shard of ``shard_size`` consecutive items.

Resumable by construction: shard ``k`` holds exactly items ``k*S .. (k+1)*S - 1`` of the stored
list, and is written once, whole, to a temporary name and renamed (``os.replace``, atomic on one
file system). A restarted scan skips every shard whose file exists and runs the others, so each
item ends in exactly one row: no duplicates (a shard is one file, renamed over itself if a
retried worker writes it twice) and no gaps (a shard without its file is run again).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from medaudit.cli.scan.sources import Item
from medaudit.models.errors import MedauditError

SCAN_FORMAT = "medaudit.scan/1"
MANIFEST, ITEMS, SHARDS = "manifest.json", "items.parquet", "shards"
#: Manifest keys that must match for a scan to resume into an existing folder.
IDENTITY = (
    "format",
    "source",
    "version",
    "n_items",
    "items_sha256",
    "shard_size",
    "heatmaps",
    "fpr",
    "policy",
)


class ScanOutputError(MedauditError):
    """A scan folder that holds another scan, or is not a scan folder."""


def items_digest(items: Sequence[Item]) -> str:
    """sha256 over the items' ids and paths, in order: the list a scan's shards refer to."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\0{it.path}\n".encode())
    return h.hexdigest()


def row_schema(concepts: Sequence[str], heatmaps: bool) -> pa.Schema:
    """The columns of every shard: item, decode outcome, prediction, per concept score, percentile,
    presence and relevance share, the flag decision; with ``heatmaps`` the raw class heatmap
    (float16 bytes, the model's input size) and each concept's mask (PNG bytes, present only)."""
    fields = [
        pa.field("index", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("folder", pa.string()),
        pa.field("label", pa.string()),
        pa.field("group", pa.string()),
        pa.field("ok", pa.bool_()),
        pa.field("error", pa.string()),
        pa.field("format", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("pred_label", pa.string()),
        pa.field("pred_index", pa.int32()),
        pa.field("confidence", pa.float64()),
        pa.field("probabilities", pa.list_(pa.float64())),
    ]
    for c in concepts:
        fields += [
            pa.field(f"{c}_score", pa.float64()),
            pa.field(f"{c}_percentile", pa.float64()),
            pa.field(f"{c}_present", pa.bool_()),
            pa.field(f"{c}_share", pa.float64()),
        ]
    fields += [
        pa.field("flagged", pa.bool_()),
        pa.field("severity", pa.string()),
        pa.field("flag_concepts", pa.list_(pa.string())),
    ]
    if heatmaps:
        fields.append(pa.field("heatmap", pa.binary()))
        fields += [pa.field(f"{c}_mask_png", pa.binary()) for c in concepts]
    return pa.schema(fields)


class ScanFolder:
    """One scan's output folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.shards = self.root / SHARDS

    # -- manifest and items ------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.manifest_path.read_text()))
        except (OSError, ValueError) as e:
            raise ScanOutputError(f"{self.manifest_path}: not a scan manifest ({e})") from e

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def write_items(self, items: Sequence[Item]) -> None:
        cols = ("id", "path", "folder", "label", "group")
        table = pa.table({c: [getattr(it, c) for it in items] for c in cols}, schema=_ITEM_SCHEMA)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{ITEMS}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.root / ITEMS)

    def read_items(self) -> list[Item]:
        rows = pq.read_table(self.root / ITEMS).to_pylist()
        return [Item(**r) for r in rows]

    # -- shards ------------------------------------------------------------------------------
    def shard_path(self, k: int) -> Path:
        return self.shards / f"part-{k:06d}.parquet"

    def done(self) -> set[int]:
        """Shards whose file exists (written whole: see the module docstring)."""
        if not self.shards.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.shards.glob("part-*.parquet")}

    def clear_partial(self) -> None:
        """Removes temporary files a killed scan left behind (never a finished shard)."""
        if self.shards.is_dir():
            for p in self.shards.glob(".part-*.tmp-*"):
                p.unlink(missing_ok=True)

    def write_shard(self, k: int, rows: Sequence[dict[str, Any]], schema: pa.Schema) -> Path:
        """Shard ``k``'s rows as one Parquet file, written to a temporary name then renamed."""
        table = pa.Table.from_pylist(list(rows), schema=schema)
        self.shards.mkdir(parents=True, exist_ok=True)
        final = self.shard_path(k)
        tmp = self.shards / f".{final.name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        return final

    def read(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every finished shard's rows, in item order."""
        paths = sorted(self.shards.glob("part-*.parquet")) if self.shards.is_dir() else []
        if not paths:
            raise ScanOutputError(f"{self.root} holds no finished shards")
        tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in paths]
        return pa.concat_tables(tables)


_ITEM_SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("id", "path", "folder", "label", "group")],
)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
