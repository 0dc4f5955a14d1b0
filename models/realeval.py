"""Evaluation data of a real (on-disk) dataset's test split (method.md §7, §5.4).

:func:`dataset_eval_data` builds the :class:`~medaudit.models.evaluate.EvalData` every version of
one build is evaluated on, with these test sets:

* ``ch``: the whole test split, as collected;
* ``artifact`` / ``no_artifact``: the test images annotated with the artifact, and the others
  (the paper's per-artifact subsets, ``evaluate_by_subset.py``);
* ``clean``: the test images with no annotated artifact at all;
* ``attacked``: the ``clean`` images, each with an artifact instance cut from an annotated
  *training* image pasted on (:mod:`medaudit.models.attack`), so ``clean`` and ``attacked`` hold
  the same images with and without the artifact, as synthderm's variants do. Only where the
  dataset has masks (ground truth or derived); without them there is no attacked set, and the
  card says so.

Artifact relevance and TCAV run on the test images annotated with the artifact (with their
masks; without masks, relevance is not measured), or on the attacked images with the pasted
pixels as their masks when the test split has no annotated artifact image. Retrieval ranks the
whole test split by the original CAV against the annotations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from medaudit.models.attack import cut_instances, paste
from medaudit.models.errors import ConfigError
from medaudit.models.evaluate import EvalData, EvalSet

if TYPE_CHECKING:
    from medaudit.models.build_data import DatasetData


def dataset_eval_data(
    data: DatasetData,
    *,
    artifact: str,
    cav: np.ndarray,
    cav_layer: str,
    max_artifact_samples: int = 64,
    tcav_class: int = 0,
    seed: int = 0,
    cav_kind: str = "signal",
) -> EvalData:
    """The test sets, artifact samples and retrieval set of ``data``'s test split; see the module
    docstring.

    Raises:
        ConfigError: The artifact is not annotated, the test split is empty, or it has no image
            annotated with the artifact and there are no masks to paste one.
    """
    if artifact not in data.membership:
        known = ", ".join(data.membership) or "none"
        raise ConfigError(f"{data.name}: no image is annotated with {artifact!r}; annotated: {known}")
    test = np.asarray(data.ds.indices("test"), dtype=np.int64)
    if len(test) == 0:
        raise ConfigError(f"{data.name} has no test split to evaluate on")
    member = data.membership[artifact][test]
    x_test = data.arrays(test, "test")
    y_test = torch.from_numpy(data.labels[test])
    sets: dict[str, EvalSet] = {"ch": EvalSet(x_test, y_test)}
    if member.any():
        sets["artifact"] = EvalSet(x_test[torch.from_numpy(member)], y_test[torch.from_numpy(member)])
    if (~member).any():
        sets["no_artifact"] = EvalSet(x_test[torch.from_numpy(~member)], y_test[torch.from_numpy(~member)])
    clean_idx = data.clean_indices("test")
    info: dict[str, object] = {
        "split": "test",
        "dataset": data.name,
        "labels": list(data.label_names),
        "mask_source": data.mask_source,
        "attacked": None,
    }
    attacked_masks = None
    if len(clean_idx):
        pos = np.searchsorted(test, clean_idx)
        sets["clean"] = EvalSet(x_test[torch.from_numpy(pos)], y_test[torch.from_numpy(pos)])
        if data.mask_source != "none":
            src = data.tr_idx[data.membership[artifact][data.tr_idx]]
            inst = cut_instances(
                data.arrays(src, f"train-{artifact}"), data.masks(src, artifact), src, seed=seed
            )
            x_att, attacked_masks, chosen = paste(sets["clean"].images, inst, seed=seed)
            sets["attacked"] = EvalSet(x_att, sets["clean"].labels)
            info["attacked"] = {
                "images": int(len(x_att)),
                "instances": int(len(inst)),
                "instances_used": int(len(np.unique(chosen))),
                "from": f"training images annotated with {artifact}, cut along their masks",
                "mask_source": data.mask_source,
                "seed": seed,
            }
    # artifact samples: annotated test images, else the attacked ones
    carriers = test[member][:max_artifact_samples]
    if len(carriers):
        rows = torch.from_numpy(np.flatnonzero(member)[:max_artifact_samples])
        a_images, a_labels = x_test[rows], y_test[rows]
        a_masks = data.masks(carriers, artifact) if data.mask_source != "none" else None
        info["artifact_samples"] = "test images annotated with the artifact"
    elif attacked_masks is not None:
        k = min(max_artifact_samples, len(attacked_masks))
        a_images, a_labels, a_masks = (
            sets["attacked"].images[:k],
            sets["attacked"].labels[:k],
            attacked_masks[:k],
        )
        info["artifact_samples"] = "attacked test images (no test image is annotated with the artifact)"
    else:
        raise ConfigError(
            f"{data.name}: the test split has no image annotated with {artifact!r} and the dataset has "
            "no masks to paste one from the training images; annotate test images or derive masks "
            "(`medaudit localize --export-masks`)"
        )
    info["n_artifact_samples"] = int(len(a_images))
    info["subsets"] = {k: int(len(s.labels)) for k, s in sets.items()}
    if len(np.unique(member)) == 2 or "attacked" not in sets:
        r_images, r_labels = x_test, member.astype(np.int64)
    else:  # every test image, or none, is annotated: rank clean against attacked instead
        r_images = torch.cat([sets["clean"].images, sets["attacked"].images])
        r_labels = np.repeat(np.array([0, 1], np.int64), len(sets["clean"].labels))
        info["retrieval"] = "clean and attacked test images (the test split's annotations are one-sided)"
    return EvalData(
        sets=sets,
        artifact=artifact,
        cav_layer=cav_layer,
        cav=np.asarray(cav, np.float64),
        cav_kind=cav_kind,
        tcav_class=tcav_class,
        artifact_images=a_images,
        artifact_labels=a_labels,
        artifact_masks=a_masks,
        retrieval_images=r_images,
        retrieval_labels=r_labels,
        info=info,
    )
