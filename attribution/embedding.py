"""Embeddings of a dataset's splits, stored as a sharded Parquet dataset.

Plain Python (no Ray): the schema, the reader, shard planning, single-process
extraction, the shard writer, the manifest and the resume / exactly-once checks.
:mod:`cluster.embedding` runs the same shards on a Ray actor pool.

Layout (``EXP/embeddings/``)::

    train-00000.parquet ...   one file per shard: rows [start, stop) of the split's ImageSet
    test-00000.parquet ...
    _manifest.json            what was embedded and how (see below)

Parquet schema (:func:`embedding_schema`)::

    id         int64                            dataset item id (attribution.data ids)
    split      string                           "train" / "test"
    label      int64                            class label
    embedding  fixed_size_list<float32>[dim]    (float16 when dtype="float16")

``_manifest.json``::

    {"format": "image-attribution/embeddings", "version": 1,
     "backbone": BackboneSpec dict without the checkpoint path,
     "checkpoint": path used, "checkpoint_sha256": hex or null (null: no checkpoint file),
     "seed": torch seed set before building the backbone, "dim": int, "dtype": "float32",
     "splits": {"train": {"dataset": DatasetSpec dict, "rows": n, "shard_size": s,
                          "complete": bool, "shards": [{"file", "start", "stop", "rows"}, ...]}}}

A shard file is written atomically (temp file + rename), so a file that exists is
complete; resume skips shards whose file exists with the planned row count and id range
(read from the Parquet footer, not the data) and recomputes the rest. A split is marked
``complete`` only after every id of the split was found exactly once.

Random-init ablation: with no checkpoint, the backbone's weights come from
``torch.manual_seed(seed)`` set right before :func:`attribution.backbones.load_backbone`,
so every process (each Ray actor, a rerun, another machine) builds the identical network
and shards computed by different processes belong to one embedding.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.data import DatasetSpec, ImageSet
from attribution.experiment import Experiment, file_sha256, write_json_atomic, write_table_atomic

FORMAT = "image-attribution/embeddings"
VERSION = 1
MANIFEST_NAME = "_manifest.json"
DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 256


class EmbeddingError(ValueError):
    """Embeddings cannot be written or read; the message names the fix."""


class EmbeddingManifestMismatch(EmbeddingError):
    """EXP/embeddings was written with other settings than the ones requested now."""


class IncompleteEmbeddingError(EmbeddingError):
    """A split's embedding is missing or was interrupted before every shard was written."""


# ----------------------------------------------------------------------------- schema and reader


@dataclass
class EmbeddingTable:
    """One split's embeddings, sorted by id: ``features[i]`` belongs to ``ids[i]``."""

    ids: np.ndarray       # int64 (n,)
    labels: np.ndarray    # int64 (n,)
    features: np.ndarray  # float32 (n, dim)
    split: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row indices of ``ids`` (KeyError naming the ids that are absent)."""
        ids = np.asarray(ids, dtype=np.int64)
        where = np.clip(np.searchsorted(self.ids, ids), 0, max(len(self.ids) - 1, 0))
        found = (self.ids[where] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        if not np.all(found):
            raise KeyError(f"ids not in the {self.split} embeddings: {ids[~found][:10].tolist()}")
        return where


def embedding_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """The Parquet schema of every shard file (``dtype``: one of ``DTYPES``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    value_type = pa.float32() if dtype == "float32" else pa.float16()
    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", value_type), int(dim)), nullable=False),
    ])


def embeddings_dir(exp_or_dir: Experiment | str | os.PathLike) -> Path:
    """EXP/embeddings for an :class:`Experiment` or an experiment directory; a folder
    that itself holds ``_manifest.json`` (or is named ``embeddings``) is used as is."""
    if isinstance(exp_or_dir, Experiment):
        return exp_or_dir.embeddings
    folder = Path(exp_or_dir)
    if (folder / MANIFEST_NAME).exists() or folder.name == "embeddings":
        return folder
    return Experiment(folder).embeddings


