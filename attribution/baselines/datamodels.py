"""Datamodels (Ilyas et al. 2022): random-subset models and one sparse linear regression
per target (plain Python, no Ray). The library the ``"datamodels"`` attribution method
(:mod:`attribution.methods.datamodels`) adapts to the method interface; the datamodels
stage (:mod:`attribution.stages.datamodels`) trains the subset models on a work queue.

1. Masks: model ``m`` trains on a random subset of exactly ``round(alpha * n_train)``
   training images (alpha = 0.5 in the reference), drawn from a generator seeded by
   (seed, model id) only, so model m's subset never depends on how many models are
   asked for or which worker trains it (:func:`subset_mask`, :func:`subset_masks`).
2. Margins: each model's margin on each target, true-class logit minus the largest
   other logit (:func:`margins_from_logits`, the same margin as
   :func:`attribution.retrain.evaluate_target`).
3. Regression: for each target t, an l1-regularised linear model
   ``margin_m(t) ~ intercept_t + sum_i coef_t[i] * mask_m[i]`` (:class:`DatamodelRegression`).
   The masks are centred (as the Datamodels paper does), the regularisation is chosen
   on an l1 path by the error on held-out models (a seeded split of the models), then
   the model is refit on every model at the chosen strength. ``coef_[t]`` are the
   attribution scores of target t: the estimated margin change from including image i.

4. Order of the zeros: a lasso at a useful strength leaves most coefficients exactly at
   zero (a median of 34 of 3,000 at 400 models), and a ranking sorted by score alone puts
   them in train-id order. The images the lasso leaves at zero are ordered by **entry
   order along the regularisation path, to first order at the chosen strength**: the
   residual correlation ``c_i = x_i^T (y - X coef) / n_models`` of the refit (centred
   masks), which the lasso's optimality conditions bound by ``|c_i| <= alpha`` for every
   zero coefficient. Relaxing the strength from ``alpha`` to ``|c_i|`` (the others held)
   is where image i would enter the path, with the sign of ``c_i``: an image closer to
   entering ranks higher among the zeros if it would enter positively, lower if
   negatively (:func:`ranking_key`). Why this rule rather than a ridge fit: it is the
   lasso's own quantity (no second model with its own strength to choose), it costs one
   matrix-vector product per target, it orders every zero (ties have probability zero),
   and for the near-orthogonal random-subset design it is the path's entry order
   (continuing the path itself to its weak end is the slow part, and images that never
   enter stay tied). ``residual_correlation_`` holds it.

The coefficients are the method's scores (LDS and every metric of the full scores use
them as they are); rankings are derived from them as for every method
(:func:`attribution.scores.rank_block`), with :func:`ranking_key` as the order: the
non-zero coefficients keep their values and order, and the zeros sit between the
positive and the negative ones in the order above (train id ascending only breaks
exact ties).
"""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

import numpy as np

MASK_STREAM = 0xD47A  # a stream of its own: the masks never share draws with torch seeds


# ----------------------------------------------------------------------------- masks


def _subset_size(n_train: int, alpha: float) -> int:
    if not isinstance(n_train, (int, np.integer)) or n_train < 2:
        raise ValueError(f"n_train must be an integer >= 2, got {n_train!r}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha (the fraction of the training set each model sees) must be in (0, 1), got {alpha!r}")
    size = int(round(float(alpha) * int(n_train)))
    if not 1 <= size <= n_train - 1:
        raise ValueError(f"alpha={alpha} of n_train={n_train} gives subsets of {size} images; choose alpha so "
                         "that each subset keeps at least one image and leaves out at least one")
    return size


