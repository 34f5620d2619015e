"""Counterfactual support estimation on Ray: many bisection searches at once.

Design (see docs/support.md for the reasoning): Ray Core, not Ray Tune. A pool of
actors (``num_cpus=1``, one torch thread each; a fraction of a GPU each for small
models when the cluster has GPUs) holds the training set as a tensor once and trains
one model per call. The driver owns every search's :class:`BisectionSearch` (a pure
state machine), asks them for trainings, keeps each actor at most ``queue_depth``
calls deep (so a worker never waits for the driver), and records every finished
training in ``EXP/trainings/`` as small Parquet part files written atomically.

Resume: a restarted driver reads ``EXP/trainings/`` (rows of the same recipe), feeds
the outcomes to the searches before proposing anything, and so never repeats a
finished training. Every training's torch seed is fixed by (base seed, seed index),
and the training changes are fixed by (target, method, mode, k), so a rerun reaches
the same supports.

Outputs:
- ``EXP/trainings/part-*.parquet``: target_id, method, mode, k, seed, correct, margin,
  seconds (+ recipe, torch_seed, attempt, worker, speculative).
- ``EXP/support_targets.parquet``: every selected target: label, flip_class, fraction of
  the full-data ensemble that classifies it correctly, status (searched /
  misclassified / unstable; only "searched" targets get searches).
- ``EXP/support.parquet``: target_id, method, mode, support (-1 = not found within the
  limit), trainings, seconds (+ status, limit, flip_class, reference_trainings, recipe).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from attribution.bisection import NOT_FOUND, BisectionSearch, Trial
from attribution.experiment import Experiment, read_dataset, write_table_atomic
from attribution import retrain
from cluster.workers import ActorSlots, worker_name

MODES = ("removal", "mislabel")
TRAINING_COLUMNS = ["target_id", "method", "mode", "k", "seed", "correct", "margin", "seconds"]
TRAININGS_SCHEMA = pa.schema([
    ("target_id", pa.int64()), ("method", pa.string()), ("mode", pa.string()), ("k", pa.int32()),
    ("seed", pa.int32()), ("correct", pa.bool_()), ("margin", pa.float32()), ("seconds", pa.float32()),
    ("recipe", pa.string()), ("torch_seed", pa.int64()), ("attempt", pa.int32()), ("worker", pa.string()),
    ("speculative", pa.bool_()), ("finished_at", pa.float64()),
])
SUPPORT_SCHEMA = pa.schema([
    ("target_id", pa.int64()), ("method", pa.string()), ("mode", pa.string()), ("support", pa.int32()),
    ("trainings", pa.int32()), ("seconds", pa.float32()), ("status", pa.string()), ("limit", pa.int32()),
    ("flip_class", pa.int32()), ("reference_trainings", pa.int32()), ("recipe", pa.string()),
])


# ----------------------------------------------------------------------------- settings


@dataclass
class SupportSettings:
    """The [support] section of a preset (every field has a default)."""

    model: str = "mlp"                 # mlp | cnn | resnet9 | mobilenetv2 | resnet18, or a RECIPES key
    epochs: int | None = None          # None: the recipe's
    batch_size: int | None = None
    lr: float | None = None
    seeds: int = 5                     # trainings per bisection step (reference num_tests)
    first_seeds: int = 1               # trainings at k = limit (reference: 1; 41 = 1 + 8 x 5)
    budget: int = 8                    # bisection steps after the first test
    targets: int | list = 10           # number of seeded random targets among the ranked ones, or ids
    modes: tuple = MODES
    methods: tuple | None = None       # None / empty: every method in EXP/rankings
    top_k: int = 1280                  # the limit, capped by each ranking's length
    ensemble: int = 5                  # full-data models for flip class and target screening
    early_decision: bool = True
    speculate: bool = True             # k-ary: idle workers train k the search may need next
    actors: int | None = None          # None: one per CPU (or per GPU share)
    gpus_per_actor: float | None = None  # None: 0 without GPUs; 1 (big models) or 0.25 (small) with
    queue_depth: int = 2               # calls queued per actor: hides driver round trips
    max_retries: int = 2               # a failed training is retried this many times
    flush_every: int = 32              # trainings per part file ...
    flush_seconds: float = 15.0        # ... or at least this often
    seed: int | None = None            # None: the preset's seed

    @classmethod
    def from_preset(cls, preset: dict) -> "SupportSettings":
        section = dict(preset.get("support") or {})
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown [support] keys {sorted(unknown)}; known: {sorted(known)}")
        settings = cls(**section)
        if settings.seed is None:
            settings.seed = int(preset.get("seed", 0))
        settings.modes = tuple(settings.modes)
        bad = set(settings.modes) - set(MODES)
        if bad or not settings.modes:
            raise ValueError(f"[support] modes must be a non-empty subset of {MODES}, got {list(settings.modes)}")
        settings.methods = tuple(settings.methods) if settings.methods else None
        return settings

    def train_config(self, device: str | None = None) -> retrain.TrainConfig:
        overrides = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        if device is not None:
            overrides["device"] = device  # chosen from the cluster's resources: do not second-guess here
        return retrain.make_config(self.model, resolve_device=device is None, **overrides)


# ----------------------------------------------------------------------------- worker


class RetrainWorker:
    """Holds the training set and the target images; trains one model per call.

    Plain class (wrapped with ``ray.remote`` by the scheduler) so tests and the
    throughput benchmark can run it in-process too.
    """

    def __init__(self, config: dict, train: dict, targets: dict, threads: int = 1,
                 fail_once: Sequence[tuple] = ()):
        import torch

        torch.set_num_threads(threads)  # one thread per worker: robust when cores are shared
        if config["device"].startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"worker on {os.uname().nodename} got a GPU share but torch sees no CUDA device: "
                               "install a CUDA build of torch there or set [support] gpus_per_actor = 0")
        self.config = retrain.TrainConfig(**config)
        # Ray hands numpy arrays over read-only from the object store; copy once here.
        # in-memory arrays, or an ImageSet read batch by batch (ImageNet: every node sees the files)
        images = np.array(train["images"]) if "images" in train else train["image_set"]
        self.trainer = retrain.Retrainer(self.config, images, np.array(train["labels"]),
                                         np.array(train["ids"]), train["mean"], train["std"], train["num_classes"])
        self.target_x = retrain.to_tensor(np.array(targets["images"]), train["mean"], train["std"])
        self.target_labels = np.asarray(targets["labels"], dtype=np.int64)
        self.target_pos = {int(t): i for i, t in enumerate(targets["ids"])}
        self.fail_once = {tuple(key) for key in fail_once}  # test hook: fail the first attempt of these
        self.name = worker_name()  # host:pid@node: the trainings log's worker column

    def ready(self) -> str:
        return self.name

    def train(self, job: dict) -> dict:
        key = (job["target_id"], job["method"], job["mode"], job["k"], job["seed"])
        if key in self.fail_once and job["attempt"] == 0:
            raise RuntimeError(f"injected failure for training {key} (test hook)")
        start = time.perf_counter()
        model = self.trainer.train(job.get("removed_ids", ()), job.get("relabel_ids", ()), job.get("relabel_to"),
                                   job["torch_seed"])
        pos = self.target_pos[job["target_id"]]
        logits = self.trainer.logits(model, self.target_x[pos:pos + 1])[0]
        correct, margin = retrain.evaluate_target(logits, self.target_labels[pos])
        return {"correct": correct, "margin": margin, "seconds": time.perf_counter() - start, "worker": self.name}

    def ensemble_member(self, torch_seed: int) -> np.ndarray:
        model = self.trainer.train(seed=torch_seed)
        return self.trainer.logits(model, self.target_x)


# ----------------------------------------------------------------------------- log


def recipe_fingerprint(config: retrain.TrainConfig, data_key: dict, base_seed: int, n_train: int) -> str:
    """Hash of everything that changes a training's outcome apart from its own key."""
    payload = {"config": config.fingerprint(), "data": data_key, "base_seed": int(base_seed), "n_train": int(n_train)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_trainings(folder: Path, recipe: str | None = None):
    """The trainings log as a pandas DataFrame (empty when none), deduplicated by key."""
    import pandas as pd

    folder = Path(folder)
    if not folder.exists() or not any(p for p in folder.glob("*.parquet") if not p.name.startswith(".")):
        return pd.DataFrame({name: pd.Series(dtype=TRAININGS_SCHEMA.field(name).type.to_pandas_dtype())
                             for name in TRAININGS_SCHEMA.names})
    frame = read_dataset(folder).to_pandas()
    if recipe is not None and "recipe" in frame:
        frame = frame[frame["recipe"] == recipe]
    return frame.drop_duplicates(["target_id", "method", "mode", "k", "seed"], keep="first").reset_index(drop=True)


class TrainingLog:
    """Appends finished trainings to ``folder`` as atomically written part files."""

    def __init__(self, folder: Path, flush_every: int = 32, flush_seconds: float = 15.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.rows: list[dict] = []
        # Unique per driver run (two runs of one process must never overwrite each other's parts).
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
        columns = {name: [row.get(name) for row in self.rows] for name in TRAININGS_SCHEMA.names}
        table = pa.table(columns, schema=TRAININGS_SCHEMA)
        write_table_atomic(table, self.folder / f"part-{self.run_id}-{self.parts:05d}.parquet")
        self.parts += 1
        self.rows = []


# ----------------------------------------------------------------------------- scheduler


class DriverStopped(RuntimeError):
    """Raised by the ``stop_after`` test hook: the driver stops as if killed."""


@dataclass
class SearchTask:
    target_id: int
    method: str
    mode: str
    ranked_ids: np.ndarray  # training ids, most influential first (length >= limit)
    flip_class: int
    search: BisectionSearch
    seconds: float = 0.0

    @property
    def key(self):
        return (self.target_id, self.method, self.mode)


class SupportScheduler:
    """Runs many support searches on a pool of Ray actors.

    Parameters
    ----------
    train : dict with images (N,H,W,C uint8), labels, ids, mean, std, num_classes
    targets : dict with images, labels, ids of the searched targets
    settings : SupportSettings
    log_dir : folder of the trainings log (EXP/trainings)
    recipe : fingerprint stored with every row; only rows with it are reused
    fail_once : test hook, training keys whose first attempt raises
    stop_after : test hook, stop (losing unflushed rows, like a kill) after this many trainings
    progress : show tqdm bars
    """

    def __init__(self, train: dict, targets: dict, settings: SupportSettings, log_dir: Path, recipe: str,
                 fail_once: Sequence[tuple] = (), stop_after: int | None = None, progress: bool = True):
        self.train, self.targets, self.settings = train, targets, settings
        self.log_dir, self.recipe = Path(log_dir), recipe
        self.fail_once, self.stop_after, self.progress = list(fail_once), stop_after, progress
        self.trained_this_run: list[tuple] = []  # keys trained by this driver (tests check no repeats)
        self.failures = 0
        self._actor_cls = None
        self._refs = None

    # ---------------------------------------------------------------- actors
    def _pool(self):
        import ray

        from cluster.resources import ACTOR_CPUS, retrain_pool_shape

        s = self.settings
        n, gpu_share = retrain_pool_shape(ray.cluster_resources(), s.model, s.actors, s.gpus_per_actor)
        self.config = s.train_config("cuda" if gpu_share > 0 else "cpu")
        if self._refs is None:  # the arrays go to the object store once; every actor maps them
            self._refs = (ray.put(self.train), ray.put(self.targets))

        self._actor_cls = ray.remote(num_cpus=ACTOR_CPUS, num_gpus=gpu_share)(RetrainWorker)
        # slots: an actor lost with its node is replaced, and takes work once it is up
        self.actors = ActorSlots(self._new_actor, n, max_failed_starts=s.max_retries)
        self.actors.wait_ready()
        return self.actors

    def _new_actor(self):
        return self._actor_cls.remote(asdict(self.config), self._refs[0], self._refs[1], 1, self.fail_once)

    def shutdown(self):
        import ray

        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []

    # ---------------------------------------------------------------- ensemble
    def ensemble(self, n_models: int) -> retrain.EnsembleResult:
        """Full-data models with seed indices 0..n-1 on the pool; logits on every target."""
        import ray

        if not getattr(self, "actors", None):
            self._pool()

        refs = [self.actors[i % len(self.actors)].ensemble_member.remote(retrain.training_seed(self.settings.seed, i))
                for i in range(n_models)]
        logits = np.stack(ray.get(refs))
        return retrain.EnsembleResult(np.asarray(self.targets["ids"]), np.asarray(self.targets["labels"]), logits)

    # ---------------------------------------------------------------- searches
    def _job(self, task: SearchTask, trial: Trial, attempt: int, speculative: bool) -> dict:
        changed = task.ranked_ids[:trial.k]
        job = {"target_id": task.target_id, "method": task.method, "mode": task.mode, "k": trial.k,
               "seed": trial.seed, "torch_seed": retrain.training_seed(self.settings.seed, trial.seed),
               "attempt": attempt, "speculative": speculative}
        if task.mode == "removal":
            job["removed_ids"] = changed
        else:
            job["relabel_ids"], job["relabel_to"] = changed, int(task.flip_class)
        return job

    def run(self, tasks: list[SearchTask]) -> list[SearchTask]:
        """Drive every search to the end; returns the tasks (their searches are done)."""
        import ray
        from tqdm.auto import tqdm

        s = self.settings
        known = read_trainings(self.log_dir, self.recipe)
        by_key = {t.key: t for t in tasks}
        for row in known.itertuples(index=False):
            task = by_key.get((int(row.target_id), row.method, row.mode))
            if task is not None:
                task.search.record(Trial(int(row.k), int(row.seed)), bool(row.correct), float(row.margin))
                task.seconds += float(row.seconds)
        active = [t for t in tasks if not t.search.done]
        if not active:
            return tasks
        if not getattr(self, "actors", None):
            self._pool()
        log = TrainingLog(self.log_dir, s.flush_every, s.flush_seconds)
        def bound(task):  # most trainings the task can still need (speculative ones aside)
            return max(0, task.search.first_seeds + task.search.budget * task.search.seeds - task.search.trainings)

        upper = sum(bound(t) for t in active)
        bar_train = tqdm(total=upper, desc="trainings (upper bound)", unit="model", disable=not self.progress,
                         file=sys.stderr, dynamic_ncols=True)
        bar_search = tqdm(total=len(tasks), initial=len(tasks) - len(active), desc="searches", unit="search",
                          disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        pending: dict = {}  # ref -> (task, trial, attempt, actor index, speculative)
        load = [0] * len(self.actors)
        finished_here = 0
        deferred: list = []  # retries waiting for a worker while every one is (re)starting

        def submit(task, trial, attempt, speculative):
            usable = self.actors.usable()
            if not usable:
                deferred.append((task, trial, attempt, speculative))
                return
            index = min(usable, key=lambda i: load[i])
            ref = self.actors[index].train.remote(self._job(task, trial, attempt, speculative))
            pending[ref] = (task, trial, attempt, index, speculative)
            load[index] += 1

        try:
            while active or pending:
                self.actors.poll()  # replacements of lost workers that are up take work again
                if deferred and self.actors.usable():
                    retries, deferred[:] = list(deferred), []
                    for job in retries:
                        submit(*job)
                # Required trainings first, oldest searches first (finishes searches early).
                free = sum(max(0, s.queue_depth - load[i]) for i in self.actors.usable())
                if free:
                    for task in active:
                        for trial in task.search.propose(free):
                            submit(task, trial, 0, False)
                            free -= 1
                        if not free:
                            break
                # Idle workers (nothing queued at all): speculative k of running searches.
                idle = sum(1 for i in self.actors.usable() if load[i] == 0)
                if s.speculate and idle:
                    for task in active:
                        for trial in task.search.propose(idle, speculative=True):
                            submit(task, trial, 0, True)
                            idle -= 1
                        if not idle:
                            break
                if not pending and self.actors.starting:  # every worker is (re)starting
                    self.actors.poll(timeout=None)
                    continue
                if not pending:
                    raise RuntimeError("no training in flight but searches are unfinished: "
                                       f"{[t.key for t in active][:5]} (a bug in the search state machine)")
                ready, _ = ray.wait(list(pending) + self.actors.starting_refs(), num_returns=1,
                                    timeout=s.flush_seconds)
                if not ready:
                    log.flush()
                    continue
                for ref in ready:
                    if ref not in pending:
                        continue  # a replacement worker answered: actors.poll() puts it in service
                    task, trial, attempt, index, speculative = pending.pop(ref)
                    load[index] -= 1
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayActorError as error:
                        self._retry(task, trial, attempt, speculative, error, submit, log, replace_actor=index)
                        continue
                    except ray.exceptions.RayTaskError as error:
                        self._retry(task, trial, attempt, speculative, error, submit, log)
                        continue
                    if self.stop_after is not None and finished_here >= self.stop_after:
                        raise DriverStopped(f"stopped after {self.stop_after} trainings (test hook)")
                    self.trained_this_run.append(task.key + (trial.k, trial.seed))
                    finished_here += 1
                    log.add({"target_id": task.target_id, "method": task.method, "mode": task.mode, "k": trial.k,
                             "seed": trial.seed, "correct": result["correct"], "margin": result["margin"],
                             "seconds": result["seconds"], "recipe": self.recipe,
                             "torch_seed": retrain.training_seed(s.seed, trial.seed), "attempt": attempt,
                             "worker": result["worker"], "speculative": speculative, "finished_at": time.time()})
                    was_done = task.search.done
                    remaining = bound(task)
                    task.search.record(trial, result["correct"], result["margin"])
                    task.seconds += result["seconds"]
                    if was_done or remaining == 0:
                        bar_train.total += 1  # a speculative training beyond the bound
                    bar_train.update(1)
                    if task.search.done and not was_done:
                        bar_search.update(1)
                        # The bar's total is an upper bound: drop what this search no longer needs.
                        bar_train.total -= bound(task)
                        bar_train.refresh()
                active = [t for t in active if not t.search.done]
            log.flush()
        except DriverStopped:
            raise  # unflushed rows are lost, as with a killed driver
        except BaseException:
            log.flush()  # keep what finished (Ctrl-C, a training that kept failing, ...)
            raise
        finally:
            bar_train.close()
            bar_search.close()
        return tasks

    def _retry(self, task, trial, attempt, speculative, error, submit, log, replace_actor=None):
        self.failures += 1
        if replace_actor is not None:  # the worker died (OOM, node lost): start a fresh one
            self.actors.lost(replace_actor, error)
        if attempt >= self.settings.max_retries:
            log.flush()
            raise RuntimeError(
                f"training {task.key + (trial.k, trial.seed)} failed {attempt + 1} times; last error: {error}. "
                "Finished trainings are saved: fix the cause and rerun the same command to resume "
                "(or raise [support] max_retries)."
            ) from error
        print(f"training {task.key + (trial.k, trial.seed)} failed (attempt {attempt + 1}), retrying: "
              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        submit(task, trial, attempt + 1, speculative)


# ----------------------------------------------------------------------------- stage


def load_rankings(folder: Path, methods: Sequence[str] | None = None):
    """Rankings as {(target_id, method): train ids ordered by rank}."""
    folder = Path(folder)
    try:
        table = read_dataset(folder, columns=["target_id", "method", "rank", "train_id"])
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no rankings in {folder}: run 'attribution rank' (the rank stage) first") from error
    frame = table.to_pandas()
    available = sorted(frame["method"].unique())
    if methods:
        missing = set(methods) - set(available)
        if missing:
            raise ValueError(f"methods {sorted(missing)} are not in {folder} (it holds {available}); "
                             "fix [support] methods or rerun the rank stage with them")
        frame = frame[frame["method"].isin(list(methods))]
    frame = frame.sort_values(["target_id", "method", "rank"], kind="stable")
    rankings = {(int(t), m): group["train_id"].to_numpy(np.int64)
                for (t, m), group in frame.groupby(["target_id", "method"], sort=True)}
    return rankings, sorted(frame["method"].unique())


def select_targets(rankings: dict, methods: Sequence[str], spec, seed: int) -> np.ndarray:
    """Targets ranked by every method: all, a seeded random number of them, or given ids."""
    per_method = [{t for (t, m) in rankings if m == method} for method in methods]
    common = np.array(sorted(set.intersection(*per_method)), dtype=np.int64)
    if isinstance(spec, (list, tuple)):
        wanted = np.asarray(spec, dtype=np.int64)
        missing = np.setdiff1d(wanted, common)
        if len(missing):
            raise ValueError(f"[support] targets {missing[:10].tolist()} are not ranked by every method {list(methods)}")
        return np.sort(wanted)
    if spec in ("all", None, 0) or int(spec) >= len(common):
        return common
    rng = np.random.default_rng([int(seed), 7])  # a stream of its own: independent of other draws
    return np.sort(rng.choice(common, size=int(spec), replace=False))


def _data_arrays(data) -> dict:
    """What the workers need of the training set: its pixels when they fit in memory, else
    the ImageSet itself (paths; workers decode batches from the shared filesystem)."""
    images = {"images": data.images(np.arange(len(data)))} if data.in_memory else {"image_set": data}
    return {**images, "labels": np.asarray(data.labels, np.int64),
            "ids": np.asarray(data.ids, np.int64), "mean": tuple(data.mean), "std": tuple(data.std),
            "num_classes": int(data.num_classes)}


def estimate_support(exp: Experiment, train: dict, test_lookup: Callable[[np.ndarray], dict], rankings: dict,
                     methods: Sequence[str], settings: SupportSettings, data_key: dict, address: str | None = None,
                     fail_once: Sequence[tuple] = (), stop_after: int | None = None, progress: bool = True,
                     num_cpus: int | None = None) -> dict:
    """Everything after loading: targets, ensemble, searches, output tables. Returns a summary."""
    import pandas as pd

    from cluster.runtime import ensure_ray

    start = time.perf_counter()
    s = settings
    target_ids = select_targets(rankings, methods, s.targets, s.seed)
    targets = test_lookup(target_ids)
    config = s.train_config()
    recipe = recipe_fingerprint(config, data_key, s.seed, len(train["ids"]))
    ensure_ray(address, num_cpus=num_cpus)
    scheduler = SupportScheduler(train, targets, s, exp.trainings, recipe, fail_once, stop_after, progress)
    try:
        # 1) full-data ensemble: flip class and screening (cached per recipe and ensemble size)
        targets_path = exp.root / "support_targets.parquet"
        cached = None
        if targets_path.exists():
            frame = pd.read_parquet(targets_path)
            if (frame["recipe"].eq(recipe).all() and frame["ensemble_models"].eq(s.ensemble).all()
                    and set(target_ids) <= set(frame["target_id"])):
                cached = frame.set_index("target_id").loc[target_ids].reset_index()
        if cached is None:
            result = scheduler.ensemble(s.ensemble)
            cached = pd.DataFrame(result.table())
            cached["ensemble_models"] = s.ensemble
            cached["recipe"] = recipe
            write_table_atomic(pa.Table.from_pandas(cached, preserve_index=False), targets_path)
        status = dict(zip(cached["target_id"].astype(int), cached["status"]))
        flip = dict(zip(cached["target_id"].astype(int), cached["flip_class"].astype(int)))
        # 2) searches
        tasks = []
        for target in target_ids:
            if status[int(target)] != "searched":
                continue
            for method in methods:
                ranked = rankings[(int(target), method)]
                limit = min(int(s.top_k), len(ranked))
                for mode in s.modes:
                    search = BisectionSearch(limit, s.budget, s.seeds, s.first_seeds, s.early_decision, mode,
                                             key=(int(target), method, mode))
                    tasks.append(SearchTask(int(target), method, mode, ranked, flip[int(target)], search))
        scheduler.run(tasks)
    finally:
        scheduler.shutdown()
    rows = []
    for task in tasks:
        search = task.search
        rows.append({"target_id": task.target_id, "method": task.method, "mode": task.mode,
                     "support": int(search.support), "trainings": search.trainings, "seconds": task.seconds,
                     "status": "not_found" if search.support == NOT_FOUND else "found", "limit": search.limit,
                     "flip_class": task.flip_class, "reference_trainings": search.reference_trainings(),
                     "recipe": recipe})
    table = pa.Table.from_pylist(rows, schema=SUPPORT_SCHEMA)
    write_table_atomic(table, exp.support)
    counts = cached["status"].value_counts().to_dict()
    trainings = int(sum(r["trainings"] for r in rows))
    reference = int(sum(r["reference_trainings"] for r in rows))
    summary = {"targets": len(target_ids), "searched_targets": int(counts.get("searched", 0)),
               "misclassified_targets": int(counts.get("misclassified", 0)),
               "unstable_targets": int(counts.get("unstable", 0)), "searches": len(rows),
               "found": int(sum(r["status"] == "found" for r in rows)), "trainings": trainings,
               "reference_trainings": reference, "trained_this_run": len(scheduler.trained_this_run),
               "retried": scheduler.failures, "recipe": recipe, "wall_seconds": round(time.perf_counter() - start, 1)}
    exp.record_stage("support", settings=asdict(s), outputs=["trainings/", "support_targets.parquet",
                                                             "support.parquet"], **summary)
    return summary


def run_support_stage(exp: Experiment, preset: dict, address: str | None = None, **hooks) -> dict:
    """The pipeline's support stage: reads preset['data'] and preset['support']."""
    from attribution.data import load_dataset

    settings = SupportSettings.from_preset(preset)
    data = preset.get("data") or {}
    name, root = data.get("dataset", "fashion-mnist"), data.get("root") or None
    per_class = data.get("train_per_class") or None
    data_seed = int(data.get("seed", preset.get("seed", 0)))
    rankings, methods = load_rankings(exp.rankings, settings.methods)
    train_set = load_dataset(name, "train", root, n_per_class=per_class, seed=data_seed)
    ranked_ids = np.unique(np.concatenate(list(rankings.values())))
    try:
        train_set.positions_of(ranked_ids)
    except KeyError as error:  # fail before any training, naming ids and the fix
        raise ValueError(f"{error.args[0]}: the rankings in {exp.rankings} were made on another training subset "
                         "than [data] describes (train_per_class, seed); rerun the rank stage or fix [data]") from error
    test_set = load_dataset(name, "test", root)

    def lookup(ids):
        positions = test_set.positions_of(ids)
        return {"images": test_set.images(positions), "labels": test_set.labels[positions],
                "ids": np.asarray(ids, np.int64)}

    data_key = {"dataset": name, "root": root, "train_per_class": per_class, "seed": data_seed}
    return estimate_support(exp, _data_arrays(train_set), lookup, rankings, methods, settings, data_key, address,
                            **hooks)
