"""Which model families' LRP heatmaps are validated, and by what: one table, one refusal.

A family's heatmaps are validated when the engine has been checked against a reference
implementation of its rules on that family's layers and its heatmaps were measured to be
faithful. Until then a served version of the family must not show a heatmap: a blank or wrong one
beside normal-looking concept scores and flags is worse than none (the class-token ViT under
zennit ≤ 0.5.1's attention-as-Pass rules gave all-zero heatmaps). :func:`heatmap_refusal` says
why, for the service to put in its answer and its start-up log.
"""

from __future__ import annotations

from collections.abc import Mapping

#: canonizer id (``ModelCfg.canonizer``) -> the evidence that its heatmaps may be shown.
VALIDATED: Mapping[str, str] = {
    "resnet": "zennit 0.5.1 EpsilonPlusFlat parity (tests/unit/test_lrp_reference.py); region "
    "perturbation above gradient×input and random, band-aid IoU (faithfulness_cpu_resnet.md)",
    "vgg": "zennit 0.5.1 EpsilonPlusFlat parity (tests/unit/test_lrp_reference.py)",
    "densenet": "zennit 0.5.1 parity with its canonizers (tests/unit/test_lrp_families.py)",
    "efficientnet": "zennit 0.5.1 parity with its canonizers, epsilon-gamma-flat (zennit's Gamma) and "
    "EpsilonPlusFlat, conservation without biases (tests/unit/test_lrp_families.py); region "
    "perturbation below random and gradient×input for both composites (faithfulness_cpu_efficientnet.md)",
    "vit": "lxt 2.1 parity, AttnLRP and CP-LRP, timm and torchvision, ε through the patch embedding "
    "(tests/unit/test_attention_lrp.py); region perturbation above gradient×input and random "
    "(faithfulness_cpu_vit.md, faithfulness_cpu_vit64_band_aid.md)",
}


def heatmap_refusal(family: str) -> str | None:
    """``None`` when heatmaps of canonizer ``family`` may be shown, else the sentence saying why not."""
    if family in VALIDATED:
        return None
    return (
        f"heatmap withheld: the LRP rules of model family {family!r} are not validated yet "
        f"(validated: {', '.join(sorted(VALIDATED))}); the prediction and concept scores stand, "
        "the heatmap and concept masks would not be trustworthy"
    )
