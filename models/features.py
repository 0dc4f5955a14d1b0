"""The max-pooled activation φ, the feature every CAV is fitted on, scored with and corrected at.

One definition for the whole ML side: concept scores (:mod:`medaudit.models.xai.lrp`), the
corrections' CAV data and projection (:mod:`medaudit.models.corrections`), evaluation and the
offline audit all call :func:`max_pool_spatial`, so fit and use cannot drift apart (mixing
pooling between fit and use breaks μ0, method.md §11.4).
"""

from __future__ import annotations

import torch


def max_pool_spatial(a: torch.Tensor) -> torch.Tensor:
    """φ(x) = max over space of a layer output (method.md notation and §1.1, ``cavs_max``).

    Args:
        a: ``(B, C, *spatial)`` activations (or relevances), or ``(B, C)`` for a layer without
            space such as a ViT's CLS token (method.md §11.4), which is returned unchanged.

    Returns:
        ``(B, C)``: per sample and channel, the maximum over all spatial positions.
    """
    return a if a.ndim == 2 else a.flatten(2).amax(-1)
