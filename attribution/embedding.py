"""Embeddings of a dataset's splits, stored as a sharded Parquet dataset.

Plain Python (no Ray): the schema, the reader, shard planning, the worker that embeds
one shard, and the plan / run of a whole embedding on any
:class:`attribution.workqueue.Runtime` (an in-process one, or Ray's from
``cluster.runtime``). The embed stage (:mod:`attribution.stages.embed`) and
:func:`embed_datasets` both go through :func:`plan_embedding` and :func:`run_embedding`:
there is one extraction path.

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

Work unit: a planned shard (fixed position range -> one Parquet file). Why a work queue
of shards and not Ray Data ``map_batches``: resume is "skip finished files" only if a
file can be mapped back to the plan, and Ray Data re-blocks rows and names its files
itself. Images never travel: a worker gets (DatasetSpec, Shard), reads the pixels itself
batch by batch (a memory map for Fashion-MNIST / CIFAR, decoded files for ImageNet) and
returns the shard's Arrow table; the driver writes it atomically
(:func:`attribution.artifacts.write_table`), so a file that exists is complete, and the
workers need no access to the experiment directory (which may be a staging copy of a
URI on the driver's machine). The dataset itself must be readable on every node.

Resume skips shards whose file exists with the planned row count and id range (read
from the Parquet footer, not the data) and recomputes the rest. A split is marked
``complete`` only after every id of the split was found exactly once.

Random-init ablation: with no checkpoint, the backbone's weights come from
``torch.manual_seed(seed)`` set right before :func:`attribution.backbones.load_backbone`,
so every process (each worker, a rerun, another machine) builds the identical network
and shards computed by different processes belong to one embedding.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.artifacts import (SettingsChanged, aside, differences, file_sha256, write_bytes, write_json,
                                  write_table)
from attribution.data import DatasetSpec, ImageSet, cache_dir
from attribution.experiment import Experiment
from attribution.workqueue import PoolRequest, QueueWorker, Runtime

FORMAT = "image-attribution/embeddings"
VERSION = 1
MANIFEST_NAME = "_manifest.json"
DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 256
# One shard per worker at a time: the driver's round trip between shards is milliseconds
# against seconds per shard, and queueing a second shard on a busy worker would leave
# the others idle at the end of the run (up to a shard of imbalance each).
IN_FLIGHT_PER_WORKER = 1


class EmbeddingError(ValueError):
    """Embeddings cannot be written or read; the message names the fix."""


class EmbeddingManifestMismatch(EmbeddingError, SettingsChanged):
    """EXP/embeddings was written with other settings than the ones requested now
    (a :class:`attribution.artifacts.SettingsChanged`: ``key: old -> new`` per difference)."""


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
        features.append(embedding_matrix(table.column("embedding"), dim))
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


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------- the worker


class Embedder(QueueWorker):
    """Embeds one shard per call: ``Embedder(...)((dataset_spec, shard)) -> Arrow table``.

    Built once per worker: the model (``torch.manual_seed(seed)`` right before
    ``load_backbone``, so random-init workers all hold the same network) and the opened
    image sets. ``threads`` sets torch's thread count (a pool worker owns exactly its
    CPUs; None / 0: leave torch's setting, for a worker in the driver's process).

    Checkpoint: ``checkpoint_sha256`` is the driver's file's hash. A worker whose node has
    that file at ``backbone_spec.checkpoint`` uses it; otherwise it writes
    ``checkpoint_bytes`` (shipped once by the runtime) to a content-addressed local copy
    (:func:`local_checkpoint`); without bytes, a missing or different file is refused.
    """

    def __init__(self, backbone_spec, seed: int, batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32",
                 checkpoint_sha256: str | None = None, threads: int | None = None, device: str | None = None,
                 checkpoint_bytes: bytes | None = None):
        import torch

        backbone_spec = worker_checkpoint(backbone_spec, checkpoint_sha256, checkpoint_bytes)
        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.batch_size, self.dtype = int(batch_size), dtype
        self.decode_threads = max(1, int(threads or 1))
        self.model = build_model(backbone_spec, seed, device)
        self._sets: dict[DatasetSpec, ImageSet] = {}

    def image_set(self, dataset_spec: DatasetSpec) -> ImageSet:
        if dataset_spec not in self._sets:  # a memory map or a file list: cheap to keep
            image_set = dataset_spec.load()
            if hasattr(image_set, "threads"):  # image files: decoded on the CPUs this worker holds
                image_set.threads = self.decode_threads
            self._sets[dataset_spec] = image_set
        return self._sets[dataset_spec]

    def __call__(self, item: tuple[DatasetSpec, "Shard"]) -> pa.Table:
        dataset_spec, shard = item
        image_set = self.image_set(dataset_spec)
        features = extract(self.model, image_set, shard.positions, self.batch_size)
        return shard_table(shard.split, image_set.ids[shard.start:shard.stop],
                           image_set.labels[shard.start:shard.stop], features, self.dtype)


def worker_checkpoint(backbone_spec, sha256: str | None, data: bytes | None = None):
    """``backbone_spec`` with a checkpoint path that holds the file of hash ``sha256`` on
    this node (unchanged when its own path does; a local copy of ``data`` otherwise)."""
    if sha256 is None:
        return backbone_spec
    path = Path(backbone_spec.checkpoint)
    seen = file_sha256(path) if path.exists() else None
    if seen == sha256:
        return backbone_spec
    if data is None:
        found = f"has sha256 {seen[:12]}..." if seen else "does not exist"
        raise EmbeddingError(
            f"checkpoint {path} on this node {found} but the driver's has {sha256[:12]}...: put the same file "
            "at the same path on every node")
    return replace(backbone_spec, checkpoint=str(local_checkpoint(data, sha256)))


def local_checkpoint(data: bytes, sha256: str) -> Path:
    """The checkpoint ``data`` as a file in this node's cache, named by its hash (written once)."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise EmbeddingError(f"the checkpoint bytes shipped to this worker do not have sha256 {sha256[:12]}...")
    path = cache_dir() / "checkpoints" / f"{sha256}.pt"
    if not (path.exists() and file_sha256(path) == sha256):
        write_bytes(path, data)
    return path


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


