"""Model specs: what medaudit needs to know about a classifier it did not train.

A hospital's ML team describes its own trained classifier in one small TOML file::

    name = "derm-resnet34"                 # versions are named <name>:<version>
    source = "timm"                        # timm | torchvision | entrypoint
    arch = "resnet34"                      # a timm/torchvision name, or "package.module:factory"
    checkpoint = "weights/model.pt"        # relative to this file; a state_dict, or (with
                                           # allow_pickle = true) a whole pickled module
    sha256 = "…"                           # optional: refuse any other file
    labels = ["nevus", "melanoma", "bcc"]
    input_size = 224                       # or [3, 224, 224]
    mean = [0.485, 0.456, 0.406]           # ImageNet normalisation, the common case
    std = [0.229, 0.224, 0.225]
    resize = "resize"                      # resize (stretch) | center_crop (torchvision's eval)
    canonizer = "auto"                     # detected from the module tree, or named
    default_cav_layer = "layer3"           # optional: the family's default otherwise

    [hook_points]                          # optional: the family's defaults otherwise
    layer3 = "layer3"                      # name -> module path whose output is the activation

    [factory_kwargs]                       # optional: extra keyword arguments of the constructor
    drop_rate = 0.0

:func:`load_spec` validates it (every error names the file, the key and the fix), :func:`build`
loads the model offline (never a download), and :func:`check` runs ``medaudit model check``:
a forward on a probe batch, the head's width against the labels, the canonizer, one LRP call with
its conservation, and the rule each layer got.
"""

from __future__ import annotations

import difflib
import pickle
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medaudit.models.errors import CanonizerError, ConfigError, SpecError, UnknownModelError, WeightsError
from medaudit.models.registry import TV_VIT_CLASS_TOKEN, ModelCfg, construct, expose_class_token
from medaudit.models.train import sha256_file

