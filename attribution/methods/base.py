"""The attribution-method interface: fit on the training set, score targets.

An attribution method is a small object in the manner of a scikit-learn estimator:
explicit constructor parameters, :meth:`AttributionMethod.fit` on the training set
(and whatever the method needs: embeddings, checkpoints, subset models, all in one
:class:`TrainingData`), and :meth:`AttributionMethod.score`, which returns a
:class:`ScoreBlock`: a full score matrix, targets x every training image (ascending
training ids), higher = more influential, negative where the method is signed and
finds an opposing image.

Methods restricted to the target's class (``class_restricted = True``: ESVM, l2,
cosine, random) score only their candidates; every other training image gets the
explicit score of the method's ``outside`` policy, documented on the class (by
default the lowest candidate score of that target, so that a sum over any subset is
finite and no outside image outranks a candidate). The block's ``candidates`` mask
says which entries were scored; rankings (:func:`attribution.scores.rank_block`) are
drawn from the candidates only.

Each method declares which stage fits it (``stage``), what that stage must give it
(``inputs``), and what its attributions cost (``cost``: the stages whose seconds and
the EXP paths whose bytes add up); the report's cost table reads these.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class CostSpec:
    """What a method needs to produce its attributions: manifest stages (their seconds
    add up) and paths under EXP (globs; their bytes add up)."""

    stages: tuple[str, ...]
    paths: tuple[str, ...]
    note: str = ""


@dataclass
class TrainingData:
    """The training set as a method sees it, rows in ascending id order.

    ``features``: embeddings (N, d) for embedding-based methods; ``images``: an
    :class:`attribution.data.ImageSet` for model-based ones; ``extra``: anything else a
    method's stage hands it (checkpoints, subset masks and margins, ...), documented by
    the method."""

    ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray | None = None
    images: Any = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, np.int64)
        self.labels = np.asarray(self.labels, np.int64)
        if len(self.ids) and np.any(np.diff(self.ids) <= 0):
            raise ValueError("TrainingData.ids must be strictly ascending (sort the training rows by id)")
        if len(self.labels) != len(self.ids):
            raise ValueError(f"{len(self.ids)} training ids but {len(self.labels)} labels")


@dataclass
class Targets:
    """The test images to attribute: ids, labels, and embeddings / images as the method needs."""

    ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray | None = None
    images: np.ndarray | None = None

    def __post_init__(self):
        self.ids = np.asarray(self.ids, np.int64)
        self.labels = np.asarray(self.labels, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows) -> "Targets":
        rows = np.asarray(rows, np.int64)
        return Targets(self.ids[rows], self.labels[rows],
                       None if self.features is None else self.features[rows],
                       None if self.images is None else self.images[rows])


@dataclass
class ScoreBlock:
    """Scores of a block of targets over every training image.

    values : (targets, train) float32, higher = more influential
    candidates : (targets, train) bool, the entries the method scored, or None (all)
    exact : float64 scores of the candidate entries (row by row, in train order: the
        True entries of ``candidates``), or None. Given by methods whose float32
        ``values`` are rounded from float64 (l2, cosine): rankings order by them, so
        candidates whose float32 scores tie keep the order of their exact scores (as the
        rankings always had it). In memory only: the score store keeps ``values``.
    """

    method: str
    target_ids: np.ndarray
    target_labels: np.ndarray
    train_ids: np.ndarray
    values: np.ndarray
    candidates: np.ndarray | None = None
    exact: np.ndarray | None = None

    def __post_init__(self):
        self.target_ids = np.asarray(self.target_ids, np.int64)
        self.target_labels = np.asarray(self.target_labels, np.int64)
        self.train_ids = np.asarray(self.train_ids, np.int64)
        self.values = np.asarray(self.values, np.float32)
        shape = (len(self.target_ids), len(self.train_ids))
        if self.values.shape != shape:
            raise ValueError(f"{self.method}: score block of shape {self.values.shape}, expected {shape}")
        if np.isnan(self.values).any():
            raise ValueError(f"{self.method}: a score is NaN (a solver diverged?); check the method's settings")
        if self.candidates is not None:
            self.candidates = np.asarray(self.candidates, bool)
            if self.candidates.shape != shape:
                raise ValueError(f"{self.method}: candidate mask of shape {self.candidates.shape}, expected {shape}")
        if self.exact is not None:
            self.exact = np.asarray(self.exact, np.float64).reshape(-1)
            n = int(self.candidates.sum()) if self.candidates is not None else self.values.size
            if len(self.exact) != n:
                raise ValueError(f"{self.method}: {len(self.exact)} exact scores for {n} candidate entries")

    def take(self, rows) -> "ScoreBlock":
        """The block of the targets at ``rows`` (positions, in that order)."""
        rows = np.asarray(rows, np.int64)
        exact = None
        if self.exact is not None:
            counts = self.candidates.sum(1) if self.candidates is not None else np.full(len(self.values),
                                                                                          self.values.shape[1])
            starts = np.concatenate([[0], np.cumsum(counts)])
            exact = np.concatenate([self.exact[starts[r]:starts[r + 1]] for r in rows]) if len(rows) else []
        return ScoreBlock(self.method, self.target_ids[rows], self.target_labels[rows], self.train_ids,
                          self.values[rows], None if self.candidates is None else self.candidates[rows], exact)


def fill_outside(values: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The ``"min"`` outside policy: every non-candidate entry of a row gets the row's
    lowest candidate score (0 for a row without candidates)."""
    values = np.asarray(values, np.float32)
    low = np.where(candidates, values, np.inf).min(axis=1)
    low = np.where(np.isfinite(low), low, 0.0).astype(np.float32)
    return np.where(candidates, values, low[:, None]).astype(np.float32)


class AttributionMethod(abc.ABC):
    """Base of every attribution method (register subclasses with ``register_method``)."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""            # the stage that fits and scores it ("rank", "trak", ...)
    inputs: ClassVar[tuple[str, ...]] = ()  # what TrainingData / Targets must carry: "features", "images", ...
    signed: ClassVar[bool] = False       # negative scores mean opposing images
    class_restricted: ClassVar[bool] = False  # scores only the target's class (its candidates)
    outside: ClassVar[str] = "none"      # how non-candidates are scored: "min" (see fill_outside), "none"
    cost: ClassVar[CostSpec] = CostSpec((), ())
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def fit(self, train: TrainingData) -> "AttributionMethod":
        """Learn what scoring needs from the training set; returns self."""

    @abc.abstractmethod
    def score(self, targets: Targets) -> ScoreBlock:
        """Scores of ``targets`` over every training image given to :meth:`fit`."""

    def settings(self) -> dict:
        """What the scores depend on (stored with them; a change forces recomputing)."""
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({params})"
