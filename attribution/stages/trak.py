"""The trak stage: TRAK scores of every training image for the rank stage's targets.

For every target the rank stage ranked (:func:`attribution.ranking.ranked_targets`),
the ``"trak"`` method (:mod:`attribution.methods.trak`, MadryLab's ``traker``) scores
every training image from ``checkpoints`` full-data models; the scores go to the score
store and rank the training images (all classes by default, TRAK's native view).

Variants (:func:`attribution.methods.variant_name`), each with its own score blocks,
rankings and cost (``method_seconds`` in the manifest section):

- ``budgets`` (checkpoint counts M, e.g. [1, 5, 20]): ``"trak@m<M>"`` from the first M
  checkpoints (the budget equal to ``checkpoints`` is plain ``"trak"``). One
  featurization of the largest M serves every budget (each checkpoint's features are
  finalized on their own, so the first M of them are exactly what featurizing M gives);
  a budget's ``method_seconds`` is what it would take from scratch: the stage's fixed
  work + training, featurizing and scoring ITS M checkpoints (per-checkpoint timings).
- ``variants = ["same-class"]``: ``"trak@same-class"``, native trak's scores restricted
  to the target's class (:func:`attribution.methods.trak.same_class_view`: candidates
  = the class, outside entries by the "min" policy, ranking of the same-class images),
  so the report can show what the restriction does. Derived from trak's blocks, it
  costs what trak does.

The checkpoints are the support stage's full-data ensemble models: the [support]
recipe and torch seeds ``retrain.training_seed(support.seed, i)`` for i = 0 ..
M-1, trained with one torch thread as the retraining workers do, so the
weights are the same. They are trained in this process (an MLP takes well under a
second) and TRAK runs in this process too, on its GPU when it has one: the stage is one
featurize pass per checkpoint, nothing to spread over workers at this size, so it needs
no runtime.

Outputs (all written atomically):
- ``EXP/trak/checkpoints/model-NNN.pt``: state dict, recipe fingerprint, torch seed and
  training seconds; reused when the recipe and seed match.
- ``EXP/trak/features/``: traker's save directory with its settings
  (``attribution-features.json``: projector, proj_dim, seed, the checkpoints' recipe,
  the training ids); a run with other settings deletes and recreates it (traker 0.3.2
  cannot be told to ignore stale features), a run with the same ones keeps every
  checkpoint finished there (``model-NNN.json``) and resumes an interrupted one batch
  by batch (:meth:`attribution.baselines.trak.TrakScorer.open_features`).
- ``EXP/scores/<variant>/classNNN.parquet``: the score block of each class of targets
  (every training image; :class:`attribution.scores.ScoreStore`). Targets are scored
  ``target_chunk`` at a time, which bounds traker's finalize_scores memory.
- ``EXP/rankings/<variant>-classNNN.parquet``: derived from the block
  (:func:`attribution.scores.rank_block`), written last: it marks the unit done.

Resume, per (variant, class): a unit whose ranking exists with the same settings is
skipped (when all are, the stage does nothing); a unit whose score block exists with
the same settings only has its ranking derived again (same-class: derived again from
trak's stored block). Files with other settings, or of trak variants the settings no
longer ask for, are refused with the differing keys named, unless the stage runs with
``force=True`` (``attribution trak --force``): the files it replaces are moved aside
and restored if the run fails.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attribution.artifacts import aside, ids_digest, reuse
from attribution.scores import ClassUnit
from attribution.settings import Section, setting
from attribution.stages import Flag, Plan, Stage, register_stage
from attribution.workqueue import QueueWorker

METHOD = "trak"
SAME_CLASS = "same-class"
VARIANTS = (SAME_CLASS,)


@dataclass
class TrakSettings(Section):
    """The [trak] section of a preset."""

    section: ClassVar[str] = "trak"

    checkpoints: int = setting(5, low=1, help="full-data models featurized (TRAK's M; the paper: 100 on CIFAR-10)")
    budgets: tuple[int, ...] = setting(default_factory=tuple, low=1,
                                       help='checkpoint counts, each a variant "trak@m<M>" (the one equal to '
                                            'checkpoints is "trak"); empty: only checkpoints')
    variants: tuple[str, ...] = setting(default_factory=tuple, choices=VARIANTS,
                                        help='"same-class": also "trak@same-class", trak restricted to the '
                                             "target's class")
    proj_dim: int = setting(256, low=1, help="random projection of the per-example gradients (paper: 20480)")
    same_class: bool = setting(False, help="false: rank every training image (native); true: the target's class")
    top_k: int | None = setting(None, low=1, help="rows per target; unset: the rank stage's top_k")
    lambda_reg: float = setting(0.0, low=0, help="ridge term on X^T X (traker's lambda_reg)")
    seed: int | None = setting(None, help="projector seed; unset: the preset's seed")
    batch_size: int = setting(256, low=1, help="images per featurize / score call")
    target_chunk: int = setting(1024, low=1, help="targets per finalize_scores: memory n_train x target_chunk floats")
    max_projector_mb: int = setting(1024, low=1, help="CPU projection-matrix block (whole matrix when it fits)")
    device: str = setting("auto", help='"auto": CUDA when available, else CPU; "cpu" or "cuda[:i]"')
    actors: int = setting(1, low=0, help="workers that train the checkpoints and featurize shards of them: 1 = "
                                         "none, all in this stage's process (small models); 0 = one per GPU (or "
                                         "CPU) the cluster can place; n = n")
    shard_size: int = setting(10000, low=1, help="training images per featurizing item on the workers (the unit "
                                                 "of resume; a result holds shard_size x proj_dim floats)")
    threads_per_actor: int = setting(1, low=1, help="CPUs per worker: torch threads, and threads decoding files")

    def check(self) -> None:
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            self.fail("device", f'must be "auto", "cpu" or "cuda[:i]", got {self.device!r}')
        self.budgets = tuple(sorted(set(int(m) for m in self.budgets)))
        self.variants = tuple(dict.fromkeys(self.variants))
        if SAME_CLASS in self.variants and self.same_class:
            self.fail("variants", '"same-class" derives the class-restricted view from native (all-class) trak, '
                                  "but trak.same_class = true already restricts it; set same_class = false or "
                                  'drop "same-class" from trak.variants')

    def pool_request(self, max_items: int | None = None):
        """The workers' pool (``actors`` != 1): a whole GPU each on a GPU cluster unless
        ``device = "cpu"``."""
        from attribution.workqueue import PoolRequest

        return PoolRequest("trak", actors=self.actors or None, max_items=max_items, threads=self.threads_per_actor,
                           gpus_per_actor=0.0 if self.device == "cpu" else None)

    def method_params(self) -> dict:
        """The ``"trak"`` method's constructor parameters from this section."""
        return {"proj_dim": self.proj_dim, "lambda_reg": self.lambda_reg, "seed": self.seed,
                "batch_size": self.batch_size, "max_projector_mb": self.max_projector_mb, "device": self.device,
                "same_class": self.same_class}

    def budget_variants(self) -> dict[str, int]:
        """{method or variant name: checkpoint count} of the scored variants, by count:
        "trak" at ``checkpoints`` and "trak@m<M>" for every other budget."""
        from attribution.methods import variant_name

        counts = sorted(set(self.budgets) | {self.checkpoints})
        return {(METHOD if m == self.checkpoints else variant_name(METHOD, f"m{m}")): m for m in counts}

    def derived_variants(self) -> list[str]:
        """The variants derived from trak's scores (no scoring of their own)."""
        from attribution.methods import variant_name

        return [variant_name(METHOD, tag) for tag in self.variants]

    def all_variants(self) -> list[str]:
        return list(self.budget_variants()) + self.derived_variants()


