"""The build's concept-bank stage (method.md §1.1, §1.3, §4.3, §11.7): from the **original**
model's max-pooled activations at the correction layer ℓ on the training split,

* a ``detection`` bank (``svm``) of every artifact annotated in the training split, calibrated on
  clean validation images: what each served version scores requests with;
* a ``correction`` bank (``signal``) of the correction artifact, whose CAV v and clean mean μ0
  the ClArC corrections use, plus the SVM gate of reactive P-ClArC fitted on the same samples.

The correction CAV is fitted either on **counterfactual pairs** (every training image without and
with the artifact; only synthderm can render them) or on **membership** (the paper's recipe:
annotated vs not, within ``cav_scope``, a list of class indices; None = every class).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medaudit.models.corrections.base import pooled_activations
from medaudit.models.errors import ConfigError
from medaudit.models.train import reusing
from medaudit.models.xai.concepts import ConceptBank, fit_cav

if TYPE_CHECKING:
    from medaudit.models.build_data import BuildData


@dataclass(frozen=True, eq=False)
class Banks:
    detection: ConceptBank  # svm, every annotated artifact, for serving
    correction: ConceptBank  # signal, the correction artifact within cav_scope
    cav_svm: np.ndarray  # reactive P-ClArC's gate, fitted on the correction bank's samples
    reused: bool

    @property
    def cav(self) -> np.ndarray:
        return np.asarray(self.correction[self.correction.concepts[0]].cav.v, np.float64)

    @property
    def mu0(self) -> np.ndarray:
        return np.asarray(self.correction[self.correction.concepts[0]].mu0, np.float64)


def fit_banks(
    model: torch.nn.Module,
    mcfg: Any,
    data: BuildData,
    layer: str,
    Xtr: torch.Tensor,
    ytr: torch.Tensor,
    *,
    artifact: str,
    scope: tuple[int, ...] | None,
    cav_data: str,
    base_tag: str,
    seed: int,
    target_fpr: float,
    log: Callable[[str], None],
    detection: bool = True,
) -> Banks:
    """Fits both banks; see the module docstring.

    With ``detection=False`` (a correction layer other than the build layer, whose versions serve
    the build layer's detection bank) only the correction bank and gate are fitted, and on
    counterfactual pairs the training split's own activations are not computed either (the pairs
    alone fit them): ``Banks.detection`` is then the correction bank. About half the forwards.

    Raises:
        ConfigError: The artifact has no annotated training sample in scope, or none without it.
    """
    log(f"banks: activations of the original model at {layer}")
    skip_train = not detection and cav_data == "paired"
    acts = np.zeros((0, 0)) if skip_train else pooled_activations(model, mcfg, layer, Xtr)
    # (images, φ) whose rows later renders of the training split may share
    done: list[tuple[torch.Tensor, np.ndarray]] = [] if skip_train else [(Xtr, acts)]
    val = pooled_activations(model, mcfg, layer, data.val_clean(artifact))
    member = data.train_membership()
    prov = {"fitted_on": base_tag, "pooling": "max", "activations": "original model"}
    det: ConceptBank | None = None
    if detection:
        det = ConceptBank.fit(
            base_tag, layer, acts, member, val, kind="svm", dataset=data.name, seed=seed,
            target_fpr=target_fpr, provenance={**prov, "cav_scope": None},
        )  # fmt: skip
    if cav_data == "paired":
        log(f"banks: counterfactual pairs, the training split without and with {artifact}")
        Xc, Xa = data.pairs(artifact)
        pair_acts = np.concatenate([pooled_reusing(model, mcfg, layer, X, done) for X in (Xc, Xa)])
        t_pair = np.repeat(np.array([0, 1], np.int64), len(Xc))
        correction = ConceptBank.fit(
            base_tag, layer, pair_acts, {artifact: t_pair}, val, kind="signal", dataset=data.name,
            seed=seed, target_fpr=target_fpr, provenance={**prov, "cav_data": "paired"},
        )  # fmt: skip
        gate = fit_cav(pair_acts, t_pair, kind="svm", seed=seed).v
        return Banks(det or correction, correction, np.asarray(gate, np.float64), reused=False)
    keep = np.ones(len(ytr), bool) if scope is None else np.isin(ytr.numpy(), scope)
    t = np.where(keep, member.get(artifact, np.zeros(len(ytr), np.int64)), -1)
    n_pos, n_neg = int((t == 1).sum()), int((t == 0).sum())
    if n_pos < 2 or n_neg < 2:
        names = "all classes" if scope is None else ", ".join(data.label_names[k] for k in scope)
        raise ConfigError(
            f"the {artifact!r} CAV is fitted on training images of {names} with and without it; "
            f"{data.name} has {n_pos} with and {n_neg} without (at least 2 each): annotate more, "
            "or widen cav_scope (--cav-scope all)"
        )
    correction = ConceptBank.fit(
        base_tag, layer, acts, {artifact: t}, val, kind="signal", dataset=data.name, seed=seed,
        target_fpr=target_fpr, provenance={**prov, "cav_scope": scope},
    )  # fmt: skip
    gate = fit_cav(acts[keep], t[keep], kind="svm", seed=seed).v  # as fit_correction_data does
    return Banks(det or correction, correction, np.asarray(gate, np.float64), reused=False)


def pooled_reusing(
    model: torch.nn.Module,
    mcfg: Any,
    layer: str,
    images: torch.Tensor,
    done: list[tuple[torch.Tensor, np.ndarray]],
) -> np.ndarray:
    """φ of ``images`` through :func:`medaudit.models.train.reusing`: the counterfactual pairs are the
    training split rendered "clean" and "attacked", and their rows equal to a "ch" row (on the
    default build 903 + 484 of the 3600 pair rows) reuse its φ."""
    return reusing(images, done, lambda x: pooled_activations(model, mcfg, layer, x))


def save_banks(banks: Banks, directory: Path, meta: Mapping[str, Any]) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    banks.detection.save(tmp / "detection")
    banks.correction.save(tmp / "correction")
    np.save(tmp / "gate.npy", banks.cav_svm)
    (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)


def load_banks(directory: Path) -> Banks | None:
    if not (directory / "meta.json").exists():
        return None
    try:
        return Banks(
            ConceptBank.load(directory / "detection"),
            ConceptBank.load(directory / "correction"),
            np.load(directory / "gate.npy"),
            reused=True,
        )
    except Exception:  # a damaged stage output is rebuilt, not trusted
        return None