# what must agree between a stored manifest / split entry and the requested one
MANIFEST_COMPARED = ("version", "checkpoint_sha256", "seed", "dim", "dtype", "backbone")
DATASET_COMPARED = ("name", "split", "n_per_class", "seed")


def new_manifest(backbone_spec, checkpoint_sha256: str | None, dim: int, dtype: str, seed: int) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return {"format": FORMAT, "version": VERSION, "backbone": backbone_record(backbone_spec),
            "checkpoint": backbone_spec.checkpoint, "checkpoint_sha256": checkpoint_sha256,
            # the seed only determines the weights when there is no checkpoint
            "seed": int(seed) if checkpoint_sha256 is None else None,
            "dim": int(dim), "dtype": dtype, "splits": {}}


def experiment_relative(path: str | None, root: Path) -> str | None:
    """A checkpoint path as the manifest records it: relative to the experiment ``root``
    when the file is inside it (EXP/checkpoints/moco.pt -> "checkpoints/moco.pt"), so two
    experiments embedded from equal checkpoints write equal manifests (an ablation reuses
    the base's downstream work only when they are byte-equal); else as given."""
    if not path:
        return path
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return path


def _mismatch_fix(folder: Path) -> str:
    return f"Use a new experiment directory, or pass --overwrite to delete {folder} and recompute."


