"""The datamodels stage: subset trainings, one regression per target, scores, rankings, LDS data.

For every target the rank stage ranked (:func:`attribution.ranking.ranked_targets`),
Datamodels (Ilyas et al. 2022; :mod:`attribution.baselines.datamodels`) trains
``models`` models on seeded random alpha-subsets of the training set, records each
model's margin on every target, and fits one l1 linear regression per target (the
``"datamodels"`` method, :mod:`attribution.methods.datamodels`); the coefficients are
the scores and rank the training images. ``lds_models`` more subset models, never seen
by the regression, are the held-out models of the LDS metric (EXP/lds/).

Budgets: ``budgets = [1000, 2000]`` adds the variants ``"datamodels@n1000"`` and
``"datamodels@n2000"`` (:func:`attribution.methods.variant_name`), fitted on the FIRST
1000 / 2000 of the ``models`` models (a model's subset depends only on (seed, model id),
so the prefix is what a run with ``models = 1000`` would have trained); plain
``"datamodels"`` is the largest count, ``models``. Each variant has its own regressions,
score blocks and rankings, and its own seconds in the manifest's ``method_seconds``
(the cost contract, :func:`attribution.metrics.method_stage_seconds`): its models' share
of the training pool's wall time plus its regressions' share of the regression pool's.

Rankings: the lasso leaves most coefficients at zero; the ranking orders those by their
signed first-order entry strength along the l1 path (``zero_order = "entry"``,
:func:`attribution.baselines.datamodels.ranking_key`); the scores stay the coefficients.

Work queues (from the stage's runtime): the trainings are items ``{"kind": "subset",
"model_id", "removed_ids", "torch_seed"}`` for :class:`attribution.retraining.RetrainWorker`
on a "retrain" pool (the worker holds the training set and the target images once;
one CPU and one torch thread, or a GPU share); the regressions are one item per class
of targets for :class:`RegressionWorker` on a "regression" pool. Only the driver
writes to EXP.

Outputs (all atomic):
- ``EXP/datamodels/models/part-*.parquet``: finished models (model_id, packed mask,
  margins of every target, seconds, attempt, worker, ...) in small part files
  (:class:`attribution.retraining.PartLog`): the unit of resume.
- ``EXP/datamodels/masks.parquet`` (model_id, train_id: one row per image a model saw)
  and ``EXP/datamodels/margins.parquet`` (model_id, target_id, margin): the regression's
  models, ids 0 .. models-1.
- ``EXP/lds/masks.parquet``, ``EXP/lds/margins.parquet``: the held-out LDS models, ids
  :data:`LDS_MODEL_OFFSET` + 0 .. lds_models-1 (the report's LDS reads these).
- ``EXP/datamodels/regressions/coef-classNNN.parquet`` (target_id, train_id, coef; the
  non-zero coefficients), ``targets-classNNN.parquet`` (per target: intercept, chosen
  regularisation, non-zero coefficients, held-out errors, ...) and
  ``entry-classNNN.parquet`` (per target: the residual correlation over the training
  ids in ascending order, the order of the zeros); a variant's in
  ``EXP/datamodels/regressions@<tag>/``.
- ``EXP/scores/<variant>/classNNN.parquet``: the coefficients as a score block.
- ``EXP/rankings/<variant>-classNNN.parquet``: derived from the block, written last.

Resume: a model's subset and torch seed depend only on (seed, model id), so a rerun
trains only the model ids missing from the part files, and a (variant, class) whose
ranking and regression outputs exist with the same settings is skipped. Changed settings are
refused with the differing keys named.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from attribution.artifacts import ids_digest, reuse, write_table
from attribution.methods import Targets, TrainingData, create_method, variant_name
from attribution.retraining import RetrainPoolSettings
from attribution.settings import setting
from attribution.stages import Plan, Stage, register_stage
from attribution.workqueue import QueueWorker

METHOD = "datamodels"
LDS_MODEL_OFFSET = 1_000_000  # LDS model ids: one id space with the regression's models, never overlapping
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
ENTRY_SCHEMA = pa.schema([("target_id", pa.int64()), ("correlation", pa.list_(pa.float32()))])
RECIPE_FIELDS = ("model", "epochs", "batch_size", "lr")


# subset models projected above this many A100-hours need datamodels.accept_cost = true
COST_CONFIRM_GPU_HOURS = 24.0


@dataclass
class DatamodelSettings(RetrainPoolSettings):
    """The [datamodels] section of a preset."""

    section: ClassVar[str] = "datamodels"

    models: int = setting(400, low=4, help="subset models the regression sees (reference: 300k on CIFAR-10)")
    alpha: float = setting(0.5, low=0.0, high=1.0, low_open=True, high_open=True,
                           help="fraction of the training set each model trains on (reference 0.5)")
    lds_models: int = setting(100, low=0, help="held-out subset models for LDS only (EXP/lds); 0: none")
    same_class: bool = setting(False, help="false: rank every training image (native); true: the target's class")
    top_k: int | None = setting(None, low=1, help="rows per target; unset: the rank stage's top_k")
    seed: int | None = setting(None, help="masks, torch seeds, held-out split; unset: the preset's seed")
    model: str | None = setting(None, help="retraining recipe; unset: the [support] section's (and its overrides)")
    epochs: int | None = setting(None, low=1, help="unset: the [support] recipe's")
    batch_size: int | None = setting(None, low=1, help="unset: the [support] recipe's")
    lr: float | None = setting(None, low=0.0, low_open=True, help="unset: the [support] recipe's")
    heldout_fraction: float = setting(0.2, low=0.0, high=1.0, low_open=True, high_open=True,
                                      help="models held out to choose each target's l1 strength")
    n_alphas: int = setting(30, low=2, help="l1 path: a geometric grid from alpha_max ...")
    eps: float = setting(1e-3, low=0.0, high=1.0, low_open=True, high_open=True, help="... down to eps * alpha_max")
    patience: int | None = setting(5, low=1, help="stop a path after this many strengths without held-out "
                                                  "improvement; unset: the whole path")
    budgets: tuple[int, ...] = setting(default_factory=tuple, low=4,
                                       help="smaller model counts: variants datamodels@n<count> fitted on the "
                                            "first <count> models; empty: only `models`")
    accept_cost: bool = setting(False, help="run even when the subset models' projected GPU cost exceeds "
                                            f"{COST_CONFIRM_GPU_HOURS:g} A100-hours (ImageNet: refused "
                                            "without it, with the projection)")
    zero_order: str = setting("entry", choices=("entry", "id"),
                              help="order of the images the lasso leaves at zero: entry strength along the "
                                   "l1 path (signed), or train id")

    def check(self) -> None:
        if 0 < self.lds_models < 3:
            self.fail("lds_models", f"must be 0 or at least 3 (LDS correlates over models), got {self.lds_models}")
        for key, count in [("models", self.models)] + [("budgets", b) for b in self.budgets]:
            n_held = int(round(self.heldout_fraction * count))
            if n_held < 2 or count - n_held < 2:
                self.fail(key, f"= {count} with heldout_fraction={self.heldout_fraction} leaves {n_held} held-out "
                               "models; need >= 2 held-out and >= 2 fitting models (raise it)")
        larger = [b for b in self.budgets if b > self.models]
        if larger:
            self.fail("budgets", f"{larger} exceed models = {self.models}: a budget is a prefix of the trained "
                                 "models (raise models, lower the budgets, or set datamodels.budgets=[])")
        if len(set(self.budgets)) != len(self.budgets):
            self.fail("budgets", f"lists a count twice: {list(self.budgets)}")

    def variants(self) -> list[tuple[str, int]]:
        """(method name, model count) of every variant, fewest models first; the last is
        plain ``"datamodels"`` at ``models`` (a budget equal to ``models`` is that one)."""
        smaller = sorted(int(b) for b in self.budgets if int(b) < self.models)
        return [(variant_name(METHOD, f"n{n}"), n) for n in smaller] + [(METHOD, int(self.models))]

    def recipe(self, support_recipe):
        """The [support] recipe (an :class:`attribution.retraining.Recipe`) with this
        section's recipe fields applied (unset: keep the [support] value)."""
        overrides = {k: getattr(self, k) for k in RECIPE_FIELDS if getattr(self, k) is not None}
        return dataclasses.replace(support_recipe, **overrides)

    def method_params(self) -> dict:
        """The ``"datamodels"`` method's constructor parameters from this section."""
        return {"n_alphas": self.n_alphas, "eps": self.eps, "heldout_fraction": self.heldout_fraction,
                "patience": self.patience, "seed": self.seed, "same_class": self.same_class,
                "zero_order": self.zero_order}


