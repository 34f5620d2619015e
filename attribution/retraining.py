"""The retraining pieces every retraining stage shares (support, TRAK, Datamodels, LDS).

- :class:`Recipe`: the retraining recipe of a preset section (model, epochs, batch
  size, lr on top of :data:`attribution.retrain.RECIPES`), and
  :func:`recipe_fingerprint`, the key of every stored training.
- :func:`training_arrays`: what a retraining worker needs of the training set.
- :class:`RetrainWorker`: a pool worker (:class:`attribution.workqueue.QueueWorker`)
  that holds the training set and the target images once and trains one model per
  item, or a group of items' models at once (:meth:`RetrainWorker.run_group`; the pool
  key ``models_per_worker``, for recipes with the stacked engine): ``{"kind": "train", ...}`` (a removal / relabel change, evaluated on one
  target), ``{"kind": "ensemble", ...}`` (a full-data model, logits on every target)
  and ``{"kind": "subset", ...}`` (a subset model, margins on every target).
- :class:`PartLog`: finished units appended to a folder as small Parquet part files
  written atomically (the trainings log of the support search, the subset models of
  Datamodels): the unit of resume.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from attribution.artifacts import fingerprint, read_dataset, stored_settings, visible_files, write_table
from attribution.settings import Section, setting
from attribution.workqueue import BatchingQueue, ItemFailed, NotRetried, PoolRequest, QueueWorker, WorkQueue


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """A retraining recipe: a model (or a RECIPES key) with optional overrides."""

    model: str = "mlp"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    width: int | None = None
    engine: str | None = None
    precision: str | None = None

    def train_config(self, device: str | None = None):
        """The :class:`attribution.retrain.TrainConfig`; ``device`` given: as the pool's
        resources decided (not second-guessed here), else CUDA when this process has it."""
        from attribution import retrain

        overrides = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "width": self.width,
                     "engine": self.engine, "precision": self.precision}
        if device is not None:
            overrides["device"] = device
        return retrain.make_config(self.model, resolve_device=device is None, **overrides)


@dataclass
class RetrainPoolSettings(Section):
    """The pool keys every retraining section shares ([support], [datamodels])."""

    actors: int | None = setting(None, low=0, help="workers; 0 / unset: one per CPU (or per GPU share)")
    gpus_per_actor: float | None = setting(None, low=0.0, help="GPU share per worker; unset: 0 without GPUs, "
                                                               "else 1 (big models) or 0.25 (small)")
    queue_depth: int = setting(2, low=1, help="items queued per worker (hides driver round trips)")
    max_retries: int = setting(2, low=0, help="a failed training is retried this many times")
    flush_every: int = setting(32, low=1, help="finished units per part file of the log ...")
    flush_seconds: float = setting(15.0, low=0.0, low_open=True, help="... or a part at least this often")
    models_per_worker: int = setting(16, low=1, help="models a worker trains at once (recipes with engine "
                                                     "'stacked'; the module engine trains one per item); 1: one "
                                                     "model per queue item")

    def pool_request(self, model: str, max_items: int | None = None) -> PoolRequest:
        """The retraining pool these keys describe, for ``model``."""
        return PoolRequest("retrain", actors=self.actors or None, max_items=max_items, model=model,
                           gpus_per_actor=self.gpus_per_actor)

    def group_size(self, config) -> int:
        """Models per queue item for recipe ``config``: ``models_per_worker`` when its
        engine trains many at once, else 1 (grouping alone would only delay results)."""
        return int(self.models_per_worker) if config.engine == "stacked" else 1

    def open_queue(self, runtime, request: PoolRequest, config, train: dict, targets: dict, key=None) -> WorkQueue:
        """The retraining queue of :class:`RetrainWorker` workers for recipe ``config``:
        items in groups of :meth:`group_size` (:class:`attribution.workqueue.BatchingQueue`),
        one Completed per item either way."""
        return BatchingQueue.open(runtime, self.group_size(config), request, RetrainWorker, config.to_dict(), train,
                                  targets, depth=self.queue_depth, max_retries=self.max_retries, key=key)


def recipe_fingerprint(config, data_key: dict, base_seed: int, n_train: int) -> str:
    """Key of everything that changes a training's outcome apart from its own change."""
    return fingerprint({"config": config.fingerprint(), "data": data_key, "base_seed": int(base_seed),
                        "n_train": int(n_train)})