def check_manifest(folder: str | os.PathLike, existing: Mapping, wanted: Mapping) -> None:
    """Raise :class:`EmbeddingManifestMismatch` unless the stored manifest ``existing``
    was made with the backbone, checkpoint, seed, dim and dtype of ``wanted``."""
    changes = differences({k: existing.get(k) for k in MANIFEST_COMPARED},
                          {k: wanted.get(k) for k in MANIFEST_COMPARED})
    if changes:
        raise EmbeddingManifestMismatch(f"the embeddings in {folder}", changes, _mismatch_fix(Path(folder)))


def checkpoint_hash(spec) -> str | None:
    return file_sha256(spec.checkpoint) if spec.checkpoint else None


# ----------------------------------------------------------------------------- plan


@dataclass
class SplitPlan:
    """One split of an :class:`EmbeddingPlan`: its shards, those still to compute, the
    manifest entry to record, and the files of an older plan to delete first."""

    spec: DatasetSpec
    image_set: ImageSet
    shards: list[Shard]
    pending: list[Shard]
    entry: dict
    stale: list[str] = field(default_factory=list)

    @property
    def split(self) -> str:
        return self.spec.split


@dataclass
class EmbeddingPlan:
    """Everything :func:`run_embedding` needs; made by :func:`plan_embedding`, which
    reads and checks but writes nothing."""

    folder: Path
    backbone_spec: Any
    seed: int
    batch_size: int
    dtype: str
    dim: int
    checkpoint_sha256: str | None
    manifest: dict
    splits: list[SplitPlan]
    overwrite: bool = False

    @property
    def work(self) -> list[tuple[DatasetSpec, Shard]]:
        """(dataset spec, shard) of every shard still to compute, split by split."""
        return [(split.spec, shard) for split in self.splits for shard in split.pending]

    @property
    def done(self) -> list[Shard]:
        return [shard for split in self.splits for shard in split.shards if shard not in split.pending]


def plan_split(folder: str | os.PathLike, manifest: Mapping | None, dataset_spec: DatasetSpec,
               image_set: ImageSet, shard_size: int) -> SplitPlan:
    """Plan a split's shards against the stored ``manifest`` (None: nothing stored).

    A split already recorded with another dataset selection is refused (other ids); one
    recorded with another shard_size is recomputed (its old files no longer line up)."""
    folder = Path(folder)
    split = dataset_spec.split
    shards = plan_shards(len(image_set), shard_size, split)
    record = dataset_record(dataset_spec)
    entry = (manifest or {}).get("splits", {}).get(split)
    stale: list[str] = []
    if entry is not None:
        changes = differences({k: entry["dataset"].get(k) for k in DATASET_COMPARED},
                              {k: record[k] for k in DATASET_COMPARED}, prefix="data.")
        if changes:
            raise EmbeddingManifestMismatch(f"the {split!r} embeddings in {folder}", changes, _mismatch_fix(folder))
        if int(entry.get("shard_size", -1)) != int(shard_size):
            stale = [old["file"] for old in entry.get("shards", [])]
    dim = int(manifest["dim"]) if manifest else None
    pending = [s for s in shards if s.file in stale or manifest is None
               or not shard_is_done(folder, s, image_set, dim)]
    new_entry = {"dataset": record, "rows": len(image_set), "shard_size": int(shard_size),
                 "complete": False, "shards": [s.to_dict() for s in shards]}
    # A rerun over a finished split keeps it readable (complete) throughout, so a reader
    # running at the same time is not told to rerun; anything to recompute marks it incomplete.
    if entry is not None and not pending and entry.get("complete") and \
            {k: v for k, v in entry.items() if k != "complete"} == {k: v for k, v in new_entry.items() if k != "complete"}:
        new_entry["complete"] = True
    return SplitPlan(dataset_spec, image_set, shards, pending, new_entry, stale)


