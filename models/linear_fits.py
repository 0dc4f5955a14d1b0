"""The linear estimators behind the CAVs (method.md §1.2): each fits one regularisation value and
returns the coefficients with the intercept last. numpy and scikit-learn only, so that the worker
processes of :func:`medaudit.models.xai.cav.cv_workers` import them without torch (a worker that
imported :mod:`medaudit.models.xai` spent ~4.5 s starting)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

#: liblinear's iteration cap; 1000 is LinearSVC's default, which the authors keep (§1.2).
MAX_ITER = 1000

FitFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[np.ndarray, bool]]
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]
PathFn = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]], list[np.ndarray]]


def fold_score(
    x: np.ndarray,
    t: np.ndarray,
    w: np.ndarray,
    tr: np.ndarray,
    va: np.ndarray,
    reg: float,
    fit_one: FitFn,
    score_one: ScoreFn,
) -> float:
    """One (fold, reg) cell of the CV table of :func:`medaudit.models.xai.cav.fit_cav`, as its
    serial loop computes it."""
    return score_one(fit_one(x[tr], t[tr], w[tr], reg)[0], x[va], t[va])


def path_by_refitting(fit_one: FitFn) -> PathFn:
    def path(x: np.ndarray, t: np.ndarray, w: np.ndarray, regs: tuple[float, ...]) -> list[np.ndarray]:
        return [fit_one(x, t, w, reg)[0] for reg in regs]

    return path


def fit_svm(x: np.ndarray, t: np.ndarray, w: np.ndarray, reg: float) -> tuple[np.ndarray, bool]:
    svc = LinearSVC(C=reg, dual=True, random_state=0, max_iter=MAX_ITER)
    # liblinear stops at MAX_ITER for large C on non-separable data, as in the authors' code (§1.2);
    # the CV picks among the resulting solutions, and `converged` records it for the final fit.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svc.fit(x, t, sample_weight=w)
    return coef_with_intercept(svc), int(np.max(svc.n_iter_)) < MAX_ITER


def fit_logistic(x: np.ndarray, t: np.ndarray, w: np.ndarray, reg: float) -> tuple[np.ndarray, bool]:
    lr = LogisticRegression(C=reg, solver="liblinear", max_iter=MAX_ITER)
    # Same reasoning as fit_svm: a capped solve is a usable direction, and is recorded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        lr.fit(x, 2 * t - 1, sample_weight=w)
    return coef_with_intercept(lr), int(np.max(lr.n_iter_)) < MAX_ITER


def coef_with_intercept(model: Any) -> np.ndarray:
    # Keep the intercept for CV scoring only; the CAV itself drops it (§1.2).
    return np.append(np.ravel(model.coef_), np.ravel(model.intercept_)[0])


def fit_ridge(x: np.ndarray, t: np.ndarray, w: np.ndarray, reg: float) -> tuple[np.ndarray, bool]:
    """Weighted ridge onto 2t−1 with an unpenalised intercept, in closed form."""
    return ridge_path(x, t, w, (reg,))[0], True


def ridge_path(x: np.ndarray, t: np.ndarray, w: np.ndarray, regs: tuple[float, ...]) -> list[np.ndarray]:
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


def accuracy(coef: np.ndarray, x: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean((x @ coef[:-1] + coef[-1] > 0) == (t == 1)))


def r2(coef: np.ndarray, x: np.ndarray, t: np.ndarray) -> float:
    y = 2.0 * t - 1.0
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - x @ coef[:-1] - coef[-1]) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


ESTIMATORS: dict[str, tuple[FitFn, ScoreFn]] = {
    "svm": (fit_svm, accuracy),
    "ridge": (fit_ridge, r2),
    "logistic": (fit_logistic, accuracy),
}
#: Estimators whose CV path refits once per reg (the ones worth parallelising).
REFITTING: tuple[FitFn, ...] = (fit_svm, fit_logistic)
PATHS: dict[FitFn, PathFn] = {
    fit_svm: path_by_refitting(fit_svm),
    fit_ridge: ridge_path,
    fit_logistic: path_by_refitting(fit_logistic),
}
