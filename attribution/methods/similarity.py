"""The embedding-similarity methods of the rank stage: esvm, l2, cosine, random.

Each scores a target's *candidates* among the training images, from the embeddings
alone (``inputs = ("features",)``):

    esvm    the Exemplar-SVM decision value (the target the only positive, its candidates
            the negatives; see attribution.esvm), signed: negative = the SVM puts the
            image on the far side from the target
    l2      the NEGATIVE Euclidean distance (so nearer ranks higher; every score <= 0)
    cosine  the cosine similarity (a zero vector has similarity 0 with everything)
    random  the uniform [0, 1) draw that orders a random permutation of the candidates:
            the floor every method must beat, drawn from
            ``numpy.random.default_rng([seed, target_id])`` so it depends only on the seed
            and the target, never on how targets are grouped or which worker ran

``esvm`` with ``negative_influence=True`` is the variant ``"esvm@negative"`` (the rank
stage's ``esvm_negative``): same-class candidates keep esvm's scores, the other classes
are scored NEGATIVELY by their likeness to the target (see :class:`ESVM`), an
interpretation of the heuristic for ESVM's negative influence in Singla et al. 2023
(arXiv 2311.03386, appendix): training images of other classes that look like the
target push its prediction away from its class.

Candidates (:class:`attribution.candidates.CandidateIndex`, FAISS): the training images
of the target's class (``same_class=True``, the reference setting; ``class_restricted``
follows it), optionally only the ``max_candidates`` nearest of them (under the method's
own metric for l2 / cosine, under ``candidate_metric`` for esvm / random), or every
class (``same_class=False``, an ablation).

:meth:`~SimilarityMethod.score` returns a full :class:`ScoreBlock` (targets x every
training id, ascending) with the candidate mask; every other training image gets the
target's lowest candidate score (``outside = "min"``,
:func:`attribution.methods.fill_outside`). Rankings drawn from it
(:func:`attribution.scores.rank_block`) sort the candidates by (score descending, train
id ascending).

The l2 / cosine scores are the index's exact float64 re-scores of a FAISS search over
every candidate (k = the candidate count), rounded to float32: the same values the
k-NN rankings always had. Targets that share a candidate set (one class, whole class)
are solved together by the ESVM solver (batched solvers fit many ESVMs against one
negative matrix at once).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from attribution.methods import register_method
from attribution.methods.base import AttributionMethod, CostSpec, ScoreBlock, Targets, TrainingData, fill_outside

DEVICES = ("cpu", "cuda", "auto")
CANDIDATE_METRICS = ("l2", "cosine")
RANK_COST_NOTE = "the rank stage's time covers every similarity method it computed"

# device -> (CandidateIndex device, solver device): a GPU pool's FAISS uses a GPU when
# the FAISS build can ("auto"), the batched solver the pool's CUDA device
_INDEX_DEVICE = {"cpu": "cpu", "cuda": "auto", "auto": "auto"}
_SOLVER_DEVICE = {"cpu": "cpu", "cuda": "cuda", "auto": None}


def _embedding_cost(name: str) -> CostSpec:
    return CostSpec(("pretrain", "embed", "rank"),
                    ("checkpoints/moco.pt", "embeddings", f"scores/{name}", f"rankings/{name}-*.parquet"),
                    RANK_COST_NOTE)


class SimilarityMethod(AttributionMethod):
    """Base of the rank stage's methods: a FAISS :class:`CandidateIndex` over the training
    embeddings (built by :meth:`fit`), candidates per target, and a full score block.

    Parameters
    ----------
    max_candidates : None or 0 = every candidate of the class (reference); M = only the
        M nearest.
    same_class : False takes candidates from every class (ablation). ``class_restricted``
        (True on the class, the default) follows this parameter on the instance.
    device : "cpu", "cuda" (a GPU pool: FAISS on GPU when its build can) or "auto".

    Subclasses implement :meth:`_score_candidates`.
    """

    stage = "rank"
    inputs = ("features",)
    class_restricted = True
    outside = "min"
    index_metric: ClassVar[str] = "l2"  # the metric choosing the M nearest candidates

    def __init__(self, max_candidates: int | None = None, same_class: bool = True, device: str = "cpu"):
        if max_candidates is not None and (isinstance(max_candidates, bool) or not isinstance(max_candidates, int)
                                           or max_candidates < 0):
            raise ValueError(f"{self.name}: max_candidates must be None or 0 (the whole class) or a positive "
                             f"integer, got {max_candidates!r}")
        if device not in DEVICES:
            raise ValueError(f"{self.name}: device must be one of {list(DEVICES)}, got {device!r}")
        self.max_candidates = max_candidates
        self.same_class = bool(same_class)
        self.class_restricted = self.same_class
        self.device = device

    @property
    def candidate_limit(self) -> int | None:
        """None (the whole class) or the number of nearest candidates kept."""
        return int(self.max_candidates) if self.max_candidates else None

    def settings(self) -> dict:
        return {"max_candidates": self.max_candidates or 0, "same_class": self.same_class}

    # ------------------------------------------------------------------ fit / score
    def fit(self, train: TrainingData) -> "SimilarityMethod":
        from attribution.candidates import CandidateIndex

        if train.features is None:
            raise ValueError(f"{self.name} needs the training embeddings: TrainingData(ids, labels, features)")
        self.index_ = CandidateIndex(self._metric(), _INDEX_DEVICE[self.device]).fit(
            train.ids, train.labels, train.features)
        return self

    def score(self, targets: Targets) -> ScoreBlock:
        if not hasattr(self, "index_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(TrainingData(...)) first")
        if targets.features is None:
            raise ValueError(f"{self.name} needs the target embeddings: Targets(ids, labels, features)")
        features = np.asarray(targets.features, dtype=np.float32)
        if not (len(targets.ids) == len(targets.labels) == len(features)):
            raise ValueError(f"{len(targets.ids)} target ids, {len(targets.labels)} labels, "
                             f"{len(features)} feature rows: they must be the same length")
        train_ids = self.index_.ids_
        values = np.zeros((len(targets), len(train_ids)), np.float32)
        candidates = np.zeros(values.shape, bool)
        exact = None
        if len(targets):
            exact = self._score_candidates(targets.ids, targets.labels, features, values, candidates)
        return ScoreBlock(self.name, targets.ids, targets.labels, train_ids, fill_outside(values, candidates),
                          candidates, exact)

    def _score_candidates(self, target_ids, target_labels, features, values, candidates) -> np.ndarray | None:
        """Write each target's candidate scores into ``values`` and mark them in
        ``candidates``; return the block's ``exact`` scores when ``values`` are rounded."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _metric(self) -> str:
        return self.index_metric

    def _columns(self, ids: np.ndarray) -> np.ndarray:
        """Columns of the score block (positions among the ascending training ids) of ``ids``."""
        return np.searchsorted(self.index_.ids_, ids)

    def _candidate_groups(self, target_labels, features):
        """[(rows, candidate ids)]: targets that share a candidate set (one class, the
        whole class) form one group; with ``max_candidates`` every target is its own."""
        limit = self.candidate_limit
        sets = self.index_.candidates(features, target_labels, max_candidates=limit, same_class=self.same_class)
        groups: dict = {}
        for row in range(len(sets)):
            key = (int(target_labels[row]) if self.same_class else None) if limit is None else row
            groups.setdefault(key, []).append(row)
        return [(rows, sets[rows[0]]) for rows in groups.values()]


