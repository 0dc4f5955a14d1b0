"""CAV fitting, the concept bank and concept scores (method.md §1, §11.5) on synthetic activations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from medaudit.models.errors import ConceptBankError, InvalidArrayError
from medaudit.models.xai.cav import DEFAULT_REG, REG_GRID, balanced_weights, fit_cav
from medaudit.models.xai.concepts import ConceptBank, cav_score, relevance_share
from medaudit.models.xai.metrics import retrieval_metrics, retrieval_report

C = 32


def _concept_data(n: int, seed: int, p: float = 0.2, strength: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Post-ReLU-like activations; artifact samples get a boost along a fixed sparse pattern."""
    rng = np.random.default_rng(seed)
    t = (rng.random(n) < p).astype(np.int64)
    pattern = np.zeros(C)
    pattern[[3, 7, 11, 19]] = [1.0, 0.8, 0.6, 1.2]
    x = np.abs(rng.normal(1.0, 1.0, size=(n, C))) + strength * t[:, None] * pattern
    return x.astype(np.float32), t


def _clean(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.abs(rng.normal(1.0, 1.0, size=(n, C))).astype(np.float32)


@pytest.fixture(scope="module")
def bank() -> ConceptBank:
    x, t = _concept_data(400, seed=0)
    # Second concept with a cav_scope: the first 100 rows are outside it (-1).
    t2 = t.copy()
    t2[:100] = -1
    return ConceptBank.fit(
        "resnet50d.demo-1",
        "identity_2",
        x,
        {"ruler": t, "band-aid": t2},
        _clean(1000, seed=1),
        kind="signal",
        dataset="synthderm",
        seed=0,
        provenance={"cav_scope": None, "pooling": "max"},
    )


# ------------------------------------------------------------------------------------------- CAVs


def test_score_flips_sign_with_the_vector() -> None:
    x, t = _concept_data(100, seed=2)
    v = fit_cav(x, t, kind="signal").v
    np.testing.assert_array_equal(cav_score(x, -v), -cav_score(x, v))


def test_score_is_a_dot_product_not_a_cosine() -> None:
    x, t = _concept_data(50, seed=3)
    v = fit_cav(x, t, kind="signal").v
    np.testing.assert_allclose(cav_score(2 * x, v), 2 * cav_score(x, v), rtol=1e-12)


def test_signal_cav_is_the_normalised_mean_difference() -> None:
    x, t = _concept_data(300, seed=4)
    cav = fit_cav(x, t, kind="signal")
    x64 = x.astype(np.float64)
    diff = x64[t == 1].mean(0) - x64[t == 0].mean(0)
    np.testing.assert_array_equal(cav.v, (diff / np.linalg.norm(diff)).astype(np.float32))
    # ... which is the Cov(X, t)/Var(t) formula of method.md §1.2, up to rounding.
    cov = ((x64 - x64.mean(0)) * (t - t.mean())[:, None]).sum(0) / ((t - t.mean()) ** 2).sum()
    np.testing.assert_allclose(cav.v, cov / np.linalg.norm(cov), atol=1e-6)
    assert (
        cav.v.dtype == np.float32 and cav.reg is None and (cav.n_pos, cav.n_neg) == (t.sum(), 300 - t.sum())
    )


@pytest.mark.parametrize("kind", ["svm", "ridge", "logistic", "signal"])
def test_cav_separates_a_linear_concept_on_held_out_data(kind: str) -> None:
    x, t = _concept_data(300, seed=5)
    x_test, t_test = _concept_data(300, seed=6)
    cav = fit_cav(x, t, kind=kind)
    assert np.linalg.norm(cav.v.astype(np.float64)) == pytest.approx(1.0, abs=1e-6)
    assert retrieval_metrics(cav_score(x_test, cav.v), t_test).auroc > 0.95
    if kind != "signal":
        assert cav.reg in REG_GRID and cav.n_folds == 5 and cav.cv_score is not None


def test_ridge_matches_sklearn_weighted_ridge() -> None:
    from medaudit.models.linear_fits import fit_ridge

    x, t = _concept_data(120, seed=7)
    x64, w = x.astype(np.float64), balanced_weights(t)
    coef, _ = fit_ridge(x64, t, w, 0.1)
    ref = Ridge(alpha=0.1, fit_intercept=True).fit(x64, 2 * t - 1, sample_weight=w)
    np.testing.assert_allclose(coef[:-1], ref.coef_, rtol=1e-7, atol=1e-9)
    assert coef[-1] == pytest.approx(ref.intercept_, rel=1e-7)


@pytest.mark.parametrize("kind", ["svm", "logistic"])
def test_parallel_cv_is_bit_identical_to_the_serial_cv(kind: str, monkeypatch) -> None:
    """Under cv_workers(2) the (fold, C) fits run in worker processes; the chosen C, the CV score
    and the CAV equal the serial loop's exactly."""
    import medaudit.models.xai.cav as cav_mod

    x, t = _concept_data(600, seed=5, strength=0.4)  # overlapping: large C stops at the cap
    serial = fit_cav(x, t, kind=kind, seed=3)
    monkeypatch.setattr(cav_mod, "PARALLEL_MIN_ENTRIES", 0)  # a small matrix goes to the workers too
    calls = []
    real = cav_mod.fold_score
    monkeypatch.setattr(cav_mod, "fold_score", lambda *a: calls.append(1) or real(*a))
    with cav_mod.cv_workers(2):
        parallel = fit_cav(x, t, kind=kind, seed=3)
    assert not calls  # the cells were computed in the workers (each has its own module)
    assert parallel.reg == serial.reg and parallel.cv_score == serial.cv_score
    np.testing.assert_array_equal(parallel.v, serial.v)
    with cav_mod.cv_workers(2):
        monkeypatch.setattr(cav_mod, "PARALLEL_MIN_ENTRIES", x.size + 1)
        fit_cav(x, t, kind=kind, seed=3)  # too small: the serial loop
    assert cav_mod._CV_WORKERS.get() == 1


def test_balanced_weights_give_minority_one_and_majority_ratio() -> None:
    t = np.array([1, 0, 0, 0, 0, 1, 0, 0])
    np.testing.assert_allclose(balanced_weights(t), np.where(t == 1, 1.0, 2 / 6))


def test_cv_falls_back_to_fewer_folds_for_rare_concepts() -> None:
    x, _ = _concept_data(60, seed=8, p=0.0)
    t = np.zeros(60, dtype=np.int64)
    t[:3] = 1
    assert fit_cav(x, t, kind="svm").n_folds == 3
    t[1:3] = 0
    single = fit_cav(x, t, kind="svm")
    assert single.n_folds == 0 and single.reg == DEFAULT_REG and single.cv_score is None


@pytest.mark.parametrize(
    ("labels", "kind", "error", "needle"),
    [
        (np.zeros(20), "svm", InvalidArrayError, "both classes"),
        (np.full(20, 2), "svm", InvalidArrayError, "0 or 1"),
        (np.zeros(19), "svm", InvalidArrayError, "(N,)"),
        (np.arange(20) % 2, "lasso", ConceptBankError, "signal, svm, ridge, logistic"),
    ],
)
def test_fit_cav_rejects_bad_input(
    labels: np.ndarray, kind: str, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=None) as info:
        fit_cav(_clean(20, seed=9), labels, kind=kind)
    assert needle in str(info.value)


# ------------------------------------------------------------------------------------ concept bank


def test_bank_round_trip_is_exact(bank: ConceptBank, tmp_path: Path) -> None:
    loaded = ConceptBank.load(bank.save(tmp_path / "bank"))
    assert loaded.concepts == bank.concepts == ("ruler", "band-aid")
    assert (loaded.model_version, loaded.layer, loaded.target_fpr) == (
        bank.model_version,
        bank.layer,
        bank.target_fpr,
    )
    for name in bank.concepts:
        a, b = bank[name], loaded[name]
        for field in ("mu0", "mu1", "clean_scores"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert a.v.dtype == b.v.dtype == np.float32 and np.array_equal(a.v, b.v)
        assert a.cav.meta() == b.cav.meta()
    assert loaded.provenance == bank.provenance
    assert loaded.metadata() == bank.metadata()
    x = _clean(5, seed=10)
    for name, s in bank.score(x).items():
        np.testing.assert_array_equal(s.score, loaded.score(x)[name].score)


def test_a_bank_saved_before_the_bank_wide_rate_keeps_its_per_concept_thresholds(
    bank: ConceptBank, tmp_path: Path
) -> None:
    assert ConceptBank.load(bank.save(tmp_path / "new")).fpr_scope == "bank"
    old = bank.save(tmp_path / "old")
    meta = json.loads((old / "bank.json").read_text())
    del meta["fpr_scope"]
    (old / "bank.json").write_text(json.dumps(meta))
    loaded = ConceptBank.load(old)
    assert loaded.fpr_scope == "concept" and loaded.concept_fpr() == bank.target_fpr
    assert loaded.threshold("ruler") == bank["ruler"].threshold(bank.target_fpr)
    with pytest.raises(ConceptBankError, match="fpr_scope"):
        ConceptBank("m", "l", {"ruler": bank["ruler"]}, bank.provenance, fpr_scope="image")


def test_bank_records_provenance(bank: ConceptBank) -> None:
    p = bank.provenance
    assert (p.dataset, p.split, p.seed, p.n_train, p.n_val_clean) == ("synthderm", "train", 0, 400, 1000)
    assert {"numpy", "scikit-learn", "torch", "python"} <= set(p.library_versions)
    assert p.created_at and p.extra == {"cav_scope": None, "pooling": "max"}
    assert bank.key("ruler") == ("resnet50d.demo-1", "identity_2", "ruler")


def test_bank_refuses_a_model_version_it_was_not_fitted_for(bank: ConceptBank) -> None:
    bank.check_model("resnet50d.demo-1", "identity_2")
    with pytest.raises(ConceptBankError) as info:
        bank.check_model("resnet50d.demo-2")
    assert "resnet50d.demo-1" in str(info.value) and "resnet50d.demo-2" in str(info.value)
    with pytest.raises(ConceptBankError, match="identity_3"):
        bank.check_model("resnet50d.demo-1", "identity_3")


def test_bank_means_use_only_samples_in_scope(bank: ConceptBank) -> None:
    x, t = _concept_data(400, seed=0)
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(bank["ruler"].mu0, x64[t == 0].mean(0))
    np.testing.assert_array_equal(bank["band-aid"].mu1, x64[100:][t[100:] == 1].mean(0))
    assert bank["band-aid"].cav.n_pos + bank["band-aid"].cav.n_neg == 300


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_gives_the_target_false_positive_rate(bank: ConceptBank, fpr: float) -> None:
    entry = bank["ruler"]
    thr = entry.threshold(fpr)
    calib = np.mean(entry.clean_scores > thr)
    assert fpr - 0.002 <= calib <= fpr  # at most fpr on the calibration set itself
    per_concept = ConceptBank("m", "l", {"ruler": entry}, bank.provenance, fpr_scope="concept")
    fresh = per_concept.score(_clean(4000, seed=11), fpr=fpr)["ruler"]
    assert fresh.present.mean() == pytest.approx(fpr, abs=0.02 + fpr / 4)


def _independent_bank(n_concepts: int, n_val: int = 1000) -> ConceptBank:
    """A bank of concepts on disjoint channels, so their clean scores are independent."""
    rng = np.random.default_rng(5)
    x = np.abs(rng.normal(1.0, 1.0, size=(600, C))).astype(np.float32)
    labels = {}
    for k in range(n_concepts):
        t = (rng.random(600) < 0.3).astype(np.int64)
        x[t == 1, 4 * k : 4 * k + 4] += 2.0
        labels[f"c{k}"] = t
    return ConceptBank.fit("m", "l", x, labels, _clean(n_val, seed=6), kind="signal")


@pytest.mark.parametrize("fpr", [0.05, 0.2])
def test_a_bank_rate_is_the_rate_any_of_its_concepts_fires_on_new_clean_images(fpr: float) -> None:
    bank = _independent_bank(3)
    assert bank.fpr_scope == "bank" and bank.concept_fpr(fpr) == pytest.approx(fpr / 3)
    fresh = bank.score(_clean(20000, seed=12), fpr=fpr)
    rates = [fresh[c].present.mean() for c in bank]
    any_rate = np.any([fresh[c].present for c in bank], axis=0).mean()
    # each concept at fpr/3, so the three together at most fpr (about 1-(1-fpr/3)^3 when independent)
    assert all(r == pytest.approx(fpr / 3, abs=0.01 + fpr / 10) for r in rates), rates
    assert 0.8 * fpr <= any_rate <= fpr + 0.01, any_rate
    # the same concepts each at the full rate fire together on far more clean images
    loose = ConceptBank("m", "l", {c: bank[c] for c in bank}, bank.provenance, fpr_scope="concept")
    loose_rate = np.any([s.present for s in loose.score(_clean(20000, seed=12), fpr=fpr).values()], 0).mean()
    assert loose_rate > 2.3 * fpr


def test_conformal_threshold_is_the_split_conformal_rank_of_the_clean_scores() -> None:
    bank = _independent_bank(1, n_val=199)
    entry = bank["c0"]
    scores = entry.clean_scores  # sorted ascending
    # 199 scores: rank ceil(0.95 * 200) = 190, so 9 of them lie above it (the in-sample quantile leaves 9 too)
    assert entry.conformal_threshold(0.05) == scores[189]
    assert entry.conformal_threshold(0.02) == scores[195]  # ceil(0.98 * 200) = 196
    # too few scores for the rank: the largest, the least 199 images can promise
    assert entry.conformal_threshold(0.001) == scores[-1]
    assert bank.threshold("c0", 0.05) == entry.conformal_threshold(0.05)
    with pytest.raises(InvalidArrayError):
        entry.conformal_threshold(1.5)


def test_scores_carry_percentile_and_presence(bank: ConceptBank) -> None:
    x, t = _concept_data(200, seed=12)
    s = bank.score(x)["ruler"]
    assert s.fpr == bank.target_fpr and s.threshold == bank.threshold("ruler")
    assert ((s.percentile >= 0) & (s.percentile <= 100)).all()
    order = np.argsort(s.score)
    assert (np.diff(s.percentile[order]) >= 0).all()
    np.testing.assert_array_equal(s.present, s.score > s.threshold)
    assert s.present[t == 1].mean() > 0.8 > 0.1 > s.present[t == 0].mean()


def test_bank_rejects_activations_of_the_wrong_width(bank: ConceptBank) -> None:
    with pytest.raises(ConceptBankError, match=f"\\(N, {C}\\)"):
        bank.score(np.zeros((3, C + 1)))
    with pytest.raises(ConceptBankError, match="ruler, band-aid"):
        bank["pacemaker"]


def test_load_reports_missing_or_foreign_files(bank: ConceptBank, tmp_path: Path) -> None:
    with pytest.raises(ConceptBankError, match="cannot read"):
        ConceptBank.load(tmp_path / "nowhere")
    out = bank.save(tmp_path / "b")
    meta = json.loads((out / "bank.json").read_text())
    (out / "bank.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ConceptBankError, match="version 99"):
        ConceptBank.load(out)
    del meta["layer"]
    (out / "bank.json").write_text(json.dumps(meta))
    with pytest.raises(ConceptBankError, match="layer"):
        ConceptBank.load(out)


# --------------------------------------------------------------------------------- relevance share


def test_relevance_share_invariants() -> None:
    rng = np.random.default_rng(13)
    v = rng.normal(size=C)
    v /= np.linalg.norm(v)
    r = rng.normal(size=(50, C))
    share = relevance_share(r, v)
    assert share.shape == (50,) and ((share >= 0) & (share <= 1)).all()
    ortho = r - np.outer(r @ v, v)
    along = 3.7 * v[None]
    np.testing.assert_allclose(relevance_share(ortho, v), 0.0, atol=1e-12)
    np.testing.assert_allclose(relevance_share(along, v), 1.0, rtol=1e-12)
    assert relevance_share(-along, v)[0] == 0.0  # relevance against the concept is not its use
    np.testing.assert_allclose(relevance_share(5 * r, v), share, rtol=1e-10)
    np.testing.assert_allclose(relevance_share(r, 2 * v), share, rtol=1e-12)
    assert relevance_share(np.zeros((1, C)), v)[0] == 0.0


def test_relevance_share_sums_spatial_relevance_first() -> None:
    rng = np.random.default_rng(14)
    rel = rng.normal(size=(4, C, 5, 6))
    v = rng.normal(size=C)
    np.testing.assert_allclose(relevance_share(rel, v), relevance_share(rel.sum((2, 3)), v), rtol=1e-12)
    with pytest.raises(InvalidArrayError):
        relevance_share(rel, v[:-1])


# ------------------------------------------------------------------------------ retrieval metrics


def test_retrieval_metrics_on_a_known_ranking() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1])
    perfect = retrieval_metrics(np.arange(6.0) * labels, labels)
    assert perfect.auroc == 1.0 and perfect.ap == 1.0 and perfect.kendall_tau > 0.7
    flipped = retrieval_metrics(-np.arange(6.0) * labels, labels)
    assert flipped.auroc == 0.0 and flipped.kendall_tau < -0.7
    assert set(perfect.as_dict()) == {"auroc", "ap", "kendall_tau", "kendall_p", "n", "n_pos"}
    with pytest.raises(InvalidArrayError, match="both present"):
        retrieval_metrics(np.arange(3.0), np.zeros(3))


def test_retrieval_report_has_all_and_held_out() -> None:
    x, t = _concept_data(400, seed=15)
    fitted_on = np.arange(400) < 200
    v = fit_cav(x[fitted_on], t[fitted_on], kind="signal").v
    report = retrieval_report(cav_score(x, v), t, fitted_on)
    assert report["all"].n == 400 and report["held_out"].n == 200
    assert report["held_out"].auroc > 0.95
