"""Localization post-processing (method.md §2, §7, §11.6) on synthetic maps."""

from __future__ import annotations

import numpy as np
import pytest

from medaudit.models.errors import InvalidArrayError
from medaudit.models.xai.localize import (
    artifact_relevance_eval,
    artifact_relevance_rho,
    binarize,
    concept_mask,
    concept_seed,
    family_mask_pooling,
    gaussian_blur,
    iou,
    otsu_threshold,
    pool_superpixels,
    refine_eval_mask,
    superpixels,
    upsample,
)


def _disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.uint8)


def test_concept_seed_is_relu_activation_times_signed_cav() -> None:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, 4, 3, 3))
    v = np.array([0.5, -0.5, 0.5, -0.5])
    seed = concept_seed(acts, v)
    np.testing.assert_array_equal(seed, np.maximum(acts, 0) * v[None, :, None, None])
    assert (seed[:, 1] <= 0).all() and (seed[:, 1] < 0).any()  # the CAV keeps its sign (§2.1)
    np.testing.assert_array_equal(concept_seed(acts[0], v), seed[0])
    with pytest.raises(InvalidArrayError):
        concept_seed(acts, v[:3])


@pytest.mark.parametrize(("kernel", "sigma"), [(7, 8.0), (41, 8.0), (5, 1.5)])
def test_gaussian_blur_matches_torchvision(kernel: int, sigma: float) -> None:
    import torch
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    img = np.random.default_rng(1).random((48, 56))
    ref = tv_blur(torch.from_numpy(img)[None], [kernel, kernel], [sigma, sigma])[0].numpy()
    np.testing.assert_allclose(gaussian_blur(img, kernel, sigma), ref, rtol=1e-10, atol=1e-12)


def _best_otsu_split(values: np.ndarray) -> float:
    """Brute force: the split between sorted unique values with the largest between-class variance."""
    uniq = np.unique(values)
    best, best_t = -1.0, uniq[0]
    for t in uniq[:-1]:
        lo, hi = values[values <= t], values[values > t]
        var = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
        if var > best:
            best, best_t = var, t
    return float(best_t)


def test_otsu_splits_a_hand_made_bimodal_histogram() -> None:
    # 60 pixels at 1-3 (background), 40 at 8-9 (object): the split must fall between 3 and 8.
    values = np.repeat([1.0, 2.0, 3.0, 8.0, 9.0], [20, 30, 10, 25, 15])
    tau = otsu_threshold(values)
    assert 3.0 <= tau < 8.0
    np.testing.assert_array_equal(values > tau, values > _best_otsu_split(values))


def test_otsu_agrees_with_brute_force_on_random_mixtures() -> None:
    """Otsu runs on a 256-bin histogram (as skimage's does): brute-force the same quantised values."""
    rng = np.random.default_rng(2)
    for _ in range(5):
        values = np.concatenate([rng.normal(2, 0.5, 300), rng.normal(5, 1.0, 100)])
        edges = np.linspace(values.min(), values.max(), 257)
        centers = (edges[:-1] + edges[1:]) / 2
        quantised = centers[np.clip(np.searchsorted(edges, values, side="right") - 1, 0, 255)]
        assert otsu_threshold(values) == pytest.approx(_best_otsu_split(quantised), rel=1e-12)


def test_otsu_of_a_constant_image_is_that_constant() -> None:
    assert otsu_threshold(np.full((4, 4), 0.25)) == 0.25
    assert binarize(np.zeros((16, 16))).sum() == 0


def test_concept_seed_and_binarize_recover_the_concept_region() -> None:
    """A blob whose channel pattern is v, on background channels orthogonal to v, at 14×14."""
    rng = np.random.default_rng(3)
    c, s, size = 16, 14, 224
    v = np.zeros(c)
    v[:4] = 0.5
    acts = np.abs(rng.normal(0, 0.3, size=(c, s, s)))
    acts[:4] *= 0.1  # concept channels are quiet away from the concept
    blob = _disk(s, 4, 9, 2.5).astype(bool)
    acts[:4, blob] += 2.0
    heat = concept_seed(acts, v).sum(axis=0)  # stand-in for the LRP pass to the input
    mask = binarize(upsample(heat, (size, size)))
    gt = upsample(blob.astype(np.float64), (size, size)) > 0.5
    assert mask.dtype == np.uint8 and mask.shape == (size, size)
    assert iou(mask, gt) > 0.5


def test_upsample_keeps_constant_maps_and_batches() -> None:
    maps = np.stack([np.full((7, 7), 2.0), np.full((7, 7), -1.0)])
    out = upsample(maps, (28, 21))
    assert out.shape == (2, 28, 21)
    np.testing.assert_allclose(out[0], 2.0)
    np.testing.assert_allclose(out[1], -1.0)
    assert binarize(out).shape == (2, 28, 21)


def test_iou_by_hand() -> None:
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[:2, :2] = 1  # 4 pixels
    b[1:3, 1:3] = 1  # 4 pixels, 1 shared
    assert iou(a, b) == pytest.approx(1 / 7)
    assert iou(a, a) == 1.0
    assert iou(np.zeros((4, 4)), np.zeros((4, 4))) == 0.0
    with pytest.raises(InvalidArrayError, match="one shape"):
        iou(a, b[:3])