@register_method
class ESVM(SimilarityMethod):
    """Exemplar SVM: score = the decision value of the ESVM fitted with the target as
    the only positive and its candidates as the negatives (higher = more like the
    target; negative = on the far side of the SVM's boundary).

    Parameters
    ----------
    solver : a name of the ESVM solver registry (:data:`attribution.esvm.SOLVER_CLASSES`):
        "sklearn" (the reference LinearSVC), "batched" (same objective, fast), "thundersvm".
    solver_params : the solver's keyword arguments (C, tol, ...); a solver that takes a
        ``device`` gets this method's device unless the params name one.
    max_candidates, same_class, device : see :class:`SimilarityMethod`.
    candidate_metric : "l2" or "cosine": the metric choosing the ``max_candidates`` nearest.
    negative_influence : False: every non-candidate gets the row's lowest candidate score
        (``outside = "min"``). True (the ``"esvm@negative"`` variant; needs
        ``same_class``): the candidates keep the same scores, and the training images of
        the OTHER classes that look like the target are scored negatively: per target, its
        ``negative_neighbours`` nearest other-class images (l2 on the embeddings) are the
        negatives of a second ESVM (the target the only positive), and one with decision
        value d scores ``floor - spread * (d - d_min) / (d_max - d_min)``, where ``floor =
        min(0, lowest candidate score)`` and ``spread`` is the range of the target's
        candidate scores (d_min, d_max over those neighbours). Every other other-class
        image scores ``floor``. So the least target-like scores sit at esvm's own outside
        score (or 0), the most target-like one a whole candidate range below it: every
        other-class score is <= 0 and below every candidate, with the same-class scores'
        spread. The ranking (of the candidates) is esvm's. Same-class non-candidates
        (``max_candidates``) keep the "min" fill. An interpretation of the paper's
        heuristic (docs/baselines.md), not its code.
    negative_neighbours : None (the number of the target's candidates: the class size) or
        the number of nearest other-class images the second ESVM scores. (Fitting it
        against every other class costs ~25x esvm on the quickstart; the nearest ones are
        the images the heuristic is about.)
    """

    name = "esvm"
    signed = True
    cost = _embedding_cost("esvm")
    description = "Exemplar-SVM decision values on self-supervised embeddings (the reference method)"

    def __init__(self, solver: str = "batched", solver_params: dict | None = None,
                 max_candidates: int | None = None, candidate_metric: str = "l2", same_class: bool = True,
                 device: str = "cpu", negative_influence: bool = False, negative_neighbours: int | None = None):
        from attribution.esvm import available_solvers

        super().__init__(max_candidates, same_class, device)
        if negative_influence and not same_class:
            raise ValueError("esvm: negative_influence scores the OTHER classes negatively, but same_class=False "
                             "makes every class a candidate; use same_class=True or negative_influence=False")
        if negative_neighbours is not None and (isinstance(negative_neighbours, bool) or
                                                not isinstance(negative_neighbours, int) or negative_neighbours < 1):
            raise ValueError(f"esvm: negative_neighbours must be None (the class size) or a positive integer, got "
                             f"{negative_neighbours!r}")
        self.negative_influence = bool(negative_influence)
        self.negative_neighbours = negative_neighbours
        if self.negative_influence:
            self.outside = "negative"
        if solver not in available_solvers():
            raise ValueError(f"esvm: unknown ESVM solver {solver!r}; choose one of {available_solvers()}")
        if solver_params is not None and not isinstance(solver_params, dict):
            raise ValueError(f"esvm: solver_params must be a dict of the solver's keyword arguments, got "
                             f"{solver_params!r}")
        if candidate_metric not in CANDIDATE_METRICS:
            raise ValueError(f"esvm: candidate_metric must be one of {list(CANDIDATE_METRICS)}, got "
                             f"{candidate_metric!r}")
        self.solver = solver
        self.solver_params = dict(solver_params or {})
        self.candidate_metric = candidate_metric

    def settings(self) -> dict:
        extra = ({"negative_influence": True, "negative_neighbours": self.negative_neighbours or 0}
                 if self.negative_influence else {})
        return {"solver": self.solver, "solver_params": dict(self.solver_params),
                "candidate_metric": self.candidate_metric, **super().settings(), **extra}

    def _metric(self) -> str:
        return self.candidate_metric

    def make_solver(self):
        """The configured solver (``device`` filled in for solvers that take one)."""
        import inspect

        from attribution.esvm import solver_class

        cls = solver_class(self.solver)
        params = dict(self.solver_params)
        device = _SOLVER_DEVICE[self.device]
        if "device" in inspect.signature(cls).parameters and device is not None:
            params.setdefault("device", device)
        return cls(**params)

    def fit(self, train: TrainingData) -> "ESVM":
        self.solver_ = self.make_solver()
        return super().fit(train)

    def _score_candidates(self, target_ids, target_labels, features, values, candidates) -> None:
        for rows, cand in self._candidate_groups(target_labels, features):
            got = self._decision_values(features[rows], cand)
            cells = np.ix_(rows, self._columns(cand))
            values[cells] = got
            candidates[cells] = True

    def _decision_values(self, positives: np.ndarray, negative_ids: np.ndarray) -> np.ndarray:
        """(len(positives), len(negative_ids)): one ESVM per positive against these negatives."""
        got = np.asarray(self.solver_.decision_values(positives, self.index_.features_of(negative_ids)))
        if got.shape != (len(positives), len(negative_ids)):
            raise ValueError(f"solver returned shape {got.shape}, expected {(len(positives), len(negative_ids))}")
        return got

    def score(self, targets: Targets) -> ScoreBlock:
        block = super().score(targets)
        if not self.negative_influence or not len(targets):
            return block
        features = np.asarray(targets.features, dtype=np.float32)
        index = self.index_
        values = block.values.copy()
        for row in range(len(targets)):
            candidate_scores = block.values[row][block.candidates[row]]
            others = np.flatnonzero(index.labels_ != targets.labels[row])  # positions = block columns
            if not len(others):
                continue
            k = min(len(others), self.negative_neighbours or len(candidate_scores) or len(others))
            distance = ((index.features_[others].astype(np.float64) - features[row]) ** 2).sum(axis=1)
            near = others[np.lexsort((index.ids_[others], distance))[:k]]  # ties by id: deterministic
            likeness = self._decision_values(features[row:row + 1], index.ids_[near])[0]
            floor = negative_scores(candidate_scores, likeness[:0])  # the neutral score (empty likeness)
            values[row, others] = floor
            values[row, near] = negative_scores(candidate_scores, likeness)
        return ScoreBlock(block.method, block.target_ids, block.target_labels, block.train_ids, values,
                          block.candidates, block.exact)