def training_arrays(data) -> dict:
    """What retraining workers need of a training ImageSet: its pixels when they fit in
    memory, else the ImageSet itself (paths; workers decode batches from shared files)."""
    images = {"images": data.images(np.arange(len(data)))} if data.in_memory else {"image_set": data}
    return {**images, "labels": np.asarray(data.labels, np.int64), "ids": np.asarray(data.ids, np.int64),
            "mean": tuple(data.mean), "std": tuple(data.std), "num_classes": int(data.num_classes)}


def target_arrays(test_set, target_ids) -> dict:
    """images, labels, ids of the targets (test images) a retraining worker evaluates."""
    target_ids = np.asarray(target_ids, np.int64)
    positions = test_set.positions_of(target_ids)
    return {"images": test_set.images(positions), "labels": np.asarray(test_set.labels[positions], np.int64),
            "ids": target_ids}


# ----------------------------------------------------------------------------- worker


class RetrainWorker(QueueWorker):
    """Holds the training set and the target images; trains one model per item."""

    def __init__(self, config: dict, train: dict, targets: dict, threads: int = 1):
        import torch

        from attribution import retrain

        torch.set_num_threads(threads)  # one thread per worker: robust when cores are shared
        if config["device"].startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"worker on {os.uname().nodename} got a GPU share but torch sees no CUDA device: "
                               "install a CUDA build of torch there or set gpus_per_actor = 0")
        self.config = retrain.TrainConfig(**config)
        # Ray hands numpy arrays over read-only from the object store; copy once here.
        images = np.array(train["images"]) if "images" in train else train["image_set"]
        self.trainer = retrain.Retrainer(self.config, images, np.array(train["labels"]), np.array(train["ids"]),
                                         train["mean"], train["std"], train["num_classes"])
        self.target_x = retrain.to_tensor(np.array(targets["images"]), train["mean"], train["std"])
        self.target_labels = np.asarray(targets["labels"], dtype=np.int64)
        self.target_pos = {int(t): i for i, t in enumerate(targets["ids"])}

    def __call__(self, job: dict) -> dict:
        result = self.run_group([job])[0]
        if isinstance(result, ItemFailed):
            raise result.error
        return result

    def run_group(self, jobs) -> list:
        """Train the models of ``jobs`` together (the recipe's engine: all at once when
        stacked) and evaluate each as its kind says. A job whose input is wrong (a
        :class:`attribution.workqueue.NotRetried` error, found before any training)
        gets an :class:`ItemFailed` and costs no model; the others are trained. Each
        result's ``seconds`` is the group's time divided by the models it trained."""
        start = time.perf_counter()
        results: list = [None] * len(jobs)
        valid = []
        for index, job in enumerate(jobs):
            try:
                change = self._change(job)
            except NotRetried as error:
                results[index] = ItemFailed(error)
                continue
            valid.append((index, job, change))
        models = self.trainer.train_many([change for _, _, change in valid]) if valid else []
        for (index, job, _), model in zip(valid, models):
            results[index] = self._evaluate(job, model)
        seconds = (time.perf_counter() - start) / max(1, len(valid))
        for index, job, _ in valid:
            if "seconds" in results[index]:
                results[index]["seconds"] = seconds
        return results

    def _change(self, job: dict):
        """The training a job asks for, checked before any training (wrong kind, unknown
        target or ids, nothing left to train on: a NotRetried error)."""
        from attribution.batched_retrain import Change
        from attribution.retrain import RetrainInputError

        kind = job.get("kind", "train")
        if kind not in ("train", "ensemble", "subset"):
            raise RetrainInputError(f"unknown retraining job kind {kind!r}: one of 'train', 'ensemble', 'subset'")
        if kind == "train":
            self._target_position(job["target_id"])
        change = Change(job.get("removed_ids", ()), job.get("relabel_ids", ()) if kind == "train" else (),
                        job.get("relabel_to") if kind == "train" else None, int(job["torch_seed"]))
        self.trainer.checked_training_set(change.removed_ids, change.relabel_ids, change.relabel_to)
        return change

    def _evaluate(self, job: dict, model) -> dict:
        """What a job's kind returns of its trained model."""
        kind = job.get("kind", "train")
        if kind == "train":  # correctness and margin on its target
            from attribution import retrain

            pos = self._target_position(job["target_id"])
            logits = self.trainer.logits(model, self.target_x[pos:pos + 1])[0]
            correct, margin = retrain.evaluate_target(logits, self.target_labels[pos])
            return {"correct": correct, "margin": margin, "seconds": 0.0}
        if kind == "ensemble":  # a full-data model's logits on every target
            return {"logits": self.trainer.logits(model, self.target_x)}
        from attribution.baselines.datamodels import margins_from_logits

        # a subset model (trained without removed_ids): its margin on every target
        margins = margins_from_logits(self.trainer.logits(model, self.target_x), self.target_labels)
        return {"margins": margins.astype(np.float32), "seconds": 0.0}

    def _target_position(self, target_id: int) -> int:
        from attribution.retrain import UnknownIds

        try:
            return self.target_pos[int(target_id)]
        except KeyError:
            raise UnknownIds(f"target {target_id} is not among this pool's {len(self.target_pos)} targets (the "
                             "queue's items and the targets its workers were built with must agree)") from None

    def ensemble_member(self, torch_seed: int) -> np.ndarray:
        """A full-data model's logits on every target."""
        return self({"kind": "ensemble", "torch_seed": torch_seed})["logits"]


