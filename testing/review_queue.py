"""A review queue of synthetic flags, written the way the worker writes them (tests, benchmarks).

:func:`seed_flags` builds :class:`~medaudit.service.flags.events.FlagEvent` objects with varied
concepts, severities, versions and times and hands them to
:meth:`~medaudit.service.flags.worker.Worker.write_review`, the worker's own write: the records and
the open index are exactly what a served deployment's queue holds, minus the blobs unless asked.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import redis

    from medaudit.service.flags.events import FlagEvent, FlagKeys

SEVERITIES = ("low", "medium", "high")
DAY_MS = 86_400_000


def synthetic_events(
    n: int,
    *,
    concepts: Sequence[str] = ("band_aid", "ruler", "skin_marker"),
    versions: Sequence[str] = ("vanilla", "pclarc-band_aid"),
    start_ms: int = 1_780_000_000_000,
    span_days: int = 30,
    subjects: int = 0,
    seed: int = 0,
    prefix: str = "syn",
) -> list[FlagEvent]:
    """``n`` flag events spread over ``span_days`` from ``start_ms``, oldest first.

    Args:
        subjects: Draw a subject hash from this many subjects (0: none, like a request without
            ``X-Subject-Key``).
    """
    from datetime import UTC, datetime

    from medaudit.service.flags.events import FlagEvent, subject_hash

    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(start_ms, start_ms + span_days * DAY_MS, size=n))
    out = []
    for i, t in enumerate(times):
        concept = concepts[int(rng.integers(len(concepts)))]
        rid = f"{prefix}-{i:06d}"
        score = float(rng.normal(2.0, 1.0))
        out.append(
            FlagEvent(
                flag_id=f"{rid}:{concept}",
                request_id=rid,
                created_at=datetime.fromtimestamp(int(t) / 1000, UTC).isoformat(timespec="milliseconds"),
                created_ms=int(t),
                model_version=versions[int(rng.integers(len(versions)))],
                layer="layer4",
                concept=concept,
                score=score,
                threshold=1.0,
                percentile=float(rng.uniform(90.0, 100.0)),  # percent, as the engine gives it
                relevance_share=float(rng.uniform(0.2, 0.8)),
                severity=SEVERITIES[int(rng.integers(3))],
                reasons=(f"{concept} present (score {score:.2f} above 1.00)",),
                label=("benign", "malignant")[int(rng.integers(2))],
                probability=float(rng.uniform(0.5, 1.0)),
                subject_hash=subject_hash(f"subject-{int(rng.integers(subjects))}") if subjects else "",
                corrected_disagrees=("", "0", "1")[int(rng.integers(3))],
            )
        )
    return out


def seed_flags(
    client: redis.Redis, keys: FlagKeys, events: Sequence[FlagEvent], *, images: bool = False
) -> int:
    """Writes ``events`` as open review records through the worker's write; returns how many.

    With ``images``, each flag also gets a small heatmap and mask PNG (random, 32 px) under the
    blob keys the producer would use, with a one-day TTL.
    """
    from dataclasses import replace

    from PIL import Image

    from medaudit.service.flags.worker import Worker, WorkerConfig

    worker = Worker(client, keys, WorkerConfig(consumer="seed"))
    rng = np.random.default_rng(0)
    written = 0
    for i, ev in enumerate(events):
        if images:
            heat, mask = keys.blob(ev.request_id, "heatmap"), keys.blob(ev.request_id, f"mask:{ev.concept}")
            rgb = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
            m = np.zeros((32, 32), np.uint8)
            m[4 + i % 8 : 16 + i % 8, 6:20] = 255
            for key, arr in ((heat, rgb), (mask, m)):
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                client.set(key, buf.getvalue(), ex=DAY_MS // 1000)
            ev = replace(ev, heatmap_key=heat, mask_key=mask)
        written += worker.write_review(ev, f"0-{i + 1}")
    return written
