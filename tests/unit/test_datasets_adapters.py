"""The dataset adapters on data with a known shortcut: a three-class synthderm exported in the
ISIC 2019, CheXpert, class-folder and folder layouts reads back with its labels, lesions or
patients as groups (never in two splits), annotations and held-back masks."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from datasets_data import tiny, write_csv
from PIL import Image

from medaudit.models.data.chexpert import CheXpert
from medaudit.models.data.classfolders import ClassFolders
from medaudit.models.data.folder import FolderDataset
from medaudit.models.data.isic import ISIC2019
from medaudit.models.data.masks import MaskFolder
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.data.registry import open_dataset
from medaudit.models.data.splits import paper_split_names
from medaudit.models.data.synthetic import SynthDerm
from medaudit.models.errors import DatasetError


@pytest.fixture(scope="module")
def synth() -> SynthDerm:
    return tiny()


@pytest.fixture(scope="module")
def exports(synth: SynthDerm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("exports")
    out = {
        "isic": synth.export(root / "isic", layout="isic2019", mask_dir=root / "held"),
        "chexpert": synth.export(root / "chexpert", layout="chexpert", masks=False),
        "folder": synth.export(root / "folder"),
        "held": root / "held",
    }
    yield out
    shutil.rmtree(root, ignore_errors=True)


def _no_group_in_two_splits(ds: AnnotatedDataset) -> None:
    where: dict[str, set[str]] = {}
    for s in ("train", "val", "test"):
        for i in ds.indices(s):
            where.setdefault(ds.groups[int(i)], set()).add(s)
    assert where and all(len(v) == 1 for v in where.values())


def test_isic_export_reads_back_with_lesions_annotations_and_held_masks(
    synth: SynthDerm, exports: dict[str, Path]
) -> None:
    meta = json.loads((exports["isic"] / "synthderm.json").read_text())
    ds = open_dataset(meta["open_with"])
    assert isinstance(ds, ISIC2019) and isinstance(ds, AnnotatedDataset)
    assert ds.label_names == ("NV", "MEL", "BCC")
    np.testing.assert_array_equal(ds.labels, synth.labels)
    # lesions from the metadata: the photographs of one lesion share a group, and no lesion is in two splits
    assert len(set(ds.groups)) == len(set(synth.lesion_of.tolist())) < len(ds)
    assert [ds.groups.index(g) for g in ds.groups] == [
        int(np.argmax(synth.lesion_of == k)) for k in synth.lesion_of
    ]
    _no_group_in_two_splits(ds)
    assert ds.split_report()["groups_in_several_splits"] == 0 and ds.split_report()["group_kind"] == "lesion"
    assert ds.artifact_ids() == synth.artifact_ids()
    assert not ds.has_masks and ds.mask_source == "none"  # held back
    held = MaskFolder(exports["held"])
    i = synth.artifact_ids()["band_aid"][0]
    np.testing.assert_array_equal(held.read(ds.keys[i], "band_aid"), synth.mask(i, "band_aid"))
    jpeg = ds.load_image(i).astype(int)
    assert jpeg.shape == (32, 32, 3) and np.abs(jpeg - synth.load_image(i)).mean() < 6  # JPEG q95


def test_isic_class_subsets_and_the_papers_split(exports: dict[str, Path], synth: SynthDerm) -> None:
    two = ISIC2019(exports["isic"], classes="MEL,NV")
    keep = synth.labels != 2
    assert two.label_names == ("MEL", "NV") and len(two) == keep.sum()
    np.testing.assert_array_equal(two.labels, np.where(synth.labels[keep] == 1, 0, 1))
    assert (
        ISIC2019(exports["isic"], classes="mel_vs_rest").labels.tolist()
        == (synth.labels == 1).astype(int).tolist()
    )
    paper = ISIC2019(exports["isic"], classes="NV,MEL,BCC", metadata=False)
    np.testing.assert_array_equal(paper.split_of, paper_split_names(len(paper)))
    with pytest.raises(DatasetError, match=r"valid: all, mel_vs_rest, or a subset .*unknown class 'SCCC'"):
        ISIC2019(exports["isic"], classes="NV,SCCC")


def test_chexpert_task_uncertainty_policies_and_patients(synth: SynthDerm, exports: dict[str, Path]) -> None:
    root = exports["chexpert"]
    train_csv = (root / "train.csv").read_text().splitlines()
    assert train_csv[0] == "Path,Sex,Age,Frontal/Lateral,AP/PA,nevus,melanoma,bcc"
    ones = CheXpert(root, "melanoma", "ones")
    assert ones.label_names == ("not melanoma", "melanoma") and ones.group_kind == "patient"
    # the export lists train.csv (synthderm train + val) before valid.csv (test)
    order = np.concatenate(
        [np.flatnonzero(synth.split_of != "test"), np.flatnonzero(synth.split_of == "test")]
    )
    np.testing.assert_array_equal(ones.labels, (synth.labels[order] == 1).astype(int))
    assert len(set(ones.groups)) == len(set(synth.lesion_of.tolist()))
    assert all(g.startswith("patient") for g in ones.groups)
    _no_group_in_two_splits(ones)
    official = CheXpert(root, "melanoma", "ones", split="official")
    assert (official.split_of == "test").sum() == (synth.split_of == "test").sum()
    assert all("/valid/" in official.ids[int(i)] for i in official.indices("test"))
    for task in ("melanoma", "bcc"):
        by = [CheXpert(root, task, policy) for policy in ("ones", "zeros", "ignore")]
        rows = [
            r for n in ("train.csv", "valid.csv") for r in csv.DictReader(io.StringIO((root / n).read_text()))
        ]
        n_uncertain = sum(r[task] == "-1.0" for r in rows)
        assert n_uncertain > 0
        assert by[0].labels.sum() - by[1].labels.sum() == n_uncertain  # U-Ones vs U-Zeros
        assert len(by[0]) - len(by[2]) == n_uncertain  # U-Ignore leaves them out
    with pytest.raises(DatasetError, match=r"\.csv line \d+: bcc is -1 \(uncertain\).*uncertain=zeros"):
        CheXpert(root, "bcc")
    with pytest.raises(
        DatasetError, match="task 'Edema' is not a finding column .*findings: nevus, melanoma, bcc"
    ):
        CheXpert(root, "Edema", "zeros")


def test_chexpert_path_prefix_views_and_keys(tmp_path: Path) -> None:
    """Paths resolve with their first component stripped (the authors' loader), lateral views are
    left out by default, and a mask key is patientX_studyY_viewZ."""
    rows = []
    for p, (view, y) in enumerate([("Frontal", "1.0"), ("Lateral", "0.0"), ("Frontal", "")]):
        rel = f"train/patient0000{p}/study1/view1_{view.lower()}.jpg"
        (tmp_path / rel).parent.mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 40 * p, np.uint8)).save(tmp_path / rel)
        rows.append([f"CheXpert-v1.0-small/{rel}", "Female", 50, view, "AP", y])
    write_csv(tmp_path / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema"], rows)
    ds = CheXpert(tmp_path, "Edema")
    assert len(ds) == 2 and ds.labels.tolist() == [1, 0]  # blank = not mentioned = 0
    assert (
        ds.keys[0] == "patient00000_study1_view1_frontal"
        and ds.paths[0] == tmp_path / rows[0][0].split("/", 1)[1]
    )
    assert len(CheXpert(tmp_path, "Edema", views="all")) == 3
    with pytest.raises(DatasetError, match="class 'not Edema' has no images .*not Edema 0, Edema 1"):
        CheXpert(tmp_path, "Edema", blank="ignore")  # the blank row was the only negative


def test_class_folders_leaf_level_and_groups(synth: SynthDerm, tmp_path: Path) -> None:
    names = ("nevus", "melanoma", "bcc")
    for i in range(len(synth)):
        k = int(synth.labels[i])
        d = tmp_path / ("benign-ish" if k == 0 else "suspicious") / names[k]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synth.load_image(i)).save(d / f"{synth.ids[i]}.png")
    ds = ClassFolders(tmp_path)
    assert ds.label_names == ("bcc", "melanoma", "nevus") and len(ds) == len(synth)
    assert ds.ids[0].startswith("benign-ish/nevus/synth_")
    i = ds.ids.index(f"suspicious/bcc/{synth.ids[int(np.argmax(synth.labels == 2))]}.png")
    assert ds.label_names[ds.labels[i]] == "bcc"
    assert ClassFolders(tmp_path, level=1).label_names == ("benign-ish", "suspicious")
    assert ClassFolders(tmp_path, classes="nevus,melanoma").label_names == ("nevus", "melanoma")
    rows = [[sid, synth.groups[int(Path(sid).stem.split("_")[1])]] for sid in ds.ids]
    grouped = ClassFolders(
        tmp_path, groups=write_csv(tmp_path.parent / f"{tmp_path.name}_groups.csv", ["image", "group"], rows)
    )
    _no_group_in_two_splits(grouped)
    (tmp_path / "suspicious" / "nevus").mkdir()
    Image.fromarray(synth.load_image(0)).save(tmp_path / "suspicious" / "nevus" / "x.png")
    with pytest.raises(
        DatasetError, match="class 'nevus' is the folder .*benign-ish/nevus and .*suspicious/nevus.*level=N"
    ):
        ClassFolders(tmp_path)


def test_folder_export_with_lesion_groups_and_its_split(synth: SynthDerm, exports: dict[str, Path]) -> None:
    ds = FolderDataset(exports["folder"], labels=synth.label_names)
    assert (exports["folder"] / "labels.csv").read_text().splitlines()[0] == "image,label,split,group"
    np.testing.assert_array_equal(ds.split_of, synth.split_of)  # its own split respects the lesions
    assert ds.groups == synth.groups and ds.mask_source == "ground_truth"
    i = synth.artifact_ids()["ruler"][0]
    np.testing.assert_array_equal(ds.mask(i, "ruler"), synth.mask(i, "ruler"))
    assert ds.validate()["masks"] == sum(len(v) for v in synth.artifact_ids().values())


def test_open_dataset_options(exports: dict[str, Path]) -> None:
    ds = open_dataset(f"chexpert:{exports['chexpert']}?task=melanoma&uncertain=zeros&labels=other,MEL&seed=3")
    assert isinstance(ds, CheXpert) and ds.label_names == ("other", "MEL")
    three = open_dataset("synthderm?preset=isic_like&size=32")
    assert isinstance(three, SynthDerm) and three.label_names == ("nevus", "melanoma", "bcc")
    small = open_dataset("synthderm?size=32&n_train=60&n_val=20&n_test=30")
    assert len(small.labels) == 110 and list(small.indices("test")) == list(range(80, 110))
    with pytest.raises(DatasetError, match="unknown option 'task' for isic2019; valid: annotations"):
        open_dataset(f"isic2019:{exports['isic']}?task=MEL")
    with pytest.raises(DatasetError, match="option metadata='maybe' is not a valid value"):
        open_dataset(f"isic2019:{exports['isic']}?metadata=maybe")
    with pytest.raises(DatasetError, match="preset 'ham'; valid: binary, isic_like"):
        open_dataset("synthderm?preset=ham")
