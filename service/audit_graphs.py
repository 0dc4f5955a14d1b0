"""The screen's LRP call at fixed batch sizes, replayed as CUDA graphs where it can be.

A screen (:meth:`medaudit.service.audit.AuditEngine.screen`) is one LRP call of fixed arguments
(class seed, backward stopped at the CAV layer): on a GPU at a fixed batch size and input size,
launching its few hundred kernels from Python costs about as much as running them
(benchmarks/results/lrp_cuda_h100_graphs.md: ResNet-50 @224, batch 64, 54 ms eager against
40 ms replayed). :class:`FixedShapeScreen` cuts a batch into chunks of fixed sizes (*buckets*),
pads each chunk to its bucket by repeating its last image, runs it, and drops the pad rows; with
``capture`` each bucket's call is an :class:`~medaudit.models.xai.lrp.CapturedExplain` (captured
at its first use; exact: a replay whose z⁺ sign assumptions fail is recomputed eagerly).

Where the engine is not on CUDA, :func:`choose` picks the plain path and says why; the padded
path without capture runs on any device, which is how the CPU tests cover the cutting, padding
and dropping. The captured path itself has not run here (no GPU in this project's CI).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medaudit.models.xai.lrp import Explainer

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ScreenOut:
    """What a screen reads from its LRP call: logits (B, K), φ(x) at the CAV layer (B, C) and the
    class relevance there summed over space, float64 (B, C); all on the engine's device."""

    logits: torch.Tensor
    pooled: torch.Tensor
    class_rel: torch.Tensor

    @classmethod
    def cat(cls, outs: Sequence[ScreenOut]) -> ScreenOut:
        if len(outs) == 1:
            return outs[0]
        return cls(*(torch.cat([getattr(o, f) for o in outs]) for f in ("logits", "pooled", "class_rel")))

    def rows(self, n: int) -> ScreenOut:
        return ScreenOut(self.logits[:n], self.pooled[:n], self.class_rel[:n])


def channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Relevance (B, C, h, w) summed over space in float64 on its device (B, C) (as
    :func:`~medaudit.models.xai.concepts.relevance_share` sums it); (B, C) is returned in float64."""
    t = t.detach().to(torch.float64)
    return t.sum(dim=(2, 3)) if t.ndim == 4 else t


def screen_kwargs(layer: str) -> dict[str, object]:
    """The screen's fixed arguments of :meth:`Explainer.explain` (see ``AuditEngine.screen``)."""
    return {"cav_layers": [layer], "relevance_layers": [layer], "heatmaps": False}


def plain_screen(explainer: Explainer, layer: str, x: torch.Tensor) -> ScreenOut:
    """The screen's LRP call, eagerly, at whatever batch size ``x`` has."""
    e = explainer.explain(x, ["pred"], **screen_kwargs(layer))  # type: ignore[arg-type]
    return ScreenOut(e.logits, e.activations[layer], channel_sum(e.relevance[layer][0]))


def chunks(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """``n`` rows as ``(start, stop, bucket)`` chunks: runs of the largest bucket, and the rest in
    the smallest bucket that holds it (padded up to it)."""
    if n < 1 or not buckets or min(buckets) < 1:
        raise ValueError(f"need rows and positive buckets; got n={n}, buckets={list(buckets)}")
    sizes = sorted(set(buckets))
    big = sizes[-1]
    out = [(s, s + big, big) for s in range(0, n - n % big, big)]
    rest = n % big
    if rest:
        start = n - rest
        out.append((start, n, next(b for b in sizes if b >= rest)))
    return out


def pad_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` (B, ...) padded to ``size`` rows by repeating its last row (an image the model has
    seen in the same batch: no new input signs for the z⁺ rules' assumptions)."""
    n = x.shape[0]
    if n > size:
        raise ValueError(f"{n} rows do not fit a batch of {size}")
    return x if n == size else torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])


@dataclass(frozen=True)
class GraphChoice:
    """Which path a screen takes, and why (kept on the engine, shown by the scan and benchmarks)."""

    graphed: bool
    reason: str
    buckets: tuple[int, ...] = ()


def choose(device: torch.device, want: bool, buckets: Sequence[int]) -> GraphChoice:
    """The graphed path where it is asked for and can run (a CUDA device), else the plain one."""
    sizes = tuple(sorted(set(int(b) for b in buckets)))
    if not want:
        return GraphChoice(False, "CUDA graphs not asked for")
    if not sizes or sizes[0] < 1:
        return GraphChoice(False, f"no usable batch sizes to capture ({list(buckets)})")
    if device.type != "cuda":
        return GraphChoice(False, f"the engine runs on {device}: CUDA graphs need a CUDA device")
    if not torch.cuda.is_available():
        return GraphChoice(False, "torch sees no CUDA device")
    return GraphChoice(True, f"CUDA graphs at batch sizes {list(sizes)}", sizes)


class FixedShapeScreen:
    """The screen's LRP call at the batch sizes ``buckets`` (see the module docstring).

    Args:
        explainer: The engine's explainer (on its device).
        layer: The bank's CAV layer.
        buckets: The batch sizes every call is cut and padded to.
        capture: Replay each bucket as a CUDA graph; without it each padded chunk runs eagerly
            (what the CPU tests exercise).
    """

    def __init__(self, explainer: Explainer, layer: str, buckets: Sequence[int], *, capture: bool) -> None:
        self.explainer, self.layer, self.capture = explainer, layer, capture
        self.buckets = tuple(sorted(set(buckets)))
        chunks(1, self.buckets)  # refuses empty or non-positive buckets
        self._graphs: dict[int, Callable[[torch.Tensor], ScreenOut]] = {}
        #: Buckets whose capture failed, with the error (they run eagerly, padded).
        self.failed: dict[int, str] = {}
        self._lock = threading.Lock()  # a captured graph has one set of static buffers

    def _run(self, x: torch.Tensor) -> ScreenOut:
        size = x.shape[0]
        fn = self._graphs.get(size) if self.capture else None
        if fn is None and self.capture and size not in self.failed:
            fn = self._capture(x)
        if fn is None:
            return plain_screen(self.explainer, self.layer, x)
        return fn(x)

    def _capture(self, example: torch.Tensor) -> Callable[[torch.Tensor], ScreenOut] | None:
        size, layer = example.shape[0], self.layer
        model = self.explainer.model
        # where explain puts its input: the rule model keeps its weights as buffers, not parameters
        device = next(t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()).device
        try:
            graph = self.explainer.capture(example.to(device), ["pred"], **screen_kwargs(layer))
        except Exception as e:  # a capture that fails leaves the bucket on the eager path
            self.failed[size] = f"{type(e).__name__}: {e}"
            log.warning("screen at batch %d runs eagerly: CUDA graph capture failed (%s)", size, e)
            return None

        def replay(x: torch.Tensor) -> ScreenOut:
            e = graph(x.to(device, non_blocking=True))
            return ScreenOut(e.logits, e.activations[layer], channel_sum(e.relevance[layer][0]))

        self._graphs[size] = replay
        return replay

    def __call__(self, x: torch.Tensor) -> ScreenOut:
        outs = []
        with self._lock:
            for start, stop, size in chunks(x.shape[0], self.buckets):
                outs.append(self._run(pad_rows(x[start:stop], size)).rows(stop - start))
        return ScreenOut.cat(outs)