def subset_mask(n_train: int, alpha: float, seed: int, model_id: int) -> np.ndarray:
    """bool (n_train,): which training positions model ``model_id`` trains on.

    Exactly ``round(alpha * n_train)`` positions, drawn by a generator seeded with
    (seed, model_id) only: the same model id always gets the same subset.
    """
    size = _subset_size(n_train, alpha)
    if int(model_id) < 0:
        raise ValueError(f"model_id must be >= 0, got {model_id}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, MASK_STREAM, int(model_id)])
    mask = np.zeros(int(n_train), dtype=bool)
    mask[rng.choice(int(n_train), size=size, replace=False)] = True
    return mask


def subset_masks(n_train: int, n_models: int, alpha: float = 0.5, seed: int = 0, first_model: int = 0) -> np.ndarray:
    """bool (n_models, n_train): the masks of model ids first_model .. first_model + n_models - 1.

    Row ``i`` is :func:`subset_mask` of model id ``first_model + i``, so asking for more
    models extends the set without changing the masks already drawn.
    """
    if not isinstance(n_models, (int, np.integer)) or n_models < 0:
        raise ValueError(f"n_models must be an integer >= 0, got {n_models!r}")
    _subset_size(n_train, alpha)
    if n_models == 0:
        return np.zeros((0, int(n_train)), dtype=bool)
    return np.stack([subset_mask(n_train, alpha, seed, first_model + i) for i in range(int(n_models))])


def margins_from_logits(logits: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """(n,) true-class logit minus the largest other logit, for logits (n, C)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits must be (n, classes) with n = len(labels) = {len(labels)}, got {logits.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must be classes in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    rows = np.arange(len(labels))
    true = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return true - others.max(axis=1)


# ----------------------------------------------------------------------------- regression


def heldout_split(n_models: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, heldout) model indices: a seeded random split, both sorted."""
    if not 0.0 < float(heldout_fraction) < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    n_held = int(round(float(heldout_fraction) * n_models))
    if n_held < 2 or n_models - n_held < 2:
        raise ValueError(f"{n_models} models with heldout_fraction={heldout_fraction} leave {n_held} held-out and "
                         f"{n_models - n_held} fitting models; need at least 2 of each (train more models)")
    order = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x5B17]).permutation(n_models)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


