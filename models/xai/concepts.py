"""Concept activation vectors, the concept bank and concept scores (method.md §1, §11.5).

Everything here works on arrays the LRP engine (or a precompute job) has already produced:

* ``acts``: spatially **max**-pooled activations φ(x) of the CAV layer, shape (N, C) (§1.1, §11.4);
* ``labels``: the artifact label t ∈ {0, 1} per sample (§1.1).

A :class:`ConceptBank` belongs to one model version and one layer; each of its concepts holds the
unit CAV v, the clean and artifact means μ0 and μ1 (§4.2, §11.7), and the sorted scores of clean
validation images, from which it derives calibrated percentiles and a detection threshold at a
target false-positive rate.

The paper ranks samples by s(x) and sets no presence threshold (§1.4); the threshold is ours. A
bank's target FPR is the rate at which a clean image sets off **any** of its concepts (``fpr_scope
= "bank"``), the rate a reviewer's queue sees: each of its K concepts is thresholded at FPR/K
(Bonferroni), at the split-conformal quantile of its clean validation scores, so the expected rate
on *new* clean images, not only on the calibration images, stays at most FPR/K per concept and FPR
for the bank. With every concept at the full FPR (the older ``fpr_scope = "concept"``, which banks
saved without the field keep), three concepts fired on 15-17 % of clean held-out images at a 5 %
target (docs/data.md, "Artifacts in many styles").
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from medaudit.models.errors import ConceptBankError, InvalidArrayError
from medaudit.models.xai.cav import CAV_KINDS, Cav, CavKind, fit_cav

__all__ = ["CAV_KINDS", "Cav", "CavKind", "ConceptBank", "fit_cav"]

BANK_FORMAT = "medaudit.concept_bank"
BANK_FORMAT_VERSION = 1
_TENSORS_FILE = "concepts.safetensors"
_META_FILE = "bank.json"
_ARRAY_FIELDS = ("v", "mu0", "mu1", "clean_scores")
#: How a bank shares its target FPR: ``bank``, FPR over all its concepts together (each at FPR/K,
#: conformal); ``concept``, each concept at the full FPR on its calibration scores.
FPR_SCOPES = ("bank", "concept")


# ------------------------------------------------------------------------------------------ scores


def cav_score(acts: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bias score s(x) = ⟨φ(x), v⟩, a dot product and not a cosine (method.md §1.4, §11.6).

    Args:
        acts: Max-pooled activations, shape (N, C) or (C,).
        v: The CAV, shape (C,).

    Returns:
        float64 scores, shape (N,) (or a 0-d array for a single vector).
    """
    a = np.asarray(acts, dtype=np.float64)
    vec = np.asarray(v, dtype=np.float64)
    if vec.ndim != 1 or a.shape[-1] != vec.shape[0] or a.ndim not in (1, 2):
        raise InvalidArrayError(f"acts must be (N, C) or (C,) with C = len(v); got {a.shape} and {vec.shape}")
    return a @ vec


