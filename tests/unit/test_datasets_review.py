"""The review loop and derived masks on a dataset on disk, as a hospital runs them: ``medaudit
annotate`` (rank by CAV score, review sheet, ``--apply``) and ``medaudit localize
--export-masks``, with a classifier given by a model spec (random weights: what is tested is the
plumbing, the ranking's definition and the files; the IoU a trained model reaches is measured in
benchmarks/derived_masks.py)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from datasets_data import tiny
from typer.testing import CliRunner

from medaudit.cli.commands import app
from medaudit.models.audit.annotated import annotation_cav, images
from medaudit.models.audit.review import apply_sheet, rank
from medaudit.models.corrections.base import pooled_activations
from medaudit.models.data.masks import MaskFolder
from medaudit.models.data.registry import open_dataset
from medaudit.models.errors import ConfigError, DatasetError
from medaudit.models.spec import build, load_spec
from medaudit.testing.models import trained_like

LAYER = "layer2"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Tiny three-class synthderm in the ISIC 2019 layout with its true masks held back, and the
    model spec of a (random, trained-looking) timm ResNet-18."""
    root = tmp_path_factory.mktemp("hospital")
    synth = tiny()
    synth.export(root / "isic", layout="isic2019", mask_dir=root / "held")
    torch.manual_seed(0)
    net = trained_like(timm.create_model("resnet18", pretrained=False, num_classes=3)).eval()
    torch.save(net.state_dict(), root / "derm.pt")
    (root / "derm.toml").write_text(
        'name = "derm"\nsource = "timm"\narch = "resnet18"\ncheckpoint = "derm.pt"\n'
        'labels = ["NV", "MEL", "BCC"]\ninput_size = 32\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n'
    )
    spec = json.loads((root / "isic" / "synthderm.json").read_text())["open_with"]
    return {"root": root, "data": spec, "spec": root / "derm.toml", "held": root / "held"}