class DatamodelRegression:
    """One l1-regularised linear datamodel per target, regularisation chosen on held-out models.

    Parameters
    ----------
    alphas : explicit l1 strengths (sklearn's Lasso scale: the loss is
        ``||y - Xw||^2 / (2 n) + alpha ||w||_1``), used for every target; None: a
        geometric grid per target from its ``alpha_max`` (the smallest strength that
        zeroes every coefficient) down to ``eps * alpha_max``.
    n_alphas, eps : the size and depth of that grid.
    heldout_fraction : share of the models held out to choose the strength.
    patience : stop the path once the held-out error has not improved for this many
        strengths (None: the whole path). The weak end is the slow part of a path.
    seed : seeds the held-out split.
    max_iter, tol : coordinate-descent limits (sklearn's).
    progress : a tqdm bar over targets.

    Attributes after :meth:`fit`
    ----------------------------
    coef_ : (n_targets, n_train) coefficients = attribution scores.
    intercept_ : (n_targets,) margin predicted for the empty training set.
    alpha_ : (n_targets,) chosen strength; ``alpha_index_`` its position in the path.
    alphas_ : (n_targets, n_alphas) the path (descending).
    heldout_mse_path_ : (n_targets, n_alphas) mean squared error on the held-out models
        (NaN past the point where ``patience`` stopped the path).
    fit_models_, heldout_models_ : model indices of the split.
    n_nonzero_ : (n_targets,) non-zero coefficients of the refit.
    residual_correlation_ : (n_targets, n_train) ``x_i^T (y - X coef) / n_models`` of the
        refit (centred masks and margins): for a zero coefficient, the strength at which
        image i would enter the path to first order (signed); the order of the zeros
        (:func:`ranking_key`).
    """

    def __init__(self, alphas: Sequence[float] | None = None, n_alphas: int = 30, eps: float = 1e-3,
                 heldout_fraction: float = 0.2, patience: int | None = 5, seed: int = 0, max_iter: int = 2000,
                 tol: float = 1e-4, progress: bool = False):
        self.alphas = alphas
        self.n_alphas = n_alphas
        self.eps = eps
        self.heldout_fraction = heldout_fraction
        self.patience = patience
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.progress = progress

    def _check_params(self):
        if self.alphas is not None:
            grid = np.asarray(self.alphas, dtype=np.float64).reshape(-1)
            if len(grid) < 1 or not np.all(grid > 0) or not np.all(np.isfinite(grid)):
                raise ValueError(f"alphas must be positive finite numbers, got {self.alphas!r}")
        elif int(self.n_alphas) < 2:
            raise ValueError(f"n_alphas must be at least 2, got {self.n_alphas}")
        if self.patience is not None and int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1 or None (the whole path), got {self.patience}")
        if not 0.0 < float(self.eps) < 1.0:
            raise ValueError(f"eps (smallest / largest alpha of the path) must be in (0, 1), got {self.eps}")

    @staticmethod
    def _check_data(masks, margins) -> tuple[np.ndarray, np.ndarray]:
        masks = np.asarray(masks)
        margins = np.asarray(margins, dtype=np.float64)
        if masks.ndim != 2:
            raise ValueError(f"masks must be 2-D (n_models, n_train), got shape {masks.shape}")
        if margins.ndim == 1:
            margins = margins[:, None]
        if margins.ndim != 2:
            raise ValueError(f"margins must be (n_models,) or (n_models, n_targets), got shape {margins.shape}")
        if masks.shape[0] != margins.shape[0]:
            raise ValueError(f"masks have {masks.shape[0]} models (rows) but margins have {margins.shape[0]}: "
                             "row m of both must describe the same model")
        if not np.all(np.isfinite(margins)):
            bad = np.argwhere(~np.isfinite(margins))[:5].tolist()
            raise ValueError(f"margins hold NaN/inf at (model, target) {bad}: a training diverged?")
        if masks.dtype != bool and not np.isin(np.unique(masks), (0, 1)).all():
            raise ValueError("masks must be boolean or 0/1 (image in the model's training subset or not)")
        return masks.astype(np.float64), margins

    def _grid(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if self.alphas is not None:
            return np.sort(np.asarray(self.alphas, dtype=np.float64).reshape(-1))[::-1]
        alpha_max = float(np.abs(x.T @ y).max()) / len(y)
        if alpha_max <= 0:  # constant margins (or masks): every strength gives the zero model
            alpha_max = 1.0
        return np.geomspace(alpha_max, alpha_max * float(self.eps), int(self.n_alphas))

    def _lasso(self, x, y, alpha, coef_init):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import lasso_path

        with warnings.catch_warnings():
            # the weakest strengths may stop at max_iter; they are rarely chosen
            warnings.simplefilter("ignore", ConvergenceWarning)
            _, coefs, _ = lasso_path(x, y, alphas=[alpha], precompute=False, max_iter=int(self.max_iter),
                                     tol=float(self.tol), coef_init=coef_init, check_input=False)
        return coefs[:, 0]

    def fit(self, masks, margins) -> "DatamodelRegression":
        from tqdm.auto import tqdm

        self._check_params()
        x_all, y_all = self._check_data(masks, margins)
        n_models, n_train = x_all.shape
        n_targets = y_all.shape[1]
        fit_idx, held_idx = heldout_split(n_models, self.heldout_fraction, self.seed)
        # centred masks (Datamodels): the intercept then is the mean margin, and the
        # coefficients do not have to absorb it; Fortran order is what coordinate descent reads
        x_fit = x_all[fit_idx]
        mean_fit = x_fit.mean(axis=0)
        xc_fit = np.asfortranarray(x_fit - mean_fit)
        xc_held = x_all[held_idx] - mean_fit
        mean_all = x_all.mean(axis=0)
        xc_all = np.asfortranarray(x_all - mean_all)

        n_grid = len(self.alphas) if self.alphas is not None else int(self.n_alphas)
        self.alphas_ = np.zeros((n_targets, n_grid))
        self.heldout_mse_path_ = np.full((n_targets, n_grid), np.nan)
        self.alpha_index_ = np.zeros(n_targets, dtype=np.int64)
        self.alpha_ = np.zeros(n_targets)
        self.coef_ = np.zeros((n_targets, n_train))
        self.intercept_ = np.zeros(n_targets)
        self.residual_correlation_ = np.zeros((n_targets, n_train))
        for t in tqdm(range(n_targets), desc="datamodel regressions", unit="target", disable=not self.progress,
                      file=sys.stderr, dynamic_ncols=True):
            y_fit = y_all[fit_idx, t] - y_all[fit_idx, t].mean()
            y_held = y_all[held_idx, t] - y_all[fit_idx, t].mean()
            grid = self._grid(xc_fit, y_fit)
            # the l1 path from the strongest strength down, each fit warm-started from the
            # previous one; with patience, stop once the held-out error has not improved for
            # that many strengths (the weak end of the path costs the most and is rarely chosen)
            coef, best, best_coef = np.zeros(n_train), 0, np.zeros(n_train)
            for j, alpha in enumerate(grid):
                coef = self._lasso(xc_fit, y_fit, alpha, coef)
                self.heldout_mse_path_[t, j] = float(((xc_held @ coef - y_held) ** 2).mean())
                if self.heldout_mse_path_[t, j] < self.heldout_mse_path_[t, best]:  # ties: the stronger
                    best, best_coef = j, coef.copy()
                elif self.patience is not None and j - best >= int(self.patience):
                    break
            # refit on every model at the chosen strength, warm-started from the split's fit
            y = y_all[:, t]
            coef = self._lasso(xc_all, y - y.mean(), grid[best], best_coef)
            self.alphas_[t] = grid
            self.alpha_index_[t], self.alpha_[t] = best, grid[best]
            self.coef_[t] = coef
            self.intercept_[t] = y.mean() - mean_all @ coef
            # the smooth part's negative gradient: |c_i| <= alpha where coef_i = 0 (KKT)
            self.residual_correlation_[t] = xc_all.T @ (y - y.mean() - xc_all @ coef) / n_models
        self.fit_models_, self.heldout_models_ = fit_idx, held_idx
        self.n_nonzero_ = (self.coef_ != 0).sum(axis=1)
        self.n_features_in_ = n_train
        return self

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise RuntimeError("this DatamodelRegression is not fitted yet: call fit(masks, margins) first")

    def predict(self, masks) -> np.ndarray:
        """(n_models, n_targets) predicted margins of models trained on ``masks``."""
        self._check_fitted()
        masks = np.asarray(masks, dtype=np.float64)
        if masks.ndim != 2 or masks.shape[1] != self.n_features_in_:
            raise ValueError(f"masks must be (n_models, {self.n_features_in_}), got {masks.shape}")
        return masks @ self.coef_.T + self.intercept_

    def score(self, masks, margins) -> float:
        """Mean over targets of the coefficient of determination R^2 (sklearn's convention)."""
        _, margins = self._check_data(masks, margins)
        predicted = self.predict(masks)
        residual = ((margins - predicted) ** 2).sum(axis=0)
        total = ((margins - margins.mean(axis=0)) ** 2).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1.0), np.nan)
        return float(np.nanmean(r2))


