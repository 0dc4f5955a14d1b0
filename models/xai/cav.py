"""Concept activation vectors: fitting a CAV from max-pooled activations and artifact labels
(method.md §1.2, §1.3, §11.5).

``acts`` are spatially **max**-pooled activations φ(x) of the CAV layer, shape (N, C) (§1.1, §11.4);
``labels`` the artifact label t ∈ {0, 1} per sample (§1.1). :mod:`medaudit.models.xai.concepts`
builds the concept bank on these.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast, get_args

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from medaudit.models.errors import ConceptBankError, InvalidArrayError

CavKind = Literal["signal", "svm", "ridge", "logistic"]
CAV_KINDS: tuple[str, ...] = get_args(CavKind)

#: Regularisation grid of the authors' ``compute_cav`` (§1.2): 10^-5 … 10^4, ten values.
REG_GRID: tuple[float, ...] = tuple(float(10.0**k) for k in range(-5, 5))
#: Folds of the CV that picks the regularisation (§1.2: sklearn's default 5-fold stratified CV).
CV_FOLDS = 5
#: liblinear's iteration cap; 1000 is LinearSVC's default, which the authors keep (§1.2).
MAX_ITER = 1000
#: Fallback regularisation when a class has a single sample and no CV is possible (sklearn's default).
DEFAULT_REG = 1.0


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
    fit_one, score_one = _ESTIMATORS[kind]
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


FitFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[np.ndarray, bool]]
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
PathFn = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]], list[np.ndarray]]


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
    splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x, t)
    scores = np.zeros((n_folds, len(REG_GRID)))
    for i, (tr, va) in enumerate(splits):
        path = _PATHS[fit_one](x[tr], t[tr], w[tr], REG_GRID)
        scores[i] = [score_one(coef, x[va], t[va]) for coef in path]
    means = scores.mean(axis=0)
    best = int(np.argmax(means))
    return REG_GRID[best], float(means[best])


def _path_by_refitting(fit_one: FitFn) -> PathFn:
    def path(x: np.ndarray, t: np.ndarray, w: np.ndarray, regs: tuple[float, ...]) -> list[np.ndarray]:
        return [fit_one(x, t, w, reg)[0] for reg in regs]

    return path


def _fit_svm(x: np.ndarray, t: np.ndarray, w: np.ndarray, reg: float) -> tuple[np.ndarray, bool]:
    svc = LinearSVC(C=reg, dual=True, random_state=0, max_iter=MAX_ITER)
    # liblinear stops at MAX_ITER for large C on non-separable data, as in the authors' code (§1.2);
    # the CV picks among the resulting solutions, and `converged` records it for the final fit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svc.fit(x, t, sample_weight=w)
    return _coef_with_intercept(svc), int(np.max(svc.n_iter_)) < MAX_ITER


def _fit_logistic(x: np.ndarray, t: np.ndarray, w: np.ndarray, reg: float) -> tuple[np.ndarray, bool]:
    lr = LogisticRegression(C=reg, solver="liblinear", max_iter=MAX_ITER)
    # Same reasoning as _fit_svm: a capped solve is a usable direction, and is recorded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr.fit(x, 2 * t - 1, sample_weight=w)
    return _coef_with_intercept(lr), int(np.max(lr.n_iter_)) < MAX_ITER


def _coef_with_intercept(model: Any) -> np.ndarray:
    # Keep the intercept for CV scoring only; the CAV itself drops it (§1.2).
    return np.append(np.ravel(model.coef_), np.ravel(model.intercept_)[0])


def _fit_ridge(x: np.ndarray, t: np.ndarray, w: np.ndarray, reg: float) -> tuple[np.ndarray, bool]:
    """Weighted ridge onto 2t−1 with an unpenalised intercept, in closed form."""
    return _ridge_path(x, t, w, (reg,))[0], True


def _ridge_path(x: np.ndarray, t: np.ndarray, w: np.ndarray, regs: tuple[float, ...]) -> list[np.ndarray]:
    """Ridge solutions for every α from one eigendecomposition of the weighted, centred Gram matrix.

    Minimises Σ w_n (y_n − x_n·β − b)² + α‖β‖² (sklearn ``Ridge(fit_intercept=True)`` with
    ``sample_weight``): centre with weighted means, then β(α) = Q diag(1/(λ+α)) Qᵀ Xcᵀ W yc.
    """
    y = 2.0 * t - 1.0
    ws = w / w.sum()
    x_mean, y_mean = ws @ x, float(ws @ y)
    xcw = (x - x_mean) * w[:, None]
    lam, q = np.linalg.eigh(xcw.T @ (x - x_mean))
    qb = q.T @ (xcw.T @ (y - y_mean))
    out = []
    for reg in regs:
        coef = q @ (qb / (np.maximum(lam, 0.0) + reg))
        out.append(np.append(coef, y_mean - x_mean @ coef))
    return out


def _accuracy(coef: np.ndarray, x: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean((x @ coef[:-1] + coef[-1] > 0) == (t == 1)))


def _r2(coef: np.ndarray, x: np.ndarray, t: np.ndarray) -> float:
    y = 2.0 * t - 1.0
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - x @ coef[:-1] - coef[-1]) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


_ESTIMATORS: dict[str, tuple[FitFn, ScoreFn]] = {
    "svm": (_fit_svm, _accuracy),
    "ridge": (_fit_ridge, _r2),
    "logistic": (_fit_logistic, _accuracy),
}
_PATHS: dict[FitFn, PathFn] = {
    _fit_svm: _path_by_refitting(_fit_svm),
    _fit_ridge: _ridge_path,
    _fit_logistic: _path_by_refitting(_fit_logistic),
}
