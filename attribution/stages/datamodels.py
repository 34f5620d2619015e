"""The datamodels stage: subset trainings, one regression per target, scores, rankings, LDS data.

For every target the rank stage ranked (:func:`attribution.ranking.ranked_targets`),
Datamodels (Ilyas et al. 2022; :mod:`attribution.baselines.datamodels`) trains
``models`` models on seeded random alpha-subsets of the training set, records each
model's margin on every target, and fits one l1 linear regression per target (the
``"datamodels"`` method, :mod:`attribution.methods.datamodels`); the coefficients are
the scores and rank the training images. ``lds_models`` more subset models, never seen
by the regression, are the held-out models of the LDS metric (EXP/lds/).

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
  non-zero coefficients) and ``targets-classNNN.parquet`` (per target: intercept,
  chosen regularisation, held-out errors, ...).
- ``EXP/scores/datamodels/classNNN.parquet``: the coefficients as a score block.
- ``EXP/rankings/datamodels-classNNN.parquet``: derived from the block, written last.

Resume: a model's subset and torch seed depend only on (seed, model id), so a rerun
trains only the model ids missing from the part files, and a class whose ranking and
regression outputs exist with the same settings is skipped. Changed settings are
refused with the differing keys named.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from attribution.artifacts import ids_digest, reuse, write_table
from attribution.methods import Targets, TrainingData, create_method
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
RECIPE_FIELDS = ("model", "epochs", "batch_size", "lr")


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

    def check(self) -> None:
        if 0 < self.lds_models < 3:
            self.fail("lds_models", f"must be 0 or at least 3 (LDS correlates over models), got {self.lds_models}")
        n_held = int(round(self.heldout_fraction * self.models))
        if n_held < 2 or self.models - n_held < 2:
            self.fail("models", f"= {self.models} with heldout_fraction={self.heldout_fraction} leaves {n_held} "
                                "held-out models; need >= 2 held-out and >= 2 fitting models (raise models)")

    def recipe(self, support_recipe):
        """The [support] recipe (an :class:`attribution.retraining.Recipe`) with this
        section's recipe fields applied (unset: keep the [support] value)."""
        overrides = {k: getattr(self, k) for k in RECIPE_FIELDS if getattr(self, k) is not None}
        return dataclasses.replace(support_recipe, **overrides)

    def method_params(self) -> dict:
        """The ``"datamodels"`` method's constructor parameters from this section."""
        return {"n_alphas": self.n_alphas, "eps": self.eps, "heldout_fraction": self.heldout_fraction,
                "patience": self.patience, "seed": self.seed, "same_class": self.same_class}