SOURCES = ("timm", "torchvision", "entrypoint")
RESIZE_POLICIES = ("resize", "center_crop")
#: Keys of a spec file: name -> (required, what it holds). The one schema :func:`load_spec` checks.
SCHEMA: dict[str, tuple[bool, str]] = {
    "name": (True, "the model's name; versions are registered as <name>:<version>"),
    "source": (True, f"where the architecture comes from: {', '.join(SOURCES)}"),
    "arch": (True, "a timm or torchvision model name, or package.module:factory for an entrypoint"),
    "checkpoint": (True, "path of the trained weights, relative to the spec file"),
    "sha256": (False, "the checkpoint's sha256; any other file is refused"),
    "allow_pickle": (False, "true to load a checkpoint that is a whole pickled module (runs its code)"),
    "labels": (True, "class names in the order of the model's outputs (at least 2)"),
    "input_size": (True, "the model's input side in pixels (square), or [3, H, W]"),
    "mean": (True, "per-channel input mean (3 numbers, on [0, 1] pixels)"),
    "std": (True, "per-channel input standard deviation (3 positive numbers)"),
    "resize": (False, f"how an image becomes the input size: {', '.join(RESIZE_POLICIES)} (default resize)"),
    "crop_pct": (False, "with resize = center_crop: the crop's share of the resized side (default 0.875)"),
    "canonizer": (False, "the LRP canonizer family, or auto (default) to detect it from the module tree"),
    "hook_points": (False, "a table: hook point name -> module path (default: the family's)"),
    "default_cav_layer": (False, "the hook point concepts use by default (default: the family's)"),
    "factory_kwargs": (False, "a table of extra keyword arguments for the model constructor"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A validated model spec (see the module docstring for the file format)."""

    path: Path
    name: str
    source: str
    arch: str
    checkpoint: Path
    labels: tuple[str, ...]
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "resize"
    crop_pct: float = 0.875
    canonizer: str = "auto"
    sha256: str | None = None
    allow_pickle: bool = False
    hook_points: Mapping[str, str] = field(default_factory=dict)
    default_cav_layer: str | None = None
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(f"{self.path}: {key}: {problem}")


# ------------------------------------------------------------------------------------- loading


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a spec file.

    Raises:
        SpecError: A missing file, invalid TOML, an unknown or missing key, or a bad value.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"model spec not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: not valid TOML: {e}") from e
    return parse_spec(raw, p)


def parse_spec(raw: Mapping[str, Any], path: Path) -> ModelSpec:
    """Validate the parsed TOML of a spec file (``path`` resolves the checkpoint and names errors)."""

    def bad(key: str, problem: str) -> SpecError:
        return SpecError(f"{path}: {key}: {problem} ({SCHEMA[key][1]})")

    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        hints = {k: difflib.get_close_matches(k, SCHEMA, n=1) for k in unknown}
        named = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise SpecError(f"{path}: unknown key {named}; valid keys: {', '.join(SCHEMA)}")
    missing = [k for k, (required, _) in SCHEMA.items() if required and k not in raw]
    if missing:
        raise SpecError(
            f"{path}: missing {', '.join(missing)}: " + "; ".join(f"{k}: {SCHEMA[k][1]}" for k in missing)
        )

    def string(key: str, default: str | None = None) -> str:
        v = raw.get(key, default)
        if not isinstance(v, str) or not v.strip():
            raise bad(key, f"expected a non-empty string, got {v!r}")
        return v.strip()

    source = string("source")
    if source not in SOURCES:
        raise bad("source", f"unknown source {source!r}")
    arch = string("arch")
    if source == "entrypoint" and (":" not in arch or not all(arch.split(":", 1))):
        raise bad("arch", f"an entrypoint is package.module:factory, got {arch!r}")
    labels = raw["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise bad("labels", f"expected a list of non-empty strings, got {labels!r}")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise bad("labels", f"need at least 2 distinct labels, got {labels!r}")
    return ModelSpec(
        path=path,
        name=_name(string("name"), bad),
        source=source,
        arch=arch,
        checkpoint=(path.parent / string("checkpoint")).resolve(),
        labels=tuple(labels),
        input_size=_input_size(raw["input_size"], bad),
        mean=_triple(raw["mean"], "mean", bad, positive=False),
        std=_triple(raw["std"], "std", bad, positive=True),
        resize=_choice(raw.get("resize", "resize"), "resize", RESIZE_POLICIES, bad),
        crop_pct=_crop_pct(raw.get("crop_pct", 0.875), bad),
        canonizer=string("canonizer", "auto"),
        sha256=_sha(raw.get("sha256"), bad),
        allow_pickle=_bool(raw.get("allow_pickle", False), "allow_pickle", bad),
        hook_points=_str_table(raw.get("hook_points", {}), "hook_points", bad),
        default_cav_layer=string("default_cav_layer") if "default_cav_layer" in raw else None,
        factory_kwargs=_table(raw.get("factory_kwargs", {}), "factory_kwargs", bad),
    )


def _name(v: str, bad: Any) -> str:
    # A BentoML model name: lowercase letters, digits, '-', '_' and '.', starting alphanumeric.
    ok = v[0].isalnum() and all(c.isalnum() or c in "-_." for c in v) and v == v.lower()
    if not ok:
        raise bad("name", f"{v!r} is not a valid model name: lowercase letters, digits, '-', '_', '.'")
    return v


def _input_size(v: Any, bad: Any) -> tuple[int, int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        side = (3, v, v)
    elif (
        isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    ):
        side = (int(v[0]), int(v[1]), int(v[2]))
    else:
        raise bad("input_size", f"expected an integer or [3, H, W], got {v!r}")
    if side[0] != 3 or not all(8 <= s <= 4096 for s in side[1:]):
        raise bad("input_size", f"expected 3 channels and sides in [8, 4096], got {list(side)}")
    return side


def _triple(v: Any, key: str, bad: Any, *, positive: bool) -> tuple[float, float, float]:
    nums = isinstance(v, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    if not nums or len(v) != 3:
        raise bad(key, f"expected 3 numbers, got {v!r}")
    if positive and min(v) <= 0:
        raise bad(key, f"every value must be > 0, got {v!r}")
    if not positive and not all(-1.0 <= x <= 1.0 for x in v):
        raise bad(key, f"expected values on the [0, 1] pixel scale, got {v!r} (divide 0-255 values by 255)")
    return (float(v[0]), float(v[1]), float(v[2]))


def _choice(v: Any, key: str, valid: tuple[str, ...], bad: Any) -> str:
    if v not in valid:
        raise bad(key, f"{v!r} is not one of {', '.join(valid)}")
    return str(v)


def _crop_pct(v: Any, bad: Any) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0.1 <= v <= 1.0:
        raise bad("crop_pct", f"expected a number in [0.1, 1], got {v!r}")
    return float(v)


def _sha(v: Any, bad: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower()):
        raise bad("sha256", f"expected 64 hex digits, got {v!r}")
    return v.lower()


def _bool(v: Any, key: str, bad: Any) -> bool:
    if not isinstance(v, bool):
        raise bad(key, f"expected true or false, got {v!r}")
    return v


def _table(v: Any, key: str, bad: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise bad(key, f"expected a table, got {v!r}")
    return dict(v)


def _str_table(v: Any, key: str, bad: Any) -> dict[str, str]:
    table = _table(v, key, bad)
    if not all(isinstance(x, str) and x for x in table.values()):
        raise bad(key, f"every value must be a module path string, got {table!r}")
    return table


# ------------------------------------------------------------------------------- the model


def build(spec: ModelSpec) -> tuple[nn.Module, ModelCfg, str]:
    """The spec's model with its checkpoint loaded (eval mode), its config and the file's sha256.

    Raises:
        UnknownModelError: An architecture that timm, torchvision or the entrypoint do not have.
        WeightsError: A missing, unreadable or mismatched checkpoint (the message names the fix).
        SpecError: A head whose width is not the number of labels.
    """
    digest = sha256_file(spec.checkpoint) if spec.checkpoint.is_file() else None
    if digest is None:
        raise WeightsError(
            f"{spec.path}: checkpoint not found: {spec.checkpoint} (paths are relative to the spec file; "
            "medaudit never downloads weights)"
        )
    if spec.sha256 is not None and digest != spec.sha256:
        raise WeightsError(f"{spec.checkpoint}: sha256 {digest} is not the spec's {spec.sha256}")
    obj = _read_checkpoint(spec)
    if isinstance(obj, nn.Module):
        model = expose_class_token(obj)
    else:
        model = _construct(spec)
        _load_state(model, _state_dict(obj, spec), spec)
    model.eval()
    family = _family(model, spec)
    hooks = dict(spec.hook_points) or default_hook_points(model, family)
    default = spec.default_cav_layer or _default_layer(family, hooks)
    if default not in hooks:
        raise spec.fail("default_cav_layer", f"{default!r} is not a hook point; valid: {', '.join(hooks)}")
    for name, path in hooks.items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise spec.fail("hook_points", f"{name} = {path!r}: the model has no such module") from None
    cfg = ModelCfg(
        arch=spec.arch,
        source=spec.source,
        input_size=spec.input_size,
        mean=spec.mean,
        std=spec.std,
        labels=spec.labels,
        hook_points=hooks,
        default_cav_layer=default,
        canonizer=family,
        factory_kwargs=dict(spec.factory_kwargs),
        resize=spec.resize,
        crop_pct=spec.crop_pct,
    )
    return model, cfg, digest


def _family(model: nn.Module, spec: ModelSpec) -> str:
    """The canonizer family: the spec's, else detected. A model of no known family that also has
    layers without an LRP rule is refused naming those layers (the more useful news)."""
    from medaudit.models.xai.canonizers import CANONIZERS, detect_canonizer
    from medaudit.models.xai.composite import rule_for

    if spec.canonizer != "auto":
        if spec.canonizer not in CANONIZERS:
            raise spec.fail("canonizer", f"unknown {spec.canonizer!r}; valid: auto, {', '.join(CANONIZERS)}")
        return spec.canonizer
    try:
        return detect_canonizer(model)
    except CanonizerError as e:
        # one entry per layer type and reason: a network repeats its blocks, and their refusals
        refusals: dict[tuple[str, str], list[str]] = {}
        for path, module in model.named_modules():
            if path and next(module.children(), None) is None:
                try:
                    rule_for(module, first=False, path=path)
                except ConfigError as no_rule:
                    kind = f"{type(module).__module__}.{type(module).__name__}"
                    reason = str(no_rule).replace(f"layer {path!r} ({kind})", "{layers}", 1)
                    refusals.setdefault((kind, reason), []).append(path)
        if refusals:
            raise ConfigError(f"{spec.path}: {_grouped(refusals)}") from e
        raise CanonizerError(f"{spec.path}: {e}; or name one with canonizer = ... in the spec") from e


def _grouped(refusals: Mapping[tuple[str, str], list[str]], shown: int = 3) -> str:
    """One refusal per layer type, naming its first few layers and how many more; advice that
    several share ("Either the canonizer ...") is said once, at the end."""
    heads: list[str] = []
    advice: dict[str, None] = {}
    for (kind, reason), paths in refusals.items():
        more = f", and {len(paths) - shown} more" if len(paths) > shown else ""
        layers = (
            f"{kind} ({len(paths)} layer{'s' if len(paths) > 1 else ''}: {', '.join(paths[:shown])}{more})"
        )
        head, sep, tail = reason.replace("{layers}", layers, 1).partition(". Either ")
        heads.append(head)
        if sep:
            advice["Either " + tail] = None
    return "; ".join(heads) + "".join(f". {a}" for a in advice)


def _read_checkpoint(spec: ModelSpec) -> Any:
    try:
        return torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not spec.allow_pickle:
            raise WeightsError(
                f"{spec.checkpoint} is not a plain state_dict (torch.load with weights_only refused it: "
                f"{str(e).splitlines()[0]}). Save model.state_dict() instead, or, if you trust the file "
                f"(loading it runs its code), set allow_pickle = true in {spec.path}"
            ) from e
    except Exception as e:  # torch raises many kinds for a corrupt or foreign file
        raise WeightsError(f"cannot read checkpoint {spec.checkpoint}: {e}") from e
    try:
        obj = torch.load(spec.checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightsError(f"cannot unpickle {spec.checkpoint}: {e}") from e
    if not isinstance(obj, nn.Module | dict):
        raise WeightsError(f"{spec.checkpoint} holds a {type(obj).__name__}, not a module or state_dict")
    return obj


def _construct(spec: ModelSpec) -> nn.Module:
    try:
        return construct(spec.source, spec.arch, len(spec.labels), spec.factory_kwargs)
    except UnknownModelError as e:
        raise UnknownModelError(f"{spec.path}: arch: {e}") from e


def _state_dict(obj: Any, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint dict: a bare state_dict or one under a usual key."""
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{spec.checkpoint} holds no state_dict (a dict of tensor names to tensors)")
    # nn.DataParallel / DistributedDataParallel save every key under "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        model.load_state_dict(state)
        return
    head = [
        k for k in shapes if own[k].shape[1:] == state[k].shape[1:] and own[k].shape[0] == len(spec.labels)
    ]
    if head and not missing and not unexpected and len(head) == len(shapes):
        got = state[head[0]].shape[0]
        raise SpecError(
            f"{spec.path}: labels: the checkpoint's head ({head[0]}) has {got} outputs but the spec lists "
            f"{len(spec.labels)} labels {list(spec.labels)}; list the {got} class names in output order"
        )
    sample = ", ".join([*missing[:3], *unexpected[:3], *shapes[:3]])
    raise WeightsError(
        f"{spec.checkpoint} does not fit {spec.source} {spec.arch}: {len(missing)} missing, "
        f"{len(unexpected)} unexpected and {len(shapes)} mis-shaped tensors (e.g. {sample}). "
        f"Is it a checkpoint of another architecture? Check arch in {spec.path}"
    )


# ----------------------------------------------------------------------- family defaults


def default_hook_points(model: nn.Module, family: str) -> dict[str, str]:
    """Candidate CAV / correction layers of a family (each stage's output), method.md §9."""
    names = dict(model.named_children())
    if family == "resnet":
        return {f"layer{i}": f"layer{i}" for i in range(1, 5) if f"layer{i}" in names}
    if family == "vgg":
        features = model.get_submodule("features")
        layers = list(features.named_children())
        # The ReLU before each max-pool: the output of a VGG block (features.22 in vgg16 = block 4).
        return {
            f"features.{n}": f"features.{n}"
            for (n, m), (_, nxt) in zip(layers, layers[1:], strict=False)
            if isinstance(m, nn.ReLU) and isinstance(nxt, nn.MaxPool2d)
        }
    if family == "densenet":
        # The rectified output of dense block k is its transition's BN-ReLU (torchvision: ``relu``;
        # timm: ``norm``, a BatchNormAct2d); the blocks' own outputs are un-rectified concatenations.
        feats = dict(model.get_submodule("features").named_children())
        return {
            "denseblock" + k.removeprefix("transition"): (
                f"features.{k}.relu"
                if isinstance(getattr(t, "relu", None), nn.ReLU)
                else f"features.{k}.norm"
            )
            for k, t in feats.items()
            if k.startswith("transition")
        }
    if family == "efficientnet":
        if "blocks" in names:  # timm: the stages
            blocks = model.get_submodule("blocks")
            return {f"blocks.{i}": f"blocks.{i}" for i in range(len(blocks))}  # type: ignore[arg-type]
        # torchvision: features.0 is the stem conv, the last the 1x1 head conv, the rest the stages
        features = model.get_submodule("features")
        return {f"features.{i}": f"features.{i}" for i in range(1, len(features) - 1)}  # type: ignore[arg-type]
    if family == "vit":
        if "fc_norm" in names:  # timm: the pooled token after the final norm
            return {"inspection_layer": "fc_norm"}
        if "heads" in names and TV_VIT_CLASS_TOKEN.split(".", 1)[1] in dict(names["heads"].named_children()):
            return {"inspection_layer": TV_VIT_CLASS_TOKEN}  # torchvision, by expose_class_token
        raise UnknownModelError(
            "no default hook point for this ViT: its class token after the final norm is output by no "
            "module (timm's fc_norm, torchvision's heads); give [hook_points] inspection_layer"
        )
    raise UnknownModelError(f"no default hook points for family {family!r}; give [hook_points] in the spec")


def _default_layer(family: str, hooks: Mapping[str, str]) -> str:
    names = list(hooks)
    if family == "densenet":
        return "denseblock3" if "denseblock3" in hooks else names[-1]
    if family == "resnet":
        return "layer3" if "layer3" in hooks else names[-1]
    if family in ("vgg", "efficientnet"):
        return names[-2] if len(names) > 1 else names[-1]  # the paper's deep-but-not-last stage
    return names[-1]


# ----------------------------------------------------------------------------- inspect, check


@dataclass(frozen=True)
class LayerInfo:
    """A candidate hook point: a module, its type and its output's shape for one probe image."""

    path: str
    type: str
    shape: tuple[int, ...]
    hook_point: str | None  # the hook point name when the family's defaults (or the spec) use it


def probe_batch(cfg: ModelCfg, n: int = 2, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random images at the model's input size, normalised as the model expects."""

    g = torch.Generator().manual_seed(seed)
    return cfg.normalize(torch.rand(n, *cfg.input_size, generator=g))


def inspect_layers(model: nn.Module, cfg: ModelCfg, max_depth: int = 2) -> list[LayerInfo]:
    """Modules down to ``max_depth`` whose output is a feature map (or token sequence), in forward
    order, with their output shapes: where a CAV or a correction can sit."""
    by_path = {v: k for k, v in cfg.hook_points.items()}
    seen: list[LayerInfo] = []
    handles = []
    for path, module in model.named_modules():
        if not path or path.count(".") >= max_depth:
            continue

        def record(_m: nn.Module, _i: Any, out: Any, path: str = path, module: nn.Module = module) -> None:
            if isinstance(out, torch.Tensor) and out.ndim in (3, 4):
                seen.append(LayerInfo(path, type(module).__name__, tuple(out.shape[1:]), by_path.get(path)))

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(probe_batch(cfg, n=1))
    finally:
        for h in handles:
            h.remove()
    return seen


@dataclass(frozen=True)
class CheckReport:
    """What ``medaudit model check`` found (every step passed, or it raised)."""

    spec: ModelSpec
    cfg: ModelCfg
    sha256: str
    n_parameters: int
    canonized_max_diff: float  # max |canonized logits - original logits|, probe batch
    rules: list[Any]  # medaudit.models.xai.composite.LayerRule rows: path, module type, rule
    logits: list[float]  # the target (predicted) logit per probe image
    relevance_sums: list[float]  # the input relevance's sum per probe image

    @property
    def conservation_error(self) -> float:
        """Largest |sum R(input) - logit| / |logit| over the probe images (method.md §3)."""
        return max(
            abs(r - z) / max(abs(z), 1e-12) for r, z in zip(self.relevance_sums, self.logits, strict=True)
        )


def check(spec: ModelSpec, *, n_probe: int = 2) -> CheckReport:
    """Load the model offline and run everything an audit will do to it once.

    Raises:
        SpecError, WeightsError, UnknownModelError: The spec, the checkpoint or the architecture
            (the message names the fix).
        ConfigError: A layer without an LRP rule (named), or a canonizer that changes the function.
    """
    from medaudit.models.xai.canonizers import canonize
    from medaudit.models.xai.composite import rule_report
    from medaudit.models.xai.lrp import Explainer

    model, cfg, digest = build(spec)
    x = probe_batch(cfg, n=n_probe)
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = getattr(logits, "shape", type(logits).__name__)
        raise spec.fail(
            "arch", f"the model returns {shape}, expected logits of shape (batch, {len(spec.labels)})"
        )
    if logits.shape[1] != len(spec.labels):
        raise spec.fail(
            "labels", f"the model has {logits.shape[1]} outputs but the spec lists {len(spec.labels)} labels"
        )
    with torch.no_grad():
        canonical = canonize(model, cfg.canonizer)(x)
    diff = float((canonical - logits).abs().max())
    if diff > 1e-3 * float(logits.abs().max()) + 1e-4:
        raise ConfigError(
            f"canonizer {cfg.canonizer!r} changes the model's output by up to {diff:.3g} on the probe batch: "
            f"the model is a variant it does not support; name another canonizer in {spec.path}"
        )
    rules = rule_report(model, cfg.canonizer)
    e = Explainer(model, cfg).explain(x, ["pred"], return_input_relevance=True)
    assert e.input_relevance is not None
    target = e.logits.gather(1, e.class_indices[0].view(-1, 1)).view(-1)
    return CheckReport(
        spec=spec,
        cfg=cfg,
        sha256=digest,
        n_parameters=sum(p.numel() for p in model.parameters()),
        canonized_max_diff=diff,
        rules=list(rules),
        logits=[float(v) for v in target],
        relevance_sums=[float(v) for v in e.input_relevance[0].sum((1, 2, 3))],
    )
