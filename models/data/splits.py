"""Train/val/test splits: the paper's seeded split, group-aware splits, split files and the report.

Images of one patient (CheXpert) or one lesion (ISIC 2019's ``lesion_id``) are near-duplicates
for a classifier: one in training and one in test inflates every test figure. So wherever a
dataset knows its groups, :func:`group_split` keeps each group in one split, and a split the user
gives (a ``split`` column or a split file) is checked by :func:`check_groups`, which refuses one
that puts a group in two splits and names the group and its files.

Without groups the paper's split is kept (:func:`paper_split`, method.md §8), so a dataset without
groups gets the authors' indices.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medaudit.models.data.files import SHOW, cell, column, line, read_csv, refuse_extra_columns
from medaudit.models.errors import DatasetError

SPLITS = ("train", "val", "test")
#: Fractions of the paper's split (method.md §8), used for group splits too.
VAL_FRACTION, TEST_FRACTION = 0.1, 0.1


def paper_split(n: int, val: float = 0.1, test: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's split of ``n`` samples into sorted (train, val, test) indices (method.md §8).

    Mirrors ``base_dataset.do_train_val_test_split`` call for call, including drawing the test
    set from the *unsorted* set difference, so that the same ``n`` gives the paper's indices.
    """
    rng = np.random.default_rng(0)
    idxs_all = np.arange(n)
    idxs_val = np.array(sorted(rng.choice(idxs_all, size=int(np.round(n * val)), replace=False)), np.int64)
    idxs_left = np.array(list(set(idxs_all) - set(idxs_val)), np.int64)
    idxs_test = np.array(sorted(rng.choice(idxs_left, size=int(np.round(n * test)), replace=False)), np.int64)
    idxs_train = np.array(sorted(set(idxs_left) - set(idxs_test)), np.int64)
    return idxs_train, idxs_val, idxs_test


def paper_split_names(n: int) -> np.ndarray:
    """``"train"``/``"val"``/``"test"`` per sample under :func:`paper_split`."""
    out = np.empty(n, dtype="<U5")
    for name, idx in zip(SPLITS, paper_split(n), strict=True):
        out[idx] = name
    return out


def group_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    seed: int = 0,
    val: float = VAL_FRACTION,
    test: float = TEST_FRACTION,
) -> np.ndarray:
    """A seeded split in which every group lies in one split, stratified by class where possible.

    Each group's stratum is its most common label (ties: the lower class index). Within a stratum
    the groups are shuffled (``default_rng(seed)`` over the sorted group names) and handed to
    val until it holds ``round(val · n)`` of the stratum's images, then to test likewise, the rest
    to train; a group is never taken when it is the stratum's last, so every class with a group
    keeps one in train. A stratum of one or two groups therefore has no val/test images: that is
    the "where possible".

    Args:
        labels: Class index per sample.
        groups: Group (patient, lesion) per sample; a sample without one gets its own.
        seed: Seeds the shuffle.
        val, test: Fractions of each stratum's images.

    Returns:
        ``"train"``/``"val"``/``"test"`` per sample.
    """
    y = np.asarray(labels, dtype=np.int64)
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for g in sorted(members):
        counts = Counter(int(y[i]) for i in members[g])
        strata[min(counts, key=lambda k: (-counts[k], k))].append(g)
    rng = np.random.default_rng(seed)
    out = np.full(len(y), "train", dtype="<U5")
    for k in sorted(strata):
        names = strata[k]
        order = [names[j] for j in rng.permutation(len(names))]
        n = sum(len(members[g]) for g in names)
        left = len(order)
        for split, frac in (("val", val), ("test", test)):
            target, have = int(round(frac * n)), 0
            while order and have < target and left > 1:
                g = order.pop(0)
                out[members[g]] = split
                have += len(members[g])
                left -= 1
    return out


