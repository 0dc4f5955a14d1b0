"""Concept activation vectors: fitting a CAV from max-pooled activations and artifact labels
(method.md §1.2, §1.3, §11.5).

``acts`` are spatially **max**-pooled activations φ(x) of the CAV layer, shape (N, C) (§1.1, §11.4);
``labels`` the artifact label t ∈ {0, 1} per sample (§1.1). :mod:`medaudit.models.xai.concepts`
builds the concept bank on these.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

import numpy as np
from joblib import Parallel, delayed
from sklearn.model_selection import StratifiedKFold

from medaudit.models.errors import ConceptBankError, InvalidArrayError
from medaudit.models.linear_fits import ESTIMATORS, PATHS, REFITTING, FitFn, ScoreFn, fold_score

CavKind = Literal["signal", "svm", "ridge", "logistic"]
CAV_KINDS: tuple[str, ...] = get_args(CavKind)

#: Regularisation grid of the authors' ``compute_cav`` (§1.2): 10^-5 … 10^4, ten values.
REG_GRID: tuple[float, ...] = tuple(float(10.0**k) for k in range(-5, 5))
#: Folds of the CV that picks the regularisation (§1.2: sklearn's default 5-fold stratified CV).
CV_FOLDS = 5
#: Fallback regularisation when a class has a single sample and no CV is possible (sklearn's default).
DEFAULT_REG = 1.0
#: Smallest activation matrix (N·C entries) whose CV fits go to worker processes under
#: :func:`cv_workers`; below it a process's start and the copy cost more than the fits.
PARALLEL_MIN_ENTRIES = 200_000

_CV_WORKERS: contextvars.ContextVar[int] = contextvars.ContextVar("cv_workers", default=1)


@contextlib.contextmanager
def cv_workers(n: int) -> Iterator[None]:
    """Inside the block, the regularisation CV of svm/logistic CAVs on large activation matrices
    fits its (fold, C) pairs in ``n`` joblib worker processes. Each fit is a separate liblinear
    solve seeded as in the serial loop, so the chosen C, the CV score and the CAV are bit-identical
    to the serial ones (tests/unit/test_cav.py); the build uses it (a liblinear fit is one thread,
    and the SVM CVs were ~45 s of the demo build's concept banks on 2 cores)."""
    token = _CV_WORKERS.set(max(1, int(n)))
    try:
        yield
    finally:
        _CV_WORKERS.reset(token)


@dataclass(frozen=True, eq=False)
class Cav:
    """A fitted concept activation vector (method.md §1.2).

    Attributes:
        v: Unit-L2 direction, float32, shape (C,). The intercept is dropped (§1.2, §11.5).
        kind: Which estimator produced it.
        reg: The chosen regularisation (C for svm/logistic, α for ridge); None for signal.
        cv_score: Mean CV score at ``reg`` (accuracy for svm/logistic, R² for ridge); None when no
            CV ran (signal, or a class with one sample).
        n_folds: Folds used to choose ``reg`` (0: none).
        n_pos: Artifact samples (t=1) in the fit.
        n_neg: Clean samples (t=0) in the fit.
        converged: False when the final refit stopped at the solver's iteration cap.
    """

    v: np.ndarray
    kind: CavKind
    reg: float | None = None
    cv_score: float | None = None
    n_folds: int = 0
    n_pos: int = 0
    n_neg: int = 0
    converged: bool = True

    def meta(self) -> dict[str, Any]:
        """Every field except ``v``, as JSON-ready values."""
        return {k: val for k, val in asdict(self).items() if k != "v"}


def fit_cav(acts: np.ndarray, labels: np.ndarray, kind: str = "svm", seed: int = 0) -> Cav:
    """Fits a unit-norm CAV on max-pooled activations (method.md §1.2, §1.3, §11.5).

    * ``signal`` (pattern-CAV): v ∝ μ1 − μ0, the difference of the artifact and clean class means.
      §1.2 shows Cov(X, t)/Var(t) equals this for binary t; §11.5 asks for the mean difference
      itself to avoid numerical differences. Unweighted, no CV.
    * ``svm``: ``LinearSVC(dual=True, random_state=0)`` with class-balanced sample weights
      ω_n = (t_n/N1 + (1−t_n)/N0) / max(1/N1, 1/N0); C from :data:`REG_GRID` by stratified CV on
      accuracy.
    * ``ridge``: weighted ridge regression onto 2t−1 (solved in closed form, the same minimiser as
      ``sklearn.linear_model.Ridge(fit_intercept=True)`` with ``sample_weight``); α by CV on R².
    * ``logistic``: weighted L2 ``LogisticRegression``; C by CV on accuracy. Uses the liblinear
      solver, because lbfgs takes ~10 s per fit at N=2000, C=512.

    CV folds are stratified and shuffled with ``seed`` (the authors use unshuffled folds; precomputed
    activations are ordered by class, so shuffling keeps folds representative). With fewer than
    :data:`CV_FOLDS` samples in a class the fold count drops to that number; with one sample no CV
    runs and the regularisation is :data:`DEFAULT_REG`.

    Args:
        acts: Max-pooled activations φ(x), shape (N, C), finite.
        labels: Artifact labels t, shape (N,), values 0/1, both present.
        kind: One of :data:`CAV_KINDS`.
        seed: Seeds the CV fold shuffling.

    Returns:
        The CAV; v has unit L2 norm and dtype float32.

    Raises:
        InvalidArrayError: Bad shapes, non-finite values, labels other than 0/1 or a missing class,
            or a direction of zero norm.
        ConceptBankError: An unknown ``kind``.
    """
    x, t = _check_fit_inputs(acts, labels)
    if kind not in CAV_KINDS:
        raise ConceptBankError(f"unknown CAV kind {kind!r}; valid kinds: {', '.join(CAV_KINDS)}")
    n_pos, n_neg = int(t.sum()), int(len(t) - t.sum())
    if kind == "signal":
        w = x[t == 1].mean(axis=0) - x[t == 0].mean(axis=0)
        return Cav(v=_unit(w, kind), kind="signal", n_pos=n_pos, n_neg=n_neg)
    weights = balanced_weights(t)
    n_folds = min(CV_FOLDS, n_pos, n_neg)
    fit_one, score_one = ESTIMATORS[kind]
    if n_folds >= 2:
        reg, cv_score = _choose_reg(x, t, weights, n_folds, seed, fit_one, score_one)
    else:
        reg, cv_score, n_folds = DEFAULT_REG, None, 0
    coef, converged = fit_one(x, t, weights, reg)
    return Cav(
        v=_unit(coef[:-1], kind),  # the last entry is the intercept, dropped (§1.2)
        kind=cast(CavKind, kind),
        reg=reg,
        cv_score=cv_score,
        n_folds=n_folds,
        n_pos=n_pos,
        n_neg=n_neg,
        converged=converged,
    )


def balanced_weights(t: np.ndarray) -> np.ndarray:
    """Class-balancing sample weights of method.md §1.2: minority class 1, majority N_min/N_max."""
    n1, n0 = float(t.sum()), float(len(t) - t.sum())
    return (t / n1 + (1 - t) / n0) / max(1 / n1, 1 / n0)


def _check_fit_inputs(acts: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(acts, dtype=np.float64)
    t = np.asarray(labels)
    if x.ndim != 2 or t.shape != (x.shape[0],):
        raise InvalidArrayError(
            f"acts must be (N, C) and labels (N,); got acts {np.shape(acts)}, labels {np.shape(labels)}"
        )
    if not np.isfinite(x).all():
        raise InvalidArrayError("acts contain NaN or infinite values")
    if not np.isin(t, (0, 1)).all():
        raise InvalidArrayError(f"labels must be 0 or 1; got values {np.unique(t)[:10].tolist()}")
    t = t.astype(np.int64)
    if t.min() == t.max():
        raise InvalidArrayError(f"labels need both classes to fit a CAV; all {len(t)} are {int(t[0])}")
    return x, t


def _unit(w: np.ndarray, kind: str) -> np.ndarray:
    norm = float(np.linalg.norm(w))
    if not norm > 0 or not math.isfinite(norm):
        raise InvalidArrayError(f"the {kind} CAV has norm {norm}; the concept is not linearly visible")
    v = (w / norm).astype(np.float32)
    v.setflags(write=False)
    return v


def _choose_reg(
    x: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    n_folds: int,
    seed: int,
    fit_one: FitFn,
    score_one: ScoreFn,
) -> tuple[float, float]:
    """Grid search over :data:`REG_GRID`; ties go to the smaller value, as in GridSearchCV."""
    splits = list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, t))
    scores = np.zeros((n_folds, len(REG_GRID)))
    workers = _CV_WORKERS.get()
    if workers > 1 and fit_one in REFITTING and x.size >= PARALLEL_MIN_ENTRIES:
        jobs = [(i, j) for i in range(n_folds) for j in range(len(REG_GRID))]
        # large C first: their solves run to the iteration cap, so they set the critical path
        jobs.sort(key=lambda ij: -ij[1])
        got = Parallel(n_jobs=workers, max_nbytes="1M")(
            delayed(fold_score)(x, t, w, splits[i][0], splits[i][1], REG_GRID[j], fit_one, score_one)
            for i, j in jobs
        )
        for (i, j), score in zip(jobs, got, strict=True):
            scores[i, j] = score
    else:
        for i, (tr, va) in enumerate(splits):
            path = PATHS[fit_one](x[tr], t[tr], w[tr], REG_GRID)
            scores[i] = [score_one(coef, x[va], t[va]) for coef in path]
    means = scores.mean(axis=0)
    best = int(np.argmax(means))
    return REG_GRID[best], float(means[best])
