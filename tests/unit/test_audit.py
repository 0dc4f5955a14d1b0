"""The offline audit end to end on a tiny, quickly trained model (issue 4).

Metrics need not be good on a 32 px model trained for one epoch on 60 images; what is tested is
the structure, the ranges, and that localization is scored against the dataset's own masks.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from medaudit.models.audit import (
    AuditOptions,
    AuditReport,
    default_concept_layers,
    run_audit,
    write_metrics,
)
from medaudit.models.audit.report import write_report
from medaudit.models.data.artifact_styles import DEFAULT_STYLE_SPLIT
from medaudit.models.data.folder import FolderDataset
from medaudit.models.data.synthetic import SynthDerm, SynthDermConfig
from medaudit.models.errors import ConfigError
from medaudit.models.registry import create_model
from medaudit.models.train import TrainConfig, hidden_artifact_config, train_with_hidden_artifact
from medaudit.models.xai.localize import binarize, concept_mask, iou

DECLARED = ("band_aid", "ruler")
HIDDEN = "timestamp"
DATA = SynthDermConfig(size=32, n_train=60, n_val=24, n_test=40, seed=3).with_spec(
    band_aid=(0.5, 0.2), ruler=(0.2, 0.5), skin_marker=(0.0, 0.0), timestamp=(0.0, 0.3)
)
OPTS = AuditOptions(top_k=8, n_gallery=3, batch_size=32, concept_layers={"ruler": "identity_1"})

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # One torch thread: on a shared 2-core runner two threads contend and run ~4x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object, Path]:
    out = tmp_path_factory.mktemp("hidden")
    base = TrainConfig(epochs=1, batch_size=16, threads=1, data=DATA)
    card = train_with_hidden_artifact(out, HIDDEN, (0.0, 0.3), base, log=lambda _: None)
    assert card["train_config"]["data"]["spec"][HIDDEN] == [0.0, 0.3]
    model, cfg = create_model("resnet18", weights=out / "model.pt")
    return model, cfg, out


@pytest.fixture(scope="module")
def ds() -> SynthDerm:
    return SynthDerm(DATA)


@pytest.fixture(scope="module")
def report(trained: tuple, ds: SynthDerm) -> AuditReport:
    model, cfg, _ = trained
    seen: dict[str, list[int]] = {}

    def progress(desc: str, total: int) -> Callable[[int], None]:
        seen[desc] = [total, 0]

        def advance(n: int) -> None:
            seen[desc][1] += n

        return advance

    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = run_audit(model, cfg, "resnet18-tiny:vanilla", ds, DECLARED, progress=progress, options=OPTS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the audit modified the model"
    assert set(seen) >= {"explain train", "explain val", "explain test", "localize band_aid"}
    assert all(done == total for total, done in seen.values()), seen
    return rep


def test_report_structure_and_json(report: AuditReport, tmp_path: Path) -> None:
    assert report.artifacts == DECLARED
    assert set(report.concepts) == set(DECLARED)
    assert report.splits == {
        "train": {"audited": 60, "available": 60},
        "val": {"audited": 24, "available": 24},
        "test": {"audited": 40, "available": 40},
    }
    path = write_metrics(report, tmp_path)

    def no_nan(token: str) -> float:
        raise AssertionError(f"metrics.json holds {token}")

    m = json.loads(path.read_text(), parse_constant=no_nan)
    assert m["format"] == "medaudit.audit" and m["model_version"] == "resnet18-tiny:vanilla"
    assert m["concepts"]["ruler"]["layer"] == "identity_1"
    assert m["concepts"]["band_aid"]["layer"] == "identity_2"
    assert m["dataset_config"]["spec"][HIDDEN] == [0.0, 0.3]
    assert set(m["discovery"]) >= {"spray", "channels", "undeclared_artifact_hits", "top_k"}
    for s in ("train", "val", "test"):
        assert 0.0 <= m["accuracy"][s] <= 1.0
    assert "styles" not in m and "styles" not in m["timings_s"]  # a dataset without artifact styles


def test_one_bank_per_layer_keyed_by_version(report: AuditReport) -> None:
    assert set(report.banks) == {"identity_2", "identity_1"}
    assert report.banks["identity_1"].concepts == ("ruler",)
    for layer, bank in report.banks.items():
        bank.check_model("resnet18-tiny:vanilla", layer)
        for name in bank.concepts:
            assert np.linalg.norm(bank[name].v) == pytest.approx(1.0, abs=1e-5)


def test_retrieval_held_out_is_the_test_split(report: AuditReport, ds: SynthDerm) -> None:
    test_idx = ds.indices("test")
    for name, c in report.concepts.items():
        held, allm = c.retrieval["held_out"], c.retrieval["all"]
        assert held.n == len(test_idx) and allm.n == len(ds)
        assert held.n_pos == int(ds.membership[name][test_idx].sum())
        np.testing.assert_array_equal(np.sort(c.test_indices), test_idx)
        np.testing.assert_array_equal(c.test_labels, ds.membership[name][c.test_indices])
        for met in (held, allm):
            assert 0.0 <= met.auroc <= 1.0 and 0.0 <= met.ap <= 1.0 and -1.0 <= met.kendall_tau <= 1.0


def test_localization_is_scored_against_ground_truth_masks(report: AuditReport, ds: SynthDerm) -> None:
    for name, c in report.concepts.items():
        carriers = [i for i in ds.indices("test") if ds.membership[name][i]]
        with_mask = [i for i in carriers if ds.sample(int(i)).masks[name].any()]
        assert c.n_localized == len(with_mask) == len(c.iou) == len(c.rho) > 0
        assert ((c.iou >= 0) & (c.iou <= 1)).all() and ((c.rho >= 0) & (c.rho <= 1 + 1e-9)).all()
        assert len(c.gallery) == 3
        assert [g.rank for g in c.gallery] == [1, 2, 3]
        for g in c.gallery:
            assert g.image.shape == (32, 32, 3) and g.heatmap.shape == (32, 32) and g.mask.shape == (32, 32)
            np.testing.assert_array_equal(g.image, ds.sample(g.index).image)
            assert g.carries == bool(ds.membership[name][g.index])
            if g.carries and g.gt_mask is not None:
                np.testing.assert_array_equal(g.gt_mask, ds.sample(g.index).masks[name])
                assert g.iou == pytest.approx(iou(g.mask, g.gt_mask))
            else:
                assert g.iou is None


def test_discovery_counts_the_undeclared_artifact(report: AuditReport, ds: SynthDerm) -> None:
    d = report.discovery
    assert set(d.hits) == {HIDDEN}  # declared ones are not counted; skin_marker is absent
    assert 0 < len(d.spray_top) <= 8 and len(d.channel_top) == 8
    for method, top in (("spray", d.spray_top), ("channels", d.channel_top)):
        assert d.hits[HIDDEN][method] == sum(bool(ds.membership[HIDDEN][o.index]) for o in top)
        assert [o.rank for o in top] == list(range(1, len(top) + 1))
        assert len({o.index for o in top}) == len(top)
        for o in top:
            assert o.heatmap.shape == (32, 32) and o.label == ds.labels[o.index]
    scores = [o.score for o in d.spray_top]
    assert scores == sorted(scores, reverse=True)
    pool = ~(ds.membership["band_aid"] | ds.membership["ruler"])  # discovery skips declared carriers
    assert d.base_rate[HIDDEN] == pytest.approx(ds.membership[HIDDEN][pool].mean())
    assert all(not set(o.artifacts) & set(DECLARED) for o in (*d.spray_top, *d.channel_top))
    assert set(d.spray) == {"benign", "malignant"}


def test_subsampling_is_reported(trained: tuple, ds: SynthDerm) -> None:
    model, cfg, _ = trained
    opts = AuditOptions(max_per_split={"train": 40}, top_k=4, n_gallery=1, max_localize=3)
    rep = run_audit(model, cfg, "v", ds, ["band_aid"], options=opts)
    assert rep.splits["train"] == {"audited": 40, "available": 60}
    assert any("40 of 60" in n for n in rep.notes)
    assert rep.concepts["band_aid"].n_localized <= 3


def test_folder_dataset_without_masks_skips_iou(trained: tuple, ds: SynthDerm, tmp_path: Path) -> None:
    model, cfg, _ = trained
    root = ds.export(tmp_path / "exported", masks=False)
    assert not (root / "masks").exists()
    rep = run_audit(model, cfg, "v", FolderDataset(root), ["band_aid"], options=AuditOptions(top_k=4))
    c = rep.concepts["band_aid"]
    assert len(c.iou) == 0 and rep.to_dict()["concepts"]["band_aid"]["localization"] is None
    assert any("no artifact masks" in n for n in rep.notes)
    assert all(g.gt_mask is None and g.heatmap.shape == (32, 32) for g in c.gallery)
    assert math.isfinite(c.retrieval["held_out"].auroc)


def test_own_data_with_a_style_file_gets_the_per_style_audit(trained: tuple, tmp_path: Path) -> None:
    """A styled synthderm exported to the folder layout (images, annotations, masks and
    ``artifact_styles.json``) and audited from disk gives synthderm's per-style rows: the same
    images, splits and styles, so the same detection, AUROC and IoU. The counterfactual effects need
    the generator and are absent. Carriers whose style is left out of the file fall out of the rows."""
    model, cfg, _ = trained
    styled = SynthDerm(replace(DATA, styles="split"))
    opts = replace(OPTS, max_localize=10_000)
    root = styled.export(tmp_path / "styled")
    want = run_audit(model, cfg, "v", styled, DECLARED, options=opts).styles
    folder_rep = run_audit(model, cfg, "v", FolderDataset(root), DECLARED, options=opts)
    got = folder_rep.styles
    assert want is not None and got is not None
    html = write_report(folder_rep, tmp_path / "report").read_text()
    assert 'id="styles-band_aid"' in html and html.count("style image") > 0
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())["styles"]["per_concept"]
    assert saved["band_aid"]["unseen"]["effect"] is None
    keys = ("style", "seen", "splits", "n", "detection", "auroc", "iou_mean", "n_localized")
    for name in DECLARED:
        assert len(got.rows[name]) == len(want.rows[name]) > 1
        for g, w in zip(got.rows[name], want.rows[name], strict=True):
            assert g.effect is None and g.detection_weighted is None
            for k in keys:
                gv, wv = getattr(g, k), getattr(w, k)
                assert gv == (pytest.approx(wv, abs=1e-6) if isinstance(wv, float) else wv), (
                    name,
                    g.style,
                    k,
                )
    assert got.clean_any_present == pytest.approx(want.clean_any_present)
    # the hospital names the looks of some band-aids only
    rec = json.loads((root / "artifact_styles.json").read_text())
    test_ids = {FolderDataset(root).ids[i] for i in styled.indices("test")}
    dropped = sorted(k for k, v in rec.items() if k in test_ids and "band_aid" in v)[::2]
    for k in dropped:
        del rec[k]["band_aid"]
    (root / "artifact_styles.json").write_text(json.dumps(rec))
    part = run_audit(model, cfg, "v", FolderDataset(root), DECLARED, options=opts).styles
    assert part is not None
    n_all = sum(r.n for r in want.rows["band_aid"])
    assert sum(r.n for r in part.rows["band_aid"]) == n_all - len(dropped) > 0
    groups = part.groups["band_aid"]
    assert groups["seen"].n + groups["unseen"].n == n_all - len(dropped)


def src_images(ds: SynthDerm, idx: list[int], cfg: Any, without: str | None = None) -> torch.Tensor:
    """Images ``idx`` at the model's input size, or without one artifact."""
    side = cfg.input_size[-1]
    arr = [ds.without(i, without, side) if without else ds.load_image(i, side) for i in idx]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()