def read_manifest(exp_or_dir: Experiment | str | os.PathLike) -> dict[str, Any] | None:
    """The embeddings manifest, or None when nothing was embedded yet."""
    import json

    path = embeddings_dir(exp_or_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise EmbeddingError(f"{path} is not an embeddings manifest (format {manifest.get('format')!r})")
    return manifest


def load_embeddings(exp_or_dir: Experiment | str | os.PathLike, split: str) -> EmbeddingTable:
    """Read one split's embeddings (float32, sorted by id).

    Only the shard files the manifest lists are read, so temporary files of an
    interrupted writer and stray files are ignored. Raises
    :class:`IncompleteEmbeddingError` when the split was never embedded or its run was
    interrupted (the message says which command finishes it).
    """
    folder = embeddings_dir(exp_or_dir)
    manifest = read_manifest(folder)
    exp_hint = folder.parent if folder.name == "embeddings" else folder
    if manifest is None:
        raise IncompleteEmbeddingError(
            f"no embeddings in {folder} (no {MANIFEST_NAME}): run 'attribution embed --exp {exp_hint}' first")
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise IncompleteEmbeddingError(
            f"split {split!r} was not embedded in {folder} (embedded: {sorted(manifest.get('splits', {}))}); "
            f"run 'attribution embed --exp {exp_hint}'")
    if not entry.get("complete"):
        raise IncompleteEmbeddingError(
            f"the {split!r} embeddings in {folder} are incomplete (an interrupted run); rerun "
            f"'attribution embed --exp {exp_hint}' with the same settings to finish the missing shards")
    dim = int(manifest["dim"])
    ids, labels, features = [], [], []
    for shard in entry["shards"]:
        path = folder / shard["file"]
        if not path.exists():
            raise IncompleteEmbeddingError(
                f"{path} is listed in {folder / MANIFEST_NAME} but missing; rerun "
                f"'attribution embed --exp {exp_hint}' to recompute it")
        table = pq.read_table(path)
        _check_schema(table.schema, dim, path)
        ids.append(table.column("id").to_numpy())
        labels.append(table.column("label").to_numpy())
        features.append(_embedding_matrix(table.column("embedding"), dim))
    ids_all = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    labels_all = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
    features_all = np.concatenate(features) if features else np.zeros((0, dim), np.float32)
    order = np.argsort(ids_all, kind="stable")
    ids_all, labels_all, features_all = ids_all[order], labels_all[order], features_all[order]
    if len(ids_all) != int(entry["rows"]) or (len(ids_all) > 1 and np.any(np.diff(ids_all) == 0)):
        raise EmbeddingError(
            f"the {split!r} embeddings in {folder} hold {len(ids_all)} rows ({len(np.unique(ids_all))} distinct ids) "
            f"but the manifest says {entry['rows']}: rerun 'attribution embed --exp {exp_hint} --overwrite'")
    return EmbeddingTable(ids_all, labels_all, np.ascontiguousarray(features_all, dtype=np.float32), split)


def _embedding_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """fixed_size_list column -> (n, dim) float32 without a Python loop."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), dim).astype(np.float32, copy=False)


def _check_schema(schema: pa.Schema, dim: int, path) -> None:
    field = schema.field("embedding") if "embedding" in schema.names else None
    if field is None or not pa.types.is_fixed_size_list(field.type) or field.type.list_size != dim:
        raise EmbeddingError(f"{path}: column 'embedding' is {field.type if field else 'missing'}, "
                             f"expected fixed_size_list[{dim}] as the manifest says; the file does not belong "
                             "to this embedding (use --overwrite to recompute)")


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of a split's ImageSet, written to ``file``."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def file(self) -> str:
        return f"{self.split}-{self.index:05d}.parquet"

    @property
    def positions(self) -> np.ndarray:
        return np.arange(self.start, self.stop, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"file": self.file, "start": self.start, "stop": self.stop, "rows": self.rows}


def plan_shards(n_items: int, shard_size: int, split: str) -> list[Shard]:
    """Fixed contiguous position ranges covering 0..n_items-1 (the last may be shorter).

    Fixed ranges (not "whatever a worker got") are what make resume possible: shard
    ``i`` always holds the same ids, so its file can be checked and skipped."""
    if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if n_items < 1:
        raise EmbeddingError(f"the {split!r} split has no images: nothing to embed (check the dataset and "
                             "data.train_per_class / data.test_per_class)")
    return [Shard(split, i, start, min(start + shard_size, n_items))
            for i, start in enumerate(range(0, n_items, shard_size))]


def shard_is_done(folder: str | os.PathLike, shard: Shard, image_set: ImageSet, dim: int | None = None) -> bool:
    """True when the shard's file exists with the planned rows, first/last id and dim.

    Only the Parquet footer is read (row count, id min/max statistics, schema), so
    checking thousands of shards is cheap."""
    path = Path(folder) / shard.file
    if not path.exists():
        return False
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows != shard.rows:
            return False
        if dim is not None:
            field = meta.schema.to_arrow_schema().field("embedding")
            if field.type.list_size != dim:
                return False
        id_col = meta.schema.to_arrow_schema().get_field_index("id")
        lo, hi = None, None
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(id_col).statistics
            if stats is None or not stats.has_min_max:
                return True  # row count matches and no stats to check: trust the atomic write
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
        ids = image_set.ids
        return lo == int(ids[shard.start:shard.stop].min()) and hi == int(ids[shard.start:shard.stop].max())
    except Exception:  # unreadable footer (e.g. a file truncated outside our atomic writer): recompute
        return False


def shard_table(split: str, ids: np.ndarray, labels: np.ndarray, features: np.ndarray,
                dtype: str = "float32") -> pa.Table:
    """Rows of one shard in the :func:`embedding_schema` layout."""
    features = np.ascontiguousarray(features, dtype=np.float32 if dtype == "float32" else np.float16)
    n, dim = features.shape
    if len(ids) != n or len(labels) != n:
        raise ValueError(f"{len(ids)} ids, {len(labels)} labels, {n} feature rows: they must match")
    values = pa.array(features.reshape(-1))
    embedding = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.Table.from_arrays(
        [pa.array(np.asarray(ids, np.int64)), pa.array([split] * n, pa.string()),
         pa.array(np.asarray(labels, np.int64)), embedding],
        schema=embedding_schema(dim, dtype))


def write_shard(folder: str | os.PathLike, shard: Shard, ids: np.ndarray, labels: np.ndarray,
                features: np.ndarray, dtype: str = "float32") -> Path:
    """Write one shard file atomically (it appears complete or not at all)."""
    path = Path(folder) / shard.file
    write_table_atomic(shard_table(shard.split, ids, labels, features, dtype), path)
    return path


# ----------------------------------------------------------------------------- extraction


def build_model(spec, seed: int = 0, device: str | None = None):
    """``load_backbone(spec)`` after ``torch.manual_seed(seed)``, on ``device``.

    Seeding right before construction is the random-init ablation's guarantee: with no
    checkpoint, every process that calls this with the same (spec, seed) gets the same
    weights. With a checkpoint, the seed has no effect on the result."""
    import torch

    from attribution.backbones import load_backbone

    torch.manual_seed(int(seed))
    model = load_backbone(spec)
    if device is not None:
        model = model.to(device)
    return model.eval()


def extract(model, image_set: ImageSet, positions: Sequence[int] | np.ndarray,
            batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Features of ``image_set`` items at ``positions``: float32 (n, model.dim).

    Images are read batch by batch, so memory holds one batch of pixels at a time."""
    import torch

    positions = np.asarray(positions, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    out = np.empty((len(positions), model.dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            x = model.preprocess(image_set.images(chunk), image_set.mean, image_set.std).to(device)
            out[start:start + len(chunk)] = model(x).float().cpu().numpy()
    return out


def embed_shard(model, image_set: ImageSet, shard: Shard, folder: str | os.PathLike,
                batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32") -> int:
    """Extract and write one shard; returns its row count."""
    features = extract(model, image_set, shard.positions, batch_size)
    write_shard(folder, shard, image_set.ids[shard.start:shard.stop],
                image_set.labels[shard.start:shard.stop], features, dtype)
    return shard.rows


# ----------------------------------------------------------------------------- manifest


def backbone_record(spec) -> dict:
    """The backbone spec as stored/compared: without the checkpoint path, because the
    same file may sit at another path (an experiment pulled from remote storage); the
    file's identity is its sha256."""
    record = dict(spec.to_dict())
    record.pop("checkpoint", None)
    return record


def dataset_record(spec: DatasetSpec) -> dict:
    """The dataset spec as stored/compared. ``root`` is kept for the record but not
    compared: it is where the files are, not which items (ids come from name, split,
    n_per_class and seed)."""
    record = asdict(spec)
    record["root"] = record["root"] or None
    return record


_DATASET_COMPARED = ("name", "split", "n_per_class", "seed")


def new_manifest(backbone_spec, checkpoint_sha256: str | None, dim: int, dtype: str, seed: int) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return {"format": FORMAT, "version": VERSION, "backbone": backbone_record(backbone_spec),
            "checkpoint": backbone_spec.checkpoint, "checkpoint_sha256": checkpoint_sha256,
            # the seed only determines the weights when there is no checkpoint
            "seed": int(seed) if checkpoint_sha256 is None else None,
            "dim": int(dim), "dtype": dtype, "splits": {}}


def _differences(old: Mapping, new: Mapping, keys: Iterable[str]) -> list[str]:
    return [f"{key}: existing {old.get(key)!r} vs requested {new.get(key)!r}"
            for key in keys if old.get(key) != new.get(key)]


def open_manifest(folder: str | os.PathLike, wanted: dict, overwrite: bool = False) -> dict:
    """Return the manifest to continue with: the existing one if it agrees with
    ``wanted`` (from :func:`new_manifest`), else raise :class:`EmbeddingManifestMismatch`.

    ``overwrite=True`` deletes the whole embeddings folder first. Nothing is written
    when the settings disagree."""
    folder = Path(folder)
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    existing = read_manifest(folder) if (folder / MANIFEST_NAME).exists() else None
    if existing is None:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / MANIFEST_NAME, wanted)
        return wanted
    differ = _differences(existing, wanted, ("version", "checkpoint_sha256", "seed", "dim", "dtype"))
    old_backbone, new_backbone = existing.get("backbone", {}), wanted["backbone"]
    differ += [f"backbone.{d}" for d in _differences(old_backbone, new_backbone,
                                                        sorted(set(old_backbone) | set(new_backbone)))]
    if differ:
        raise EmbeddingManifestMismatch(
            f"{folder} already holds embeddings made with other settings:\n  " + "\n  ".join(differ)
            + f"\nUse a new experiment directory, or pass --overwrite to delete {folder} and recompute.")
    existing["checkpoint"] = wanted["checkpoint"]  # the path may move; the hash is what must match
    return existing


def plan_split(folder: str | os.PathLike, manifest: dict, dataset_spec: DatasetSpec, image_set: ImageSet,
               shard_size: int) -> tuple[list[Shard], list[Shard]]:
    """Plan a split's shards, record the plan in the manifest (split not complete), and
    return (all shards, shards still to compute).

    A split already recorded with another dataset spec is an error (other ids); with
    another shard_size its old shard files are deleted (their ranges no longer line up)."""
    folder = Path(folder)
    split = dataset_spec.split
    shards = plan_shards(len(image_set), shard_size, split)
    record = dataset_record(dataset_spec)
    entry = manifest["splits"].get(split)
    if entry is not None:
        differ = [f"data.{d}" for d in _differences(entry["dataset"], record, _DATASET_COMPARED)]
        if differ:
            raise EmbeddingManifestMismatch(
                f"{folder} already holds {split!r} embeddings of another dataset selection:\n  "
                + "\n  ".join(differ)
                + f"\nUse a new experiment directory, or pass --overwrite to delete {folder} and recompute.")
        if int(entry.get("shard_size", -1)) != int(shard_size):
            for old in entry.get("shards", []):
                (folder / old["file"]).unlink(missing_ok=True)
    # files of this split that the plan does not list (an older, larger plan) would be
    # harmless to the reader, but are removed so the folder holds one embedding
    planned = {s.file for s in shards}
    for path in folder.glob(f"{split}-*.parquet"):
        if path.name not in planned:
            path.unlink()
    # temp files of writers killed mid-write (one embed run per experiment at a time is
    # assumed, so none of them belongs to a live writer)
    for path in folder.glob(f".{split}-*.parquet.*.tmp"):
        path.unlink(missing_ok=True)
    dim = int(manifest["dim"])
    pending = [s for s in shards if not shard_is_done(folder, s, image_set, dim)]
    new_entry = {"dataset": record, "rows": len(image_set), "shard_size": int(shard_size),
                 "complete": False, "shards": [s.to_dict() for s in shards]}
    # A rerun over a finished split keeps it readable (complete) throughout, so a reader
    # running at the same time is not told to rerun; anything to recompute marks it incomplete.
    if entry is not None and not pending and entry.get("complete") and \
            {k: v for k, v in entry.items() if k != "complete"} == {k: v for k, v in new_entry.items() if k != "complete"}:
        new_entry["complete"] = True
    manifest["splits"][split] = new_entry
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return shards, pending


def finalize_split(folder: str | os.PathLike, manifest: dict, image_set: ImageSet) -> dict:
    """Check that every id of the split is in the shard files exactly once, then mark
    the split complete. Reads only the id column."""
    folder = Path(folder)
    split = image_set.split
    entry = manifest["splits"][split]
    found = []
    for shard in entry["shards"]:
        path = folder / shard["file"]
        if not path.exists():
            raise IncompleteEmbeddingError(f"{path} is missing after the run: rerun the same command to compute it")
        found.append(pq.read_table(path, columns=["id"]).column("id").to_numpy())
    found_ids = np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)
    expected = np.sort(image_set.ids)
    if len(found_ids) != len(expected) or not np.array_equal(found_ids, expected):
        missing = np.setdiff1d(expected, found_ids)[:10].tolist()
        extra = np.setdiff1d(found_ids, expected)[:10].tolist()
        values, counts = np.unique(found_ids, return_counts=True)
        repeated = values[counts > 1][:10].tolist()
        raise EmbeddingError(
            f"{split!r} embeddings in {folder} do not hold every id exactly once: missing {missing}, "
            f"unexpected {extra}, repeated {repeated}. Rerun with --overwrite.")
    entry["complete"] = True
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return entry


def checkpoint_hash(spec) -> str | None:
    return file_sha256(spec.checkpoint) if spec.checkpoint else None


# ----------------------------------------------------------------------------- single process


def embed_datasets(folder: str | os.PathLike, dataset_specs: Sequence[DatasetSpec], backbone_spec, *,
                   seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, shard_size: int = DEFAULT_SHARD_SIZE,
                   dtype: str = "float32", overwrite: bool = False, device: str | None = None,
                   stop_after_shards: int | None = None,
                   on_shard: Callable[[Shard, int], None] | None = None) -> dict:
    """Embed splits in this process (the reference the Ray path must match).

    ``stop_after_shards`` stops after that many shards were written in this call,
    leaving the split incomplete (used to test resume). Returns a summary per split:
    rows, shards, computed (shards written by this call), complete.
    """
    model = build_model(backbone_spec, seed, device)
    manifest = open_manifest(folder, new_manifest(backbone_spec, checkpoint_hash(backbone_spec),
                                                  model.dim, dtype, seed), overwrite)
    summary: dict[str, Any] = {}
    written = 0
    for dataset_spec in dataset_specs:
        image_set = dataset_spec.load()
        shards, pending = plan_split(folder, manifest, dataset_spec, image_set, shard_size)
        computed = 0
        for shard in pending:
            if stop_after_shards is not None and written >= stop_after_shards:
                break
            rows = embed_shard(model, image_set, shard, folder, batch_size, dtype)
            written += 1
            computed += 1
            if on_shard:
                on_shard(shard, rows)
        complete = computed == len(pending)
        if complete:
            finalize_split(folder, manifest, image_set)
        summary[dataset_spec.split] = {"rows": len(image_set), "shards": len(shards), "computed": computed,
                                       "complete": complete}
    return summary