def plan_embedding(folder: str | os.PathLike, dataset_specs: Sequence[DatasetSpec], backbone_spec, *,
                   seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, shard_size: int = DEFAULT_SHARD_SIZE,
                   dtype: str = "float32", overwrite: bool = False,
                   image_sets: Mapping[str, ImageSet] | None = None) -> EmbeddingPlan:
    """Check the inputs and decide which shards to compute; writes nothing.

    The inputs are checked first, so that a bad data root or checkpoint stops the run
    before ``overwrite`` deletes anything: every split is loaded (``image_sets``: already
    loaded ones, by split name) and the model is built once (it gives the dim and fails
    on a bad checkpoint). Then the stored manifest is compared with the requested
    settings (:class:`EmbeddingManifestMismatch` unless ``overwrite``, which plans every
    shard; :func:`run_embedding` moves the old folder aside, restored if the new one fails)."""
    folder = Path(folder)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    image_sets = dict(image_sets or {})
    for spec in dataset_specs:
        if spec.split not in image_sets:
            image_sets[spec.split] = spec.load()
    dim = build_model(backbone_spec, seed).dim
    sha = checkpoint_hash(backbone_spec)
    wanted = new_manifest(backbone_spec, sha, dim, dtype, seed)
    wanted["checkpoint"] = experiment_relative(wanted["checkpoint"], folder.parent)
    existing = read_manifest(folder) if not overwrite and (folder / MANIFEST_NAME).exists() else None
    if existing is not None:
        check_manifest(folder, existing, wanted)
        manifest = dict(existing, checkpoint=wanted["checkpoint"])  # the path may move; the hash must match
    else:
        manifest = wanted
    splits = [plan_split(folder, existing, spec, image_sets[spec.split], shard_size) for spec in dataset_specs]
    return EmbeddingPlan(folder, backbone_spec, int(seed), int(batch_size), dtype, dim, sha, manifest, splits,
                         overwrite)


# ----------------------------------------------------------------------------- run


def record_split(folder: Path, split: SplitPlan) -> None:
    """Remove what does not belong to the split's plan: an older plan's shard files and
    temporary files of writers killed mid-write (one embed run per experiment at a time
    is assumed, so none of them belongs to a live writer)."""
    planned = {s.file for s in split.shards}
    for name in split.stale:
        (folder / name).unlink(missing_ok=True)
    # files the plan does not list would be harmless to the reader, but are removed so
    # the folder holds one embedding
    for path in folder.glob(f"{split.split}-*.parquet"):
        if path.name not in planned:
            path.unlink()
    for path in folder.glob(f".{split.split}-*.parquet.*.tmp"):
        path.unlink(missing_ok=True)


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
    write_json(folder / MANIFEST_NAME, manifest)
    return entry


def shard_key(item: tuple[DatasetSpec, Shard]) -> str:
    """How a work item is named in messages (and selected by tests' fault injection)."""
    return item[1].file


def run_embedding(plan: EmbeddingPlan, runtime: Runtime, *, actors: int | None = None,
                  threads: int | None = None, progress: bool = True) -> dict:
    """:func:`compute_embedding`; with ``plan.overwrite`` the old folder (shards and
    manifest) is moved aside first and restored when the new embedding fails, on any
    error or interrupt before every split passed its id check (:func:`attribution.artifacts.aside`)."""
    if not plan.overwrite:
        return compute_embedding(plan, runtime, actors=actors, threads=threads, progress=progress)
    with aside([plan.folder]):
        return compute_embedding(plan, runtime, actors=actors, threads=threads, progress=progress)


