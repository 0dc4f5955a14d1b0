"""A controlled attacked test set on real data: artifact instances cut from the user's own
annotated training images and pasted onto clean test images (method.md §5.4's "attacked" variant,
where the paper draws a synthetic artifact instead).

An *instance* is a training image annotated with the artifact together with its mask (ground
truth, or derived from the concept by ``medaudit localize --export-masks``): the pixels under the
mask are the artifact. :func:`paste` puts one instance on every clean test image, at the place it
had in its source image (rulers sit at the border, band-aids beside the lesion: position is part
of the artifact), chosen by a seeded draw, so the same seed gives the same attacked set. Images
and masks are at the model's input size, so positions agree.

Derived masks are binarised heatmaps and cover some skin around the artifact, which is pasted
with it; the card records the mask source so a reader knows which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medaudit.models.errors import ConfigError

#: An instance's mask must cover at least this share of the image to be cut (an empty or
#: one-pixel derived mask pastes nothing).
MIN_AREA = 0.002


@dataclass(frozen=True, eq=False)
class Instances:
    """Artifact instances: source images (K, 3, H, W) uint8, their masks (K, H, W) bool and the
    dataset indices they were cut from."""

    images: torch.Tensor
    masks: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.source)


def cut_instances(
    images: torch.Tensor, masks: np.ndarray, source: np.ndarray, max_instances: int = 256, seed: int = 0
) -> Instances:
    """The instances among annotated images: those whose mask covers at least :data:`MIN_AREA`
    of the image, at most ``max_instances`` of them (a seeded choice, kept in index order).

    Raises:
        ConfigError: No image has a usable mask.
    """
    m = np.asarray(masks) > 0.5
    if m.ndim != 3 or len(m) != len(images) or m.shape[1:] != tuple(images.shape[2:]):
        raise ConfigError(f"masks must be (N, H, W) = {(len(images), *images.shape[2:])}; got {m.shape}")
    keep = np.flatnonzero(m.reshape(len(m), -1).mean(1) >= MIN_AREA)
    if len(keep) == 0:
        raise ConfigError(
            f"none of the {len(images)} annotated images has an artifact mask covering "
            f"{100 * MIN_AREA:g} % of the image: no instance to paste"
        )
    if len(keep) > max_instances:
        rng = np.random.default_rng([seed, 0xA77AC])
        keep = np.sort(rng.choice(keep, size=max_instances, replace=False))
    return Instances(images[keep], m[keep], np.asarray(source)[keep])


def paste(
    images: torch.Tensor, inst: Instances, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every image with one instance pasted at its source position.

    Args:
        images: Clean images, uint8 (N, 3, H, W), of the instances' size.
        inst: The instances.
        seed: Seeds which instance goes on which image.

    Returns:
        ``(attacked, masks, chosen)``: the attacked images (a new tensor), the pasted pixels per
        image (N, H, W) float32 (the attacked images' exact artifact masks), and the instance
        index pasted on each image.
    """
    if tuple(images.shape[2:]) != tuple(inst.images.shape[2:]):
        raise ConfigError(
            f"images are {tuple(images.shape[2:])} but the instances {tuple(inst.images.shape[2:])}"
        )
    rng = np.random.default_rng([seed, 0x9A57E])
    chosen = rng.integers(0, len(inst), size=len(images))
    m = torch.from_numpy(inst.masks[chosen])[:, None]  # (N, 1, H, W) bool
    out = torch.where(m, inst.images[torch.from_numpy(chosen)], images)
    return out.contiguous(), inst.masks[chosen].astype(np.float32), chosen
