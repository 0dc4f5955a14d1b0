"""Reviewed flags as concept samples: refit a version's concept bank and measure retrieval.

A reviewer's verdict labels the flagged image for the flagged concept: ``artifact_confirmed`` is a
positive sample (t = 1), ``false_alarm`` a negative one (t = 0); ``other`` says nothing about the
concept and is left out. The sample is the image's feature vector φ(x), the max-pooled
activations at the bank's layer stored with the flag (``AuditResult.features``), so no image is
needed. For the bank's other concepts the sample is unlabelled (−1, outside their fit).

:func:`refine_bank` refits every concept on the bank's original fit data plus the reviewed
samples, with the estimator each concept was fitted with, calibrated on the same clean validation
activations, and measures retrieval (AUROC, AP; method.md §1.5) on a held-out split none of the
fits saw, for three banks: the stored one, a refit on the original data alone (the baseline: the
same procedure, so the difference is the reviewed samples' alone) and the refined one. The new
bank's provenance records how many samples were added per concept and which flags they came from.

:func:`synthderm_fit_data` and :func:`dataset_fit_data` re-extract the original fit data the way
``medaudit.models.pipeline`` does, on synthderm or on any annotated dataset on disk: the training
split for the fit, clean validation images for the calibration, and the test split for the
held-out evaluation, through the served version's own model, whose activations the flags'
features are.

:func:`refit_version` turns a refined bank into a **new version** of the same model: the same
weights and ONNX graph, the refitted bank under the new tag, and a copy of the card whose
``concept_bank`` entry names the version it was refitted from and the flags it learnt from. It is
registered and served like any version (beside the old one, for A/B of the two banks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medaudit.models.errors import ConceptBankError, InvalidArrayError
from medaudit.models.xai.concepts import ConceptBank, ConceptEntry
from medaudit.models.xai.metrics import retrieval_metrics
from medaudit.service.flags.events import FlagKeys

if TYPE_CHECKING:
    import redis
    from torch import nn

    from medaudit.models.data.protocol import AnnotatedDataset
    from medaudit.models.data.synthetic import SynthDermConfig
    from medaudit.models.registry import ModelCfg
    from medaudit.service.store import LoadedVersion

#: Verdict -> label of the flagged concept; verdicts not listed add no sample.
VERDICT_LABELS = {"artifact_confirmed": 1, "false_alarm": 0}


@dataclass(frozen=True, eq=False)
class ReviewedSample:
    """One resolved flag with the features of its image."""

    flag_id: str
    concept: str
    verdict: str
    model_version: str
    layer: str
    features: np.ndarray

    @property
    def label(self) -> int:
        return VERDICT_LABELS[self.verdict]


@dataclass(frozen=True, eq=False)
class FitData:
    """What a bank is fitted and evaluated on (method.md §1.1, §1.5).

    Attributes:
        acts_train: φ(x) of the fit samples, (N, C).
        labels: Per concept, (N,) labels: 1 artifact, 0 clean, −1 outside its fit.
        acts_val_clean: φ(x) of clean validation images, (M, C): the score calibration.
        acts_eval: φ(x) of held-out images, (K, C): never in any fit.
        eval_labels: Per concept, (K,) 0/1 artifact labels of the held-out images.
        dataset: For provenance.
    """

    acts_train: np.ndarray
    labels: Mapping[str, np.ndarray]
    acts_val_clean: np.ndarray
    acts_eval: np.ndarray
    eval_labels: Mapping[str, np.ndarray]
    dataset: str = "unspecified"


@dataclass(frozen=True, eq=False)
class RefineResult:
    """A refined bank and its retrieval before and after.

    Attributes:
        bank: The refined bank (same model version and layer).
        stored, baseline, refined: Per concept ``{"auroc", "ap", "n", "n_pos"}`` on the held-out
            split (None where it has one class only), for the stored bank, the refit without
            reviewed samples and the refit with them.
        added: Per concept ``{"positive": n, "negative": n}`` reviewed samples added.
        flag_ids: The flags whose samples were added.
        skipped: Reviewed flags left out, by reason.
    """

    bank: ConceptBank
    stored: Mapping[str, dict[str, float] | None]
    baseline: Mapping[str, dict[str, float] | None]
    refined: Mapping[str, dict[str, float] | None]
    added: Mapping[str, dict[str, int]]
    flag_ids: tuple[str, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_version": self.bank.model_version,
            "layer": self.bank.layer,
            "added": dict(self.added),
            "flag_ids": list(self.flag_ids),
            "skipped": dict(self.skipped),
            "held_out": {
                c: {"stored": self.stored[c], "baseline": self.baseline[c], "refined": self.refined[c]}
                for c in self.bank
            },
        }


# --------------------------------------------------------------------------------- samples


def reviewed_samples(
    client: redis.Redis,
    keys: FlagKeys | None = None,
    *,
    model_version: str | None = None,
    layer: str | None = None,
) -> tuple[list[ReviewedSample], dict[str, int]]:
    """Resolved flags with a usable verdict and stored features, oldest resolution first.

    Args:
        client: A bytes Redis client.
        keys: Key layout.
        model_version: Keep flags of this version only (short ``vanilla`` or full
            ``name:vanilla``; both spellings match).
        layer: Keep flags whose features were taken at this layer only.

    Returns:
        The samples, and counts of flags left out by reason (``verdict_other``,
        ``features_expired``, ``other_version``, ``other_layer``).
    """
    keys = keys or FlagKeys()
    wanted = None if model_version is None else {model_version, model_version.split(":", 1)[-1]}
    skipped: Counter[str] = Counter()
    out = []
    for raw_id in client.zrange(keys.resolved_index, 0, -1):
        fid = _text(raw_id)
        rec = {_text(k): _text(v) for k, v in client.hgetall(keys.review(fid)).items()}
        verdict = rec.get("verdict", "")
        if verdict not in VERDICT_LABELS:
            skipped[f"verdict_{verdict or 'missing'}"] += 1
            continue
        if wanted is not None and not (
            {rec.get("model_version", ""), rec.get("model_version", "").split(":", 1)[-1]} & wanted
        ):
            skipped["other_version"] += 1
            continue
        if layer is not None and rec.get("layer") != layer:
            skipped["other_layer"] += 1
            continue
        data = client.get(rec["features_key"]) if rec.get("features_key") else None
        if data is None:
            skipped["features_expired"] += 1
            continue
        feats = np.frombuffer(data if isinstance(data, bytes) else data.encode(), dtype="<f4").astype(
            np.float64
        )
        out.append(
            ReviewedSample(
                flag_id=fid,
                concept=rec["concept"],
                verdict=verdict,
                model_version=rec.get("model_version", ""),
                layer=rec.get("layer", ""),
                features=feats,
            )
        )
    return out, dict(skipped)


# --------------------------------------------------------------------------------- refit


def _metrics(bank: ConceptBank, data: FitData) -> dict[str, dict[str, float] | None]:
    out: dict[str, dict[str, float] | None] = {}
    scores = bank.score(data.acts_eval)
    for c in bank:
        y = np.asarray(data.eval_labels[c])
        try:
            m = retrieval_metrics(scores[c].score, y)
        except InvalidArrayError:  # one class only on the held-out split
            out[c] = None
            continue
        out[c] = {"auroc": m.auroc, "ap": m.ap, "n": m.n, "n_pos": m.n_pos}
    return out


def _fit(
    bank: ConceptBank,
    acts: np.ndarray,
    labels: Mapping[str, np.ndarray],
    data: FitData,
    seed: int,
    provenance: Mapping[str, Any],
) -> ConceptBank:
    """Refits every concept with its own CAV kind; one bank, concepts in the stored order."""
    by_kind: dict[str, list[str]] = {}
    for c in bank:
        by_kind.setdefault(bank[c].cav.kind, []).append(c)
    entries: dict[str, ConceptEntry] = {}
    fitted = None
    for kind, concepts in by_kind.items():
        fitted = ConceptBank.fit(
            bank.model_version,
            bank.layer,
            acts,
            {c: labels[c] for c in concepts},
            data.acts_val_clean,
            kind=kind,
            dataset=data.dataset,
            split="train+reviewed" if len(acts) > len(data.acts_train) else "train",
            seed=seed,
            target_fpr=bank.target_fpr,
            provenance=provenance,
        )
        entries.update({c: fitted[c] for c in concepts})
    assert fitted is not None  # a bank has at least one concept
    ordered = {c: entries[c] for c in bank}
    return ConceptBank(
        bank.model_version, bank.layer, ordered, fitted.provenance, bank.target_fpr, bank.fpr_scope
    )


def refine_bank(
    bank: ConceptBank, data: FitData, samples: Sequence[ReviewedSample], *, seed: int = 0
) -> RefineResult:
    """Refits ``bank`` on ``data`` plus the reviewed samples; see the module docstring.

    Raises:
        ConceptBankError: ``data`` lacks labels for a concept of the bank, or its activations
            have another channel count.
    """
    missing = [c for c in bank if c not in data.labels or c not in data.eval_labels]
    if missing:
        raise ConceptBankError(
            f"the fit data has no labels for concepts {missing}; it has {sorted(data.labels)}"
        )
    if data.acts_train.shape[1] != bank.n_channels:
        raise ConceptBankError(
            f"fit data has {data.acts_train.shape[1]} channels; "
            f"the bank at {bank.layer} has {bank.n_channels}"
        )
    skipped: Counter[str] = Counter()
    used: list[ReviewedSample] = []
    for s in samples:
        if s.concept not in bank:
            skipped["concept_not_in_bank"] += 1
        elif s.features.shape != (bank.n_channels,) or not np.isfinite(s.features).all():
            skipped["bad_features"] += 1
        else:
            used.append(s)
    added = {c: {"positive": 0, "negative": 0} for c in bank}
    for s in used:
        added[s.concept]["positive" if s.label else "negative"] += 1
    base_prov = dict(bank.provenance.extra)
    stored_metrics = _metrics(bank, data)
    baseline = _fit(bank, data.acts_train, data.labels, data, seed, base_prov)
    if used:
        acts = np.vstack([np.asarray(data.acts_train, np.float64), np.stack([s.features for s in used])])
        labels = {
            c: np.concatenate(
                [
                    np.asarray(data.labels[c], np.int64),
                    np.array([s.label if s.concept == c else -1 for s in used]),
                ]
            )
            for c in bank
        }
    else:
        acts, labels = data.acts_train, dict(data.labels)
    baseline_metrics = _metrics(baseline, data)
    prov = {
        **base_prov,
        "refined": {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "from_bank_created_at": bank.provenance.created_at,
            "from_n_train": bank.provenance.n_train,
            "n_original": int(len(data.acts_train)),
            "n_reviewed": len(used),
            "reviewed_added": added,
            "flag_ids": [s.flag_id for s in used],
        },
    }
    refined = _fit(bank, acts, labels, data, seed, prov)
    return RefineResult(
        bank=refined,
        stored=stored_metrics,
        baseline=baseline_metrics,
        refined=_metrics(refined, data),
        added=added,
        flag_ids=tuple(s.flag_id for s in used),
        skipped=dict(skipped),
    )


# --------------------------------------------------------------------------------- original data


def synthderm_fit_data(
    model: nn.Module,
    cfg: ModelCfg,
    layer: str,
    data_cfg: SynthDermConfig,
    concepts: Sequence[str],
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
) -> FitData:
    """Re-extracts a synthderm bank's fit data through ``model`` (see the module docstring).

    Training split, training distribution (``ch``) with membership labels for the fit; clean
    validation images (the bank's calibration, as in ``medaudit.models.pipeline``); the test split
    (``ch``) with membership labels as the held-out evaluation.

    Raises:
        ConceptBankError: A concept synthderm does not draw.
    """
    from medaudit.models.corrections.base import pooled_activations
    from medaudit.models.data.synthetic import SynthDerm
    from medaudit.models.train import render_split

    ds = SynthDerm(data_cfg)
    unknown = [c for c in concepts if c not in ds.membership]
    if unknown:
        raise ConceptBankError(f"synthderm has no concepts {unknown}; it draws {sorted(ds.membership)}")
    cache = Path(cache_dir) if cache_dir is not None else None
    x_tr, _ = render_split(ds, "train", cache_dir=cache)
    x_val, _ = render_split(ds, "val", "clean", cache_dir=cache)
    x_te, _ = render_split(ds, "test", cache_dir=cache)
    tr, te = ds.indices("train"), ds.indices("test")

    def acts(x: Any) -> np.ndarray:
        return pooled_activations(model, cfg, layer, x, batch_size=batch_size)

    return FitData(
        acts_train=acts(x_tr),
        labels={c: ds.membership[c][tr].astype(np.int64) for c in concepts},
        acts_val_clean=acts(x_val),
        acts_eval=acts(x_te),
        eval_labels={c: ds.membership[c][te].astype(np.int64) for c in concepts},
        dataset="synthderm",
    )


def dataset_fit_data(
    model: nn.Module,
    cfg: ModelCfg,
    layer: str,
    ds: AnnotatedDataset,
    concepts: Sequence[str],
    *,
    name: str = "unspecified",
    batch_size: int = 64,
) -> FitData:
    """:func:`synthderm_fit_data` for any annotated dataset (``medaudit.models.build_data``): the
    training split with annotation labels for the fit, validation images with no annotated
    artifact for the calibration, the test split with annotation labels held out; images read at
    the model's input side.

    Raises:
        ConceptBankError: A concept the dataset does not annotate.
    """
    from medaudit.models.build_data import DatasetData
    from medaudit.models.corrections.base import pooled_activations

    data = DatasetData(ds, name, int(cfg.input_size[-1]), None, concepts[0] if concepts else "")
    unknown = [c for c in concepts if c not in data.membership]
    if unknown:
        raise ConceptBankError(
            f"{name} annotates no image with {unknown}; annotated: {', '.join(data.membership) or 'none'}"
        )
    tr, te = data.tr_idx, np.asarray(ds.indices("test"), dtype=np.int64)

    def acts(x: Any) -> np.ndarray:
        return pooled_activations(model, cfg, layer, x, batch_size=batch_size)

    return FitData(
        acts_train=acts(data.train()[0]),
        labels={c: data.membership[c][tr].astype(np.int64) for c in concepts},
        acts_val_clean=acts(data.val_clean(concepts[0] if concepts else "")),
        acts_eval=acts(data.arrays(te, "test")),
        eval_labels={c: data.membership[c][te].astype(np.int64) for c in concepts},
        dataset=name,
    )


# --------------------------------------------------------------------------------- new version


def refit_version_name(version: str, existing: Sequence[str]) -> str:
    """``vanilla`` -> ``vanilla-refit1``, or the next number not among ``existing`` versions."""
    base = version.split("-refit", 1)[0]
    n = 1
    while f"{base}-refit{n}" in existing:
        n += 1
    return f"{base}-refit{n}"


def refit_version(loaded: LoadedVersion, result: RefineResult, version: str, out: str | Path) -> Path:
    """Writes a new version of ``loaded``'s model into ``out``: ``bank/`` (the refined bank under
    ``<name>:<version>``) and ``card.json``/``card.md`` (the old card renamed, with a
    ``concept_bank`` entry: refitted from which version, on how many reviewed samples, from which
    flags). Weights and ONNX are the old version's (register them from ``loaded.path``).

    Returns:
        ``out``.
    """
    from medaudit.models.xai.concepts import ConceptBank

    name = loaded.tag.split(":", 1)[0]
    tag = f"{name}:{version}"
    out = Path(out)
    b = result.bank
    bank = ConceptBank(tag, b.layer, {c: b[c] for c in b}, b.provenance, b.target_fpr, b.fpr_scope)
    bank.save(out / "bank")
    refit = {
        "refit_from": loaded.tag,
        "layer": b.layer,
        "added": dict(result.added),
        "flag_ids": list(result.flag_ids),
        "held_out": result.to_json()["held_out"],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    note = (
        f"Concept bank refitted from {loaded.tag} with {len(result.flag_ids)} reviewed flags "
        "(same weights); see data.concept_bank."
    )
    card = replace(
        loaded.card,
        name=tag,
        version=version,
        data={**dict(loaded.card.data), "concept_bank": refit},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        notes=(*loaded.card.notes, note),
    )
    card.save(out)
    return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)