def compute_embedding(plan: EmbeddingPlan, runtime: Runtime, *, actors: int | None = None,
                      threads: int | None = None, progress: bool = True) -> dict:
    """Compute the plan's pending shards on ``runtime``'s "embed" pool and write them.

    The manifest records the plan first (the splits incomplete), each shard's table is
    written atomically by this process as it arrives, and a split is marked complete
    after its ids were checked, so an interrupted run leaves finished shards that a
    rerun skips. ``actors``: pool size (None: the resources module's choice);
    ``threads``: torch threads (and CPUs) per worker.

    Returns ``splits`` (per split: rows, shards, computed, complete), ``dim``, ``dtype``,
    ``path``, ``actors``, ``workers`` (worker name -> shards it embedded), ``requeued``
    (shards put back after a lost worker), ``retried``, ``seconds``, ``images_per_s``.
    """
    start = time.perf_counter()
    folder = plan.folder  # with --overwrite, run_embedding moved the old one aside
    folder.mkdir(parents=True, exist_ok=True)
    for split in plan.splits:
        record_split(folder, split)
        plan.manifest["splits"][split.split] = split.entry
    write_json(folder / MANIFEST_NAME, plan.manifest)

    summary = {s.split: {"rows": len(s.image_set), "shards": len(s.shards), "computed": 0, "complete": False}
               for s in plan.splits}
    work = plan.work
    workers: dict[str, int] = {}
    size = requeued = retried = replaced = 0
    if work:
        request = PoolRequest("embed", actors=actors or None, max_items=len(work), threads=max(1, int(threads or 1)))
        checkpoint_bytes = Path(plan.backbone_spec.checkpoint).read_bytes() if plan.checkpoint_sha256 else None
        queue = runtime.queue(request, Embedder, plan.backbone_spec, plan.seed, plan.batch_size, plan.dtype,
                              plan.checkpoint_sha256, threads, runtime.device(request), checkpoint_bytes,
                              depth=IN_FLIGHT_PER_WORKER, key=shard_key)
        total = sum(s["rows"] for s in summary.values())
        bar = _progress(total, total - sum(shard.rows for _, shard in work), progress)
        try:
            with queue:  # closed on any exit: frees the CPUs / GPUs for the next stage
                size = queue.size
                for done in queue.map(work):
                    spec, shard = done.item
                    table = done.result
                    if table.num_rows != shard.rows:
                        raise EmbeddingError(f"shard {shard.file} came back with {table.num_rows} rows, "
                                             f"planned {shard.rows}")
                    write_table(table, folder / shard.file)
                    summary[spec.split]["computed"] += 1
                    workers[done.worker] = workers.get(done.worker, 0) + 1
                    bar.update(shard.rows)
                requeued, retried, replaced = queue.requeued, queue.retried, queue.replaced
        finally:
            bar.close()
    for split in plan.splits:
        finalize_split(folder, plan.manifest, split.image_set)
        summary[split.split]["complete"] = True
    seconds = time.perf_counter() - start
    computed_rows = sum(shard.rows for _, shard in work)
    return {"splits": summary, "dim": plan.dim, "dtype": plan.dtype, "path": str(folder), "actors": size,
            "workers": workers, "requeued": requeued, "retried": retried, "replaced": replaced,
            "seconds": round(seconds, 2),
            "images_per_s": round(computed_rows / seconds, 1) if computed_rows else None}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="embed", disable=not enabled,
                mininterval=1.0, dynamic_ncols=True)


def embed_datasets(folder: str | os.PathLike, dataset_specs: Sequence[DatasetSpec], backbone_spec, *,
                   seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, shard_size: int = DEFAULT_SHARD_SIZE,
                   dtype: str = "float32", overwrite: bool = False, runtime: Runtime | None = None,
                   actors: int | None = None, threads: int | None = None, progress: bool = False) -> dict:
    """Embed splits into ``folder``: :func:`plan_embedding` then :func:`run_embedding`.

    ``runtime`` defaults to an in-process one on the CPU (one worker in this process,
    torch's thread setting left as it is unless ``threads``). Returns
    :func:`run_embedding`'s summary."""
    if runtime is None:
        from attribution.workqueue import InProcessRuntime

        runtime = InProcessRuntime()
    plan = plan_embedding(folder, dataset_specs, backbone_spec, seed=seed, batch_size=batch_size,
                          shard_size=shard_size, dtype=dtype, overwrite=overwrite)
    return run_embedding(plan, runtime, actors=actors, threads=threads, progress=progress)
