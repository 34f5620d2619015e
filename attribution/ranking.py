"""Rankings of training items for target test images (plain Python, no Ray).

One ranking table has one row per (target, method, rank)::

    target_id  int64    id of the target test image
    method     string   "esvm", "l2", "cosine" or "random"
    rank       int32    0 = most influential, then 1, 2, ...
    train_id   int64    id of the ranked training image
    score      float32  higher = more influential; per method:
                          esvm    the Exemplar-SVM decision value
                          l2      the NEGATIVE Euclidean distance (so nearer ranks higher)
                          cosine  the cosine similarity
                          random  the uniform [0, 1) draw that ordered the permutation

Every method sorts by (score descending, train_id ascending): ties are broken by id,
so a ranking never depends on the order candidates were stored in.

Candidates (see :mod:`attribution.candidates`): the training items of the target's
class (the reference "same-class" setting), optionally only the ``max_candidates``
nearest of them, or all classes (``same_class=False``, an ablation).

top_k larger than the candidate set (e.g. top_k=1280 with a 500-image class):
``on_short="keep"`` (default) ranks the whole candidate set, so such a target has
fewer than top_k rows (the rank stage records those classes in the manifest);
``on_short="error"`` raises instead.

The random ranking is the floor every method must beat: a permutation of the
candidates drawn from ``numpy.random.default_rng([seed, target_id])``, so it depends
only on the seed and the target, never on how targets are grouped or which worker ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from attribution.candidates import CandidateIndex

METHODS = ("esvm", "l2", "cosine", "random")
# Rankings written by the baseline stages (attribution/baselines), same schema and files.
BASELINE_METHODS = ("trak", "datamodels")
SHORT_POLICIES = ("keep", "error")
RANKING_SCHEMA = pa.schema([
    pa.field("target_id", pa.int64()),
    pa.field("method", pa.string()),
    pa.field("rank", pa.int32()),
    pa.field("train_id", pa.int64()),
    pa.field("score", pa.float32()),
])
REFERENCE_TOP_K = 1280


def check_method(method: str, baselines: bool = True) -> str:
    """``method`` if known: the rank stage's METHODS, and with ``baselines`` the
    methods whose rankings the baseline stages write."""
    known = METHODS + BASELINE_METHODS if baselines else METHODS
    if method not in known:
        raise ValueError(f"unknown ranking method {method!r}; choose from {list(known)}")
    return method


def empty_rankings() -> pa.Table:
    return RANKING_SCHEMA.empty_table()


def _table(target_ids, method, train_ids, scores) -> pa.Table:
    """Build the table from per-target lists of (train ids, scores) already in rank order."""
    lengths = np.array([len(t) for t in train_ids], dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return empty_rankings()
    return pa.table({
        "target_id": np.repeat(np.asarray(target_ids, dtype=np.int64), lengths),
        "method": pa.array([method] * total, pa.string()),
        "rank": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        "train_id": np.concatenate(train_ids).astype(np.int64),
        "score": np.concatenate(scores).astype(np.float32),
    }, schema=RANKING_SCHEMA)


def _order(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top k by (score desc, id asc)."""
    if np.isnan(scores).any():
        raise ValueError("a ranking score is NaN (the ESVM solver diverged?); check the solver settings")
    return np.lexsort((ids, -scores))[:k]


def _short(target_id, label, n, top_k, on_short):
    if on_short == "error":
        raise ValueError(
            f"target {int(target_id)} (class {int(label)}) has only {n} candidate training items "
            f"but top_k={top_k}; lower top_k (e.g. --set rank.top_k={n}) or set "
            "rank.on_short=\"keep\" to rank the whole candidate set"
        )