@dataclass
class Unit(ClassUnit):
    """One (method or variant, class of targets) of the trak stage."""

    checkpoints: int | None = None  # None: derived (same-class) from trak's block


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
                   "target the rank stage ranked and derive the trak rankings (and those of the [trak] "
                   "budgets and variants). A rerun with the same settings does nothing; changed settings "
                   "are refused unless --force.")

    # ------------------------------------------------------------------ plan
    def plan(self) -> Plan:
        from attribution.methods import create_method
        from attribution.retraining import recipe_fingerprint, training_arrays
        from attribution.scores import ScoreStore

        self.started = time.perf_counter()
        s, force = self.config, bool(self.options.get("force", False))
        support = self.settings["support"]
        recipe = support.recipe()
        config = recipe.train_config()  # a bad model name fails here, before any data is loaded
        top_k = int(s.top_k if s.top_k is not None else self.settings["rank"].top_k)
        target_ids, train_set, test_set, targets = self.ranked_data()
        data = self.settings.data
        train = training_arrays(train_set)
        fingerprint = recipe_fingerprint(config, data.key(), support.seed, len(train["ids"]))
        method = create_method(METHOD, **s.method_params(), save_dir=self.exp.path("trak") / "features",
                               progress=self.progress)
        pool_device = self.check_pool_device() if s.actors != 1 else None
        common = {**method.settings(), "recipe": fingerprint}

        store = ScoreStore(self.exp.path("scores"))
        rankings = self.exp.path("rankings")
        fix = (f"rerun with --force ('attribution trak --force') to recompute the trak scores and rankings, delete "
               f"{rankings}/trak*-*.parquet and {store.folder}/trak*, or use a new --exp")
        labels = np.asarray(targets["labels"], np.int64)
        classes = [int(c) for c in np.unique(labels)]
        units = []
        for c in classes:
            digest = ids_digest(target_ids[labels == c])
            for name, m in s.budget_variants().items():
                key = {**common, "checkpoints": m, "targets": digest}
                units.append(Unit(name, c, key, {**key, "top_k": top_k}, checkpoints=m))
            trak_key = {**common, "checkpoints": s.checkpoints, "targets": digest}
            for name in s.derived_variants():
                key = {**trak_key, "view": SAME_CLASS}
                units.append(Unit(name, c, key, {**key, "top_k": top_k}))
        todo, rerank, derive, reused = [], [], [], []
        for unit in units:
            # done: the ranking (written last) with these settings, and its score block
            if reuse(rankings / unit.file, unit.ranking, fix, force) and \
                    store.block_path(unit.method, unit.block).exists():
                reused.append(unit)
            elif store.reuse(unit.method, unit.block, unit.scores, train["ids"], fix, force):
                rerank.append(unit)  # the scores are there: only the ranking is derived again
            elif unit.checkpoints is None:
                derive.append(unit)  # from trak's block (stored, or computed by this run)
            else:
                todo.append(unit)
        # files of trak variants the settings no longer ask for, or of classes no target has now
        wanted = set(s.all_variants())
        stale = [p for p in rankings.glob(f"{METHOD}*-class*.parquet")
                 if is_trak_file(p.stem.rsplit("-class", 1)[0]) and
                 (p.stem.rsplit("-class", 1)[0] not in wanted or class_of(p.stem) not in classes)]
        for folder in store.folder.glob(f"{METHOD}*"):
            if folder.is_dir() and is_trak_file(folder.name):
                stale += [p for p in folder.glob("class*.parquet")
                          if folder.name not in wanted or class_of(p.stem) not in classes]
        if stale and not force:
            raise ValueError(f"{sorted(str(p.relative_to(self.exp.root)) for p in stale)[:6]} hold trak variants "
                             "the [trak] settings no longer ask for, or classes no target of the rank stage has "
                             "now; rerun with --force ('attribution trak --force') or use a new --exp")
        return Plan(todo=todo, reused=[u.file for u in reused], extra={
            "rerank": rerank, "derive": derive, "stale": stale, "top_k": top_k, "method": method, "train": train,
            "targets": targets, "config": config, "recipe": fingerprint, "support_seed": int(support.seed),
            "store": store, "pool_device": pool_device, "train_set": train_set})

    def check_pool_device(self) -> str:
        """The workers' device, refused unless it is this process's: the driver finalizes
        and scores with the projection the workers featurized with, and traker's
        projections differ by device (CudaProjector vs a dense matrix drawn on CPU)."""
        from attribution.baselines.trak import resolve_device
        from attribution.settings import SettingsError

        s = self.config
        pool = self.require_runtime().device(s.pool_request())
        here = resolve_device(s.device)
        if pool.split(":")[0] != here.split(":")[0]:
            fix = ("run the driver on a GPU node ('attribution submit --driver-gpus 1') or set trak.device = "
                   "\"cpu\" (CPU workers)" if pool.startswith("cuda") else 'set trak.device = "cpu"')
            raise SettingsError(f"trak.actors = {s.actors}: the workers would featurize on {pool} but this "
                                f"process finalizes and scores on {here}, and TRAK's random projection differs "
                                f"between them; {fix}, or trak.actors = 1 (everything in this process)")
        return pool

    # ------------------------------------------------------------------ run
    def run(self, plan: Plan) -> dict:
        # --force replaces files made with other settings: they are moved aside and come
        # back if the new scores or rankings fail (nothing finished is lost to a failed rerun)
        with aside(self.replaced(plan)):
            return self.compute_all(plan)

    def replaced(self, plan: Plan) -> list:
        """The existing files this run deletes or rewrites (only ``--force`` gets here with any)."""
        x, rankings = plan.extra, self.exp.path("rankings")
        units = x["rerank"] + x["derive"] + plan.todo
        paths = list(x["stale"]) + [rankings / u.file for u in units]
        paths += [x["store"].block_path(u.method, u.block) for u in x["derive"] + plan.todo]
        return [p for p in paths if p.exists()]

    def compute_all(self, plan: Plan) -> dict:
        x = plan.extra
        for path in x["stale"]:
            path.unlink(missing_ok=True)
        result = {"computed": [], "trained_checkpoints": 0, "train_seconds": 0.0, "blocks": {}}
        for unit in x["rerank"]:
            block = x["store"].read(unit.method, unit.block)
            result["computed"].append(self.write_ranking(block, unit, x["top_k"]))
        if plan.todo:
            self.compute(plan, result)
        for unit in x["derive"]:
            self.derive(unit, plan, result)
        return result

    def derive(self, unit: Unit, plan: Plan, result: dict) -> None:
        """A same-class unit from trak's block of its class (computed now or stored)."""
        from attribution.methods.trak import same_class_view

        x = plan.extra
        block = result["blocks"].get(unit.label)
        if block is None:
            if not x["store"].reuse(METHOD, unit.block, {k: v for k, v in unit.scores.items() if k != "view"},
                                    x["train"]["ids"], "rerun with --force ('attribution trak --force')"):
                raise RuntimeError(f"trak's score block of class {unit.label} is missing: it is computed "
                                   "before its same-class view")
            block = x["store"].read(METHOD, unit.block)
        view = same_class_view(block, x["train"]["labels"], unit.method)
        x["store"].write(view, unit.block, unit.scores)
        result["computed"].append(self.write_ranking(view, unit, x["top_k"]))

    def compute(self, plan: Plan, result: dict) -> None:
        """Checkpoints, TRAK features, and the score blocks and rankings of ``plan.todo``."""
        from tqdm.auto import tqdm

        from attribution import retrain
        import torch

        from attribution.baselines.trak import StreamedImages, train_checkpoints
        from attribution.methods import Targets, TrainingData
        from attribution.scores import concat_blocks

        x = plan.extra
        s, train, targets, config, method = self.config, x["train"], x["targets"], x["config"], x["method"]
        counts = sorted({u.checkpoints for u in plan.todo})
        derive_from_now = {u.label for u in x["derive"]}
        # 1) checkpoints: the support stage's full-data ensemble models (as many as the largest budget)
        start = time.perf_counter()
        # pixels held in memory, or the ImageSet of a file-backed dataset (decoded batch by batch)
        trainer = retrain.Retrainer(config, train["images"] if "images" in train else train["image_set"],
                                    train["labels"], train["ids"], train["mean"], train["std"], train["num_classes"])
        pooled = s.actors != 1
        states, result["trained_checkpoints"], train_seconds = train_checkpoints(
            trainer, self.exp.path("trak") / "checkpoints", counts[-1], x["support_seed"], x["recipe"],
            threads=1, progress=self.progress, train_many=self.train_on_pool(x) if pooled else None)
        result["train_seconds"] = time.perf_counter() - start
        result["checkpoint_train_seconds"] = known_seconds(train_seconds)

        # 2) TRAK features (a fresh traker save dir), then scores target_chunk targets at a time
        image_shape, num_classes = trainer.image_shape, int(train["num_classes"])
        # file-backed: TRAK reads the training images batch by batch from their files
        images = trainer.x if trainer.x is not None else StreamedImages(
            lambda positions: trainer.images_at(torch.from_numpy(positions)), len(train["ids"]))
        method.fit(TrainingData(train["ids"], train["labels"], images=images, extra={
            "model_fn": lambda: retrain.build_model(config.model, num_classes, image_shape, config.width),
            "checkpoints": states, "identity": {"recipe": x["recipe"], "train_ids": ids_digest(train["ids"])},
            "featurize": self.featurize_on_pool(x, states) if pooled else None}))
        result["featurized_checkpoints"] = len(method.scorer_.featurized_now_)
        target_ids, labels = np.asarray(targets["ids"], np.int64), np.asarray(targets["labels"], np.int64)
        todo = {(u.label, u.checkpoints): u for u in plan.todo}
        classes = sorted({u.label for u in plan.todo})
        rows_todo = np.flatnonzero(np.isin(labels, classes))
        remaining = {c: int((labels == c).sum()) for c in classes}
        parts: dict = {key: [] for key in todo}
        chunks = range(0, len(rows_todo), s.target_chunk)
        for begin in tqdm(chunks, desc="trak score chunks", unit="chunk", disable=not self.progress,
                          file=sys.stderr, dynamic_ncols=True):
            rows = rows_todo[begin:begin + s.target_chunk]
            images = retrain.to_tensor(np.asarray(targets["images"])[rows], train["mean"], train["std"])
            blocks = method.score_budgets(Targets(target_ids[rows], labels[rows], images=images), counts)
            chunk_labels = labels[rows]
            for c in np.unique(chunk_labels):
                c = int(c)
                at = np.flatnonzero(chunk_labels == c)
                for m, block in blocks.items():
                    if (c, m) in parts:
                        parts[(c, m)].append(block.take(at))
                remaining[c] -= len(at)
                if remaining[c]:
                    continue
                # every target of the class is scored: its blocks, then its rankings
                for m in counts:
                    unit = todo.get((c, m))
                    if unit is None:
                        continue
                    class_block = dataclasses.replace(concat_blocks(parts.pop((c, m))), method=unit.method)
                    x["store"].write(class_block, unit.block, unit.scores)
                    result["computed"].append(self.write_ranking(class_block, unit, x["top_k"]))
                    if unit.method == METHOD and c in derive_from_now:
                        result["blocks"][c] = class_block  # its same-class view follows
        result.update(projector=method.projector_, device=method.device_, counts=counts,
                      featurize_seconds=method.featurize_seconds_, score_seconds=method.score_seconds_,
                      budget_seconds={m: {"train": float(sum(result["checkpoint_train_seconds"][:m])),
                                          **method.seconds_of(m)} for m in counts})

    # ------------------------------------------------------------------ the pool (trak.actors != 1)
    def pool(self, x: dict, states: list, max_items: int):
        """A queue of :class:`TrakWorker` on the stage's runtime, holding the training
        set (pixels, or the ImageSet of the files) and ``states`` once per worker."""
        from attribution.retraining import training_arrays

        s = self.config
        config = self.settings["support"].recipe().train_config(x["pool_device"]).to_dict()
        return self.require_runtime().queue(
            s.pool_request(max_items), TrakWorker, config, training_arrays(x["train_set"]),
            x["method"].scorer().worker_params(), states, s.threads_per_actor, key=item_key)

    def note_worker(self, done, kind: str) -> None:
        """Count a finished pool item and its worker (the manifest's ``pool`` record)."""
        record = self.__dict__.setdefault("pool_record", {"train_items": 0, "featurize_items": 0, "workers": {}})
        record[kind] += 1
        record["workers"][done.worker] = record["workers"].get(done.worker, 0) + 1

    def train_on_pool(self, x: dict):
        """``train_many`` of :func:`attribution.baselines.trak.train_checkpoints`: the
        missing checkpoints trained on the workers, yielded as each finishes."""
        def train_many(missing):
            if not missing:
                return
            with self.pool(x, [], len(missing)) as queue:
                for done in queue.map([{"kind": "train", "model": i, "torch_seed": seed} for i, seed in missing]):
                    self.note_worker(done, "train_items")
                    yield done.item["model"], done.result["state"], done.result["seconds"]
        return train_many

    def featurize_on_pool(self, x: dict, states: list):
        """``featurize`` of :meth:`attribution.baselines.trak.TrakScorer.fit`: the rows of
        every checkpoint to featurize, ``shard_size`` training images per item, projected
        on the workers and stored here as each returns (the unit of resume: a rerun asks
        only for the shards not stored); a checkpoint is finalized once all its rows are."""
        import collections

        from tqdm.auto import tqdm

        from attribution import retrain

        s, train = self.config, x["train"]
        n, config, num_classes = len(train["ids"]), x["config"], int(train["num_classes"])
        image_shape = tuple(x["train_set"].image_shape)  # (H, W, C), as Retrainer.image_shape

        def model_fn():
            return retrain.build_model(config.model, num_classes, image_shape, config.width)

        def featurize(scorer, model_ids):
            rows = {i: scorer.checkpoint_rows(model_fn, states[i], i, n) for i in model_ids}
            items = [{"kind": "featurize", "model": i, "start": a, "stop": b}
                     for i in model_ids for a, b in rows[i].pending(s.shard_size)]
            left = collections.Counter(item["model"] for item in items)
            seconds = {i: rows.pop(i).finish() for i in list(rows) if not left[i]}
            if not items:
                return seconds
            with self.pool(x, states, len(items)) as queue, \
                    tqdm(total=sum(it["stop"] - it["start"] for it in items), desc=f"trak featurize "
                         f"({len(model_ids)} models, {queue.size} workers)", unit="img", disable=not self.progress,
                         file=sys.stderr, dynamic_ncols=True) as bar:
                for done in queue.map(items):
                    self.note_worker(done, "featurize_items")
                    item, out = done.item, done.result
                    rows[item["model"]].write(item["start"], item["stop"], out["grads"], out["out_to_loss"],
                                              out["seconds"])
                    bar.update(item["stop"] - item["start"])
                    left[item["model"]] -= 1
                    if not left[item["model"]]:
                        seconds[item["model"]] = rows.pop(item["model"]).finish()
            return seconds
        return featurize

    def write_ranking(self, block, unit: Unit, top_k: int) -> str:
        """The ranking file of one unit, derived from its score block (written last: it marks the unit done)."""
        from attribution.scores import write_ranking

        path = self.exp.path("rankings") / unit.file
        return write_ranking(block, top_k, path, unit.ranking).name

    # ------------------------------------------------------------------ finish
    def finish(self, plan: Plan, result: dict) -> dict:
        s, x = self.config, plan.extra
        method = x["method"]
        projector = result.get("projector", method.settings()["projector"])
        computed, reused = sorted(result["computed"]), sorted(plan.reused)
        seconds = round(time.perf_counter() - self.started, 1)
        variants = {name: {"checkpoints": m} for name, m in s.budget_variants().items()}
        variants.update({name: {"derived_from": METHOD} for name in s.derived_variants()})
        summary = {"targets": len(x["targets"]["ids"]), "computed_files": len(computed), "reused_files": len(reused),
                   "projector": projector, "proj_dim": s.proj_dim, "checkpoints": s.checkpoints,
                   "variants": list(variants)}
        previous = (self.exp.manifest().get(self.name) or {}).get("method_seconds") or {}
        method_seconds = {k: v for k, v in previous.items() if k in variants}  # variants still asked for
        if not computed:
            # a run that only reused keeps the seconds (and method_seconds) of the run that computed;
            # files of variants no longer asked for may have been deleted (--force): drop their records
            self.exp.record_stage(self.name, reused=True, computed_files=[], reused_files=reused,
                                  last_run_seconds=seconds, variants=variants, method_seconds=method_seconds)
            return summary
        fields = {"settings": s.to_dict(), "recipe": x["recipe"], "projector": projector, "proj_dim": s.proj_dim,
                  "checkpoints": s.checkpoints, "budgets": sorted(set(s.budgets) | {s.checkpoints}),
                  "variants": variants, "n_train": len(x["train"]["ids"]),
                  "n_targets": len(x["targets"]["ids"]), "top_k": x["top_k"], "same_class": s.same_class,
                  "seconds": seconds, "reused": False, "computed_files": computed, "reused_files": reused,
                  "outputs": ["trak/checkpoints/", "trak/features/", "scores/trak*/", "rankings/trak*-*.parquet"]}
        if plan.todo:
            measured = result["train_seconds"] + result["featurize_seconds"] + result["score_seconds"]
            # the stage's fixed work (data, plan, writing) that every variant from scratch repeats
            fixed = max(0.0, seconds - measured)
            for unit in plan.todo:
                part = result["budget_seconds"][unit.checkpoints]
                method_seconds[unit.method] = round(fixed + part["train"] + part["featurize"] + part["score"], 1)
            fields.update(device=result["device"], trained_checkpoints=result["trained_checkpoints"],
                          featurized_checkpoints=result["featurized_checkpoints"],
                          train_seconds=round(result["train_seconds"], 1),
                          featurize_seconds=round(result["featurize_seconds"], 1),
                          score_seconds=round(result["score_seconds"], 1), fixed_seconds=round(fixed, 1),
                          budget_seconds={str(m): {k: round(v, 2) for k, v in part.items()}
                                          for m, part in result["budget_seconds"].items()})
            summary["trained_checkpoints"] = result["trained_checkpoints"]
            if s.actors != 1:  # which workers trained and featurized what
                fields["pool"] = {"actors": s.actors, "shard_size": s.shard_size, "device": x["pool_device"],
                                  **getattr(self, "pool_record", {"train_items": 0, "featurize_items": 0,
                                                                  "workers": {}})}
        for name in s.derived_variants():  # derived from trak's scores: trak's cost
            if METHOD in method_seconds:
                method_seconds[name] = method_seconds[METHOD]
        fields["method_seconds"] = method_seconds
        self.exp.record_stage(self.name, **fields)
        summary["seconds"] = seconds
        summary["method_seconds"] = method_seconds
        return summary


