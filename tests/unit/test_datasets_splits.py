"""Group-aware splits: seeded, stratified where possible, no group in two splits; a given split
that puts one in two is refused naming the group and its files; the report counts both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets_data import folder, write_csv

from medaudit.models.data.folder import FolderDataset
from medaudit.models.data.splits import check_groups, group_split, read_split_file, split_report
from medaudit.models.errors import DatasetError


def _data(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """600 images of 200 patients (1-5 images each), three classes of unequal size."""
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for g in range(200):
        y = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        for _ in range(int(rng.integers(1, 6))):
            groups.append(f"p{g:03d}")
            labels.append(y)
    return np.asarray(labels), groups


def test_group_split_keeps_groups_whole_stratifies_and_is_seeded() -> None:
    y, g = _data()
    split = group_split(y, g, seed=0)
    check_groups(split, g, [str(i) for i in range(len(y))], "the computed split")  # no leak
    n = len(y)
    for name, frac in (("val", 0.1), ("test", 0.1)):
        assert abs((split == name).sum() - frac * n) < 0.04 * n
        for k in range(3):  # every class has images in every split
            assert ((split == name) & (y == k)).sum() > 0
    np.testing.assert_array_equal(split, group_split(y, g, seed=0))
    assert (split != group_split(y, g, seed=1)).any()


def test_a_class_with_two_groups_keeps_one_in_train() -> None:
    y = np.array([0] * 40 + [1, 1, 1])
    g = [f"a{i}" for i in range(40)] + ["b0", "b0", "b1"]
    split = group_split(y, g)
    assert "train" in set(split[y == 1]) and (split[y == 0] == "val").sum() == 4


def test_a_leaking_split_names_the_group_and_its_files() -> None:
    with pytest.raises(
        DatasetError,
        match=r"labels.csv column 'split' puts patient 'p7' in 2 splits "
        r"\(train: a.png, b.png; test: c.png\).*"
        r"\(2 patients leak in all\)",
    ):
        check_groups(
            ["train", "train", "test", "val", "test"],
            ["p7", "p7", "p7", "p8", "p8"],
            ["a.png", "b.png", "c.png", "d.png", "e.png"],
            "labels.csv column 'split'",
            "patient",
        )


def test_folder_group_column_split_column_and_split_file(tmp_path: Path) -> None:
    groups = ["g0", "g0", "g1", "g1", "g2", "g3"]
    root = folder(tmp_path / "ok", header=("image", "label", "group"), extra=lambda i: [groups[i]])
    ds = FolderDataset(root)
    assert ds.groups == tuple(groups) and ds.split_report()["groups_in_several_splits"] == 0
    leak = ["train", "test", "train", "train", "val", "test"]
    bad = folder(
        tmp_path / "bad", header=("image", "label", "split", "group"), extra=lambda i: [leak[i], groups[i]]
    )
    with pytest.raises(
        DatasetError, match=r"labels.csv column 'split' puts group 'g0' in 2 splits .*img00.*img01"
    ):
        FolderDataset(bad)
    sheet = write_csv(
        tmp_path / "splits.csv", ["image", "split"], [[f"img{i:02d}", s] for i, s in enumerate(leak)]
    )
    with pytest.raises(DatasetError, match=r"split file .*splits.csv puts group 'g0' in 2 splits"):
        FolderDataset(root, splits=sheet)
    fine = ["train", "train", "val", "val", "test", "test"]
    write_csv(sheet, ["image", "split"], [[f"img{i:02d}", s] for i, s in enumerate(fine)])
    assert FolderDataset(root, splits=sheet).split_of.tolist() == fine


def test_split_file_errors_name_the_line(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    p = tmp_path / "s.csv"
    for rows, match in [
        ([["a", "train"], ["x", "val"]], "line 3: image 'x' is not in the dataset"),
        ([["a", "train"], ["b", "dev"]], "line 3: split 'dev' not one of train, val, test"),
        ([["a", "train"], ["a", "val"]], r"line 3: image 'a' is listed again \(first at line 2\)"),
        ([["a", "train"], ["b", "val"]], "does not list 1 of the dataset's images .first: c."),
    ]:
        write_csv(p, ["image", "split"], rows)
        with pytest.raises(DatasetError, match=match):
            read_split_file(p, ids)
    write_csv(p, ["image", "split", "fold"], [["a", "train", 1]])
    with pytest.raises(DatasetError, match="unexpected column 'fold'"):
        read_split_file(p, ids)


def test_split_report_counts_images_and_groups_per_class() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    split = np.array(["train", "train", "train", "val", "test", "test"])
    rep = split_report(y, ("a", "b"), split, ["g0", "g0", "g1", "g2", "g3", "g4"])
    assert rep["splits"]["train"] == {
        "images": 3,
        "groups": 2,
        "per_class": {"a": {"images": 2, "groups": 1}, "b": {"images": 1, "groups": 1}},
    }
    assert rep["groups"] == 5 and rep["groups_in_several_splits"] == 0
    assert rep["warnings"] == ["a has no val images"]
