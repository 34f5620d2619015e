"""The pretrain stage: pretraining of the preset's backbone -> EXP/checkpoints/moco.pt.

``objective = "moco"`` (default): MoCo v2, self-supervised (labels unused).
``objective = "supervised"``: cross-entropy with the labels of the same images, with the
same backbone, augmentation, order and step count (the supervised-features ablation,
:class:`attribution.pretrain.SupervisedPretrainer`). Either way the file is
EXP/checkpoints/moco.pt (the artifact the embed stage's ``checkpoint = "pretrained"``
reads); its ``pretrain`` record names the ``method`` ("moco_v2" / "supervised").

Runs in this process (no runtime needed). Data: by default (``images = "full"``) the
whole training split, labels unused, as the paper pretrains on the full training set;
it also keeps the queue free of repeats of the query image (5,000 subset images would
recur within a 4,096-key queue). Test images are never used. ``images = "subset"``
pretrains on the attribution subset only.

Run length: a fixed number of steps (``max_steps`` / ``epochs``) makes the weights
reproducible; ``time_budget_s`` is a safety cap. A run the cap stopped before its step
count is reported (a warning, ``stopped_by = "time_budget"`` with ``steps`` and
``planned_steps`` in the result, the manifest and the checkpoint), never silently.

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

OBJECTIVES = ("moco", "supervised")
# keys added after the first checkpoints, at the value those were trained with
LATER_KEYS = {"objective": "moco", "width": 64, "stem_stride": 1, "flip_p": 0.5, "jitter_p": 0.8,
              "symmetric": False, "head_bn": False}
MOCO_ONLY = ("queue_size", "temperature", "momentum", "hidden_dim", "proj_dim", "shuffle_bn_splits",
             "symmetric", "head_bn")


@dataclass
class PretrainSettings(Section):
    """The [pretrain] section (see :class:`attribution.pretrain.Pretrainer` and
    :class:`~attribution.pretrain.MocoPretrainer` for each key)."""

    section: ClassVar[str] = "pretrain"

    objective: str = setting("moco", choices=OBJECTIVES,
                             help="'moco': MoCo v2, labels unused; 'supervised': cross-entropy with the labels "
                                  "(the supervised-features ablation)")
    backbone: str = setting("resnet18", choices=RESNETS, help="ResNet to pretrain")
    small_stem: bool = setting(True, help="3x3 stem without max-pool (28 / 32 px images)")
    stem_stride: int = setting(1, choices=(1, 2), help="stride of the small stem (2: downsample early, ~4x cheaper)")
    width: int = setting(64, low=4, help="ResNet base channels (64: torchvision's); features: 8 x width (resnet18)")
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
    flip_p: float = setting(0.5, low=0, high=1, help="probability of a horizontal flip")
    jitter_p: float = setting(0.8, low=0, high=1, help="probability of brightness/contrast jitter")
    shuffle_bn_splits: int = setting(2, low=1, help="chunks of the shuffled key batch (1: no shuffle BN)")
    symmetric: bool = setting(False, help="MoCo: both views are queries, each against the other's key "
                                          "(symmetric loss; twice the cost of a step)")
    head_bn: bool = setting(False, help="MoCo: BatchNorm in the projection head (the MoCo v3 / SimCLR v2 head)")
    warmup_steps: int = setting(10, low=0, help="linear learning-rate warm-up steps")
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"),
                             help="'bf16' autocast, 'fp32', or 'auto' (bf16 where the CPU has it natively)")
    seed: int | None = setting(None, help="initialisation, sampling and augmentation seed; unset: the preset's")
    threads: int | None = setting(None, low=1, help="torch threads; unset: torch's choice (not part of the result)")

    def check(self) -> None:
        if not (self.epochs or self.max_steps or self.time_budget_s):
            self.fail("epochs", "or pretrain.max_steps or pretrain.time_budget_s must be set (> 0) to end the run")
        if self.stem_stride != 1 and not self.small_stem:
            self.fail("stem_stride", "is the small stem's stride: set pretrain.small_stem = true, or stem_stride = 1")
        if self.shuffle_bn_splits > self.batch_size // 2:
            self.fail("shuffle_bn_splits", f"must be at most batch_size // 2 = {self.batch_size // 2} (BatchNorm "
                                           f"needs 2+ images per chunk), got {self.shuffle_bn_splits}")

    def checkpoint_settings(self, data: DataSettings, in_channels: int) -> dict:
        """What determines the pretrained weights, as stored in the checkpoint and compared
        on reuse. Keys added later (``LATER_KEYS``) are left out at the value earlier
        checkpoints were trained with, so those keep being reused (the same dict, key for
        key, as they stored); the MoCo-only keys are left out of a supervised run's."""
        subset = self.images == "subset"
        backbone = {"name": self.backbone, "small_stem": self.small_stem, "in_channels": int(in_channels)}
        backbone.update({k: getattr(self, k) for k in ("width", "stem_stride") if getattr(self, k) != LATER_KEYS[k]})
        settings = {
            "backbone": backbone,
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
        settings.update({k: getattr(self, k) for k in ("objective", "flip_p", "jitter_p", "symmetric", "head_bn")
                         if getattr(self, k) != LATER_KEYS[k]})
        if self.objective != "moco":
            for key in MOCO_ONLY:
                settings.pop(key, None)
        return settings

    def backbone_spec(self, in_channels: int) -> BackboneSpec:
        return BackboneSpec(self.backbone, small_stem=self.small_stem, in_channels=int(in_channels),
                            width=self.width, stem_stride=self.stem_stride)

    def pretrainer(self, in_channels: int, progress: bool):
        """The objective's pretrainer with this section's settings."""
        from attribution.pretrain import PRETRAINERS

        shared = dict(batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                      max_steps=self.max_steps or None, time_budget_s=self.time_budget_s or None,
                      min_crop_scale=self.min_crop_scale, flip_p=self.flip_p, jitter_p=self.jitter_p,
                      warmup_steps=self.warmup_steps, precision=self.precision, seed=int(self.seed),
                      num_threads=self.threads, progress=progress)
        if self.objective == "moco":
            shared.update(queue_size=self.queue_size, temperature=self.temperature, momentum=self.momentum,
                          hidden_dim=self.hidden_dim, proj_dim=self.proj_dim,
                          shuffle_bn_splits=self.shuffle_bn_splits, symmetric=self.symmetric,
                          head_bn=self.head_bn)
        return PRETRAINERS[self.objective](self.backbone_spec(in_channels), **shared)


# what a reused checkpoint's summary repeats from its record
RECORDED = ("method", "steps", "planned_steps", "seconds", "stopped_by", "final_loss")


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
    help = "pretraining of the backbone, MoCo v2 or supervised (EXP/checkpoints/moco.pt)"
    description = ("Pretrain the preset's backbone on the training split: MoCo v2, labels unused "
                   "(pretrain.objective = moco), or cross-entropy with the labels (objective = supervised).")

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
        c, path, settings = self.config, self.exp.path("checkpoint"), plan.extra["settings"]
        if not plan.todo:
            stored = plan.extra["stored"]
            digest = stored.get("config_hash") or fingerprint(settings)
            print(f"pretrain: reusing {path} (same settings, hash {digest})", flush=True)
            # checkpoints written before objectives existed are MoCo's
            return {"checkpoint": str(path), "config_hash": digest, "reused": True,
                    "objective": settings.get("objective", "moco"),
                    **{k: stored.get(k) for k in RECORDED}}
        digest = fingerprint(settings)
        images = plan.extra["images"]
        pretrainer = c.pretrainer(settings["backbone"]["in_channels"], self.progress)
        spec = pretrainer.backbone_spec
        planned = pretrainer.planned_steps(len(images))
        print(f"pretrain: {pretrainer.method} {spec.name} (width {spec.width}) on {len(images)} "
              f"{self.settings.data.dataset} train images ({c.images}), "
              f"{planned or 'unlimited'} steps, cap {c.time_budget_s or 'none'} s, settings hash {digest}", flush=True)
        pretrainer.fit(images)  # moco.pt stays in place while training: a failure here leaves it as it was
        if pretrainer.stopped_by_ == "time_budget" and planned:
            warnings.warn(f"pretrain: the time cap pretrain.time_budget_s = {c.time_budget_s} s stopped the run "
                          f"after {pretrainer.steps_} of its {planned} steps, so the weights depend on this "
                          "machine's speed (recorded as stopped_by = 'time_budget'). Raise time_budget_s or lower "
                          "max_steps for a reproducible run.", stacklevel=2)
        replaced = plan.extra["replaces"]
        # --force: the old checkpoint stays beside the new one as moco-<its hash>.pt, once the
        # new one is written (a failing save puts the old one back at moco.pt)
        kept = {} if replaced is None else {path: path.with_name(f"moco-{replaced.get('config_hash', 'unknown')}.pt")}
        with aside(list(kept), keep=kept):
            pretrainer.save(path, pretrain={"config_hash": digest, "settings": settings})
        return {"checkpoint": str(path), "config_hash": digest, "reused": False, "objective": c.objective,
                **pretrainer.summary(), "spec": replace(spec, checkpoint=str(path)).to_dict()}

    def finish(self, plan: Plan, result: dict) -> dict:
        summary = {k: v for k, v in result.items() if k != "spec"}
        record = {"spec": result["spec"]} if "spec" in result else {}
        self.exp.record_stage(self.name, settings=self.config.to_dict(), **record, **summary)
        return summary