# ----------------------------------------------------------------------------- the worker


class TrakWorker(QueueWorker):
    """A trak pool worker: holds the training set and the checkpoints once, and per item
    trains one checkpoint (``{"kind": "train", "model": i, "torch_seed": s}`` -> its state
    dict) or projects one shard of training images' gradients for one checkpoint
    (``{"kind": "featurize", "model": i, "start": a, "stop": b}`` -> traker's projected
    gradients and out-to-loss terms of positions a..b-1,
    :meth:`attribution.baselines.trak.TrakScorer.project_rows`). It writes nothing to
    the experiment: the driver stores what it returns."""

    def __init__(self, config: dict, train: dict, scorer: dict, states: list, threads: int = 1):
        import os
        import tempfile

        import torch

        from attribution import retrain
        from attribution.baselines.trak import TrakScorer

        torch.set_num_threads(int(threads))
        if config["device"].startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"trak worker on {os.uname().nodename} got a GPU but torch sees no "
                               'CUDA device: install a CUDA build of torch there or set trak.device = "cpu"')
        self.config = retrain.TrainConfig(**config)
        images = np.array(train["images"]) if "images" in train else train["image_set"]
        if hasattr(images, "threads"):  # image files: decoded on the CPUs this worker holds
            images.threads = int(threads)
        self.trainer = retrain.Retrainer(self.config, images, np.array(train["labels"]), np.array(train["ids"]),
                                         train["mean"], train["std"], train["num_classes"])
        self.labels = np.array(train["labels"])
        self.states = list(states)
        self.scratch = tempfile.mkdtemp(prefix="trak-rows-")  # this worker's own traker folder
        self.scorer = TrakScorer(self.scratch, device=self.config.device, progress=False, **scorer)

    def model(self):
        from attribution import retrain

        return retrain.build_model(self.config.model, int(self.trainer.num_classes), self.trainer.image_shape,
                                   self.config.width)

    def __call__(self, item: dict) -> dict:
        import torch

        from attribution.baselines.trak import StreamedImages

        begin = time.perf_counter()
        if item["kind"] == "train":
            model = self.trainer.train(seed=int(item["torch_seed"]))
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return {"state": state, "seconds": time.perf_counter() - begin}
        images = StreamedImages(lambda positions: self.trainer.images_at(torch.from_numpy(positions)),
                                len(self.labels))
        grads, out_to_loss = self.scorer.project_rows(self.model, self.states[item["model"]], item["model"], images,
                                                      self.labels, item["start"], item["stop"],
                                                      f"{self.scratch}/rows")
        return {"grads": grads, "out_to_loss": out_to_loss, "seconds": time.perf_counter() - begin}


def item_key(item: dict) -> tuple:
    """A pool item's name in messages: ("train", model) or ("featurize", model, start)."""
    return (item["kind"], item["model"]) + ((item["start"],) if item["kind"] == "featurize" else ())


# ----------------------------------------------------------------------------- helpers


def block_name(label: int) -> str:
    """The score block of one class of targets: ``EXP/scores/trak/classNNN.parquet``."""
    return f"class{int(label):03d}"


def class_of(stem: str) -> int:
    """The class of a per-class file name (``trak-class003`` or ``class003``)."""
    return int(stem.rsplit("class", 1)[1])


def is_trak_file(method: str) -> bool:
    """Whether a method name of a file is trak or one of its variants (``trak@m20``)."""
    from attribution.methods import split_variant

    return split_variant(method)[0] == METHOD


def known_seconds(seconds: list[float]) -> list[float]:
    """Per-checkpoint training seconds with the unknown ones (checkpoints stored before
    the seconds were recorded: nan) replaced by the mean of the known ones (0 if none)."""
    values = np.asarray(seconds, np.float64)
    known = values[np.isfinite(values)]
    fill = float(known.mean()) if len(known) else 0.0
    return [float(v) if math.isfinite(v) else fill for v in values]