def negative_scores(candidate_scores: np.ndarray, likeness: np.ndarray) -> np.ndarray | float:
    """The other-class scores of ``"esvm@negative"`` for one target (see :class:`ESVM`):
    ``floor - spread * (d - d.min()) / (d.max() - d.min())`` for the decision values ``d``
    of the target's ESVM against its nearest other-class images, ``floor = min(0, lowest
    candidate score)``, ``spread`` the range of the candidate scores (1 when they are all
    equal). An empty ``likeness``: the neutral score ``floor`` itself (a float)."""
    candidate_scores = np.asarray(candidate_scores, np.float64)
    d = np.asarray(likeness, np.float64)
    floor = min(0.0, float(candidate_scores.min())) if len(candidate_scores) else 0.0
    if not len(d):
        return floor
    spread = float(np.ptp(candidate_scores)) if len(candidate_scores) else 1.0
    spread = spread if spread > 0 else 1.0
    width = float(np.ptp(d))
    relative = (d - d.min()) / width if width > 0 else np.zeros_like(d)
    return (floor - spread * relative).astype(np.float32)


class NearestNeighbours(SimilarityMethod):
    """k-NN similarity under ``index_metric``: the exact scores of a FAISS search over
    every candidate (see the module docstring). The float64 scores go into the block's
    ``exact``, so rankings keep ordering float32 ties by the exact scores."""

    def _score_candidates(self, target_ids, target_labels, features, values, candidates) -> np.ndarray:
        index, limit = self.index_, self.candidate_limit
        sizes = [index.class_size(c) for c in np.unique(target_labels)] if self.same_class else [len(index.ids_)]
        k = max(1, max(sizes))
        if limit is not None:
            k = min(k, limit)
        ids, scores = index.search(features, target_labels, k, same_class=self.same_class, max_candidates=limit)
        exact = []
        for row in range(len(ids)):
            valid = ids[row] >= 0
            columns = self._columns(ids[row][valid])
            values[row, columns] = scores[row][valid]  # float64 -> float32, as the rankings always stored them
            candidates[row, columns] = True
            exact.append(scores[row][valid][np.argsort(columns)])  # in train order, as the mask's entries
        return np.concatenate(exact)


