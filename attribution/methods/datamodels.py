"""The ``"datamodels"`` attribution method: Datamodels (Ilyas et al. 2022).

An adapter of :class:`attribution.baselines.datamodels.DatamodelRegression` to the
method interface. ``fit`` takes the subset models of the datamodels stage (which
training images each model saw, and its margin on each target) and fits one
l1-regularised linear datamodel per target; ``score`` returns the coefficients: the
estimated change of the target's margin from including each training image (signed:
negative = the image lowers the margin).

The lasso leaves most coefficients at zero. The block's ``exact`` key
(:func:`attribution.baselines.datamodels.ranking_key`) orders the ranking: non-zero
coefficients as they are, and the zeros between the positive and the negative ones by
their entry order along the regularisation path to first order at the chosen strength
(the signed residual correlation; ``zero_order="entry"``), or by train id
(``zero_order="id"``, the plain sort). The scores themselves stay the coefficients.
"""

from __future__ import annotations

import numpy as np

from attribution.methods import register_method
from attribution.methods.base import AttributionMethod, CostSpec, ScoreBlock, Targets, TrainingData


ZERO_ORDERS = ("entry", "id")


@register_method
class Datamodels(AttributionMethod):
    """One sparse linear datamodel per target, regularisation chosen on held-out models.

    Parameters
    ----------
    n_alphas, eps : the l1 path, a geometric grid from each target's ``alpha_max`` down
        to ``eps * alpha_max``.
    heldout_fraction : share of the models held out to choose each target's strength.
    patience : stop a path after this many strengths without held-out improvement
        (None: the whole path).
    seed : seeds the held-out split.
    same_class : False (native Datamodels): every training image is a candidate; True:
        only the images of the target's class are (``class_restricted``). The score
        block holds every coefficient either way; the mask restricts the ranking.
    zero_order : "entry": the coefficients the lasso leaves at zero are ranked by their
        signed first-order entry strength (the residual correlation of the refit, see
        :mod:`attribution.baselines.datamodels`); "id": by train id (ties of the sort).
    progress : a tqdm bar over targets.

    ``fit(TrainingData(ids, labels, extra={"masks": m, "margins": g, "target_ids": t}))``:
    ``m`` bool (models, n_train), column i = training id ``ids[i]``; ``g`` float32
    (models, targets), column j = target ``t[j]``. ``score(Targets(ids, labels))``: the
    coefficient rows of those targets (each must be one of ``t``).

    Attributes after ``fit``: ``coef_`` (targets, n_train) float32; ``correlation_``
    (targets, n_train) float32, the residual correlation; ``target_ids_``;
    ``summary_``: per target (in ``target_ids_`` order) ``intercept``, ``alpha`` (chosen
    strength), ``alpha_index``, ``n_tried``, ``n_nonzero``, ``heldout_mse``,
    ``heldout_mse_zero`` (the all-zero model), ``heldout_r2``; and ``fit_models``,
    ``heldout_models``, ``seconds`` of the whole fit
    (:func:`attribution.baselines.datamodels.fit_summary`).
    """

    name = "datamodels"
    stage = "datamodels"
    inputs = ("masks", "margins")
    signed = True
    outside = "none"  # non-candidates keep their own coefficients
    cost = CostSpec(("datamodels",), ("datamodels/models", "datamodels/masks.parquet", "datamodels/margins.parquet",
                                      "datamodels/regressions{variant}", "scores/datamodels", "rankings/datamodels-*.parquet"))
    description = "Datamodels: l1 linear regressions of subset models' margins on their training subsets"

    def __init__(self, n_alphas: int = 30, eps: float = 1e-3, heldout_fraction: float = 0.2,
                 patience: int | None = 5, seed: int = 0, same_class: bool = False, zero_order: str = "entry",
                 progress: bool = False):
        if zero_order not in ZERO_ORDERS:
            raise ValueError(f"datamodels: zero_order must be one of {ZERO_ORDERS}, got {zero_order!r}")
        self.n_alphas = n_alphas
        self.eps = eps
        self.heldout_fraction = heldout_fraction
        self.patience = patience
        self.seed = seed
        self.same_class = bool(same_class)
        self.class_restricted = self.same_class
        self.zero_order = zero_order
        self.progress = progress

    def regression(self):
        """The :class:`~attribution.baselines.datamodels.DatamodelRegression` of these parameters."""
        from attribution.baselines.datamodels import DatamodelRegression

        return DatamodelRegression(n_alphas=self.n_alphas, eps=self.eps, heldout_fraction=self.heldout_fraction,
                                   patience=self.patience, seed=self.seed, progress=self.progress)

    def settings(self) -> dict:
        return {"n_alphas": int(self.n_alphas), "eps": float(self.eps),
                "heldout_fraction": float(self.heldout_fraction),
                "patience": None if self.patience is None else int(self.patience), "seed": int(self.seed),
                "same_class": self.same_class, "zero_order": self.zero_order}

    def fit(self, train: TrainingData) -> "Datamodels":
        from attribution.baselines.datamodels import fit_summary

        missing = [k for k in ("masks", "margins", "target_ids") if k not in train.extra]
        if missing:
            raise ValueError(f"datamodels: fit needs TrainingData(extra={{'masks', 'margins', 'target_ids'}}); "
                             f"missing {missing}")
        masks, margins = np.asarray(train.extra["masks"]), np.asarray(train.extra["margins"])
        target_ids = np.asarray(train.extra["target_ids"], np.int64).reshape(-1)
        if masks.ndim != 2 or masks.shape[1] != len(train.ids):
            raise ValueError(f"datamodels: masks must be (models, n_train={len(train.ids)}), got {masks.shape}")
        if margins.ndim != 2 or margins.shape[1] != len(target_ids):
            raise ValueError(f"datamodels: margins must be (models, targets={len(target_ids)}), got {margins.shape}")
        summary = fit_summary(masks, margins, self.regression())
        self.coef_ = summary.pop("coef")
        self.correlation_ = summary.pop("correlation")
        self.summary_ = summary
        self.target_ids_ = target_ids
        self.train_ids_, self.train_labels_ = train.ids, train.labels
        return self

    def score(self, targets: Targets) -> ScoreBlock:
        if not hasattr(self, "coef_"):
            raise RuntimeError("datamodels: call fit(...) before score(...)")
        position = {int(t): i for i, t in enumerate(self.target_ids_)}
        unknown = [int(t) for t in targets.ids if int(t) not in position]
        if unknown:
            raise KeyError(f"datamodels: targets {unknown[:5]} have no margins in the data given to fit")
        rows = np.array([position[int(t)] for t in targets.ids], np.int64)
        candidates = None
        if self.same_class:
            candidates = targets.labels[:, None] == self.train_labels_[None, :]
        return ScoreBlock(self.name, targets.ids, targets.labels, self.train_ids_, self.coef_[rows], candidates,
                          self.order_key(self.coef_[rows], self.correlation_[rows], candidates))

    def order_key(self, coef: np.ndarray, correlation: np.ndarray, candidates: np.ndarray | None) -> np.ndarray | None:
        """The block's ``exact`` ranking key of these coefficient rows (None: by score, then
        train id): with ``zero_order="entry"``, :func:`~attribution.baselines.datamodels.ranking_key`
        of the float32 values (the stored ones, so a ranking derived again is the same)."""
        from attribution.baselines.datamodels import ranking_key

        if self.zero_order == "id":
            return None
        key = ranking_key(coef, correlation)
        return key[candidates] if candidates is not None else key.reshape(-1)