class RegressionWorker(QueueWorker):
    """Fits the ``"datamodels"`` method for one class of targets per item.

    Holds the regression models' masks (models, n_train) and the training ids / labels
    once; an item is ``{"variant", "n_models", "label", "target_ids", "target_labels",
    "margins"}`` (margins: the first n_models models x the class's targets); the fit uses
    the first ``n_models`` masks. Returns ``{"variant", "label", "block", "summary",
    "correlation"}``: the class's score block (named after the variant), the method's
    per-target ``summary_`` and residual correlations (the order of the zeros)."""

    def __init__(self, masks: np.ndarray, train_ids: np.ndarray, train_labels: np.ndarray, params: dict):
        self.masks, self.train_ids, self.train_labels = masks, train_ids, train_labels
        self.params = dict(params)

    def __call__(self, item: dict) -> dict:
        n = int(item["n_models"])
        if len(item["margins"]) != n or n > len(self.masks):
            raise ValueError(f"{item['variant']}: {len(item['margins'])} margin rows for n_models={n} of "
                             f"{len(self.masks)} masks (a bug)")
        method = create_method(METHOD, **self.params)
        method.fit(TrainingData(self.train_ids, self.train_labels, extra={
            "masks": self.masks[:n], "margins": item["margins"], "target_ids": item["target_ids"]}))
        block = dataclasses.replace(method.score(Targets(item["target_ids"], item["target_labels"])),
                                    method=item["variant"])
        return {"variant": item["variant"], "label": item["label"], "block": block, "summary": method.summary_,
                "correlation": method.correlation_}