def test_rho_is_the_positive_relevance_share_inside_the_mask() -> None:
    heat = np.zeros((4, 4))
    heat[0, 0], heat[0, 1], heat[3, 3] = 3.0, 1.0, -5.0
    mask = np.zeros((4, 4))
    mask[0, 0] = 1
    assert artifact_relevance_rho(heat, mask) == pytest.approx(3.0 / 4.0)
    heat[1, 1] = -100.0  # negative relevance anywhere does not change ρ (§2.3 uses H⁺)
    assert artifact_relevance_rho(heat, mask) == pytest.approx(3.0 / 4.0)
    assert artifact_relevance_rho(np.zeros((4, 4)), mask) == 0.0


def test_refined_eval_mask_is_a_dilated_version_of_the_mask() -> None:
    mask = _disk(96, 48, 48, 10).astype(np.float64) * 0.7
    mask[0, 0] = 0.05  # below 0.1 · max: dropped
    refined = refine_eval_mask(mask)
    assert refined.dtype == np.uint8
    assert refined[mask > 0.07].all() and refined.sum() > (mask > 0.07).sum()
    assert refined[0, 0] == 0 and refined[48, 75] == 0  # slightly dilated, not everywhere
    assert refine_eval_mask(np.zeros((8, 8))).sum() == 0


def test_eval_relevance_uses_absolute_values_and_differs_from_rho() -> None:
    heat = np.zeros((96, 96))
    mask = _disk(96, 48, 48, 10)
    heat[48, 48] = -2.0  # negative relevance inside the artifact
    heat[5, 5] = 1.0  # positive relevance far outside
    heat[48, 59] = 1.0  # just outside the raw mask, inside the dilated one
    assert artifact_relevance_eval(heat, mask) == pytest.approx(3.0 / 4.0)
    assert artifact_relevance_rho(heat, mask) == pytest.approx(0.0)
    assert artifact_relevance_eval(heat, np.zeros_like(mask)) == 0.0


# ------------------------------------------------------------- superpixel pooling (ViT masks)


def _bar_image(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A grey textured skin with a tan bar across it (a band-aid), and the bar's mask."""
    rng = np.random.default_rng(5)
    img = np.clip(rng.normal(150, 6, (size, size, 3)), 0, 255)
    bar = np.zeros((size, size), dtype=np.uint8)
    bar[26:38, 8:56] = 1
    img[bar == 1] = (222, 184, 135)
    return img.astype(np.uint8), bar


def test_pool_superpixels_sums_each_segment_by_hand() -> None:
    seg = np.array([[0, 0, 1], [2, 1, 1]])
    h = np.array([[1.0, -3.0, 2.0], [5.0, 0.5, 0.25]])
    np.testing.assert_allclose(pool_superpixels(h, seg), [[-2.0, -2.0, 2.75], [5.0, 2.75, 2.75]])
    with pytest.raises(InvalidArrayError, match="one shape"):
        pool_superpixels(h, seg[:, :2])


def test_superpixels_follow_the_object_outline_and_accept_floats() -> None:
    img, bar = _bar_image()
    seg = superpixels(img)
    assert seg.shape == bar.shape and seg.min() == 0
    assert 20 <= seg.max() + 1 <= 150  # about 100 segments (method.md §2.4)
    # segments do not straddle the bar's edge: each lies almost wholly inside or outside it
    inside = np.bincount(seg.ravel(), weights=bar.ravel()) / np.bincount(seg.ravel())
    assert ((inside < 0.1) | (inside > 0.9)).mean() > 0.9, inside
    np.testing.assert_array_equal(superpixels(img.astype(np.float32) / 255.0), seg)
    with pytest.raises(InvalidArrayError, match=r"\(H, W, 3\)"):
        superpixels(img[..., 0])


def test_superpixel_masks_cover_the_object_where_relevance_hits_only_its_patches() -> None:
    # a ViT's concept relevance: on a few spots of the artifact (its decisive patches), not all of it
    img, bar = _bar_image()
    heat = np.zeros(bar.shape)
    heat[30:34, 10:14] = 1.0
    heat[30:34, 50:54] = 0.8
    heat[31, 30] = 0.5
    pixels = concept_mask(heat, img, "pixels")
    pooled = concept_mask(heat, img, "superpixels")
    np.testing.assert_array_equal(pixels, binarize(heat))
    assert iou(pooled, bar) > iou(pixels, bar) + 0.1, (iou(pooled, bar), iou(pixels, bar))
    assert (pooled & bar).sum() / pooled.sum() > 0.7  # what it adds is mostly the bar


def test_mask_pooling_is_per_family_and_checked() -> None:
    assert family_mask_pooling("vit") == "superpixels"
    assert family_mask_pooling("resnet") == "pixels" and family_mask_pooling("efficientnet") == "pixels"
    img, _ = _bar_image()
    with pytest.raises(InvalidArrayError, match="valid: pixels, superpixels"):
        concept_mask(np.zeros((64, 64)), img, "segments")
    with pytest.raises(InvalidArrayError, match="needs the image"):
        concept_mask(np.zeros((64, 64)), None, "superpixels")
