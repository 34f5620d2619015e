"""The Datamodels baseline stage on Ray: subset trainings, regressions, rankings, LDS data.

For every target the rank stage ranked (the targets in EXP/rankings of the rank
methods), Datamodels (Ilyas et al. 2022; :mod:`attribution.baselines.datamodels`)
trains ``models`` models on seeded random alpha-subsets of the training set, records
each model's margin on every target, and fits one l1 linear regression per target;
the coefficients rank the training images (method ``"datamodels"``). ``lds_models``
more subset models, never seen by the regression, are the held-out models of the LDS
metric (EXP/lds/).

Ray shape: the trainings go to a pool of :class:`DatamodelWorker` actors (the support
stage's :class:`cluster.support.RetrainWorker`, which holds the training set and the
target images once, plus one method that returns the margins of every target); one
CPU and one torch thread each, or a fraction of a GPU on GPU nodes. The regressions
run as one Ray task per class of targets. Only the driver writes to EXP.

Outputs (all atomic):
- ``EXP/datamodels/models/part-*.parquet``: finished models (model_id, packed mask,
  margins of every target, seconds, ...) in small part files: the unit of resume.
- ``EXP/datamodels/masks.parquet`` (model_id, train_id: one row per image a model saw)
  and ``EXP/datamodels/margins.parquet`` (model_id, target_id, margin): the regression's
  models, ids 0 .. models-1.
- ``EXP/lds/masks.parquet``, ``EXP/lds/margins.parquet``: the held-out LDS models,
  ids ``LDS_MODEL_OFFSET`` + 0 .. lds_models-1.
- ``EXP/datamodels/regressions/coef-classNNN.parquet`` (target_id, train_id, coef; the
  non-zero coefficients) and ``targets-classNNN.parquet`` (per target: intercept,
  chosen regularisation, held-out errors, ...).
- ``EXP/rankings/datamodels-classNNN.parquet``: the rankings, schema of
  :data:`attribution.ranking.RANKING_SCHEMA`.

Resume: a model's subset and torch seed depend only on (seed, model id), so a rerun
trains only the model ids missing from the part files, and a class whose ranking file
exists is skipped. Changed settings are refused with the differing keys named.

Preset section ``[datamodels]``: see :class:`DatamodelSettings`.
"""

from __future__ import annotations

from cluster.workers import ActorSlots

from attribution.presets import section_settings

from attribution.experiment import settings_differences
from attribution.ranking import ranked_targets

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution import retrain
from attribution.baselines.datamodels import (
    METHOD,
    DatamodelRegression,
    datamodel_rankings,
    fit_summary,
    margins_from_logits,
    subset_mask,
)
from attribution.experiment import Experiment, read_dataset, write_table_atomic
from attribution.ranking import METHODS, ranking_file_name, sort_rankings
from cluster.support import DriverStopped, RetrainWorker, SupportSettings, TrainingLog, _data_arrays, recipe_fingerprint

LDS_MODEL_OFFSET = 1_000_000  # LDS model ids: one id space with the regression's models, never overlapping
TRAINING_KEY = b"attribution.datamodels.training"
REGRESSION_KEY = b"attribution.datamodels.regression"
PART_SCHEMA = pa.schema([
    ("model_id", pa.int64()), ("mask", pa.binary()), ("margins", pa.list_(pa.float32())),
    ("seconds", pa.float32()), ("torch_seed", pa.int64()), ("attempt", pa.int32()), ("worker", pa.string()),
    ("finished_at", pa.float64()),
])
MASK_SCHEMA = pa.schema([("model_id", pa.int64()), ("train_id", pa.int64())])
MARGIN_SCHEMA = pa.schema([("model_id", pa.int64()), ("target_id", pa.int64()), ("margin", pa.float32())])
COEF_SCHEMA = pa.schema([("target_id", pa.int64()), ("train_id", pa.int64()), ("coef", pa.float32())])
TARGET_SCHEMA = pa.schema([
    ("target_id", pa.int64()), ("label", pa.int64()), ("intercept", pa.float64()), ("alpha", pa.float64()),
    ("alpha_index", pa.int32()), ("n_alphas_tried", pa.int32()), ("n_nonzero", pa.int32()),
    ("heldout_mse", pa.float64()), ("heldout_mse_zero_model", pa.float64()), ("heldout_r2", pa.float64()),
    ("fit_models", pa.int32()), ("heldout_models", pa.int32()), ("seconds", pa.float32()),
])


