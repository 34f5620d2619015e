"""The trak stage: TRAK scores of every training image for the rank stage's targets.

For every target the rank stage ranked (:func:`attribution.ranking.ranked_targets`),
the ``"trak"`` method (:mod:`attribution.methods.trak`, MadryLab's ``traker``) scores
every training image from ``checkpoints`` full-data models; the scores go to the score
store and rank the training images (all classes by default, TRAK's native view).

The checkpoints are the support stage's full-data ensemble models: the [support]
recipe and torch seeds ``retrain.training_seed(support.seed, i)`` for i = 0 ..
checkpoints-1, trained with one torch thread as the retraining workers do, so the
weights are the same. They are trained in this process (an MLP takes well under a
second) and TRAK runs in this process too, on its GPU when it has one: the stage is one
featurize pass per checkpoint, nothing to spread over workers at this size, so it needs
no runtime.

Outputs (all written atomically):
- ``EXP/trak/checkpoints/model-NNN.pt``: state dict, recipe fingerprint, torch seed;
  reused when the recipe and seed match.
- ``EXP/trak/features/``: traker's save directory, deleted and recreated by every
  computing run (traker 0.3.2 cannot be told to ignore a stale one).
- ``EXP/scores/trak/classNNN.parquet``: the score block of each class of targets (every
  training image; :class:`attribution.scores.ScoreStore`). Targets are scored
  ``target_chunk`` at a time, which bounds traker's finalize_scores memory.
- ``EXP/rankings/trak-classNNN.parquet``: derived from the block
  (:func:`attribution.scores.rank_block`), written last: it marks the class done.

Resume: a class whose ranking exists with the same settings is skipped (when all are,
the stage does nothing); a class whose score block exists with the same settings only
has its ranking derived again. Files with other settings are refused with the
differing keys named, unless the stage runs with ``force=True`` (``attribution trak
--force``): the files it replaces are moved aside and restored if the run fails.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attribution.artifacts import aside, ids_digest, reuse
from attribution.settings import Section, setting
from attribution.stages import Flag, Plan, Stage, register_stage

METHOD = "trak"


@dataclass
class TrakSettings(Section):
    """The [trak] section of a preset."""

    section: ClassVar[str] = "trak"

    checkpoints: int = setting(5, low=1, help="full-data models featurized (TRAK's M; the paper: 100 on CIFAR-10)")
    proj_dim: int = setting(256, low=1, help="random projection of the per-example gradients (paper: 20480)")
    same_class: bool = setting(False, help="false: rank every training image (native); true: the target's class")
    top_k: int | None = setting(None, low=1, help="rows per target; unset: the rank stage's top_k")
    lambda_reg: float = setting(0.0, low=0, help="ridge term on X^T X (traker's lambda_reg)")
    seed: int | None = setting(None, help="projector seed; unset: the preset's seed")
    batch_size: int = setting(256, low=1, help="images per featurize / score call")
    target_chunk: int = setting(1024, low=1, help="targets per finalize_scores: memory n_train x target_chunk floats")
    max_projector_mb: int = setting(1024, low=1, help="CPU projection-matrix block (whole matrix when it fits)")
    device: str = setting("auto", help='"auto": CUDA when available, else CPU; "cpu" or "cuda[:i]"')

    def check(self) -> None:
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            self.fail("device", f'must be "auto", "cpu" or "cuda[:i]", got {self.device!r}')

    def method_params(self) -> dict:
        """The ``"trak"`` method's constructor parameters from this section."""
        return {"proj_dim": self.proj_dim, "lambda_reg": self.lambda_reg, "seed": self.seed,
                "batch_size": self.batch_size, "max_projector_mb": self.max_projector_mb, "device": self.device,
                "same_class": self.same_class}


