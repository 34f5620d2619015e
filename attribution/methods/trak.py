"""The ``"trak"`` attribution method: TRAK (Park et al. 2023) through ``traker``.

An adapter of :class:`attribution.baselines.trak.TrakScorer` (the library: traker
0.3.2 and its pitfalls) to the method interface. ``fit`` featurizes the training set
for every checkpoint (projected per-example gradients of the margin, then
``Phi (Phi^T Phi + lambda I)^-1``); ``score`` returns, for each target, the TRAK score
of every training image, averaged over the checkpoints: higher = the training image
raises the target's margin more; negative = it lowers it (signed).

The trak stage (:mod:`attribution.stages.trak`) trains the checkpoints (the support
stage's full-data ensemble models) and scores the rank stage's targets in chunks
(``trak.target_chunk``: ``finalize_scores`` holds train x targets floats).

Variants the stage writes from one fit (:func:`attribution.methods.variant_name`):
``trak@m<M>`` (:meth:`Trak.score_budgets`: the scores of the first M checkpoints, a
checkpoint budget) and ``trak@same-class`` (:func:`same_class_view`: native TRAK's
scores restricted to the target's class).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from attribution.methods import register_method
from attribution.methods.base import AttributionMethod, CostSpec, ScoreBlock, Targets, TrainingData


@register_method
class Trak(AttributionMethod):
    """TRAK scores from M model checkpoints.

    Parameters
    ----------
    proj_dim : dimension of the random projection of the per-example gradients (must be
        smaller than the training-set size).
    lambda_reg : ridge term added to X^T X before inverting (traker's ``lambda_reg``).
    seed : projector seed.
    batch_size : images per featurize / score call.
    max_projector_mb : memory of one block of the CPU projection matrix.
    device : "auto" (CUDA when available), "cpu" or "cuda[:i]".
    same_class : False (native TRAK): every training image is a candidate; True: only
        the images of the target's class are (``class_restricted``). Every entry of
        the score block is a real TRAK score either way (they are computed anyway); the
        candidate mask only restricts what the ranking draws from.
    save_dir : traker's working folder (features, score mmaps): features of the same
        settings, identity and checkpoints are kept per checkpoint, others deleted by
        ``fit`` (TrakScorer.open_features); None: a temporary folder owned by this object.
    progress : tqdm bars.

    ``fit(TrainingData(ids, labels, images=x, extra={"model_fn": f, "checkpoints": [...]}))``:
    ``x`` the normalised NCHW training images (a float tensor or array,
    ``attribution.retrain.to_tensor``), ``model_fn()`` builds the untrained model the
    state dicts in ``checkpoints`` belong to. ``score(Targets(ids, labels, images=x))``:
    the targets' normalised images, likewise.

    Attributes after ``fit``: ``projector_``, ``device_``, ``featurize_seconds_``;
    ``score_seconds_`` adds up the ``score`` calls.
    """

    name = "trak"
    stage = "trak"
    inputs = ("images",)
    signed = True
    outside = "none"  # non-candidates keep their own TRAK scores
    cost = CostSpec(("trak",), ("trak/checkpoints", "trak/features", "scores/trak", "rankings/trak-*.parquet"))
    description = "TRAK (traker): projected per-example gradients of M full-data models"

    def __init__(self, proj_dim: int = 256, lambda_reg: float = 0.0, seed: int = 0, batch_size: int = 256,
                 max_projector_mb: int = 1024, device: str = "auto", same_class: bool = False,
                 save_dir: str | os.PathLike | None = None, progress: bool = False):
        self.proj_dim = proj_dim
        self.lambda_reg = lambda_reg
        self.seed = seed
        self.batch_size = batch_size
        self.max_projector_mb = max_projector_mb
        self.device = device
        self.same_class = bool(same_class)
        self.class_restricted = self.same_class
        self.save_dir = save_dir
        self.progress = progress

    def scorer(self):
        """The :class:`~attribution.baselines.trak.TrakScorer` these parameters describe
        (validates them)."""
        from attribution.baselines.trak import TrakScorer

        if self.save_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="trak-")  # removed with this object
            self.save_dir = os.path.join(self._tmp.name, "features")
        return TrakScorer(self.save_dir, proj_dim=self.proj_dim, lambda_reg=self.lambda_reg,
                          batch_size=self.batch_size, device=self.device, seed=self.seed,
                          max_projector_mb=self.max_projector_mb, progress=self.progress)

    def settings(self) -> dict:
        # batch_size and device are left out: they change how, not what, is computed
        from attribution.baselines.trak import projector_name

        projector = projector_name(self.device)
        return {"proj_dim": int(self.proj_dim), "lambda_reg": float(self.lambda_reg), "seed": int(self.seed),
                "max_projector_mb": int(self.max_projector_mb), "same_class": self.same_class,
                "projector": projector}

    def fit(self, train: TrainingData) -> "Trak":
        missing = [k for k in ("model_fn", "checkpoints") if k not in train.extra]
        if missing or train.images is None:
            raise ValueError(f"trak: fit needs TrainingData(images=normalised images, extra={{'model_fn', "
                             f"'checkpoints'}}); missing {missing + (['images'] if train.images is None else [])}")
        checkpoints = list(train.extra["checkpoints"])
        # identity: what else the stored features depend on (kept across runs when it matches)
        self.scorer_ = self.scorer().fit(train.extra["model_fn"], checkpoints, train.images, train.labels,
                                         identity=train.extra.get("identity"),
                                         featurize=train.extra.get("featurize"))
        self.train_ids_, self.train_labels_ = train.ids, train.labels
        self.projector_, self.device_ = self.scorer_.projector_, self.scorer_.device_
        self.featurize_seconds_ = self.scorer_.featurize_seconds_
        self.score_seconds_ = 0.0
        return self

    def score(self, targets: Targets) -> ScoreBlock:
        if not hasattr(self, "scorer_"):
            raise RuntimeError("trak: call fit(...) before score(...)")
        count = len(self.scorer_.checkpoints_)
        return self.score_budgets(targets, [count])[count]

    def score_budgets(self, targets: Targets, counts) -> dict[int, ScoreBlock]:
        """{m: the score block of the first m checkpoints} for each m in ``counts`` (at most
        the checkpoints given to ``fit``): the targets' gradients once, one
        ``finalize_scores`` per m (:meth:`TrakScorer.score_budgets`). Every block is named
        ``"trak"``; the stage names the variants."""
        if not hasattr(self, "scorer_"):
            raise RuntimeError("trak: call fit(...) before score(...)")
        if targets.images is None:
            raise ValueError("trak: score needs Targets(images=the targets' normalised images)")
        start = time.perf_counter()
        results = self.scorer_.score_budgets(targets.images, targets.labels, counts)  # (n_train, n_targets) each
        # the call's wall time: the budgets share the targets' gradients, so their seconds overlap
        self.score_seconds_ += time.perf_counter() - start
        candidates = None
        if self.same_class:
            candidates = targets.labels[:, None] == self.train_labels_[None, :]
        blocks = {}
        for count, result in results.items():
            blocks[count] = ScoreBlock(self.name, targets.ids, targets.labels, self.train_ids_, result.scores.T,
                                       None if candidates is None else candidates.copy())
        return blocks

    def seconds_of(self, count: int) -> dict:
        """{"featurize": s, "score": s}: what the first ``count`` checkpoints' features and
        scores took (per-checkpoint timings of the scorer), for a budget's cost."""
        return {"featurize": self.scorer_.featurize_seconds_of(count), "score": self.scorer_.score_seconds_of(count)}


def same_class_view(block: ScoreBlock, train_labels, method: str) -> ScoreBlock:
    """``block`` restricted to each target's class: candidates = the training images of
    the target's label, every other entry the row's lowest candidate score (the "min"
    outside policy, :func:`attribution.methods.fill_outside`), so that its ranking is the
    ranking of the same-class images and a sum over any subset stays finite. Derived from
    the same scores: it costs nothing beyond them."""
    from attribution.methods.base import fill_outside

    train_labels = np.asarray(train_labels, np.int64)
    if len(train_labels) != len(block.train_ids):
        raise ValueError(f"{len(train_labels)} training labels for a block over {len(block.train_ids)} training ids")
    candidates = block.target_labels[:, None] == train_labels[None, :]
    return ScoreBlock(method, block.target_ids, block.target_labels, block.train_ids,
                      fill_outside(block.values, candidates), candidates)