def test_per_style_metrics_seen_and_unseen(trained: tuple, tmp_path: Path) -> None:
    """A styled synthderm: per-style detection, AUROC, IoU and confusion on the held-out carriers,
    each style seen (in the training split) or not, in metrics.json and the report."""
    model, cfg, _ = trained
    styled = SynthDerm(replace(DATA, styles="split"))
    seen: dict[str, list[int]] = {}

    def progress(desc: str, total: int) -> Callable[[int], None]:
        seen[desc] = [total, 0]
        return lambda n: seen[desc].__setitem__(1, seen[desc][1] + n)

    rep = run_audit(model, cfg, "v", styled, DECLARED, options=OPTS, progress=progress)
    assert rep.styles is not None
    carriers = [styled.artifact_styles("test")[n] for n in DECLARED]
    n_effects = len(set().union(*carriers)) + sum(len(c) for c in carriers)
    assert seen["artifact effects"] == [n_effects, n_effects]  # natural images, then counterfactuals
    m = json.loads(write_metrics(rep, tmp_path).read_text())["styles"]
    for name in DECLARED:
        c = rep.concepts[name]
        train_styles = set(styled.artifact_styles("train")[name].values())
        test_styles = styled.artifact_styles("test")[name]
        shared = {f"{name}/{s}" for s in DEFAULT_STYLE_SPLIT[name]["shared"]}
        per = {r["style"]: r for r in m["per_concept"][name]["per_style"]}
        assert set(per) == set(test_styles.values())
        present = dict(zip(c.test_indices.tolist(), (c.test_scores > c.threshold).tolist(), strict=True))
        loc = dict(zip(c.iou_indices.tolist(), c.iou.tolist(), strict=True))
        for sty, r in per.items():
            idx = [i for i, s in test_styles.items() if s == sty]
            assert r["seen"] == (sty in train_styles) and r["n"] == len(idx)
            assert r["detection"] == pytest.approx(np.mean([present[i] for i in idx]))
            ious = [loc[i] for i in idx if i in loc]
            assert r["n_localized"] == len(ious)
            assert r["iou_mean"] == (pytest.approx(np.mean(ious)) if ious else None)
            assert 0.0 <= r["auroc"] <= 1.0 and "test" in r["splits"]
            assert set(r["splits"]) == {"test"} or sty in shared  # a test-only style is in no other split
        # the artifact's effect: class probabilities against the image rendered without it
        carriers = sorted(test_styles)
        with torch.no_grad():
            p = torch.softmax(model(cfg.normalize(src_images(styled, carriers, cfg))), 1).numpy()
            q = torch.softmax(
                model(cfg.normalize(src_images(styled, carriers, cfg, without=name))), 1
            ).numpy()
        effect = dict(zip(carriers, 0.5 * np.abs(p - q).sum(1), strict=True))
        for sty, r in per.items():
            idx = [i for i, s in test_styles.items() if s == sty]
            e = np.array([effect[i] for i in idx])
            assert r["effect"] == pytest.approx(e.mean(), abs=1e-5)
            hit = np.array([present[i] for i in idx])
            want = (e * hit).sum() / e.sum() if e.sum() > 0 else None
            assert r["detection_weighted"] == (None if want is None else pytest.approx(want, abs=1e-5))
        groups = m["per_concept"][name]
        assert groups["seen"]["n"] + groups["unseen"]["n"] == len(test_styles)
        assert groups["unseen"]["n"] == sum(1 for s in test_styles.values() if s not in train_styles) > 0
    assert m["clean"]["n"] > 0 and 0.0 <= m["clean"]["any_present"] <= 1.0
    # the benchmark's Markdown of these metrics: a row per style and per seen/unseen group
    bench = importlib.util.spec_from_file_location("style_split", ROOT / "benchmarks" / "style_split.py")
    assert bench is not None and bench.loader is not None
    style_split = importlib.util.module_from_spec(bench)
    bench.loader.exec_module(style_split)
    md = style_split.render_report(json.loads(write_metrics(rep, tmp_path).read_text()), "medaudit audit …")
    for name in DECLARED:
        for r in m["per_concept"][name]["per_style"]:
            assert f"| {name} | {r['style']} ({'seen' if r['seen'] else 'unseen'}) | {r['n']} |" in md
        assert f"| {name} | unseen | {m['per_concept'][name]['unseen']['n']} |" in md
    assert f"any concept present on {100 * m['clean']['any_present']:.1f} %" in md
    # several training runs: a line per run and the median per metric
    full = json.loads(write_metrics(rep, tmp_path).read_text())
    low, high = json.loads(json.dumps(full)), json.loads(json.dumps(full))
    for name in DECLARED:
        low["styles"]["per_concept"][name]["unseen"]["detection"] = 0.0
        high["styles"]["per_concept"][name]["unseen"]["detection"] = 1.0
    seeds = style_split.render_seeds([low, full, high], ["s0", "s1", "s2"], "")
    for name in DECLARED:
        u = m["per_concept"][name]["unseen"]
        assert f"| {name} | unseen | s0 | {u['n']} | 0.0 % |" in seeds
        assert f"| {name} | unseen | s2 | {u['n']} | 100.0 % |" in seeds
        assert f"| {name} | unseen | median | {u['n']} | **{100 * u['detection']:.1f} %** |" in seeds
    html = write_report(rep, tmp_path).read_text()
    assert 'id="styles-band_aid"' in html and "unseen" in html
    assert (
        html.count("style image")
        == sum(len(r.gallery) for rows in rep.styles.rows.values() for r in rows)
        > 0
    )


