"""The rank stage: every target's candidates scored by the similarity methods, and ranked.

Reads EXP/embeddings (train and test), chooses the targets, and for each (method, class
of targets) writes

- ``EXP/scores/<method>/classNNN.parquet``: the full score block (targets x every
  training id) with its candidate mask (:class:`attribution.scores.ScoreStore`);
- ``EXP/rankings/<method>-classNNN.parquet``: the ranking derived from it
  (:func:`attribution.scores.rank_block`, schema :data:`attribution.ranking.RANKING_SCHEMA`),
  written last: it marks the unit done.

The methods are the registered methods of stage "rank" (:mod:`attribution.methods.similarity`:
esvm, l2, cosine, random). Workers (:class:`RankWorker`, on the runtime's "rank" pool)
hold the embeddings, fit each method once and return score blocks for chunks of
``targets_per_task`` targets of one class; the driver merges a unit's chunks and writes,
so worker nodes need no access to the experiment's storage. The stage resumes per
(method, class): a unit whose ranking file holds the same settings (stored in its
Parquet metadata) is kept; other settings are refused, naming the changed keys.

Preset section ``[rank]`` (:class:`RankSettings`)::

    methods = ["esvm", "l2", "cosine", "random"]   # default: every rank-stage method
    solver = "batched"        # an ESVM solver (attribution.esvm): "sklearn" (reference), "thundersvm"
    solver_params = {}        # keyword arguments of the solver (C, tol, device, ...)
    top_k = 1280              # rows per target (reference 1280)
    max_candidates = 0        # 0: the whole class (reference); M: only the M nearest
    candidate_metric = "l2"   # metric choosing those M nearest for esvm/random
    same_class = true         # false: candidates from every class (ablation)
    targets = "all"           # "all" test items, a number of seeded random ones, or a list of ids
    seed = <preset seed>      # target draw and the random ranking
    on_short = "keep"         # a class smaller than top_k: "keep" the whole class or "error"
    targets_per_task = 64     # targets of one class per work item (load balance vs. overhead)
    workers = 0               # pool size; 0 = as many as the runtime can place

``esvm_negative = true`` (with "esvm" among the methods) also writes the score-only
variant ``"esvm@negative"``: ``EXP/scores/esvm@negative/classNNN.parquet``, esvm's
scores with the other classes scored negatively by their likeness to the target
(:class:`attribution.methods.similarity.ESVM`, ``negative_influence``; an
interpretation of the paper's heuristic for ESVM's negative influence). It has no
rankings: its ranking of the same-class candidates is esvm's, so the support search
would repeat esvm's. A (variant, class) unit is done when its score block holds the
same settings.

Targets whose class has no training items cannot be ranked (there are no same-class
candidates): they are skipped with a warning and listed under ``skipped_targets`` in
the manifest; a number of random targets is drawn only among rankable test items.
With ``same_class = false`` nothing is skipped. top_k larger than a class:
``on_short = "keep"`` ranks the whole candidate set (those classes are recorded under
``short_classes``); ``"error"`` refuses before any work.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from attribution.artifacts import SettingsChanged, differences, ids_digest, reuse
from attribution.methods import ScoreBlock, Targets, TrainingData, available_methods, create_method, method_class
from attribution.methods.similarity import CANDIDATE_METRICS
from attribution.ranking import REFERENCE_TOP_K, SHORT_POLICIES, ranking_file_name
from attribution.settings import Section, setting
from attribution.stages import register_stage
from attribution.stages.base import Plan, Stage
from attribution.workqueue import PoolRequest, QueueWorker

# The metadata key under which the old rank stage stored its settings (a JSON string,
# targets as "targets_sha256"): files it wrote are recognised, not refused as unknown.
LEGACY_SETTINGS_KEY = b"attribution.rank.settings"


@dataclass
class RankSettings(Section):
    """The [rank] section (see the module docstring)."""

    section: ClassVar[str] = "rank"

    methods: tuple[str, ...] = setting(default_factory=lambda: tuple(available_methods("rank")),
                                       help="ranking methods (registered methods of the rank stage)")
    solver: str = setting("batched", help="ESVM solver: a name of attribution.esvm's solver registry")
    solver_params: dict = setting(default_factory=dict, help="keyword arguments of the ESVM solver")
    top_k: int = setting(REFERENCE_TOP_K, low=1, help="ranked training images kept per target")
    max_candidates: int = setting(0, low=0, help="0: every candidate of the class; M: only the M nearest")
    candidate_metric: str = setting("l2", choices=CANDIDATE_METRICS,
                                    help="metric choosing the max_candidates nearest for esvm / random")
    same_class: bool = setting(True, help="false: candidates from every class (ablation)")
    targets: str | int | tuple[int, ...] = setting(
        "all", help='"all" test images, a number of seeded random ones, or a list of test ids')
    seed: int | None = setting(None, help="target draw and the random ranking; unset: the preset's seed")
    on_short: str = setting("keep", choices=SHORT_POLICIES,
                            help='a class smaller than top_k: "keep" the whole class or "error"')
    targets_per_task: int = setting(64, low=1, help="targets of one class per work item")
    workers: int = setting(0, low=0, help="rank workers; 0: as many as the runtime can place")
    esvm_negative: bool = setting(False, help='also the score-only variant "esvm@negative": other classes '
                                              "scored negatively by their likeness to the target")

    def check(self) -> None:
        from attribution.esvm import available_solvers

        known = available_methods("rank")
        self.methods = tuple(dict.fromkeys(self.methods))
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            self.fail("methods", f"has unknown ranking method(s) {unknown or list(self.methods)}; "
                                 f"choose from {known}")
        if self.esvm_negative and ("esvm" not in self.methods or not self.same_class):
            self.fail("esvm_negative", 'needs "esvm" in rank.methods and rank.same_class = true (it scores the '
                                       "other classes of esvm's same-class rankings); add esvm or set "
                                       "esvm_negative = false")
        if self.solver not in available_solvers():
            self.fail("solver", f"must be one of {available_solvers()} (the ESVM solvers), got {self.solver!r}")
        targets = self.targets
        if isinstance(targets, str) and targets != "all" or isinstance(targets, int) and targets < 1 \
                or isinstance(targets, tuple) and not targets:
            self.fail("targets", f'must be "all", a positive number or a list of test ids, got {targets!r}')

    def targets_setting(self):
        """``targets`` as the preset wrote it (a list, not a tuple)."""
        return list(self.targets) if isinstance(self.targets, tuple) else self.targets

    def score_variants(self) -> tuple[str, ...]:
        """The score-only variants the settings ask for (score blocks, no rankings)."""
        return (ESVM_NEGATIVE,) if self.esvm_negative else ()


ESVM_NEGATIVE = "esvm@negative"
# score-only variants: constructor parameters added to their base method's
VARIANT_PARAMS = {ESVM_NEGATIVE: {"negative_influence": True}}


# ----------------------------------------------------------------------------- methods from settings


def method_params(config: RankSettings, method: str, device: str = "cpu", threads: int | None = None) -> dict:
    """Constructor parameters of a rank-stage method from the [rank] settings: every
    parameter of the method's constructor that is a [rank] key, and ``device``.

    ``threads``: a pool worker's torch threads, given to an ESVM solver that takes
    ``num_threads`` unless solver_params set it (workers hold one CPU each)."""
    accepted = inspect.signature(method_class(method)).parameters
    params = {name: getattr(config, name) for name in accepted if name in RankSettings.__dataclass_fields__}
    if "solver_params" in params:
        params["solver_params"] = dict(params["solver_params"])
        if threads is not None:
            from attribution.esvm import solver_class

            if "num_threads" in inspect.signature(solver_class(config.solver)).parameters:
                params["solver_params"] = {"num_threads": int(threads), **params["solver_params"]}
    if "device" in accepted:
        params["device"] = device
    params.update(VARIANT_PARAMS.get(method, {}))
    return params


def unit_settings(config: RankSettings, method: str, target_ids) -> dict:
    """What a (method, class) unit's scores and ranking depend on (stored in both files):
    the method's parameters from [rank] (not its device), top_k, on_short, and the
    digest of the unit's target ids."""
    relevant = method_params(config, method)
    relevant.pop("device", None)
    if "candidate_metric" in relevant and not config.max_candidates:
        relevant["candidate_metric"] = None  # it only chooses the M nearest: irrelevant for whole classes
    relevant.update(top_k=config.top_k, on_short=config.on_short, targets=ids_digest(target_ids))
    return relevant


