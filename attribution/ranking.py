"""Rankings of training images for target test images: the table every method's ranking files share.

One ranking table has one row per (target, method, rank)::

    target_id  int64    id of the target test image
    method     string   the attribution method (a name of the method registry,
                        :func:`attribution.methods.available_methods`)
    rank       int32    0 = most influential, then 1, 2, ...
    train_id   int64    id of the ranked training image
    score      float32  higher = more influential; what it means is documented on the
                        method's class (the rank stage's methods: attribution.methods.similarity)

Rankings are derived from a method's scores (:func:`attribution.scores.rank_block`):
candidates sorted by (score descending, train_id ascending), so ties are broken by id
and a ranking never depends on the order candidates were stored in. Files are
``EXP/rankings/<method>-class<label>.parquet``, one per (method, class of targets).

Every registered method is a ranking method (its stage writes these files); the rank
stage's methods (``available_methods("rank")``) choose the targets every other stage
attributes (:func:`ranked_targets`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

SHORT_POLICIES = ("keep", "error")
RANKING_SCHEMA = pa.schema([
    pa.field("target_id", pa.int64()),
    pa.field("method", pa.string()),
    pa.field("rank", pa.int32()),
    pa.field("train_id", pa.int64()),
    pa.field("score", pa.float32()),
])
REFERENCE_TOP_K = 1280


def empty_rankings() -> pa.Table:
    return RANKING_SCHEMA.empty_table()


def ranking_table(target_ids, method, train_ids, scores) -> pa.Table:
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
    """EXP/rankings/<method>-class<label>.parquet, one file per (method, class);
    ``method`` must be registered or a variant of one (``trak@m20``; ValueError naming
    the registered ones)."""
    from attribution.methods import method_class, split_variant

    base, tag = split_variant(method)
    name = method_class(base).name + (f"@{tag}" if tag is not None else "")
    return f"{name}-class{int(label):03d}.parquet"


def load_rankings(exp, method: str | None = None) -> pa.Table:
    """All rankings of an experiment (``Experiment`` or path to EXP or EXP/rankings),
    optionally of one method, sorted by (method, target_id, rank)."""
    import pyarrow.compute as pc

    from attribution.experiment import Experiment
    from attribution.artifacts import read_dataset

    if isinstance(exp, Experiment):
        folder = exp.rankings
    else:
        folder = Path(os.fspath(exp))
        if (folder / "rankings").is_dir():
            folder = folder / "rankings"
    filters = None
    if method is not None:
        from attribution.methods import method_class

        method_class(method)  # an unknown name is refused, naming the registered methods
        filters = pc.field("method") == method
    try:
        table = read_dataset(folder, filters=filters)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error} (the rank stage: 'attribution rank --exp EXP')") from None
    return sort_rankings(table.select(RANKING_SCHEMA.names).cast(RANKING_SCHEMA))


def ranked_targets(exp, stage: str) -> np.ndarray:
    """The targets the rank stage ranked (every target id in EXP/rankings of the rank
    stage's methods, ``available_methods("rank")``): the baseline stages (``stage``
    names the caller) attribute exactly these."""
    import pyarrow.compute as pc

    from attribution.artifacts import read_dataset
    from attribution.methods import available_methods

    methods = available_methods("rank")
    try:
        table = read_dataset(exp.rankings, columns=["target_id"], filters=pc.field("method").isin(methods))
    except FileNotFoundError:
        table = None
    if table is None or table.num_rows == 0:
        raise ValueError(f"no rankings of the rank methods {methods} in {exp.rankings}: the {stage} stage "
                         "attributes the targets the rank stage chose; run the rank stage first "
                         "('attribution rank --exp EXP')")
    return np.unique(table.column("target_id").to_numpy()).astype(np.int64)
