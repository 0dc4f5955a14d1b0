"""A scan from start to finish: list (or read back) the items, check a resumed folder, run the
shards not yet done on a runner, write each as it arrives, and close the manifest with totals."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from medaudit.cli.scan.output import (
    IDENTITY,
    SCAN_FORMAT,
    ScanFolder,
    ScanOutputError,
    items_digest,
    row_schema,
)
from medaudit.cli.scan.runners import InProcessRunner, LocalPoolRunner, RayRunner, Runner, Shard
from medaudit.cli.scan.sources import list_source
from medaudit.cli.scan.worker import ScanOptions

#: Items per shard: the unit of resumption and of work handed to a worker.
DEFAULT_SHARD_SIZE = 256


@dataclass(frozen=True)
class ScanSummary:
    """What one call of :func:`scan` did."""

    out: Path
    n_items: int
    n_shards: int
    shards_skipped: int
    shards_run: int
    n_ok: int
    n_errors: int
    n_flagged: int
    seconds: float
    runner: str

    @property
    def images_per_s(self) -> float:
        run = self.n_items * self.shards_run / max(self.n_shards, 1)
        return run / self.seconds if self.seconds > 0 else 0.0


def describe_version(options: ScanOptions) -> dict[str, Any]:
    """The version's labels, concepts, layer and presence thresholds, read (verified) from the store
    before any worker starts: an unknown version fails here, once, with the store's error."""
    from medaudit.service.store import load_version

    loaded = load_version(options.tag, home=options.home)
    bank = loaded.bank
    fpr = bank.target_fpr if options.fpr is None else options.fpr
    return {
        "version": loaded.tag,
        "labels": list(loaded.cfg.labels),
        "concepts": list(bank),
        "layer": bank.layer,
        "input_size": list(loaded.cfg.input_size),
        "thresholds": {c: float(bank.threshold(c, fpr)) for c in bank},
        "presence_fpr": fpr,
    }


def make_runner(options: ScanOptions, workers: int, ray: str | None) -> Runner:
    """``ray`` set: :class:`RayRunner` at that address; else ``workers`` 0: in this process, or a
    local pool of ``workers`` processes."""
    if ray:
        return RayRunner(options, workers, ray)
    if workers == 0:
        return InProcessRunner(options)
    return LocalPoolRunner(options, workers)


def scan(
    source: str,
    out: str | Path,
    options: ScanOptions,
    *,
    workers: int = 0,
    ray: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    on_shard: Callable[[int, Runner], None] | None = None,
    runner: Runner | None = None,
) -> ScanSummary:
    """Scans ``source`` into ``out`` (see :mod:`medaudit.cli.scan`), resuming what is there.

    Args:
        source: A folder, a list file or a dataset spec (:func:`.sources.list_source`).
        out: The scan folder; if it holds a scan of the same source, version and options, only
            its missing shards run.
        options: What each worker loads and computes.
        workers: Local processes (0: in this process), or Ray actors (0: one per CPU/GPU).
        ray: ``local``, ``auto`` or a cluster address to run on Ray; ``None``: no Ray.
        shard_size: Items per shard (fixed by the first run of a folder).
        progress: ``start(done, total) -> advance(n)``; advanced by each finished shard's rows.
        on_shard: Called after each shard is written, with the shard and the runner.
        runner: Run on this runner instead of building one (kept open; benchmarks reuse one).

    Raises:
        ScanSourceError: A source with nothing to scan.
        ScanOutputError: ``out`` holds another scan.
        ScanRunError: Workers kept dying (what finished is kept).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    folder = ScanFolder(out)
    started = time.perf_counter()
    if folder.exists():
        manifest = folder.read_manifest()
        items = folder.read_items()
        want = {"source": source, "version": options.tag, "heatmaps": options.heatmaps}
        want |= {"fpr": options.fpr, "policy": options.policy, "format": SCAN_FORMAT}
        differ = {k: (manifest.get(k), v) for k, v in want.items() if manifest.get(k) != v}
        if differ:
            raise ScanOutputError(
                f"{folder.root} holds a scan of other settings ("
                + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                + "); choose another --out, or delete that folder to start over"
            )
        shard_size = int(manifest["shard_size"])
        folder.clear_partial()
    else:
        items = list_source(source)
        manifest = {
            "format": SCAN_FORMAT,
            "source": source,
            "version": options.tag,
            "n_items": len(items),
            "items_sha256": items_digest(items),
            "shard_size": shard_size,
            "heatmaps": options.heatmaps,
            "fpr": options.fpr,
            "policy": options.policy,
            **{k: v for k, v in describe_version(options).items() if k != "version"},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "complete": False,
        }
        assert set(IDENTITY) <= set(manifest)
        folder.write_items(items)
        folder.write_manifest(manifest)
    n = len(items)
    n_shards = (n + shard_size - 1) // shard_size
    done = folder.done() & set(range(n_shards))
    todo: list[Shard] = [
        (k, k * shard_size, items[k * shard_size : (k + 1) * shard_size])
        for k in range(n_shards)
        if k not in done
    ]
    schema = row_schema(manifest["concepts"], options.heatmaps)
    advance = progress(sum(min(shard_size, n - k * shard_size) for k in done), n) if progress else None
    own = runner is None
    name = "(nothing to run)"
    if todo:
        active = runner or make_runner(options, workers, ray)
        name = active.name
        try:
            for k, rows in active.run(todo):
                folder.write_shard(k, rows, schema)
                if advance is not None:
                    advance(len(rows))
                if on_shard is not None:
                    on_shard(k, active)
        finally:
            if own:
                active.close()
    seconds = time.perf_counter() - started
    totals = folder.read(["ok", "flagged"])
    ok = int(pc.sum(totals["ok"]).as_py() or 0)
    flagged = int(pc.sum(pc.fill_null(totals["flagged"], False)).as_py() or 0)
    errors = totals.num_rows - ok  # of the finished shards' rows
    summary = ScanSummary(Path(out), n, n_shards, len(done), len(todo), ok, errors, flagged, seconds, name)
    manifest.update(
        complete=len(folder.done() & set(range(n_shards))) == n_shards,
        n_ok=ok,
        n_errors=errors,
        n_flagged=flagged,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    folder.write_manifest(manifest)
    return summary
