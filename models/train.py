"""Base training: seeded, class-weighted, resumable, with a progress bar and a model card.

Departures from the paper's recipe (method.md §8, §9), on purpose:

* augmentations run on images in [0, 1] **before** normalisation; the paper applies them after
  ``Normalize``, where torchvision's ColorJitter clamps away the negative half of the range
  (method.md §8, §11.12);
* no ImageNet pre-training (nothing can be downloaded here) and a short Adam schedule with cosine
  decay sized for 2 CPU cores instead of 300 epochs of MultiStepLR.

Class weights are the paper's ``max_j n_j / n_k`` (method.md §8).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.registry import ModelCfg, create_model

Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet18"
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 0  # 0: torch's default
    augment: bool = True
    data: SynthDermConfig = field(default_factory=SynthDermConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = self.data.to_dict()
        return d


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``w_k = max_j n_j / n_k`` (method.md §8); an empty class gets weight 0."""
    n = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(n > 0, n.max() / np.maximum(n, 1), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips, 90° rotations and mild brightness/contrast jitter, on [0, 1] images."""
    B, dev = x.shape[0], x.device
    flip_h = (torch.rand(B, generator=g) < 0.5).to(dev)
    flip_v = (torch.rand(B, generator=g) < 0.5).to(dev)
    x = torch.where(flip_h.view(B, 1, 1, 1), x.flip(3), x)
    x = torch.where(flip_v.view(B, 1, 1, 1), x.flip(2), x)
    if x.shape[2] == x.shape[3]:
        rot = (torch.rand(B, generator=g) < 0.5).to(dev)
        x = torch.where(rot.view(B, 1, 1, 1), x.transpose(2, 3), x)
    b = ((torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 0.2).to(dev)
    c = (1 + (torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 0.2).to(dev)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * c + m + b).clamp_(0, 1)


def render_split(
    ds: SynthDerm,
    split: str,
    variant: str = "ch",
    attack: str = "band_aid",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as ``(uint8 N×3×H×W, int64 labels)``, cached as .npz keyed by the data config."""
    return render_splits(ds, split, (variant,), attack, cache_dir, progress)[variant]


def render_splits(
    ds: SynthDerm,
    split: str,
    variants: tuple[str, ...],
    attack: str = "band_aid",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`render_split` of several variants of one split; the variants not cached are rendered
    in one pass (:meth:`SynthDerm.variant_arrays`: each image's background and lesion once), each
    into its own cache file."""
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    paths: dict[str, Path | None] = {}
    for variant in variants:
        key = hashlib.sha256(
            json.dumps([ds.cfg.to_dict(), split, variant, attack], sort_keys=True).encode()
        ).hexdigest()[:16]
        path = paths[variant] = cache_dir / f"synthderm-{split}-{variant}-{key}.npz" if cache_dir else None
        if path is not None and path.exists():
            with np.load(path) as z:
                arrays[variant] = (z["X"], z["y"])
    missing = tuple(v for v in dict.fromkeys(variants) if v not in arrays)
    if missing:
        adv = progress(f"render {split}/{'+'.join(missing)}", len(ds.indices(split))) if progress else None
        Xs, y = ds.variant_arrays(split, missing, attack, progress=adv)
        for variant in missing:
            arrays[variant] = (Xs[variant], y)
            path = paths[variant]
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, X=Xs[variant], y=y)
                tmp.replace(path)
    return {  # in the order asked for
        v: (torch.from_numpy(arrays[v][0]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(arrays[v][1]))
        for v in dict.fromkeys(variants)
    }


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, cfg: ModelCfg, batch_size: int = 128) -> torch.Tensor:
    """Logits for uint8 images, in batches."""
    model.eval()
    dev = next(model.parameters()).device
    out = [model(cfg.normalize(X[i : i + batch_size].to(dev))).cpu() for i in range(0, len(X), batch_size)]
    return torch.cat(out)


def shared_rows(images: torch.Tensor, earlier: Sequence[torch.Tensor]) -> torch.Tensor:
    """``src[i]``: the index of the first earlier tensor whose row i equals ``images[i]`` byte for
    byte (same shape required), or −1.

    The variants of a split share indices (method.md §5.4): row i of "clean" is row i of "ch"
    without its artifacts and row i of "attacked" is row i of "clean" with the artifact, so every
    "ch" row that carries no artifact is byte-identical in "clean" and every one that carries only
    the attack's artifact is identical in "attacked" (464 of synthderm's 1200 clean + attacked test
    rows). In eval mode a row's outputs do not depend on its batch, so such rows can reuse the
    earlier outputs (equal up to float round-off of a different batch composition).
    """
    n = len(images)
    src = torch.full((n,), -1, dtype=torch.long)
    flat = images.reshape(n, -1)
    for j, prev in enumerate(earlier):
        rows = torch.nonzero(src < 0).flatten()
        if prev.shape != images.shape or not len(rows):
            continue
        src[rows[(flat[rows] == prev.reshape(n, -1)[rows]).all(1)]] = j
    return src


Out = TypeVar("Out", torch.Tensor, np.ndarray)


def reusing(
    images: torch.Tensor, done: list[tuple[torch.Tensor, Out]], compute: Callable[[torch.Tensor], Out]
) -> Out:
    """``compute(images)`` (one output row per image, a tensor or an array), computed only for the
    rows no earlier entry of ``done`` shares (:func:`shared_rows`); the others are copied. ``done``
    holds ``(images, outputs)`` of earlier calls and gets this call's appended."""
    src = shared_rows(images, [d[0] for d in done])
    todo = src < 0
    out: Any
    if bool(todo.all()):
        out = compute(images)
    else:
        first: Any = done[int(src[~todo][0])][1]
        tensors = isinstance(first, torch.Tensor)

        def rows(mask: torch.Tensor) -> Any:  # a mask that indexes the outputs' type
            return mask if tensors else mask.numpy()

        shape = (len(images), *first.shape[1:])
        out = first.new_empty(shape) if isinstance(first, torch.Tensor) else np.empty(shape, first.dtype)
        for j, (_, prev) in enumerate(done):
            out[rows(src == j)] = prev[rows(src == j)]
        if bool(todo.any()):
            out[rows(todo)] = compute(images[todo])
    done.append((images, out))
    return out


def predict_reusing(
    model: nn.Module, X: torch.Tensor, cfg: ModelCfg, done: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """:func:`predict` through :func:`reusing`: rows an earlier variant in ``done`` shares byte for
    byte are not forwarded again."""
    return reusing(X, done, lambda x: predict(model, x, cfg))


def accuracy_report(logits: torch.Tensor, y: torch.Tensor, labels: tuple[str, ...]) -> dict[str, float]:
    pred = logits.argmax(1)
    rep = {"accuracy": float((pred == y).float().mean())}
    for k, name in enumerate(labels):
        sel = y == k
        rep[f"accuracy_{name}"] = float((pred[sel] == k).float().mean()) if sel.any() else float("nan")
    return rep


def train(
    tcfg: TrainConfig,
    out_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train (or resume) the base model and write ``model.pt`` and ``card.json`` into ``out_dir``.

    Returns the model card. Re-running with the same config resumes from the last finished epoch
    and, once all epochs are done, only re-reads the card.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # model.pt holds weights + configs (what serving and corrections load); train_state.pt the
    # optimizer/scheduler state for resuming (and for fine-tunes that reuse it, method.md §11.9).
    ckpt_path, state_path, card_path = out / "model.pt", out / "train_state.pt", out / "card.json"
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    ds = SynthDerm(tcfg.data)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    Xtr, ytr = render_split(ds, "train", cache_dir=cache, progress=progress)
    model, mcfg = create_model(tcfg.arch, img_size=tcfg.data.size, labels=tuple(ds.label_names))
    model = model.to(device=torch.device(device), memory_format=torch.channels_last)  # type: ignore[call-overload]
    # foreach: the multi-tensor AdamW, bit-identical to torch's CPU default (a Python loop over the
    # 62 tensors) and ~30 % cheaper per step (tests/unit/test_train.py checks the identity).
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, foreach=True)
    steps_per_epoch = math.ceil(len(Xtr) / tcfg.batch_size)
    total = steps_per_epoch * tcfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / steps_per_epoch) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
    )
    start_epoch, history = 0, []
    if ckpt_path.exists() and state_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        opt_state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("train_cfg") == tcfg.to_dict() and opt_state.get("epoch") == state.get("epoch"):
            model.load_state_dict(state["state_dict"])
            opt.load_state_dict(opt_state["optimizer"])
            sched.load_state_dict(opt_state["scheduler"])
            start_epoch, history = int(state["epoch"]), list(state.get("history", []))
            log(f"resuming {ckpt_path} at epoch {start_epoch}/{tcfg.epochs}")
        else:
            log(f"{ckpt_path} was trained with another config; starting over")
    if start_epoch >= tcfg.epochs and card_path.exists():
        return json.loads(card_path.read_text())
    weights = class_weights(ytr.numpy(), mcfg.num_classes).to(device)
    t0 = time.perf_counter()
    for epoch in range(start_epoch, tcfg.epochs):
        # one generator per epoch, so a resumed run shuffles and augments exactly as an
        # uninterrupted one would
        g = torch.Generator().manual_seed(tcfg.seed * 100_003 + epoch)
        model.train()
        perm = torch.randperm(len(Xtr), generator=g)
        adv = progress(f"epoch {epoch + 1}/{tcfg.epochs}", steps_per_epoch) if progress else None
        run_loss = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * tcfg.batch_size : (s + 1) * tcfg.batch_size]
            x = Xtr[idx].to(device).float().div_(255)
            if tcfg.augment:
                x = augment(x, g)
            x = mcfg.normalize(x).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), ytr[idx].to(device), weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            if adv:
                adv(1)
        history.append({"epoch": epoch + 1, "loss": run_loss / steps_per_epoch})
        _atomic_save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1}, state_path
        )
        _atomic_save(
            {
                "state_dict": model.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "cfg": mcfg.to_dict(),
                "train_cfg": tcfg.to_dict(),
            },
            ckpt_path,
        )
    train_seconds = time.perf_counter() - t0
    card = evaluate_base(model, mcfg, ds, cache, progress=progress)
    card.update(
        {
            "arch": tcfg.arch,
            "version": "vanilla",
            "train_config": tcfg.to_dict(),
            "model_config": mcfg.to_dict(),
            "train_seconds_this_run": round(train_seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "history": history,
            "weights_sha256": sha256_file(ckpt_path),
        }
    )
    card_path.write_text(json.dumps(card, indent=2))
    return card


def evaluate_base(
    model: nn.Module,
    mcfg: ModelCfg,
    ds: SynthDerm,
    cache: Path | None,
    attack: str = "band_aid",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy on the three test variants (method.md §5.4) and the shortcut's size: the largest
    clean→attacked accuracy drop of a class (malignant for band-aids on the binary data).

    Rows a variant shares byte for byte with an earlier one are not forwarded again
    (:func:`predict_reusing`, as ``medaudit.models.evaluate.evaluate_version`` does: 464 of synthderm's
    1200 clean + attacked test rows).
    """
    res: dict[str, Any] = {}
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images, logits) of earlier variants
    sets = render_splits(ds, "test", ("ch", "clean", "attacked"), attack, cache, progress)
    for variant, (X, y) in sets.items():
        res[variant] = accuracy_report(predict_reusing(model, X, mcfg, done), y, mcfg.labels)
    drops = {
        k: res["clean"][f"accuracy_{k}"] - res["attacked"][f"accuracy_{k}"]
        for k in mcfg.labels
        if math.isfinite(res["clean"][f"accuracy_{k}"]) and math.isfinite(res["attacked"][f"accuracy_{k}"])
    }
    victim = max(drops, key=lambda k: drops[k]) if drops else mcfg.labels[-1]
    res["shortcut"] = {
        "artifact": attack,
        "class": victim,
        "clean_minus_attacked_points": round(100 * drops.get(victim, float("nan")), 2),
    }
    if "malignant" in drops:  # the binary demo's card key, which earlier cards carry
        res["shortcut"]["malignant_clean_minus_attacked_points"] = round(100 * drops["malignant"], 2)
    return {"test": res}


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write then rename, so a kill mid-save never leaves a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hidden_artifact_config(
    base: TrainConfig, artifact: str = "timestamp", rates: tuple[float, float] = (0.1, 0.0)
) -> TrainConfig:
    """``base`` with ``artifact`` planted at ``rates`` (fraction of benign, malignant) in its data.

    The discovery acceptance experiment: train on this, audit without declaring ``artifact`` and
    count how many top-ranked outliers carry it
    (:attr:`medaudit.models.audit.results.Discovery.hits`).
    """
    return replace(base, data=base.data.with_spec(**{artifact: rates}))


def train_with_hidden_artifact(
    out_dir: str | Path,
    artifact: str = "timestamp",
    rates: tuple[float, float] = (0.0, 0.1),
    base: TrainConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains (or resumes) the acceptance experiment's model: ``base`` (default: the demo config)
    with ``artifact`` planted at ``rates``; returns its card (see :func:`medaudit.models.train.train`)."""
    tcfg = hidden_artifact_config(base or TrainConfig(), artifact, rates)
    return train(tcfg, out_dir, cache_dir=cache_dir, progress=progress, log=log)
