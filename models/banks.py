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

from medaudit.models.corrections.base import pooled_activations, pooled_activations_at
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
    shared: SharedActivations | None = None,
) -> Banks:
    """Fits both banks; see the module docstring.

    With ``detection=False`` (a correction layer other than the build layer, whose versions serve
    the build layer's detection bank) only the correction bank and gate are fitted, and on
    counterfactual pairs the training split's own activations are not computed either (the pairs
    alone fit them): ``Banks.detection`` is then the correction bank. About half the forwards.
    With ``shared`` (:class:`SharedActivations` of several layers' stages), φ comes from it, and
    the training split's rows are read there too since they cost nothing more.

    Raises:
        ConfigError: The artifact has no annotated training sample in scope, or none without it.
    """
    log(f"banks: activations of the original model at {layer}")

    def phi(images: torch.Tensor) -> np.ndarray:
        return shared(layer, images) if shared else pooled_activations(model, mcfg, layer, images)

    skip_train = not detection and cav_data == "paired" and shared is None
    acts = np.zeros((0, 0)) if skip_train else phi(Xtr)
    # (images, φ) whose rows later renders of the training split may share
    done: list[tuple[torch.Tensor, np.ndarray]] = [] if skip_train else [(Xtr, acts)]
    val = phi(data.val_clean(artifact))
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
        pair_acts = np.concatenate([reusing(X, done, phi) for X in (Xc, Xa)])
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


class SharedActivations:
    """φ of one model at several layers, from one forward per image set (to the deepest layer):
    the build fits banks at its layer and at each correction's own layer on the same images.
    ``shared(layer, images)`` computes every layer's φ of ``images`` on first request and keeps
    them; an equal tensor asked again (the pair renders' unshared rows, once per layer) is served
    from memory. The rows of the training split shared by the counterfactual pairs are reused as
    :func:`medaudit.models.train.reusing` does for a single layer (on the default build 903 + 484
    of the 3600 pair rows)."""

    def __init__(self, model: torch.nn.Module, mcfg: Any, layers: tuple[str, ...]) -> None:
        self.model, self.mcfg, self.layers = model, mcfg, layers
        self._seen: list[tuple[torch.Tensor, dict[str, np.ndarray]]] = []
        self.forwards = 0  # image sets run through the model (tests count them)

    def __call__(self, layer: str, images: torch.Tensor) -> np.ndarray:
        if layer not in self.layers:
            raise KeyError(f"{layer!r} is not one of the shared layers {self.layers}")
        for seen, acts in self._seen:
            if seen.shape == images.shape and torch.equal(seen, images):
                return acts[layer]
        acts = pooled_activations_at(self.model, self.mcfg, self.layers, images)
        self.forwards += 1
        self._seen.append((images, acts))
        return acts[layer]


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