def check_groups(
    splits: Sequence[str] | np.ndarray,
    groups: Sequence[str],
    ids: Sequence[str],
    source: str,
    kind: str = "group",
) -> None:
    """Refuse a split that puts one group in two splits.

    Raises:
        DatasetError: Naming ``source`` (the split column or file), the first such group, the
            splits it is in with their files, and how many groups leak in all.
    """
    seen: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for s, g, sid in zip(splits, groups, ids, strict=True):
        seen[g][str(s)].append(sid)
    leaks = [g for g, by in seen.items() if len(by) > 1]
    if not leaks:
        return
    g = leaks[0]
    where = "; ".join(f"{s}: {', '.join(seen[g][s][:SHOW])}" for s in SPLITS if s in seen[g])
    raise DatasetError(
        f"{source} puts {kind} {g!r} in {len(seen[g])} splits ({where}); images of one {kind} must "
        f"stay in one split, or the test figures are inflated by near-duplicates "
        f"({len(leaks)} {kind}s leak in all). Fix the split or drop it to get a {kind}-aware one"
    )


def read_split_file(
    path: Path, ids: Sequence[str], aliases: Mapping[str, int] | None = None, left_out: set[str] | None = None
) -> np.ndarray:
    """A split file ``image,split`` (every sample exactly once) as ``"train"``/``"val"``/``"test"``.

    Args:
        path: The CSV.
        ids: Sample ids in dataset order.
        aliases: Other accepted names per sample index (ids without extension, mask keys).
        left_out: Images the dataset leaves out; their rows are skipped.

    Raises:
        DatasetError: Missing or extra columns, an unknown image or split value, an image listed
            twice, or samples the file does not list (each named with its line).
    """
    header, rows = read_csv(path, "split file")
    ci, cs = column(path, header, "image"), column(path, header, "split")
    refuse_extra_columns(path, header, ("image", "split"))
    lookup = dict(aliases or {})
    lookup.update({sid: i for i, sid in enumerate(ids)})
    out = np.full(len(ids), "", dtype="<U5")
    first: dict[int, int] = {}
    for r in range(len(rows)):
        name, value = cell(path, rows, r, ci, "image"), cell(path, rows, r, cs, "split")
        i = lookup.get(name)
        if i is None and left_out and name in left_out:
            continue
        if i is None:
            raise DatasetError(f"{line(path, r)}: image {name!r} is not in the dataset")
        if value not in SPLITS:
            raise DatasetError(f"{line(path, r)}: split {value!r} not one of {', '.join(SPLITS)}")
        if i in first:
            raise DatasetError(
                f"{line(path, r)}: image {name!r} is listed again (first at line {first[i] + 2})"
            )
        first[i] = r
        out[i] = value
    missing = [ids[i] for i in range(len(ids)) if not out[i]]
    if missing:
        raise DatasetError(
            f"{path} does not list {len(missing)} of the dataset's images "
            f"(first: {', '.join(missing[:SHOW])}); "
            "a split file names every image once"
        )
    return out


def split_report(
    labels: np.ndarray, label_names: Sequence[str], split_of: np.ndarray, groups: Sequence[str]
) -> dict[str, Any]:
    """Counts per split: images, groups, and images and groups per class; and the leak count.

    ``groups_in_several_splits`` is 0 for every split the adapters produce or accept.
    """
    out: dict[str, Any] = {"splits": {}}
    grp = np.asarray(groups, dtype=object)
    for s in SPLITS:
        sel = split_of == s
        out["splits"][s] = {
            "images": int(sel.sum()),
            "groups": len(set(grp[sel])),
            "per_class": {
                name: {
                    "images": int((sel & (labels == k)).sum()),
                    "groups": len(set(grp[sel & (labels == k)])),
                }
                for k, name in enumerate(label_names)
            },
        }
    where: dict[str, set[str]] = defaultdict(set)
    for s, g in zip(split_of, grp, strict=True):
        where[g].add(str(s))
    out["groups"] = len(where)
    out["groups_in_several_splits"] = sum(len(v) > 1 for v in where.values())
    empty = [
        f"{name} has no {s} images"
        for s in SPLITS
        for name, c in out["splits"][s]["per_class"].items()
        if c["images"] == 0
    ]
    out["warnings"] = empty
    return out
