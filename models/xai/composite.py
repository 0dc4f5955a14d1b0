"""The composite of the LRP engine: which rule each layer gets (method.md §3.1).

zennit 0.5.1's ``EpsilonPlusFlat``, as rule modules of :mod:`medaudit.models.xai.rules`: the first
conv/linear Flat, other convs z⁺, linears ε, residual sums and average pools Norm, activations
and BatchNorms with no conv before them Pass; ``epsilon-gamma-flat`` puts the generalised γ-rule
in z⁺'s place, EfficientNet's default (:data:`COMPOSITES`, :data:`FAMILY_COMPOSITES`).
Transformers add AttnLRP's rules (:mod:`medaudit.models.xai.attention_rules`): attention by
AttnLRP or CP-LRP (``attention``, :data:`DEFAULT_ATTENTION`), LayerNorm by the identity rule on
σ with ε on the rest, average pooling over tokens Norm, LayerScale the uniform rule.
:data:`GRADIENT_TYPES` lists the layers that keep their plain gradient (max-pools, identities,
...); any other leaf is refused by name, never passed silently. :func:`build_lrp_model` applies
the composite to a canonized model, :func:`rule_report` says what each layer got.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.ops import StochasticDepth

from medaudit.models.errors import ConfigError
from medaudit.models.xai import attention_rules, rules
from medaudit.models.xai.canonizers import canonize
from medaudit.models.xai.layers import AttentionCore, Concat, PassThrough, ResidualSum, Scale, TokenMean
from medaudit.models.xai.rules_gamma import GammaConv

#: Attention rules (Achtibat et al. 2024, see :mod:`~medaudit.models.xai.attention_rules`).
ATTENTION_RULES: dict[str, type[nn.Module]] = {
    "attnlrp": attention_rules.AttnLRPAttention,
    "cp-lrp": attention_rules.CPLRPAttention,
}
#: The attention rule a ViT gets unless told otherwise: CP-LRP. On the synthderm-trained vit_tiny
#: (benchmarks/results/faithfulness_cpu_vit.md) it conserves the logit where AttnLRP does not
#: (99 % of it reaches the first block's input, against 42 %: AttnLRP's softmax linearisation
#: keeps a share as its bias), it costs 1.37x gradient×input against AttnLRP's 1.71x
#: (lrp_cpu_vit.md), and it ranks pixels about as faithfully (AOPC 0.73 against 0.75, both above
#: gradient×input's 0.53). lxt 2.1 also uses CP-LRP inside the attention of torchvision's ViT,
#: and You et al. 2025 ("When LRP diverges from leave-one-out in transformers") find relevance
#: through the values only closer to leave-one-out than AttnLRP's softmax rule.
DEFAULT_ATTENTION = "cp-lrp"

#: Composites for CNNs, by name (method.md §3.1): zennit 0.5.1's ``EpsilonPlusFlat`` (z⁺ on every
#: conv but the first) and ``EpsilonGammaFlat``, the same with the generalised γ-rule
#: (:class:`~medaudit.models.xai.rules_gamma.GammaConv`, γ = 0.25) in place of z⁺ — the composite of
#: the paper's ``utils/lrp_composites.py`` (unused there) and of Montavon et al. 2019's advice
#: for lower and middle layers. They differ only on convs.
#: ``epsilon`` puts ε on every conv and linear, the first too: a ViT's (below).
COMPOSITES = ("epsilon-plus-flat", "epsilon-gamma-flat", "epsilon")
DEFAULT_COMPOSITE = "epsilon-plus-flat"
#: canonizer id -> its composite where it is not :data:`DEFAULT_COMPOSITE` (docs/models.md).
#: EfficientNet: z⁺ drops the relevance of outputs with no same-sign contribution, which its linear
#: bottlenecks and SiLUs pass on (bias-free B0 keeps 0.93-0.95 of the logit at 64 px); γ conserves
#: (1 - 2e-5), and on the synthderm-trained B0 (96 px, faithfulness_cpu_efficientnet*.md) ranks
#: pixels at least as well (AOPC 113.8 against 112.6 over 64 images) and localizes the band-aid
#: better (IoU 0.324 against 0.277). It costs about 2x z⁺'s backward on the CPU.
#: ViT: its only conv is the patch embedding (16×16 kernel, stride 16), the first layer, whose Flat
#: rule spreads each token's relevance evenly over its patch, so the heatmap is a grid of uniform
#: blocks and nothing smaller than a patch can be localized. ε there is the relevance lxt's ViTs
#: give the pixels (gradient × input through the patch embedding); its linears are ε in both.
#: The paper ran no LRP on its ViT (method.md §2.4), so there is no setting of theirs to keep.
#: On three synthderm ViTs ε ranks pixels above Flat (AOPC 2.71/2.00/1.50 against 2.42/1.79/1.24;
#: under Flat the 128 px shortcut ViT ranked below gradient×input), docs/models.md#faithfulness.
FAMILY_COMPOSITES: dict[str, str] = {"efficientnet": "epsilon-gamma-flat", "vit": "epsilon"}

#: Modules that get the Pass rule. zennit 0.5.1's ``types.Activation`` (minus
#: ``MultiheadAttention``, which the ViT canonizer writes out as an AttentionCore) plus BatchNorm,
#: which zennit also passes (``layer_map_base``); canonizers merge every BatchNorm that follows a conv, so
#: this is the rule of a BatchNorm with no conv before it (DenseNet, method.md §3.1).
PASS_TYPES: tuple[type[nn.Module], ...] = (
    nn.ELU, nn.Hardshrink, nn.Hardsigmoid, nn.Hardtanh, nn.Hardswish, nn.LeakyReLU, nn.LogSigmoid,
    nn.PReLU, nn.ReLU, nn.ReLU6, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU,
    nn.Softplus, nn.Softshrink, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Threshold,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, PassThrough,
)  # fmt: skip
#: Leaf modules that keep plain autograd gradient, with the rule name :func:`rule_report` shows.
#: zennit 0.5.1's ``EpsilonPlusFlat`` maps none of them to a rule (method.md §3.1, §11.2):
#: max-pooling's gradient is winner-take-all; dropout and drop-path (at inference), identity, flatten and
#: unflatten are the identity on relevance; a concatenation's gradient splits relevance by part
#: (:class:`~models.xai.layers.Concat`).
#: Any other leaf module is refused by :func:`build_lrp_model`: no layer is explained by a
#: gradient nobody chose.
_MAX_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_IDENTITIES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Identity, nn.Flatten, nn.Unflatten,
    StochasticDepth,  # torchvision's drop-path: the identity at inference, as dropout
)  # fmt: skip
GRADIENT_TYPES: dict[type[nn.Module], str] = {
    **dict.fromkeys(_MAX_POOLS, "Gradient (winner-take-all)"),
    **dict.fromkeys(_IDENTITIES, "Gradient (identity)"),
    Concat: "Split",
}
#: Modules that only hold other modules; without children they compute nothing.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
#: Layer types with a rule in zennit's EpsilonPlusFlat that this engine does not implement.
_UNSUPPORTED = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.AvgPool1d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool3d, nn.MultiheadAttention,
)  # fmt: skip
#: Rule module class -> the rule's name in :func:`rule_report` (method.md §3.1).
_RULE_NAMES: dict[type[nn.Module], str] = {
    rules.FlatConv: "Flat", rules.FlatLinear: "Flat", rules.ZPlusConv: "ZPlus", GammaConv: "Gamma",
    rules.EpsilonLinear: "Epsilon", rules.EpsilonConv: "Epsilon", rules.NormSum: "Norm",
    rules.NormAvgPool: "Norm", rules.PassRule: "Pass",
    attention_rules.AttnLRPAttention: "AttnLRP", attention_rules.CPLRPAttention: "CP-LRP",
    attention_rules.LayerNormRule: "LayerNorm (identity on σ, ε)", attention_rules.NormTokenMean: "Norm",
}  # fmt: skip


@dataclass(frozen=True)
class LayerRule:
    """Which LRP rule one layer of the canonized model gets (see :func:`rule_report`).

    Attributes:
        path: dotted module path in the canonized model (mostly the original model's path;
            merged BatchNorms are ``Identity`` there, canonizers add ``residual_sum``/``concat``).
        module: the layer's class name.
        rule: ``"Flat"``, ``"ZPlus"``, ``"Epsilon"``, ``"Norm"``, ``"Pass"`` (a Pass owns its
            whole subtree: nothing inside gets relevance of its own), ``"AttnLRP"``/``"CP-LRP"``
            (an attention core), ``"LayerNorm …"``, ``"Split"`` or ``"Gradient …"``
            (:data:`GRADIENT_TYPES`).
    """

    path: str
    module: str
    rule: str


def _overridden_base(module: nn.Module, bases: tuple[type[nn.Module], ...]) -> type[nn.Module] | None:
    """The base class whose ``forward`` the rule assumes, if ``module``'s class replaces it."""
    base = next((b for b in bases if isinstance(module, b)), None)
    return base if base is not None and type(module).forward is not base.forward else None