class RegressionWorker(QueueWorker):
    """Fits the ``"datamodels"`` method for one class of targets per item.

    Holds the regression models' masks (models, n_train) and the training ids / labels
    once; an item is ``{"label", "target_ids", "target_labels", "margins"}`` (margins:
    models x the class's targets). Returns ``{"label", "block", "summary"}``: the
    class's score block and the method's per-target ``summary_``."""

    def __init__(self, masks: np.ndarray, train_ids: np.ndarray, train_labels: np.ndarray, params: dict):
        self.masks, self.train_ids, self.train_labels = masks, train_ids, train_labels
        self.params = dict(params)

    def __call__(self, item: dict) -> dict:
        method = create_method(METHOD, **self.params)
        method.fit(TrainingData(self.train_ids, self.train_labels, extra={
            "masks": self.masks, "margins": item["margins"], "target_ids": item["target_ids"]}))
        block = method.score(Targets(item["target_ids"], item["target_labels"]))
        return {"label": item["label"], "block": block, "summary": method.summary_}


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
        common = {**method.settings(), "training": fingerprint, "alpha": float(s.alpha), "models": s.models}
        store = ScoreStore(self.exp.path("scores"))
        rankings = self.exp.path("rankings")
        fix = (f"delete {rankings}/datamodels-*.parquet, {store.folder / METHOD} and {regressions_dir} to "
               "recompute, or use a new --exp")
        classes = {int(c): np.flatnonzero(target_labels == c) for c in np.unique(target_labels)}
        todo, rerank, reused, wanted = [], [], [], {}
        for label, cols in classes.items():
            scores_key = {**common, "targets": ids_digest(target_ids[cols])}
            wanted[label] = {"scores": scores_key, "ranking": {**scores_key, "top_k": top_k}}
            ranking_done = reuse(rankings / ranking_file_name(METHOD, label), wanted[label]["ranking"], fix)
            # every output checked (a file with other settings is refused even when another is missing)
            regression_done = all([store.reuse(METHOD, f"class{label:03d}", scores_key, train_ids, fix),
                                   reuse(regressions_dir / f"coef-class{label:03d}.parquet", scores_key, fix),
                                   reuse(regressions_dir / f"targets-class{label:03d}.parquet", scores_key, fix)])
            if ranking_done and regression_done:
                reused.append(label)
            elif regression_done:
                rerank.append(label)  # the scores are there: only the ranking is derived again
            else:
                todo.append(label)

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
            "recipe": recipe, "config": config, "training_key": training_key, "train": train, "targets": targets,
            "train_ids": train_ids, "train_labels": train_labels, "fit_ids": fit_ids, "lds_ids": lds_ids,
            "store": store, "models_dir": models_dir, "regressions_dir": regressions_dir, "lds_dir": lds_dir})

    # ------------------------------------------------------------------ run
    def run(self, plan: Plan) -> dict:

        x = plan.extra
        result = {"trained": [], "retried": 0, "computed": []}
        if x["needed"]:
            self.train_models(plan, result)
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
            self.regress(plan, fit_masks, fit_margins, result)
        for label in x["rerank"]:
            block = x["store"].read(METHOD, f"class{label:03d}")
            result["computed"].append(self.write_ranking(block, label, x["wanted"][label], x["top_k"]))
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
        """The regressions of the classes ``plan.todo``, one item per class on the regression pool."""
        from tqdm.auto import tqdm

        from attribution.workqueue import PoolRequest

        x = plan.extra
        target_ids, target_labels = x["targets"]["ids"], x["targets"]["labels"]
        items = [{"label": label, "target_ids": target_ids[x["classes"][label]],
                  "target_labels": target_labels[x["classes"][label]], "margins": margins[:, x["classes"][label]]}
                 for label in plan.todo]
        queue = self.require_runtime().queue(PoolRequest("regression", max_items=len(items)), RegressionWorker,
                                             masks, x["train_ids"], x["train_labels"], self.config.method_params(),
                                             key=lambda item: f"datamodel regressions of class {item['label']}")
        with queue, tqdm(total=len(items), desc="datamodel regressions", unit="class", disable=not self.progress,
                         file=sys.stderr, dynamic_ncols=True) as bar:
            for done in queue.map(items):
                label = done.result["label"]
                self.write_regression(label, done.result["block"], done.result["summary"], x)
                result["computed"].append(self.write_ranking(done.result["block"], label, x["wanted"][label], x["top_k"]))
                bar.update(1)

    def write_regression(self, label: int, block, summary: dict, x: dict) -> None:
        """coef-classNNN, targets-classNNN and the score block of one class."""
        settings = x["wanted"][label]["scores"]
        t_rows, i_cols = np.nonzero(block.values)
        write_table(pa.table({"target_id": block.target_ids[t_rows], "train_id": block.train_ids[i_cols],
                              "coef": block.values[t_rows, i_cols]}, schema=COEF_SCHEMA),
                    x["regressions_dir"] / f"coef-class{label:03d}.parquet", settings=settings)
        n = len(block.target_ids)
        per_target = pa.table({
            "target_id": block.target_ids, "label": block.target_labels, "intercept": summary["intercept"],
            "alpha": summary["alpha"], "alpha_index": summary["alpha_index"].astype(np.int32),
            "n_alphas_tried": summary["n_tried"].astype(np.int32), "n_nonzero": summary["n_nonzero"].astype(np.int32),
            "heldout_mse": summary["heldout_mse"], "heldout_mse_zero_model": summary["heldout_mse_zero"],
            "heldout_r2": summary["heldout_r2"], "fit_models": np.full(n, summary["fit_models"], np.int32),
            "heldout_models": np.full(n, summary["heldout_models"], np.int32),
            "seconds": np.full(n, summary["seconds"] / max(1, n), np.float32)}, schema=TARGET_SCHEMA)
        write_table(per_target, x["regressions_dir"] / f"targets-class{label:03d}.parquet", settings=settings)
        x["store"].write(block, f"class{label:03d}", settings)

    def write_ranking(self, block, label: int, wanted: dict, top_k: int) -> str:
        """The ranking file of one class, derived from its score block (written last: it marks the class done)."""
        from attribution.ranking import ranking_file_name
        from attribution.scores import write_ranking

        path = self.exp.path("rankings") / ranking_file_name(METHOD, label)
        return write_ranking(block, top_k, path, wanted["ranking"]).name

    # ------------------------------------------------------------------ finish
    def finish(self, plan: Plan, result: dict) -> dict:
        import pandas as pd

        s, x = self.config, plan.extra
        summary_table = pd.concat([pd.read_parquet(x["regressions_dir"] / f"targets-class{c:03d}.parquet")
                                   for c in x["classes"]], ignore_index=True)
        known = result["known"]
        all_ids = np.concatenate([x["fit_ids"], x["lds_ids"]])
        training_seconds = float(sum(known[int(m)]["seconds"] for m in all_ids))
        regularisation = {
            "alpha_median": float(summary_table["alpha"].median()),
            "alpha_min": float(summary_table["alpha"].min()), "alpha_max": float(summary_table["alpha"].max()),
            "strongest_chosen": int((summary_table["alpha_index"] == 0).sum()),  # the all-zero model won
            "nonzero_median": float(summary_table["n_nonzero"].median()),
            "heldout_r2_median": float(summary_table["heldout_r2"].median()),
        }
        computed = sorted(result["computed"])
        reused = sorted(f"{METHOD}-class{c:03d}.parquet" for c in plan.reused)
        did_work = bool(result["trained"] or computed)
        fields = {
            "settings": s.to_dict(), "recipe": x["config"].to_dict(), "models": s.models, "lds_models": s.lds_models,
            "alpha": s.alpha, "n_train": len(x["train_ids"]), "targets": len(x["targets"]["ids"]),
            "top_k": x["top_k"], "same_class": s.same_class, "regularisation": regularisation,
            "trained_this_run": len(result["trained"]), "retried": result["retried"], "computed_files": computed,
            "reused_files": reused, "training_seconds": round(training_seconds, 1),
            "regression_seconds": round(float(summary_table["seconds"].sum()), 1),
            "outputs": ["datamodels/models/", "datamodels/masks.parquet", "datamodels/margins.parquet",
                        "datamodels/regressions/", "scores/datamodels/", "rankings/datamodels-*.parquet"]
            + (["lds/masks.parquet", "lds/margins.parquet"] if s.lds_models else []),
            "reused": not did_work,
        }
        wall = round(time.perf_counter() - self.started, 1)
        if did_work:
            fields["seconds"] = wall  # a run that only reused keeps the seconds of the run that computed
        self.exp.record_stage(self.name, **fields)
        return {"models": s.models, "lds_models": s.lds_models, "targets": len(x["targets"]["ids"]),
                "trained_this_run": len(result["trained"]), "retried": result["retried"],
                "computed_files": len(computed), "reused_files": len(reused),
                "alpha_median": regularisation["alpha_median"], "nonzero_median": regularisation["nonzero_median"],
                "wall_seconds": wall}


# ----------------------------------------------------------------------------- helpers


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
