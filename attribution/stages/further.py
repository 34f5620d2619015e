"""The further stage: the final-model-only gold standard (Wei et al., arXiv 2412.03906).

From the gradient stage's final model (``EXP/gradient/checkpoints``, the model the
gradient methods attribute), further training with a small learning rate on the full
training set and on leave-one-out sets, same seed and sample order
(:mod:`attribution.further_training`), for a seeded sample of ``left_out`` training
images and of ``targets`` of the rank stage's targets, over ``seeds`` seeds. The gold
score of a left-out image for a target, after each epoch of further training, is the
mean change of the target's loss (positive: the image helps). The report measures how
every method's scores of the left-out images agree with it (cosine and Spearman per
target, against the further-training length: the paper's main figure).

Work: items (seed, block of ``block`` left-out images) on a "retrain" pool; a worker
runs the seed's full run and the block's leave-one-out runs and returns the target
losses after every epoch. Outputs:

- ``EXP/further/runs/part-*.parquet``: one row per finished item (the unit of resume:
  a rerun runs only the items not there; parts with other settings are refused unless
  ``--force``, which moves them aside);
- ``EXP/further/gold.parquet``: (epoch, target_id, train_id, gold, gold_se) once every
  item is in; ``gold_se`` is the standard error over seeds.

Leave-one-out retraining from scratch (``loo_seeds`` > 0; dattri's ``loo_corr``): the
[support] recipe trained on everything and without each left-out image, ``loo_seeds``
torch seeds each, on the retraining pool; ``EXP/further/loo/`` holds one row per
training (resume), ``EXP/further/loo.parquet`` (target_id, train_id, loo, loo_se) the
mean change of each target's loss when the image is left out. A different question
from further training (another model, not the final one), measured the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from attribution.artifacts import aside, ids_digest
from attribution.settings import Section, setting
from attribution.stages import Flag, Plan, Stage, register_stage
from attribution.workqueue import PoolRequest, QueueWorker

LOO_SCHEMA = pa.schema([("seed", pa.int64()), ("train_id", pa.int64()), ("losses", pa.list_(pa.float64())),
                        ("seconds", pa.float64())])
RUN_SCHEMA = pa.schema([("seed", pa.int64()), ("block", pa.int64()), ("positions", pa.list_(pa.int64())),
                        ("full", pa.list_(pa.float64())), ("loo", pa.list_(pa.float64())),
                        ("seconds", pa.float64()), ("worker", pa.string())])


@dataclass
class FurtherSettings(Section):
    """The [further] section of a preset."""

    section: ClassVar[str] = "further"

    left_out: int = setting(100, low=1, help="training images left out, a seeded sample (the paper: 100)")
    targets: int = setting(100, low=1, help="targets, a seeded sample of the rank stage's (the paper: 100)")
    seeds: int = setting(5, low=1, help="further-training seeds the gold score averages over (the paper: 100 on "
                                        "tabular data)")
    lr: float = setting(1e-3, low=0, help="SGD learning rate of further training (the paper: 1e-4 on tabular MLPs)")
    epochs: int = setting(8, low=1, help="epochs of further training; the gold standard is kept after each")
    batch_size: int | None = setting(None, low=1, help="images per step; unset: the final model's recipe's")
    block: int = setting(10, low=1, help="left-out images per pool item")
    dtype: str = setting("float64", choices=("float64", "float32"),
                         help="precision of further training (float64: the loss changes are ~lr/n)")
    seed: int | None = setting(None, help="seed of the samples and of the further-training orders; unset: the "
                                          "preset's seed")
    actors: int = setting(0, low=0, help="workers; 0: as many as the cluster can place")
    loo_seeds: int = setting(5, low=0, help="retrainings from scratch per left-out image (and of the full set) "
                                            "for the leave-one-out correlation (dattri's loo_corr); 0: none")


class FurtherWorker(QueueWorker):
    """Holds the training set, the targets and the final model; per item (seed, block of
    left-out positions) the full and leave-one-out further-training runs."""

    def __init__(self, train: dict, targets: dict, state: dict, model: dict, settings: dict):
        import torch

        from attribution import retrain
        from attribution.further_training import FurtherTrainer

        torch.set_num_threads(1)
        # Ray hands numpy arrays over read-only from the object store; copy once here
        x = retrain.to_tensor(np.array(train["images"]), train["mean"], train["std"])
        tx = retrain.to_tensor(np.array(targets["images"]), train["mean"], train["std"])

        def model_fn():
            return retrain.build_model(model["name"], model["num_classes"], tuple(model["image_shape"]),
                                       model["width"])

        self.trainer = FurtherTrainer(model_fn, state, x, np.asarray(train["labels"]), tx,
                                      np.asarray(targets["labels"]), lr=settings["lr"], epochs=settings["epochs"],
                                      batch_size=settings["batch_size"], dtype=settings["dtype"])

    def __call__(self, item: dict) -> dict:
        return self.trainer.runs(int(item["seed"]), item["positions"])


@register_stage
class FurtherStage(Stage):
    """Further training from the final model: the gold standard of final-model-only attribution."""

    name = "further"
    settings_class = FurtherSettings
    reads = ("rankings", "gradient")
    writes = ("further",)
    flags = (Flag("--force", "discard further-training runs stored with other settings instead of refusing",
                  option="force"),)
    help = "further-training gold standard (Wei et al.): leave-one-out further training from the final model"
    description = ("Further-train the gradient stage's final model on the full training set and without each of "
                   "a seeded sample of training images (same seed and order), for a sample of the rank stage's "
                   "targets; resumes per (seed, block).")

    def plan(self) -> Plan:
        import torch

        from attribution.baselines.trak import state_digest
        from attribution.retraining import read_parts, target_arrays, training_arrays

        self.started = time.perf_counter()
        s, force = self.config, bool(self.options.get("force", False))
        gradient = self.exp.manifest().get("gradient") or {}
        if not gradient.get("epochs"):
            raise ValueError("the further stage starts from the gradient stage's final model, which is not there: "
                             "run 'attribution gradient' first (the preset needs a [gradient] section)")
        final = self.exp.path("gradient") / "checkpoints" / f"epoch-{int(gradient['epochs'][-1]):03d}.pt"
        if not final.exists():
            raise ValueError(f"{final} is missing: rerun 'attribution gradient'")
        stored = torch.load(final, map_location="cpu", weights_only=True)
        data = self.settings.data
        ranked, train_set, test_set, _ = self.ranked_data()  # the data loaded once
        if not train_set.in_memory:
            raise ValueError("further.*: further training holds the training set in memory; a file-backed "
                             "dataset (imagenet) is not supported yet: drop [further] from the preset")
        seed = int(s.seed if s.seed is not None else self.settings.seed)
        rng = np.random.default_rng(seed)
        ranked = np.sort(ranked)
        target_ids = np.sort(rng.choice(ranked, size=min(s.targets, len(ranked)), replace=False))
        left_out = np.sort(rng.choice(len(train_set), size=min(s.left_out, len(train_set)), replace=False))
        train = training_arrays(train_set)
        targets = target_arrays(test_set, target_ids)
        config = stored["config"]  # the final model's recipe
        batch_size = int(s.batch_size or config["batch_size"])
        settings = {"model": state_digest(stored["state_dict"]), "lr": s.lr, "epochs": s.epochs,
                    "batch_size": batch_size, "dtype": s.dtype, "seed": seed, "seeds": s.seeds, "block": s.block,
                    "targets": ids_digest(target_ids), "left_out": ids_digest(train["ids"][left_out])}
        blocks = [left_out[i:i + s.block] for i in range(0, len(left_out), s.block)]
        items = [{"seed": seed * 1000 + k, "block": b, "positions": [int(p) for p in blocks[b]]}
                 for k in range(s.seeds) for b in range(len(blocks))]
        folder = self.exp.path("further") / "runs"
        fix = "rerun with --force ('attribution further --force') or use a new --exp"
        done = {}
        # --force: the runs of other settings are moved aside whole, and come back if this run fails
        self.discard = [folder] if force and folder.exists() else []
        if not self.discard:
            table = read_parts(folder, settings=settings, fix=fix, schema=RUN_SCHEMA)
            if table is not None:
                for row in table.to_pylist():
                    done[(row["seed"], row["block"])] = row
        todo = [it for it in items if (it["seed"], it["block"]) not in done]
        # leave-one-out retraining from scratch: the support recipe, each left-out image and the full set
        from attribution.retrain import training_seed

        recipe = self.settings["support"].recipe()
        loo_config = recipe.train_config()
        loo_settings = {"recipe": loo_config.fingerprint(), "data": data.key(), "seed": seed, "seeds": s.loo_seeds,
                        "targets": settings["targets"], "left_out": settings["left_out"]}
        loo_jobs = [{"kind": "ensemble", "torch_seed": training_seed(seed, 10_000 + k), "seed": k, "train_id": -1,
                     "removed_ids": []} for k in range(s.loo_seeds)]
        loo_jobs += [{"kind": "ensemble", "torch_seed": training_seed(seed, 10_000 + k), "seed": k,
                      "train_id": int(train["ids"][j]), "removed_ids": [int(train["ids"][j])]}
                     for k in range(s.loo_seeds) for j in left_out]
        loo_folder = self.exp.path("further") / "loo"
        if force and loo_folder.exists():
            self.discard.append(loo_folder)
        loo_done = {}
        if not (force and self.discard):
            table = read_parts(loo_folder, settings=loo_settings, fix=fix, schema=LOO_SCHEMA)
            if table is not None:
                loo_done = {(row["seed"], row["train_id"]): row for row in table.to_pylist()}
        loo_todo = [job for job in loo_jobs if (job["seed"], job["train_id"]) not in loo_done]
        return Plan(todo=todo, reused=[f"{len(done)} runs"], extra={
            "loo_jobs": loo_jobs, "loo_todo": loo_todo, "loo_done": loo_done, "loo_settings": loo_settings,
            "loo_config": loo_config,
            "done": done, "items": items, "settings": settings, "train": train, "targets": targets,
            "target_ids": target_ids, "left_out": left_out, "state": stored["state_dict"],
            "model": {"name": config["model"], "num_classes": int(train["num_classes"]),
                      "image_shape": list(train_set.image_shape), "width": config.get("width")}})

    def run(self, plan: Plan) -> dict:
        from tqdm.auto import tqdm

        from attribution.retraining import PartLog

        x = plan.extra
        with aside(self.discard):
            if plan.todo:
                log = PartLog(self.exp.path("further") / "runs", RUN_SCHEMA, settings=x["settings"])
                request = PoolRequest("retrain", actors=self.config.actors or None, max_items=len(plan.todo),
                                      model=x["model"]["name"])
                queue = self.require_runtime().queue(request, FurtherWorker, x["train"], x["targets"], x["state"],
                                                     x["model"], x["settings"],
                                                     key=lambda item: (item["seed"], item["block"]))
                try:
                    with queue, tqdm(total=len(plan.todo), desc="further training", unit="item",
                                     disable=not self.progress) as bar:
                        for completed in queue.map(plan.todo):
                            item, out = completed.item, completed.result
                            row = {"seed": item["seed"], "block": item["block"], "positions": item["positions"],
                                   "full": out["full"].reshape(-1).tolist(), "loo": out["loo"].reshape(-1).tolist(),
                                   "seconds": float(out["seconds"]), "worker": completed.worker}
                            log.add(row)
                            x["done"][(item["seed"], item["block"])] = row
                            bar.update(1)
                finally:
                    log.flush()
            if x["loo_todo"]:
                self.retrain_loo(plan)
            result = self.write_gold(plan)
            if x["loo_jobs"]:
                self.write_loo(plan)
            return result

    def retrain_loo(self, plan: Plan) -> None:
        """The leave-one-out retrainings from scratch on the support stage's pool kind."""
        from tqdm.auto import tqdm

        from attribution.retraining import PartLog

        x, support = plan.extra, self.settings["support"]
        runtime = self.require_runtime()
        request = support.pool_request(x["loo_config"].model, max_items=len(x["loo_todo"]))
        config = support.recipe().train_config(runtime.device(request))
        log = PartLog(self.exp.path("further") / "loo", LOO_SCHEMA, settings=x["loo_settings"])
        queue = support.open_queue(runtime, request, config, x["train"], x["targets"],
                                   key=lambda job: (job["seed"], job["train_id"]))
        labels = np.asarray(x["targets"]["labels"])
        try:
            with queue, tqdm(total=len(x["loo_todo"]), desc="leave-one-out retraining", unit="model",
                             disable=not self.progress) as bar:
                for completed in queue.map(x["loo_todo"]):
                    job, logits = completed.item, np.asarray(completed.result["logits"], np.float64)
                    shifted = logits - logits.max(axis=1, keepdims=True)
                    losses = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels]
                    row = {"seed": job["seed"], "train_id": job["train_id"], "losses": losses.tolist(),
                           "seconds": float(completed.result.get("seconds", 0.0))}
                    log.add(row)
                    x["loo_done"][(job["seed"], job["train_id"])] = row
                    bar.update(1)
        finally:
            log.flush()

    def write_loo(self, plan: Plan) -> None:
        from attribution.artifacts import write_table

        x = plan.extra
        seeds = sorted({job["seed"] for job in x["loo_jobs"]})
        left = [int(t) for t in np.asarray(x["train"]["ids"])[x["left_out"]]]
        full = np.array([x["loo_done"][(k, -1)]["losses"] for k in seeds])                  # (seeds, targets)
        loo = np.array([[x["loo_done"][(k, j)]["losses"] for j in left] for k in seeds])    # (seeds, left, targets)
        deltas = loo - full[:, None]
        mean = deltas.mean(axis=0).T                                                          # (targets, left)
        se = (deltas.std(axis=0, ddof=1).T / np.sqrt(len(seeds))) if len(seeds) > 1 else np.full_like(mean, np.nan)
        t, j = np.meshgrid(np.arange(len(x["target_ids"])), np.arange(len(left)), indexing="ij")
        write_table(pa.table({"target_id": pa.array(x["target_ids"][t.reshape(-1)], pa.int64()),
                              "train_id": pa.array(np.asarray(left)[j.reshape(-1)], pa.int64()),
                              "loo": pa.array(mean.reshape(-1), pa.float64()),
                              "loo_se": pa.array(se.reshape(-1), pa.float64())}),
                    self.exp.path("further") / "loo.parquet", settings=x["loo_settings"])

    def write_gold(self, plan: Plan) -> dict:
        from attribution.artifacts import write_table
        from attribution.further_training import gold_scores

        x, s = plan.extra, self.config
        epochs, n_targets = s.epochs, len(x["target_ids"])
        seeds = sorted({it["seed"] for it in x["items"]})
        full = np.zeros((len(seeds), epochs, n_targets))
        loo = np.zeros((len(seeds), len(x["left_out"]), epochs, n_targets))
        column = {int(p): i for i, p in enumerate(x["left_out"])}
        for (seed, _), row in x["done"].items():
            k = seeds.index(seed)
            full[k] = np.asarray(row["full"]).reshape(epochs, n_targets)
            block = np.asarray(row["loo"]).reshape(len(row["positions"]), epochs, n_targets)
            for j, position in enumerate(row["positions"]):
                loo[k, column[int(position)]] = block[j]
        gold = gold_scores(full, loo)                                  # (epochs, targets, left_out)
        deltas = loo - full[:, None]
        se = (deltas.std(axis=0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1
              else np.full(deltas.shape[1:], np.nan)).transpose(1, 2, 0)
        e, t, j = np.meshgrid(np.arange(epochs), np.arange(n_targets), np.arange(len(x["left_out"])), indexing="ij")
        train_ids = np.asarray(x["train"]["ids"])[x["left_out"]]
        table = pa.table({"epoch": pa.array(e.reshape(-1) + 1, pa.int32()),
                          "target_id": pa.array(x["target_ids"][t.reshape(-1)], pa.int64()),
                          "train_id": pa.array(train_ids[j.reshape(-1)], pa.int64()),
                          "gold": pa.array(gold.reshape(-1), pa.float64()),
                          "gold_se": pa.array(se.reshape(-1), pa.float64())})
        write_table(table, self.exp.path("further") / "gold.parquet", settings=x["settings"])
        seconds = [row["seconds"] for row in x["done"].values()]
        return {"runs_seconds": float(np.sum(seconds)), "computed": len(plan.todo),
                "signal": float(np.abs(gold[-1]).mean()), "noise": float(np.nanmean(se[-1]))}

    def finish(self, plan: Plan, result: dict) -> dict:
        s, x = self.config, plan.extra
        seconds = round(time.perf_counter() - self.started, 1)
        self.exp.record_stage(self.name, settings=s.to_dict(), **{k: v for k, v in x["settings"].items()
                                                                  if k in ("lr", "epochs", "batch_size", "dtype")},
                              targets=len(x["target_ids"]), left_out=len(x["left_out"]), seeds=s.seeds,
                              items=len(x["items"]), computed_items=result["computed"], seconds=seconds,
                              runs_seconds=round(result["runs_seconds"], 1),
                              mean_abs_gold=result["signal"], mean_gold_se=result["noise"],
                              loo_seeds=s.loo_seeds, loo_trainings=len(x["loo_jobs"]),
                              outputs=["further/runs/", "further/gold.parquet"] +
                              (["further/loo/", "further/loo.parquet"] if x["loo_jobs"] else []))
        return {"items": len(x["items"]), "computed": result["computed"], "seconds": seconds,
                "mean_abs_gold_last_epoch": result["signal"], "mean_se_last_epoch": result["noise"]}