def _gradient_name(module: nn.Module) -> str | None:
    """The :data:`GRADIENT_TYPES` name of ``module`` (subclasses too, e.g. timm's LayerNorm)."""
    return next((GRADIENT_TYPES[c] for c in type(module).__mro__ if c in GRADIENT_TYPES), None)


def check_attention(attention: str) -> None:
    """Raises :class:`ConfigError` naming the valid choices for an unknown attention rule."""
    if attention not in ATTENTION_RULES:
        raise ConfigError(f"attention={attention!r}; valid: {', '.join(ATTENTION_RULES)}")


def family_composite(kind: str) -> str:
    """The composite :class:`~medaudit.models.xai.lrp.Explainer` uses for canonizer ``kind``."""
    return FAMILY_COMPOSITES.get(kind, DEFAULT_COMPOSITE)


def check_composite(composite: str) -> None:
    """Raises :class:`ConfigError` naming the valid choices for an unknown composite."""
    if composite not in COMPOSITES:
        raise ConfigError(f"composite={composite!r}; valid: {', '.join(COMPOSITES)}")


def rule_for(
    module: nn.Module,
    first: bool,
    path: str = "",
    attention: str = DEFAULT_ATTENTION,
    composite: str = DEFAULT_COMPOSITE,
) -> nn.Module | None:
    """The rule module replacing ``module`` (``None``: keep it), method.md §3.1.

    ``first`` marks the first conv/linear in module order, which gets Flat. ``None`` is returned
    for containers (their children get rules) and :data:`GRADIENT_TYPES` (plain gradient).
    ``attention`` picks the rule of an :class:`AttentionCore` (:data:`ATTENTION_RULES`),
    ``composite`` that of the convs after the first (:data:`COMPOSITES`).

    Raises:
        ConfigError: a leaf module with no rule and no reason to keep its gradient, or a
            conv/linear/pool subclass with its own ``forward`` (the rule would compute another
            function), naming ``path`` and the type.
    """
    where = f"layer {path!r} ({type(module).__module__}.{type(module).__name__})"
    if isinstance(module, _UNSUPPORTED):
        raise ConfigError(f"no LRP rule implemented for {where}")
    base = _overridden_base(module, (*_CONVS, nn.Linear, *_AVG_POOLS))
    if base is not None:
        raise ConfigError(
            f"{where} overrides forward() of {base.__name__}; a rule would compute the base "
            "class's function. Have the canonizer replace it (models/xai/canonizers.py)"
        )
    if isinstance(module, _CONVS):
        if composite == "epsilon":
            return rules.EpsilonConv(module)
        if first:
            return rules.FlatConv(module)
        return GammaConv(module) if composite == "epsilon-gamma-flat" else rules.ZPlusConv(module)
    if isinstance(module, nn.Linear):
        return rules.FlatLinear(module) if first and composite != "epsilon" else rules.EpsilonLinear(module)
    if isinstance(module, ResidualSum):
        return rules.NormSum()
    if isinstance(module, _AVG_POOLS):
        return rules.NormAvgPool(module)
    if isinstance(module, (*PASS_TYPES, Scale)):
        return rules.PassRule(module)  # Scale: a constant factor, the uniform rule gives x it all
    if isinstance(module, AttentionCore):
        check_attention(attention)
        return ATTENTION_RULES[attention](module)
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise ConfigError(
                f"no LRP rule for {where}: a LayerNorm over {module.normalized_shape}, not the last dim"
            )
        return attention_rules.LayerNormRule(module)
    if isinstance(module, TokenMean):
        return attention_rules.NormTokenMean(module)
    if _gradient_name(module) is not None or isinstance(module, _CONTAINERS):
        return None
    if next(module.children(), None) is not None:
        return None  # a container: its children get rules, its own functional ops keep gradient
    raise ConfigError(
        f"no LRP rule for {where}. Either the canonizer of this family should rewrite it into "
        "supported layers (models/xai/canonizers.py), it needs a rule (models/xai/rules.py and "
        "rule_for), or, if it is the identity at inference, its type belongs in GRADIENT_TYPES"
    )


