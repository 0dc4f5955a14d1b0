"""The build on a dataset read from disk, with three classes: a model spec's classifier, membership
CAVs within a class scope, cards with per-class metrics on the paper's test subsets and an attacked
set pasted from the data's own annotated training images, masks by source, RRR refused without
masks, registration all or nothing; and medaudit's own trainer on synthderm's three-class form.

The classifier is a randomly initialised timm ResNet-18 at 32 px (what is tested is the pipeline's
handling of data, classes and masks, not how well a model unlearns: that needs a trained model and
is the hospital test's and the build benchmark's job).
"""

from __future__ import annotations

import functools
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medaudit.models.attack import Instances, cut_instances, paste
from medaudit.models.corrections import FinetuneConfig
from medaudit.models.errors import ConfigError
from medaudit.models.pipeline import BuildConfig, build
from medaudit.models.spec import load_spec

CLASSES = ("bcc", "melanoma", "nevus")  # the folder layout's sorted class names
FT = FinetuneConfig(epochs=1, batch_size=8, max_steps=1)


def _spec(root: Path, name: str = "derm3", labels: tuple[str, ...] = CLASSES) -> Path:
    import timm

    torch.manual_seed(0)
    ckpt = root / f"{name}.pt"
    torch.save(timm.create_model("resnet18", num_classes=len(labels)).state_dict(), ckpt)
    spec = root / f"{name}.toml"
    spec.write_text(
        textwrap.dedent(
            f"""
            name = "{name}"
            source = "timm"
            arch = "resnet18"
            checkpoint = "{ckpt.name}"
            labels = {json.dumps(list(labels))}
            input_size = 32
            mean = [0.485, 0.456, 0.406]
            std = [0.229, 0.224, 0.225]
            """
        )
    )
    return spec


