"""Shared machinery of the model corrections (method.md §4.1, §11.9).

* :class:`Correction`: the one interface every correction implements — a ``name``, its
  ``params`` (JSON-ready, for the model card) and ``apply(model, cfg, data) -> nn.Module``, which
  returns a corrected **copy** and never touches the model it is given.
* :class:`CorrectionData`: what a correction may use — the CAV layer ℓ, the pattern-CAV v, the
  clean mean μ0, the SVM-CAV (rP-ClArC's gate), training images, labels and artifact masks.
  :func:`fit_correction_data` builds it from the **original** model's max-pooled activations
  (§1.1, §11.7).
* :func:`freeze_up_to`: freezes every parameter up to and including ℓ and keeps those modules
  in eval mode (§4.1 ``Freeze``, §11.9).
* :func:`finetune`: the seeded fine-tuning loop shared by RR-ClArC, RRR and Vanilla — class-weighted
  CE (§4.1), gradient clipping at 100, optional resumption of the base run's optimiser state. Its
  steps run on :func:`~models.corrections.fast_prefix.fast_view`, the same function with a cheaper
  frozen prefix.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medaudit.models.corrections.fast_prefix import fast_view
from medaudit.models.corrections.projection import ClarcProjection
from medaudit.models.errors import ConfigError
from medaudit.models.features import max_pool_spatial
from medaudit.models.registry import ModelCfg, get_module, hook_module
from medaudit.models.train import class_weights
from medaudit.models.xai.concepts import fit_cav

#: ``gradient_clip_val`` of the authors' Trainer (method.md §4.1).
GRAD_CLIP = 100.0
#: Parameters owned by the model root that §4.1 always freezes (ViT tokens, both naming schemes).
ALWAYS_FROZEN = ("cls_token", "pos_embed", "reg_token", "class_token", "pos_embedding")


@dataclass(frozen=True, eq=False)
class CorrectionData:
    """Inputs of a correction, all derived from the original model and the training split.

    Attributes:
        layer: The CAV / correction layer ℓ, a hook point of the model's :class:`ModelCfg`.
        cav: Unit pattern-CAV v (``signal``, §1.3), float64 (C,).
        mu0: Mean max-pooled activation φ of the clean (t=0) training samples in scope, (C,).
            P-ClArC moves every sample's coordinate to ⟨μ0, v⟩ (§4.2).
        cav_svm: Unit SVM-CAV, rP-ClArC's gate (§4.3); None if not fitted.
        images: Training images, uint8 (N, 3, H, W); needed by the fine-tuning corrections.
        labels: Class labels, int64 (N,).
        masks: Artifact masks in [0, 1], float32 (N, H, W), all-zero for clean samples; RRR only.
        artifact: Artifact (concept) name, for the card.
        optimizer_state: The base run's optimiser ``state_dict`` (§4.1, §11.9), or None.
    """

    layer: str
    cav: np.ndarray
    mu0: np.ndarray
    cav_svm: np.ndarray | None = None
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    artifact: str = "artifact"
    optimizer_state: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        v = np.asarray(self.cav, dtype=np.float64)
        if v.ndim != 1 or np.asarray(self.mu0).shape != v.shape:
            raise ConfigError(f"cav and mu0 must both be (C,); got {v.shape} and {np.shape(self.mu0)}")
        if not math.isclose(float(np.linalg.norm(v)), 1.0, rel_tol=1e-4):
            raise ConfigError(f"cav must have unit L2 norm (§1.2); got norm {np.linalg.norm(v):.6g}")
        if self.cav_svm is not None and np.shape(self.cav_svm) != v.shape:
            raise ConfigError(f"cav_svm must be (C,) = {v.shape}; got {np.shape(self.cav_svm)}")
        if self.images is not None:
            n = self.images.shape[0]
            if self.images.dtype != torch.uint8 or self.images.ndim != 4:
                raise ConfigError(
                    f"images must be uint8 (N, 3, H, W); got {self.images.dtype} {tuple(self.images.shape)}"
                )
            if self.labels is None or tuple(self.labels.shape) != (n,):
                raise ConfigError(f"labels must be (N,) = ({n},) when images are given")
            if self.masks is not None and tuple(self.masks.shape) != (n, *self.images.shape[2:]):
                raise ConfigError(
                    f"masks must be (N, H, W) = {(n, *self.images.shape[2:])}; got {tuple(self.masks.shape)}"
                )

    @property
    def mu0_coordinate(self) -> float:
        """⟨μ0, v⟩: the clean-sample mean of the CAV coordinate (``mean_length`` of §4.1)."""
        return float(np.dot(np.asarray(self.mu0, np.float64), np.asarray(self.cav, np.float64)))

    def require_training_data(self, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.images is None or self.labels is None:
            raise ConfigError(f"{who} fine-tunes the model and needs CorrectionData.images and .labels")
        return self.images, self.labels


@runtime_checkable
class Correction(Protocol):
    """A model correction (method.md §4). ``apply`` returns a corrected copy of ``model``."""

    name: str

    @property
    def params(self) -> dict[str, Any]: ...

    def apply(self, model: nn.Module, cfg: ModelCfg, data: CorrectionData) -> nn.Module: ...


# --------------------------------------------------------------------------------- activations


class _ForwardStopped(Exception):
    """Raised by a :func:`capture` hook with ``stop=True`` once the activation is recorded."""


@contextlib.contextmanager
def capture(
    model: nn.Module,
    cfg: ModelCfg,
    layer: str,
    *,
    before_correction: bool = True,
    ensure_grad: bool = False,
    stop: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Records the activation of hook point ``layer`` during forwards inside the block.

    If a ClArC projection sits at the hook point (see :mod:`medaudit.models.corrections.pclarc`) and
    ``before_correction`` is set, the activation recorded is the projection's **input**, the
    original layer's output; otherwise the hook point's output. With ``ensure_grad``, an output
    that does not require grad (everything before it frozen) is replaced by a leaf that does, so
    gradients w.r.t. the activation exist without a backward through the frozen layers. With
    ``stop`` the hook raises :class:`_ForwardStopped` once the activation is recorded, ending the
    forward there (the caller catches it; for no-grad callers that need nothing after ``layer``).
    The hook is removed in ``finally``.
    """
    module = hook_module(model, cfg, layer)
    store: dict[str, torch.Tensor] = {}
    last = list(module.children())[-1] if isinstance(module, nn.Sequential) and len(module) else None
    if before_correction and isinstance(last, ClarcProjection):

        def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            store["a"] = args[0]
            if stop:
                raise _ForwardStopped

        handle = last.register_forward_pre_hook(pre)
    else:

        def post(_m: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            if ensure_grad and torch.is_grad_enabled() and not out.requires_grad:
                out = out.detach().requires_grad_(True)
            store["a"] = out
            if stop:
                raise _ForwardStopped
            return out

        handle = module.register_forward_hook(post)
    try:
        yield store
    finally:
        handle.remove()


@torch.no_grad()
def pooled_activations(
    model: nn.Module,
    cfg: ModelCfg,
    layer: str,
    images: torch.Tensor,
    batch_size: int = 64,
    *,
    before_correction: bool = False,
) -> np.ndarray:
    """φ(x) at ``layer`` for uint8 images, float64 (N, C); the model runs in eval mode.

    The forward stops once ``layer``'s activation is recorded (:class:`_ForwardStopped`): the
    layers after it cannot change φ (resnet18 at ``identity_2``: layer4 and the head, ~25 % of the
    FLOPs). For the registered architectures every hook point runs once per forward, so the
    activation is the one a full forward records.
    """
    return pooled_activations_at(
        model, cfg, (layer,), images, batch_size, before_correction=before_correction
    )[layer]


@torch.no_grad()
def pooled_activations_at(
    model: nn.Module,
    cfg: ModelCfg,
    layers: tuple[str, ...],
    images: torch.Tensor,
    batch_size: int = 64,
    *,
    before_correction: bool = False,
) -> dict[str, np.ndarray]:
    """:func:`pooled_activations` at several hook points from **one** forward per batch, stopped
    once every one of them is recorded (the build's banks at the build layer and at a correction's
    own deeper layer cost one forward to the deeper one, not two)."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with contextlib.ExitStack() as stack:
        stores = {
            name: stack.enter_context(capture(model, cfg, name, before_correction=before_correction))
            for name in layers
        }

        def stop_when_all(*_: Any) -> None:  # runs after every capture hook of its module
            if all("a" in store for store in stores.values()):
                raise _ForwardStopped

        for name in dict.fromkeys(layers):
            stack.callback(hook_module(model, cfg, name).register_forward_hook(stop_when_all).remove)
        for i in range(0, len(images), batch_size):
            with contextlib.suppress(_ForwardStopped):
                model(cfg.normalize(images[i : i + batch_size]))
            for name, store in stores.items():
                out[name].append(max_pool_spatial(store.pop("a")).double())
    return {name: torch.cat(rows).numpy() for name, rows in out.items()}


def fit_correction_data(
    model: nn.Module,
    cfg: ModelCfg,
    layer: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    artifact_labels: np.ndarray,
    *,
    masks: torch.Tensor | None = None,
    scope: tuple[int, ...] | None = None,
    artifact: str = "artifact",
    fit_svm: bool = True,
    optimizer_state: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> CorrectionData:
    """Fits v (signal), μ0 and the SVM-CAV on the **original** model's φ (method.md §1.1, §11.7).

    Args:
        model: The original (uncorrected) model.
        cfg: Its registry config.
        layer: CAV / correction layer ℓ.
        images, labels: The training split, uint8 (N, 3, H, W) and int64 (N,).
        artifact_labels: t ∈ {0, 1} per training sample.
        masks: Artifact masks (N, H, W) for RRR, optional.
        scope: ``cav_scope``: the classes whose samples fit the CAV and μ0; None = all (§1.1).
        artifact: Concept name.
        fit_svm: Also fit the SVM-CAV (rP-ClArC's gate).
        optimizer_state: The base run's optimiser state, handed to fine-tuning corrections.
        seed: CV seed of the SVM fit.
    """
    acts = pooled_activations(model, cfg, layer, images)
    t = np.asarray(artifact_labels).astype(np.int64)
    keep = np.ones(len(t), bool) if scope is None else np.isin(labels.numpy(), scope)
    x, ts = acts[keep], t[keep]
    cav = fit_cav(x, ts, kind="signal")
    svm = fit_cav(x, ts, kind="svm", seed=seed).v if fit_svm else None
    return CorrectionData(
        layer=layer,
        cav=np.asarray(cav.v, np.float64),
        mu0=x[ts == 0].mean(axis=0),
        cav_svm=None if svm is None else np.asarray(svm, np.float64),
        images=images,
        labels=labels,
        masks=masks,
        artifact=artifact,
        optimizer_state=optimizer_state,
    )


# --------------------------------------------------------------------------------- freezing


def frozen_module_names(model: nn.Module, cfg: ModelCfg, layer: str) -> list[str]:
    """Names of the modules at or before hook point ``layer`` in registration order (§4.1).

    The authors sort layer names (``get_lnames_sorted``) and freeze every layer that sorts at or
    before ℓ; for every registered architecture, module registration order is forward order, so
    "registered before ℓ, or inside ℓ" is the same set.
    """
    path = cfg.hook_points.get(layer)
    if path is None:
        hook_module(model, cfg, layer)  # raises UnknownModelError with the valid names
    assert path is not None
    get_module(model, path)
    names = [n for n, _ in model.named_modules() if n]
    cut = names.index(path)
    ancestors = {path.rsplit(".", k)[0] for k in range(1, path.count(".") + 1)}
    before = [n for n in names[:cut] if n not in ancestors]  # an ancestor also holds later layers
    inside = [n for n in names[cut:] if n == path or n.startswith(path + ".")]
    return before + inside


def freeze_up_to(model: nn.Module, cfg: ModelCfg, layer: str) -> list[nn.Module]:
    """Freezes all parameters up to and including ``layer`` and puts those modules in eval mode.

    Also freezes ViT class/position tokens (§4.1). Returns the frozen modules; call
    :func:`keep_frozen_eval` after every ``model.train()``, as the authors' callback does at each
    epoch start. Ancestors of ℓ (``features`` for ``features.22``) are not frozen as a whole, since
    they also hold the layers after ℓ.
    """
    names = set(frozen_module_names(model, cfg, layer))
    frozen: list[nn.Module] = []
    for name, module in model.named_modules():
        if name in names:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            frozen.append(module)
    for name, p in model.named_parameters(recurse=False):
        if name in ALWAYS_FROZEN:
            p.requires_grad_(False)
    keep_frozen_eval(frozen)
    return frozen


def keep_frozen_eval(frozen: list[nn.Module]) -> None:
    # Every frozen module goes to eval, not only BatchNorm: for the registered architectures the
    # only train/eval-dependent modules before ℓ are BatchNorms (dropout rates are 0), so this is
    # the authors' behaviour; elsewhere it keeps the frozen part deterministic.
    for m in frozen:
        m.eval()


# --------------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning schedule shared by RR-ClArC, RRR and Vanilla (method.md §4.1, §4.5, §4.7).

    The paper trains 10 epochs (2 for HyperKvasir) with batch 12 and Adam 1e-3 for ResNets on a
    GPU. The demo default is 2 epochs of batch 16, Adam(W) at 1e-4, sized for 2 CPU cores: only the
    layers after ℓ train, and a converged base model needs a small step to stay accurate.
    """

    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    augment: bool = True
    grad_clip: float = GRAD_CLIP
    #: stop after this many steps (None: run all epochs); for tests and time-boxed demos.
    max_steps: int | None = None
    #: resume the base run's optimiser state when CorrectionData carries one (§11.9).
    resume_optimizer: bool = True
    #: run the steps on :func:`~models.corrections.fast_prefix.fast_view` and back-propagate to the
    #: trainable parameters only (same loss and gradients up to float round-off, faster); an
    #: implementation switch, so not part of :meth:`to_dict`.
    fast_prefix: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"invalid fine-tuning config: {self}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer={self.optimizer!r}; valid: 'adam', 'sgd'")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "fast_prefix"}


