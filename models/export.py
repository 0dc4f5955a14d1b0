"""ONNX export of a model version, parity against torch, and ONNX Runtime sessions.

Predictions are served by ONNX Runtime (architecture.md, "Two engines"), so whatever a version
does at inference must be in the graph: P-ClArC's projection is a module inside the network
(:mod:`medaudit.models.corrections.pclarc`), not a Python hook, and exports with it.

The exporter is torch's TorchScript-based one (``dynamo=False``): the dynamo exporter needs
``onnxscript``, which is not a dependency of this project.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medaudit.models.errors import ExportError
from medaudit.models.registry import ModelCfg

log = logging.getLogger(__name__)

#: Largest |torch − ORT| logit difference a version may show (fp32, CPU).
PARITY_ATOL = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, cfg: ModelCfg, path: str | Path, opset: int = 17) -> Path:
    """Exports ``model`` (eval mode, fp32, CPU) with a dynamic batch axis; returns the path.

    Input ``input``: normalised images (B, 3, H, W) at ``cfg.input_size``; output ``logits`` (B, K).
    The model is exported from a CPU fp32 copy's eval-mode forward; ``model`` itself is not changed.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    dummy = torch.zeros(2, *cfg.input_size)
    tmp = p.with_suffix(".tmp.onnx")
    # nn.MultiheadAttention (torchvision's ViTs) takes a fused kernel in eval mode,
    # aten::_native_multi_head_attention, which has no ONNX symbolic: export the plain path, the
    # same function (the parity check compares the logits).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation in favour of dynamo=True
            # (which needs onnxscript, not installed), and its internals call functions torch
            # has marked deprecated; neither changes the exported graph. Only these are silenced.
            warnings.filterwarnings(
                "ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX export"
            )
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\._internal\.")
            # The tracer warns where a model reads a size as a Python number (torchvision's ViT
            # formats its input-size assert with one): the graph is then fixed to that number. The
            # batch axis stays dynamic, and check_parity runs the graph at other batch sizes.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    except Exception as e:  # the exporter raises many kinds
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {cfg.arch} to {p} failed: {e}") from e
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    tmp.replace(p)
    return p


def providers() -> list[str]:
    """ORT providers to ask for: CUDA only if ORT has it **and** torch sees a GPU, then CPU.

    ``onnxruntime-gpu`` lists CUDA (and TensorRT) as available even on a machine without a GPU;
    asking for them there logs CUDA errors, so they are requested only when a GPU exists.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


def ort_session(path: str | Path, threads: int = 0) -> Any:
    """An ``onnxruntime.InferenceSession`` with explicitly chosen providers (see :func:`providers`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    # No busy-waiting between runs: served, the predictor shares the cores with the entry service,
    # the LRP auditor and (in benchmarks) the load generator, and spinning threads take their CPU.
    # Alone it costs nothing measurable (batch 8 on 2 cores: 46.7 ms without, 47.0 ms with).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers())
    except Exception as e:  # ORT raises its own exception types
        raise ExportError(f"cannot load ONNX model {path}: {e}") from e


@dataclass(frozen=True)
class Parity:
    """Result of :func:`check_parity`.

    Attributes:
        max_abs_diff: max |torch − ORT| over all logits of all images.
        n_images: Images compared.
        atol: The tolerance it was checked against.
        providers: The ORT providers the session used.
    """

    max_abs_diff: float
    n_images: int
    atol: float
    providers: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def check_parity(
    model: nn.Module,
    cfg: ModelCfg,
    path: str | Path,
    images: torch.Tensor,
    *,
    atol: float = PARITY_ATOL,
    batch_size: int = 32,
    strict: bool = True,
) -> Parity:
    """Compares torch and ORT logits on ``images`` (uint8 or [0, 1] float, N×3×H×W).

    Raises:
        ExportError: with ``strict``, when the max abs difference exceeds ``atol``.
    """
    sess = ort_session(path)
    model.eval()
    worst = 0.0
    for i in range(0, len(images), batch_size):
        x = cfg.normalize(images[i : i + batch_size]).float()
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        worst = max(worst, float(np.max(np.abs(ref - got))))
    res = Parity(max_abs_diff=worst, n_images=len(images), atol=atol, providers=tuple(sess.get_providers()))
    if strict and not res.ok:
        raise ExportError(f"ONNX parity failed for {path}: max |torch − ORT| = {worst:.3g} > {atol:g}")
    return res