def _cfg(spec: Path, data: str, **kw) -> BuildConfig:
    base = dict(model=load_spec(spec), data=data, finetune=FT, n_correction_images=16, max_artifact_samples=3)
    return BuildConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(three_class_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    from medaudit.service.store import delete_version, register_version

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("any_data")
    home = root / "bento"
    cfg = _cfg(
        _spec(root), f"folder:{three_class_folder}", corrections=("vanilla", "pclarc", "rrr"),
        cav_scope=("nevus", "melanoma"),
    )  # fmt: skip
    res = build(
        cfg, root / "out", log=lambda _m: None, register=functools.partial(register_version, home=home),
        unregister=functools.partial(delete_version, home=home),
    )  # fmt: skip
    return root, home, cfg, res


@pytest.mark.slow
def test_three_class_build_on_disk_data_registers_versions_with_per_class_cards(built) -> None:
    from medaudit.service.store import list_versions, load_version

    _, home, _, res = built
    versions = ["vanilla", "pclarc-band_aid", "rrr-band_aid"]
    assert [v.tag for v in list_versions(home=home)] == sorted(f"derm3:{v}" for v in versions)
    for card in res.cards:
        cls = card.metrics["classification"]
        assert set(cls) == {"ch", "artifact", "no_artifact", "clean", "attacked"}
        for metrics in cls.values():
            for c in CLASSES:
                assert {f"accuracy_{c}", f"acc_ovr_{c}", f"auc_{c}", f"fpr_{c}"} <= set(metrics)
            assert 0.0 <= metrics["f1_macro"] <= 1.0
        assert card.architecture["labels"] == list(CLASSES)
        d = card.data
        assert d["mask_source"] == "ground_truth" and d["cav_data"] == "membership"
        if card.correction["name"] == "rrr":
            assert card.correction["params"]["masks"] == d["mask_source"]
        assert d["cav_scope"] == ["melanoma", "nevus"] and d["dataset"].startswith("folder:/")
        # the attacked set: every clean test image with an instance from the training split
        assert d["attacked"]["images"] == d["subsets"]["clean"] == d["subsets"]["attacked"] > 0
        assert d["attacked"]["instances"] > 0 and card.metrics["artifact_relevance"]["n"] == 3
    md = res.cards[-1].to_markdown()
    assert "| bcc | one-vs-rest accuracy |" in md and "**Artifact masks:** ground truth" in md
    bank = load_version("derm3:pclarc-band_aid", home=home).bank
    assert set(bank.concepts) == {"band_aid", "ruler", "skin_marker"}
    assert bank.provenance.dataset == res.cards[0].data["dataset"]
    assert {r["version"] for r in res.comparison} == set(versions)


@pytest.mark.slow
def test_a_failed_registration_takes_back_what_the_build_registered(built, tmp_path: Path) -> None:
    from medaudit.service.store import delete_version, list_versions, register_version

    root, _, cfg, _ = built
    home = tmp_path / "bento"

    def flaky(name: str, version: str, **kw):
        if version == "rrr-band_aid":
            raise OSError("disk full")
        return register_version(name, version, home=home, **kw)

    with pytest.raises(OSError, match="disk full"):
        build(cfg, root / "out", log=lambda _m: None, register=flaky,
              unregister=functools.partial(delete_version, home=home))  # fmt: skip
    assert list_versions(home=home) == []  # vanilla and pclarc were registered, then taken back


def test_data_that_does_not_fit_is_refused_before_anything_is_built(
    three_class_folder: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "no_masks"
    shutil.copytree(three_class_folder, bare, ignore=shutil.ignore_patterns("masks"))
    spec = _spec(tmp_path)
    with pytest.raises(ConfigError) as e:
        build(_cfg(spec, f"folder:{bare}", corrections=("vanilla", "rrr")), tmp_path / "out", log=print)
    msg = " ".join(str(e.value).split())
    assert f"medaudit localize --data folder:{bare.resolve()} --artifact band_aid --model {spec}" in msg
    assert "--export-masks" in msg
    with pytest.raises(ConfigError, match=r"labels must be the data's classes.*\?labels=nevus,melanoma,bcc"):
        build(_cfg(_spec(tmp_path, "x", ("nevus", "melanoma", "bcc")), f"folder:{bare}"), tmp_path / "out")
    with pytest.raises(ConfigError, match="cav_scope names classes \\['mel'\\]"):
        build(_cfg(spec, f"folder:{bare}", corrections=("vanilla",), cav_scope=("mel",)), tmp_path / "out")
    with pytest.raises(ConfigError, match="annotated: band_aid, ruler, skin_marker"):
        build(_cfg(spec, f"folder:{bare}", artifact="timestamp"), tmp_path / "out")
    with pytest.raises(ConfigError, match="medaudit trains only on synthderm"):
        BuildConfig(data=f"folder:{bare}")
    assert not (tmp_path / "out" / "derm3" / "versions").exists()


def test_the_mask_source_is_the_datasets_for_the_artifact(three_class_folder: Path, tmp_path: Path) -> None:
    from medaudit.models.build_data import build_data
    from medaudit.models.data.masks import MaskFolder
    from medaudit.models.data.synthetic import SynthDermConfig

    derived = tmp_path / "derived"
    shutil.copytree(three_class_folder, derived)
    MaskFolder(derived / "masks").mark("band_aid", "derived", method="test")
    data = build_data(f"folder:{derived}", SynthDermConfig(), 32, tmp_path / "c", "band_aid")
    assert data.mask_source == "derived" and data.rates("band_aid")[2] > max(data.rates("band_aid")[:2])
    ruler = build_data(f"folder:{derived}", SynthDermConfig(), 32, tmp_path / "c", "ruler")
    assert ruler.mask_source == "ground_truth"


def test_paste_puts_each_instance_where_it_was_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.integers(0, 255, (4, 3, 16, 16), dtype=np.uint8))
    masks = np.zeros((4, 16, 16), bool)
    masks[0, :4, :4] = masks[1, 8:, 8:] = masks[3, 2:6, 10:] = True  # instance 2 is empty: dropped
    inst = cut_instances(src, masks, np.array([10, 11, 12, 13]))
    assert list(inst.source) == [10, 11, 13]
    clean = torch.zeros(6, 3, 16, 16, dtype=torch.uint8)
    att, pasted, chosen = paste(clean, inst, seed=1)
    for j, k in enumerate(chosen):
        m = torch.from_numpy(inst.masks[k])
        assert torch.equal(att[j][:, m], inst.images[k][:, m]) and not att[j][:, ~m].any()
        np.testing.assert_array_equal(pasted[j], inst.masks[k])
    again = paste(clean, inst, seed=1)
    assert torch.equal(again[0], att) and list(again[2]) == list(chosen)
    with pytest.raises(ConfigError, match="no instance to paste"):
        cut_instances(src, np.zeros((4, 16, 16), bool), np.arange(4))
    assert isinstance(inst, Instances) and len(inst) == 3


@pytest.mark.slow
def test_medaudits_trainer_builds_synthderms_three_class_form(tmp_path: Path) -> None:
    from medaudit.models.data.synthetic import SynthDermConfig
    from medaudit.models.train import TrainConfig

    torch.set_num_threads(1)
    data = SynthDermConfig.preset("isic_like", size=32, n_train=48, n_val=16, n_test=24)
    cfg = BuildConfig(
        train=TrainConfig(epochs=1, batch_size=16, data=data), corrections=("vanilla", "pclarc"),
        finetune=FT, n_correction_images=16, max_artifact_samples=3, n_eval_images=12,
    )  # fmt: skip
    assert cfg.model_name == "resnet18-synthderm-3class"
    res = build(cfg, tmp_path, log=lambda _m: None)
    base = json.loads((tmp_path / cfg.model_name / "card.json").read_text())
    assert base["model_config"]["labels"] == ["nevus", "melanoma", "bcc"]
    t = base["test"]
    drops = {
        c: 100 * (t["clean"][f"accuracy_{c}"] - t["attacked"][f"accuracy_{c}"])
        for c in base["model_config"]["labels"]
    }
    assert t["shortcut"]["clean_minus_attacked_points"] == pytest.approx(
        drops[t["shortcut"]["class"]], abs=0.01
    )
    assert drops[t["shortcut"]["class"]] == max(drops.values())  # the class the attack costs most
    card = res.cards[1]
    assert card.data["cav_data"] == "paired" and card.data["mask_source"] == "ground_truth"
    assert {f"acc_ovr_{c}" for c in ("nevus", "melanoma", "bcc")} <= set(
        card.metrics["classification"]["attacked"]
    )


def _class_folders(src_root: Path, root: Path) -> str:
    """The folder export rearranged as class folders (HyperKvasir's layout) with its annotations."""
    import csv

    from medaudit.models.data.registry import open_dataset

    src = open_dataset(f"folder:{src_root}")
    for i, p in enumerate(src.paths):
        (root / src.label_names[src.labels[i]]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / src.label_names[src.labels[i]] / p.name)
    carried: dict[str, list[str]] = {}
    for a, idx in src.artifact_ids().items():
        for i in idx:
            carried.setdefault(f"{src.label_names[src.labels[i]]}/{src.paths[i].name}", []).append(a)
    with open(root / "artifacts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "artifacts"])
        w.writerows([k, ";".join(v)] for k, v in carried.items())
    return f"classfolders:{root}?annotations=artifacts.csv"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["chexpert", "classfolders"])
def test_chexpert_and_class_folder_layouts_build_and_register_without_masks(
    layout: str, three_class_folder: Path, tmp_path: Path
) -> None:
    """Both exports carry annotations only: no attacked set, no artifact relevance, and the card
    and the comparison say so."""
    from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
    from medaudit.service.store import list_versions, register_version

    torch.set_num_threads(1)
    if layout == "chexpert":  # a binary task from a column, uncertain labels by the export's policy
        root = SynthDerm(SynthDermConfig(size=32, n_train=90, n_val=30, n_test=45)).export(
            tmp_path / "chexpert", layout="chexpert", masks=False
        )
        data = json.loads((root / "synthderm.json").read_text())["open_with"]
        spec, victims = _spec(tmp_path, "chest2", ("benign", "malignant")), ("malignant",)
    else:
        data, spec = _class_folders(three_class_folder, tmp_path / "classes"), _spec(tmp_path, "kvasir3")
        victims = ("bcc", "melanoma")  # the band-aid is on nevi
    home = tmp_path / "bento"
    res = build(
        _cfg(spec, data, corrections=("vanilla",)), tmp_path / "out", log=lambda _m: None,
        register=functools.partial(register_version, home=home),
    )  # fmt: skip
    name = load_spec(spec).name
    assert [v.tag for v in list_versions(home=home)] == [f"{name}:vanilla"]
    card = res.cards[0]
    assert card.data["dataset"].startswith(f"{layout}:/")
    assert set(card.metrics["classification"]) == {"ch", "artifact", "no_artifact", "clean"}
    assert card.data["mask_source"] == "none" and card.data["attacked"] is None
    assert card.metrics["artifact_relevance"]["n"] == 0 and card.metrics["tcav"]["n"] == 3
    assert "**Artifact masks:** none" in card.to_markdown()
    (gap,) = [k for k in res.comparison[0] if k in {f"{v} gap recovered %" for v in victims}]
    assert res.comparison[0][gap] is None  # nothing attacked, no gap
