"""What the offline audit is asked to do beyond the model, the data and the concepts.

:class:`AuditOptions` holds the knobs of :func:`~medaudit.models.audit.run.run_audit`;
:func:`default_concept_layers` gives the built-in per-concept layers the CLI starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from medaudit.models.registry import ModelCfg

#: ``progress(description, total) -> advance(n)``, called once per long step.
Progress = Callable[[str, int], Callable[[int], None]]

SPLITS = ("train", "val", "test")
#: SpRAy shows up to 24 outliers (method.md §6); the acceptance counts hits among them.
TOP_K = 24

#: Per-concept CAV/localization layer where it differs from the architecture's default ℓ; see
#: :func:`default_concept_layers`. Measured on resnet18 at 128 px (demo data config, trained 6
#: epochs), 50 artifact test images per cell, svm CAVs — held-out AUROC / mean IoU:
#:
#: ============  =====================  =====================  =====================
#: concept       identity_0 (32²)       identity_1 (16²)       identity_2 (8²)
#: ============  =====================  =====================  =====================
#: band_aid      1.000 / 0.17           1.000 / 0.27           0.998 / 0.14
#: ruler         –                      0.999 / 0.57           0.991 / 0.20
#: skin_marker   –                      0.972 / 0.13           0.916 / 0.08
#: ============  =====================  =====================  =====================
#:
#: Those figures are synthderm generator 4. Generator 5 (the light beige plaster, see
#: models/data/artifacts.py), default build, all 180 band-aid test images: band_aid at identity_0
#: 1.000 / 0.647, identity_1 1.000 / 0.688, identity_2 1.000 / 0.302.
#:
#: identity_1 wins for every concept. At 128 px its 16×16 grid is the resolution the paper's
#: identity_2 has at 224 px (14×14, method.md §9); identity_2 at 128 px is 8×8, too coarse to
#: outline a ruler, and identity_0 spreads positive relevance over the skin texture.
DEFAULT_CONCEPT_LAYERS: dict[str, str] = {
    "band_aid": "identity_1",
    "ruler": "identity_1",
    "skin_marker": "identity_1",
}


#: The feature-map side the per-concept layers give: identity_1's 16×16 at 128 px above, and the
#: paper's identity_2 at 224 px (14×14, method.md §9).
CONCEPT_GRID = 16


def default_concept_layers(
    cfg: ModelCfg, artifacts: Sequence[str], model: nn.Module | None = None
) -> dict[str, str]:
    """The built-in per-concept layers for the declared concepts.

    On the registry's models, the named hook points of :data:`DEFAULT_CONCEPT_LAYERS`. A model
    from a spec has other hook point names (a timm ResNet's ``layer1``…``layer4``): given the
    ``model``, those concepts take the hook point whose feature map is nearest
    :data:`CONCEPT_GRID` cells a side at the model's input size (the deeper one on a tie), the
    resolution the table above measured best, instead of the architecture's default ℓ."""
    named = {a: ln for a, ln in DEFAULT_CONCEPT_LAYERS.items() if a in artifacts and ln in cfg.hook_points}
    missing = [a for a in DEFAULT_CONCEPT_LAYERS if a in artifacts and a not in named]
    if model is None or not missing:
        return named
    grid = grid_layer(model, cfg)
    return {**named, **dict.fromkeys(missing, grid)} if grid else named


def grid_layer(model: nn.Module, cfg: ModelCfg, side: int = CONCEPT_GRID) -> str | None:
    """The hook point whose (C, H, W) output is nearest ``side`` cells a side (the deeper one on a
    tie); None where no hook point gives a feature map (a ViT's tokens)."""
    from medaudit.models.spec import inspect_layers

    depth = max((p.count(".") for p in cfg.hook_points.values()), default=0) + 1
    maps = [(i, li) for i, li in enumerate(inspect_layers(model, cfg, max_depth=depth)) if li.hook_point]
    maps = [(i, li) for i, li in maps if len(li.shape) == 3]
    if not maps:
        return None
    _, best = min(maps, key=lambda t: (abs(t[1].shape[1] - side), -t[0]))
    return best.hook_point


@dataclass(frozen=True)
class AuditOptions:
    """Knobs of :func:`run_audit` beyond the model, the data and the concepts.

    Attributes:
        concept_layers: Per-concept CAV/localization layer, overriding ``layer`` (method.md §9
            localizes each artifact at its own layer).
        cav_scope: Per-concept class indices whose samples fit the CAV (method.md §1.1);
            concepts not named use every class.
        max_per_split: Audit at most this many samples of a split (seeded random subset; the
            report says so). Missing splits are audited whole.
        max_localize: At most this many artifact test images per concept for IoU/ρ.
        n_gallery: Top-ranked test samples per concept whose localization the report shows.
        top_k: Outliers per discovery method shown and counted.
        spray_size: Side to which input heatmaps are area-averaged for SpRAy (and stored).
        batch_size: Images per Explainer call.
        target_fpr: False-positive rate of the concept bank's presence threshold.
        seed: Seeds subsampling, CV folds and the spectral embedding.
        discovery_layer: Layer of the channel (model) view; the default layer ℓ when None.
        channel_features: What the channel view clusters: ``"relevance"`` (max-pooled LRP relevance,
            the CRP ``rels_max`` of method.md §6) or ``"activation"`` (max-pooled activations,
            the ``cavs_max`` alternative §6 lists).
        exclude_declared: Run discovery on the samples that carry none of the declared artifacts:
            those are already modelled, and the Reveal step is after what is not.
    """

    concept_layers: Mapping[str, str] = field(default_factory=dict)
    cav_scope: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    max_per_split: Mapping[str, int] = field(default_factory=dict)
    max_localize: int = 200
    n_gallery: int = 6
    top_k: int = TOP_K
    spray_size: int = 32
    batch_size: int = 32
    target_fpr: float = 0.05
    seed: int = 0
    discovery_layer: str | None = None
    channel_features: str = "relevance"
    exclude_declared: bool = True
