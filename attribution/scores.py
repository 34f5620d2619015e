"""Full score matrices on disk, in blocks, and the rankings derived from them.

Layout (one format for every method)::

    EXP/scores/train_ids.parquet              the training ids (ascending): the columns of every block
    EXP/scores/<method>/<block>.parquet       one row per target of the block:
        target_id  int64
        label      int64
        scores     fixed_size_list<float32>[n_train]   over train_ids, higher = more influential
        candidates binary (packed bits over train_ids) or null: the entries the method scored

A block is the unit a stage computes, writes (atomically, with its settings in the
Parquet metadata) and resumes: the rank stage writes one per (method, class of
targets), as its ranking files. Nothing ever holds more than one block's targets x
n_train floats in memory: readers iterate blocks (:meth:`ScoreStore.blocks`) or read
the rows of the targets they need.

Rankings (``EXP/rankings/<method>-classNNN.parquet``, schema
:data:`attribution.ranking.RANKING_SCHEMA`, read by the support search) are derived
from a block by :func:`rank_block`: the candidates sorted by (score descending, train
id ascending), the first ``top_k`` kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from attribution.artifacts import ids_digest, read_dataset, reuse, stored_settings, visible_files, write_table
from attribution.methods.base import ScoreBlock

TRAIN_IDS_FILE = "train_ids.parquet"


def block_schema(n_train: int) -> pa.Schema:
    return pa.schema([
        pa.field("target_id", pa.int64()),
        pa.field("label", pa.int64()),
        pa.field("scores", pa.list_(pa.float32(), n_train)),
        pa.field("candidates", pa.binary()),
    ])


class ScoreStore:
    """The score blocks of one experiment (``EXP/scores``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    # ------------------------------------------------------------------ training ids
    def set_train_ids(self, train_ids: np.ndarray) -> None:
        """Record the training ids every block is over; refuses a different training set."""
        train_ids = np.asarray(train_ids, np.int64)
        path = self.folder / TRAIN_IDS_FILE
        if path.exists():
            stored = self.train_ids()
            if not np.array_equal(stored, train_ids):
                raise ValueError(f"{path} holds another training set ({len(stored)} ids, digest "
                                 f"{ids_digest(stored)}) than this stage's ({len(train_ids)} ids, digest "
                                 f"{ids_digest(train_ids)}): the [data] settings changed; use a new --exp")
            return
        write_table(pa.table({"train_id": train_ids}), path, settings={"train_ids": ids_digest(train_ids)})

    def train_ids(self) -> np.ndarray:
        path = self.folder / TRAIN_IDS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: no stage has written scores in {self.folder.parent}")
        import pyarrow.parquet as pq

        return pq.read_table(path).column("train_id").to_numpy().astype(np.int64)

    # ------------------------------------------------------------------ blocks
    def block_path(self, method: str, block: str) -> Path:
        return self.folder / method / f"{block}.parquet"

    def write(self, block: ScoreBlock, name: str, settings: dict) -> Path:
        """Write one block atomically under ``EXP/scores/<method>/<name>.parquet``."""
        self.set_train_ids(block.train_ids)
        n_train = len(block.train_ids)
        flat = pa.array(block.values.reshape(-1), pa.float32())
        scores = pa.FixedSizeListArray.from_arrays(flat, n_train)
        if block.candidates is None:
            candidates = pa.nulls(len(block.target_ids), pa.binary())
        else:
            candidates = pa.array([np.packbits(row).tobytes() for row in block.candidates], pa.binary())
        table = pa.Table.from_arrays([pa.array(block.target_ids, pa.int64()), pa.array(block.target_labels, pa.int64()),
                                      scores, candidates], schema=block_schema(n_train))
        return write_table(table, self.block_path(block.method, name),
                           settings=self.block_settings(block.method, settings, block.train_ids))

    def block_settings(self, method: str, settings: dict, train_ids) -> dict:
        """The settings :meth:`write` stores with a block: ``settings`` plus the method and
        the digest of the training ids (what a resume compares with: :meth:`reuse`)."""
        return {**settings, "method": method, "train_ids": ids_digest(train_ids)}

    def reuse(self, method: str, name: str, settings: dict, train_ids, fix: str, force: bool = False) -> bool:
        """:func:`attribution.artifacts.reuse` for one block: True when it exists with these
        settings, False when it is missing (or differs and ``force``), else SettingsChanged."""
        return reuse(self.block_path(method, name), self.block_settings(method, settings, train_ids), fix, force)

    def settings(self, method: str, name: str) -> dict | None:
        path = self.block_path(method, name)
        return stored_settings(path) if path.exists() else None

    def read(self, method: str, name: str) -> ScoreBlock:
        return _block_from_table(method, read_table(self.block_path(method, name)), self.train_ids())

    def block_names(self, method: str) -> list[str]:
        return [p.stem for p in visible_files(self.folder / method)]

    def methods(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and visible_files(p))

    def blocks(self, method: str) -> Iterator[ScoreBlock]:
        """Every block of ``method``, one at a time (memory: one block)."""
        train_ids = self.train_ids()
        for name in self.block_names(method):
            yield _block_from_table(method, read_table(self.block_path(method, name)), train_ids)

    def scores_of(self, method: str, target_ids) -> ScoreBlock:
        """The score rows of ``target_ids`` (in that order), gathered from the blocks."""
        import pyarrow.compute as pc

        target_ids = np.asarray(target_ids, np.int64)
        folder = self.folder / method
        table = read_dataset(folder, filters=pc.field("target_id").isin(target_ids.tolist()))
        block = _block_from_table(method, table, self.train_ids())
        position = {int(t): i for i, t in enumerate(block.target_ids)}
        missing = [int(t) for t in target_ids if int(t) not in position]
        if missing:
            raise KeyError(f"targets {missing[:5]} have no {method} scores in {folder}")
        return block.take([position[int(t)] for t in target_ids])


def read_table(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _block_from_table(method: str, table: pa.Table, train_ids: np.ndarray) -> ScoreBlock:
    n_train = len(train_ids)
    n = table.num_rows
    if n == 0:
        values = np.zeros((0, n_train), np.float32)
    else:
        column = table.column("scores").combine_chunks()
        values = column.values.to_numpy(zero_copy_only=False).reshape(n, n_train)
    raw = table.column("candidates").to_pylist()
    candidates = None
    if any(r is not None for r in raw):
        candidates = np.stack([np.unpackbits(np.frombuffer(r, np.uint8), count=n_train).astype(bool) if r is not None
                               else np.ones(n_train, bool) for r in raw])
    return ScoreBlock(method, table.column("target_id").to_numpy(), table.column("label").to_numpy(), train_ids,
                      values, candidates)


# ----------------------------------------------------------------------------- rankings from scores


def rank_block(block: ScoreBlock, top_k: int) -> pa.Table:
    """The ranking table (RANKING_SCHEMA) of a block: per target, its candidates sorted by
    (score desc, train id asc), the first ``top_k``. When the block carries ``exact``
    scores (float64, see :class:`ScoreBlock`), those order the candidates."""
    from attribution.ranking import empty_rankings, ranking_table

    if int(top_k) < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    ids_per_target, scores_per_target = [], []
    start = 0  # offset of the row's candidates in block.exact
    for row in range(len(block.target_ids)):
        keep = np.flatnonzero(block.candidates[row]) if block.candidates is not None else np.arange(len(block.train_ids))
        ids, values = block.train_ids[keep], block.values[row, keep]
        key = values.astype(np.float64) if block.exact is None else block.exact[start:start + len(keep)]
        start += len(keep)
        order = np.lexsort((ids, -key))[: int(top_k)]
        ids_per_target.append(ids[order])
        scores_per_target.append(values[order])
    if not len(block.target_ids):
        return empty_rankings()
    return ranking_table(block.target_ids, block.method, ids_per_target, scores_per_target)


def write_ranking(block: ScoreBlock, top_k: int, path: str | os.PathLike, settings: dict) -> Path:
    """The ranking of ``block`` (:func:`rank_block`), sorted, written atomically at ``path``
    with its settings. Written after the block's scores, it marks the unit done."""
    from attribution.ranking import sort_rankings

    return write_table(sort_rankings(rank_block(block, top_k)), path, settings=settings)


@dataclass
class ClassUnit:
    """One (method or variant, class of targets) of a scoring stage: its score block
    (``EXP/scores/<method>/classNNN.parquet``) and its ranking file, each with the
    settings it is stored with (the trak and gradient stages resume per unit)."""

    method: str
    label: int
    scores: dict   # the block's settings
    ranking: dict  # the ranking's settings

    @property
    def block(self) -> str:
        return f"class{int(self.label):03d}"

    @property
    def file(self) -> str:
        from attribution.ranking import ranking_file_name

        return ranking_file_name(self.method, self.label)


def concat_blocks(blocks: list[ScoreBlock]) -> ScoreBlock:
    """One block from blocks of one method's targets (same training ids), in order."""
    first = blocks[0]
    candidates = None if first.candidates is None else np.concatenate([b.candidates for b in blocks])
    exact = None if any(b.exact is None for b in blocks) else np.concatenate([b.exact for b in blocks])
    return ScoreBlock(first.method, np.concatenate([b.target_ids for b in blocks]),
                      np.concatenate([b.target_labels for b in blocks]), first.train_ids,
                      np.concatenate([b.values for b in blocks]), candidates, exact)