# ----------------------------------------------------------------------------- inputs


def check_embeddings(train, test) -> None:
    """Embeddings usable for ranking: same dimension, finite values (errors name ids)."""
    from attribution.candidates import check_finite

    if len(train) == 0:
        raise ValueError("the train embeddings are empty: nothing to rank")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(
            f"train embeddings have dimension {train.features.shape[1]} but test embeddings have "
            f"{test.features.shape[1]}: both splits must come from one embed run; rerun "
            "'attribution embed --exp EXP --overwrite'")
    check_finite(train.features, train.ids, "train embeddings")
    check_finite(test.features, test.ids, "test embeddings")


def select_targets(test, train_labels: np.ndarray, config: RankSettings):
    """Positions (into the test table, ascending id) of the targets, and the skipped ones.

    Returns ``(positions, skipped)``; ``skipped`` maps test id -> reason.
    """
    rankable = np.ones(len(test), dtype=bool)
    if config.same_class:
        rankable = np.isin(test.labels, np.unique(train_labels))
    targets = config.targets
    skipped: dict[int, str] = {}
    if targets == "all" or isinstance(targets, tuple):
        if isinstance(targets, tuple):
            try:
                positions = np.unique(test.rows_of(np.asarray(targets, dtype=np.int64)))
            except KeyError as error:
                raise ValueError(f"rank.targets lists test ids that are not in the test embeddings: "
                                 f"{error.args[0]}") from None
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
        rng = np.random.default_rng(config.seed)
        positions = np.sort(rng.choice(pool, size=targets, replace=False))
    if skipped:
        shown = dict(list(skipped.items())[:5])
        warnings.warn(f"skipping {len(skipped)} target(s) whose class has no training items: {shown}"
                      f"{' ...' if len(skipped) > 5 else ''} (listed in the manifest under rank.skipped_targets)",
                      stacklevel=2)
    if len(positions) == 0:
        raise ValueError("no rankable targets: every selected test item's class lacks training items")
    return positions, skipped