def test_bad_requests_name_the_valid_choices(trained: tuple, ds: SynthDerm) -> None:
    model, cfg, _ = trained
    with pytest.raises(ConfigError, match="not annotated.*annotated: band_aid"):
        run_audit(model, cfg, "v", ds, ["pacemaker"])
    with pytest.raises(ConfigError, match="no hook point 'features.22'"):
        run_audit(model, cfg, "v", ds, ["band_aid"], layer="features.22")
    with pytest.raises(ConfigError, match="unknown CAV kind"):
        run_audit(model, cfg, "v", ds, ["band_aid"], cav_kind="pca")
    with pytest.raises(ConfigError, match="at least one artifact"):
        run_audit(model, cfg, "v", ds, [])


def test_configs_round_trip_and_plant() -> None:
    cfg = DATA
    assert SynthDermConfig.from_dict(cfg.to_dict()) == cfg
    planted = hidden_artifact_config(TrainConfig(), "timestamp", (0.1, 0.0))
    assert planted.data.spec["timestamp"] == (0.1, 0.0)
    assert planted.data.spec["band_aid"] == TrainConfig().data.spec["band_aid"]


def test_default_concept_layers_apply_to_declared_concepts_and_known_layers() -> None:
    _, resnet = create_model("resnet18")
    assert default_concept_layers(resnet, ["band_aid", "timestamp"]) == {"band_aid": "identity_1"}
    _, vgg = create_model("vgg16")
    assert default_concept_layers(vgg, ["band_aid"]) == {}  # no identity_1 hook point there


