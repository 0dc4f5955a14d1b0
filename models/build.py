"""One model version of the offline build: correct → save → export → check → evaluate → card.

:func:`correct_and_evaluate` runs once per correction; the pipeline
(:func:`medaudit.models.pipeline.build`) supplies the original model, the :class:`CorrectionData`
(CAVs and μ0 from the original model's activations) and the
:class:`~medaudit.models.evaluate.EvalData` shared by all versions, and compares the returned cards with
:func:`medaudit.models.cards.comparison_markdown` / :func:`medaudit.models.cards.comparison_table`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medaudit.models.cards import ModelCard, build_card
from medaudit.models.corrections.base import Correction, CorrectionData
from medaudit.models.corrections.io import save_version
from medaudit.models.evaluate import EvalData, evaluate_version
from medaudit.models.export import check_parity, export_onnx
from medaudit.models.registry import ModelCfg

WEIGHTS_FILE, ONNX_FILE = "model.pt", "model.onnx"
#: The CAV TCAV measures each version with (method.md §7 ``measure_tcav.py``: the config's
#: ``direction_mode``, ``signal`` for the ClArC configs, default ``svm`` for Vanilla and RRR).
TCAV_KIND = {"pclarc": "signal", "rpclarc": "signal", "rrclarc": "signal"}


@dataclass(frozen=True, eq=False)
class VersionResult:
    """What :func:`correct_and_evaluate` produced for one version."""

    version: str
    model: nn.Module
    card: ModelCard
    directory: Path
    weights_path: Path
    onnx_path: Path


def version_name(correction: Correction, artifact: str) -> str:
    """``vanilla`` for the original model, else ``<correction>-<artifact>`` (architecture.md)."""
    return "vanilla" if correction.name == "vanilla" else f"{correction.name}-{artifact}"


def recorded_params(correction: Correction, data_info: Mapping[str, Any]) -> dict[str, Any]:
    """The correction's parameters as its weights and card record them: a correction fitted on
    artifact masks (RRR) names the masks the data had, ground truth or derived from concepts."""
    params = dict(correction.params)
    if "masks" in params:
        params["masks"] = data_info.get("mask_source", params["masks"])
    return params


def correct_and_evaluate(
    model: nn.Module,
    cfg: ModelCfg,
    correction: Correction,
    data: CorrectionData,
    eval_data: EvalData,
    out_dir: str | Path,
    *,
    model_name: str = "resnet18-synthderm",
    data_info: Mapping[str, Any] | None = None,
    parity_images: torch.Tensor | None = None,
    opset: int = 17,
    log: Callable[[str], None] | None = None,
) -> VersionResult:
    """Applies ``correction`` and writes ``out_dir/<version>/{model.pt, model.onnx, card.json, card.md}``.

    Args:
        model: The original model (not modified).
        cfg: Its registry config.
        correction: Any :class:`Correction`.
        data: CAVs, μ0 and training data for the correction.
        eval_data: Test sets, artifact samples and the original CAV for the evaluation.
        out_dir: Parent directory of the version directories.
        model_name: The model's name (a spec's, or ``<arch>-synthderm``); the card is named
            ``<model_name>:<version>``.
        data_info: Data configuration for the card (default: ``eval_data.info``).
        parity_images: Images for the ONNX parity check (default: the first 64 clean test images, or
            of the first test set where there is no clean one).
        opset: ONNX opset.
        log: Optional progress logger.
    """
    version = version_name(correction, data.artifact)
    info = dict(data_info if data_info is not None else eval_data.info)
    params = recorded_params(correction, info)
    directory = Path(out_dir) / version
    directory.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    fit = getattr(correction, "fit", None)
    extra: dict[str, Any] = {}
    if callable(fit):
        net, flog, lamb = fit(model, cfg, data, log)
        extra = {"lamb_resolved": lamb, "steps": flog.steps, "history": flog.history}
    else:
        net = correction.apply(model, cfg, data)
    extra["seconds"] = round(time.perf_counter() - t0, 2)
    say(f"{version}: corrected in {extra['seconds']} s")
    weights = save_version(
        net,
        cfg,
        directory / WEIGHTS_FILE,
        correction=correction.name,
        layer=data.layer,
        params=params,
    )
    onnx_path = export_onnx(net, cfg, directory / ONNX_FILE, opset=opset)
    first = eval_data.sets.get("clean") or next(iter(eval_data.sets.values()))
    images = parity_images if parity_images is not None else first.images[:64]
    parity = check_parity(net, cfg, onnx_path, images)
    say(f"{version}: ONNX parity {parity.max_abs_diff:.2g}")
    report = evaluate_version(net, cfg, eval_data, tcav_kind=TCAV_KIND.get(correction.name, "svm"))
    card = build_card(
        name=f"{model_name}:{version}",
        version=version,
        architecture=cfg.to_dict(),
        data=info,
        correction={
            "name": correction.name,
            "layer": data.layer if correction.name != "vanilla" else "",
            "cav_kind": "signal",
            "artifact": data.artifact,
            "params": params,
            **extra,
        },
        metrics=report.as_dict(),
        weights_path=weights,
        onnx_path=onnx_path,
        parity={**asdict(parity), "providers": list(parity.providers)},
        opset=opset,
    )
    card.save(directory)
    say(f"{version}: card written to {directory}")
    return VersionResult(version, net, card, directory, weights, onnx_path)
