"""Saving and loading corrected model versions.

A version checkpoint is the registry's checkpoint format (``state_dict`` + ``cfg``) plus a
``correction`` record ``{"name", "layer", "params", "reactive"}``. Fine-tuned versions (RR-ClArC,
RRR, Vanilla) load with plain :func:`medaudit.models.registry.build_architecture`; P-ClArC versions carry the
projection's buffers in the state dict and load with :func:`load_version`, which re-inserts the
projection before loading the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medaudit.models.corrections.projection import ClarcProjection, find_projection, insert_projection
from medaudit.models.errors import WeightsError
from medaudit.models.registry import ModelCfg, build_architecture, load_checkpoint_file


def save_version(
    model: nn.Module, cfg: ModelCfg, path: str | Path, *, correction: str, layer: str, params: dict[str, Any]
) -> Path:
    """Writes ``model`` (corrected or not) as a version checkpoint; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    proj = find_projection(model, cfg, layer) if layer else None
    record = {
        "name": correction,
        "layer": layer,
        # round-trip through JSON so the checkpoint holds plain types only (weights_only=True loads)
        "params": json.loads(json.dumps(params)),
        "projection": proj is not None,
        "reactive": bool(proj is not None and proj.reactive),
    }
    tmp = p.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "cfg": cfg.to_dict(), "correction": record}, tmp)
    tmp.replace(p)
    return p


def load_version(path: str | Path) -> tuple[nn.Module, ModelCfg, dict[str, Any]]:
    """Loads a version checkpoint written by :func:`save_version`: ``(model in eval mode, cfg, record)``."""
    ckpt = load_checkpoint_file(path)
    try:
        cfg = ModelCfg.from_dict(ckpt["cfg"])
        record = dict(
            ckpt.get("correction") or {"name": "vanilla", "layer": "", "params": {}, "projection": False}
        )
        state = ckpt["state_dict"]
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{path} is not a medaudit version checkpoint: missing {e}") from e
    model = build_architecture(cfg)
    if record.get("projection"):
        layer = record["layer"]
        key = next(
            (k for k in state if k.endswith(".v") and f"{k[:-2]}.mu0" in state and f"{k[:-2]}.gate" in state),
            None,
        )
        if key is None:
            raise WeightsError(
                f"{path} says it holds a ClArC projection at {layer!r}, but its state has none"
            )
        n = state[key].numel()
        gate = torch.zeros(n) if record.get("reactive") else None
        insert_projection(model, cfg, layer, ClarcProjection(torch.zeros(n), 0.0, gate=gate))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"checkpoint {path} does not fit {cfg.arch}: {e}") from e
    return model.eval(), cfg, record