def relevance_share(layer_relevance: np.ndarray, v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Fraction of the layer-ℓ relevance that lies along the concept direction v.

    With r ∈ R^C the channel relevance (R^(ℓ) summed over H, W, the CRP ``rel`` vector of
    method.md §0 step 2 before its abs-normalisation, which cancels here) and v normalised to unit
    length::

        share = max(⟨r, v⟩, 0)² / (‖r‖² + eps)

    Why this form: by Pythagoras ‖r‖² = ⟨r, v⟩² + ‖r − ⟨r, v⟩v‖², so the share is an exact split
    of the relevance energy into "along v" and "orthogonal to v". It lies in [0, 1], is 1 iff r is a
    positive multiple of v, 0 when r ⟂ v, and does not depend on the scale of r. The L1 form
    ⟨r, v⟩⁺/‖r‖₁ reaches 1 only for one-hot v, so it cannot be read as a fraction. The positive part
    counts only relevance that argues *for* the concept direction; relevance against it (r
    antiparallel to v) is not use of the artifact.

    Args:
        layer_relevance: R^(ℓ), shape (N, C, H, W) or already pooled (N, C).
        v: The CAV, shape (C,); need not be unit length.
        eps: Keeps an all-zero relevance at share 0.

    Returns:
        float64 shares in [0, 1], shape (N,).
    """
    rel = np.asarray(layer_relevance, dtype=np.float64)
    if rel.ndim == 4:
        rel = rel.sum(axis=(2, 3))
    vec = np.asarray(v, dtype=np.float64)
    if rel.ndim != 2 or vec.shape != (rel.shape[1],):
        raise InvalidArrayError(
            f"layer_relevance must be (N, C, H, W) or (N, C) with C = len(v); "
            f"got {np.shape(layer_relevance)} and {vec.shape}"
        )
    norm = float(np.linalg.norm(vec))
    if not norm > 0:
        raise InvalidArrayError("v has zero norm")
    proj = np.maximum(rel @ (vec / norm), 0.0)
    return cast(np.ndarray, np.clip(proj**2 / (np.sum(rel**2, axis=1) + eps), 0.0, 1.0))


@dataclass(frozen=True, eq=False)
class ConceptScores:
    """Per-sample scores of one concept (method.md §1.4).

    Attributes:
        score: s(x) = ⟨φ(x), v⟩, float64, shape (N,).
        percentile: 100 · (fraction of clean validation scores ≤ s), in [0, 100].
        present: s > threshold.
        threshold: The clean-score quantile used.
        fpr: The false-positive rate the threshold was set for: from :meth:`ConceptBank.score`,
            the bank's (any of its concepts on a clean image), not the concept's share of it.
    """

    score: np.ndarray
    percentile: np.ndarray
    present: np.ndarray
    threshold: float
    fpr: float


# ------------------------------------------------------------------------------------ concept bank


@dataclass(frozen=True)
class Provenance:
    """Where a concept bank came from; saved with it as JSON.

    Attributes:
        dataset: Dataset name or spec the activations came from.
        split: The split the CAVs were fitted on (§1.1: the training split).
        seed: Seed of the CAV fit (CV folds).
        n_train: Samples the CAVs were fitted on.
        n_val_clean: Clean validation samples behind the score calibration.
        library_versions: numpy, scipy, scikit-learn, torch and Python versions at fit time.
        created_at: UTC time of the fit, ISO 8601.
        extra: Free-form JSON-serialisable details (e.g. ``cav_scope``, pooling).
    """

    dataset: str
    split: str
    seed: int
    n_train: int
    n_val_clean: int
    library_versions: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


def library_versions() -> dict[str, str]:
    """Versions of the numerical libraries a CAV depends on; read from metadata, no imports."""
    out = {"python": platform.python_version()}
    for name in ("numpy", "scipy", "scikit-learn", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass(frozen=True, eq=False)
class ConceptEntry:
    """One concept of a bank: its CAV, class means and clean-score calibration.

    Attributes:
        name: Concept (artifact) name.
        cav: The fitted CAV.
        mu0: Mean φ of clean (t=0) training samples in scope, float64 (C,): P-ClArC's target (§4.2).
        mu1: Mean φ of artifact (t=1) training samples in scope, float64 (C,) (A-ClArC, §4.4).
        clean_scores: ⟨φ(x), v⟩ of clean validation images, float64, sorted ascending.
    """

    name: str
    cav: Cav
    mu0: np.ndarray
    mu1: np.ndarray
    clean_scores: np.ndarray

    @property
    def v(self) -> np.ndarray:
        return self.cav.v

    def threshold(self, fpr: float = 0.05) -> float:
        """Score threshold with false-positive rate ≤ ``fpr`` on the clean validation scores.

        The (1 − fpr) quantile of the clean scores, rounded up to an observed score
        (``np.quantile(method="higher")``), so that at most ⌊fpr·(M−1)⌋ of the M clean scores lie
        strictly above it.
        """
        if not 0.0 <= fpr <= 1.0:
            raise InvalidArrayError(f"fpr must lie in [0, 1]; got {fpr}")
        return float(np.quantile(self.clean_scores, 1.0 - fpr, method="higher"))

    def conformal_threshold(self, fpr: float) -> float:
        """Score threshold whose expected false-positive rate on a *new* clean image is ≤ ``fpr``.

        The split-conformal rule: with M clean calibration scores, the ⌈(1 − fpr)(M + 1)⌉-th
        smallest. A new clean score, exchangeable with them, lies above it with probability
        ≤ fpr. Where M is too small for that rank (M < 1/fpr − 1) it is the largest clean score,
        whose expected rate is 1/(M + 1): the least the calibration set can promise.
        """
        if not 0.0 <= fpr <= 1.0:
            raise InvalidArrayError(f"fpr must lie in [0, 1]; got {fpr}")
        m = len(self.clean_scores)
        k = min(m, max(1, int(np.ceil((1.0 - fpr) * (m + 1) - 1e-9))))
        return float(self.clean_scores[k - 1])

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """100 · fraction of clean validation scores ≤ each score."""
        idx = np.searchsorted(self.clean_scores, np.asarray(scores, dtype=np.float64), side="right")
        return cast(np.ndarray, 100.0 * idx / len(self.clean_scores))


class ConceptBank:
    """The concepts of one (model version, layer), each a :class:`ConceptEntry` (method.md §1, App.).

    A bank refuses a model version it was not fitted for (:meth:`check_model`). It is saved as a
    directory holding ``concepts.safetensors`` (every array, bitwise) and ``bank.json`` (the rest).
    """

    def __init__(
        self,
        model_version: str,
        layer: str,
        entries: Mapping[str, ConceptEntry],
        provenance: Provenance,
        target_fpr: float = 0.05,
        fpr_scope: str = "bank",
    ) -> None:
        if not entries:
            raise ConceptBankError("a concept bank needs at least one concept")
        widths = {e.cav.v.shape[0] for e in entries.values()}
        if len(widths) != 1:
            raise ConceptBankError(f"concepts of one bank must share the channel count; got {sorted(widths)}")
        if not 0.0 < target_fpr < 1.0:
            raise ConceptBankError(f"target_fpr must lie in (0, 1); got {target_fpr}")
        if fpr_scope not in FPR_SCOPES:
            raise ConceptBankError(f"fpr_scope must be one of {', '.join(FPR_SCOPES)}; got {fpr_scope!r}")
        self._fpr_scope = fpr_scope
        self._model_version = model_version
        self._layer = layer
        self._entries = dict(entries)
        self._provenance = provenance
        self._target_fpr = float(target_fpr)
        self._n_channels = widths.pop()

    # --- identity ---------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self._model_version

    @property
    def layer(self) -> str:
        return self._layer

    @property
    def provenance(self) -> Provenance:
        return self._provenance

    @property
    def target_fpr(self) -> float:
        return self._target_fpr

    @property
    def fpr_scope(self) -> str:
        return self._fpr_scope

    def concept_fpr(self, fpr: float | None = None) -> float:
        """The false-positive rate each concept is thresholded at for a bank rate ``fpr`` (default
        the bank's ``target_fpr``): fpr/K for a bank-wide rate over K concepts, else fpr."""
        rate = self._target_fpr if fpr is None else float(fpr)
        return rate / len(self._entries) if self._fpr_scope == "bank" else rate

    def threshold(self, concept: str, fpr: float | None = None) -> float:
        """Presence threshold of ``concept`` at the bank rate ``fpr`` (default ``target_fpr``): see
        the module docstring for the two scopes."""
        entry = self[concept]
        if self._fpr_scope == "bank":
            return entry.conformal_threshold(self.concept_fpr(fpr))
        return entry.threshold(self.concept_fpr(fpr))

    @property
    def n_channels(self) -> int:
        return self._n_channels

    @property
    def concepts(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def key(self, concept: str) -> tuple[str, str, str]:
        """The (model version, layer, concept) key a concept travels with."""
        self[concept]
        return (self._model_version, self._layer, concept)

    def __getitem__(self, concept: str) -> ConceptEntry:
        try:
            return self._entries[concept]
        except KeyError:
            raise ConceptBankError(
                f"concept {concept!r} is not in the bank for {self._model_version} @ {self._layer}; "
                f"concepts: {', '.join(self._entries)}"
            ) from None

    def __contains__(self, concept: object) -> bool:
        return concept in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ConceptBank({self._model_version!r}, {self._layer!r}, concepts={list(self._entries)})"

    def check_model(self, model_version: str, layer: str | None = None) -> None:
        """Raises ConceptBankError unless the bank was fitted for this model version (and layer)."""
        if model_version != self._model_version:
            raise ConceptBankError(
                f"concept bank was fitted for model version {self._model_version!r}, "
                f"not {model_version!r}; refit the bank for {model_version!r}"
            )
        if layer is not None and layer != self._layer:
            raise ConceptBankError(f"concept bank was fitted at layer {self._layer!r}, not {layer!r}")

    # --- fitting ----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model_version: str,
        layer: str,
        acts_train: np.ndarray,
        concept_labels: Mapping[str, np.ndarray],
        acts_val_clean: np.ndarray,
        *,
        kind: str = "svm",
        dataset: str = "unspecified",
        split: str = "train",
        seed: int = 0,
        target_fpr: float = 0.05,
        provenance: Mapping[str, Any] | None = None,
        fpr_scope: str = "bank",
    ) -> ConceptBank:
        """Fits one CAV per concept and calibrates it on clean validation scores (method.md §1.1–§1.3).

        Args:
            model_version: The model version whose activations these are.
            layer: The CAV layer (a registry hook point).
            acts_train: Max-pooled training activations φ(x), (N, C).
            concept_labels: Per concept, labels over ``acts_train`` rows: 1 artifact, 0 clean,
                −1 outside the concept's ``cav_scope`` (§1.1) and left out of its fit and means.
            acts_val_clean: Max-pooled activations of clean validation images, (M, C).
            kind: CAV kind for every concept (§1.3: ``svm`` for detection and localization,
                ``signal`` for correction).
            dataset: Dataset name, for provenance.
            split: Split of ``acts_train``, for provenance.
            seed: CV seed (see :func:`fit_cav`).
            target_fpr: False-positive rate of the default presence threshold.
            provenance: Free-form JSON-serialisable details stored with the bank.
            fpr_scope: ``bank`` (``target_fpr`` over all concepts together) or ``concept``.

        Returns:
            The fitted bank.
        """
        x = np.asarray(acts_train)
        val = np.asarray(acts_val_clean, dtype=np.float64)
        if x.ndim != 2 or val.ndim != 2 or val.shape[1] != x.shape[1] or len(val) == 0:
            raise InvalidArrayError(
                f"acts_train must be (N, C) and acts_val_clean (M>0, C); got {x.shape} and {val.shape}"
            )
        entries = {}
        for name, labels in concept_labels.items():
            entries[name] = _fit_entry(name, x, np.asarray(labels), val, kind, seed)
        prov = Provenance(
            dataset=dataset,
            split=split,
            seed=seed,
            n_train=int(x.shape[0]),
            n_val_clean=int(val.shape[0]),
            library_versions=library_versions(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra=dict(provenance or {}),
        )
        return cls(model_version, layer, entries, prov, target_fpr, fpr_scope)

    # --- scoring ----------------------------------------------------------------------------
    def score(self, acts: np.ndarray, fpr: float | None = None) -> dict[str, ConceptScores]:
        """Scores every concept on max-pooled activations (N, C) (method.md §1.4).

        Args:
            acts: φ(x) at this bank's layer, shape (N, C).
            fpr: The bank's false-positive rate for presence (:meth:`threshold`); defaults to its
                ``target_fpr``.
        """
        a = np.asarray(acts)
        if a.ndim != 2 or a.shape[1] != self._n_channels:
            raise ConceptBankError(
                f"activations of shape {a.shape} do not fit the bank for {self._model_version} @ "
                f"{self._layer}, which expects (N, {self._n_channels})"
            )
        rate = self._target_fpr if fpr is None else fpr
        out = {}
        for name, entry in self._entries.items():
            s = np.atleast_1d(cav_score(a, entry.v))
            thr = self.threshold(name, rate)
            out[name] = ConceptScores(s, entry.percentile(s), s > thr, thr, rate)
        return out

    # --- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Writes ``concepts.safetensors`` and ``bank.json`` into ``directory`` (created if needed)."""
        from safetensors.numpy import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{name}/{f}": np.ascontiguousarray(_entry_array(e, f))
            for name, e in self._entries.items()
            for f in _ARRAY_FIELDS
        }
        save_file(tensors, str(out / _TENSORS_FILE))
        (out / _META_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> ConceptBank:
        """Reads a bank written by :meth:`save`; every array comes back bitwise identical."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        src = Path(directory)
        try:
            meta = json.loads((src / _META_FILE).read_text())
            tensors = load_file(str(src / _TENSORS_FILE))
        except (OSError, json.JSONDecodeError, SafetensorError) as exc:
            raise ConceptBankError(f"cannot read concept bank at {src}: {exc}") from exc
        if meta.get("format") != BANK_FORMAT or meta.get("format_version") != BANK_FORMAT_VERSION:
            raise ConceptBankError(
                f"{src / _META_FILE} is not a {BANK_FORMAT} v{BANK_FORMAT_VERSION} file "
                f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})"
            )
        try:
            entries = {name: _load_entry(name, cm, tensors) for name, cm in meta["concepts"].items()}
            prov = Provenance(**meta["provenance"])
            # a bank saved before fpr_scope existed keeps the per-concept thresholds it was served with
            scope = meta.get("fpr_scope", "concept")
            return cls(meta["model_version"], meta["layer"], entries, prov, meta["target_fpr"], scope)
        except (KeyError, TypeError) as exc:
            raise ConceptBankError(f"concept bank at {src} is incomplete: missing {exc}") from exc

    def _meta(self) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "model_version": self._model_version,
            "layer": self._layer,
            "target_fpr": self._target_fpr,
            "fpr_scope": self._fpr_scope,
            "n_channels": self._n_channels,
            "concepts": {name: e.cav.meta() for name, e in self._entries.items()},
            "provenance": {**asdict(self._provenance)},
        }

    def metadata(self) -> dict[str, Any]:
        """The JSON-side content of the bank (what ``bank.json`` holds)."""
        return json.loads(json.dumps(self._meta()))


def _fit_entry(
    name: str, x: np.ndarray, labels: np.ndarray, val: np.ndarray, kind: str, seed: int
) -> ConceptEntry:
    if labels.shape != (x.shape[0],) or not np.isin(labels, (-1, 0, 1)).all():
        raise InvalidArrayError(
            f"labels of concept {name!r} must be (N,) = ({x.shape[0]},) with values -1/0/1; "
            f"got shape {labels.shape}, values {np.unique(labels)[:10].tolist()}"
        )
    scope = labels >= 0
    xs, ts = x[scope].astype(np.float64), labels[scope]
    try:
        cav = fit_cav(xs, ts, kind=kind, seed=seed)
    except InvalidArrayError as exc:
        raise InvalidArrayError(f"concept {name!r}: {exc}") from exc
    return _make_entry(
        name,
        cav,
        mu0=xs[ts == 0].mean(axis=0),
        mu1=xs[ts == 1].mean(axis=0),
        clean_scores=np.sort(cav_score(val, cav.v)),
    )


def _make_entry(
    name: str, cav: Cav, mu0: np.ndarray, mu1: np.ndarray, clean_scores: np.ndarray
) -> ConceptEntry:
    for arr in (mu0, mu1, clean_scores):
        arr.setflags(write=False)
    return ConceptEntry(name=name, cav=cav, mu0=mu0, mu1=mu1, clean_scores=clean_scores)


def _entry_array(entry: ConceptEntry, name: str) -> np.ndarray:
    return entry.cav.v if name == "v" else cast(np.ndarray, getattr(entry, name))


def _load_entry(name: str, cav_meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> ConceptEntry:
    arrays = {f: np.array(tensors[f"{name}/{f}"]) for f in _ARRAY_FIELDS}
    arrays["v"].setflags(write=False)
    cav = Cav(v=arrays["v"], **cav_meta)
    return _make_entry(name, cav, arrays["mu0"], arrays["mu1"], arrays["clean_scores"])
