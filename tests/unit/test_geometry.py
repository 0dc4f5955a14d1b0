"""One input geometry for serving, building and auditing (models/data/geometry.py): a model spec
that centre-crops is built and audited on the pixels it is served, images and masks alike."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medaudit.models.build_data import build_data
from medaudit.models.data.geometry import Geometry, model_view, to_source_grid
from medaudit.models.data.registry import open_dataset
from medaudit.models.data.synthetic import SynthDermConfig
from medaudit.service.inputs import to_model_input
from tests.unit.datasets_data import write_csv

H, W, SIDE = 60, 90, 24
#: a band-aid square near the left border: a centre crop cuts part of it, a stretch keeps it all
BOX = (slice(20, 40), slice(2, 22))


@pytest.fixture(scope="module")
def landscape(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 60×90 photographs in the folder layout, two with a band-aid square and its mask."""
    root = tmp_path_factory.mktemp("landscape")
    (root / "images").mkdir()
    (root / "masks" / "band_aid").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, ann = [], []
    for i in range(4):
        rgb = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
        if i % 2 == 0:
            rgb[BOX] = 255
            mask = np.zeros((H, W), np.uint8)
            mask[BOX] = 255
            Image.fromarray(mask).save(root / "masks" / "band_aid" / f"img{i}.png")
        Image.fromarray(rgb).save(root / "images" / f"img{i}.png")
        rows.append([f"img{i}", "ab"[i % 2], ("train", "train", "val", "test")[i]])
        ann.append([f"img{i}", "band_aid" if i % 2 == 0 else ""])
    write_csv(root / "labels.csv", ("image", "label", "split"), rows)
    write_csv(root / "artifacts.csv", ("image", "artifacts"), ann)
    return root


CROP = SimpleNamespace(resize="center_crop", crop_pct=0.8, input_size=(3, SIDE, SIDE))
STRETCH = SimpleNamespace(resize="resize", crop_pct=0.875, input_size=(3, SIDE, SIDE))


def test_the_service_and_the_datasets_fit_images_alike(landscape: Path) -> None:
    ds = open_dataset(f"folder:{landscape}")
    full = ds.load_image(0)
    assert model_view(ds, STRETCH) is ds  # a stretch is what every dataset's load_image(i, size) does
    crop = model_view(ds, CROP)
    got = crop.load_image(0, SIDE)
    np.testing.assert_array_equal(got, to_model_input(full, SIDE, "center_crop", 0.8))
    assert not np.array_equal(got, ds.load_image(0, SIDE))
    assert crop.load_image(0).shape == (H, W, 3)  # no size: the file as it is
    assert crop.label_names == ds.label_names and len(crop) == len(ds)


def test_masks_follow_their_images_through_the_crop(landscape: Path) -> None:
    crop = model_view(open_dataset(f"folder:{landscape}"), CROP)
    img, mask = crop.load_image(0, SIDE), crop.mask(0, "band_aid", SIDE)
    assert mask.dtype == bool and mask.shape == (SIDE, SIDE)
    # the white square is where the mask is, and the crop cut some of it off
    assert img[mask].min() > 200 and img[~mask].max() < 200
    stretched = open_dataset(f"folder:{landscape}").mask(0, "band_aid", SIDE)
    assert 0 < mask.sum() < stretched.sum()
    # back on the photograph's grid: inside the drawn square, nothing outside it
    back = to_source_grid(mask, (H, W), Geometry((SIDE, SIDE), "center_crop", 0.8))
    truth = np.zeros((H, W), bool)
    truth[BOX] = True
    assert back.any() and not (back & ~truth).any()


def test_a_centre_cropping_spec_builds_on_cropped_images(landscape: Path, tmp_path: Path) -> None:
    spec = f"folder:{landscape}"
    synth = SynthDermConfig()  # unused: the data is on disk
    plain = build_data(spec, synth, SIDE, tmp_path / "a", "band_aid", model=STRETCH)
    crop = build_data(spec, synth, SIDE, tmp_path / "b", "band_aid", model=CROP)
    assert crop.key() != plain.key() and crop.key()["fit"] == "center_crop:0.8"
    idx = np.array([0])
    want = to_model_input(open_dataset(spec).load_image(0), SIDE, "center_crop", 0.8)
    np.testing.assert_array_equal(crop.arrays(idx, "t")[0].permute(1, 2, 0).numpy(), want)


def test_a_bad_policy_or_size_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="resize policy 'squash'; valid: resize, center_crop"):
        Geometry((8, 8), "squash")
    with pytest.raises(ValueError, match="crop_pct=1.5 leaves 42×42"):
        Geometry((64, 64), "center_crop", 1.5).image(np.zeros((4, 4, 3), np.uint8))
