"""Bad input, each a DatasetError naming the file and the row: missing or extra columns, unknown
labels, an image listed but absent, an unreadable image, a mask of the wrong size, an annotation
naming an unknown artifact, an empty class; in every layout where the case can arise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets_data import folder, rgb, write_csv
from PIL import Image

from medaudit.models.data.chexpert import CheXpert
from medaudit.models.data.classfolders import ClassFolders
from medaudit.models.data.folder import FolderDataset
from medaudit.models.data.isic import ISIC2019, ISIC_CLASSES, METADATA_COLUMNS
from medaudit.models.data.masks import MaskFolder
from medaudit.models.data.registry import open_dataset
from medaudit.models.errors import DatasetError

CHEX = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema"]


def _isic(root: Path, n: int = 4) -> Path:
    (root / "Train").mkdir(parents=True)
    rows = []
    for k in range(n):
        Image.fromarray(rgb(k)).save(root / "Train" / f"ISIC_{k:07d}.jpg")
        rows.append([f"ISIC_{k:07d}", *("1.0" if c == k % 2 else "0.0" for c in range(9))])
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC_CLASSES], rows)
    meta = [[f"ISIC_{k:07d}", 50, "torso", f"IL_{k // 2}", "male"] for k in range(n)]
    write_csv(root / "ISIC_2019_Training_Metadata.csv", METADATA_COLUMNS, meta)
    return root


def _chexpert(root: Path, values: list[str]) -> Path:
    rows = []
    for p, v in enumerate(values):
        rel = f"train/patient{p:05d}/study1/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(p)).save(root / rel)
        rows.append([rel, "Male", 40, "Frontal", "PA", v])
    write_csv(root / "train.csv", CHEX, rows)
    return root


# ----------------------------------------------------------------------- missing / extra columns


def test_missing_and_extra_columns(tmp_path: Path) -> None:
    root = folder(tmp_path / "f", header=("image", "label", "diagnosis"), extra=lambda i: ["x"])
    with pytest.raises(DatasetError, match=r"labels.csv: unexpected column 'diagnosis'; .*image, label"):
        FolderDataset(root)
    with pytest.raises(
        DatasetError, match=r"column 'class' not in .*labels.csv; columns: image, label, diagnosis"
    ):
        FolderDataset(root, label_col="class")
    isic = _isic(tmp_path / "i")
    gt = isic / "ISIC_2019_Training_GroundTruth.csv"
    write_csv(gt, ["image", *ISIC_CLASSES, "ISIC_X"], [["ISIC_0000000", "1.0", *["0.0"] * 9]])
    with pytest.raises(DatasetError, match=r"GroundTruth.csv: unexpected column 'ISIC_X'"):
        ISIC2019(isic, classes="MEL,NV")
    write_csv(isic / "ISIC_2019_Training_Metadata.csv", ["image", "age_approx"], [["ISIC_0000000", 50]])
    _isic(tmp_path / "j")
    write_csv(
        tmp_path / "j" / "ISIC_2019_Training_Metadata.csv", ["image", "sex"], [["ISIC_0000000", "male"]]
    )
    with pytest.raises(DatasetError, match=r"column 'lesion_id' not in .*Metadata.csv"):
        ISIC2019(tmp_path / "j", classes="MEL,NV")
    chex = _chexpert(tmp_path / "c", ["1.0", "0.0"])
    write_csv(
        chex / "train.csv",
        [*CHEX, "Notes"],
        [
            [f"train/patient{p:05d}/study1/view1_frontal.jpg", "M", 1, "Frontal", "PA", "1.0", "ok"]
            for p in range(2)
        ],
    )
    with pytest.raises(
        DatasetError, match=r"train.csv line 2: column 'Notes' has 'ok'; CheXpert finding columns"
    ):
        CheXpert(chex, "Edema")
    write_csv(chex / "train.csv", ["Sex", "Edema"], [["M", "1.0"]])
    with pytest.raises(DatasetError, match=r"column 'Path' not in .*train.csv; columns: Sex, Edema"):
        CheXpert(chex, "Edema")


# ----------------------------------------------------------------------------------- unknown labels


def test_unknown_labels(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"labels.csv line 3: label 'b' not in labels \(a, c\)"):
        FolderDataset(folder(tmp_path / "f"), labels=["a", "c"])
    isic = _isic(tmp_path / "i")
    gt = isic / "ISIC_2019_Training_GroundTruth.csv"
    write_csv(
        gt,
        ["image", *ISIC_CLASSES],
        [["ISIC_0000000", "1.0", *["0.0"] * 8], ["ISIC_0000001", "2", *["0.0"] * 8]],
    )
    with pytest.raises(DatasetError, match=r"GroundTruth.csv line 3: image 'ISIC_0000001' has MEL='2'"):
        ISIC2019(isic, classes="MEL,NV")
    chex = _chexpert(tmp_path / "c", ["1.0", "0.0", "maybe"])
    with pytest.raises(DatasetError, match=r"train.csv line 4: column 'Edema' has 'maybe'"):
        CheXpert(chex, "Edema")


# ---------------------------------------------------------------- images absent or unreadable


def test_an_image_listed_but_absent(tmp_path: Path) -> None:
    root = folder(tmp_path / "f")
    (root / "images" / "img02.png").unlink()
    with pytest.raises(
        DatasetError, match=r"labels.csv line 4: image 'img02' is listed but absent: no .*images/img02\["
    ):
        FolderDataset(root)
    isic = _isic(tmp_path / "i")
    (isic / "Train" / "ISIC_0000003.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"GroundTruth.csv line 5: image 'ISIC_0000003' is listed but absent"
    ):
        ISIC2019(isic, classes="MEL,NV")
    chex = _chexpert(tmp_path / "c", ["1.0", "0.0"])
    (chex / "train" / "patient00001" / "study1" / "view1_frontal.jpg").unlink()
    with pytest.raises(
        DatasetError,
        match=r"train.csv line 3: image 'train/patient00001/study1/view1_frontal.jpg' is listed but absent",
    ):
        CheXpert(chex, "Edema")
    meta = isic / "ISIC_2019_Training_Metadata.csv"
    (isic / "Train" / "ISIC_0000003.jpg").write_bytes((isic / "Train" / "ISIC_0000002.jpg").read_bytes())
    write_csv(meta, METADATA_COLUMNS, [[f"ISIC_{k:07d}", 50, "torso", "IL_0", "male"] for k in range(3)])
    with pytest.raises(
        DatasetError, match=r"GroundTruth.csv line 5: image 'ISIC_0000003' has no row in .*Metadata.csv"
    ):
        ISIC2019(isic, classes="MEL,NV")


def test_an_unreadable_image(tmp_path: Path) -> None:
    root = folder(tmp_path / "f")
    path = root / "images" / "img03.png"
    path.write_bytes(path.read_bytes()[:60])  # truncated
    ds = FolderDataset(root)  # images are read when used...
    with pytest.raises(DatasetError, match=r"labels.csv line 5: cannot read image .*img03.png"):
        ds.load_image(3)
    with pytest.raises(DatasetError, match=r"labels.csv line 5: cannot read image .*img03.png"):
        ds.validate()  # ...or all at once, before a build


# ------------------------------------------------------------------------------ masks, artifacts


def test_a_mask_of_the_wrong_size(tmp_path: Path) -> None:
    root = folder(tmp_path / "f")
    (root / "artifacts.csv").write_text("image,artifacts\nimg03,ruler\n")
    MaskFolder(root / "masks").write("img03", "ruler", np.ones((5, 5), bool))
    ds = FolderDataset(root)
    match = r"mask .*masks/ruler/img03.png is 5×5 \(h×w\) but its image .*img03.png \(.*csv line 5\) is 8×10"
    with pytest.raises(DatasetError, match=match):
        ds.mask(3, "ruler", size=32)
    with pytest.raises(DatasetError, match=match):
        ds.validate()


def test_an_annotation_naming_an_unknown_artifact(tmp_path: Path) -> None:
    root = folder(tmp_path / "f")
    (root / "artifacts.csv").write_text("image,artifacts\nimg01,ruler\nimg04,band_aid;pacemaker\n")
    with pytest.raises(
        DatasetError,
        match=r"artifacts.csv line 3: unknown artifact 'pacemaker'; the dataset's artifacts: band_aid, ruler",
    ):
        open_dataset(f"folder:{root}?artifacts=band_aid,ruler")
    (root / "artifacts.csv").write_text("image,artifacts\nimg01,ruler\n")
    MaskFolder(root / "masks").write("img01", "rulers", np.ones((8, 10), bool))
    with pytest.raises(
        DatasetError,
        match=r"mask folder .*masks/rulers names artifact 'rulers', which no image is annotated with; "
        "annotated: ruler",
    ):
        FolderDataset(root).validate()


def test_an_empty_class(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"labels.csv: class 'c' has no images \(classes: a 3, b 3, c 0\)"):
        FolderDataset(folder(tmp_path / "f"), labels=["a", "b", "c"])
    with pytest.raises(
        DatasetError, match=r"GroundTruth.csv: class 'BCC' has no images \(classes: MEL 2, NV 2, BCC 0\)"
    ):
        ISIC2019(_isic(tmp_path / "i"), classes="MEL,NV,BCC")
    d = tmp_path / "cf"
    for name in ("polyps", "cecum"):
        (d / name).mkdir(parents=True)
        Image.fromarray(rgb(1)).save(d / name / "a.jpg")
    with pytest.raises(
        DatasetError, match=r"class 'pylorus' has no images: no class folder .*; class folders: cecum, polyps"
    ):
        ClassFolders(d, classes="polyps,pylorus")


def test_a_class_order_mismatch_names_the_option_that_fixes_it() -> None:
    """A model whose labels are not the data's classes is told how to reorder the data where its
    kind can (folder and CheXpert labels=, ISIC and class folders classes=), and otherwise that
    the classes are fixed (synthderm: not an option it lacks)."""
    from medaudit.models.data.registry import label_order_hint

    labels = ("normal", "cardiomegaly")
    assert label_order_hint("folder:/d?csv=x.csv", labels).endswith("folder:/d?labels=normal,cardiomegaly")
    assert "chexpert:/c?labels=" in label_order_hint("chexpert:/c", labels)
    assert "isic2019:/i?classes=normal,cardiomegaly" in label_order_hint("isic2019:/i?classes=NV,MEL", labels)
    assert "classfolders:/f?classes=" in label_order_hint("classfolders:/f", labels)
    synth = label_order_hint("synthderm?size=64", labels)
    assert "fixed classes" in synth and "?labels" not in synth and "--data" in synth
