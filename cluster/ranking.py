"""The rank stage: ESVM / l2 / cosine / random rankings of every target, on Ray.

Reads EXP/embeddings (train and test), chooses the targets, and writes
``EXP/rankings/<method>-class<label>.parquet``: one file per (method, class), each
holding the rankings of that class's targets (schema:
:data:`attribution.ranking.RANKING_SCHEMA`). Files are written atomically by the
driver (workers only return tables, so worker nodes need no access to the
experiment's storage), so the stage resumes per (method, class): a file that exists is
complete and is skipped, after checking that it was computed with the same settings
(stored in the file's Parquet metadata). Changed settings raise an error naming the
file instead of silently mixing two configurations.

Preset section ``[rank]`` (defaults in :data:`DEFAULTS`)::

    methods = ["esvm", "l2", "cosine", "random"]
    solver = "batched"        # "sklearn" (reference LinearSVC), "thundersvm", "batched"
    solver_params = {}        # keyword arguments of the solver (C, tol, device, ...)
    top_k = 1280              # rows per target (reference 1280)
    max_candidates = 0        # 0: the whole class (reference); M: only the M nearest
    candidate_metric = "l2"   # metric choosing those M nearest for esvm/random
    same_class = true         # false: candidates from every class (ablation)
    targets = "all"           # "all" test items, a number of seeded random ones, or a list of ids
    seed = <preset seed>      # target draw and the random ranking
    on_short = "keep"         # a class smaller than top_k: "keep" the whole class or "error"
    targets_per_task = 64     # targets of one class per Ray task (load balance vs. overhead)
    workers = 0               # Ray actors; 0 = one per CPU of the cluster

Targets whose class has no training items cannot be ranked (there are no same-class
candidates): they are skipped with a warning and listed under ``skipped_targets`` in
the manifest; a number of random targets is drawn only among rankable test items.
With ``same_class = false`` nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attribution.candidates import check_finite
from attribution.experiment import Experiment, write_table_atomic
from attribution.ranking import (
    METHODS,
    REFERENCE_TOP_K,
    SHORT_POLICIES,
    empty_rankings,
    rank_targets,
    ranking_file_name,
    sort_rankings,
)

DEFAULTS = {
    "methods": list(METHODS),
    "solver": "batched",
    "solver_params": {},
    "top_k": REFERENCE_TOP_K,
    "max_candidates": 0,
    "candidate_metric": "l2",
    "same_class": True,
    "targets": "all",
    "seed": None,  # None: the preset's top-level seed
    "on_short": "keep",
    "targets_per_task": 64,
    "workers": 0,
}
SETTINGS_KEY = b"attribution.rank.settings"


# ----------------------------------------------------------------------------- settings


def rank_settings(preset: dict) -> dict:
    """The validated ``[rank]`` settings of a preset, defaults filled in."""
    from attribution.esvm import SOLVERS

    section = dict(preset.get("rank") or {})
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown [rank] setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **section}
    if settings["seed"] is None:
        settings["seed"] = int(preset.get("seed", 0))
    methods = settings["methods"]
    if isinstance(methods, str):
        methods = [methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown ranking method(s) {bad or methods}; choose from {list(METHODS)}")
    settings["methods"] = list(dict.fromkeys(methods))
    if settings["solver"] not in SOLVERS:
        raise ValueError(f"unknown ESVM solver {settings['solver']!r}; choose one of {list(SOLVERS)}")
    if not isinstance(settings["solver_params"], dict):
        raise ValueError("rank.solver_params must be a table, e.g. solver_params = { C = 0.1 }")
    if int(settings["top_k"]) < 1:
        raise ValueError(f"rank.top_k must be at least 1, got {settings['top_k']}")
    settings["top_k"] = int(settings["top_k"])
    if int(settings["max_candidates"]) < 0:
        raise ValueError(f"rank.max_candidates must be 0 (whole class) or positive, got {settings['max_candidates']}")
    settings["max_candidates"] = int(settings["max_candidates"])
    if settings["candidate_metric"] not in ("l2", "cosine"):
        raise ValueError(f"rank.candidate_metric must be 'l2' or 'cosine', got {settings['candidate_metric']!r}")
    if settings["on_short"] not in SHORT_POLICIES:
        raise ValueError(f"rank.on_short must be one of {list(SHORT_POLICIES)}, got {settings['on_short']!r}")
    targets = settings["targets"]
    if not (targets == "all" or (isinstance(targets, int) and not isinstance(targets, bool) and targets > 0)
            or (isinstance(targets, list) and targets and all(isinstance(t, int) for t in targets))):
        raise ValueError(f"rank.targets must be \"all\", a positive number or a list of test ids, got {targets!r}")
    settings["same_class"] = bool(settings["same_class"])
    settings["targets_per_task"] = max(1, int(settings["targets_per_task"]))
    settings["workers"] = max(0, int(settings["workers"]))
    return settings


def _fingerprint(settings: dict, method: str, target_ids: np.ndarray) -> str:
    """What a (method, class) file's content depends on; stored in its Parquet metadata."""
    relevant = {k: settings[k] for k in ("top_k", "max_candidates", "same_class", "on_short")}
    if method in ("esvm", "random"):
        relevant["candidate_metric"] = settings["candidate_metric"] if settings["max_candidates"] else None
    if method == "esvm":
        relevant["solver"], relevant["solver_params"] = settings["solver"], settings["solver_params"]
    if method == "random":
        relevant["seed"] = settings["seed"]
    relevant["targets_sha256"] = hashlib.sha256(np.asarray(target_ids, np.int64).tobytes()).hexdigest()
    return json.dumps(relevant, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- inputs


def check_inputs(train, test) -> None:
    """Embeddings usable for ranking: same dimension, finite values (errors name ids)."""
    if len(train) == 0:
        raise ValueError("the train embeddings are empty: nothing to rank")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(
            f"train embeddings have dimension {train.features.shape[1]} but test embeddings have "
            f"{test.features.shape[1]}: both splits must come from one embed run; rerun "
            "'attribution embed --exp EXP --overwrite'")
    check_finite(train.features, train.ids, "train embeddings")
    check_finite(test.features, test.ids, "test embeddings")


def select_targets(test, train_labels: np.ndarray, settings: dict):
    """Positions (into the test table, ascending id) of the targets, and the skipped ones.

    Returns ``(positions, skipped)``; ``skipped`` maps test id -> reason.
    """
    rankable = np.ones(len(test), dtype=bool)
    if settings["same_class"]:
        rankable = np.isin(test.labels, np.unique(train_labels))
    targets = settings["targets"]
    skipped: dict[int, str] = {}
    if targets == "all" or isinstance(targets, list):
        if isinstance(targets, list):
            positions = np.sort(test.rows_of(np.asarray(targets, dtype=np.int64)))
            positions = np.unique(positions)
        else:
            positions = np.arange(len(test))
        for p in positions[~rankable[positions]]:
            skipped[int(test.ids[p])] = f"class {int(test.labels[p])} has no training items"
        positions = positions[rankable[positions]]
    else:
        pool = np.flatnonzero(rankable)
        if targets > len(pool):
            raise ValueError(f"rank.targets={targets} but only {len(pool)} test items can be ranked; "
                             "lower it or use targets = \"all\"")
        rng = np.random.default_rng(settings["seed"])
        positions = np.sort(rng.choice(pool, size=targets, replace=False))
    if skipped:
        shown = dict(list(skipped.items())[:5])
        warnings.warn(f"skipping {len(skipped)} target(s) whose class has no training items: {shown}"
                      f"{' ...' if len(skipped) > 5 else ''} (listed in the manifest under rank.skipped_targets)",
                      stacklevel=2)
    if len(positions) == 0:
        raise ValueError("no rankable targets: every selected test item's class lacks training items")
    return positions, skipped


# ----------------------------------------------------------------------------- workers


class RankWorker:
    """A Ray actor: holds the embeddings (from the object store) and the FAISS indexes
    and solver it built, so they are built once per actor, not once per task."""

    def __init__(self, train: dict, test: dict, settings: dict, device: str = "auto"):
        import os

        try:  # one FAISS thread: the actor reserved one CPU
            import faiss

            faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
        except Exception:
            pass
        self.train, self.test, self.settings, self.device = train, test, settings, device
        self._indexes: dict = {}
        self._solver = None
        from cluster.workers import worker_name

        self.name = worker_name()  # host:pid@node, recorded per target in the stage manifest

    def _index(self, metric: str):
        from attribution.candidates import CandidateIndex

        if metric not in self._indexes:
            self._indexes[metric] = CandidateIndex(metric, self.device).fit(
                self.train["ids"], self.train["labels"], self.train["features"])
        return self._indexes[metric]

    def _get_solver(self):
        if self._solver is None:
            from attribution.esvm import get_solver

            self._solver = get_solver(self.settings["solver"], **self.settings["solver_params"])
        return self._solver

    def rank(self, method: str, label: int, chunk: int, positions: np.ndarray):
        s = self.settings
        metric = method if method in ("l2", "cosine") else s["candidate_metric"]
        table = rank_targets(
            method, self._index(metric), self.test["ids"][positions], self.test["labels"][positions],
            self.test["features"][positions], top_k=s["top_k"],
            solver=self._get_solver() if method == "esvm" else None,
            max_candidates=s["max_candidates"] or None, same_class=s["same_class"], seed=s["seed"],
            on_short=s["on_short"])
        return method, label, chunk, table, self.name


def _resources(settings: dict, n_items: int):
    """(number of actors, num_gpus per actor) from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))
    # With GPUs: one actor per GPU by default. Counting every CPU of the cluster would
    # give actors GPU shares that CPU-only nodes of a mixed cluster can never host (they
    # would wait for placement forever).
    actors = settings["workers"] or (max(1, int(gpus)) if gpus > 0 else cpus)
    actors = max(1, min(actors, n_items))
    # GPUs, when the cluster has them, are shared evenly by the actors (at most one each)
    num_gpus = min(1.0, gpus / actors) if gpus > 0 else 0
    return actors, num_gpus


# ----------------------------------------------------------------------------- the stage


def run_rank_stage(exp: Experiment, preset: dict, address: str | None = None) -> dict:
    """Compute missing ranking files of EXP/rankings; returns a summary dict."""
    from attribution.embedding import load_embeddings

    exp = exp if isinstance(exp, Experiment) else Experiment(exp)
    settings = rank_settings(preset)
    if "esvm" in settings["methods"]:
        # build the solver once here so bad solver_params fail before Ray starts
        from attribution.esvm import get_solver

        get_solver(settings["solver"], **settings["solver_params"])
    train = load_embeddings(exp, "train")
    test = load_embeddings(exp, "test")
    check_inputs(train, test)
    positions, skipped = select_targets(test, train.labels, settings)
    target_labels = test.labels[positions]

    # class sizes, to report targets whose ranking is shorter than top_k
    train_counts = dict(zip(*np.unique(train.labels, return_counts=True)))
    pool = lambda label: (len(train) if not settings["same_class"] else int(train_counts.get(label, 0)))
    effective = lambda label: min(pool(label), settings["max_candidates"] or pool(label))
    short_classes = {int(c): effective(int(c)) for c in np.unique(target_labels)
                     if effective(int(c)) < settings["top_k"]}
    if short_classes and settings["on_short"] == "error":
        c, n = next(iter(short_classes.items()))
        raise ValueError(f"class {c} offers only {n} candidates but rank.top_k={settings['top_k']}; lower "
                         f"top_k (--set rank.top_k={n}) or set rank.on_short=\"keep\" to rank whole classes")

    folder = exp.rankings
    folder.mkdir(parents=True, exist_ok=True)
    work, pending, reused = [], {}, []
    for label in np.unique(target_labels):
        label = int(label)
        class_positions = positions[target_labels == label]
        for method in settings["methods"]:
            path = folder / ranking_file_name(method, label)
            fingerprint = _fingerprint(settings, method, test.ids[class_positions])
            if path.exists():
                stored = (pq.read_schema(path).metadata or {}).get(SETTINGS_KEY, b"").decode()
                if stored != fingerprint:
                    raise ValueError(
                        f"{path} was computed with other settings or targets ({stored or 'unknown'}; now "
                        f"{fingerprint}); delete {folder} (or that file) to recompute, or use a new --exp")
                reused.append(path.name)
                continue
            chunks = [class_positions[i:i + settings["targets_per_task"]]
                      for i in range(0, len(class_positions), settings["targets_per_task"])]
            pending[(method, label)] = {"chunks": len(chunks), "tables": {}, "fingerprint": fingerprint,
                                        "path": path}
            work += [(method, label, i, chunk) for i, chunk in enumerate(chunks)]

    start = time.perf_counter()
    computed, workers = [], {}
    if work:
        computed = _run_work(exp, address, settings, train, test, work, pending, workers)
    seconds = round(time.perf_counter() - start, 1)

    rows = {}
    for method in settings["methods"]:
        files = [folder / ranking_file_name(method, int(c)) for c in np.unique(target_labels)]
        rows[method] = int(sum(pq.read_metadata(f).num_rows for f in files))
    summary = {
        "targets": int(len(positions)), "methods": settings["methods"], "top_k": settings["top_k"],
        "solver": settings["solver"], "rows": rows, "computed_files": len(computed),
        "reused_files": len(reused),
    }
    exp.record_stage(
        "rank",
        target_ids=[int(i) for i in test.ids[positions]],
        n_targets=int(len(positions)),
        targets_setting=settings["targets"],
        methods=settings["methods"], top_k=settings["top_k"], solver=settings["solver"],
        solver_params=settings["solver_params"], max_candidates=settings["max_candidates"] or None,
        candidate_metric=settings["candidate_metric"], same_class=settings["same_class"],
        seed=settings["seed"], on_short=settings["on_short"],
        short_classes=short_classes,  # class -> candidates, for classes smaller than top_k
        skipped_targets={str(k): v for k, v in skipped.items()},
        rows=rows, files=sorted(p.name for p in folder.glob("*.parquet")),
        computed_files=computed, reused_files=reused, last_run_compute_seconds=seconds,
        targets_per_worker=workers,  # (target, method) rankings per worker (host:pid@node), this run
    )
    return summary


def _run_work(exp, address, settings, train, test, work, pending, workers: dict | None = None) -> list[str]:
    """Run (method, label, chunk, positions) items on an actor pool; write files as
    each (method, class) completes. Returns the names of the files written; ``workers``
    (if given) counts the (target, method) rankings each worker computed."""
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from cluster.runtime import ensure_ray

    ray = ensure_ray(address)
    n_actors, num_gpus = _resources(settings, len(work))
    # embeddings go to the object store once; every actor maps the same copy
    train_ref = ray.put({"ids": train.ids, "labels": train.labels, "features": train.features})
    test_ref = ray.put({"ids": test.ids, "labels": test.labels, "features": test.features})
    settings_worker = dict(settings)
    if settings["solver"] == "batched":
        # the actor reserved one CPU (and a GPU share when the cluster has GPUs): keep torch
        # to one thread and on the device Ray gave it; explicit solver_params win
        defaults = {"device": "cuda" if num_gpus else "cpu", "num_threads": 1}
        settings_worker["solver_params"] = {**defaults, **settings["solver_params"]}
    actor_class = ray.remote(num_cpus=1, num_gpus=num_gpus)(RankWorker)
    actors = [actor_class.remote(train_ref, test_ref, settings_worker, "auto" if num_gpus else "cpu")
              for _ in range(n_actors)]
    written = []
    total_targets = sum(len(item[3]) for item in work)
    bar = tqdm(total=total_targets, unit="target", desc=f"rank ({n_actors} workers)", file=sys.stderr,
               mininterval=2.0)
    try:
        pool = ActorPool(actors)
        results = pool.map_unordered(lambda actor, item: actor.rank.remote(*item), work)
        for method, label, chunk, table, worker in results:
            entry = pending[(method, label)]
            entry["tables"][chunk] = table
            ranked = len(np.unique(table.column("target_id").to_numpy()))
            bar.update(ranked)
            if workers is not None:
                workers[worker] = workers.get(worker, 0) + ranked
            if len(entry["tables"]) == entry["chunks"]:
                tables = [entry["tables"][i] for i in range(entry["chunks"])]
                merged = sort_rankings(pa.concat_tables(tables) if tables else empty_rankings())
                merged = merged.replace_schema_metadata({SETTINGS_KEY: entry["fingerprint"].encode()})
                write_table_atomic(merged, entry["path"])
                written.append(entry["path"].name)
                entry["tables"] = {}
                bar.set_postfix(files=len(written), refresh=False)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return sorted(written)
