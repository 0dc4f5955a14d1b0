"""One shard of a scan: files decoded, screened (or audited) by the service's engine, decided by its
flag policy, and returned as rows. The same :class:`ShardScanner` runs in this process, in a local
pool's processes and in Ray actors, so every runner gives the same rows for the same shard.

Nothing here scores or decides by itself: predictions, concept scores, percentiles, presence and
relevance shares come from :meth:`~medaudit.service.audit.AuditEngine.screen` (or
:meth:`~medaudit.service.audit.AuditEngine.audit` when heatmaps are asked for: the same scores,
tests/unit/test_screening.py), the flag decision from :func:`medaudit.service.flags.policy.evaluate`.
The engines are loaded by :func:`medaudit.service.audit_pool.load_engines`, as the auditor's lanes
load theirs.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medaudit.cli.scan.sources import Item
from medaudit.service.audit import AuditResult
from medaudit.service.audit_pool import LaneSpec, load_engines
from medaudit.service.config import DEFAULT_MODEL_NAME, version_tag
from medaudit.service.flags.policy import PolicyConfig, evaluate
from medaudit.service.inputs import Limits, decode_image, to_model_input

#: Images per engine call inside a shard (the service's auditor batches up to 32 too).
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class ScanOptions:
    """What every worker of one scan loads and does (picklable: it travels to processes and actors).

    Attributes:
        version: The version, ``vanilla`` or ``<model name>:<version>``.
        model_name: Store name of a version given without one.
        home: BentoML home of the store (``None``: ``$BENTOML_HOME``).
        fpr: Presence thresholds' false-positive rate (``None``: each bank's own).
        policy: The flag policy spec (:meth:`PolicyConfig.parse`; empty: the defaults), as the
            service's ``MEDAUDIT_FLAG_POLICY`` takes it.
        heatmaps: Audit instead of screen and keep the raw class heatmap (float16) and the masks
            of present concepts (PNG). Off by default: a screen costs a fraction of an audit.
        device: Torch device of the engine (``cpu``, ``cuda:0``).
        threads: Torch threads per worker (one LRP process per core: 1).
        batch_size: Images per engine call.
        decode_threads: Threads decoding and resizing files inside a worker (PIL and zlib release
            the GIL); more than 1 pays where the engine is on a GPU.
        max_bytes: Files larger than this are recorded as errors, not read.
        encode_threads: With ``heatmaps``, threads that binarise and PNG-encode a batch's masks
            and build its rows while the engine runs the next batch (0: in the scanning thread,
            between batches). At most ``encode_threads`` batches are queued for encoding at once.
        cuda_graphs: Screen at the fixed ``batch_size`` (the last batch of a shard padded to it)
            replayed as a CUDA graph (:meth:`~medaudit.service.audit.AuditEngine.use_screen_graphs`);
            ignored, with the reason kept, where the engine is not on CUDA.
    """

    version: str
    model_name: str = DEFAULT_MODEL_NAME
    home: str | None = None
    fpr: float | None = None
    policy: str = ""
    heatmaps: bool = False
    device: str = "cpu"
    threads: int = 1
    batch_size: int = DEFAULT_BATCH
    decode_threads: int = 1
    max_bytes: int = Limits().max_bytes
    encode_threads: int = 1
    cuda_graphs: bool = False

    @property
    def tag(self) -> str:
        return version_tag(self.version, self.model_name)

    def lane_spec(self) -> LaneSpec:
        return LaneSpec((self.tag,), self.model_name, self.home, self.fpr, self.threads, self.device)

    def on(self, device: str) -> ScanOptions:
        return replace(self, device=device)


def _decode(item: Item, size: tuple[int, int], resize: str, crop_pct: float, limits: Limits) -> Any:
    """``(pixels, format, (h, w))`` of one file at the model's input size, or the error as text."""
    try:
        with open(item.path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
        img = decode_image(data, limits=limits)  # checks the size, format, pixels
        return to_model_input(img, size, resize, crop_pct), img.source_format, img.size
    except Exception as e:  # a bad file is a row with its error, never the scan's end
        return f"{type(e).__name__}: {e}"


class ShardScanner:
    """Holds one version's engine and scans shards with it (build once per worker)."""

    def __init__(self, options: ScanOptions) -> None:
        self.options = options
        self.engine = load_engines(options.lane_spec(), warmup=False)[options.tag]
        self.policy = PolicyConfig.parse(options.policy) if options.policy else PolicyConfig()
        self.concepts = list(self.engine.bank)
        self.labels = tuple(self.engine.cfg.labels)
        self.limits = Limits(max_bytes=options.max_bytes)
        self._pool = (
            ThreadPoolExecutor(options.decode_threads, thread_name_prefix="scan-decode")
            if options.decode_threads > 1
            else None
        )
        self._encoder = (
            ThreadPoolExecutor(options.encode_threads, thread_name_prefix="scan-encode")
            if options.heatmaps and options.encode_threads > 0
            else None
        )
        #: Which path screens take (plain, or CUDA graphs at the batch size) and why.
        self.graphs = (
            self.engine.use_screen_graphs([max(1, options.batch_size)])
            if options.cuda_graphs
            else self.engine.graphs
        )

    def decoded(self, items: Sequence[Item]) -> Iterator[Any]:
        """Each item's :func:`_decode` result, in order. With decoding threads every file is
        submitted at once and yielded as its turn comes, so the threads decode the next batches
        while the engine runs this one (on a GPU the engine would otherwise wait for the host)."""
        cfg = self.engine.cfg
        args = (self.engine.size, cfg.resize, cfg.crop_pct, self.limits)
        if self._pool is None:
            yield from (_decode(it, *args) for it in items)
            return
        futures = [self._pool.submit(_decode, it, *args) for it in items]
        try:
            for f in futures:
                yield f.result()
        finally:  # a scan that stopped early leaves no decoding behind
            for f in futures:
                f.cancel()

    def scan(self, start: int, items: Sequence[Item]) -> list[dict[str, Any]]:
        """Rows of ``items`` (global positions ``start``, ``start + 1``, ...), in their order.

        The decoded images go to the engine in batches of ``batch_size``, in item order (bad
        files left out), so that every runner forms the same batches from the same shard."""
        rows = [base_row(start + k, it) for k, it in enumerate(items)]
        batch: list[tuple[int, Any]] = []
        encoding: deque[Future[None]] = deque()

        def fill(done: list[tuple[int, Any]], results: Sequence[AuditResult]) -> None:
            for (k, d), r in zip(done, results, strict=True):  # each batch its own rows
                rows[k].update(ok=True, format=d[1], height=d[2][0], width=d[2][1])
                rows[k].update(self.result_columns(r))

        def run() -> None:
            pixels, done = [d[0] for _, d in batch], list(batch)
            batch.clear()
            if not self.options.heatmaps:
                fill(done, self.engine.screen(pixels))
                return
            # the critical path: LRP, scores and the float16 heatmaps; masks and PNGs after it
            raw = self.engine.audit_raw(pixels, raw_heatmap=True, overlays=False)
            if self._encoder is None:
                fill(done, self.engine.finish(raw))
                return
            encoding.append(self._encoder.submit(lambda: fill(done, self.engine.finish(raw))))
            while len(encoding) > self.options.encode_threads:  # bounded: the oldest first
                encoding.popleft().result()

        try:
            for k, d in enumerate(self.decoded(items)):
                if isinstance(d, str):
                    rows[k]["error"] = d
                    continue
                batch.append((k, d))
                if len(batch) >= max(1, self.options.batch_size):
                    run()
            if batch:
                run()
            while encoding:
                encoding.popleft().result()
        finally:  # a failed batch leaves no encoding behind
            for f in encoding:
                f.cancel()
        return rows

    def result_columns(self, r: AuditResult) -> dict[str, Any]:
        """One result's columns: prediction, each concept's score columns, the policy's decision."""
        p = r.prediction
        decision = evaluate(r, self.policy)
        out: dict[str, Any] = {
            "pred_label": p.label,
            "pred_index": p.class_index,
            "confidence": float(p.probabilities[p.label]),
            "probabilities": [float(p.probabilities[lab]) for lab in self.labels],
            "flagged": decision.flagged,
            "severity": None if decision.severity is None else str(decision.severity),
            "flag_concepts": list(decision.concepts),
        }
        for c in r.concepts:
            out[f"{c.concept}_score"] = c.score
            out[f"{c.concept}_percentile"] = c.percentile
            out[f"{c.concept}_present"] = c.present
            out[f"{c.concept}_share"] = c.relevance_share
            if self.options.heatmaps:
                out[f"{c.concept}_mask_png"] = None if c.mask_png is None else base64.b64decode(c.mask_png)
        if self.options.heatmaps and r.heatmap is not None:
            out["heatmap"] = np.ascontiguousarray(r.heatmap, dtype="<f2").tobytes()
        return out

    def close(self) -> None:
        for pool in (self._pool, self._encoder):
            if pool is not None:
                pool.shutdown()


def base_row(index: int, item: Item) -> dict[str, Any]:
    """The columns every row has, before (or without) a result."""
    return {
        "index": index,
        "id": item.id,
        "path": item.path,
        "folder": item.folder,
        "label": item.label,
        "group": item.group,
        "ok": False,
        "error": None,
    }