def short_classes(config: RankSettings, train_labels: np.ndarray, target_labels: np.ndarray) -> dict[int, int]:
    """{class: candidates} of the target classes that offer fewer than top_k candidates."""
    counts = dict(zip(*np.unique(train_labels, return_counts=True)))
    out = {}
    for label in np.unique(target_labels):
        pool = len(train_labels) if not config.same_class else int(counts.get(label, 0))
        effective = min(pool, config.max_candidates or pool)
        if effective < config.top_k:
            out[int(label)] = effective
    return out


# ----------------------------------------------------------------------------- the worker


class RankWorker(QueueWorker):
    """A pool worker: holds the embeddings (shared once per worker) and the methods it
    fitted on them, so each method is fitted once per worker, not once per item.

    Items are ``(method, label, chunk, target positions)``; the result is the chunk's
    :class:`ScoreBlock`."""

    def __init__(self, train: TrainingData, test: Targets, params: dict, threads: int = 1):
        try:  # the worker holds one CPU: FAISS runs one thread (the scores do not depend on it)
            import faiss

            faiss.omp_set_num_threads(int(threads))
        except Exception:  # noqa: BLE001 - threads are a speed setting, never fatal
            pass
        self.train, self.test, self.params = train, test, params
        self.methods: dict = {}

    def method(self, name: str):
        if name not in self.methods:
            self.methods[name] = create_method(name, **self.params[name]).fit(self.train)
        return self.methods[name]

    def __call__(self, item) -> ScoreBlock:
        method, _label, _chunk, positions = item
        block = self.method(method).score(self.test.take(positions))
        block.method = method  # a variant ("esvm@negative") is computed by its base method's class
        return block


def item_name(item) -> str:
    method, label, chunk, positions = item
    return f"rank {method} class {int(label)} chunk {chunk} ({len(positions)} targets)"


# ----------------------------------------------------------------------------- the stage


@dataclass
class RankUnit:
    """One (method, class of targets): one score block and one ranking file."""

    method: str
    label: int
    positions: np.ndarray  # into the test embeddings
    path: Path             # the ranking file (never written for a score-only variant)
    settings: dict
    ranked: bool = True    # False: a score-only variant (score block, no ranking)

    @property
    def block(self) -> str:
        return f"class{self.label:03d}"


