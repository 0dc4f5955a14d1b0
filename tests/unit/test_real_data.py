"""Real-data adapters: the generic folder dataset, ISIC2019, annotations and ``open_dataset``.

Every fixture is a handful of tiny images written into ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medaudit.models.data.annotations import load_artifact_ids
from medaudit.models.data.folder import FolderDataset, paper_split
from medaudit.models.data.isic import ISIC2019, ISIC_CLASSES
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.data.registry import open_dataset
from medaudit.models.data.synthetic import LABELS, SynthDerm, SynthDermConfig
from medaudit.models.errors import ConfigError, DatasetError

IDS = [f"img{i:02d}" for i in range(10)]


def _rgb(seed: int, h: int = 8, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _folder(root: Path, n: int = 10, split: bool = False) -> Path:
    """``n`` RGB PNGs (img00.png …), labels cat/dog alternating, optional split column."""
    (root / "images").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(_rgb(i)).save(root / "images" / f"img{i:02d}.png")
    rows = [
        [f"img{i:02d}", ("cat", "dog")[i % 2]] + ([("train", "val", "test")[i % 3]] if split else [])
        for i in range(n)
    ]
    _write_csv(root / "labels.csv", ["image", "label"] + (["split"] if split else []), rows)
    return root


def _isic(root: Path, image_dir: str = "Train", rows: Sequence[Sequence[str]] | None = None) -> Path:
    """A tiny ISIC2019 layout: image k has class k % 8 (UNK stays empty, as in the real CSV)."""
    (root / image_dir).mkdir(parents=True)
    if rows is None:
        rows = [[f"ISIC_{k:07d}"] + ["1.0" if c == k % 8 else "0.0" for c in range(9)] for k in range(10)]
    for row in rows:
        Image.fromarray(_rgb(len(row[0]), 12, 16)).save(root / image_dir / f"{row[0]}.jpg", quality=95)
    _write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_CLASSES], rows)
    return root


# ------------------------------------------------------------------------------- folder dataset


def test_folder_reads_ids_labels_and_images(tmp_path: Path) -> None:
    ds = FolderDataset(_folder(tmp_path))
    assert len(ds) == 10 and ds.ids == tuple(IDS)
    assert ds.label_names == ("cat", "dog")
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1] * 5
    img = ds.load_image(3)
    assert img.dtype == np.uint8 and img.shape == (8, 10, 3)
    np.testing.assert_array_equal(img, _rgb(3))
    assert ds.load_image(3, size=16).shape == (16, 16, 3)


def test_resize_is_bicubic(tmp_path: Path) -> None:
    ds = FolderDataset(_folder(tmp_path))
    want = np.asarray(Image.fromarray(_rgb(0)).resize((5, 5), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ds.load_image(0, size=5), want)


def test_ids_with_extension_jpeg_and_other_modes(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(d / "grey.png")
    Image.fromarray(np.dstack([_rgb(1, 6, 8), np.full((6, 8), 9, np.uint8)])).save(d / "alpha.png")
    Image.fromarray(_rgb(2, 6, 8)).save(d / "photo.JPG")
    Image.fromarray(grey.astype(np.uint16) * 257).save(d / "deep.tif")
    Image.fromarray(_rgb(3, 6, 8)).convert("P").save(d / "pal.png")
    names = ["grey.png", "alpha", "photo", "deep", "pal"]
    _write_csv(tmp_path / "labels.csv", ["image", "label"], [[n, "a"] for n in names])
    ds = FolderDataset(tmp_path)
    imgs = [ds.load_image(i) for i in range(len(ds))]
    assert all(im.shape == (6, 8, 3) and im.dtype == np.uint8 for im in imgs)
    np.testing.assert_array_equal(imgs[0], np.dstack([grey] * 3))
    np.testing.assert_array_equal(imgs[1], _rgb(1, 6, 8))  # alpha dropped
    np.testing.assert_array_equal(imgs[3], np.dstack([grey] * 3))  # 16 bit scaled, not clipped
    assert ds.paths[2].name == "photo.JPG"


def test_given_label_order_and_numeric_sort(tmp_path: Path) -> None:
    assert FolderDataset(_folder(tmp_path), labels=["dog", "cat"]).labels.tolist() == [1, 0] * 5
    (tmp_path / "n").mkdir()
    root = _folder(tmp_path / "n", n=3)
    _write_csv(root / "labels.csv", ["image", "label"], [["img00", "10"], ["img01", "2"], ["img02", "2"]])
    ds = FolderDataset(root)
    assert ds.label_names == ("2", "10") and ds.labels.tolist() == [1, 0, 0]


def test_split_column_is_used(tmp_path: Path) -> None:
    ds = FolderDataset(_folder(tmp_path, split=True))
    assert ds.indices("train").tolist() == [0, 3, 6, 9]
    assert ds.indices("val").tolist() == [1, 4, 7]
    assert ds.indices("test").tolist() == [2, 5, 8]
    assert ds.indices("all").tolist() == list(range(10))
    with pytest.raises(ConfigError, match="'dev'.*train, val, test, all"):
        ds.indices("dev")


def test_paper_split_is_deterministic_disjoint_10_10_80() -> None:
    train, val, test = paper_split(50)
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted([*train, *val, *test]) == list(range(50))
    for part in (train, val, test):
        assert np.all(np.diff(part) > 0)
    again = paper_split(50)
    for a, b in zip((train, val, test), again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_paper_split_matches_reference_recipe() -> None:
    """The base_dataset.py recipe of method.md §8, written out independently."""
    n = 37
    rng = np.random.default_rng(0)
    val = sorted(rng.choice(np.arange(n), size=4, replace=False))
    left = np.array(list(set(np.arange(n)) - set(val)))
    test = sorted(rng.choice(left, size=4, replace=False))
    got = paper_split(n)
    assert got[1].tolist() == [int(v) for v in val] and got[2].tolist() == [int(t) for t in test]


def test_folder_without_split_column_uses_paper_split(tmp_path: Path) -> None:
    ds = FolderDataset(_folder(tmp_path))
    for name, idx in zip(("train", "val", "test"), paper_split(10), strict=True):
        np.testing.assert_array_equal(ds.indices(name), idx)
    assert FolderDataset(_folder(tmp_path / "s", split=True), split_col=None).indices("val").tolist() == (
        paper_split(10)[1].tolist()
    )


def test_class_weights_and_torch_view(tmp_path: Path) -> None:
    ds = FolderDataset(_folder(tmp_path, n=3), labels=["cat", "dog", "eel"], allow_empty=["eel"])
    np.testing.assert_allclose(ds.class_weights(), [1.0, 2.0, 0.0])
    view = ds.as_torch(size=6)
    x, y = view[1]
    assert len(view) == 3 and x.dtype == torch.uint8 and x.shape == (3, 6, 6) and y == 1


# -------------------------------------------------------------------------- annotations, masks


def test_artifacts_and_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "artifacts.json").write_text(json.dumps({"ruler": ["img02", "img07.png", 9], "hair": []}))
    (root / "masks").mkdir()
    m = np.zeros((8, 10), np.uint8)
    m[2:4, 3:7] = 255
    Image.fromarray(m).save(root / "masks" / "img02_ruler.png")
    ds = FolderDataset(root)
    assert ds.artifact_ids() == {"ruler": [2, 7, 9], "hair": []}
    assert ds.artifact_ids("val") == {"ruler": [i for i in (2, 7, 9) if i in ds.indices("val")], "hair": []}
    np.testing.assert_array_equal(ds.mask(2, "ruler"), m > 0)
    nearest = np.asarray(Image.fromarray(m).resize((20, 20), Image.Resampling.NEAREST)) > 0
    np.testing.assert_array_equal(ds.mask(2, "ruler", size=20), nearest)  # stays binary
    assert not ds.mask(0, "ruler").any() and ds.mask(0, "ruler").shape == (8, 10)


def test_mask_errors(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "artifacts.json").write_text(json.dumps({"ruler": ["img07"]}))
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match="no mask folder .*masks"):
        ds.mask(7, "ruler")
    (root / "masks").mkdir()
    with pytest.raises(DatasetError, match="masks has no masks of 'ruler'.*localize --export-masks"):
        ds.mask(7, "ruler")
    (root / "masks" / "ruler").mkdir()
    with pytest.raises(DatasetError, match="'img07' is annotated with 'ruler'.*ruler/img07.png is missing"):
        ds.mask(7, "ruler")
    with pytest.raises(DatasetError, match="'band_aid' is not an annotated artifact; annotated: ruler"):
        ds.mask(0, "band_aid")


def test_annotation_errors(tmp_path: Path) -> None:
    ids = ["a", "b"]
    p = tmp_path / "arts.json"
    p.write_text(json.dumps({"ruler": ["a", "x1", "x2"], "band_aid": ["x3", "x4", "x5", "x6", 7]}))
    with pytest.raises(
        DatasetError, match=r"7 unknown sample ids \(first 5: ruler:'x1', .*band_aid:'x5'\)"
    ) as e:
        load_artifact_ids(p, ids)
    assert "x6" not in str(e.value)
    p.write_text(json.dumps({"ruler": "a"}))
    with pytest.raises(DatasetError, match="artifact 'ruler' maps to str; expected a list"):
        load_artifact_ids(p, ids)
    p.write_text(json.dumps(["a"]))
    with pytest.raises(DatasetError, match="top level is list; expected an object"):
        load_artifact_ids(p, ids)
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="arts.json: cannot read artifact annotations as JSON"):
        load_artifact_ids(p, ids)
    with pytest.raises(DatasetError, match="annotation file .*nope.json does not exist"):
        FolderDataset(_folder(tmp_path / "d"), artifacts_file=tmp_path / "nope.json")


# ---------------------------------------------------------------------------------- folder errors


def test_missing_root_and_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset root .*absent does not exist"):
        FolderDataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="labels CSV .*labels.csv does not exist"):
        FolderDataset(tmp_path)


def test_unknown_columns_list_existing_ones(tmp_path: Path) -> None:
    root = _folder(tmp_path, split=True)
    with pytest.raises(
        DatasetError, match="column 'diagnosis' not in .*labels.csv; columns: image, label, split"
    ):
        FolderDataset(root, label_col="diagnosis")
    with pytest.raises(DatasetError, match="column 'fold' not in .*; columns: image, label, split"):
        FolderDataset(root, split_col="fold")


def test_empty_and_header_only_csv(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "labels.csv").write_text("")
    with pytest.raises(DatasetError, match="labels.csv is empty"):
        FolderDataset(root)
    (root / "labels.csv").write_text("image,label\n\n")
    with pytest.raises(DatasetError, match=r"labels.csv has a header \(image, label\) but no rows"):
        FolderDataset(root)


def test_bad_cells_labels_splits_and_duplicates(tmp_path: Path) -> None:
    root = _folder(tmp_path, n=3)
    csv_path = root / "labels.csv"
    _write_csv(csv_path, ["image", "label"], [["img00", "cat"], ["img01", "bird"], ["img02", "dog"]])
    with pytest.raises(DatasetError, match=r"line 3: label 'bird' not in labels \(cat, dog\)"):
        FolderDataset(root, labels=["cat", "dog"])
    _write_csv(csv_path, ["image", "label"], [["img00", "cat"], ["img01", ""]])
    with pytest.raises(DatasetError, match="line 3: empty value in column 'label'"):
        FolderDataset(root)
    _write_csv(csv_path, ["image", "label", "split"], [["img00", "cat", "train"], ["img01", "dog", "dev"]])
    with pytest.raises(DatasetError, match="line 3: split 'dev' not one of train, val, test"):
        FolderDataset(root)
    _write_csv(csv_path, ["image", "label"], [["img00", "cat"], ["img00", "dog"]])
    with pytest.raises(DatasetError, match="line 3: image 'img00' is listed again .first at .*line 2"):
        FolderDataset(root)


def test_missing_images_are_named(tmp_path: Path) -> None:
    root = _folder(tmp_path, n=2)
    _write_csv(root / "labels.csv", ["image", "label"], [["img00", "a"], ["ghost", "a"], ["img01", "a"]])
    with pytest.raises(DatasetError, match=r"1 images missing from .*images \(first 1: ghost\); looked for"):
        FolderDataset(root)
    with pytest.raises(DatasetError, match="image folder .*pics does not exist"):
        FolderDataset(root, image_dir="pics")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image_names_the_file(tmp_path: Path, content: bytes | str) -> None:
    ds = FolderDataset(_folder(tmp_path, n=2))
    path = tmp_path / "images" / "img01.png"
    data = path.read_bytes()[:60] if content == "truncated" else content
    assert isinstance(data, bytes)
    path.write_bytes(data)
    with pytest.raises(DatasetError, match="cannot read image .*img01.png"):
        ds.load_image(1)
    path.unlink()
    with pytest.raises(DatasetError, match="image file .*img01.png does not exist"):
        ds.load_image(1)


# ------------------------------------------------------------------------------------ synthderm


def test_reads_synthderm_export_back(tmp_path: Path) -> None:
    synth = SynthDerm(SynthDermConfig(n_train=8, n_val=2, n_test=2, size=48))
    ds = FolderDataset(synth.export(tmp_path), labels=LABELS)
    assert len(ds) == 12 and ds.label_names == LABELS
    np.testing.assert_array_equal(ds.labels, synth.labels)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(ds.indices(split), synth.indices(split))
    assert ds.artifact_ids() == synth.artifact_ids()
    art, idx = next((a, ids[0]) for a, ids in synth.artifact_ids().items() if ids)
    sample = synth.sample(idx)
    np.testing.assert_array_equal(ds.load_image(idx), sample.image)
    np.testing.assert_array_equal(ds.mask(idx, art), sample.masks[art])


def test_every_dataset_satisfies_the_protocol_alike(tmp_path: Path) -> None:
    """Synthderm and its export read back answer the dataset protocol with the same values."""
    synth = SynthDerm(SynthDermConfig(n_train=8, n_val=2, n_test=2, size=48))
    folder = FolderDataset(synth.export(tmp_path / "export"), labels=LABELS)
    isic = ISIC2019(_isic(tmp_path / "isic"))
    for ds in (synth, folder, isic):
        assert isinstance(ds, AnnotatedDataset)
    assert synth.has_masks and folder.has_masks and not isic.has_masks
    assert synth.config() == synth.cfg.to_dict() and folder.config() is None and isic.config() is None
    assert tuple(synth.label_names) == tuple(folder.label_names) == LABELS
    art, idx = next((a, ids[0]) for a, ids in synth.artifact_ids().items() if ids)
    for size in (None, 48, 32):
        np.testing.assert_array_equal(synth.load_image(idx, size), folder.load_image(idx, size))
        np.testing.assert_array_equal(synth.mask(idx, art, size), folder.mask(idx, art, size))
    clean = int(np.flatnonzero(~synth.membership[art])[0])
    assert synth.mask(clean, art, 32).shape == (32, 32) and not synth.mask(clean, art, 32).any()
    with pytest.raises(DatasetError, match="unknown artifact 'pacemaker'; valid: band_aid"):
        synth.mask(idx, "pacemaker")


# -------------------------------------------------------------------------------------- ISIC2019


def test_isic_reads_one_hot_and_split(tmp_path: Path) -> None:
    ds = ISIC2019(_isic(tmp_path))
    assert ds.label_names == ISIC_CLASSES and ds.labels.tolist() == [k % 8 for k in range(10)]
    assert ds.ids[0] == "ISIC_0000000" and ds.paths[0].parent.name == "Train"
    assert ds.load_image(0, size=7).shape == (7, 7, 3)
    for name, idx in zip(("train", "val", "test"), paper_split(10), strict=True):
        np.testing.assert_array_equal(ds.indices(name), idx)
    assert ds.class_weights()[-1] == 0.0  # UNK is empty


def test_isic_mel_vs_rest_and_zip_folder_name(tmp_path: Path) -> None:
    ds = ISIC2019(_isic(tmp_path, image_dir="ISIC_2019_Training_Input"), classes="mel_vs_rest")
    assert ds.label_names == ("rest", "MEL") and ds.labels.tolist() == [1] + [0] * 7 + [1, 0]
    assert ds.paths[0].parent.name == "ISIC_2019_Training_Input"
    with pytest.raises(DatasetError, match="unknown ISIC2019 classes 'binary'; valid: all, mel_vs_rest"):
        ISIC2019(tmp_path, classes="binary")


def test_isic_annotations_by_image_name(tmp_path: Path) -> None:
    root = _isic(tmp_path)
    (root / "artifacts.json").write_text(json.dumps({"band_aid": ["ISIC_0000003", "ISIC_0000005.jpg"]}))
    assert ISIC2019(root).artifact_ids() == {"band_aid": [3, 5]}


@pytest.mark.parametrize(
    ("onehot", "match"),
    [
        (["0.0"] * 9, "'ISIC_0000001' must have exactly one class set to 1, has none"),
        (["1.0", "1"] + ["0"] * 7, "'ISIC_0000001' must have exactly one class set to 1, has MEL, NV"),
        (["0.5"] + ["0"] * 8, "'ISIC_0000001' has MEL='0.5'; one-hot values must be 0 or 1"),
        (["yes"] + ["0"] * 8, "'ISIC_0000001' has MEL='yes'"),
    ],
)
def test_isic_bad_one_hot_rows_name_the_image(tmp_path: Path, onehot: list[str], match: str) -> None:
    rows = [["ISIC_0000000", "1"] + ["0"] * 8, ["ISIC_0000001", *onehot]]
    with pytest.raises(DatasetError, match=match):
        ISIC2019(_isic(tmp_path, rows=rows))


def test_isic_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ISIC_2019_Training_GroundTruth.csv does not exist"):
        ISIC2019(tmp_path)
    root = _isic(tmp_path / "a")
    for p in (root / "Train").iterdir():
        p.unlink()
    (root / "Train").rmdir()
    with pytest.raises(
        DatasetError, match="no ISIC2019 image folder .*expected one of: Train, ISIC_2019_Training_Input"
    ):
        ISIC2019(root)
    root = _isic(tmp_path / "b")
    (root / "Train" / "ISIC_0000004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 images missing .*Train \(first 1: ISIC_0000004\)"):
        ISIC2019(root)
    _write_csv(
        root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_CLASSES[:-1]], [["x"] + ["0"] * 8]
    )
    with pytest.raises(DatasetError, match="column 'UNK' not in .*; columns: image, MEL, NV"):
        ISIC2019(root)


# --------------------------------------------------------------------------------- open_dataset


def test_open_dataset_specs(tmp_path: Path) -> None:
    assert isinstance(open_dataset("synthderm"), SynthDerm)
    assert isinstance(open_dataset(f"folder:{_folder(tmp_path / 'f')}"), FolderDataset)
    assert isinstance(open_dataset(f"isic2019:{_isic(tmp_path / 'i')}"), ISIC2019)
    with pytest.raises(
        DatasetError, match="unknown dataset spec 'imagenet:/x'; valid: synthderm, isic2019:<path>"
    ):
        open_dataset("imagenet:/x")
    with pytest.raises(DatasetError, match="'folder:' has no path; write folder:<path>"):
        open_dataset("folder:")
    with pytest.raises(DatasetError, match="synthderm takes no path"):
        open_dataset("synthderm:/x")
    with pytest.raises(DatasetError, match="dataset root .*nowhere does not exist"):
        open_dataset(f"folder:{tmp_path / 'nowhere'}")