@dataclass
class Batch:
    """One training batch handed to a penalty: normalised images, labels, masks, step index."""

    x: torch.Tensor
    y: torch.Tensor
    masks: torch.Tensor | None
    step: int
    generator: torch.Generator


#: ``penalty(model, batch) -> (ce_logits, penalty)``: the model output (for CE) and the λ-free term.
Penalty = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class FinetuneLog:
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def augment_pair(
    x: torch.Tensor, m: torch.Tensor | None, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flips, transposes and mild brightness/contrast jitter of [0, 1] images; masks follow the geometry.

    The same family as :func:`medaudit.models.train.augment`. Unlike the authors' Kvasir-attacked ``hm``
    loader, which augments the image but not the mask (method.md §8, §11.15), the mask here gets
    the same flips and transposes as its image.
    """
    B = x.shape[0]
    ops = [torch.rand(B, generator=g) < 0.5 for _ in range(3)]

    def geo(t: torch.Tensor) -> torch.Tensor:
        shape = (B,) + (1,) * (t.ndim - 1)
        t = torch.where(ops[0].view(shape), t.flip(-1), t)
        t = torch.where(ops[1].view(shape), t.flip(-2), t)
        if t.shape[-1] == t.shape[-2]:
            t = torch.where(ops[2].view(shape), t.transpose(-1, -2), t)
        return t

    x = geo(x)
    b = (torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 0.2
    c = 1 + (torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 0.2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean + b).clamp_(0, 1)
    return x, (geo(m) if m is not None else None)


def finetune(
    model: nn.Module,
    cfg: ModelCfg,
    data: CorrectionData,
    ft: FinetuneConfig,
    penalty: Penalty | None,
    lamb: float | Callable[[float, float], float],
    *,
    who: str,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, FinetuneLog, float]:
    """Fine-tunes a deep copy of ``model`` with ``CE_w + λ · penalty`` (method.md §4.1, §4.5–§4.7).

    Args:
        model: The original model (not modified).
        cfg: Its registry config.
        data: Training images, labels (and masks) plus the layer ℓ to freeze up to.
        ft: The schedule.
        penalty: The correction term, or None (Vanilla).
        lamb: λ, or a function ``(ce, penalty) -> λ`` evaluated once on the first batch.
        who: Name for error messages.
        log: Optional per-epoch logger.

    Returns:
        ``(fine-tuned model in eval mode, log, resolved λ)``.
    """
    images, labels = data.require_training_data(who)
    torch.manual_seed(ft.seed)
    net = copy.deepcopy(model)
    net.requires_grad_(True)
    frozen = freeze_up_to(net, cfg, data.layer)
    trainable = [p for p in net.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"{who}: nothing to train after layer {data.layer!r}")
    # The steps run on a view whose frozen prefix is cheaper (BN folded, convs with a one-conv
    # double backward) and whose later modules are net's own; net's prefix is never touched.
    run, run_frozen = net, frozen
    if ft.fast_prefix:
        run, run_frozen, _ = fast_view(net, frozen_module_names(net, cfg, data.layer))
    opt: torch.optim.Optimizer
    # All parameters go to the optimiser so that a base-run state_dict (over all of them) loads;
    # frozen ones never get a gradient and are skipped by the step.
    if ft.optimizer == "adam":
        opt = torch.optim.AdamW(net.parameters(), lr=ft.lr, weight_decay=ft.weight_decay, foreach=True)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=ft.lr, momentum=0.9, weight_decay=ft.weight_decay)
    if ft.resume_optimizer and data.optimizer_state is not None:
        try:
            # A copy: load_state_dict keeps the given state's tensors and the steps then update
            # them in place, so every later fine-tune sharing this CorrectionData (the build runs
            # vanilla-ft, rrclarc and rrr from one) resumed the previous one's moments and step
            # count instead of the base run's; results depended on the order of corrections.
            opt.load_state_dict(copy.deepcopy(dict(data.optimizer_state)))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{who}: the base run's optimiser state does not fit: {e}") from e
        for group in opt.param_groups:  # the saved lr is the base schedule's last, not ours
            group["lr"] = ft.lr
            group["weight_decay"] = ft.weight_decay
            group["foreach"] = True  # bit-identical to the loop, cheaper (models/train.py)
    weights = class_weights(labels.numpy(), cfg.num_classes)
    n = len(images)
    steps_per_epoch = math.ceil(n / ft.batch_size)
    flog = FinetuneLog()
    resolved: float | None = lamb if isinstance(lamb, int | float) else None
    for epoch in range(ft.epochs):
        g = torch.Generator().manual_seed(ft.seed * 100_003 + epoch)
        net.train()
        keep_frozen_eval(frozen)
        run.train()  # the same modules as net's after ℓ; a no-op when run is net
        keep_frozen_eval(run_frozen)
        perm = torch.randperm(n, generator=g)
        sums = {"loss": 0.0, "ce": 0.0, "penalty": 0.0}
        done = 0
        for s in range(steps_per_epoch):
            if ft.max_steps is not None and flog.steps >= ft.max_steps:
                break
            idx = perm[s * ft.batch_size : (s + 1) * ft.batch_size]
            x = images[idx].float().div_(255)
            m = data.masks[idx].float() if data.masks is not None else None
            if ft.augment:
                x, m = augment_pair(x, m, g)
            batch = Batch(cfg.normalize(x), labels[idx], m, flog.steps, g)
            if penalty is None:
                logits, pen = run(batch.x), torch.zeros(())
            else:
                logits, pen = penalty(run, batch)
            ce = F.cross_entropy(logits, batch.y, weight=weights)
            if resolved is None:
                assert callable(lamb)
                resolved = float(lamb(ce.item(), pen.item()))
            loss = ce + resolved * pen
            opt.zero_grad(set_to_none=True)
            # Only the trainable parameters' gradients are used; without inputs= RRR's backward also
            # runs the frozen prefix's backward down to its input leaf (a discarded x.grad).
            loss.backward(inputs=trainable if ft.fast_prefix else None)
            torch.nn.utils.clip_grad_norm_(trainable, ft.grad_clip)
            opt.step()
            flog.steps += 1
            done += 1
            sums["loss"] += loss.item()
            sums["ce"] += ce.item()
            sums["penalty"] += pen.item()
        if done:
            flog.history.append({"epoch": epoch + 1, **{k: v / done for k, v in sums.items()}})
            if log:
                log(
                    f"{who} epoch {epoch + 1}/{ft.epochs}: "
                    + ", ".join(f"{k} {v / done:.4g}" for k, v in sums.items())
                )
    net.eval()
    net.requires_grad_(False)
    return (
        net,
        flog,
        float(resolved if resolved is not None else (lamb if isinstance(lamb, int | float) else 0.0)),
    )