@register_stage
class RankStage(Stage):
    """Score and rank every target's candidates with the [rank] methods (see the module docstring)."""

    name = "rank"
    settings_class = RankSettings
    reads = ("embeddings",)
    writes = ("scores", "rankings")
    flags = ()
    uses_data = False  # embeddings only: no images are read
    help = "rank training images for each target (ESVM, l2, cosine, random)"
    description = ("Read EXP/embeddings and score every target's candidates with the [rank] methods: one "
                   "score block and one ranking file per (method, class). Finished (method, class) units "
                   "are kept, so rerunning resumes.")

    @property
    def store(self):
        from attribution.scores import ScoreStore

        return ScoreStore(self.exp.path("scores"))

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        from attribution.embedding import load_embeddings

        config = self.config
        for name in config.methods:  # bad method parameters fail before any pool starts
            method = create_method(name, **method_params(config, name))
            if hasattr(method, "make_solver"):  # esvm: build its solver, so bad solver_params fail here
                method.make_solver()
        train = load_embeddings(self.exp, "train")
        test = load_embeddings(self.exp, "test")
        check_embeddings(train, test)
        positions, skipped = select_targets(test, train.labels, config)
        target_labels = test.labels[positions]
        short = short_classes(config, train.labels, target_labels)
        if short and config.on_short == "error":
            c, n = next(iter(short.items()))
            raise ValueError(f"class {c} offers only {n} candidates but rank.top_k={config.top_k}; lower "
                             f"top_k (--set rank.top_k={n}) or set rank.on_short=\"keep\" to rank whole classes")
        rankings = self.exp.path("rankings")
        todo, reused = [], []
        for label in np.unique(target_labels):
            label = int(label)
            class_positions = positions[target_labels == label]
            for method in config.methods + config.score_variants():
                unit = RankUnit(method, label, class_positions, rankings / ranking_file_name(method, label),
                                unit_settings(config, method, test.ids[class_positions]),
                                ranked=method in config.methods)
                if self.unit_done(unit, train.ids):
                    reused.append(unit.path.name if unit.ranked else unit_name(unit))
                else:
                    todo.append(unit)
        return Plan(todo, reused, {"train": train, "test": test, "positions": positions, "skipped": skipped,
                                   "short_classes": short})

    def unit_done(self, unit: RankUnit, train_ids) -> bool:
        """True when the unit's ranking holds the same settings and its score block exists
        (a score-only unit: its block holds the same settings); raises
        :class:`SettingsChanged` when the ranking (block) holds other settings."""
        fix = (f"delete rankings/{unit.method}-*.parquet and scores/{unit.method} in {self.exp.root} to "
               "recompute them, or use a new --exp")
        if not unit.ranked:
            return self.store.reuse(unit.method, unit.block, unit.settings, train_ids,
                                    f"delete scores/{unit.method} in {self.exp.root} to recompute it, or use a new --exp")
        legacy = legacy_settings(unit.path)
        if legacy is not None:  # written by the old rank stage: no score block yet
            changes = differences(legacy, unit.settings)
            if changes:
                raise SettingsChanged(str(unit.path), changes, fix)
            return False  # same settings: recomputed (identically), now with its score block
        return reuse(unit.path, unit.settings, fix) and self.store.block_path(unit.method, unit.block).exists()

    # ------------------------------------------------------------------ run
    def run(self, plan: Plan) -> dict:
        if not plan.todo:
            return {"computed": [], "workers": {}, "seconds": 0.0, "retried": 0, "requeued": 0}
        from attribution.scores import concat_blocks, write_ranking

        config, runtime = self.config, self.require_runtime()
        train, test = plan.extra["train"], plan.extra["test"]
        self.store.set_train_ids(train.ids)  # refuses scores of another training set before any work
        work, pending = [], {}
        for unit in plan.todo:
            chunks = [unit.positions[i:i + config.targets_per_task]
                      for i in range(0, len(unit.positions), config.targets_per_task)]
            pending[(unit.method, unit.label)] = {"unit": unit, "chunks": len(chunks), "blocks": {}}
            work += [(unit.method, unit.label, i, chunk) for i, chunk in enumerate(chunks)]
        request = PoolRequest("rank", actors=config.workers or None, max_items=len(work))
        device = runtime.device(request)
        methods = dict.fromkeys(unit.method for unit in plan.todo)
        params = {m: method_params(config, m, device, request.threads) for m in methods}
        start = time.perf_counter()
        computed, workers = [], {}
        queue = runtime.queue(request, RankWorker, TrainingData(train.ids, train.labels, train.features),
                              Targets(test.ids, test.labels, test.features), params, threads=request.threads,
                              key=item_name)
        bar = self._progress_bar(sum(len(item[3]) for item in work))
        try:
            for done in queue.map(work):
                method, label, chunk, chunk_positions = done.item
                entry = pending[(method, label)]
                entry["blocks"][chunk] = done.result
                workers[done.worker] = workers.get(done.worker, 0) + len(chunk_positions)
                if bar is not None:
                    bar.update(len(chunk_positions))
                if len(entry["blocks"]) < entry["chunks"]:
                    continue
                unit = entry["unit"]
                block = concat_blocks([entry["blocks"][i] for i in range(entry["chunks"])])
                entry["blocks"] = {}
                self.store.write(block, unit.block, unit.settings)
                if unit.ranked:  # the ranking last: it marks the unit done
                    write_ranking(block, config.top_k, unit.path, unit.settings)
                computed.append(unit.path.name if unit.ranked else unit_name(unit))
                if bar is not None:
                    bar.set_postfix(files=len(computed), refresh=False)
        finally:
            if bar is not None:
                bar.close()
            queue.close()
        return {"computed": sorted(computed), "workers": workers, "seconds": round(time.perf_counter() - start, 1),
                "retried": queue.retried, "requeued": queue.requeued}

    def _progress_bar(self, total: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="target", desc="rank", file=sys.stderr, mininterval=2.0)

    # ------------------------------------------------------------------ finish
    def finish(self, plan: Plan, result: dict) -> dict:
        import pyarrow.parquet as pq

        config, extra = self.config, plan.extra
        test, positions = extra["test"], extra["positions"]
        rankings = self.exp.path("rankings")
        labels = np.unique(test.labels[positions])
        rows = {m: int(sum(pq.read_metadata(rankings / ranking_file_name(m, int(c))).num_rows for c in labels))
                for m in config.methods}
        self.exp.record_stage(
            self.name,
            settings=config.to_dict(),
            target_ids=[int(i) for i in test.ids[positions]],
            n_targets=int(len(positions)),
            targets_setting=config.targets_setting(),
            methods=list(config.methods), score_variants=list(config.score_variants()),
            top_k=config.top_k, solver=config.solver,
            solver_params=config.solver_params, max_candidates=config.max_candidates or None,
            candidate_metric=config.candidate_metric, same_class=config.same_class,
            seed=config.seed, on_short=config.on_short,
            short_classes=extra["short_classes"],  # class -> candidates, for classes smaller than top_k
            skipped_targets={str(k): v for k, v in extra["skipped"].items()},
            rows=rows, files=sorted(p.name for p in rankings.glob("*.parquet")),
            computed_files=result["computed"], reused_files=plan.reused,
            last_run_compute_seconds=result["seconds"],
            targets_per_worker=result["workers"],  # (target, method) rankings per worker (host:pid@node), this run
            retried=result["retried"], requeued=result["requeued"],
        )
        return {"targets": int(len(positions)), "methods": list(config.methods), "top_k": config.top_k,
                "solver": config.solver, "rows": rows, "computed_files": len(result["computed"]),
                "reused_files": len(plan.reused)}


def unit_name(unit: RankUnit) -> str:
    """How a score-only unit is listed among computed / reused files: its score block."""
    return f"scores/{unit.method}/{unit.block}.parquet"


def legacy_settings(path: Path) -> dict | None:
    """The settings a ranking file of the old rank stage stored (its own metadata key,
    targets as a full SHA-256), in today's form; None for other files."""
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(LEGACY_SETTINGS_KEY)
    if not raw:
        return None
    stored = json.loads(raw)
    if "targets_sha256" in stored:  # ids_digest is the first 16 hex digits of the same SHA-256
        stored["targets"] = str(stored.pop("targets_sha256"))[:16]
    return stored