def rank_targets(method: str, index: CandidateIndex, target_ids, target_labels, target_features, *,
                 top_k: int = REFERENCE_TOP_K, solver=None, max_candidates: int | None = None,
                 same_class: bool = True, seed: int = 0, on_short: str = "keep") -> pa.Table:
    """Rank candidates for a group of targets with one method.

    Parameters
    ----------
    method : "esvm", "l2", "cosine" or "random"
    index : a fitted :class:`CandidateIndex`; for "l2" and "cosine" its metric must be
        the method (the k-NN ranking is the index's own search).
    target_ids, target_labels, target_features : (T,), (T,), (T, d)
    top_k : rows kept per target (1280 in the reference).
    solver : an ``ESVMSolver`` (``attribution.esvm.get_solver``), required for "esvm".
    max_candidates : None = the whole class; M = only the M nearest (index metric).
    same_class : False ranks candidates from every class (ablation).
    seed : global seed for "random" (combined with each target id).
    on_short : "keep" or "error" when a target has fewer than top_k candidates.
    """
    check_method(method, baselines=False)  # rank_targets computes only these
    if on_short not in SHORT_POLICIES:
        raise ValueError(f"on_short must be one of {list(SHORT_POLICIES)}, got {on_short!r}")
    if int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    top_k = int(top_k)
    target_ids = np.asarray(target_ids, dtype=np.int64).reshape(-1)
    target_labels = np.asarray(target_labels, dtype=np.int64).reshape(-1)
    target_features = np.asarray(target_features, dtype=np.float32)
    if len(target_ids) == 0:
        return empty_rankings()
    if not (len(target_ids) == len(target_labels) == len(target_features)):
        raise ValueError(f"{len(target_ids)} target ids, {len(target_labels)} labels, "
                         f"{len(target_features)} feature rows: they must be the same length")

    if method in ("l2", "cosine"):
        if index.metric != method:
            raise ValueError(f"the {method} ranking needs a CandidateIndex(metric={method!r}), "
                             f"got metric={index.metric!r}")
        ids, scores = index.search(target_features, target_labels, top_k, same_class=same_class,
                                   max_candidates=max_candidates)
        rows_ids, rows_scores = [], []
        for row in range(len(target_ids)):
            valid = ids[row] >= 0
            if not valid.all():
                _short(target_ids[row], target_labels[row], int(valid.sum()), top_k, on_short)
            rows_ids.append(ids[row][valid])
            rows_scores.append(scores[row][valid])
        return _table(target_ids, method, rows_ids, rows_scores)

    if method == "esvm" and solver is None:
        raise ValueError("the esvm ranking needs a solver: attribution.esvm.get_solver(name, **params)")
    candidates = index.candidates(target_features, target_labels, max_candidates=max_candidates,
                                  same_class=same_class)
    rows_ids: list = [None] * len(target_ids)
    rows_scores: list = [None] * len(target_ids)
    # Targets that share a candidate set (same class, whole class) are solved together:
    # batched solvers fit many ESVMs against one negative matrix at once.
    groups: dict = {}
    for row, cand in enumerate(candidates):
        key = (int(target_labels[row]) if same_class else None) if max_candidates is None else row
        groups.setdefault(key, []).append(row)
    for rows in groups.values():
        cand = candidates[rows[0]]
        n = len(cand)
        if n < top_k:
            _short(target_ids[rows[0]], target_labels[rows[0]], n, top_k, on_short)
        if method == "esvm":
            negatives = index.features_of(cand)
            values = np.asarray(solver.decision_values(target_features[rows], negatives))
            if values.shape != (len(rows), n):
                raise ValueError(f"solver returned shape {values.shape}, expected {(len(rows), n)}")
            for j, row in enumerate(rows):
                keep = _order(cand, values[j].astype(np.float64), top_k)
                rows_ids[row], rows_scores[row] = cand[keep], values[j][keep]
        else:  # random
            for row in rows:
                draws = random_scores(seed, target_ids[row], n)
                keep = _order(cand, draws.astype(np.float64), top_k)
                rows_ids[row], rows_scores[row] = cand[keep], draws[keep]
    return _table(target_ids, method, rows_ids, rows_scores)


def random_scores(seed: int, target_id: int, n: int) -> np.ndarray:
    """float32 uniform draws for n candidates (sorted by id) of one target.

    The generator is seeded by (seed, target id) only, so the permutation is the same
    whichever worker or batch computes it. Ids are mapped to unsigned 64-bit because
    SeedSequence entropy must be non-negative.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(target_id) & 0xFFFFFFFFFFFFFFFF])
    return rng.random(n, dtype=np.float32)


def sort_rankings(table: pa.Table) -> pa.Table:
    return table.sort_by([("method", "ascending"), ("target_id", "ascending"), ("rank", "ascending")])


def ranking_file_name(method: str, label: int) -> str:
    """EXP/rankings/<method>-class<label>.parquet, one file per (method, class)."""
    return f"{check_method(method)}-class{int(label):03d}.parquet"


def load_rankings(exp, method: str | None = None) -> pa.Table:
    """All rankings of an experiment (``Experiment`` or path to EXP or EXP/rankings),
    optionally of one method, sorted by (method, target_id, rank)."""
    import pyarrow.compute as pc

    from attribution.experiment import Experiment, read_dataset

    if isinstance(exp, Experiment):
        folder = exp.rankings
    else:
        folder = Path(os.fspath(exp))
        if (folder / "rankings").is_dir():
            folder = folder / "rankings"
    filters = None
    if method is not None:
        check_method(method)
        filters = pc.field("method") == method
    try:
        table = read_dataset(folder, filters=filters)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} (the rank stage: 'attribution rank --exp EXP')") from None
    return sort_rankings(table.select(RANKING_SCHEMA.names).cast(RANKING_SCHEMA))


def ranked_targets(exp, stage: str) -> np.ndarray:
    """The targets the rank stage ranked (every target id in EXP/rankings of the rank
    methods): the baseline stages (``stage`` names the caller) attribute exactly these."""
    import pyarrow.compute as pc

    from attribution.experiment import read_dataset

    try:
        table = read_dataset(exp.rankings, columns=["target_id"], filters=pc.field("method").isin(list(METHODS)))
    except FileNotFoundError:
        table = None
    if table is None or table.num_rows == 0:
        raise ValueError(f"no rankings of the rank methods {list(METHODS)} in {exp.rankings}: the {stage} stage "
                         "attributes the targets the rank stage chose; run the rank stage first "
                         "('attribution rank --exp EXP')")
    return np.unique(table.column("target_id").to_numpy()).astype(np.int64)
