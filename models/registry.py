"""Model registry, timm-style: named entrypoints, one frozen config per architecture, one factory.

``create_model("resnet18")`` builds an untrained network; ``create_model("resnet18.vanilla",
weights=PATH)`` loads a local checkpoint (no hub downloads, ever). The part after the dot is a
version tag (``arch.tag``) and does not change the architecture.

Hook points follow the paper's layer semantics (method.md §9, §11.3): ``identity_k`` is the
post-ReLU output of ResNet stage k+1, ``last_conv`` the last stage's; VGG names are the ReLU
modules of ``features``; the ViT's ``inspection_layer`` is the CLS token after the final norm
(timm's ``fc_norm``; torchvision's :data:`TV_VIT_CLASS_TOKEN`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medaudit.models.errors import UnknownModelError, WeightsError

#: The paper normalises every image dataset with mean = std = 0.5 (method.md §8, §11.12).
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelCfg:
    """Everything about an architecture that code outside the network needs to know."""

    arch: str
    source: str  # "timm" or "torchvision"
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    labels: tuple[str, ...] = ("benign", "malignant")
    #: hook-point name -> dotted module path whose *output* is that layer's activation.
    hook_points: dict[str, str] = field(default_factory=dict)
    default_cav_layer: str = ""
    canonizer: str = ""  # id understood by models.xai.canonizers
    #: whether the input size is fixed by the architecture (ViT position embeddings).
    fixed_size: bool = False
    #: extra keyword arguments of the constructor (a model spec's ``factory_kwargs``).
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    #: how an image becomes ``input_size``: "resize" (stretch) or "center_crop" (resize the short
    #: side to side / crop_pct, then crop the centre: torchvision's and timm's eval transform).
    resize: str = "resize"
    crop_pct: float = 0.875

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW or float [0, 1] NCHW images -> this model's input: ``(x - mean) / std``.

        The one definition of input normalisation: training, evaluation, corrections, the audit
        and the service all call it, so a model's own mean/std (a model spec's) reach every path.
        """
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def with_labels(self, labels: tuple[str, ...]) -> ModelCfg:
        return replace(self, labels=tuple(labels))

    def with_size(self, size: int) -> ModelCfg:
        return replace(self, input_size=(3, size, size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "source": self.source,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "labels": list(self.labels),
            "hook_points": dict(self.hook_points),
            "default_cav_layer": self.default_cav_layer,
            "canonizer": self.canonizer,
            "fixed_size": self.fixed_size,
            "factory_kwargs": dict(self.factory_kwargs),
            "resize": self.resize,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCfg:
        return cls(
            arch=d["arch"],
            source=d["source"],
            input_size=tuple(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            labels=tuple(d["labels"]),
            hook_points=dict(d["hook_points"]),
            default_cav_layer=d["default_cav_layer"],
            canonizer=d["canonizer"],
            fixed_size=bool(d.get("fixed_size", False)),
            factory_kwargs=dict(d.get("factory_kwargs") or {}),
            resize=str(d.get("resize", "resize")),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )


Builder = Callable[[ModelCfg], nn.Module]
_REGISTRY: dict[str, tuple[ModelCfg, Builder]] = {}


def register_model(cfg: ModelCfg) -> Callable[[Builder], Builder]:
    """Register ``builder(cfg) -> nn.Module`` under ``cfg.arch``."""

    def wrap(builder: Builder) -> Builder:
        if cfg.arch in _REGISTRY:
            raise ValueError(f"architecture {cfg.arch!r} registered twice")
        _REGISTRY[cfg.arch] = (cfg, builder)
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def split_name(name: str) -> tuple[str, str | None]:
    """``"resnet18.vanilla"`` -> ``("resnet18", "vanilla")``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def get_cfg(name: str) -> ModelCfg:
    arch, _ = split_name(name)
    if arch not in _REGISTRY:
        close = difflib.get_close_matches(arch, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(
            f"unknown architecture {arch!r}.{hint} Registered: {', '.join(list_models())}."
        )
    return _REGISTRY[arch][0]


def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    *,
    labels: tuple[str, ...] | None = None,
    img_size: int | None = None,
) -> tuple[nn.Module, ModelCfg]:
    """Build a registered architecture, optionally loading a local checkpoint.

    Args:
        name: ``arch`` or ``arch.tag``.
        num_classes: number of outputs; defaults to the length of ``labels`` or the checkpoint's.
        weights: path to a checkpoint written by :func:`save_checkpoint` or a plain state dict.
        labels: class names; default ``("benign", "malignant")`` or ``class_k``.
        img_size: square input size (defaults to the architecture's).

    Returns:
        ``(model, cfg)`` with the model in eval mode.
    """
    cfg = get_cfg(name)
    ckpt: dict[str, Any] | None = None
    if weights is not None:
        ckpt = load_checkpoint_file(weights)
        saved = ckpt.get("cfg")
        if saved is not None:
            saved_cfg = ModelCfg.from_dict(saved)
            if saved_cfg.arch != cfg.arch:
                raise WeightsError(
                    f"checkpoint {weights} is for architecture {saved_cfg.arch!r}, not {cfg.arch!r}"
                )
            labels = labels or saved_cfg.labels
            img_size = img_size or saved_cfg.input_size[-1]
    if labels is None:
        labels = (
            cfg.labels
            if num_classes in (None, len(cfg.labels))
            else tuple(f"class_{k}" for k in range(num_classes or 0))
        )
    if num_classes is not None and num_classes != len(labels):
        raise ValueError(f"num_classes={num_classes} but {len(labels)} labels given: {labels}")
    cfg = cfg.with_labels(tuple(labels))
    if img_size is not None and img_size != cfg.input_size[-1]:
        cfg = cfg.with_size(img_size)
    model = _REGISTRY[cfg.arch][1](cfg)
    if ckpt is not None:
        state = ckpt.get("state_dict", ckpt)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"checkpoint {weights} does not fit {cfg.arch}: {e}") from e
    return model.eval(), cfg


def build_architecture(cfg: ModelCfg) -> nn.Module:
    """An untrained network for ``cfg``, in eval mode: the registered builder when ``cfg`` names a
    registered architecture from the same source, else the architecture built from its source by
    name (:func:`construct`) — how a model spec's versions are rebuilt when loaded."""
    registered = _REGISTRY.get(cfg.arch)
    if registered is not None and registered[0].source == cfg.source and not cfg.factory_kwargs:
        return registered[1](cfg).eval()
    return construct(cfg.source, cfg.arch, cfg.num_classes, cfg.factory_kwargs).eval()


def construct(source: str, arch: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """A network by name, offline (never pretrained weights): ``timm`` and ``torchvision`` get
    ``num_classes``; an ``entrypoint`` (``package.module:factory``) is called with ``kwargs`` only.

    Raises:
        UnknownModelError: An unknown source or name (with the closest names), a module that does
            not import, or a factory that returns something else than an ``nn.Module``.
    """
    import difflib
    import importlib

    if source in ("timm", "torchvision"):
        if source == "timm":
            import timm

            names, make = (
                timm.list_models(),
                lambda: timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs),
            )
        else:
            import torchvision

            names, make = (
                torchvision.models.list_models(),
                lambda: torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs),
            )
        if arch not in names:
            near = difflib.get_close_matches(arch, names, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UnknownModelError(f"{source} has no model {arch!r}{hint}")
        return expose_class_token(make())
    if source != "entrypoint":
        raise UnknownModelError(f"unknown model source {source!r}; valid: timm, torchvision, entrypoint")
    module_name, _, factory_name = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownModelError(
            f"cannot import {module_name!r} ({e}); install the package that provides it here"
        ) from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UnknownModelError(f"{module_name} has no callable {factory_name!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"{arch}() returned a {type(model).__name__}, not a torch.nn.Module")
    return expose_class_token(model)


#: A torchvision ViT's ``inspection_layer``: its class token after the final norm (method.md §11.4).
#: torchvision picks the token inline in ``forward`` (``x[:, 0]``), so no module outputs it; an
#: ``nn.Identity`` of this name at the front of ``heads`` does. It has no parameters, so every
#: checkpoint of the model loads as before and its logits do not change.
TV_VIT_CLASS_TOKEN = "heads.class_token"


def expose_class_token(model: nn.Module) -> nn.Module:
    """A torchvision ``VisionTransformer`` with :data:`TV_VIT_CLASS_TOKEN` (in place, idempotent);
    any other model as it is."""
    from collections import OrderedDict

    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer) and isinstance(model.heads, nn.Sequential):
        children = OrderedDict(model.heads.named_children())
        if "class_token" not in children:
            model.heads = nn.Sequential(OrderedDict([("class_token", nn.Identity()), *children.items()]))
    return model


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(
            f"weights file not found: {p} (medaudit never downloads weights; pass a local path)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt file
        raise WeightsError(f"cannot read checkpoint {p}: {e}") from e
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {p} holds a {type(obj).__name__}, expected a dict")
    return obj


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise UnknownModelError(f"model has no module {path!r}") from e


def hook_module(model: nn.Module, cfg: ModelCfg, layer: str) -> nn.Module:
    """The module whose output is hook point ``layer``."""
    if layer not in cfg.hook_points:
        raise UnknownModelError(
            f"{cfg.arch} has no hook point {layer!r}; valid: {', '.join(cfg.hook_points)}"
        )
    return get_module(model, cfg.hook_points[layer])


# --------------------------------------------------------------------------- entrypoints


def _timm(arch: str, cfg: ModelCfg, **kw: Any) -> nn.Module:
    import timm

    if cfg.fixed_size:
        kw["img_size"] = cfg.input_size[-1]
    return timm.create_model(arch, pretrained=False, num_classes=cfg.num_classes, **kw)


_RESNET_HOOKS = {
    "identity_0": "layer1",
    "identity_1": "layer2",
    "identity_2": "layer3",
    "last_conv": "layer4",
}


@register_model(
    ModelCfg(
        arch="resnet18",
        source="timm",
        input_size=(3, 128, 128),
        hook_points=_RESNET_HOOKS,
        default_cav_layer="identity_2",
        canonizer="resnet",
    )
)
def resnet18(cfg: ModelCfg) -> nn.Module:
    return _timm("resnet18", cfg)


@register_model(
    ModelCfg(
        arch="resnet50d",
        source="timm",
        hook_points=_RESNET_HOOKS,
        default_cav_layer="identity_2",
        canonizer="resnet",
    )
)
def resnet50d(cfg: ModelCfg) -> nn.Module:
    return _timm("resnet50d", cfg)


@register_model(
    ModelCfg(
        arch="resnet50",
        source="torchvision",
        hook_points=_RESNET_HOOKS,
        default_cav_layer="identity_2",
        canonizer="resnet",
    )
)
def resnet50(cfg: ModelCfg) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=cfg.num_classes)


# VGG comes from torchvision, as in the paper (method.md §9): its layer names (features.22 = the
# ReLU of conv10) are the ones the paper's CAV/localization layers use; timm's VGG replaces the
# classifier with a ConvMlp and renames the head.
_VGG_RELUS = (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)


@register_model(
    ModelCfg(
        arch="vgg16",
        source="torchvision",
        hook_points={f"features.{i}": f"features.{i}" for i in _VGG_RELUS},
        default_cav_layer="features.22",
        canonizer="vgg",
    )
)
def vgg16(cfg: ModelCfg) -> nn.Module:
    import torchvision

    model = torchvision.models.vgg16(weights=None, num_classes=cfg.num_classes)
    # torchvision's ReLUs are in-place; a forward hook on an in-place ReLU sees a tensor that the
    # next layer may overwrite, and LRP needs the activations intact.
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


_VIT_HOOKS = {"inspection_layer": "fc_norm"}  # timm: CLS token after the final norm (token pooling)


@register_model(
    ModelCfg(
        arch="vit_tiny_patch16_224",
        source="timm",
        hook_points=_VIT_HOOKS,
        default_cav_layer="inspection_layer",
        canonizer="vit",
        fixed_size=True,
    )
)
def vit_tiny_patch16_224(cfg: ModelCfg) -> nn.Module:
    return _timm("vit_tiny_patch16_224", cfg, global_pool="token")


@register_model(
    ModelCfg(
        arch="vit_base_patch16_224",
        source="timm",
        hook_points=_VIT_HOOKS,
        default_cav_layer="inspection_layer",
        canonizer="vit",
        fixed_size=True,
    )
)
def vit_base_patch16_224(cfg: ModelCfg) -> nn.Module:
    return _timm("vit_base_patch16_224", cfg, global_pool="token")


# DenseNet (torchvision, method.md §3.2 "extras"): CAV layers are post-ReLU (method.md §11.3), and
# in a DenseNet the rectified output of dense block k is its transition's BN-ReLU (the block's own
# output is a concatenation of un-rectified convs). ``features`` ends with ``norm5``, whose ReLU
# is applied in ``forward``, so block 4 has no such module.
_DENSENET_HOOKS = {f"denseblock{k}": f"features.transition{k}.relu" for k in range(1, 4)}


@register_model(
    ModelCfg(
        arch="densenet121",
        source="torchvision",
        hook_points=_DENSENET_HOOKS,
        default_cav_layer="denseblock3",
        canonizer="densenet",
    )
)
def densenet121(cfg: ModelCfg) -> nn.Module:
    import torchvision

    model = torchvision.models.densenet121(weights=None, num_classes=cfg.num_classes)
    for m in model.modules():  # in-place ReLUs: see vgg16
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


# EfficientNet-B0 (timm): one hook point per stage (``blocks.k``, a stage's last block output).
# EfficientNet has no ReLU: a stage ends in a linear bottleneck (method.md §11.3's post-ReLU layers
# do not exist here); concept seeds rectify the activation themselves (R = ReLU(A) ⊙ v, §2.1).
_EFFICIENTNET_HOOKS = {f"stage_{k}": f"blocks.{k}" for k in range(7)}


@register_model(
    ModelCfg(
        arch="efficientnet_b0",
        source="timm",
        hook_points=_EFFICIENTNET_HOOKS,
        default_cav_layer="stage_5",
        canonizer="efficientnet",
    )
)
def efficientnet_b0(cfg: ModelCfg) -> nn.Module:
    return _timm("efficientnet_b0", cfg)