def _run(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_ranking_is_the_cav_score_of_every_image(hospital: dict) -> None:
    net, cfg, _ = build(load_spec(hospital["spec"]))
    ds = open_dataset(hospital["data"])
    fitted = annotation_cav(net, cfg, ds, "band_aid", LAYER, kind="signal")
    in_train = set(ds.artifact_ids("train")["band_aid"])
    assert fitted.cav.n_pos == len(in_train) and fitted.cav.n_pos + fitted.cav.n_neg == len(
        ds.indices("train")
    )
    r = rank(net, cfg, ds, fitted, "all")
    assert sorted(r.index.tolist()) == list(range(len(ds))) and np.all(np.diff(r.score) <= 0)
    top = r.index[:3]
    want = pooled_activations(net, cfg, LAYER, images(ds, top, 32)) @ fitted.v  # s(x) = <phi(x), v>
    np.testing.assert_allclose(r.score[:3], want, rtol=1e-6)
    assert r.annotated.tolist() == [int(i) in set(ds.artifact_ids()["band_aid"]) for i in r.index]
    with pytest.raises(ConfigError, match="training images of classes MEL with and without it"):
        annotation_cav(net, cfg, ds, "band_aid", LAYER, scope=(1,))  # no band-aid on a melanoma in train
    with pytest.raises(DatasetError, match=r"annotated with 'bandaid' \(did you mean 'band_aid'\?\)"):
        annotation_cav(net, cfg, ds, "bandaid", LAYER)


def test_annotate_writes_the_sheet_and_apply_closes_the_loop(hospital: dict, tmp_path: Path) -> None:
    out = _run("annotate", "--data", hospital["data"], "--concept", "band_aid", "--model", hospital["spec"],
               "--layer", LAYER, "--out", tmp_path, "--thumbs", "5")  # fmt: skip
    assert "review sheet" in out
    sheet = tmp_path / "band_aid_review.csv"
    rows = list(csv.DictReader(io.StringIO(sheet.read_text())))
    assert len(rows) == 72 and [int(r["rank"]) for r in rows] == list(range(1, 73))
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    page = (tmp_path / "band_aid_review.html").read_text()
    assert (
        len(re.findall(r"<img src=\"data:image/jpeg;base64,", page)) == 5
        and "download the filled sheet" in page
    )
    # a reviewer: the top image that is not annotated shows one, the top annotated one does not
    new = next(r for r in rows if r["annotated"] == "no")
    wrong = next(r for r in rows if r["annotated"] == "yes")
    new["verdict"], wrong["verdict"] = "yes", "no"
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    before = open_dataset(hospital["data"]).artifact_ids()["band_aid"]
    out = _run("annotate", "--apply", filled, "--data", hospital["data"])
    assert "band_aid: +1 added, -1 removed, 0 confirmed" in out
    ds = open_dataset(hospital["data"])
    after = ds.artifact_ids()["band_aid"]
    assert set(after) == (set(before) | {ds.ids.index(new["image"])}) - {ds.ids.index(wrong["image"])}
    # and back, so the module's other tests see the exported annotations
    new["verdict"], wrong["verdict"] = "no", "yes"
    with filled.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _run("annotate", "--apply", filled, "--data", hospital["data"])
    assert open_dataset(hospital["data"]).artifact_ids()["band_aid"] == before


def test_apply_refuses_bad_sheets(hospital: dict, tmp_path: Path) -> None:
    ds = open_dataset(hospital["data"])
    p = tmp_path / "s.csv"
    for body, match in [
        (
            "concept,image,verdict\nband_aid,ISIC_0000001,perhaps\n",
            "line 2: verdict 'perhaps'; write one of yes",
        ),
        (
            "concept,image,verdict\nband_aid,ISIC_9999999,yes\n",
            "line 2: image 'ISIC_9999999' is not in the dataset",
        ),
        (
            "concept,image,verdict\nband_aid,ISIC_0000001,yes\nband_aid,ISIC_0000001,no\n",
            "line 3: 'ISIC_0000001' has another verdict for 'band_aid' at line 2",
        ),
        ("concept,image\nband_aid,ISIC_0000001\n", "column 'verdict' not in"),
    ]:
        p.write_text(body)
        with pytest.raises(DatasetError, match=match):
            apply_sheet(p, ds)


def test_localize_exports_derived_masks_and_scores_them(hospital: dict, tmp_path: Path) -> None:
    report = tmp_path / "loc.json"
    out = _run("localize", "--data", hospital["data"], "--artifact", "band_aid,ruler",
               "--model", hospital["spec"], "--layer", LAYER, "--export-masks",
               "--true-masks", hospital["held"], "--report", report)  # fmt: skip
    assert "IoU vs true masks" in out
    ds = open_dataset(hospital["data"])
    assert ds.mask_source == "derived" and ds.mask_source_of("ruler") == "derived"
    prov = ds.masks.provenance("band_aid")
    assert prov is not None and prov["layer"] == LAYER and prov["model"] == "derm:original"
    carriers = ds.artifact_ids()["band_aid"]
    assert ds.masks.keys("band_aid") == {ds.keys[i] for i in carriers}
    m = ds.mask(carriers[0], "band_aid")
    assert m.shape == (32, 32) and m.any() and not m.all()
    assert ds.validate()["masks"] == sum(len(v) for a, v in ds.artifact_ids().items() if a != "skin_marker")
    summary = json.loads(report.read_text())
    held = MaskFolder(hospital["held"])
    scored = sum(held.read(ds.keys[i], "band_aid").any() for i in carriers)
    assert (
        summary["band_aid"]["iou"]["all"]["n"] == scored
        and 0 <= summary["band_aid"]["iou"]["all"]["mean"] <= 1
    )


def test_localize_never_overwrites_drawn_masks(hospital: dict, tmp_path: Path) -> None:
    drawn = tmp_path / "drawn"
    MaskFolder(drawn).write("ISIC_0000000", "ruler", np.ones((32, 32), bool))
    res = CliRunner().invoke(app, ["localize", "--data", hospital["data"], "--artifact", "ruler",
                                   "--model", str(hospital["spec"]), "--layer", LAYER, "--export-masks",
                                   "--masks-dir", str(drawn)])  # fmt: skip
    assert res.exit_code == 2 and "holds masks a person drew" in res.output and "--force" in res.output