@register_stage
class DatamodelsStage(Stage):
    """Datamodels baseline: subset models on a retrain pool, regressions on a regression pool."""

    name = "datamodels"
    settings_class = DatamodelSettings
    reads = ("rankings",)
    writes = ("datamodels", "lds", "scores", "rankings")
    help = "Datamodels baseline: subset models, l1 regressions, scores, rankings, LDS models"
    description = ("Train models on random alpha-subsets, fit one sparse linear regression per ranked target, "
                   "write the datamodels scores and rankings and the LDS models. Resumes when rerun.")

    # ------------------------------------------------------------------ checks
    def preflight(self, produced=()) -> None:
        super().preflight(produced)
        self.check_cost()

    def projected_gpu_hours(self) -> float | None:
        """A100-hours of the subset and LDS models when a published training time covers
        the recipe (ResNet-18 on ImageNet: FFCV's figures, attribution/published_costs.py);
        None for the CPU-sized recipes, whose cost the stage measures instead."""
        from attribution.published_costs import IMAGENET_TRAIN_IMAGES, datamodels_gpu_hours

        s, data = self.config, self.settings.data
        config = s.recipe(self.settings["support"].recipe()).train_config()
        if data.dataset != "imagenet" or config.model != "resnet18":
            return None
        n_train = data.train_per_class * 1000 if data.train_per_class else IMAGENET_TRAIN_IMAGES
        return datamodels_gpu_hours(int(s.models) + int(s.lds_models), float(s.alpha), int(config.epochs), n_train)

    def check_cost(self) -> None:
        """Refuse, before any work, subset models projected above COST_CONFIRM_GPU_HOURS
        unless datamodels.accept_cost is set: the error carries the projection."""
        from attribution.settings import SettingsError

        hours = self.projected_gpu_hours()
        if hours is None or hours <= COST_CONFIRM_GPU_HOURS or self.config.accept_cost:
            return
        s = self.config
        raise SettingsError(
            f"datamodels: {s.models} subset models + {s.lds_models} LDS models of ResNet-18 on "
            f"{s.alpha:g} of the ImageNet training set project to {hours:,.0f} A100-hours "
            f"({hours / 24:,.1f} A100-days; FFCV's published 35 min per 16-epoch training, linear in the "
            f"images seen; Datamodels used 300,000 models on CIFAR-10). Confirm with --set "
            "datamodels.accept_cost=true, or lower datamodels.models (the LDS models count too)")

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        import pyarrow.compute as pc

        from attribution.artifacts import read_dataset
        from attribution.baselines.datamodels import subset_mask
        from attribution.methods import available_methods
        from attribution.ranking import ranked_targets, ranking_file_name
        from attribution.retraining import recipe_fingerprint, target_arrays, training_arrays
        from attribution.scores import ScoreStore

        self.started = time.perf_counter()
        s = self.config
        recipe = s.recipe(self.settings["support"].recipe())
        config = recipe.train_config()  # a bad model name fails here, before any data is loaded
        top_k = int(s.top_k if s.top_k is not None else self.settings["rank"].top_k)
        target_ids = ranked_targets(self.exp, self.name)
        data = self.settings.data
        train_set = data.load("train")
        try:  # the rankings must describe this training subset (the LDS compares them on it)
            ranked = read_dataset(self.exp.rankings, columns=["train_id"],
                                  filters=pc.field("method").isin(available_methods("rank")))
            train_set.positions_of(np.unique(ranked.column("train_id").to_numpy()))
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: the rankings in {self.exp.rankings} were made on another training "
                             "subset than [data] describes (train_per_class, seed); rerun the rank stage or fix "
                             "[data]") from error
        test_set = data.load("test", subset=False)
        try:
            targets = target_arrays(test_set, target_ids)
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: the ranked targets are not in the {data.dataset} test split") from error
        train = training_arrays(train_set)
        order = np.argsort(train["ids"], kind="stable")  # masks are over training ids in ascending order
        train_ids, train_labels = train["ids"][order], train["labels"][order]
        target_labels = targets["labels"]
        n_train = len(train_ids)
        fingerprint = recipe_fingerprint(config, data.key(), s.seed, n_train)
        training_key = {"recipe": fingerprint, "model": config.model, "epochs": config.epochs, "data": data.key(),
                        "n_train": n_train, "alpha": float(s.alpha), "seed": int(s.seed),
                        "train_ids": ids_digest(train_ids), "targets": ids_digest(target_ids),
                        "n_targets": len(target_ids)}
        folder, lds_dir = self.exp.path("datamodels"), self.exp.path("lds")
        models_dir, regressions_dir = folder / "models", folder / "regressions"

        # refuse changed settings before any training: stored models first, then the regressions
        known = read_models(models_dir, training_key, fix=f"delete {models_dir} and {lds_dir} to retrain, or use "
                                                          "a new --exp")
        method = create_method(METHOD, **s.method_params())
        store = ScoreStore(self.exp.path("scores"))
        rankings = self.exp.path("rankings")
        classes = {int(c): np.flatnonzero(target_labels == c) for c in np.unique(target_labels)}
        variants = s.variants()
        # units are (variant, class); the most models first (the longest regressions start first)
        todo, rerank, reused, wanted = [], [], [], {}
        for name, n_models in reversed(variants):
            common = {**method.settings(), "training": fingerprint, "alpha": float(s.alpha), "models": n_models}
            folder_of = regression_folder(regressions_dir, name)
            fix = (f"delete {rankings}/{name}-*.parquet, {store.folder / name} and {folder_of} to recompute, or "
                   "use a new --exp")
            for label, cols in classes.items():
                scores_key = {**common, "targets": ids_digest(target_ids[cols])}
                wanted[name, label] = {"scores": scores_key, "ranking": {**scores_key, "top_k": top_k}}
                ranking_done = reuse(rankings / ranking_file_name(name, label), wanted[name, label]["ranking"], fix)
                # every output checked (a file with other settings is refused even when another is missing)
                regression_done = all([store.reuse(name, f"class{label:03d}", scores_key, train_ids, fix)]
                                      + [reuse(folder_of / f"{kind}-class{label:03d}.parquet", scores_key, fix)
                                         for kind in ("coef", "targets", "entry")])
                if ranking_done and regression_done:
                    reused.append((name, label))
                elif regression_done:
                    rerank.append((name, label))  # the scores are there: only the ranking is derived again
                else:
                    todo.append((name, label))

        # a variant of a budget no longer asked for keeps its files (and the support stage would
        # search its rankings): say so rather than delete outputs
        names = {name for name, _ in variants}
        stale = sorted({p.name.rsplit("-class", 1)[0] for p in rankings.glob(f"{METHOD}@*-class*.parquet")} - names)
        if stale:
            warnings.warn(f"datamodels: {stale} in {rankings} are not among datamodels.budgets {list(s.budgets)}; "
                          "their rankings stay (and are searched by the support stage): delete "
                          f"{rankings}/<variant>-*.parquet and {store.folder}/<variant> to drop them")

        if s.lds_models:  # metrics.load_lds_data takes the training set to be every id in the LDS masks
            seen = np.zeros(n_train, bool)
            for m in range(s.lds_models):
                seen |= subset_mask(n_train, s.alpha, s.seed, LDS_MODEL_OFFSET + m)
            if not seen.all():
                raise ValueError(
                    f"datamodels.lds_models={s.lds_models} subsets leave {int((~seen).sum())} of {n_train} training "
                    "images out of every LDS model, and the LDS metric takes the training set from those masks; "
                    f"raise lds_models (about log2({n_train}) / -log2(1 - alpha) + 5 covers every image) or set 0")
        fit_ids = np.arange(s.models, dtype=np.int64)
        lds_ids = LDS_MODEL_OFFSET + np.arange(s.lds_models, dtype=np.int64)
        needed = [int(m) for m in np.concatenate([fit_ids, lds_ids]) if int(m) not in known]
        return Plan(todo=todo, reused=reused, extra={
            "needed": needed, "rerank": rerank, "classes": classes, "wanted": wanted, "top_k": top_k,
            "variants": dict(variants), "method": method,
            "recipe": recipe, "config": config, "training_key": training_key, "train": train, "targets": targets,
            "train_ids": train_ids, "train_labels": train_labels, "fit_ids": fit_ids, "lds_ids": lds_ids,
            "store": store, "models_dir": models_dir, "regressions_dir": regressions_dir, "lds_dir": lds_dir})

    # ------------------------------------------------------------------ run
    def run(self, plan: Plan) -> dict:

        x = plan.extra
        result = {"trained": [], "retried": 0, "computed": [], "regressed": [], "train_wall": 0.0,
                  "regression_wall": 0.0}
        if x["needed"]:
            start = time.perf_counter()
            self.train_models(plan, result)
            result["train_wall"] = time.perf_counter() - start
        known = read_models(x["models_dir"], x["training_key"], fix="")
        fit_masks, fit_margins = self.stack(known, x["fit_ids"], plan)
        key = x["training_key"]
        write_long_tables(x["models_dir"].parent, x["fit_ids"], fit_masks, fit_margins, x["train_ids"],
                          x["targets"]["ids"], {**key, "model_ids": ids_digest(x["fit_ids"])})
        if len(x["lds_ids"]):
            lds_masks, lds_margins = self.stack(known, x["lds_ids"], plan)
            write_long_tables(x["lds_dir"], x["lds_ids"], lds_masks, lds_margins, x["train_ids"],
                              x["targets"]["ids"], {**key, "model_ids": ids_digest(x["lds_ids"])})
        if plan.todo:
            start = time.perf_counter()
            self.regress(plan, fit_masks, fit_margins, result)
            result["regression_wall"] = time.perf_counter() - start
        for name, label in x["rerank"]:
            block = self.ordered_block(x["store"].read(name, f"class{label:03d}"), label, x)
            result["computed"].append(self.write_ranking(block, name, label, x["wanted"][name, label], x["top_k"]))
        result["known"] = known
        return result

    def train_models(self, plan: Plan, result: dict) -> None:
        """The subset models ``plan.extra["needed"]`` on the retrain pool, logged as they finish."""
        from tqdm.auto import tqdm

        from attribution import retrain
        from attribution.baselines.datamodels import subset_mask
        from attribution.retraining import PartLog, RetrainWorker
        from attribution.workqueue import WorkFailed

        s, x = self.config, plan.extra
        runtime = self.require_runtime()
        needed, train_ids = x["needed"], x["train_ids"]
        request = s.pool_request(x["recipe"].model, max_items=len(needed))
        config = x["recipe"].train_config(runtime.device(request))
        masks = {}

        def item(model_id: int) -> dict:
            masks[model_id] = subset_mask(len(train_ids), s.alpha, s.seed, model_id)
            return {"kind": "subset", "model_id": model_id, "removed_ids": train_ids[~masks[model_id]],
                    "torch_seed": retrain.training_seed(s.seed, model_id)}

        log = PartLog(x["models_dir"], PART_SCHEMA, x["training_key"], s.flush_every, s.flush_seconds)
        queue = s.open_queue(runtime, request, config, x["train"], x["targets"],
                             key=lambda job: f"datamodel model {job['model_id']}")  # groups of models_per_worker
        waiting = list(needed)
        bar = tqdm(total=len(needed), desc=f"datamodel trainings ({queue.size} workers)", unit="model",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            with queue:
                while waiting or queue.pending:
                    # items are made as workers have room: memory holds a few removal lists, not all
                    while waiting and (queue.free() > 0 or not queue.pending):
                        queue.submit(item(waiting.pop(0)))
                    done = queue.next(timeout=s.flush_seconds)
                    if done is None:
                        log.flush()
                        continue
                    model_id = done.item["model_id"]
                    log.add({"model_id": model_id, "mask": np.packbits(masks.pop(model_id)).tobytes(),
                             "margins": done.result["margins"], "seconds": done.result["seconds"],
                             "torch_seed": done.item["torch_seed"], "attempt": done.attempt, "worker": done.worker,
                             "finished_at": time.time()})
                    result["trained"].append(model_id)
                    bar.update(1)
                result["retried"] = queue.retried
        except WorkFailed as error:
            raise WorkFailed(f"{error}. Finished models are saved: fix the cause and rerun the same command to "
                             "resume (or raise datamodels.max_retries)") from error
        finally:
            log.flush()  # keep what finished (Ctrl-C, a training that kept failing, ...)
            bar.close()

    def stack(self, known: dict, ids, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """(masks, margins) of the model ids ``ids``, from the part files."""
        from attribution.baselines.datamodels import subset_mask

        s, x = self.config, plan.extra
        n_train, n_targets = len(x["train_ids"]), len(x["targets"]["ids"])
        missing = [int(m) for m in ids if int(m) not in known]
        if missing:
            raise RuntimeError(f"models {missing[:5]} are missing from {x['models_dir']} after training (a bug)")
        for m in ids:  # a stored mask must be the one its seed draws (guards against edited files)
            if not np.array_equal(known[int(m)]["mask"], subset_mask(n_train, s.alpha, s.seed, int(m))):
                raise ValueError(f"model {int(m)}'s stored mask in {x['models_dir']} is not the one seed {s.seed} "
                                 f"draws; delete {x['models_dir']} to retrain")
        masks = np.stack([known[int(m)]["mask"] for m in ids]) if len(ids) else np.zeros((0, n_train), bool)
        margins = (np.stack([known[int(m)]["margins"] for m in ids]) if len(ids)
                   else np.zeros((0, n_targets), np.float32))
        return masks, margins

    def regress(self, plan: Plan, masks: np.ndarray, margins: np.ndarray, result: dict) -> None:
        """The regressions of the units ``plan.todo`` (variant, class), one item each on the
        regression pool; a variant of n models fits the first n."""
        from tqdm.auto import tqdm

        from attribution.workqueue import PoolRequest

        x = plan.extra
        target_ids, target_labels = x["targets"]["ids"], x["targets"]["labels"]
        items = []
        for name, label in plan.todo:
            cols, n = x["classes"][label], x["variants"][name]
            items.append({"variant": name, "n_models": n, "label": label, "target_ids": target_ids[cols],
                          "target_labels": target_labels[cols], "margins": margins[:n, cols]})
        queue = self.require_runtime().queue(PoolRequest("regression", max_items=len(items)), RegressionWorker,
                                             masks, x["train_ids"], x["train_labels"], self.config.method_params(),
                                             key=lambda item: f"{item['variant']} regressions of class {item['label']}")
        with queue, tqdm(total=len(items), desc="datamodel regressions", unit="class", disable=not self.progress,
                         file=sys.stderr, dynamic_ncols=True) as bar:
            for done in queue.map(items):
                name, label, block = done.result["variant"], done.result["label"], done.result["block"]
                self.write_regression(name, label, block, done.result["summary"], done.result["correlation"], x)
                result["regressed"].append((name, label, float(done.result["summary"]["seconds"])))
                result["computed"].append(self.write_ranking(block, name, label, x["wanted"][name, label],
                                                             x["top_k"]))
                bar.update(1)

    def ordered_block(self, block, label: int, x: dict):
        """A stored score block with its ranking key again (``exact``: the order of the
        zeros, from the stored residual correlations; the store keeps the values only)."""
        folder = regression_folder(x["regressions_dir"], block.method)
        import pandas as pd

        table = pd.read_parquet(folder / f"entry-class{label:03d}.parquet")
        by_target = dict(zip(table["target_id"].tolist(), table["correlation"]))
        missing = [int(t) for t in block.target_ids if int(t) not in by_target]
        if missing:
            raise ValueError(f"{folder}/entry-class{label:03d}.parquet lacks targets {missing[:5]}: delete it "
                             "to recompute")
        correlation = np.stack([np.asarray(by_target[int(t)], np.float32) for t in block.target_ids])
        exact = x["method"].order_key(block.values, correlation, block.candidates)
        return dataclasses.replace(block, exact=exact)

    def write_regression(self, name: str, label: int, block, summary: dict, correlation: np.ndarray,
                         x: dict) -> None:
        """coef-, targets- and entry-classNNN of one (variant, class), and its score block."""
        settings = x["wanted"][name, label]["scores"]
        folder = regression_folder(x["regressions_dir"], name)
        t_rows, i_cols = np.nonzero(block.values)
        write_table(pa.table({"target_id": block.target_ids[t_rows], "train_id": block.train_ids[i_cols],
                              "coef": block.values[t_rows, i_cols]}, schema=COEF_SCHEMA),
                    folder / f"coef-class{label:03d}.parquet", settings=settings)
        write_table(pa.table({"target_id": block.target_ids,
                              "correlation": [np.asarray(row, np.float32) for row in correlation]},
                             schema=ENTRY_SCHEMA), folder / f"entry-class{label:03d}.parquet", settings=settings)
        n = len(block.target_ids)
        per_target = pa.table({
            "target_id": block.target_ids, "label": block.target_labels, "intercept": summary["intercept"],
            "alpha": summary["alpha"], "alpha_index": summary["alpha_index"].astype(np.int32),
            "n_alphas_tried": summary["n_tried"].astype(np.int32), "n_nonzero": summary["n_nonzero"].astype(np.int32),
            "heldout_mse": summary["heldout_mse"], "heldout_mse_zero_model": summary["heldout_mse_zero"],
            "heldout_r2": summary["heldout_r2"], "fit_models": np.full(n, summary["fit_models"], np.int32),
            "heldout_models": np.full(n, summary["heldout_models"], np.int32),
            "seconds": np.full(n, summary["seconds"] / max(1, n), np.float32)}, schema=TARGET_SCHEMA)
        write_table(per_target, folder / f"targets-class{label:03d}.parquet", settings=settings)
        x["store"].write(block, f"class{label:03d}", settings)

    def write_ranking(self, block, name: str, label: int, wanted: dict, top_k: int) -> str:
        """The ranking file of one (variant, class), derived from its score block and its
        ranking key (written last: it marks the unit done)."""
        from attribution.ranking import ranking_file_name
        from attribution.scores import write_ranking

        path = self.exp.path("rankings") / ranking_file_name(name, label)
        return write_ranking(block, top_k, path, wanted["ranking"]).name

    # ------------------------------------------------------------------ finish
    def finish(self, plan: Plan, result: dict) -> dict:
        import pandas as pd

        s, x = self.config, plan.extra
        previous = self.exp.manifest().get(self.name) or {}
        known = result["known"]
        all_ids = np.concatenate([x["fit_ids"], x["lds_ids"]])
        training_seconds = float(sum(known[int(m)]["seconds"] for m in all_ids))
        # wall seconds per worker second of each pool, measured when this run used it (else
        # the computing run's record; else 1: serial): the models' and regressions' worker
        # seconds, times this, are their share of the pool's wall time
        trained_cpu = float(sum(known[int(m)]["seconds"] for m in result["trained"]))
        regressed_cpu = float(sum(seconds for _, _, seconds in result["regressed"]))
        train_factor = _wall_factor(result["train_wall"], trained_cpu, previous.get("training_wall_per_worker_second"))
        regression_factor = _wall_factor(result["regression_wall"], regressed_cpu,
                                         previous.get("regression_wall_per_worker_second"))
        variants, method_seconds, regularisation = {}, {}, {}
        for name, n_models in x["variants"].items():
            folder = regression_folder(x["regressions_dir"], name)
            table = pd.concat([pd.read_parquet(folder / f"targets-class{c:03d}.parquet") for c in x["classes"]],
                              ignore_index=True)
            model_seconds = float(sum(known[int(m)]["seconds"] for m in range(n_models)))
            regression_seconds = float(table["seconds"].sum())
            regularisation[name] = regularisation_summary(table)
            variants[name] = {
                "models": n_models, **regularisation[name],
                "training_seconds": round(model_seconds * train_factor, 1),
                "regression_seconds": round(regression_seconds * regression_factor, 1),
                "regression_worker_seconds": round(regression_seconds, 1)}
            method_seconds[name] = round(model_seconds * train_factor + regression_seconds * regression_factor, 1)
            untouched = not result["trained"] and name not in {unit for unit, _, _ in result["regressed"]}
            if untouched and name in (previous.get("method_seconds") or {}):
                # measured by the run that computed it (another run's pool speed would re-price it)
                method_seconds[name] = previous["method_seconds"][name]
                variants[name] = (previous.get("variants") or {}).get(name, variants[name])
        computed = sorted(result["computed"])
        reused = sorted(ranking_name(name, c) for name, c in plan.reused)
        did_work = bool(result["trained"] or computed)
        fields = {
            "settings": s.to_dict(), "recipe": x["config"].to_dict(), "models": s.models, "lds_models": s.lds_models,
            "budgets": [n for name, n in x["variants"].items() if name != METHOD],
            "alpha": s.alpha, "n_train": len(x["train_ids"]), "targets": len(x["targets"]["ids"]),
            "top_k": x["top_k"], "same_class": s.same_class, "zero_order": s.zero_order,
            "regularisation": regularisation[METHOD], "variants": variants, "method_seconds": method_seconds,
            "training_wall_per_worker_second": round(train_factor, 4),
            "regression_wall_per_worker_second": round(regression_factor, 4),
            "trained_this_run": len(result["trained"]), "retried": result["retried"], "computed_files": computed,
            "reused_files": reused, "training_seconds": round(training_seconds, 1),
            "regression_seconds": round(sum(v["regression_seconds"] for v in variants.values()), 1),
            "outputs": ["datamodels/models/", "datamodels/masks.parquet", "datamodels/margins.parquet",
                        "datamodels/regressions*/"] + [f"scores/{name}/" for name in x["variants"]]
            + [f"rankings/{name}-*.parquet" for name in x["variants"]]
            + (["lds/masks.parquet", "lds/margins.parquet"] if s.lds_models else []),
            "reused": not did_work,
        }
        wall = round(time.perf_counter() - self.started, 1)
        if did_work:
            fields["seconds"] = wall  # a run that only reused keeps the seconds of the run that computed
        else:  # ... and its per-method seconds (factors of 1 here would be a guess)
            for key in ("method_seconds", "variants", "regularisation", "training_wall_per_worker_second",
                        "regression_wall_per_worker_second", "regression_seconds"):
                if key in previous:
                    fields.pop(key)
        self.exp.record_stage(self.name, **fields)
        plain = variants[METHOD]
        return {"models": s.models, "lds_models": s.lds_models, "targets": len(x["targets"]["ids"]),
                "variants": list(x["variants"]), "trained_this_run": len(result["trained"]),
                "retried": result["retried"], "computed_files": len(computed), "reused_files": len(reused),
                "alpha_median": plain["alpha_median"], "nonzero_median": plain["nonzero_median"],
                "method_seconds": method_seconds, "wall_seconds": wall}


# ----------------------------------------------------------------------------- helpers


def regression_folder(regressions_dir, name: str):
    """EXP/datamodels/regressions for plain datamodels, regressions@<tag> for a variant."""
    from attribution.methods import split_variant

    _, tag = split_variant(name)
    return regressions_dir if tag is None else regressions_dir.with_name(f"{regressions_dir.name}@{tag}")


def ranking_name(name: str, label: int) -> str:
    from attribution.ranking import ranking_file_name

    return ranking_file_name(name, label)


def regularisation_summary(table) -> dict:
    """Chosen l1 strengths and non-zero coefficients over the targets of a targets- table."""
    return {
        "alpha_median": float(table["alpha"].median()),
        "alpha_min": float(table["alpha"].min()), "alpha_max": float(table["alpha"].max()),
        "strongest_chosen": int((table["alpha_index"] == 0).sum()),  # the all-zero model won
        "nonzero_median": float(table["n_nonzero"].median()),
        "nonzero_min": int(table["n_nonzero"].min()), "nonzero_max": int(table["n_nonzero"].max()),
        "heldout_r2_median": float(table["heldout_r2"].median()),
    }


def _wall_factor(wall: float, worker_seconds: float, recorded) -> float:
    if wall > 0 and worker_seconds > 0:
        return wall / worker_seconds
    return float(recorded) if recorded else 1.0


def read_models(folder, training_key: dict, fix: str) -> dict:
    """{model_id: {mask (bool), margins, seconds}} of the part files; parts made with other
    settings are refused (:class:`attribution.artifacts.SettingsChanged`)."""
    from attribution.retraining import read_parts

    table = read_parts(folder, training_key, fix)
    if table is None:
        return {}
    frame = table.to_pandas().drop_duplicates("model_id", keep="first")
    n_train = int(training_key["n_train"])
    return {int(r.model_id): {"mask": np.unpackbits(np.frombuffer(r.mask, np.uint8), count=n_train).astype(bool),
                              "margins": np.asarray(r.margins, np.float32), "seconds": float(r.seconds)}
            for r in frame.itertuples(index=False)}


def write_long_tables(folder, model_ids, masks, margins, train_ids, target_ids, key: dict) -> bool:
    """masks.parquet / margins.parquet of these models (the LDS reads them); rewritten only
    when their content key changed (they are derived from the part files)."""
    mask_path, margin_path = folder / "masks.parquet", folder / "margins.parquet"
    if all(reuse(p, key, fix="", force=True) for p in (mask_path, margin_path)):
        return False
    model_ids = np.asarray(model_ids, np.int64)
    rows, cols = np.nonzero(masks)
    write_table(pa.table({"model_id": model_ids[rows], "train_id": np.asarray(train_ids)[cols]}, schema=MASK_SCHEMA),
                mask_path, settings=key)
    n_models, n_targets = margins.shape
    write_table(pa.table({"model_id": np.repeat(model_ids, n_targets),
                          "target_id": np.tile(np.asarray(target_ids, np.int64), n_models),
                          "margin": margins.reshape(-1).astype(np.float32)}, schema=MARGIN_SCHEMA),
                margin_path, settings=key)
    return True