@pytest.mark.parametrize(("size", "layer"), [(128, "layer2"), (224, "layer3"), (64, "layer1")])
def test_a_spec_models_concepts_take_the_hook_point_with_the_measured_grid(size: int, layer: str) -> None:
    """A timm ResNet from a spec has hook points layer1..layer4, none named identity_1: its concepts
    take the feature map nearest 16 cells a side (16² at 128 px, 14² at 224 px, 16² at 64 px)."""
    from medaudit.models.audit.options import grid_layer
    from medaudit.models.registry import ModelCfg

    net = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    hooks = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
    cfg = ModelCfg("resnet18", "timm", (3, size, size), hook_points=hooks, default_cav_layer="layer3")
    got = default_concept_layers(cfg, ["band_aid", "ruler", "timestamp"], net)
    assert got == {"band_aid": layer, "ruler": layer}
    assert default_concept_layers(cfg, ["band_aid"]) == {}  # without the model: no shapes to go by
    assert grid_layer(net, cfg, side=4) == ("layer4" if size == 128 else "layer3" if size == 64 else "layer4")


def test_cli_writes_report_metrics_and_banks(trained: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medaudit.cli.commands import app

    _, _, ckpt_dir = trained
    weights = ckpt_dir / "model.pt"
    args = ["audit", "--weights", str(weights), "--out", str(tmp_path), "--artifacts", "band_aid,ruler"]
    res = CliRunner().invoke(app, [*args, "--top-k", "4", "--threads", "1", "--max-test", "30"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["concepts"]["ruler"]["layer"] == "identity_1"  # the built-in per-concept default
    assert m["discovery"]["channels"] == {**m["discovery"]["channels"], "layer": "identity_0"}
    assert m["splits"]["test"] == {"audited": 30, "available": 40}
    assert "checkpoint's own data config" in " ".join(m["notes"])
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert (tmp_path / "banks" / "identity_1" / "bank.json").is_file()
    # --plant refuses to retrain a checkpoint that was trained without that plant
    res = CliRunner().invoke(app, [*args, "--plant", "timestamp:0.1,0.0"])
    assert res.exit_code == 2 and "trained without timestamp" in re.sub(r"[\s│]+", " ", res.output)


def test_a_vits_concept_masks_are_binarised_over_superpixels(ds: SynthDerm) -> None:
    """A ViT's localization masks come from its concept heatmap summed over the image's SLIC
    superpixels (the family's pooling, method.md §2.4); a ResNet's stay on the pixels (above)."""
    torch.manual_seed(0)
    model, cfg = create_model("vit_tiny_patch16_224", img_size=32)
    opts = replace(OPTS, concept_layers={}, n_gallery=4)
    rep = run_audit(model, cfg, "vit-tiny:untrained", ds, ("band_aid",), options=opts)
    shown = rep.concepts["band_aid"].gallery
    assert shown
    differ = 0
    for g in shown:
        pooled = concept_mask(g.heatmap.astype(np.float64), g.image, "superpixels")
        assert (g.mask == pooled).mean() > 0.99  # the heatmap is kept as float32 in the gallery
        differ += int((binarize(g.heatmap) != g.mask).sum())
    assert differ > 0, "the masks are the pixel binarisation: superpixel pooling is not applied"
