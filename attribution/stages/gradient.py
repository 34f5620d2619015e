"""The gradient stage: gradient-based attribution of every training image for the rank stage's targets.

The methods (:mod:`attribution.methods.gradient`: ``"tracin"`` (TracInCP), ``"grad-dot"``,
``"grad-cos"``, ``"if-cg"`` (influence functions, conjugate gradient; dattri) and
``"ekfac"`` (EK-FAC influence; kronfluence)) all read one model: the [support] recipe's
full-data model with seed index 0 (torch seed ``retrain.training_seed(support.seed, 0)``),
trained here with the module engine in fp32 so that its trajectory can be kept:
``checkpoints`` evenly spaced epochs of that one training, the last being the final
model. TracInCP sums over the trajectory; every other method uses the final model only
(the final-model-only setting of Wei et al., arXiv 2412.03906, whose gold standard is
the further stage).

Outputs (written atomically):
- ``EXP/gradient/checkpoints/epoch-NNN.pt``: the trajectory (state dict, recipe
  fingerprint, torch seed); reused when the recipe and seed match.
- ``EXP/scores/<method>/classNNN.parquet``: per class of targets, every training image's
  score (:class:`attribution.scores.ScoreStore`), scored ``target_chunk`` targets at a
  time (each method bounds its own blocks by ``max_block_mb``).
- ``EXP/rankings/<method>-classNNN.parquet``: derived from the block, written last.

Resume per (method, class), as the trak stage: a ranking with the same settings is
skipped, a block with the same settings only re-ranked; other settings are refused with
the differing keys unless ``--force`` (the replaced files are moved aside and restored
if the run fails). ``method_seconds`` in the manifest: per method, training the
trajectory + its fit + its scoring.
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

GRADIENT_METHODS = ("grad-dot", "grad-cos", "tracin", "if-cg", "ekfac")


@dataclass
class GradientSettings(Section):
    """The [gradient] section of a preset."""

    section: ClassVar[str] = "gradient"

    methods: tuple[str, ...] = setting(GRADIENT_METHODS, choices=GRADIENT_METHODS,
                                       help="gradient-based methods to score with")
    checkpoints: int = setting(4, low=1, help="epochs of the final model's training kept for TracInCP, evenly "
                                              "spaced, the last = the final model")
    top_k: int | None = setting(None, low=1, help="rows per target; unset: the rank stage's top_k")
    target_chunk: int = setting(256, low=1, help="targets per score call")
    batch_size: int = setting(128, low=1, help="images per gradient batch")
    max_block_mb: float = setting(256.0, low=0, help="largest (targets x training images) block a method holds")
    if_damping: float = setting(1.0, low=0, help="if-cg: damping added to the Hessian (above the MLP's negative curvature: CG diverges at 0.01)")
    if_max_iter: int = setting(30, low=1, help="if-cg: conjugate-gradient iterations")
    if_batch_size: int = setting(16, low=1, help="if-cg: targets solved at once (and its gradient batch): memory "
                                                 "~ targets x training images x the model's activations (128 "
                                                 "targets over 3,000 MLP images peaked at 17 GB)")
    ekfac_damping: float | None = setting(None, low=0, help="ekfac: damping (unset: kronfluence's heuristic, "
                                                            "0.1 x the mean eigenvalue)")
    device: str = setting("auto", help='"auto": CUDA when available, else CPU; "cpu" or "cuda[:i]"')

    def check(self) -> None:
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            self.fail("device", f'must be "auto", "cpu" or "cuda[:i]", got {self.device!r}')
        self.methods = tuple(dict.fromkeys(self.methods))
        if not self.methods:
            self.fail("methods", f"is empty; name at least one of {list(GRADIENT_METHODS)}")

    def method_params(self, name: str) -> dict:
        """Constructor parameters of one method from this section."""
        common = {"device": self.device, "batch_size": self.batch_size, "max_block_mb": self.max_block_mb}
        if name == "if-cg":
            return {**common, "batch_size": self.if_batch_size, "damping": self.if_damping,
                    "max_iter": self.if_max_iter}
        if name == "ekfac":
            return {**common, "damping": self.ekfac_damping}
        return common

    def kept_epochs(self, epochs: int) -> list[int]:
        """The epochs (1-based) whose models TracInCP sums over: ``checkpoints`` evenly
        spaced, ending at the last."""
        count = min(int(self.checkpoints), int(epochs))
        return sorted({int(math.ceil(epochs * (i + 1) / count)) for i in range(count)})


@register_stage
class GradientStage(Stage):
    """Gradient-based methods (dattri, kronfluence): trajectory, score blocks, rankings."""

    name = "gradient"
    settings_class = GradientSettings
    reads = ("rankings",)
    writes = ("gradient", "scores", "rankings")
    flags = (Flag("--force", "recompute gradient scores and rankings stored with other settings instead of "
                  "refusing", option="force"),)
    help = "gradient-based baselines (TracInCP, Grad-Dot, Grad-Cos, IF-CG, EK-FAC): scores, rankings"
    description = ("Train the [support] recipe's full-data model keeping its trajectory, score every target the "
                   "rank stage ranked with each [gradient] method and derive its rankings. A rerun with the same "
                   "settings does nothing; changed settings are refused unless --force.")

    def plan(self) -> Plan:
        from attribution.methods import create_method
        from attribution.retraining import recipe_fingerprint, training_arrays
        from attribution.scores import ScoreStore

        self.started = time.perf_counter()
        s, force = self.config, bool(self.options.get("force", False))
        support = self.settings["support"]
        config = support.recipe().train_config()
        # the trajectory: one model at a time in fp32 (the stacked engine keeps no per-epoch states)
        config = dataclasses.replace(config, engine="module", precision="fp32")
        top_k = int(s.top_k if s.top_k is not None else self.settings["rank"].top_k)
        target_ids, train_set, _, targets = self.ranked_data()
        data = self.settings.data
        train = training_arrays(train_set)
        fingerprint = recipe_fingerprint(config, data.key(), support.seed, len(train["ids"]))
        epochs = s.kept_epochs(config.epochs)
        methods = {name: create_method(name, **s.method_params(name)) for name in s.methods}
        store, rankings = ScoreStore(self.exp.path("scores")), self.exp.path("rankings")
        fix = (f"rerun with --force ('attribution gradient --force'), delete those method's files in {rankings} "
               f"and {store.folder}, or use a new --exp")
        labels = np.asarray(targets["labels"], np.int64)
        units, todo, rerank, reused = [], [], [], []
        for name, method in methods.items():
            for c in (int(c) for c in np.unique(labels)):
                key = {**method.settings(), "method": name, "recipe": fingerprint, "seed_index": 0,
                       "epochs": epochs if method.uses_all_checkpoints else epochs[-1:],
                       "targets": ids_digest(target_ids[labels == c])}
                units.append(ClassUnit(name, c, key, {**key, "top_k": top_k}))
        for unit in units:
            if reuse(rankings / unit.file, unit.ranking, fix, force) and \
                    store.block_path(unit.method, unit.block).exists():
                reused.append(unit)
            elif store.reuse(unit.method, unit.block, unit.scores, train["ids"], fix, force):
                rerank.append(unit)
            else:
                todo.append(unit)
        return Plan(todo=todo, reused=[u.file for u in reused], extra={
            "rerank": rerank, "top_k": top_k, "methods": methods, "train": train, "train_set": train_set,
            "targets": targets, "config": config, "recipe": fingerprint, "epochs": epochs,
            "support_seed": int(support.seed), "store": store})

    def run(self, plan: Plan) -> dict:
        x, rankings = plan.extra, self.exp.path("rankings")
        replaced = [rankings / u.file for u in x["rerank"] + plan.todo]
        replaced += [x["store"].block_path(u.method, u.block) for u in plan.todo]
        with aside([p for p in replaced if p.exists()]):
            result = {"computed": [], "seconds": {}}
            for unit in x["rerank"]:
                result["computed"].append(self.write_ranking(x["store"].read(unit.method, unit.block), unit,
                                                             x["top_k"]))
            if plan.todo:
                self.compute(plan, result)
            return result

    def trajectory(self, x: dict, trainer) -> tuple[list[dict], float]:
        """The kept epochs' state dicts (stored ones reused) and the training seconds."""
        import torch

        from attribution.artifacts import write_torch
        from attribution.retrain import training_seed

        folder = self.exp.path("gradient") / "checkpoints"
        torch_seed = training_seed(x["support_seed"], 0)
        paths = [folder / f"epoch-{e:03d}.pt" for e in x["epochs"]]
        stored = [torch.load(p, map_location="cpu", weights_only=True) if p.exists() else None for p in paths]
        if all(st is not None and st.get("recipe") == x["recipe"] and st.get("torch_seed") == torch_seed
               for st in stored):
            return [st["state_dict"] for st in stored], float(stored[-1].get("train_seconds", 0.0))
        kept = {}

        def keep(epoch, model):
            if epoch in x["epochs"]:
                kept[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        begin = time.perf_counter()
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # as the retraining workers train
        try:
            trainer.train(seed=torch_seed, on_epoch=keep)
        finally:
            torch.set_num_threads(previous)
        seconds = time.perf_counter() - begin
        for epoch, path in zip(x["epochs"], paths):
            write_torch({"state_dict": kept[epoch], "recipe": x["recipe"], "torch_seed": torch_seed, "epoch": epoch,
                         "config": trainer.config.to_dict(), "train_seconds": seconds}, path)
        return [kept[e] for e in x["epochs"]], seconds

    def compute(self, plan: Plan, result: dict) -> None:
        import torch
        from tqdm.auto import tqdm

        from attribution import retrain
        from attribution.baselines.trak import StreamedImages
        from attribution.methods import Targets, TrainingData
        from attribution.scores import concat_blocks

        x = plan.extra
        s, train, targets, config = self.config, x["train"], x["targets"], x["config"]
        trainer = retrain.Retrainer(config, train["images"] if "images" in train else train["image_set"],
                                    train["labels"], train["ids"], train["mean"], train["std"], train["num_classes"])
        states, train_seconds = self.trajectory(x, trainer)
        result["train_seconds"] = train_seconds
        images = trainer.x if trainer.x is not None else StreamedImages(
            lambda positions: trainer.images_at(torch.from_numpy(positions)), len(train["ids"]))

        def model_fn():
            return retrain.build_model(config.model, int(train["num_classes"]), trainer.image_shape, config.width)

        target_ids, labels = np.asarray(targets["ids"], np.int64), np.asarray(targets["labels"], np.int64)
        by_method: dict = {}
        for unit in plan.todo:
            by_method.setdefault(unit.method, []).append(unit)
        for name, units in by_method.items():
            method = x["methods"][name]
            begin = time.perf_counter()
            method.fit(TrainingData(train["ids"], train["labels"], images=images,
                                    extra={"model_fn": model_fn, "checkpoints": states}))
            classes = sorted(u.label for u in units)
            rows_todo = np.flatnonzero(np.isin(labels, classes))
            parts: dict = {c: [] for c in classes}
            for start in tqdm(range(0, len(rows_todo), s.target_chunk), desc=f"{name} score chunks", unit="chunk",
                              disable=not self.progress, file=sys.stderr, dynamic_ncols=True):
                rows = rows_todo[start:start + s.target_chunk]
                chunk_images = retrain.to_tensor(np.asarray(targets["images"])[rows], train["mean"], train["std"])
                block = method.score(Targets(target_ids[rows], labels[rows], images=chunk_images))
                for c in np.unique(labels[rows]):
                    parts[int(c)].append(block.take(np.flatnonzero(labels[rows] == c)))
            for unit in units:
                class_block = dataclasses.replace(concat_blocks(parts.pop(unit.label)), method=name)
                x["store"].write(class_block, unit.block, unit.scores)
                result["computed"].append(self.write_ranking(class_block, unit, x["top_k"]))
            result["seconds"][name] = {"fit": float(method.fit_seconds_), "score": float(method.score_seconds_),
                                       "wall": time.perf_counter() - begin}

    def write_ranking(self, block, unit: ClassUnit, top_k: int) -> str:
        from attribution.scores import write_ranking

        return write_ranking(block, top_k, self.exp.path("rankings") / unit.file, unit.ranking).name

    def finish(self, plan: Plan, result: dict) -> dict:
        s, x = self.config, plan.extra
        computed, reused = sorted(result["computed"]), sorted(plan.reused)
        seconds = round(time.perf_counter() - self.started, 1)
        summary = {"targets": len(x["targets"]["ids"]), "methods": list(s.methods), "computed_files": len(computed),
                   "reused_files": len(reused)}
        previous = (self.exp.manifest().get(self.name) or {}).get("method_seconds") or {}
        method_seconds = {k: v for k, v in previous.items() if k in s.methods}
        for name, part in result.get("seconds", {}).items():
            # what this method costs from scratch: the trajectory's training, its fit and its scoring
            method_seconds[name] = round(result["train_seconds"] + part["fit"] + part["score"], 1)
        fields = {"settings": s.to_dict(), "recipe": x["recipe"], "epochs": x["epochs"], "methods": list(s.methods),
                  "n_train": len(x["train"]["ids"]), "n_targets": len(x["targets"]["ids"]), "top_k": x["top_k"],
                  "seconds": seconds, "reused": not computed, "computed_files": computed, "reused_files": reused,
                  "method_seconds": method_seconds,
                  "outputs": ["gradient/checkpoints/", *[f"scores/{m}/" for m in s.methods],
                              *[f"rankings/{m}-*.parquet" for m in s.methods]]}
        if "seconds" in result and result["seconds"]:
            fields.update(train_seconds=round(result["train_seconds"], 1),
                          method_parts={k: {kk: round(vv, 2) for kk, vv in v.items()}
                                        for k, v in result["seconds"].items()})
        self.exp.record_stage(self.name, **fields)
        summary.update(seconds=seconds, method_seconds=method_seconds)
        return summary
