"""The classifier a data command works with: a model spec (``--model``) or a medaudit checkpoint
(``--weights``), loaded once, and checked against the dataset's classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from torch import nn

    from medaudit.models.registry import ModelCfg

MODEL_OPT = typer.Option(None, "--model", help="Model spec (TOML) of the classifier (docs/models.md).")
WEIGHTS_OPT = typer.Option(None, "--weights", help="Or a checkpoint written by medaudit train.")


def load_classifier(model: Path | None, weights: Path | None) -> tuple[nn.Module, ModelCfg, str]:
    """(network in eval mode, its config, a version name for provenance).

    Raises:
        typer.BadParameter: Neither or both of ``model`` and ``weights``.
        MedauditError: A bad spec or checkpoint.
    """
    if (model is None) == (weights is None):
        raise typer.BadParameter("give the classifier: --model SPEC (a model spec) or --weights FILE")
    if model is not None:
        from medaudit.models.spec import build, load_spec

        spec = load_spec(model)
        net, cfg, _digest = build(spec)
        return net.eval(), cfg, f"{spec.name}:original"
    from medaudit.models.registry import create_model, load_checkpoint_file

    assert weights is not None
    ckpt = load_checkpoint_file(weights)
    net, cfg = create_model((ckpt.get("cfg") or {}).get("arch", "resnet18"), weights=weights)
    try:
        tag = str(json.loads((weights.parent / "card.json").read_text()).get("version", "vanilla"))
    except (OSError, ValueError):
        tag = "vanilla"
    return net.eval(), cfg, f"{weights.parent.name}:{tag}"


def check_classes(cfg: ModelCfg, ds: Any) -> str | None:
    """None when the model's labels are the dataset's; a note when only their number agrees.

    Raises:
        ConfigError: The model and the dataset have different numbers of classes.
    """
    from medaudit.models.errors import ConfigError

    have, want = tuple(ds.label_names), tuple(cfg.labels)
    if len(have) != len(want):
        raise ConfigError(f"the dataset has {len(have)} classes {have}, the model {len(want)} {want}")
    if have != want:
        return f"class names differ (dataset {', '.join(have)}; model {', '.join(want)}): matched by position"
    return None


def parse_list(value: str | None) -> list[str]:
    """``"a,b"`` -> ["a", "b"]; None or "" -> []."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]
