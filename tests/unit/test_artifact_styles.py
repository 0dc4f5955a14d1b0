"""Artifact style families and the style split (issue 23): exact masks, the house look's bytes,
a split that is exact, deterministic and leak-free, and the spec and export that carry it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import numpy as np
import pytest

from medaudit.models.data import artifact_styles
from medaudit.models.data.artifact_styles import DEFAULT_STYLE_SPLIT, STYLES, style_pools
from medaudit.models.data.registry import open_dataset
from medaudit.models.data.synthetic import ARTIFACT_ORDER, SPLITS, SynthDerm, SynthDermConfig
from medaudit.models.errors import ConfigError, DatasetError

SMALL = SynthDermConfig(n_train=60, n_val=10, n_test=20, size=64, seed=3)
SPLIT = SynthDermConfig(n_train=120, n_val=40, n_test=60, size=64, seed=5, styles="split").with_spec(
    band_aid=(0.6, 0.3), ruler=(0.4, 0.4), skin_marker=(0.4, 0.4), timestamp=(0.3, 0.3), microscope=(0.2, 0.2)
)
#: sha256 (first 16 hex digits) of images and masks rendered by synthderm before style families
#: existed (generator 5, commit 8acc14a); see _digest.
HOUSE_DIGESTS = {
    "binary/ch": "7b8f27cb64bfd06c",
    "binary/attacked/band_aid": "d2ceeab13b9f2b2c",
    "binary/attacked/ruler": "06eb6419e1f2d2ec",
    "binary/attacked/skin_marker": "ddab6a47c9bd778a",
    "binary/attacked/timestamp": "04dd9df7720a9880",
    "binary/attacked/microscope": "e1ba8b7c23cf5945",
    "isic_like/ch": "fb8d8e19175da6ba",
}
ALL_STYLES = [s.full for fam in STYLES.values() for s in fam.values()]


def _digest(ds: SynthDerm, variant: str, attack: str = "band_aid", n: int = 6) -> str:
    h = hashlib.sha256()
    for i in range(n):
        s = ds.sample(i, variant, attack)
        h.update(s.image.tobytes())
        for a in sorted(s.masks):
            h.update(a.encode())
            h.update(np.packbits(s.masks[a]).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("styles", ["default", "house"])
def test_house_look_renders_the_bytes_synthderm_always_drew(styles: str) -> None:
    kw = {} if styles == "default" else {"styles": "house"}
    small = SynthDerm(SynthDermConfig(n_train=60, n_val=10, n_test=20, size=64, seed=3, **kw))
    got = {"binary/ch": _digest(small, "ch", n=12)}
    for a in ARTIFACT_ORDER:
        got[f"binary/attacked/{a}"] = _digest(small, "attacked", a)
    isic = SynthDerm(
        SynthDermConfig.preset("isic_like", n_train=30, n_val=6, n_test=10, size=48, seed=1, **kw)
    )
    got["isic_like/ch"] = _digest(isic, "ch", n=12)
    assert got == HOUSE_DIGESTS
    assert "styles" not in small.config() and not small.styled


def test_house_styled_images_of_a_split_dataset_equal_the_unstyled_ones() -> None:
    styled = SynthDerm(SPLIT)
    plain = SynthDerm(replace(SPLIT, styles="house"))
    hits = 0
    for i in range(len(styled)):
        if styled.style_of(i, "band_aid") == "band_aid/house":
            a, b = styled.sample(i, "attacked"), plain.sample(i, "attacked")
            assert a.image.tobytes() == b.image.tobytes()
            hits += 1
        if hits == 4:
            break
    assert hits == 4


@pytest.mark.parametrize("style", ALL_STYLES)
def test_each_style_draws_exactly_its_mask_and_never_on_the_lesion(style: str) -> None:
    """Render the style over clean images: the changed pixels are exactly the mask."""
    ds = SynthDerm(SMALL)
    drawn = 0
    for i in range(6):
        base = ds._base(i)  # image before artifacts, and the occupied area (the dilated lesion)
        occupied = base.masks[""]
        img = base.image.copy()
        m = artifact_styles.render(style, img, occupied, np.random.default_rng([7, i]))
        changed = (img != base.image).any(axis=2)
        assert not (changed & ~m).any(), f"{style} changed pixels outside its mask on image {i}"
        assert not (m & occupied).any(), f"{style} drew on the lesion on image {i}"
        if style.endswith("/house"):
            # the house renderers paint a colour that may by chance equal the background
            assert not m.any() or changed[m].mean() > 0.97
        else:
            assert np.array_equal(changed, m), f"{style}: mask and changed pixels differ on image {i}"
        drawn += bool(m.any())
    assert drawn >= 5, f"{style} drew on {drawn} of 6 images"


def test_styles_differ_and_are_deterministic() -> None:
    ds = SynthDerm(SMALL)
    base = ds._base(2)
    looks = {}
    for style in ALL_STYLES:
        out = []
        for _ in range(2):
            img = base.image.copy()
            artifact_styles.render(style, img, base.masks[""], np.random.default_rng([1, 2]))
            out.append(img.tobytes())
        assert out[0] == out[1], style
        looks[style] = out[0]
    assert len(set(looks.values())) == len(looks), "two styles drew the same image"


def test_split_is_exact_deterministic_and_leak_free() -> None:
    a, b = SynthDerm(SPLIT), SynthDerm(SPLIT)
    pools = style_pools("split")
    for art in ARTIFACT_ORDER:
        decl = DEFAULT_STYLE_SPLIT[art]
        shared = {f"{art}/{s}" for s in decl["shared"]}
        used: dict[str, set[str]] = {s: set() for s in SPLITS}
        for i in range(len(a)):
            sty = a.style_of(i, art)
            assert sty == b.style_of(i, art)  # same seed, same style
            split = str(a.split_of[i])
            assert sty in pools[art][split]
            used[split].add(sty)
        own = {s: used[s] - shared for s in SPLITS}
        assert (
            not own["train"] & own["val"] and not own["train"] & own["test"] and not own["val"] & own["test"]
        )
        for s in SPLITS:  # exact: a split draws its own styles and the shared ones, nothing else
            assert own[s] <= {f"{art}/{n}" for n in decl[s]}
        assert own["test"], f"no test-only {art} style drawn"
    # carriers are recorded per image, with the style they were drawn in
    rec = a.artifact_styles("all")
    for art, by_image in rec.items():
        assert set(by_image) == set(np.flatnonzero(a.membership[art]).tolist())
        for i, sty in list(by_image.items())[:5]:
            assert a.sample(i).styles[art] == sty
    assert a.sample(3).image.tobytes() == b.sample(3).image.tobytes()
    other = SynthDerm(replace(SPLIT, seed=6))
    assert [other.style_of(i, "band_aid") for i in range(40)] != [
        a.style_of(i, "band_aid") for i in range(40)
    ]


def test_styled_dataset_masks_are_the_changed_pixels() -> None:
    ds = SynthDerm(replace(SPLIT, styles="all"))
    for art in ARTIFACT_ORDER:
        for i in range(8):
            clean, att = ds.sample(i, "clean"), ds.sample(i, "attacked", art)
            changed = (clean.image != att.image).any(axis=2)
            m = att.masks[art]
            assert not (changed & ~m).any() and not (m & att.lesion).any()
            if not att.styles[art].endswith("/house"):
                assert np.array_equal(changed, m), (art, i, att.styles[art])


@pytest.mark.parametrize("styles", ["house", "split"])
def test_without_an_artifact_changes_exactly_its_mask(styles: str) -> None:
    """The counterfactual the audit measures an artifact's effect with: image i with one artifact
    left undrawn differs from image i on exactly that artifact's pixels, so the other artifacts
    stay where they were."""
    ds = SynthDerm(replace(SPLIT, styles=styles))
    several = 0
    for art, ids in ds.artifact_ids("all").items():
        for i in ids[:6]:
            s = ds.sample(i)
            changed = (ds.without(i, art) != s.image).any(axis=2)
            if styles == "split" and not s.styles[art].endswith("/house"):
                assert np.array_equal(changed, s.masks[art]), (art, i, s.styles[art])
            else:  # the house renderer may leave pixels of its mask unchanged (or find no room)
                assert changed.any() == s.masks[art].any() and not (changed & ~s.masks[art]).any()
            several += len(s.artifacts) > 1
    assert several > 0  # images with other artifacts kept
    assert ds.without(0, "ruler").shape == ds.sample(0).image.shape
    assert ds.without(0, "ruler", 32).shape == (32, 32, 3)
    with pytest.raises(DatasetError, match="unknown artifact 'pen'"):
        ds.without(0, "pen")


def test_bad_style_configs_name_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match="valid: house, split, all"):
        SynthDermConfig(styles="many")
    with pytest.raises(ConfigError, match="unknown style 'band_aid/round-pink'"):
        SynthDermConfig(styles="split", style_split={"band_aid": {"train": ("round-pink",)}})
    with pytest.raises(ConfigError, match="in both 'train' and 'test'"):
        SynthDermConfig(styles="split", style_split={"ruler": {"train": ("house",), "test": ("house",)}})
    with pytest.raises(ConfigError, match="the val split has no style"):
        SynthDermConfig(
            styles="split", style_split={"ruler": {"train": ("house",), "test": ("coloured-curved",)}}
        )


def test_spec_string_config_round_trip_and_export(tmp_path) -> None:
    ds = open_dataset("synthderm?size=32&n_train=12&n_val=4&n_test=6&seed=2&styles=split")
    assert isinstance(ds, SynthDerm) and ds.styled
    d = ds.config()
    assert d["styles"] == "split" and d["style_split"]["band_aid"]["test"] == list(
        DEFAULT_STYLE_SPLIT["band_aid"]["test"]
    )
    again = SynthDermConfig.from_dict(json.loads(json.dumps(d)))
    assert SynthDerm(again).sample(5).image.tobytes() == ds.sample(5).image.tobytes()
    with pytest.raises(DatasetError, match="styles"):
        open_dataset("synthderm?size=32&styles=nope")
    root = ds.export(tmp_path / "styled")
    rec = json.loads((root / "artifact_styles.json").read_text())
    want = {(f"synth_{i:06d}", a): s for a, by in ds.artifact_styles("all").items() for i, s in by.items()}
    assert want and {(k, a): s for k, v in rec.items() for a, s in v.items()} == want
    assert json.loads((root / "synthderm.json").read_text())["styles"] == "split"
    plain = open_dataset("synthderm?size=32&n_train=12&n_val=4&n_test=6&seed=2").export(tmp_path / "plain")
    assert not (plain / "artifact_styles.json").exists()


def test_an_exported_styled_dataset_reads_its_styles_back_and_bad_style_files_are_named(tmp_path) -> None:
    """The folder adapter reads ``artifact_styles.json`` beside the annotations: the export's styles
    come back per index and split as synthderm's; a partial file is fine; an unknown image, a style
    for an artifact the image does not carry, or a malformed value is refused with the image."""
    from medaudit.models.data.folder import FolderDataset

    ds = open_dataset("synthderm?size=32&n_train=12&n_val=4&n_test=6&seed=2&styles=split")
    root = ds.export(tmp_path / "styled")
    back = FolderDataset(root)
    assert (
        back.styled
        and not FolderDataset(
            open_dataset("synthderm?size=32&n_train=12&n_val=4&n_test=6").export(tmp_path / "plain")
        ).styled
    )
    for split in ("train", "test", "all"):
        want = {a: v for a, v in ds.artifact_styles(split).items() if v}
        assert {a: v for a, v in back.artifact_styles(split).items() if v} == want
    rec = json.loads((root / "artifact_styles.json").read_text())
    image, looks = next(iter(rec.items()))
    art = next(iter(looks))
    # a hospital's own words: a bare style name, some images without one
    (root / "artifact_styles.json").write_text(json.dumps({image: {art: "wide tan"}}))
    assert FolderDataset(root).artifact_styles("all") == {art: {back.ids.index(image): f"{art}/wide tan"}}
    carried = {a for a, idx in back.artifact_ids().items() if back.ids.index(image) in idx}
    other = next(a for a in ("band_aid", "ruler", "skin_marker", "timestamp") if a not in carried)
    for bad, match in (
        ({"nobody": {art: "x"}}, "'nobody' is not an image"),
        ({image: {other: "x"}}, f"has a style for '{other}', but the annotations do not list"),
        ({image: ["x"]}, "expected {artifact: style}"),
        ({image: {art: "!?"}}, "is not a name"),
    ):
        (root / "artifact_styles.json").write_text(json.dumps(bad))
        with pytest.raises(DatasetError, match=re.escape(match)):
            FolderDataset(root)


def test_the_cli_exports_styles_and_data_check_counts_them(tmp_path) -> None:
    """``data export --styles split`` writes the style file; ``data check`` reads it back and
    reports, per artifact, the looks per split and those never in training; a bad mode is named."""
    from typer.testing import CliRunner

    from medaudit.cli.commands import app

    out = tmp_path / "exp"
    res = CliRunner().invoke(app, ["data", "export", str(out), "--size", "32", "--styles", "split"])
    assert res.exit_code == 0, res.output
    assert (out / "artifact_styles.json").is_file()
    res = CliRunner().invoke(
        app, ["data", "check", f"folder:{out}", "--no-images", "--out", str(tmp_path / "c.json")]
    )
    assert res.exit_code == 0, res.output
    looks = json.loads((tmp_path / "c.json").read_text())["artifacts"]["band_aid"]["styles"]
    ds = SynthDerm(SynthDermConfig(size=32, styles="split"))
    for split in ("train", "val", "test"):
        want: dict[str, int] = {}
        for st in ds.artifact_styles(split)["band_aid"].values():
            want[st] = want.get(st, 0) + 1
        assert {st: c[split] for st, c in looks["per_style"].items() if split in c} == want
    assert looks["named"] == len(ds.artifact_ids("all")["band_aid"])
    text = re.sub(r"\s+", " ", res.output)
    unseen = [*DEFAULT_STYLE_SPLIT["band_aid"]["val"], *DEFAULT_STYLE_SPLIT["band_aid"]["test"]]
    assert 0 < len(unseen) <= 6 and f"{len(unseen)} never in train (" in text
    assert all(st in text for st in unseen)
    res = CliRunner().invoke(
        app, ["data", "export", str(tmp_path / "bad"), "--size", "32", "--styles", "fancy"]
    )
    assert res.exit_code == 2 and "styles='fancy'; valid: house, split, all" in res.output
