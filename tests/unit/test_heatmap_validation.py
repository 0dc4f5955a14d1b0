"""Heatmaps of a model family whose LRP rules are not validated are withheld, never shown blank.

The served engine (tier 1, no transport) on the tiny random resnet18 version, once as it is and
once with its family taken off the validated table: same prediction and scores, no heatmap, no
masks, a note saying why in the answer, and a warning when the engine is built.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medaudit.models.registry import get_cfg, list_models
from medaudit.models.xai import validation
from medaudit.service.audit import AuditEngine, AuditResult


def test_every_registry_family_is_validated_and_others_are_refused_by_name() -> None:
    assert all(validation.heatmap_refusal(get_cfg(n).canonizer) is None for n in list_models())
    note = validation.heatmap_refusal("swin")
    assert note is not None and "'swin'" in note and "vit" in note and "not validated" in note


def test_an_unvalidated_family_gets_no_heatmap_and_a_note(
    tiny_loaded: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    images = list(np.random.default_rng(3).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8))
    shown = AuditEngine(tiny_loaded, ort_threads=1).audit(images, raw_heatmap=True)  # type: ignore[arg-type]
    assert all(r.heatmap_png and r.heatmap is not None and r.heatmap_note is None for r in shown)
    assert any(c.mask_png for r in shown for c in r.concepts)  # masks there to withhold
    assert "heatmap_note" not in shown[0].to_json()

    family = tiny_loaded.cfg.canonizer  # type: ignore[attr-defined]
    monkeypatch.setattr(
        validation, "VALIDATED", {k: v for k, v in validation.VALIDATED.items() if k != family}
    )
    with caplog.at_level(logging.WARNING, logger="medaudit.service.audit"):
        engine = AuditEngine(tiny_loaded, ort_threads=1)  # type: ignore[arg-type]
    assert any(
        "not validated" in r.getMessage() and "resnet18-synthderm:vanilla" in r.getMessage()
        for r in caplog.records
    )
    withheld = engine.audit(images, raw_heatmap=True)
    for a, b in zip(shown, withheld, strict=True):
        assert b.heatmap_png is None and b.heatmap is None and all(c.mask_png is None for c in b.concepts)
        assert b.heatmap_note is not None and f"{family!r}" in b.heatmap_note
        assert b.prediction == a.prediction
        assert [(c.score, c.present, c.relevance_share) for c in b.concepts] == [
            (c.score, c.present, c.relevance_share) for c in a.concepts
        ]
        body = b.to_json()
        assert body["heatmap_png"] is None and body["heatmap_note"] == b.heatmap_note
        assert AuditResult.from_json(body).heatmap_note == b.heatmap_note
