"""The pretrain stage: MoCo v2 pretraining of the preset's backbone -> EXP/checkpoints/moco.pt.

Runs in this process (no runtime needed). Data: by default (``images = "full"``) the
whole training split, labels unused, as the paper pretrains on the full training set;
it also keeps the queue free of repeats of the query image (5,000 subset images would
recur within a 4,096-key queue). Test images are never used. ``images = "subset"``
pretrains on the attribution subset only.

Reuse: the checkpoint stores the settings it was trained with
(:meth:`PretrainSettings.checkpoint_settings`) and their fingerprint. A run with the
same settings reuses the file; one with other settings is refused with
:class:`attribution.artifacts.SettingsChanged` (embeddings and rankings already in EXP
were computed from it), unless ``force`` (``--force``): then the old file is kept as
``moco-<its hash>.pt`` and the backbone is trained again. The comparison is of the
stored settings, not of hashes, so checkpoints written before the fingerprint scheme
changed are reused too.

    PretrainStage(exp, parse_settings(preset))()
    PretrainStage(exp, settings, force=True)()
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import ClassVar

from attribution.artifacts import aside, check_settings, differences, fingerprint
from attribution.backbones import RESNETS, BackboneSpec, CheckpointError, checkpoint_metadata
from attribution.settings import DataSettings, Section, setting
from attribution.stages import register_stage
from attribution.stages.base import Flag, Plan, Stage


@dataclass
class PretrainSettings(Section):
    """The [pretrain] section (see :class:`attribution.pretrain.MocoPretrainer` for each key)."""

    section: ClassVar[str] = "pretrain"

    backbone: str = setting("resnet18", choices=RESNETS, help="ResNet to pretrain")
    small_stem: bool = setting(True, help="3x3 stride-1 stem without max-pool (28 / 32 px images)")
    images: str = setting("full", choices=("full", "subset"),
                          help="'full': the whole train split; 'subset': the data.train_per_class images")
    epochs: int = setting(0, low=0, help="epochs (0: no epoch limit)")
    max_steps: int = setting(0, low=0, help="steps (0: no step limit)")
    time_budget_s: float = setting(0.0, low=0, help="seconds of training at most (0: no time limit)")
    batch_size: int = setting(128, low=2, help="images per step (each seen as two views)")
    queue_size: int = setting(4096, low=1, help="negatives kept from earlier batches")
    temperature: float = setting(0.1, low=0, low_open=True, high=10, help="InfoNCE temperature")
    momentum: float = setting(0.99, low=0, high=1, high_open=True, help="key encoder EMA coefficient")
    lr: float = setting(0.06, low=0, low_open=True, help="SGD peak learning rate (cosine schedule)")
    weight_decay: float = setting(5e-4, low=0, help="SGD weight decay")
    hidden_dim: int = setting(512, low=1, help="projection head hidden size")
    proj_dim: int = setting(128, low=1, help="projection head output size")
    min_crop_scale: float = setting(0.25, low=0, low_open=True, high=1,
                                    help="smallest crop area fraction of the random resized crop")
    shuffle_bn_splits: int = setting(2, low=1, help="chunks of the shuffled key batch (1: no shuffle BN)")
    warmup_steps: int = setting(10, low=0, help="linear learning-rate warm-up steps")
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"),
                             help="'bf16' autocast, 'fp32', or 'auto' (bf16 where the CPU has it natively)")
    seed: int | None = setting(None, help="initialisation, sampling and augmentation seed; unset: the preset's")
    threads: int | None = setting(None, low=1, help="torch threads; unset: torch's choice (not part of the result)")

    def check(self) -> None:
        if not (self.epochs or self.max_steps or self.time_budget_s):
            self.fail("epochs", "or pretrain.max_steps or pretrain.time_budget_s must be set (> 0) to end the run")
        if self.shuffle_bn_splits > self.batch_size // 2:
            self.fail("shuffle_bn_splits", f"must be at most batch_size // 2 = {self.batch_size // 2} (BatchNorm "
                                           f"needs 2+ images per chunk), got {self.shuffle_bn_splits}")

    def checkpoint_settings(self, data: DataSettings, in_channels: int) -> dict:
        """What determines the pretrained weights, as stored in the checkpoint and compared
        on reuse (the same dict, key for key, as checkpoints written before stored)."""
        subset = self.images == "subset"
        return {
            "backbone": {"name": self.backbone, "small_stem": self.small_stem, "in_channels": int(in_channels)},
            "data": {"dataset": data.dataset, "root": data.root or "", "images": self.images,
                     "train_per_class": (data.train_per_class or None) if subset else None,
                     "seed": int(data.seed) if subset else None},
            "batch_size": self.batch_size, "queue_size": self.queue_size, "temperature": self.temperature,
            "momentum": self.momentum, "lr": self.lr, "weight_decay": self.weight_decay, "epochs": self.epochs,
            "max_steps": self.max_steps or None, "time_budget_s": self.time_budget_s or None,
            "hidden_dim": self.hidden_dim, "proj_dim": self.proj_dim, "min_crop_scale": self.min_crop_scale,
            "shuffle_bn_splits": self.shuffle_bn_splits, "warmup_steps": self.warmup_steps,
            "precision": self.precision, "seed": int(self.seed),
        }


def stored_pretraining(path) -> dict | None:
    """The ``pretrain`` record of the checkpoint at ``path`` (None: no file, or unreadable)."""
    if not path.exists():
        return None
    try:
        return checkpoint_metadata(path).get("pretrain", {})
    except CheckpointError as error:  # e.g. truncated by a disk problem: our own artifact, remake it
        warnings.warn(f"{path} is unreadable ({error}); pretraining again")
        return None


@register_stage
class PretrainStage(Stage):
    name = "pretrain"
    settings_class = PretrainSettings
    reads = ()
    writes = ("checkpoint",)
    flags = (Flag("--force", "retrain when EXP holds a checkpoint made with other settings "
                  "(the old file is kept as moco-<hash>.pt)", option="force"),
             Flag("--threads", "torch threads (default: torch's choice)", setting="pretrain.threads", type=int))
    help = "MoCo v2 self-supervised pretraining of the backbone (EXP/checkpoints/moco.pt)"
    description = "Pretrain the preset's backbone with MoCo v2 on the training split (labels unused)."

    def plan(self) -> Plan:
        c = self.config
        images = self.settings.data.load("train", subset=c.images == "subset")
        wanted = c.checkpoint_settings(self.settings.data, in_channels=images.image_shape[-1])
        path = self.exp.path("checkpoint")
        stored = stored_pretraining(path)
        extra = {"images": images, "settings": wanted, "replaces": None}
        if stored is not None:
            recorded = stored.get("settings")
            if recorded is not None and not differences(recorded, wanted):
                return Plan(reused=[path], extra={**extra, "stored": stored})
            if not self.options.get("force", False):
                old = stored.get("config_hash", "unknown")
                check_settings(
                    str(path), recorded, wanted,
                    "Embeddings and rankings in this experiment may come from it. Use a new --exp directory, "
                    f"restore the old settings, or rerun with 'attribution pretrain --exp {self.exp.root} --force' "
                    f"(the old file is kept as moco-{old}.pt).")
            extra["replaces"] = stored
        return Plan(todo=[path], extra=extra)

    def run(self, plan: Plan) -> dict:
        from attribution.pretrain import MocoPretrainer

        c, path, settings = self.config, self.exp.path("checkpoint"), plan.extra["settings"]
        if not plan.todo:
            stored = plan.extra["stored"]
            digest = stored.get("config_hash") or fingerprint(settings)
            print(f"pretrain: reusing {path} (same settings, hash {digest})", flush=True)
            return {"checkpoint": str(path), "config_hash": digest, "reused": True,
                    **{k: stored.get(k) for k in ("steps", "seconds", "stopped_by", "final_loss")}}
        digest = fingerprint(settings)
        images = plan.extra["images"]
        backbone = settings["backbone"]
        spec = BackboneSpec(backbone["name"], small_stem=backbone["small_stem"], in_channels=backbone["in_channels"])
        pretrainer = MocoPretrainer(
            spec, batch_size=c.batch_size, queue_size=c.queue_size, temperature=c.temperature,
            momentum=c.momentum, lr=c.lr, weight_decay=c.weight_decay, epochs=c.epochs,
            max_steps=settings["max_steps"], time_budget_s=settings["time_budget_s"], hidden_dim=c.hidden_dim,
            proj_dim=c.proj_dim, min_crop_scale=c.min_crop_scale, shuffle_bn_splits=c.shuffle_bn_splits,
            warmup_steps=c.warmup_steps, precision=c.precision, seed=settings["seed"], num_threads=c.threads,
            progress=self.progress)
        print(f"pretrain: MoCo v2 {spec.name} on {len(images)} {self.settings.data.dataset} train images "
              f"({c.images}), settings hash {digest}", flush=True)
        pretrainer.fit(images)  # moco.pt stays in place while training: a failure here leaves it as it was
        replaced = plan.extra["replaces"]
        # --force: the old checkpoint stays beside the new one as moco-<its hash>.pt, once the
        # new one is written (a failing save puts the old one back at moco.pt)
        kept = {} if replaced is None else {path: path.with_name(f"moco-{replaced.get('config_hash', 'unknown')}.pt")}
        with aside(list(kept), keep=kept):
            pretrainer.save(path, pretrain={"config_hash": digest, "settings": settings})
        return {"checkpoint": str(path), "config_hash": digest, "reused": False, **pretrainer.summary(),
                "spec": replace(spec, checkpoint=str(path)).to_dict()}

    def finish(self, plan: Plan, result: dict) -> dict:
        summary = {k: v for k, v in result.items() if k != "spec"}
        record = {"spec": result["spec"]} if "spec" in result else {}
        self.exp.record_stage(self.name, settings=self.config.to_dict(), **record, **summary)
        return summary