@register_method
class L2(NearestNeighbours):
    """score = the NEGATIVE Euclidean distance between the embeddings (nearer ranks
    higher; every score <= 0, so ``signed`` is False: the sign carries no meaning).

    Parameters: max_candidates, same_class, device (see :class:`SimilarityMethod`)."""

    name = "l2"
    index_metric = "l2"
    cost = _embedding_cost("l2")
    description = "nearest neighbours by Euclidean distance of the embeddings"


@register_method
class Cosine(NearestNeighbours):
    """score = the cosine similarity of the embeddings (higher = more similar).

    Parameters: max_candidates, same_class, device (see :class:`SimilarityMethod`)."""

    name = "cosine"
    index_metric = "cosine"
    cost = _embedding_cost("cosine")
    description = "nearest neighbours by cosine similarity of the embeddings"


@register_method
class Random(SimilarityMethod):
    """score = a uniform [0, 1) draw per candidate from
    ``numpy.random.default_rng([seed, target_id])`` (over the candidates in id order):
    a random permutation, the floor every method must beat.

    Parameters
    ----------
    seed : combined with each target id.
    max_candidates, same_class, device : see :class:`SimilarityMethod`.
    candidate_metric : "l2" or "cosine": the metric choosing the ``max_candidates`` nearest.
    """

    name = "random"
    cost = CostSpec(("rank",), ("scores/random", "rankings/random-*.parquet"), RANK_COST_NOTE)
    description = "a seeded random permutation of the candidates (the floor)"

    def __init__(self, seed: int = 0, max_candidates: int | None = None, candidate_metric: str = "l2",
                 same_class: bool = True, device: str = "cpu"):
        super().__init__(max_candidates, same_class, device)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"random: seed must be an integer, got {seed!r}")
        if candidate_metric not in CANDIDATE_METRICS:
            raise ValueError(f"random: candidate_metric must be one of {list(CANDIDATE_METRICS)}, got "
                             f"{candidate_metric!r}")
        self.seed = int(seed)
        self.candidate_metric = candidate_metric

    def settings(self) -> dict:
        return {"seed": self.seed, "candidate_metric": self.candidate_metric, **super().settings()}

    def _metric(self) -> str:
        return self.candidate_metric

    def _score_candidates(self, target_ids, target_labels, features, values, candidates) -> None:
        from attribution.ranking import random_scores

        for rows, cand in self._candidate_groups(target_labels, features):
            columns = self._columns(cand)
            for row in rows:
                values[row, columns] = random_scores(self.seed, target_ids[row], len(cand))
                candidates[row, columns] = True