def ranking_key(coef: np.ndarray, correlation: np.ndarray) -> np.ndarray:
    """float64 (n_targets, n_train): the order of the training images per target, higher first.

    A non-zero coefficient is its own key (the lasso's order and values are kept); a zero
    coefficient gets ``eps * c_i / max|c|`` (``c`` the residual correlation of
    :attr:`DatamodelRegression.residual_correlation_`, the max over that row's zeros),
    with ``eps`` half the row's smallest non-zero ``|coef|`` (1 for an all-zero row): the
    zeros then sit strictly between the positive and the negative coefficients, ordered
    by their signed first-order entry strength. The key orders a ranking only; the
    scores stay the coefficients. Pass the float32 values that are stored (scores and
    correlations) so that a ranking derived again from the files is the same.
    """
    coef = np.atleast_2d(np.asarray(coef, np.float64))
    correlation = np.atleast_2d(np.asarray(correlation, np.float64))
    if coef.shape != correlation.shape:
        raise ValueError(f"coef {coef.shape} and correlation {correlation.shape} must have the same shape "
                         "(targets, n_train)")
    zero = coef == 0
    magnitude = np.where(zero, np.inf, np.abs(coef)).min(axis=1)
    eps = np.where(np.isfinite(magnitude), 0.5 * magnitude, 1.0)
    scale = np.where(zero, np.abs(correlation), 0.0).max(axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    return np.where(zero, correlation * (eps / scale)[:, None], coef)


def fit_summary(masks: np.ndarray, margins: np.ndarray, regression: DatamodelRegression) -> dict:
    """Fit ``regression`` and return plain arrays: coef and correlation (the residual
    correlation, the order of the zeros; float32), intercept, alpha,
    alpha_index, n_tried (path length reached), n_nonzero, heldout_mse (at the chosen
    strength), heldout_mse_zero (the all-zero model: the strongest strength),
    heldout_r2 (1 - heldout_mse / variance of the held-out margins), fit_models,
    heldout_models, seconds. One unit of distributed work (a class of targets)."""
    import time

    start = time.perf_counter()
    model = regression.fit(masks, margins)
    rows = np.arange(len(model.alpha_))
    best = model.heldout_mse_path_[rows, model.alpha_index_]
    _, margins = model._check_data(masks, margins)
    variance = margins[model.heldout_models_].var(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(variance > 0, 1 - best / np.where(variance > 0, variance, 1.0), np.nan)
    return {"coef": model.coef_.astype(np.float32),
            "correlation": model.residual_correlation_.astype(np.float32),
            "intercept": model.intercept_, "alpha": model.alpha_,
            "alpha_index": model.alpha_index_, "n_tried": (~np.isnan(model.heldout_mse_path_)).sum(axis=1),
            "n_nonzero": model.n_nonzero_, "heldout_mse": best, "heldout_mse_zero": model.heldout_mse_path_[:, 0],
            "heldout_r2": r2, "fit_models": len(model.fit_models_), "heldout_models": len(model.heldout_models_),
            "seconds": time.perf_counter() - start}