# ----------------------------------------------------------------------------- settings


@dataclass
class DatamodelSettings:
    """The [datamodels] section of a preset (every field has a default)."""

    models: int = 400                  # subset models the regression sees (reference: 300k on CIFAR-10)
    alpha: float = 0.5                 # fraction of the training set each model trains on (reference 0.5)
    lds_models: int = 100              # held-out subset models for LDS only (EXP/lds); 0: none
    same_class: bool = False           # False: rank every training image (native); True: only the target's class
    top_k: int | None = None           # rows per target; None: the rank stage's top_k
    seed: int | None = None            # masks, torch seeds, held-out split; None: the preset's seed
    model: str | None = None           # recipe; None: the [support] section's (model, epochs, batch_size, lr)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    heldout_fraction: float = 0.2      # models held out to choose each target's l1 strength
    n_alphas: int = 30                 # l1 path: geometric grid from alpha_max ...
    eps: float = 1e-3                  # ... down to eps * alpha_max
    patience: int | None = 5           # stop a path after this many strengths without held-out improvement
    actors: int | None = None          # None / 0: one per CPU (or per GPU share)
    gpus_per_actor: float | None = None  # None: 0 without GPUs; 1 (big models) or 0.25 (small) with
    queue_depth: int = 2               # calls queued per actor
    max_retries: int = 2               # a failed training is retried this many times
    flush_every: int = 32              # models per part file ...
    flush_seconds: float = 15.0        # ... or at least this often

    @classmethod
    def from_preset(cls, preset: dict) -> "DatamodelSettings":
        settings = section_settings(cls, preset, "datamodels")

        def integer(name, low):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"datamodels.{name} must be an integer >= {low}, got {value!r}")

        integer("models", 4)
        integer("lds_models", 0)
        if 0 < settings.lds_models < 3:
            raise ValueError(f"datamodels.lds_models must be 0 or at least 3 (LDS correlates over models), "
                             f"got {settings.lds_models}")
        if not 0.0 < float(settings.alpha) < 1.0:
            raise ValueError(f"datamodels.alpha (fraction of the training set per model) must be in (0, 1), "
                             f"got {settings.alpha!r}")
        if settings.top_k is not None:
            integer("top_k", 1)
        if not 0.0 < float(settings.heldout_fraction) < 1.0:
            raise ValueError(f"datamodels.heldout_fraction must be in (0, 1), got {settings.heldout_fraction!r}")
        n_held = int(round(settings.heldout_fraction * settings.models))
        if n_held < 2 or settings.models - n_held < 2:
            raise ValueError(f"datamodels.models={settings.models} with heldout_fraction="
                             f"{settings.heldout_fraction} leaves {n_held} held-out models; need >= 2 held-out "
                             "and >= 2 fitting models (raise models)")
        integer("n_alphas", 2)
        if not 0.0 < float(settings.eps) < 1.0:
            raise ValueError(f"datamodels.eps must be in (0, 1), got {settings.eps!r}")
        if settings.patience is not None:
            integer("patience", 1)
        integer("queue_depth", 1)
        integer("max_retries", 0)
        settings.same_class = bool(settings.same_class)
        return settings

    def support_settings(self, preset: dict) -> SupportSettings:
        """The [support] recipe with this section's recipe fields applied (None: keep [support]'s)."""
        support = SupportSettings.from_preset(preset)
        overrides = {k: getattr(self, k) for k in ("model", "epochs", "batch_size", "lr") if getattr(self, k)}
        return replace(support, **overrides)

    def regression(self, progress: bool = False) -> DatamodelRegression:
        return DatamodelRegression(n_alphas=self.n_alphas, eps=self.eps, heldout_fraction=self.heldout_fraction,
                                   patience=self.patience, seed=self.seed, progress=progress)




