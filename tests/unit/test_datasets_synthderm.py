"""Synthderm's ISIC-like form: three classes with overlapping cues, a band-aid shortcut on nevi,
several photographs per lesion; the binary default's config dict (and so every cache key) is
unchanged (test_synthetic.py checks its rendering)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets_data import TINY, tiny

from medaudit.models.data.synth_lesions import VASCULARITY_AB
from medaudit.models.data.synthetic import ISIC_LIKE_CLASSES, SynthDerm, SynthDermConfig
from medaudit.models.errors import ConfigError


@pytest.fixture(scope="module")
def ds() -> SynthDerm:
    return tiny()


def test_three_classes_rates_and_the_band_aid_on_nevi(ds: SynthDerm) -> None:
    assert ds.label_names == ISIC_LIKE_CLASSES and set(ds.labels.tolist()) == {0, 1, 2}
    rates = ds.realised_rates["train"]["band_aid"]
    assert len(rates) == 3 and rates[0] > 0.4 and max(rates[1:]) < 0.15
    assert ds.realised_rates["train"]["ruler"][1] > ds.realised_rates["train"]["ruler"][0]


def test_photographs_of_one_lesion_share_it_and_one_split(ds: SynthDerm) -> None:
    sizes = np.bincount(ds.lesion_of)
    assert sizes.max() > 1 and sizes.min() >= 1 and sizes.max() <= 4
    for k in np.flatnonzero(sizes > 1)[:5]:
        idx = np.flatnonzero(ds.lesion_of == k)
        assert len(set(ds.split_of[idx])) == 1 and len(set(ds.labels[idx])) == 1
        a, b = ds.sample(int(idx[0]), "clean"), ds.sample(int(idx[1]), "clean")
        np.testing.assert_array_equal(a.lesion, b.lesion)  # the same lesion...
        assert a.severity == b.severity
        assert (a.image != b.image).any()  # ...on other skin
    assert len(set(ds.groups)) == len(sizes) and ds.ids[3] == "synth_000003"


def test_the_bcc_cue_is_strongest_on_bcc_and_overlaps() -> None:
    """Pinkness (red minus green inside the lesion) orders bcc above the others on average,
    while some nevi and melanomas are pinker than some bcc (the cues overlap)."""
    big = SynthDerm(SynthDermConfig.preset("isic_like", size=48, n_train=150, n_val=0, n_test=0))
    pink = {k: [] for k in range(3)}
    for i in range(len(big)):
        s = big.sample(i, "clean")
        px = s.image[s.lesion].astype(float)
        pink[int(big.labels[i])].append(float((px[:, 0] - px[:, 1]).mean()))
    assert np.mean(pink[2]) > np.mean(pink[0]) + 10 and np.mean(pink[2]) > np.mean(pink[1]) + 10
    assert max(pink[0] + pink[1]) > min(pink[2])
    assert VASCULARITY_AB["bcc"][0] > VASCULARITY_AB["bcc"][1]


def test_config_round_trip_and_the_binary_dict_unchanged() -> None:
    again = SynthDermConfig.from_dict(json.loads(json.dumps(TINY.to_dict())))
    assert again == TINY and SynthDerm(again).labels.tolist() == SynthDerm(TINY).labels.tolist()
    assert not {"classes", "class_p", "images_per_lesion"} & set(SynthDermConfig().to_dict())
    assert SynthDermConfig.preset("binary") == SynthDermConfig()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": ("nevus", "wart", "bcc"), "class_p": (0.5, 0.3, 0.2)}, "2 or more distinct names"),
        ({"classes": ISIC_LIKE_CLASSES}, "spec.*one per class|p_ambiguous|class_p"),
        ({"class_p": (0.5, 0.6)}, "summing to 1"),
        ({"images_per_lesion": (3, 2)}, r"1 <= min <= max"),
    ],
)
def test_bad_multiclass_configs(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SynthDermConfig(**kwargs)
