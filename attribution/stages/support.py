"""The support stage: counterfactual support by retraining, many bisection searches at once.

For every (target, method, mode) a :class:`attribution.bisection.BisectionSearch` (a
pure state machine) finds the smallest k such that models retrained without (removal)
or with relabelled (mislabel) top-k ranked training images misclassify the target.

Design (see docs/support.md for the reasoning): the stage asks its runtime for ONE
work queue of :class:`attribution.retraining.RetrainWorker` workers (one torch thread
each; a fraction of a GPU each for small models when the cluster has GPUs), which hold
the training set and the target images once and train one model per item. First the
full-data ensemble (items ``{"kind": "ensemble"}``) gives every target its flip class
and screens out misclassified / unstable targets; then :class:`SearchScheduler` keeps
the queue full with the searches' trainings (items ``{"kind": "train"}``): required
trainings first, oldest search first (so searches finish early), speculative ones (the
k a search may test next) only for workers that would otherwise idle. A lost worker or
node puts its item back in the queue; a failing item is retried ``max_retries`` times.

Resume: every finished training is appended to ``EXP/trainings/``
(:class:`attribution.retraining.PartLog`); a rerun reads the rows of the same recipe,
feeds them to the searches before proposing anything, and so never repeats a finished
training. A training's torch seed is fixed by (base seed, seed index); its change is
stored with it as ``change`` (a digest of the set of ids removed / relabelled: the
ranking's top k) and ``relabel_to`` (the mislabel class; null for removal). A row
answers a search only when both equal what the search would train now, so after the
rankings are recomputed (new embeddings, ``rank --overwrite``) or the flip class
changes, no outcome of another prefix is reused; rows written before these columns
existed are never reused. Rows of other recipes or other changes are ignored (not
refused): the log is a cache of facts.

Small data: removing every training image leaves nothing to train on, so a removal
search's limit is capped at the training-set size - 1 (support.parquet's ``limit``
records each search's limit; the summary counts the capped searches). Errors a
retraining input makes deterministically (:class:`attribution.retrain.RetrainInputError`)
are not retried by the queue, and their message does not suggest more retries.

Outputs:
- ``EXP/trainings/part-*.parquet``: :data:`TRAININGS_SCHEMA`, one row per training.
- ``EXP/support_targets.parquet``: every selected target: label, flip_class, fraction of
  the full-data ensemble that classifies it correctly, status (searched / misclassified
  / unstable; only "searched" targets get searches).
- ``EXP/support.parquet``: :data:`SUPPORT_SCHEMA`, target_id, method, mode, support (-1 =
  not found within the limit), trainings, seconds (+ status, limit, flip_class,
  reference_trainings, recipe).
Both tables store the settings they were computed with (support.parquet also a digest
per method of the rankings it searched); a rerun that would replace them with other
settings or other rankings is refused (:class:`attribution.artifacts.SettingsChanged`)
unless the stage is run with ``force=True`` (``--force``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import pyarrow as pa

from attribution.artifacts import ids_digest, read_dataset, reuse, write_table
from attribution.bisection import NOT_FOUND, BisectionSearch, Trial
from attribution.retraining import (PartLog, Recipe, RetrainPoolSettings, read_parts,
                                    recipe_fingerprint, target_arrays, training_arrays)
from attribution.reuse import adopt_base_artifact, adopt_base_trainings
from attribution.settings import setting
from attribution.stages import Flag, Plan, Stage, register_stage
from attribution.workqueue import NotRetried, WorkFailed, WorkQueue

MODES = ("removal", "mislabel")
# A training is identified by its search, (k, seed) AND what it changed: the digest of
# the ids removed / relabelled and the relabel class (the same (target, method, mode, k)
# means another training once the rankings or the flip class changed).
TRAINING_KEY = ["target_id", "method", "mode", "k", "seed", "change", "relabel_to"]
TRAININGS_SCHEMA = pa.schema([
    ("target_id", pa.int64()), ("method", pa.string()), ("mode", pa.string()), ("k", pa.int32()),
    ("seed", pa.int32()), ("correct", pa.bool_()), ("margin", pa.float32()), ("seconds", pa.float32()),
    ("recipe", pa.string()), ("torch_seed", pa.int64()), ("attempt", pa.int32()), ("worker", pa.string()),
    ("speculative", pa.bool_()), ("finished_at", pa.float64()),
    ("change", pa.string()), ("relabel_to", pa.int32()),
])
SUPPORT_SCHEMA = pa.schema([
    ("target_id", pa.int64()), ("method", pa.string()), ("mode", pa.string()), ("support", pa.int32()),
    ("trainings", pa.int32()), ("seconds", pa.float32()), ("status", pa.string()), ("limit", pa.int32()),
    ("flip_class", pa.int32()), ("reference_trainings", pa.int32()), ("recipe", pa.string()),
])
OUTPUTS = ["trainings/", "support_targets.parquet", "support.parquet"]


# ----------------------------------------------------------------------------- settings


@dataclass
class SupportSettings(RetrainPoolSettings):
    """The [support] section of a preset (every key has a default).

    The retraining recipe (:meth:`recipe`) and ``seed`` are also what the TRAK and
    Datamodels stages retrain with."""

    section: ClassVar[str] = "support"

    model: str = setting("mlp", help="retraining model (mlp | cnn | resnet9 | mobilenetv2 | resnet18) or a "
                                     "recipe name of attribution.retrain.RECIPES")
    epochs: int | None = setting(None, low=1, help="training epochs (unset: the recipe's)")
    batch_size: int | None = setting(None, low=1, help="batch size (unset: the recipe's)")
    lr: float | None = setting(None, low=0, low_open=True, help="peak learning rate (unset: the recipe's)")
    width: int | None = setting(None, low=1, help="the MLP's hidden units (unset: the recipe's, 256)")
    engine: str | None = setting(None, choices=("module", "stacked"),
                                 help="'stacked': many MLPs trained at once per worker (attribution/batched_retrain.py)"
                                      "; 'module': one model at a time (unset: the recipe's)")
    precision: str | None = setting(None, choices=("fp32", "bf16", "auto"),
                                    help="'bf16': bfloat16 matrix products, fp32 weights; 'auto': bf16 where the "
                                         "device has it natively, else fp32 (unset: the recipe's)")
    seeds: int = setting(5, low=1, help="trainings per bisection step (the reference's num_tests)")
    first_seeds: int = setting(1, low=1, help="trainings of the first test at k = limit (reference: 1)")
    budget: int = setting(8, low=0, help="bisection steps after the first test")
    targets: int | tuple[int, ...] = setting(10, help="targets searched: every ranked target is screened by the "
                                                      "full-data ensemble and the first this many that it classifies "
                                                      "correctly, in a seeded order, are searched; or a list of test "
                                                      "image ids (searched when classified correctly)")
    modes: tuple[str, ...] = setting(MODES, choices=MODES, help="removal and/or mislabel")
    methods: tuple[str, ...] = setting((), help="methods whose rankings are searched; empty: every method in "
                                                "EXP/rankings")
    top_k: int = setting(1280, low=1, help="the largest k tested, capped by each ranking's length (and for "
                                           "removal at the training-set size - 1)")
    ensemble: int = setting(5, low=1, help="full-data models for the flip class and the target screening")
    early_decision: bool = setting(True, help="skip a step's remaining seeds once its vote is settled")
    speculate: bool = setting(True, help="idle workers train the k a search may need next")
    seed: int | None = setting(None, help="base seed of the trainings and the target draw; unset: the preset's")

    def check(self) -> None:
        if isinstance(self.targets, int) and self.targets < 1:
            self.fail("targets", f"must be an integer >= 1 or a list of test image ids, got {self.targets!r}")
        if isinstance(self.targets, tuple):
            if not self.targets:
                self.fail("targets", "must be an integer >= 1 or a non-empty list of test image ids, got []")
            if len(set(self.targets)) != len(self.targets):
                self.fail("targets", f"lists a test image id twice: {list(self.targets)}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            self.fail("modes", f"must be a non-empty subset of {list(MODES)}, got {list(self.modes)}")
        if self.methods:
            from attribution.methods import available_methods, is_method

            unknown = [m for m in self.methods if not is_method(m)]
            if unknown:
                self.fail("methods", f"must name registered methods {available_methods()} or their variants "
                                     f"(<method>@<tag>; or be empty: every method in EXP/rankings), got unknown {unknown}")
        try:
            self.recipe().train_config(device="cpu")
        except ValueError as error:
            self.fail("model", f"(with epochs, batch_size, lr) must make a valid recipe: {error}")

    def recipe(self) -> Recipe:
        """The retraining recipe (the support, TRAK and Datamodels stages' models)."""
        return Recipe(self.model, self.epochs, self.batch_size, self.lr, self.width, self.engine, self.precision)


# What each output depends on: a rerun whose values differ would replace it (refused
# unless forced). Scheduling keys (actors, speculate, queue_depth, ...) are not in them.
RESULT_KEYS = ("model", "epochs", "batch_size", "lr", "seeds", "first_seeds", "budget", "targets", "modes",
               "methods", "top_k", "ensemble", "early_decision", "seed")
SCREENING_KEYS = ("model", "epochs", "batch_size", "lr", "ensemble", "seed")


# ----------------------------------------------------------------------------- inputs


def load_rankings(folder, methods: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """Rankings as {(target_id, method): train ids ordered by rank}, and the methods
    (``methods``, or every method in ``folder`` when empty; sorted by name)."""
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
                             "fix support.methods or rerun the stage that ranks them")
        frame = frame[frame["method"].isin(list(methods))]
    frame = frame.sort_values(["target_id", "method", "rank"], kind="stable")
    rankings = {(int(t), m): group["train_id"].to_numpy(np.int64)
                for (t, m), group in frame.groupby(["target_id", "method"], sort=True)}
    return rankings, sorted(frame["method"].unique())


def select_targets(rankings: dict, methods: Sequence[str], spec) -> np.ndarray:
    """The targets the full-data ensemble screens: every target ranked by every method
    (``spec`` a number), or the given ids (``spec`` a list)."""
    per_method = [{t for (t, m) in rankings if m == method} for method in methods]
    common = np.array(sorted(set.intersection(*per_method)), dtype=np.int64)
    if isinstance(spec, (list, tuple)):
        wanted = np.asarray(spec, dtype=np.int64)
        missing = np.setdiff1d(wanted, common)
        if len(missing):
            raise ValueError(f"support.targets {missing[:10].tolist()} are not ranked by every method {list(methods)}")
        return np.sort(wanted)
    return common


def searched_targets(screening, spec, seed: int) -> np.ndarray:
    """The screened targets that are searched: those every full-data model classifies
    correctly (status "searched"); when ``spec`` is a number, the first ``spec`` of them in
    a seeded order of the screened targets (so the count is met whenever enough targets
    are classified correctly, and a larger number only adds targets)."""
    screened = np.asarray(screening["target_id"], dtype=np.int64)
    eligible = set(screened[np.asarray(screening["status"]) == "searched"].tolist())
    if isinstance(spec, (list, tuple)):
        return np.array(sorted(eligible & {int(t) for t in spec}), dtype=np.int64)
    rng = np.random.default_rng([int(seed), 7])  # a stream of its own: independent of other draws
    order = np.sort(screened)[rng.permutation(len(screened))]
    return np.sort(np.array([t for t in order.tolist() if t in eligible][:int(spec)], dtype=np.int64))


def rankings_digests(rankings: dict, methods: Sequence[str]) -> dict:
    """A digest per method of its rankings (every target's ranked ids, in order): what
    support.parquet stores to notice rankings recomputed since it was made."""
    out = {}
    for method in methods:
        parts = [np.concatenate([[target, len(ids)], ids]) for (target, m), ids in sorted(rankings.items())
                 if m == method]
        out[method] = ids_digest(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return out


def read_trainings(folder, recipe: str | None = None):
    """The trainings log as a pandas DataFrame (empty when none), rows of ``recipe`` only
    (when given), deduplicated by training key (the first row of a key wins). Parts
    written before a column existed read it as null."""
    import pandas as pd

    table = read_parts(folder, schema=TRAININGS_SCHEMA)
    if table is None:
        return pd.DataFrame({name: pd.Series(dtype=TRAININGS_SCHEMA.field(name).type.to_pandas_dtype())
                             for name in TRAININGS_SCHEMA.names})
    frame = table.to_pandas()
    if recipe is not None and "recipe" in frame:
        frame = frame[frame["recipe"] == recipe]
    return frame.drop_duplicates(TRAINING_KEY, keep="first").reset_index(drop=True)


# ----------------------------------------------------------------------------- scheduler


@dataclass
class SearchTask:
    """One (target, method, mode) search with what its trainings need."""

    target_id: int
    method: str
    mode: str
    ranked_ids: np.ndarray  # training ids, most influential first (length >= the search's limit)
    flip_class: int
    search: BisectionSearch
    seconds: float = 0.0  # summed training seconds of the outcomes it knows
    _changes: dict = field(default_factory=dict, repr=False)  # k -> change digest (memo)

    @property
    def key(self) -> tuple:
        return (self.target_id, self.method, self.mode)

    @property
    def relabel_to(self) -> int | None:
        """The class the top-k are relabelled to (None: removal relabels nothing)."""
        return int(self.flip_class) if self.mode == "mislabel" else None

    def change(self, k: int) -> str:
        """Digest of the ids the trial at ``k`` removes / relabels. A training depends on
        this set, not its order, so the sorted ids: a reordered ranking with the same
        top-k set (e.g. k = a whole class) is rightly answered by the same training."""
        if k not in self._changes:
            self._changes[k] = ids_digest(np.sort(self.ranked_ids[:k]))
        return self._changes[k]

    def answers(self, k: int, change, relabel_to) -> bool:
        """Whether a logged training (its k, change digest, relabel class) is one this
        search would train now; a row without a change digest (an older log) never is."""
        import pandas as pd

        if not isinstance(change, str) or change != self.change(k):
            return False
        if pd.isna(relabel_to):  # None / NaN: pandas reads a null of an int column as NaN
            return self.relabel_to is None
        return self.relabel_to is not None and int(relabel_to) == self.relabel_to

    def item(self, trial: Trial, base_seed: int, speculative: bool = False) -> dict:
        """The queue item of ``trial``: the top-k ranked ids removed, or relabelled to the flip class."""
        from attribution.retrain import training_seed

        changed = self.ranked_ids[:trial.k]
        item = {"kind": "train", "target_id": self.target_id, "method": self.method, "mode": self.mode,
                "k": trial.k, "seed": trial.seed, "torch_seed": training_seed(base_seed, trial.seed),
                "speculative": speculative, "change": self.change(trial.k)}
        if self.mode == "removal":
            item["removed_ids"] = changed
        else:
            item["relabel_ids"], item["relabel_to"] = changed, int(self.flip_class)
        return item


def item_name(item: dict) -> str:
    """How errors name a queue item of this stage."""
    if item.get("kind") == "ensemble":
        return f"full-data ensemble model {item['member']}"
    return f"training {(item['target_id'], item['method'], item['mode'], item['k'], item['seed'])}"


class SearchScheduler:
    """Drives many support searches to the end on one :class:`attribution.workqueue.WorkQueue`.

    Parameters
    ----------
    tasks : the searches; their order is the priority (oldest first)
    base_seed : seed index i trains with torch seed ``retrain.training_seed(base_seed, i)``
    recipe : fingerprint stored with every logged row
    log : where finished trainings are appended (a PartLog of TRAININGS_SCHEMA; None: nowhere)
    speculate : give workers that would idle trainings a search may need next
    wait_seconds : the log is flushed when no result came for this long
    progress : tqdm bars on stderr
    """

    def __init__(self, tasks: Sequence[SearchTask], base_seed: int, recipe: str, log: PartLog | None = None,
                 speculate: bool = True, wait_seconds: float = 15.0, progress: bool = False):
        self.tasks = list(tasks)
        self.by_key = {task.key: task for task in self.tasks}
        self.base_seed, self.recipe, self.log = int(base_seed), recipe, log
        self.speculate, self.wait_seconds, self.progress = bool(speculate), float(wait_seconds), progress
        self.trained: list[tuple] = []  # training keys finished by this run, in completion order

    @property
    def active(self) -> list[SearchTask]:
        return [task for task in self.tasks if not task.search.done]

    def resume(self, rows) -> int:
        """Record known outcomes (rows of the trainings log) before anything is proposed;
        returns how many belong to these searches (same search, k, seed, change and
        relabel class: a row trained on another ranked prefix is not an answer)."""
        used = 0
        for row in rows.itertuples(index=False):
            task = self.by_key.get((int(row.target_id), row.method, row.mode))
            if task is not None and task.answers(int(row.k), getattr(row, "change", None),
                                                 getattr(row, "relabel_to", None)):
                task.search.record(Trial(int(row.k), int(row.seed)), bool(row.correct), float(row.margin))
                task.seconds += float(row.seconds)
                used += 1
        return used

    def run(self, queue: WorkQueue) -> None:
        """Submit trainings and record their outcomes until every search is done and
        nothing is in flight (speculative trainings still running are awaited and counted)."""
        from tqdm.auto import tqdm

        active = self.active
        if not active:
            return
        bar_train = tqdm(total=sum(_bound(t) for t in active), desc="trainings (upper bound)", unit="model",
                         disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        bar_search = tqdm(total=len(self.tasks), initial=len(self.tasks) - len(active), desc="searches",
                          unit="search", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            while active or queue.pending:
                # Required trainings first, oldest searches first (finishes searches early).
                # With nothing in flight at least one is queued: the queue holds it while
                # every worker is (re)starting.
                free = queue.free() if queue.pending else max(1, queue.free())
                for task in active:
                    if free <= 0:
                        break
                    for trial in task.search.propose(free):
                        queue.submit(task.item(trial, self.base_seed))
                        free -= 1
                # Idle workers (nothing queued at all): speculative k of running searches.
                idle = queue.idle() if self.speculate else 0
                for task in active:
                    if idle <= 0:
                        break
                    for trial in task.search.propose(idle, speculative=True):
                        queue.submit(task.item(trial, self.base_seed, speculative=True))
                        idle -= 1
                if not queue.pending:
                    raise RuntimeError("no training in flight but searches are unfinished: "
                                       f"{[t.key for t in active][:5]} (a bug in the search state machine)")
                done = queue.next(timeout=self.wait_seconds)
                if done is None:
                    if self.log is not None:
                        self.log.flush()
                    continue
                self._record(done, bar_train, bar_search)
                active = [t for t in active if not t.search.done]
        finally:
            bar_train.close()
            bar_search.close()

    def _record(self, done, bar_train, bar_search) -> None:
        item, result = done.item, done.result
        task = self.by_key[(item["target_id"], item["method"], item["mode"])]
        trial = Trial(item["k"], item["seed"])
        self.trained.append(task.key + (trial.k, trial.seed))
        if self.log is not None:
            self.log.add({"target_id": task.target_id, "method": task.method, "mode": task.mode, "k": trial.k,
                          "seed": trial.seed, "correct": result["correct"], "margin": result["margin"],
                          "seconds": result["seconds"], "recipe": self.recipe, "torch_seed": item["torch_seed"],
                          "attempt": done.attempt, "worker": done.worker, "speculative": item["speculative"],
                          "finished_at": time.time(), "change": item["change"], "relabel_to": item.get("relabel_to")})
        was_done = task.search.done
        remaining = _bound(task)
        task.search.record(trial, result["correct"], result["margin"])
        task.seconds += result["seconds"]
        if was_done or remaining == 0:
            bar_train.total += 1  # a speculative training beyond the bound
        bar_train.update(1)
        if task.search.done and not was_done:
            bar_search.update(1)
            bar_train.total -= _bound(task)  # the bar's total is an upper bound: drop what is no longer needed
            bar_train.refresh()


def _bound(task: SearchTask) -> int:
    """Most trainings a search can still need (speculative ones aside)."""
    search = task.search
    return max(0, search.first_seeds + search.budget * search.seeds - search.trainings)


# ----------------------------------------------------------------------------- stage


@register_stage
class SupportStage(Stage):
    """Counterfactual support of every method's rankings by retraining (see the module doc).

    Options: ``force`` (replace support.parquet / support_targets.parquet made with other
    settings; finished trainings of the same recipe are still reused)."""

    name = "support"
    settings_class = SupportSettings
    reads = ("rankings",)
    writes = ("trainings", "support_targets", "support")
    flags = (Flag("--force", "replace support.parquet and support_targets.parquet made with other [support] "
                             "settings (finished trainings of the same recipe are reused)", option="force"),)
    help = "estimate removal/mislabel support of the rankings by retraining"
    description = ("Bisection over k with models retrained on a pool of workers; resumes from EXP/trainings/ "
                   "when rerun.")

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        start = time.perf_counter()
        s, data = self.config, self.settings.data
        force = bool(self.options.get("force", False))
        rankings, methods = load_rankings(self.exp.path("rankings"), s.methods)
        train_set = data.load("train")
        ranked_ids = np.unique(np.concatenate(list(rankings.values())))
        try:
            train_set.positions_of(ranked_ids)
        except KeyError as error:  # fail before any training, naming ids and the fix
            raise ValueError(f"{error.args[0]}: the rankings in {self.exp.path('rankings')} were made on another "
                             "training subset than [data] describes (train_per_class, seed); rerun the rank stage "
                             "or fix [data]") from error
        target_ids = select_targets(rankings, methods, s.targets)
        removal_limit = self._removal_limit([rankings[(t, m)] for t in target_ids.tolist() for m in methods],
                                            len(train_set))
        recipe = recipe_fingerprint(s.recipe().train_config(), data.key(), s.seed, len(train_set))
        # the table also depends on the rankings searched: recomputed rankings are a change too
        result_settings = dict(self._stored_settings(RESULT_KEYS, recipe),
                               rankings=rankings_digests(rankings, methods))
        screening_settings = self._stored_settings(SCREENING_KEYS, recipe)
        fix = (f"Rerun with --force to replace it (finished trainings in "
               f"{self.exp.path('trainings')} of the same recipe and the same ranked prefixes are reused), "
               "or use a new --exp.")
        reuse(self.exp.path("support"), result_settings, fix, force)  # refuses other settings
        adopt_base_artifact(self.exp, "support_targets", screening_settings)  # an ablation: its base's ensemble
        screening = None
        if reuse(self.exp.path("support_targets"), screening_settings, fix, force):
            import pandas as pd

            frame = pd.read_parquet(self.exp.path("support_targets"))
            if set(target_ids.tolist()) <= set(frame["target_id"].tolist()):
                screening = frame.set_index("target_id").loc[target_ids].reset_index()
        extra = {"start": start, "rankings": rankings, "methods": methods, "train_set": train_set,
                 "target_ids": target_ids, "removal_limit": removal_limit, "recipe": recipe,
                 "result_settings": result_settings,
                 "screening_settings": screening_settings, "screening": screening,
                 "known": read_trainings(self.exp.path("trainings"), recipe), "scheduler": None}
        plan = Plan(todo=["ensemble"] if screening is None else [], extra=extra)
        if screening is not None:
            scheduler = self._scheduler(plan)
            plan.todo = [t.key for t in scheduler.active]
            plan.reused = [t.key for t in scheduler.tasks if t.search.done]
        return plan

    def _removal_limit(self, searched: list, n_train: int) -> int:
        """The largest k a removal search may test: below the training-set size, since
        removing every image leaves nothing to train on (a deterministic failure that no
        retry can mend). Says so once when support.top_k is capped by it."""
        s = self.config
        if "removal" not in s.modes:
            return int(s.top_k)
        if n_train < 2:
            raise ValueError(f"support.modes includes 'removal', which needs at least 2 training images; [data] "
                             f"gives {n_train}: raise data.train_per_class or set support.modes = ['mislabel']")
        longest = max(len(ids) for ids in searched)  # the rankings of the selected targets
        if min(int(s.top_k), longest) >= n_train:
            print(f"support: removal searches test at most k = {n_train - 1} (support.top_k = {s.top_k}; removing "
                  f"all {n_train} training images would leave nothing to train on); support.parquet's limit "
                  "column records each search's limit", file=sys.stderr, flush=True)
        return min(int(s.top_k), n_train - 1)

    def _stored_settings(self, keys, recipe: str) -> dict:
        values = self.config.to_dict()
        return {"support": {key: values[key] for key in keys}, "data": self.settings.data.key(), "recipe": recipe}

    def _scheduler(self, plan: Plan) -> "SearchScheduler":
        """The searches of the screened targets, with the log's outcomes recorded."""
        s, extra = self.config, plan.extra
        screening = extra["screening"]
        flip = dict(zip(screening["target_id"].astype(int), screening["flip_class"].astype(int)))
        tasks = []
        extra["searched_ids"] = searched_targets(screening, s.targets, s.seed)
        for target in extra["searched_ids"].tolist():
            for method in extra["methods"]:
                ranked = extra["rankings"][(target, method)]
                for mode in s.modes:
                    cap = extra["removal_limit"] if mode == "removal" else int(s.top_k)
                    search = BisectionSearch(min(cap, len(ranked)), s.budget, s.seeds, s.first_seeds,
                                             s.early_decision, mode, key=(target, method, mode))
                    tasks.append(SearchTask(target, method, mode, ranked, flip[target], search))
        scheduler = SearchScheduler(tasks, s.seed, extra["recipe"], speculate=s.speculate,
                                    wait_seconds=s.flush_seconds, progress=self.progress)
        scheduler.resume(extra["known"])
        # an ablation: identical trainings (recipe, change, seed) logged by its base experiment
        extra["from_base"] = adopt_base_trainings(self.exp, scheduler, extra["known"])
        extra["scheduler"] = scheduler
        return scheduler

    # ------------------------------------------------------------------ run
    def run(self, plan: Plan) -> dict:
        s, extra = self.config, plan.extra
        pool = _LazyQueue(self, extra)
        with contextlib.ExitStack() as stack:
            stack.callback(pool.close)
            if extra["screening"] is None:
                extra["screening"] = self._screen(pool.get(), extra)
            scheduler = extra["scheduler"] or self._scheduler(plan)
            if scheduler.active:
                scheduler.log = PartLog(self.exp.path("trainings"), TRAININGS_SCHEMA, flush_every=s.flush_every,
                                        flush_seconds=s.flush_seconds)
                stack.callback(scheduler.log.flush)  # keep what finished, however the run ends
                try:
                    scheduler.run(pool.get())
                except WorkFailed as error:
                    raise WorkFailed(failure_message(error, self.exp.path("trainings"))) from error
        rows = [{"target_id": task.target_id, "method": task.method, "mode": task.mode,
                 "support": int(task.search.support), "trainings": task.search.trainings, "seconds": task.seconds,
                 "status": "not_found" if task.search.support == NOT_FOUND else "found",
                 "limit": task.search.limit, "flip_class": task.flip_class,
                 "reference_trainings": task.search.reference_trainings(), "recipe": extra["recipe"]}
                for task in scheduler.tasks]
        extra["support"] = pa.Table.from_pylist(rows, schema=SUPPORT_SCHEMA)  # written by finish
        counts = extra["screening"]["status"].value_counts().to_dict()
        queue = pool.queue
        searched = len(extra["searched_ids"])
        if isinstance(s.targets, int) and searched < s.targets:
            print(f"support: only {searched} of the {len(extra['target_ids'])} ranked targets are classified "
                  f"correctly by every full-data model; support.targets = {s.targets} asks for more: rank more "
                  "targets (rank.targets)", file=sys.stderr, flush=True)
        return {"targets": len(extra["target_ids"]), "searched_targets": searched,
                "classified_correctly": int(counts.get("searched", 0)),
                "misclassified_targets": int(counts.get("misclassified", 0)),
                "unstable_targets": int(counts.get("unstable", 0)), "searches": len(rows),
                "found": int(sum(r["status"] == "found" for r in rows)),
                "trainings": int(sum(r["trainings"] for r in rows)),
                "reference_trainings": int(sum(r["reference_trainings"] for r in rows)),
                "trained_this_run": len(scheduler.trained), "trainings_from_base": extra.get("from_base", 0),
                # removal searches whose limit the training-set size capped below support.top_k
                "limit_capped": int(sum(t.mode == "removal" and t.search.limit < min(int(s.top_k), len(t.ranked_ids))
                                        for t in scheduler.tasks)),
                # failed attempts retried; items put back after their worker was lost; workers replaced
                "retried": queue.retried if queue is not None else 0,
                "requeued": queue.requeued if queue is not None else 0,
                "replaced": queue.replaced if queue is not None else 0,
                "recipe": extra["recipe"], "wall_seconds": round(time.perf_counter() - extra["start"], 1)}

    def _screen(self, queue: WorkQueue, extra: dict):
        """The full-data ensemble on the queue: flip class and status of every selected
        target, written to support_targets.parquet."""
        import pandas as pd

        from attribution import retrain

        s = self.config
        items = [{"kind": "ensemble", "member": i, "torch_seed": retrain.training_seed(s.seed, i)}
                 for i in range(s.ensemble)]
        logits = {}
        try:
            for done in queue.map(items):
                logits[done.item["member"]] = done.result["logits"]
        except WorkFailed as error:
            raise WorkFailed(f"{error}. Fix the cause and rerun the same command") from error
        targets = extra["targets"]
        result = retrain.EnsembleResult(np.asarray(targets["ids"]), np.asarray(targets["labels"]),
                                        np.stack([logits[i] for i in range(s.ensemble)]))
        screening = pd.DataFrame(result.table())
        screening["ensemble_models"] = s.ensemble
        screening["recipe"] = extra["recipe"]
        write_table(pa.Table.from_pandas(screening, preserve_index=False), self.exp.path("support_targets"),
                    settings=extra["screening_settings"])
        return screening

    # ------------------------------------------------------------------ finish
    def finish(self, plan: Plan, result: dict) -> dict:
        """support.parquet (with its settings), then the manifest's support section."""
        write_table(plan.extra["support"], self.exp.path("support"), settings=plan.extra["result_settings"])
        summary = dict(result)
        self.exp.record_stage(self.name, settings=self.config.to_dict(), outputs=OUTPUTS, **summary)
        return summary


def deterministic(error: BaseException | None) -> bool:
    """Whether a failure was caused by a :class:`attribution.workqueue.NotRetried` error
    (directly, as a Ray task error's ``cause``, or anywhere in its chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NotRetried) or isinstance(getattr(error, "cause", None), NotRetried):
            return True
        error = error.__cause__ or error.__context__
    return False


def failure_message(error: WorkFailed, trainings) -> str:
    """What a failed search run tells the user: what is saved, and the fix. A
    deterministic error fails the same way on every attempt, so more retries are no fix."""
    if deterministic(error):
        return (f"{error}. Finished trainings are saved in {trainings}: this input fails the same way on every "
                "attempt, so fix what the error names and rerun the same command to resume")
    return (f"{error}. Finished trainings are saved in {trainings}: fix the cause and rerun the same command to "
            "resume (or raise support.max_retries)")


class _LazyQueue:
    """The stage's one retraining queue, opened on first use (a rerun with nothing left
    to train starts no workers)."""

    def __init__(self, stage: SupportStage, extra: dict):
        self.stage, self.extra = stage, extra
        self.queue: WorkQueue | None = None

    def get(self) -> WorkQueue:
        if self.queue is None:
            s, extra = self.stage.config, self.extra
            runtime = self.stage.require_runtime()
            request = s.pool_request(s.model)
            config = s.recipe().train_config(runtime.device(request))  # as the pool's resources decide
            test_set = self.stage.settings.data.load("test", subset=False)
            extra["targets"] = target_arrays(test_set, extra["target_ids"])
            self.queue = s.open_queue(runtime, request, config, training_arrays(extra["train_set"]),
                                      extra["targets"], key=item_name)  # groups of models_per_worker
        return self.queue

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