def _sha(values) -> str:
    return hashlib.sha256(np.asarray(values, np.int64).tobytes()).hexdigest()[:16]


def _metadata(path: Path, key: bytes) -> dict | None:
    stored = (pq.read_schema(path).metadata or {}).get(key)
    return json.loads(stored) if stored else None


# ----------------------------------------------------------------------------- worker


class DatamodelWorker(RetrainWorker):
    """The support stage's worker plus one call: train on a subset, margins of every target."""

    def subset_margins(self, job: dict) -> dict:
        if (job["model_id"],) in self.fail_once and job["attempt"] == 0:
            raise RuntimeError(f"injected failure for model {job['model_id']} (test hook)")
        start = time.perf_counter()
        model = self.trainer.train(removed_ids=job["removed_ids"], seed=job["torch_seed"])
        margins = margins_from_logits(self.trainer.logits(model, self.target_x), self.target_labels)
        return {"margins": margins.astype(np.float32), "seconds": time.perf_counter() - start,
                "worker": self.name}


class ModelLog(TrainingLog):
    """Finished subset models as atomically written part files (the unit of resume)."""

    def __init__(self, folder: Path, fingerprint: dict, flush_every: int = 32, flush_seconds: float = 15.0):
        super().__init__(folder, flush_every, flush_seconds)
        self.fingerprint = json.dumps(fingerprint, sort_keys=True).encode()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        table = pa.table({name: [row[name] for row in self.rows] for name in PART_SCHEMA.names}, schema=PART_SCHEMA)
        table = table.replace_schema_metadata({TRAINING_KEY: self.fingerprint})
        write_table_atomic(table, self.folder / f"part-{self.run_id}-{self.parts:05d}.parquet")
        self.parts += 1
        self.rows = []


def read_models(folder: Path, fingerprint: dict) -> dict:
    """{model_id: {mask (bool), margins, seconds}} of the part files; refuses other settings."""
    folder = Path(folder)
    parts = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.exists() else []
    for path in parts:
        stored = _metadata(path, TRAINING_KEY)
        if stored != fingerprint:
            raise ValueError(
                f"{path} holds models trained with other settings ({settings_differences(stored or {}, fingerprint)}); "
                f"delete {folder.parent} and {folder.parent.parent / 'lds'} to retrain, or use a new --exp")
    if not parts:
        return {}
    table = read_dataset(folder).to_pandas()
    table = table.drop_duplicates("model_id", keep="first")
    n_train = int(fingerprint["n_train"])
    return {int(r.model_id): {"mask": np.unpackbits(np.frombuffer(r.mask, np.uint8), count=n_train).astype(bool),
                              "margins": np.asarray(r.margins, np.float32), "seconds": float(r.seconds)}
            for r in table.itertuples(index=False)}


# ----------------------------------------------------------------------------- trainings on Ray