# ----------------------------------------------------------------------------- part log


class PartLog:
    """Appends rows to ``folder`` as atomically written Parquet part files.

    Each part carries ``settings`` in its metadata (:func:`read_parts` refuses parts made
    with other settings). Rows are flushed every ``flush_every`` rows or
    ``flush_seconds``, and by :meth:`flush` (call it in a ``finally``: what finished is
    kept when the run is interrupted)."""

    def __init__(self, folder: str | os.PathLike, schema: pa.Schema, settings: dict | None = None,
                 flush_every: int = 32, flush_seconds: float = 15.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema, self.settings = schema, settings
        self.flush_every, self.flush_seconds = int(flush_every), float(flush_seconds)
        self.rows: list[dict] = []
        # unique per driver run: two runs in one process never overwrite each other's parts
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.time_ns() % 10**9:09d}"
        self.parts = 0
        self.last_flush = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        table = pa.table({name: [row.get(name) for row in self.rows] for name in self.schema.names}, schema=self.schema)
        write_table(table, self.folder / f"part-{self.run_id}-{self.parts:05d}.parquet", settings=self.settings)
        self.parts += 1
        self.rows = []


def read_parts(folder: str | os.PathLike, settings: dict | None = None, fix: str = "", schema: pa.Schema | None = None):
    """The rows of a part-file folder as a pyarrow Table (None when there are none);
    with ``settings``, a part stored with other settings is refused
    (:class:`attribution.artifacts.SettingsChanged`). With ``schema``, parts are read as
    that schema: columns an older part lacks are null (a log whose schema grew stays
    readable; without it the first part's schema would decide and drop new columns)."""
    from attribution.artifacts import check_settings

    parts = visible_files(folder)
    if not parts:
        return None
    if settings is not None:
        for path in parts:
            stored = stored_settings(path)
            if stored != settings:
                check_settings(str(path), stored, settings, fix)
    if schema is not None:
        import pyarrow.dataset as ds

        return ds.dataset([str(p) for p in parts], format="parquet", schema=schema).to_table()
    return read_dataset(folder)
