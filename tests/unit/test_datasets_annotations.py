"""Artifact annotations as people make them (CSV image,artifacts; JSON by image; the paper's JSON by
artifact), masks in masks/<artifact>/<image>.png, and where the masks came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets_data import folder, write_csv
from PIL import Image

from medaudit.models.data.annotations import read_annotations, require_artifact, write_annotations
from medaudit.models.data.folder import FolderDataset
from medaudit.models.data.masks import MaskFolder
from medaudit.models.data.protocol import MASK_SOURCES
from medaudit.models.errors import DatasetError

IDS = [f"img{i:02d}" for i in range(6)]
WANT = {"band_aid": [0, 3], "ruler": [3]}


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("a.csv", "image,artifacts\nimg00,band_aid\nimg01,\nimg03.png, ruler ; band_aid\n"),
        ("b.json", json.dumps({"img00": ["band_aid"], "img03": ["ruler", "band_aid"], "img05": []})),
        ("c.json", json.dumps({"band_aid": ["img00", 3], "ruler": ["img03.png"]})),
    ],
)
def test_the_three_formats_read_alike(tmp_path: Path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    ann = read_annotations(tmp_path / name, IDS)
    assert ann.by_artifact == WANT
    assert ann.format == {"a.csv": "csv", "b.json": "json_by_image", "c.json": "json_by_artifact"}[name]


@pytest.mark.parametrize("fmt", ["csv", "json_by_image", "json_by_artifact"])
def test_written_annotations_read_back(tmp_path: Path, fmt: str) -> None:
    path = write_annotations(tmp_path / f"x.{'csv' if fmt == 'csv' else 'json'}", IDS, WANT, fmt)
    assert read_annotations(path, IDS).by_artifact == WANT and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            "image,artifacts\nimg00,Band-Aid\n",
            r"line 2: artifact name 'Band-Aid' is not lower-case .* write 'band_aid'",
        ),
        (
            "image,artifacts\nimg00,band_aid\nimg01,bandaid\n",
            r"line 3: artifact 'bandaid' and 'band_aid' \(first at .*line 2\) look like one artifact",
        ),
        ("image,artifacts\nimg00,rulr\n", r"line 2: unknown artifact 'rulr' \(did you mean 'ruler'\?\)"),
        ("image,artifacts\nimg00,band_aid\nimg00,ruler\n", r"line 3: image 'img00' is listed again"),
        ("image,artifacts\nimg09,ruler\n", "line 2: image 'img09' is not in the dataset"),
        ("image,artifact\nimg00,ruler\n", r"column 'artifacts' not in .*; columns: image, artifact"),
        ("image,artifacts,who\nimg00,ruler,me\n", r"unexpected column 'who'.*image,artifacts \(a;b\)"),
    ],
)
def test_csv_errors_name_the_row_and_the_file(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "a.csv").write_text(content)
    with pytest.raises(DatasetError, match=r"a.csv.*" + match if "line" in match else match):
        read_annotations(tmp_path / "a.csv", IDS, vocabulary=("band_aid", "ruler"))


def test_json_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"img00": "ruler"}))
    with pytest.raises(DatasetError, match="image 'img00' maps to 'ruler'; expected a list"):
        read_annotations(p, IDS)
    p.write_text(json.dumps({"x1": ["ruler"], "x2": []}))
    with pytest.raises(DatasetError, match="none of its keys is an image .*first: 'x1'.*another dataset"):
        read_annotations(p, IDS)
    p.write_text(json.dumps({"pacemaker": ["img01"]}))
    with pytest.raises(DatasetError, match=r"a.json: key 'pacemaker': unknown artifact .*band_aid, ruler"):
        read_annotations(p, IDS, vocabulary=("band_aid", "ruler"))


def test_require_artifact_names_the_annotated_ones() -> None:
    with pytest.raises(
        DatasetError,
        match=r"annotated with 'bandaid' \(did you mean 'band_aid'\?\); annotated: band_aid \(2\)",
    ):
        require_artifact({"band_aid": [0, 3], "hair": []}, "bandaid")


def _dataset_with_masks(root: Path) -> Path:
    folder(root)
    (root / "artifacts.csv").write_text("image,artifacts\nimg00,band_aid\nimg03,ruler;band_aid\n")
    for key, art in (("img00", "band_aid"), ("img03", "band_aid"), ("img03", "ruler")):
        m = np.zeros((8, 10), np.uint8)
        m[1:4, 2:6] = 255
        MaskFolder(root / "masks").write(key, art, m)
    return root


def test_mask_layout_and_sources(tmp_path: Path) -> None:
    root = _dataset_with_masks(tmp_path)
    ds = FolderDataset(root)
    assert ds.mask_source == "ground_truth" and ds.mask_source_of("ruler") == "ground_truth"
    assert ds.mask(3, "ruler")[1:4, 2:6].all() and ds.mask(3, "ruler").sum() == 12
    assert not ds.mask(1, "ruler").any()  # not annotated: zeros (method.md §5.4)
    assert ds.mask(3, "ruler", size=20).shape == (20, 20)
    assert ds.validate() == {
        "images": 6,
        "masks": 3,
        "mask_sources": {"band_aid": "ground_truth", "ruler": "ground_truth"},
    }
    MaskFolder(root / "masks").mark("band_aid", "derived", layer="layer2")
    again = FolderDataset(root)
    assert again.mask_source_of("band_aid") == "derived" and again.mask_source_of("ruler") == "ground_truth"
    assert again.mask_source == "derived"  # the weaker source of the two
    assert again.mask_source_of("skin_marker") == "none" and set(MASK_SOURCES) == {
        "ground_truth",
        "derived",
        "none",
    }
    assert again.masks.provenance("band_aid") == {"source": "derived", "layer": "layer2"}


def test_legacy_flat_masks_still_read(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "artifacts.json").write_text(json.dumps({"ruler": ["img02"]}))
    (root / "masks").mkdir()
    m = np.zeros((8, 10), np.uint8)
    m[2:4, 3:7] = 255
    Image.fromarray(m).save(root / "masks" / "img02_ruler.png")
    ds = FolderDataset(root)
    assert ds.mask(2, "ruler").sum() == 8 and ds.mask_source_of("ruler") == "ground_truth"


def test_annotations_of_left_out_images_are_skipped(tmp_path: Path) -> None:
    """A class subset leaves images out; their annotation rows are not 'unknown images'."""
    from medaudit.models.data.isic import ISIC2019, ISIC_CLASSES

    (tmp_path / "Train").mkdir()
    rows = []
    for k in range(6):
        Image.fromarray(np.full((8, 8, 3), 30 * k, np.uint8)).save(tmp_path / "Train" / f"ISIC_{k:07d}.jpg")
        rows.append([f"ISIC_{k:07d}", *("1.0" if c == k % 3 else "0.0" for c in range(9))])
    write_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_CLASSES], rows)
    (tmp_path / "artifacts.csv").write_text("image,artifacts\nISIC_0000001,ruler\nISIC_0000002,ruler\n")
    ds = ISIC2019(tmp_path, classes="MEL,NV")
    assert ds.ids == ("ISIC_0000000", "ISIC_0000001", "ISIC_0000003", "ISIC_0000004")
    assert ds.artifact_ids() == {"ruler": [1]}
