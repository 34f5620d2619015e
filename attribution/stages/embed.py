"""The embed stage: the preset's train and test subsets -> EXP/embeddings (Parquet shards).

The work is :mod:`attribution.embedding`'s: :func:`~attribution.embedding.plan_embedding`
(load the data, build the model once, compare with what EXP holds; writes nothing) and
:func:`~attribution.embedding.run_embedding` (the shards still missing, on the runtime's
"embed" pool; the driver writes each shard as it arrives, so a rerun resumes).

    EmbedStage(exp, parse_settings(preset), RayRuntime())()      # or InProcessRuntime()
    EmbedStage(exp, settings, runtime, overwrite=True)()         # --overwrite

``--overwrite`` replaces EXP/embeddings only after the data and the checkpoint were
loaded, so a bad data root or checkpoint leaves the existing shards intact; the old
shards and manifest are moved aside meanwhile and restored if the new embedding fails
(:func:`attribution.embedding.run_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from attribution import embedding as emb
from attribution.backbones import BACKBONES, FEATURE_TAPS, NORMALIZATIONS, BackboneSpec, spec_from_checkpoint
from attribution.settings import Section, SettingsError, setting
from attribution.stages import register_stage
from attribution.stages.base import Flag, Plan, Stage, StageInputMissing


@dataclass
class EmbedSettings(Section):
    """The [embed] section."""

    section: ClassVar[str] = "embed"

    backbone: str = setting("resnet18", choices=BACKBONES, help="backbone architecture")
    checkpoint: str = setting("", help="'pretrained': EXP/checkpoints/moco.pt; a checkpoint path; "
                                       "'': random init seeded by embed.seed (the random-init ablation)")
    batch_size: int = setting(emb.DEFAULT_BATCH_SIZE, low=1, help="images per forward pass")
    shard_size: int = setting(emb.DEFAULT_SHARD_SIZE, low=1,
                              help="images per Parquet file: the unit of resume and of load balancing")
    actors: int = setting(0, low=0, help="embedding workers; 0: one per GPU, else one per threads_per_actor CPUs")
    threads_per_actor: int = setting(1, low=1, help="CPUs per worker: its torch threads on CPU, and the threads "
                                                  "decoding image files on either (a GPU worker decodes ImageNet "
                                                  "JPEGs on ~11 CPUs at the speed of the GPU: docs/scale.md)")
    dtype: str = setting("float32", choices=emb.DTYPES, help="stored precision (the reader returns float32)")
    seed: int | None = setting(None, help="torch seed before building the backbone (random init); "
                                          "unset: the preset's seed")
    # architecture of a random-init backbone (a checkpoint brings its own)
    small_stem: bool | None = setting(None, help="3x3 stem without max-pool; unset: for images up to 64 px")
    stem_stride: int = setting(1, choices=(1, 2), help="stride of the small stem (ResNets; 2: early downsampling)")
    width: int = setting(64, low=4, help="ResNet base channels (64: torchvision's); efficientnet_lite0 has its own")
    in_channels: int | None = setting(None, choices=(1, 3), help="unset: the dataset's channels (ResNets)")
    image_size: int | None = setting(None, low=0, help="resize inputs to this side; unset / 0: the dataset's size")
    normalize: str | None = setting(None, choices=NORMALIZATIONS + ("auto",),
                                    help="input normalisation; unset: 'auto' (a checkpoint's own)")
    features: str = setting("pooled", choices=FEATURE_TAPS,
                            help="'pooled': the backbone's global-average-pooled output; 'grid' / 'grid2': its "
                                 "third / second stage pooled to a 4 x 4 grid (ResNets), for any checkpoint or "
                                 "random init")
    grid: int = setting(4, low=1, help="cells per side of the 'grid' / 'grid2' pooling (7 on a 14 x 14 map: "
                                       "2 x 2 px per cell)")

    def check(self) -> None:
        if self.backbone == "efficientnet_lite0" and self.small_stem:
            self.fail("small_stem", "is only for ResNets (efficientnet_lite0 has a fixed stem)")
        if self.features != "pooled" and self.backbone == "efficientnet_lite0":
            self.fail("features", f"= {self.features!r} reads a ResNet's stage; efficientnet_lite0 has only 'pooled'")
        if self.stem_stride != 1 and self.small_stem is False:
            self.fail("stem_stride", "is the small stem's stride: set embed.small_stem = true, or stem_stride = 1")
        if self.image_size not in (None, 0) and self.image_size < 8:
            self.fail("image_size", f"must be 0 (the dataset's size) or >= 8, got {self.image_size!r}")


@register_stage
class EmbedStage(Stage):
    name = "embed"
    settings_class = EmbedSettings
    reads = ()  # + "checkpoint" when embed.checkpoint = "pretrained" (check_inputs)
    writes = ("embeddings",)
    flags = (Flag("--overwrite", "recompute EXP/embeddings (needed when the backbone, checkpoint or data changed); "
                  "the data and checkpoint are checked to load first, and the old shards are restored if the "
                  "new ones fail", option="overwrite"),)
    help = "embed the preset's train/test images into EXP/embeddings (Parquet shards)"
    description = ("Embed the train and test subsets of a preset's [data] section with its [embed] backbone, "
                   "one Parquet file per shard, on a pool of workers. Rerunning resumes: finished shards are "
                   "skipped.")

    # ------------------------------------------------------------------ inputs
    def check_inputs(self) -> None:
        super().check_inputs()
        self.checkpoint_path()

    def checkpoint_path(self) -> str | None:
        """embed.checkpoint resolved: "pretrained" -> EXP/checkpoints/moco.pt, "" -> None, else a path."""
        value = self.config.checkpoint
        if not value:
            return None
        if value == "pretrained":
            path = self.exp.path("checkpoint")
            if not self.exp.has("checkpoint"):
                raise StageInputMissing(
                    f"embed.checkpoint = 'pretrained' but {path} does not exist: run the pretrain stage first "
                    f"('attribution pretrain --exp {self.exp.root}'), or set --set embed.checkpoint=\"\" for the "
                    "random-init ablation, or --set embed.checkpoint=PATH for a MoCo checkpoint")
            return str(path)
        path = Path(value).expanduser()
        if not path.exists():
            raise StageInputMissing(f"embed.checkpoint {value!r} does not exist: pass a checkpoint file, "
                                    "'pretrained' (EXP/checkpoints/moco.pt) or \"\" (random init)")
        return str(path.resolve())

    def backbone_spec(self, train_set) -> BackboneSpec:
        """The backbone to embed with: a checkpoint's own spec (its file is read here), or
        the [embed] architecture keys with defaults from the training images."""
        c = self.config
        checkpoint = self.checkpoint_path()
        if checkpoint:
            spec = spec_from_checkpoint(checkpoint)
            if spec.name != c.backbone:
                raise SettingsError(f"embed.backbone = {c.backbone!r} but {checkpoint} holds a {spec.name}: "
                                    f"set --set embed.backbone={spec.name}")
            overrides = {k: getattr(c, k) for k in ("features", "grid") if getattr(c, k) != getattr(spec, k)}
            if c.image_size is not None:
                overrides["image_size"] = c.image_size or None
            if c.normalize is not None:
                overrides["normalize"] = c.normalize
            return replace(spec, **overrides) if overrides else spec
        height, _, channels = train_set.image_shape
        resnet = c.backbone != "efficientnet_lite0"
        small_stem = c.small_stem if c.small_stem is not None else (resnet and height <= 64)
        # width / stem_stride describe a ResNet: an efficientnet_lite0 (e.g. an ablation that
        # swaps the backbone of a preset with a narrow ResNet) keeps its fixed architecture
        return BackboneSpec(
            name=c.backbone, small_stem=small_stem,
            in_channels=c.in_channels if c.in_channels is not None else (channels if resnet else 3),
            image_size=c.image_size or None, normalize=c.normalize or "auto",
            width=c.width if resnet else 64, stem_stride=c.stem_stride if resnet else 1, features=c.features,
            grid=c.grid)

    # ------------------------------------------------------------------ plan / run / finish
    def plan(self) -> Plan:
        c, data = self.config, self.settings.data
        specs = [data.spec("train"), data.spec("test")]
        image_sets = {spec.split: spec.load() for spec in specs}
        job = emb.plan_embedding(self.exp.path("embeddings"), specs, self.backbone_spec(image_sets["train"]),
                                 seed=int(c.seed), batch_size=c.batch_size, shard_size=c.shard_size, dtype=c.dtype,
                                 overwrite=bool(self.options.get("overwrite", False)), image_sets=image_sets)
        return Plan(todo=job.work, reused=job.done, extra={"embedding": job})

    def run(self, plan: Plan) -> dict:
        # nothing to compute: no pool, so a finished stage reruns without a runtime
        runtime = self.require_runtime() if plan.todo else self.runtime
        return emb.run_embedding(plan.extra["embedding"], runtime, actors=self.config.actors or None,
                                 threads=self.config.threads_per_actor, progress=self.progress)

    def finish(self, plan: Plan, result: dict) -> dict:
        job = plan.extra["embedding"]
        splits = result["splits"]
        self.exp.record_stage(
            self.name, settings=self.config.to_dict(), path=self.exp.path("embeddings").name,
            backbone=job.backbone_spec.to_dict(), checkpoint_sha256=job.checkpoint_sha256, dim=result["dim"],
            dtype=result["dtype"], rows={k: v["rows"] for k, v in splits.items()},
            computed_shards={k: v["computed"] for k, v in splits.items()}, shards_per_worker=result["workers"],
            requeued_shards=result["requeued"], retried_shards=result["retried"], actors=result["actors"],
            seconds=result["seconds"])
        return {"rows": sum(v["rows"] for v in splits.values()), "dim": result["dim"],
                "computed_shards": sum(v["computed"] for v in splits.values()),
                "written": str(self.exp.path("embeddings")), "images_per_s": result["images_per_s"]}