def _rule_plan(
    canonical: nn.Module, attention: str = DEFAULT_ATTENTION, composite: str = DEFAULT_COMPOSITE
) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """``(path, module, rule module or None)`` for every module that gets a rule or keeps gradient.

    Mirrors zennit's ``SpecialFirstLayerMapComposite``: the first ``Conv``/``Linear`` in
    ``named_modules()`` order (descending into every module) is the "first layer". A rule owns
    its whole subtree (e.g. Pass over attention): nothing below it is visited.
    """
    first_path = next(
        (name for name, m in canonical.named_modules() if isinstance(m, _CONVS + (nn.Linear,))), None
    )
    plan: list[tuple[str, nn.Module, nn.Module | None]] = []
    skip_below: list[str] = []
    for name, module in canonical.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip_below):
            continue
        rule = rule_for(module, first=name == first_path, path=name, attention=attention, composite=composite)
        if rule is not None:
            plan.append((name, module, rule))
            skip_below.append(name)
        elif next(module.children(), None) is None and not isinstance(module, _CONTAINERS):
            plan.append((name, module, None))  # a GRADIENT_TYPES leaf
    return plan


def build_lrp_model(
    canonical: nn.Module, attention: str = DEFAULT_ATTENTION, composite: str = DEFAULT_COMPOSITE
) -> nn.Module:
    """Replace, in place, every layer of a canonized model by its rule module; return the model.

    Raises:
        ConfigError: a leaf layer with no rule (see :func:`rule_for`), an unknown
            ``attention`` rule or ``composite``; nothing is replaced then.
    """
    check_attention(attention)
    check_composite(composite)
    for name, _, rule in _rule_plan(canonical, attention, composite):
        if rule is None:
            continue
        parent_path, _, attr = name.rpartition(".")
        setattr(canonical.get_submodule(parent_path) if parent_path else canonical, attr, rule)
    return canonical


def rule_report(
    model: nn.Module, kind: str, attention: str = DEFAULT_ATTENTION, composite: str | None = None
) -> list[LayerRule]:
    """Which rule each layer of ``model`` gets under canonizer ``kind``, in module order.

    ``model`` is not modified (it is canonized as a copy, as :class:`Explainer` does).
    ``composite``: as :class:`Explainer`'s, ``None`` for the family's (:func:`family_composite`).

    Raises:
        UnknownModelError: ``kind`` is not a canonizer id.
        CanonizerError: the model is a variant the canonizer does not support.
        ConfigError: a layer has no rule (the same refusal :class:`Explainer` would give), or
            an unknown ``attention`` rule or ``composite``.
    """
    check_attention(attention)
    composite = family_composite(kind) if composite is None else composite
    check_composite(composite)
    report = []
    for path, module, rule in _rule_plan(canonize(model, kind), attention, composite):
        name = (_gradient_name(module) or "Gradient") if rule is None else _RULE_NAMES[type(rule)]
        report.append(LayerRule(path=path, module=type(module).__name__, rule=name))
    return report