@register_stage
class TrakStage(Stage):
    """TRAK baseline: checkpoints, traker features, score blocks, rankings (in-process)."""

    name = "trak"
    settings_class = TrakSettings
    reads = ("rankings",)
    writes = ("trak", "scores", "rankings")
    flags = (Flag("--force", "recompute trak scores and rankings stored with other settings instead of refusing",
                  option="force"),)
    help = "TRAK baseline (traker): checkpoints, features, scores, rankings"
    description = ("Train the [support] recipe's full-data models, compute TRAK scores with traker for every "
                   "target the rank stage ranked and derive the trak rankings. A rerun with the same settings "
                   "does nothing; changed settings are refused unless --force.")

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        from attribution.methods import create_method
        from attribution.ranking import ranked_targets, ranking_file_name
        from attribution.retraining import recipe_fingerprint, target_arrays, training_arrays
        from attribution.scores import ScoreStore

        self.started = time.perf_counter()
        s, force = self.config, bool(self.options.get("force", False))
        support = self.settings["support"]
        recipe = support.recipe()
        config = recipe.train_config()  # a bad model name fails here, before any data is loaded
        top_k = int(s.top_k if s.top_k is not None else self.settings["rank"].top_k)
        target_ids = ranked_targets(self.exp, self.name)
        data = self.settings.data
        train_set = data.load("train")
        if not train_set.in_memory:
            raise ValueError(f"the trak stage holds the training set in memory; {data.dataset} is read from files "
                             "(too large): not supported yet")
        test_set = data.load("test", subset=False)
        try:
            targets = target_arrays(test_set, target_ids)
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: the targets in {self.exp.rankings} are not test images of "
                             f"{data.dataset}; rerun the rank stage or fix [data]") from error
        train = training_arrays(train_set)
        fingerprint = recipe_fingerprint(config, data.key(), support.seed, len(train["ids"]))
        method = create_method(METHOD, **s.method_params(), save_dir=self.exp.path("trak") / "features",
                               progress=self.progress)
        common = {**method.settings(), "checkpoints": s.checkpoints, "recipe": fingerprint}

        store = ScoreStore(self.exp.path("scores"))
        rankings = self.exp.path("rankings")
        fix = (f"rerun with --force ('attribution trak --force') to recompute the trak scores and rankings, delete "
               f"{rankings}/trak-*.parquet and {store.folder / METHOD}, or use a new --exp")
        labels = np.asarray(targets["labels"], np.int64)
        classes = [int(c) for c in np.unique(labels)]
        todo, rerank, reused, wanted = [], [], [], {}
        for c in classes:
            scores_key = {**common, "targets": ids_digest(target_ids[labels == c])}
            wanted[c] = {"scores": scores_key, "ranking": {**scores_key, "top_k": top_k}}
            if reuse(rankings / ranking_file_name(METHOD, c), wanted[c]["ranking"], fix, force):
                reused.append(c)
            elif store.reuse(METHOD, block_name(c), scores_key, train["ids"], fix, force):
                rerank.append(c)  # the scores are there: only the ranking is derived again
            else:
                todo.append(c)
        stale = [p for p in rankings.glob(f"{METHOD}-class*.parquet") if class_of(p.stem) not in classes]
        stale += [p for p in (store.folder / METHOD).glob("class*.parquet") if class_of(p.stem) not in classes]
        if stale and not force:
            raise ValueError(f"{sorted(p.name for p in stale)} hold classes no target of the rank stage has now (the "
                             "rank stage's targets changed); rerun with --force ('attribution trak --force') or use "
                             "a new --exp")
        return Plan(todo=todo, reused=reused, extra={
            "rerank": rerank, "stale": stale, "wanted": wanted, "top_k": top_k, "method": method, "train": train,
            "targets": targets, "config": config, "recipe": fingerprint, "support_seed": int(support.seed),
            "store": store})

    # ------------------------------------------------------------------ run
    def run(self, plan: Plan) -> dict:
        # --force replaces files made with other settings: they are moved aside and come
        # back if the new scores or rankings fail (nothing finished is lost to a failed rerun)
        with aside(self.replaced(plan)):
            return self.compute_all(plan)

    def replaced(self, plan: Plan) -> list:
        """The existing files this run deletes or rewrites (only ``--force`` gets here with any)."""
        from attribution.ranking import ranking_file_name

        x, rankings = plan.extra, self.exp.path("rankings")
        paths = list(x["stale"]) + [rankings / ranking_file_name(METHOD, c) for c in x["rerank"] + plan.todo]
        paths += [x["store"].block_path(METHOD, block_name(c)) for c in plan.todo]
        return [p for p in paths if p.exists()]

    def compute_all(self, plan: Plan) -> dict:
        x = plan.extra
        for path in x["stale"]:
            path.unlink(missing_ok=True)
        result = {"computed": [], "trained_checkpoints": 0, "train_seconds": 0.0}
        for c in x["rerank"]:
            block = x["store"].read(METHOD, block_name(c))
            result["computed"].append(self.write_ranking(block, c, x["wanted"][c], x["top_k"]))
        if plan.todo:
            self.compute(plan, result)
        return result

    def compute(self, plan: Plan, result: dict) -> None:
        """Checkpoints, TRAK features, and the score blocks and rankings of ``plan.todo``."""
        from tqdm.auto import tqdm

        from attribution import retrain
        from attribution.baselines.trak import train_checkpoints
        from attribution.methods import Targets, TrainingData
        from attribution.scores import concat_blocks

        x = plan.extra
        s, train, targets, config, method = self.config, x["train"], x["targets"], x["config"], x["method"]
        # 1) checkpoints: the support stage's full-data ensemble models
        start = time.perf_counter()
        trainer = retrain.Retrainer(config, train["images"], train["labels"], train["ids"], train["mean"],
                                    train["std"], train["num_classes"])
        states, result["trained_checkpoints"] = train_checkpoints(
            trainer, self.exp.path("trak") / "checkpoints", s.checkpoints, x["support_seed"], x["recipe"],
            threads=1, progress=self.progress)
        result["train_seconds"] = time.perf_counter() - start

        # 2) TRAK features (a fresh traker save dir), then scores target_chunk targets at a time
        image_shape = tuple(np.asarray(train["images"]).shape[1:])
        num_classes = int(train["num_classes"])
        method.fit(TrainingData(train["ids"], train["labels"], images=trainer.x, extra={
            "model_fn": lambda: retrain.build_model(config.model, num_classes, image_shape, config.width), "checkpoints": states}))
        target_ids, labels = np.asarray(targets["ids"], np.int64), np.asarray(targets["labels"], np.int64)
        rows_todo = np.flatnonzero(np.isin(labels, plan.todo))
        remaining = {c: int((labels == c).sum()) for c in plan.todo}
        parts: dict = {c: [] for c in plan.todo}
        chunks = range(0, len(rows_todo), s.target_chunk)
        for begin in tqdm(chunks, desc="trak score chunks", unit="chunk", disable=not self.progress,
                          file=sys.stderr, dynamic_ncols=True):
            rows = rows_todo[begin:begin + s.target_chunk]
            images = retrain.to_tensor(np.asarray(targets["images"])[rows], train["mean"], train["std"])
            block = method.score(Targets(target_ids[rows], labels[rows], images=images))
            for c in np.unique(labels[rows]):
                c = int(c)
                parts[c].append(block.take(np.flatnonzero(block.target_labels == c)))
                remaining[c] -= int((block.target_labels == c).sum())
                if remaining[c] == 0:  # every target of the class is scored: its block, then its ranking
                    class_block = concat_blocks(parts.pop(c))
                    x["store"].write(class_block, block_name(c), x["wanted"][c]["scores"])
                    result["computed"].append(self.write_ranking(class_block, c, x["wanted"][c], x["top_k"]))
        result.update(projector=method.projector_, device=method.device_,
                      featurize_seconds=method.featurize_seconds_, score_seconds=method.score_seconds_)

    def write_ranking(self, block, label: int, wanted: dict, top_k: int) -> str:
        """The ranking file of one class, derived from its score block (written last: it marks the class done)."""
        from attribution.ranking import ranking_file_name
        from attribution.scores import write_ranking

        path = self.exp.path("rankings") / ranking_file_name(METHOD, label)
        return write_ranking(block, top_k, path, wanted["ranking"]).name

    # ------------------------------------------------------------------ finish
    def finish(self, plan: Plan, result: dict) -> dict:
        s, x = self.config, plan.extra
        method = x["method"]
        projector = result.get("projector", method.settings()["projector"])
        computed, reused = sorted(result["computed"]), [f"{METHOD}-class{c:03d}.parquet" for c in plan.reused]
        seconds = round(time.perf_counter() - self.started, 1)
        summary = {"targets": len(x["targets"]["ids"]), "computed_files": len(computed), "reused_files": len(reused),
                   "projector": projector, "proj_dim": s.proj_dim, "checkpoints": s.checkpoints}
        if not computed:
            # a run that only reused keeps the seconds of the run that computed
            self.exp.record_stage(self.name, reused=True, computed_files=[], reused_files=reused,
                                  last_run_seconds=seconds)
            return summary
        fields = {"settings": s.to_dict(), "recipe": x["recipe"], "projector": projector, "proj_dim": s.proj_dim,
                  "checkpoints": s.checkpoints, "n_train": len(x["train"]["ids"]),
                  "n_targets": len(x["targets"]["ids"]), "top_k": x["top_k"], "same_class": s.same_class,
                  "seconds": seconds, "reused": False, "computed_files": computed, "reused_files": reused,
                  "outputs": ["trak/checkpoints/", "trak/features/", "scores/trak/", "rankings/trak-*.parquet"]}
        if plan.todo:
            fields.update(device=result["device"], trained_checkpoints=result["trained_checkpoints"],
                          train_seconds=round(result["train_seconds"], 1),
                          featurize_seconds=round(result["featurize_seconds"], 1),
                          score_seconds=round(result["score_seconds"], 1))
            summary["trained_checkpoints"] = result["trained_checkpoints"]
        self.exp.record_stage(self.name, **fields)
        summary["seconds"] = seconds
        return summary


# ----------------------------------------------------------------------------- helpers


def block_name(label: int) -> str:
    """The score block of one class of targets: ``EXP/scores/trak/classNNN.parquet``."""
    return f"class{int(label):03d}"


def class_of(stem: str) -> int:
    """The class of a per-class file name (``trak-class003`` or ``class003``)."""
    return int(stem.rsplit("class", 1)[1])
