"""Pretraining of a backbone: MoCo v2 self-supervised (He et al. 2020; Chen et al. 2020),
or supervised with labels (the supervised-features ablation).

The MoCo recipe, as in the paper this project benchmarks (a MoCo v2 ResNet-18 trained on
the training set itself), scaled to a CPU:

- two augmented views of each image; the query encoder (backbone + 2-layer MLP head)
  sees one, the key encoder (an exponential moving average of the query encoder, no
  gradients) sees the other;
- InfoNCE with temperature: the key of the same image is the positive, a FIFO queue of
  keys from earlier batches supplies the negatives;
- "shuffle BN" emulated on one device: keys are computed on a shuffled batch split into
  ``shuffle_bn_splits`` chunks, so BatchNorm statistics cannot leak which query matches
  which key (the shortcut multi-GPU MoCo blocks by shuffling across GPUs);
- MoCo v2 augmentations adapted to 28 px grayscale, done batched on tensors (cheap on a
  CPU): random resized crop (scale ``min_crop_scale``..1, aspect 3/4..4/3), horizontal
  flip (``flip_p``), brightness/contrast jitter (``jitter_p``). Colour-jitter of
  saturation/hue and random grayscale are meaningless for gray images and dropped;
  Gaussian blur is dropped as for CIFAR-sized MoCo/SimCLR recipes (at 28 px it erases
  most detail).

Defaults follow the MoCo CIFAR-10 demo for short schedules (momentum 0.99 rather than
0.999 so the key encoder keeps up within a few hundred steps; temperature 0.1; SGD lr
0.06, weight decay 5e-4, cosine schedule).

:class:`SupervisedPretrainer` trains the same backbone with a linear classifier and
cross-entropy on the labels, with everything else shared (:class:`Pretrainer`): the
same images in the same seeded order, the same augmentation (one view per image), the
same optimiser, schedule and step count.

Determinism: weights depend only on the settings and ``seed`` (for a given torch build
and thread count) when the run length is set in steps (``max_steps`` / ``epochs``). A
``time_budget_s`` is a safety cap: if it stops a run before its step count, the number
of steps depends on the machine's speed; ``stopped_by_`` is then ``"time_budget"`` and
the checkpoint records it with ``steps`` and ``planned_steps``.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attribution.backbones import BackboneSpec, FeatureExtractor, build_trunk, save_backbone_checkpoint
from attribution.data import ImageSet
from attribution.retrain import resolve_precision


# ----------------------------------------------------------------------------- augmentation


def moco_augment(x: torch.Tensor, generator: torch.Generator, out_size: int, min_crop_scale: float = 0.25,
                 flip_p: float = 0.5, jitter_p: float = 0.8, brightness: float = 0.4,
                 contrast: float = 0.4) -> torch.Tensor:
    """One random view of each image in ``x`` (float (n, C, H, W) in [0, 1]).

    Crop + resize + flip are one affine resampling (``grid_sample``), so a whole batch
    is augmented in a few tensor ops. Every random number is drawn for every image
    whether used or not, so the stream (and the result) depends only on the generator.
    """
    n, channels = x.shape[:2]

    def uniform(low=0.0, high=1.0):
        return low + (high - low) * torch.rand(n, generator=generator)

    area = uniform(min_crop_scale, 1.0)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    # keep the sampled area exact: limit the aspect ratio so that neither side exceeds the image
    ratio = torch.minimum(torch.maximum(ratio, area), 1 / area)
    w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # fractions of the image side
    cx, cy = (1 - w) * uniform(-1, 1), (1 - h) * uniform(-1, 1)  # crop centre, inside the image
    flip = torch.where(uniform() < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, [n, channels, out_size, out_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    apply = uniform() < jitter_p
    b = torch.where(apply, uniform(1 - brightness, 1 + brightness), torch.ones(n)).view(n, 1, 1, 1)
    c = torch.where(apply, uniform(1 - contrast, 1 + contrast), torch.ones(n)).view(n, 1, 1, 1)
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- model


class MocoNetwork(nn.Module):
    """Backbone + MoCo v2 projection head (Linear-ReLU-Linear), L2-normalised output.

    ``head_bn``: BatchNorm after each head layer (Linear-BN-ReLU-Linear-BN without affine,
    the MoCo v3 / SimCLR v2 head), which speeds up short schedules."""

    def __init__(self, encoder: FeatureExtractor, hidden_dim: int, proj_dim: int, head_bn: bool = False):
        super().__init__()
        self.encoder = encoder
        if head_bn:
            self.head = nn.Sequential(nn.Linear(encoder.dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                      nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim, bias=False),
                                      nn.BatchNorm1d(proj_dim, affine=False))
        else:
            self.head = nn.Sequential(nn.Linear(encoder.dim, hidden_dim), nn.ReLU(inplace=True),
                                      nn.Linear(hidden_dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)), dim=1)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: each query's positive is its own key (logit 0), the queue holds negatives."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


# ----------------------------------------------------------------------------- pretrainer


class Pretrainer:
    """The training loop both objectives share; ``fit(images)`` trains, ``save(path)`` writes.

    Parameters
    ----------
    backbone_spec : the backbone to pretrain (its ``checkpoint`` must be None: training
        starts from random initialisation). Default: ResNet-18, small stem, 1 channel.
    batch_size : images per step.
    lr, weight_decay : SGD (momentum 0.9) peak learning rate and weight decay; the lr
        warms up linearly for ``warmup_steps`` then follows a cosine to 0.
    epochs, max_steps : run length; the smaller of the two when both are set. 0 / None:
        unset. At least one of these or ``time_budget_s`` is required.
    time_budget_s : stop after this many seconds of training (None: no cap). With no step
        count set, the cosine schedule follows elapsed time instead of steps.
    min_crop_scale, flip_p, jitter_p : augmentation (:func:`moco_augment`): smallest crop
        area fraction, probability of a horizontal flip, of brightness/contrast jitter.
    precision : "bf16" runs the networks under bfloat16 autocast (the loss stays float32),
        about 2x faster on CPUs with native bf16 (AVX512-BF16/AMX), like mixed precision on
        GPUs; "fp32" disables it; "auto" picks bf16 where the CPU supports it natively.
    seed : seeds initialisation, sampling order and augmentations.
    num_threads : torch threads during fit (None: leave torch's setting).
    progress : show a tqdm bar of steps.
    """

    method = ""  # recorded in the checkpoint's pretrain record

    def __init__(self, backbone_spec: BackboneSpec | None = None, *, batch_size: int = 128,
                 lr: float = 0.06, weight_decay: float = 5e-4, epochs: int = 0, max_steps: int | None = None,
                 time_budget_s: float | None = None, min_crop_scale: float = 0.25, flip_p: float = 0.5,
                 jitter_p: float = 0.8, warmup_steps: int = 10, precision: str = "auto", seed: int = 0,
                 num_threads: int | None = None, progress: bool = True):
        self.backbone_spec = backbone_spec or BackboneSpec("resnet18", small_stem=True, in_channels=1)
        self.batch_size = batch_size
        self.lr, self.weight_decay = lr, weight_decay
        self.epochs, self.max_steps, self.time_budget_s = epochs, max_steps, time_budget_s
        self.min_crop_scale, self.flip_p, self.jitter_p = min_crop_scale, flip_p, jitter_p
        self.warmup_steps, self.precision, self.seed = warmup_steps, precision, seed
        self.num_threads, self.progress = num_threads, progress
        self._validate()

    def _check(self, ok, name, rule):
        if not ok:
            raise ValueError(f"{type(self).__name__}: {name} must be {rule}, got {getattr(self, name)!r}")

    def _validate(self) -> None:
        check = self._check
        check(isinstance(self.backbone_spec, BackboneSpec), "backbone_spec", "a BackboneSpec")
        check(self.backbone_spec.checkpoint is None, "backbone_spec",
              "a spec without checkpoint (pretraining starts from random weights)")
        check(self.backbone_spec.name != "efficientnet_lite0", "backbone_spec", "a ResNet spec")
        check(isinstance(self.batch_size, int) and self.batch_size >= 2, "batch_size", "an int >= 2")
        check(self.lr > 0, "lr", "> 0")
        check(self.weight_decay >= 0, "weight_decay", ">= 0")
        check(isinstance(self.epochs, int) and self.epochs >= 0, "epochs", "an int >= 0")
        check(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
              "max_steps", "None or an int >= 1")
        check(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s", "None or > 0")
        if not (self.epochs or self.max_steps or self.time_budget_s):
            raise ValueError(f"{type(self).__name__}: set at least one of epochs, max_steps or time_budget_s")
        check(0 < self.min_crop_scale <= 1, "min_crop_scale", "in (0, 1]")
        check(0 <= self.flip_p <= 1, "flip_p", "in [0, 1]")
        check(0 <= self.jitter_p <= 1, "jitter_p", "in [0, 1]")
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        check(self.precision in ("auto", "bf16", "fp32"), "precision", "'auto', 'bf16' or 'fp32'")
        check(self.num_threads is None or (isinstance(self.num_threads, int) and self.num_threads >= 1),
              "num_threads", "None or an int >= 1")

    def get_params(self) -> dict[str, Any]:
        """The settings that determine the result (not threads or the progress bar)."""
        return {"backbone_spec": self.backbone_spec.to_dict(), "batch_size": self.batch_size,
                "lr": self.lr, "weight_decay": self.weight_decay, "epochs": self.epochs,
                "max_steps": self.max_steps, "time_budget_s": self.time_budget_s,
                "min_crop_scale": self.min_crop_scale, "flip_p": self.flip_p, "jitter_p": self.jitter_p,
                "warmup_steps": self.warmup_steps, "precision": self.precision, "seed": self.seed}

    # -- what an objective defines

    def _build(self, encoder: FeatureExtractor, images: ImageSet) -> nn.Module:
        """The trained network around ``encoder`` (its parameters are optimised); called
        right after the seeded construction of ``encoder``."""
        raise NotImplementedError

    def _loss(self, network: nn.Module, pixels: np.ndarray, labels: np.ndarray, images: ImageSet,
              generator: torch.Generator, autocast) -> torch.Tensor:
        """The float32 loss of one batch (``pixels``: uint8 NHWC)."""
        raise NotImplementedError

    def _after_step(self, network: nn.Module) -> None:
        """Bookkeeping after the optimiser step (MoCo: the queue)."""

    # -- shared

    def _views(self, pixels: np.ndarray, mean, std, generator, count: int) -> tuple[torch.Tensor, ...]:
        """``count`` augmented, normalised views of a uint8 NHWC batch."""
        spec = self.backbone_spec
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1 and spec.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] == 3 and spec.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if spec.normalize == "imagenet":
            mean, std = FeatureExtractor.IMAGENET_MEAN, FeatureExtractor.IMAGENET_STD
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape[1] != x.shape[1]:  # gray statistics for a 3-channel model: same value per channel
            mean_t, std_t = mean_t.mean().expand(1, x.shape[1], 1, 1), std_t.mean().expand(1, x.shape[1], 1, 1)
        size = spec.image_size or x.shape[-1]
        views = [moco_augment(x, generator, size, self.min_crop_scale, flip_p=self.flip_p, jitter_p=self.jitter_p)
                 for _ in range(count)]
        return tuple(((v - mean_t) / std_t).contiguous(memory_format=torch.channels_last) for v in views)

    def _lr_at(self, progress: float) -> float:
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def planned_steps(self, n_images: int) -> int | None:
        """Steps the run is set to take on ``n_images`` (None: only the time budget ends it)."""
        steps_per_epoch = n_images // self.batch_size  # the last partial batch is dropped
        planned = [s for s in (self.max_steps, self.epochs * steps_per_epoch if self.epochs else None) if s]
        return min(planned) if planned else None

    def fit(self, images: ImageSet) -> "Pretrainer":
        """Train on ``images``. Sets ``encoder_`` (eval mode), ``steps_``, ``planned_steps_``,
        ``seconds_``, ``loss_history_``, ``stopped_by_`` ("max_steps", "epochs" or
        "time_budget": the cap ended the run before its step count), ``network_`` (the
        trained network, heads included)."""
        from tqdm.auto import tqdm

        n = len(images)
        if n < self.batch_size:
            raise ValueError(f"{type(self).__name__}: batch_size ({self.batch_size}) exceeds the {n} training images")
        previous_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            torch.manual_seed(self.seed)  # initial weights of backbone and heads (and MoCo's queue)
            trunk, dim = build_trunk(self.backbone_spec)
            # channels-last: oneDNN's convolutions on CPU run 5-10% faster in NHWC (measured)
            network = self._build(FeatureExtractor(trunk, dim, self.backbone_spec), images)
            network = network.to(memory_format=torch.channels_last)
            trained = [p for p in network.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(trained, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
            rng = np.random.default_rng(self.seed)  # epoch orders
            generator = torch.Generator().manual_seed(self.seed + 1)  # augmentations (and key shuffles)

            steps_per_epoch = n // self.batch_size  # the last partial batch is dropped
            total_steps = self.planned_steps(n)
            self.precision_ = resolve_precision(self.precision)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision_ == "bf16")
            network.train()
            losses: list[float] = []
            bar = tqdm(total=total_steps, desc=f"{self.method} pretraining", unit="step",
                       disable=not self.progress, mininterval=2.0)
            start = time.perf_counter()
            step, order = 0, np.empty(0, np.int64)
            stopped_by = "max_steps" if total_steps and total_steps == self.max_steps else "epochs"
            while True:
                elapsed = time.perf_counter() - start
                if total_steps is not None and step >= total_steps:
                    break
                if self.time_budget_s is not None and elapsed >= self.time_budget_s:
                    stopped_by = "time_budget"
                    break
                if step % steps_per_epoch == 0:
                    order = rng.permutation(n)
                offset = (step % steps_per_epoch) * self.batch_size
                batch = np.sort(order[offset:offset + self.batch_size])  # sorted: faster memmap reads

                progress = step / total_steps if total_steps else elapsed / self.time_budget_s
                lr = self._lr_at(progress)
                if step < self.warmup_steps:
                    lr *= (step + 1) / self.warmup_steps
                for group in optimizer.param_groups:
                    group["lr"] = lr

                loss = self._loss(network, images.images(batch), images.labels[batch], images, generator, autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self._after_step(network)
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{lr:.3g}")
            bar.close()
        finally:
            torch.set_num_threads(previous_threads)
        if step == 0:
            raise RuntimeError(f"{type(self).__name__}: time_budget_s={self.time_budget_s} ended before the first step")
        # back to the standard layout: the saved weights, and features computed from them, are
        # then those of any reloaded copy
        self.network_ = network.to(memory_format=torch.contiguous_format)
        self.encoder_ = network.encoder.eval()
        self.steps_, self.planned_steps_ = step, total_steps
        self.seconds_ = round(time.perf_counter() - start, 2)
        self.loss_history_, self.stopped_by_ = losses, stopped_by
        self.train_images_ = n
        return self

    def summary(self) -> dict[str, Any]:
        self._check_fitted()
        tail = self.loss_history_[-20:]
        return {"method": self.method, "steps": self.steps_, "planned_steps": self.planned_steps_,
                "seconds": self.seconds_, "stopped_by": self.stopped_by_, "precision": self.precision_,
                "train_images": self.train_images_, "first_loss": round(self.loss_history_[0], 4),
                "final_loss": round(float(np.mean(tail)), 4)}

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        """Write the pretrained backbone (project checkpoint format), atomically."""
        self._check_fitted()
        return save_backbone_checkpoint(self.encoder_, path,
                                        pretrain={"params": self.get_params(), **self.summary(),
                                                  **extra.pop("pretrain", {})},
                                        **extra)

    def _check_fitted(self):
        if not hasattr(self, "encoder_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(images) first")


class MocoPretrainer(Pretrainer):
    """MoCo v2 pretraining (labels unused). Parameters of :class:`Pretrainer`, and:

    queue_size : negatives kept from earlier batches.
    temperature : InfoNCE temperature.
    momentum : key encoder EMA coefficient (0.99 suits short runs; MoCo used 0.999).
    hidden_dim, proj_dim : projection head sizes (MoCo v2: 2048 -> 128 for ResNet-50).
    shuffle_bn_splits : chunks the shuffled key batch is split into (1: no shuffle BN).
    symmetric : both views serve as queries (each against the other's key; both keys are
        enqueued), as in the MoCo CIFAR demo and MoCo v3: twice the cost of a step, a
        gradient from every view.
    head_bn : BatchNorm in the projection head (:class:`MocoNetwork`).
    """

    method = "moco_v2"

    def __init__(self, backbone_spec: BackboneSpec | None = None, *, queue_size: int = 4096,
                 temperature: float = 0.1, momentum: float = 0.99, hidden_dim: int = 512, proj_dim: int = 128,
                 shuffle_bn_splits: int = 2, symmetric: bool = False, head_bn: bool = False, **shared: Any):
        self.queue_size, self.temperature, self.momentum = queue_size, temperature, momentum
        self.hidden_dim, self.proj_dim, self.shuffle_bn_splits = hidden_dim, proj_dim, shuffle_bn_splits
        self.symmetric, self.head_bn = symmetric, head_bn
        super().__init__(backbone_spec, **shared)

    def _validate(self) -> None:
        super()._validate()
        check = self._check
        check(isinstance(self.queue_size, int) and self.queue_size >= 1, "queue_size", "an int >= 1")
        check(0 < self.temperature <= 10, "temperature", "in (0, 10]")
        check(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        check(isinstance(self.shuffle_bn_splits, int) and 1 <= self.shuffle_bn_splits <= self.batch_size // 2,
              "shuffle_bn_splits", "an int in [1, batch_size // 2] (BatchNorm needs 2+ images per chunk)")
        check(isinstance(self.symmetric, bool), "symmetric", "True or False")
        check(isinstance(self.head_bn, bool), "head_bn", "True or False")

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "queue_size": self.queue_size, "temperature": self.temperature,
                "momentum": self.momentum, "hidden_dim": self.hidden_dim, "proj_dim": self.proj_dim,
                "shuffle_bn_splits": self.shuffle_bn_splits,
                # left out at their defaults: records of runs made before they existed stay equal
                **{k: v for k, v in (("symmetric", self.symmetric), ("head_bn", self.head_bn)) if v}}

    def _build(self, encoder: FeatureExtractor, images: ImageSet) -> nn.Module:
        query = MocoNetwork(encoder, self.hidden_dim, self.proj_dim, head_bn=self.head_bn)
        key = copy.deepcopy(query)
        for p in key.parameters():
            p.requires_grad_(False)
        self._queue = F.normalize(torch.randn(self.queue_size, self.proj_dim), dim=1)
        self._queue_ptr = 0
        return MocoPair(query, key)

    def _loss(self, network, pixels, labels, images, generator, autocast) -> torch.Tensor:
        v1, v2 = self._views(pixels, images.mean, images.std, generator, 2)
        query, key, queue = network.query, network.key, self._queue
        queries = (v1, v2) if self.symmetric else (v1,)
        with autocast:
            qs = [query(v) for v in queries]
        with torch.no_grad(), autocast:
            for pk, pq in zip(key.parameters(), query.parameters()):
                pk.mul_(self.momentum).add_(pq.detach(), alpha=1 - self.momentum)
            ks = [self._shuffled_keys(key, v, generator) for v in ((v2, v1) if self.symmetric else (v2,))]
        # the loss in float32: bf16 logits divided by a small temperature lose too much
        qs = [F.normalize(q.float(), dim=1) for q in qs]
        ks = [F.normalize(k.float(), dim=1) for k in ks]
        self._keys = torch.cat(ks).detach()
        return sum(info_nce(q, k, queue, self.temperature) for q, k in zip(qs, ks)) / len(qs)

    def _shuffled_keys(self, key: nn.Module, v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Keys of ``v`` computed on a shuffled batch in ``shuffle_bn_splits`` chunks, in ``v``'s order."""
        perm = torch.randperm(len(v), generator=generator)
        k = torch.cat([key(chunk) for chunk in v[perm].chunk(self.shuffle_bn_splits)])
        return k[torch.argsort(perm)]

    def _after_step(self, network) -> None:
        # enqueue the newest keys over the oldest (after backward: the loss's graph holds the queue)
        k = self._keys
        slots = (self._queue_ptr + torch.arange(len(k))) % self.queue_size
        self._queue[slots] = k[-self.queue_size:] if len(k) > self.queue_size else k
        self._queue_ptr = int((self._queue_ptr + len(k)) % self.queue_size)


class MocoPair(nn.Module):
    """Query and key encoders as one module (``encoder``: the query's backbone)."""

    def __init__(self, query: MocoNetwork, key: MocoNetwork):
        super().__init__()
        self.query, self.key = query, key

    @property
    def encoder(self) -> FeatureExtractor:
        return self.query.encoder


class ClassifierNetwork(nn.Module):
    """Backbone + linear classifier: the supervised-features ablation's network."""

    def __init__(self, encoder: FeatureExtractor, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


class SupervisedPretrainer(Pretrainer):
    """Cross-entropy on the labels, one augmented view per image; every other setting as
    :class:`Pretrainer` (the same images, order, augmentation, optimiser and steps as a
    MoCo run with the same settings). The classifier is dropped; the backbone is saved."""

    method = "supervised"

    def _build(self, encoder: FeatureExtractor, images: ImageSet) -> nn.Module:
        return ClassifierNetwork(encoder, images.num_classes)

    def _loss(self, network, pixels, labels, images, generator, autocast) -> torch.Tensor:
        (x,) = self._views(pixels, images.mean, images.std, generator, 1)
        with autocast:
            logits = network(x)
        return F.cross_entropy(logits.float(), torch.as_tensor(labels, dtype=torch.long))


PRETRAINERS = {"moco": MocoPretrainer, "supervised": SupervisedPretrainer}  # pretrain.objective -> class