class SubsetTrainer:
    """Trains subset models on a pool of Ray actors, retrying failures, logging each model.

    Parameters
    ----------
    train, targets : dicts as the support stage's workers take them
    settings : DatamodelSettings (pool size, queue depth, retries, flushing)
    recipe : SupportSettings whose train_config is the recipe
    log : ModelLog
    fail_once : test hook, model ids whose first attempt raises
    stop_after : test hook, stop (losing unflushed rows, like a kill) after this many models
    """

    def __init__(self, train: dict, targets: dict, settings: DatamodelSettings, recipe: SupportSettings,
                 log: ModelLog, fail_once: Sequence[int] = (), stop_after: int | None = None,
                 progress: bool = True):
        self.train, self.targets, self.settings, self.recipe, self.log = train, targets, settings, recipe, log
        self.fail_once = [(int(m),) for m in fail_once]
        self.stop_after, self.progress = stop_after, progress
        self.trained: list[int] = []
        self.failures = 0
        self.actors: ActorSlots | None = None

    def _pool(self, n_jobs: int):
        import ray

        from cluster.resources import ACTOR_CPUS, retrain_pool_shape

        s = self.settings
        n, share = retrain_pool_shape(ray.cluster_resources(), self.recipe.model, s.actors, s.gpus_per_actor)
        self.config = self.recipe.train_config("cuda" if share > 0 else "cpu")
        self._refs = (ray.put(self.train), ray.put(self.targets))
        self._actor_cls = ray.remote(num_cpus=ACTOR_CPUS, num_gpus=share)(DatamodelWorker)
        # slots, as the support stage: an actor lost with its node is replaced, and takes
        # work only once it is up (a lost node's resources may never come back)
        self.actors = ActorSlots(self._new_actor, max(1, min(n, n_jobs)), max_failed_starts=s.max_retries)
        self.actors.wait_ready()

    def _new_actor(self):
        return self._actor_cls.remote(asdict(self.config), self._refs[0], self._refs[1], 1, self.fail_once)

    def shutdown(self):
        if self.actors:
            self.actors.kill()
        self.actors = None

    def run(self, jobs: list[dict]) -> None:
        """Train every job ({model_id, mask, removed_ids, torch_seed}); results go to the log."""
        import ray
        from tqdm.auto import tqdm

        if not jobs:
            return
        s = self.settings
        self._pool(len(jobs))
        queue = list(reversed(jobs))  # pop() takes the lowest model id first
        pending: dict = {}  # ref -> (job, attempt, actor index)
        load = [0] * len(self.actors)
        bar = tqdm(total=len(jobs), desc=f"datamodel trainings ({len(self.actors)} workers)", unit="model",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)

        def submit(job, attempt):
            usable = self.actors.usable()
            if not usable:  # a retry while every worker is (re)starting: wait for one
                retries.append((job, attempt))
                return
            index = min(usable, key=lambda i: load[i])
            call = {"model_id": job["model_id"], "removed_ids": job["removed_ids"],
                    "torch_seed": job["torch_seed"], "attempt": attempt}
            pending[self.actors[index].subset_margins.remote(call)] = (job, attempt, index)
            load[index] += 1

        retries: list = []
        try:
            while queue or pending or retries:
                self.actors.poll()  # replacements of lost workers that are up take work again
                if retries and self.actors.usable():
                    waiting, retries[:] = list(retries), []
                    for job, attempt in waiting:
                        submit(job, attempt)
                while queue and any(load[i] < s.queue_depth for i in self.actors.usable()):
                    submit(queue.pop(), 0)
                if not pending:  # every worker is (re)starting
                    self.actors.poll(timeout=None)
                    continue
                ready, _ = ray.wait(list(pending) + self.actors.starting_refs(), num_returns=1,
                                    timeout=s.flush_seconds)
                if not ready:
                    self.log.flush()
                    continue
                for ref in ready:
                    if ref not in pending:
                        continue  # a replacement worker answered: actors.poll() puts it in service
                    job, attempt, index = pending.pop(ref)
                    load[index] -= 1
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as error:
                        self._retry(job, attempt, error, submit, replace_actor=index)
                        continue
                    except ray.exceptions.RayTaskError as error:
                        self._retry(job, attempt, error, submit)
                        continue
                    if self.stop_after is not None and len(self.trained) >= self.stop_after:
                        raise DriverStopped(f"stopped after {self.stop_after} models (test hook)")
                    self.trained.append(job["model_id"])
                    self.log.add({"model_id": job["model_id"], "mask": np.packbits(job["mask"]).tobytes(),
                                  "margins": result["margins"], "seconds": result["seconds"],
                                  "torch_seed": job["torch_seed"], "attempt": attempt, "worker": result["worker"],
                                  "finished_at": time.time()})
                    bar.update(1)
            self.log.flush()
        except DriverStopped:
            raise  # unflushed rows are lost, as with a killed driver
        except BaseException:
            self.log.flush()  # keep what finished (Ctrl-C, a training that kept failing, ...)
            raise
        finally:
            bar.close()
            self.shutdown()

    def _retry(self, job, attempt, error, submit, replace_actor=None):
        self.failures += 1
        if replace_actor is not None:  # the worker died (OOM, node lost): replace it once
            self.actors.lost(replace_actor, error)
        if attempt >= self.settings.max_retries:
            self.log.flush()
            raise RuntimeError(
                f"datamodel model {job['model_id']} failed {attempt + 1} times; last error: {error}. Finished "
                "models are saved: fix the cause and rerun the same command to resume "
                "(or raise [datamodels] max_retries).") from error
        print(f"datamodel model {job['model_id']} failed (attempt {attempt + 1}), retrying: "
              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        submit(job, attempt + 1)


# ----------------------------------------------------------------------------- regressions on Ray


def _regressions_on_ray(masks, margins, classes: dict, settings: DatamodelSettings, progress: bool) -> dict:
    """{label: fit_class result} for each {label: target columns}, one Ray task per class."""
    import ray
    from tqdm.auto import tqdm

    masks_ref = ray.put(masks)
    task = ray.remote(num_cpus=1)(fit_summary)
    regression = settings.regression()
    refs = {task.remote(masks_ref, margins[:, cols], regression): label for label, cols in classes.items()}
    out = {}
    with tqdm(total=len(refs), desc="datamodel regressions", unit="class", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            out[refs[ready[0]]] = ray.get(ready[0])
            bar.update(1)
    return out


# ----------------------------------------------------------------------------- the stage




def _write_long_tables(folder: Path, model_ids, masks, margins, train_ids, target_ids, key: dict) -> bool:
    """masks.parquet / margins.parquet of these models; rewritten only when their content key changed."""
    meta = {TRAINING_KEY: json.dumps(key, sort_keys=True).encode()}
    mask_path, margin_path = folder / "masks.parquet", folder / "margins.parquet"
    if all(p.exists() and _metadata(p, TRAINING_KEY) == key for p in (mask_path, margin_path)):
        return False
    model_ids = np.asarray(model_ids, np.int64)
    rows, cols = np.nonzero(masks)
    write_table_atomic(pa.table({"model_id": model_ids[rows], "train_id": np.asarray(train_ids)[cols]},
                                schema=MASK_SCHEMA).replace_schema_metadata(meta), mask_path)
    n_models, n_targets = margins.shape
    write_table_atomic(pa.table({"model_id": np.repeat(model_ids, n_targets),
                                 "target_id": np.tile(np.asarray(target_ids, np.int64), n_models),
                                 "margin": margins.reshape(-1).astype(np.float32)},
                                schema=MARGIN_SCHEMA).replace_schema_metadata(meta), margin_path)
    return True


def estimate_datamodels(exp: Experiment, train: dict, targets: dict, settings: DatamodelSettings,
                        recipe: SupportSettings, data_key: dict, top_k: int, address: str | None = None,
                        fail_once: Sequence[int] = (), stop_after: int | None = None, progress: bool = True,
                        num_cpus: int | None = None) -> dict:
    """Everything after loading: trainings, long tables, regressions, rankings, manifest."""
    import pandas as pd

    start = time.perf_counter()
    s = settings
    root = exp.root / "datamodels"
    models_dir, regressions_dir, lds_dir = root / "models", root / "regressions", exp.root / "lds"
    order = np.argsort(train["ids"], kind="stable")  # masks are over training ids in ascending order
    train_ids = np.asarray(train["ids"], np.int64)[order]
    train_labels = np.asarray(train["labels"], np.int64)[order]
    target_ids = np.asarray(targets["ids"], np.int64)
    target_labels = np.asarray(targets["labels"], np.int64)
    n_train = len(train_ids)
    config = recipe.train_config()
    training_key = {"recipe": recipe_fingerprint(config, data_key, s.seed, n_train), "model": config.model,
                    "epochs": config.epochs, "data": data_key, "n_train": n_train, "alpha": float(s.alpha),
                    "seed": int(s.seed), "train_ids": _sha(train_ids), "targets": _sha(target_ids),
                    "n_targets": len(target_ids)}
    regression_key = {"training": training_key["recipe"], "alpha": float(s.alpha), "seed": int(s.seed),
                      "models": s.models, "heldout_fraction": s.heldout_fraction, "n_alphas": s.n_alphas,
                      "eps": s.eps, "patience": s.patience, "same_class": s.same_class, "top_k": int(top_k)}

    # refuse changed settings before any training: stored models first, then the regressions
    known = read_models(models_dir, training_key)
    classes = {int(c): np.flatnonzero(target_labels == c) for c in np.unique(target_labels)}
    todo, reused_files = {}, []
    for label, cols in classes.items():
        key = dict(regression_key, targets=_sha(target_ids[cols]))
        path = exp.rankings / ranking_file_name(METHOD, label)
        coef_path = regressions_dir / f"coef-class{label:03d}.parquet"
        summary_path = regressions_dir / f"targets-class{label:03d}.parquet"
        if path.exists():
            stored = _metadata(path, REGRESSION_KEY) or {}
            if stored != key:
                raise ValueError(
                    f"{path} was computed with other [datamodels] settings ({settings_differences(stored, key)}); delete "
                    f"{exp.rankings}/datamodels-*.parquet and {regressions_dir} to recompute, or use a new --exp")
            if coef_path.exists() and summary_path.exists():
                reused_files.append(path.name)
                continue
        todo[label] = (cols, key, path, coef_path, summary_path)

    if s.lds_models:  # metrics.load_lds_data takes the training set to be every id in the LDS masks
        seen = np.zeros(n_train, bool)
        for m in range(s.lds_models):
            seen |= subset_mask(n_train, s.alpha, s.seed, LDS_MODEL_OFFSET + m)
        if not seen.all():
            raise ValueError(
                f"datamodels.lds_models={s.lds_models} subsets leave {int((~seen).sum())} of {n_train} training "
                "images out of every LDS model, and the LDS metric takes the training set from those masks; "
                f"raise lds_models (about log2({n_train}) / -log2(1 - alpha) + 5 covers every image) or set 0")

    # 1) subset trainings: only the model ids not in the part files
    fit_ids = np.arange(s.models, dtype=np.int64)
    lds_ids = LDS_MODEL_OFFSET + np.arange(s.lds_models, dtype=np.int64)
    needed = [int(m) for m in np.concatenate([fit_ids, lds_ids]) if int(m) not in known]
    trainer = None
    if needed:
        from cluster.runtime import ensure_ray

        ensure_ray(address, num_cpus=num_cpus)
        log = ModelLog(models_dir, training_key, s.flush_every, s.flush_seconds)
        jobs = []
        for model_id in needed:
            mask = subset_mask(n_train, s.alpha, s.seed, model_id)
            jobs.append({"model_id": model_id, "mask": mask, "removed_ids": train_ids[~mask],
                         "torch_seed": retrain.training_seed(s.seed, model_id)})
        trainer = SubsetTrainer(train, targets, s, recipe, log, fail_once, stop_after, progress)
        trainer.run(jobs)
        known = read_models(models_dir, training_key)

    def stack(ids):
        missing = [int(m) for m in ids if int(m) not in known]
        if missing:
            raise RuntimeError(f"models {missing[:5]} are missing from {models_dir} after training (a bug)")
        for m in ids:  # a stored mask must be the one its seed draws (guards against edited files)
            if not np.array_equal(known[int(m)]["mask"], subset_mask(n_train, s.alpha, s.seed, int(m))):
                raise ValueError(f"model {int(m)}'s stored mask in {models_dir} is not the one seed {s.seed} "
                                 f"draws; delete {models_dir} to retrain")
        masks = np.stack([known[int(m)]["mask"] for m in ids]) if len(ids) else np.zeros((0, n_train), bool)
        margins = (np.stack([known[int(m)]["margins"] for m in ids]) if len(ids)
                   else np.zeros((0, len(target_ids)), np.float32))
        return masks, margins

    fit_masks, fit_margins = stack(fit_ids)
    long_key = dict(training_key, model_ids=_sha(fit_ids))
    _write_long_tables(root, fit_ids, fit_masks, fit_margins, train_ids, target_ids, long_key)
    if s.lds_models:
        lds_masks, lds_margins = stack(lds_ids)
        _write_long_tables(lds_dir, lds_ids, lds_masks, lds_margins, train_ids, target_ids,
                           dict(training_key, model_ids=_sha(lds_ids)))

    # 2) regressions and rankings of the classes not done yet
    computed_files = []
    if todo:
        from cluster.runtime import ensure_ray

        ensure_ray(address, num_cpus=num_cpus)
        results = _regressions_on_ray(fit_masks, fit_margins, {c: v[0] for c, v in todo.items()}, s, progress)
        for label, (cols, key, path, coef_path, summary_path) in sorted(todo.items()):
            r = results[label]
            meta = {REGRESSION_KEY: json.dumps(key, sort_keys=True).encode()}
            t_rows, i_cols = np.nonzero(r["coef"])
            write_table_atomic(pa.table({"target_id": target_ids[cols][t_rows], "train_id": train_ids[i_cols],
                                         "coef": r["coef"][t_rows, i_cols]}, schema=COEF_SCHEMA)
                               .replace_schema_metadata(meta), coef_path)
            n = len(cols)
            per_target = pa.table({
                "target_id": target_ids[cols], "label": target_labels[cols], "intercept": r["intercept"],
                "alpha": r["alpha"], "alpha_index": r["alpha_index"].astype(np.int32),
                "n_alphas_tried": r["n_tried"].astype(np.int32), "n_nonzero": r["n_nonzero"].astype(np.int32),
                "heldout_mse": r["heldout_mse"], "heldout_mse_zero_model": r["heldout_mse_zero"],
                "heldout_r2": r["heldout_r2"], "fit_models": np.full(n, r["fit_models"], np.int32),
                "heldout_models": np.full(n, r["heldout_models"], np.int32),
                "seconds": np.full(n, r["seconds"] / max(1, n), np.float32)}, schema=TARGET_SCHEMA)
            write_table_atomic(per_target.replace_schema_metadata(meta), summary_path)
            table = datamodel_rankings(target_ids[cols], target_labels[cols], r["coef"], train_ids, train_labels,
                                       top_k=top_k, same_class=s.same_class)
            write_table_atomic(sort_rankings(table).replace_schema_metadata(meta), path)  # last: marks the class done
            computed_files.append(path.name)

    # 3) manifest
    summary_table = pd.concat([pd.read_parquet(regressions_dir / f"targets-class{c:03d}.parquet") for c in classes],
                              ignore_index=True)
    trained = trainer.trained if trainer else []
    all_ids = np.concatenate([fit_ids, lds_ids])
    training_seconds = float(sum(known[int(m)]["seconds"] for m in all_ids))
    regularisation = {
        "alpha_median": float(summary_table["alpha"].median()),
        "alpha_min": float(summary_table["alpha"].min()), "alpha_max": float(summary_table["alpha"].max()),
        "strongest_chosen": int((summary_table["alpha_index"] == 0).sum()),  # the all-zero model won
        "nonzero_median": float(summary_table["n_nonzero"].median()),
        "heldout_r2_median": float(summary_table["heldout_r2"].median()),
    }
    did_work = bool(trained or computed_files)
    fields_ = {
        "settings": asdict(s), "recipe": config.to_dict(), "models": s.models, "lds_models": s.lds_models,
        "alpha": s.alpha, "n_train": n_train, "targets": len(target_ids), "top_k": int(top_k),
        "same_class": s.same_class, "regularisation": regularisation, "trained_this_run": len(trained),
        "retried": trainer.failures if trainer else 0, "computed_files": computed_files,
        "reused_files": reused_files, "training_seconds": round(training_seconds, 1),
        "regression_seconds": round(float(summary_table["seconds"].sum()), 1),
        "outputs": ["datamodels/models/", "datamodels/masks.parquet", "datamodels/margins.parquet",
                    "datamodels/regressions/", "rankings/datamodels-*.parquet"]
        + (["lds/masks.parquet", "lds/margins.parquet"] if s.lds_models else []),
        "reused": not did_work,
    }
    wall = round(time.perf_counter() - start, 1)
    if did_work:
        fields_["seconds"] = wall  # a run that only reused keeps the seconds of the run that computed
    exp.record_stage("datamodels", **fields_)
    return {"models": s.models, "lds_models": s.lds_models, "targets": len(target_ids),
            "trained_this_run": len(trained), "retried": fields_["retried"], "computed_files": len(computed_files),
            "reused_files": len(reused_files), "alpha_median": regularisation["alpha_median"],
            "nonzero_median": regularisation["nonzero_median"], "wall_seconds": wall}


def run_datamodels_stage(exp: Experiment, preset: dict, address: str | None = None, **hooks) -> dict:
    """The pipeline's datamodels stage: reads preset['data'], ['datamodels'] (and ['support'], ['rank'])."""
    from attribution.data import load_dataset
    from cluster.ranking import rank_settings

    exp = exp if isinstance(exp, Experiment) else Experiment(exp)
    settings = DatamodelSettings.from_preset(preset)
    recipe = settings.support_settings(preset)
    recipe.train_config()  # a bad model name fails here, before any data is loaded
    top_k = settings.top_k or int((exp.manifest().get("rank") or {}).get("top_k") or rank_settings(preset)["top_k"])
    data = preset.get("data") or {}
    name, root = data.get("dataset", "fashion-mnist"), data.get("root") or None
    per_class = data.get("train_per_class") or None
    data_seed = int(data.get("seed", preset.get("seed", 0)))
    target_ids = ranked_targets(exp, "datamodels")
    train_set = load_dataset(name, "train", root, n_per_class=per_class, seed=data_seed)
    try:  # the rankings must describe this training subset (the LDS compares them on it)
        import pyarrow.compute as pc

        ranked = read_dataset(exp.rankings, columns=["train_id"], filters=pc.field("method").isin(list(METHODS)))
        train_set.positions_of(np.unique(ranked.column("train_id").to_numpy()))
    except KeyError as error:
        raise ValueError(f"{error.args[0]}: the rankings in {exp.rankings} were made on another training subset "
                         "than [data] describes (train_per_class, seed); rerun the rank stage or fix [data]") from error
    test_set = load_dataset(name, "test", root)
    try:
        positions = test_set.positions_of(target_ids)
    except KeyError as error:
        raise ValueError(f"{error.args[0]}: the ranked targets are not in the {name} test split") from error
    targets = {"images": test_set.images(positions), "labels": test_set.labels[positions], "ids": target_ids}
    data_key = {"dataset": name, "root": root, "train_per_class": per_class, "seed": data_seed}
    return estimate_datamodels(exp, _data_arrays(train_set), targets, settings, recipe, data_key, top_k, address,
                               **hooks)
