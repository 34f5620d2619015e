"""Retraining for counterfactual support: models, recipes, training with removed or
relabelled training images (by id), target evaluation, and the full-data ensemble.

Models: ResNet-9 (the reference CIFAR-10 retraining model), MobileNetV2 (the
architecture-transfer ablation, torchvision), ResNet-18 (ImageNet retraining,
torchvision), and for CPU runs on Fashion-MNIST a small CNN and an MLP. A recipe (:class:`TrainConfig`) fixes model, optimiser and
schedule; ``RECIPES`` holds the reference CIFAR-10 recipe and the small CPU ones.

A :class:`Retrainer` converts the training images to a normalised tensor ONCE (per
process / Ray worker; sets too large for memory, such as ImageNet, are read batch by
batch from their files instead) and then trains any number of models on variants of that set:
``train(removed_ids, relabel_ids, relabel_to, seed)``. Training is deterministic per
seed on CPU with a fixed thread count (initial weights, batch order and augmentation
all come from generators seeded by ``seed``), so a training repeated after a crash
gives the same outcome.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attribution.workqueue import NotRetried

# ----------------------------------------------------------------------------- errors


class RetrainInputError(NotRetried, ValueError):
    """A retraining's input is wrong (ids, relabel class, shapes, an empty training set).

    Training is deterministic, so the same item fails the same way on every attempt:
    a :class:`attribution.workqueue.NotRetried`, failed at once instead of retried."""


class UnknownIds(RetrainInputError, KeyError):
    """Ids that are not in the training set (also a KeyError, as lookups raise)."""

    __str__ = Exception.__str__  # the message itself, not KeyError's quoted repr of it


class EmptyTrainingSet(RetrainInputError):
    """Every training image was removed: there is nothing to train on."""


# ----------------------------------------------------------------------------- models


def _conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.block(x)


class ResNet9(nn.Module):
    """The ResNet-9 of the fast CIFAR-10 recipes (Page 2018; used by the reference's retraining)."""

    def __init__(self, num_classes=10, in_channels=3, width=64, scale=0.125):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale  # logit scaling of the reference recipe

    def forward(self, x):
        return self.fc(self.net(x)) * self.scale


class SmallCNN(nn.Module):
    """conv16-pool-conv32-pool-fc: the Fashion-MNIST CNN of the CPU presets."""

    def __init__(self, num_classes=10, in_channels=1, image_size=28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(32 * (image_size // 4) ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class MLP(nn.Module):
    """784-256-10 (for 28x28x1 inputs): the fastest CPU model."""

    def __init__(self, num_classes=10, in_features=784, hidden=256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def _mobilenet_v2(num_classes, in_channels):
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    # Small (32x32) inputs: a stride-1 stem as in the CIFAR adaptations used for the ablation.
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, stride=1, padding=1, bias=False)
    return model


def _resnet18(num_classes, in_channels, image_size):
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if image_size <= 64:  # CIFAR-sized inputs: 3x3 stride-1 stem, no max-pool
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


MODELS = ("resnet9", "mobilenetv2", "resnet18", "cnn", "mlp")


def build_model(name: str, num_classes: int, image_shape: Sequence[int], width: int | None = None) -> nn.Module:
    """A freshly initialised model for images shaped (H, W, C); ``width``: the MLP's
    hidden units (None: 256)."""
    h, w, c = image_shape
    if width is not None and name != "mlp":
        raise RetrainInputError(f"width sets the MLP's hidden units; model {name!r} has no width setting: unset it")
    if name == "resnet9":
        return ResNet9(num_classes, c)
    if name == "mobilenetv2":
        return _mobilenet_v2(num_classes, c)
    if name == "resnet18":
        return _resnet18(num_classes, c, min(h, w))
    if name == "cnn":
        if h != w:
            raise RetrainInputError(f"the small CNN needs square images, got {h}x{w}: use model 'mlp' or 'resnet9'")
        return SmallCNN(num_classes, c, h)
    if name == "mlp":
        return MLP(num_classes, h * w * c, 256 if width is None else int(width))
    raise RetrainInputError(f"model must be one of {MODELS}, got {name!r}")


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TrainConfig:
    """One retraining recipe.

    schedule: "triangular" (linear warm-up over ``warmup_epochs`` to ``lr``, then linear
    decay to 0: the reference CIFAR-10 recipe) or "onecycle" (torch's OneCycleLR, peak
    ``lr``). ``augment``: "none" or "flip_translate_cutout" (reference CIFAR-10).

    ``width``: the MLP's hidden units (None: 256).
    ``engine``: "module" (one ``nn.Module`` at a time, torch.optim) or "stacked" (many
    models at once in one process with stacked weights: :mod:`attribution.batched_retrain`;
    MLP only). ``precision``: "fp32", or "bf16" (bfloat16 matrix products, fp32 master
    weights: on CPU, torch's bf16 autocast in the module engine, bf16 ``bmm`` in the
    stacked one). Both change a model's bits, so both are in the fingerprint. ``make_config``
    also takes "auto" (bf16 where the device has it natively, else fp32) and resolves it, so a
    config and its fingerprint always name the precision that ran.
    """

    model: str = "mlp"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"
    mixed_precision: bool = False
    device: str = "cpu"
    engine: str = "module"
    precision: str = "fp32"
    width: int | None = None

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.schedule not in ("triangular", "onecycle", "constant"):
            raise ValueError(f"schedule must be triangular, onecycle or constant, got {self.schedule!r}")
        if self.augment not in ("none", "flip_translate_cutout"):
            raise ValueError(f"augment must be 'none' or 'flip_translate_cutout', got {self.augment!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.width is not None and (self.model != "mlp" or int(self.width) < 1):
            raise ValueError(f"width (the MLP's hidden units) must be an integer >= 1 and needs model 'mlp', got "
                             f"width={self.width!r} with model {self.model!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "stacked":
            from attribution.batched_retrain import check_stackable

            check_stackable(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Short hash of everything that changes a trained model (not the device).
        ``engine``, ``precision`` and ``width`` count only when not the defaults, so recipes made
        before they existed (the module engine in fp32) keep their fingerprints."""
        defaults = {"engine": "module", "precision": "fp32", "width": None}
        fields = {k: v for k, v in asdict(self).items() if k != "device" and defaults.get(k, object()) != v}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


ENGINES = ("module", "stacked")
PRECISIONS = ("fp32", "bf16")

RECIPES: dict[str, TrainConfig] = {
    # Reference CIFAR-10 retraining (Singla et al. / the fast ResNet-9 recipe).
    "cifar10-resnet9": TrainConfig(model="resnet9", epochs=24, batch_size=512, lr=0.5, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4, schedule="triangular", warmup_epochs=5, label_smoothing=0.1,
                                   augment="flip_translate_cutout", mixed_precision=True, device="cuda"),
    # Architecture-transfer ablation: same recipe, MobileNetV2.
    "cifar10-mobilenetv2": TrainConfig(model="mobilenetv2", epochs=24, batch_size=512, lr=0.5, momentum=0.9,
                                       nesterov=True, weight_decay=5e-4, schedule="triangular", warmup_epochs=5,
                                       label_smoothing=0.1, augment="flip_translate_cutout", mixed_precision=True,
                                       device="cuda"),
    # ImageNet retraining (the reference uses FFCV's ResNet-18 recipe): 16 epochs, batch
    # 1024, SGD, label smoothing 0.1, linear warm-up then decay, lr 0.5 x batch/256 = 2.0,
    # weight decay 5e-5. Differences from FFCV: fixed 224 px centre crops from the
    # ImageSet (no progressive resizing, no random-resized-crop, no blurpool).
    "imagenet-resnet18": TrainConfig(model="resnet18", epochs=16, batch_size=1024, lr=2.0, momentum=0.9,
                                     nesterov=True, weight_decay=5e-5, schedule="triangular", warmup_epochs=2,
                                     label_smoothing=0.1, augment="flip_translate_cutout", mixed_precision=True,
                                     device="cuda"),
    # CPU: ~0.7 s per model on 5000 Fashion-MNIST images, test accuracy ~0.85.
    "fmnist-mlp": TrainConfig(model="mlp", epochs=10, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4, schedule="onecycle"),
    # The same MLP recipe trained many models at once (attribution/batched_retrain.py):
    # fp32, and bf16 matrix products (fp32 master weights). Figures in docs/support.md.
    "fmnist-mlp-stacked": TrainConfig(model="mlp", epochs=10, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                                      weight_decay=5e-4, schedule="onecycle", engine="stacked"),
    "fmnist-mlp-bf16": TrainConfig(model="mlp", epochs=10, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4, schedule="onecycle", engine="stacked", precision="bf16"),
    # CPU: ~3 s per model, accuracy ~0.87.
    "fmnist-cnn": TrainConfig(model="cnn", epochs=5, batch_size=128, lr=0.05, momentum=0.9, nesterov=True,
                              weight_decay=5e-4, schedule="onecycle"),
}

# preset model name -> recipe
MODEL_RECIPES = {"mlp": "fmnist-mlp", "cnn": "fmnist-cnn", "resnet9": "cifar10-resnet9",
                 "mobilenetv2": "cifar10-mobilenetv2", "resnet18": "imagenet-resnet18"}


def make_config(model: str = "mlp", resolve_device: bool = True, **overrides) -> TrainConfig:
    """The recipe for ``model`` (a model name or a RECIPES key) with explicit overrides.

    ``resolve_device``: fall back to CPU when the recipe asks for CUDA and this process
    has none (False for a driver configuring GPU workers it does not share hardware with).
    """
    name = MODEL_RECIPES.get(model, model)
    if name not in RECIPES:
        raise ValueError(f"unknown model/recipe {model!r}; choose one of {sorted(RECIPES) + sorted(MODEL_RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)}; known: {sorted(TrainConfig.__dataclass_fields__)}")
    auto = overrides.get("precision") == "auto"
    if auto:
        del overrides["precision"]
    config = replace(RECIPES[name], **overrides)
    if resolve_device and config.device.startswith("cuda") and not torch.cuda.is_available():
        config = replace(config, device="cpu", mixed_precision=False)  # same recipe, CPU fallback
    if auto:
        config = replace(config, precision=resolve_precision("auto", config.device))
    elif config.precision == "bf16" and not native_bf16(config.device):
        warnings.warn(f"precision 'bf16' on {config.device!r} without native bfloat16: it is emulated, ~14x slower "
                      f"than fp32 for the stacked MLP on an AVX2-only CPU; set precision = 'auto' (bf16 only "
                      f"where native) or 'fp32'", RuntimeWarning, stacklevel=2)
    return config


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (AVX512_BF16 / AMX on CPU)."""
    if str(device).startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """'auto' -> 'bf16' where ``device`` has native bfloat16, else 'fp32' (emulated bf16 is
    far slower than fp32: a group of 16 stacked quickstart MLPs took 49 s vs 3.6 s on an
    AVX2-only EPYC)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def training_seed(base_seed: int, seed_index: int) -> int:
    """Torch seed of seed index ``seed_index``: the same for every k, target and method.

    Common random numbers: the models at different k differ only by the data change,
    which keeps the seed noise from making the flip test non-monotone in k.
    """
    return int(np.random.SeedSequence([int(base_seed), int(seed_index)]).generate_state(1)[0])


# ----------------------------------------------------------------------------- training


def to_tensor(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def _augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2, cutout: int = 8) -> torch.Tensor:
    """Random horizontal flip, translation by up to ``pad`` pixels, cutout (reference CIFAR-10)."""
    n, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(dev).view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(dev)
    rows = (dy.view(-1, 1) + torch.arange(h, device=dev).view(1, -1))  # n x h
    cols = (dx.view(-1, 1) + torch.arange(w, device=dev).view(1, -1))  # n x w
    idx_n = torch.arange(n, device=dev).view(-1, 1, 1)
    x = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if cutout:
        cy = torch.randint(0, h, (n,), generator=generator).to(dev).view(-1, 1, 1)
        cx = torch.randint(0, w, (n,), generator=generator).to(dev).view(-1, 1, 1)
        yy = torch.arange(h, device=dev).view(1, -1, 1)
        xx = torch.arange(w, device=dev).view(1, 1, -1)
        hole = ((yy - cy).abs() <= cutout // 2) & ((xx - cx).abs() <= cutout // 2)
        x = x * (~hole).unsqueeze(1)
    return x.contiguous()


def _lr_lambda(config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warm = max(1, int(round(config.warmup_epochs * steps_per_epoch)))

    def triangular(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return triangular


@dataclass
class TrainingSet:
    """The effective training set of one retraining: positions kept and their labels."""

    positions: np.ndarray
    labels: np.ndarray


class Retrainer:
    """Trains models on variants of one training set held as a tensor.

    Parameters
    ----------
    config : TrainConfig
    images : uint8 array (N, H, W, C), held as one normalised tensor; or an ImageSet
        (``images(positions)``, e.g. ImageNet files) read batch by batch, for training
        sets too large to hold (every worker node must see the same files)
    labels, ids : arrays of length N (ids are the dataset's stable ids)
    mean, std : per-channel normalisation
    num_classes : int
    """

    def __init__(self, config: TrainConfig, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                 mean: Sequence[float], std: Sequence[float], num_classes: int = 10):
        if not (len(images) == len(labels) == len(ids)):
            raise RetrainInputError(f"{len(images)} images, {len(labels)} labels, {len(ids)} ids: must match")
        if len(np.unique(ids)) != len(ids):
            raise RetrainInputError("training ids must be unique")
        self.config = config
        self.device = torch.device(config.device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = int(num_classes)
        if isinstance(images, np.ndarray):
            self.image_shape = tuple(images.shape[1:])
            self.x = to_tensor(images, mean, std).to(self.device)  # converted once, reused by every training
            self.image_source = None
        else:
            self.image_shape = tuple(images.image_shape)
            self.x = None
            self.image_source = images  # decoded per batch
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[self._order]
        self._stacked = None  # the stacked engine's trainer, made on first use

    @classmethod
    def from_imageset(cls, config: TrainConfig, data) -> "Retrainer":
        images = data.images(np.arange(len(data))) if data.in_memory else data
        return cls(config, images, data.labels, data.ids, data.mean, data.std, data.num_classes)

    def images_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Normalised images at ``positions`` (indexes of the full training set) on the
        device: rows of the held tensor, or decoded from the files batch by batch."""
        if self.x is not None:
            return self.x[positions.to(self.device)]
        pixels = self.image_source.images(positions.numpy())
        return to_tensor(pixels, self.mean, self.std).to(self.device, non_blocking=True)

    def positions_of(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return np.zeros(0, dtype=np.int64)
        where = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(ids) and len(self._sorted_ids) - 1)
        found = self._sorted_ids[where] == ids
        if not found.all():
            raise UnknownIds(f"ids not in the training set: {ids[~found][:10].tolist()} "
                           "(rankings and the [data] section must describe the same training subset)")
        return self._order[where]

    def training_set(self, removed_ids=(), relabel_ids=(), relabel_to: int | None = None) -> TrainingSet:
        """Positions and labels a training uses after the removals and relabels."""
        labels = self.labels.copy()
        relabel_pos = self.positions_of(relabel_ids)
        if len(relabel_pos):
            if relabel_to is None or not (0 <= int(relabel_to) < self.num_classes):
                raise RetrainInputError(f"relabel_to must be a class in [0, {self.num_classes}), got {relabel_to}")
            labels[relabel_pos] = int(relabel_to)
        keep = np.ones(len(labels), dtype=bool)
        keep[self.positions_of(removed_ids)] = False
        positions = np.flatnonzero(keep)
        return TrainingSet(positions, labels[positions])

    def checked_training_set(self, removed_ids=(), relabel_ids=(), relabel_to: int | None = None) -> TrainingSet:
        """:meth:`training_set`, refusing one with no image left (:class:`EmptyTrainingSet`)."""
        subset = self.training_set(removed_ids, relabel_ids, relabel_to)
        if len(subset.positions) == 0:
            raise EmptyTrainingSet(f"every one of the {len(self.labels)} training images was removed: nothing to "
                                   "train on (a retraining must keep at least one image)")
        return subset

    def train(self, removed_ids=(), relabel_ids=(), relabel_to: int | None = None, seed: int = 0,
              on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
        """A model trained from scratch on the changed training set; deterministic per ``seed``
        (with the stacked engine: a group of one, the same model it is in any group).
        ``on_epoch(epoch, model)`` after every epoch (1-based; the module engine only): the
        trajectory's checkpoints, e.g. for TracInCP."""
        if self.config.engine == "stacked":
            if on_epoch is not None:
                raise ValueError("on_epoch needs the module engine (engine = \"module\"); the stacked engine "
                                 "trains many models at once and keeps no per-epoch states")
            from attribution.batched_retrain import Change

            return self.train_many([Change(removed_ids, relabel_ids, relabel_to, seed)])[0]
        config = self.config
        subset = self.checked_training_set(removed_ids, relabel_ids, relabel_to)
        torch.manual_seed(seed)
        model = build_model(config.model, self.num_classes, self.image_shape, config.width).to(self.device)
        generator = torch.Generator().manual_seed(seed)
        positions = torch.from_numpy(subset.positions)
        targets_all = torch.from_numpy(subset.labels).to(self.device)
        n = len(positions)
        steps_per_epoch = math.ceil(n / config.batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
        if config.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                            total_steps=config.epochs * steps_per_epoch)
        elif config.schedule == "triangular":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))
        else:
            scheduler = None
        bf16 = config.precision == "bf16"
        use_amp = bf16 or (config.mixed_precision and self.device.type == "cuda")
        amp_dtype = torch.bfloat16 if bf16 else None  # None: the device's autocast default (fp16 on CUDA)
        scaler = torch.amp.GradScaler("cuda") if use_amp and not bf16 else None
        model.train()
        for epoch in range(config.epochs):
            if on_epoch is not None and epoch:
                model.eval()
                on_epoch(epoch, model)
                model.train()
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, config.batch_size):
                batch = perm[start:start + config.batch_size]
                x = self.images_at(positions[batch])
                y = targets_all[batch.to(self.device)]
                if config.augment != "none":
                    x = _augment(x, generator)
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if scheduler is not None:
                    scheduler.step()
        model.eval()
        if on_epoch is not None:
            on_epoch(config.epochs, model)
        return model

    def train_many(self, changes: Sequence) -> list[nn.Module]:
        """One model per change (:class:`attribution.batched_retrain.Change`: removed_ids,
        relabel_ids, relabel_to, seed), in order. The stacked engine trains them all at
        once; each is bitwise the model it would be alone or in any other group. Every
        change is validated before any training. The module engine trains them one by one."""
        if self.config.engine == "stacked":
            from attribution.batched_retrain import StackedMLPTrainer

            if self._stacked is None:
                self._stacked = StackedMLPTrainer(self)
            return self._stacked.train(changes)
        for change in changes:  # validate all first: a bad change costs no model
            self.checked_training_set(change.removed_ids, change.relabel_ids, change.relabel_to)
        return [self.train(c.removed_ids, c.relabel_ids, c.relabel_to, c.seed) for c in changes]

    @torch.no_grad()
    def logits(self, model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
        """Logits (n, C) for uint8 NHWC images (or an already normalised tensor)."""
        x = images if isinstance(images, torch.Tensor) else to_tensor(images, self.mean, self.std)
        out = [model(x[i:i + batch_size].to(self.device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.num_classes), np.float32)


def evaluate_target(logits: np.ndarray, label: int) -> tuple[bool, float]:
    """(correct, margin) of one target from its logits: margin = true logit - max other."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    others = np.delete(logits, int(label))
    margin = float(logits[int(label)] - others.max())
    return bool(margin > 0), margin


def train_model(config: TrainConfig, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                removed_ids=(), relabel_ids=(), flip_class: int | None = None, seed: int = 0,
                mean=(0.5,), std=(0.5,), num_classes: int = 10) -> nn.Module:
    """One-off training (builds a :class:`Retrainer`; loops should keep one instead)."""
    trainer = Retrainer(config, images, labels, ids, mean, std, num_classes)
    return trainer.train(removed_ids, relabel_ids, flip_class, seed)


# ----------------------------------------------------------------------------- ensemble


TARGET_STATUS = ("searched", "misclassified", "unstable")


@dataclass
class EnsembleResult:
    """Full-data ensemble on the targets: logits (models, targets, classes)."""

    target_ids: np.ndarray
    labels: np.ndarray
    logits: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        """(models, targets) bool."""
        return self.logits.argmax(-1) == self.labels[None, :]

    @property
    def correct_fraction(self) -> np.ndarray:
        return self.correct.mean(0)

    @property
    def flip_classes(self) -> np.ndarray:
        return flip_classes(self.logits, self.labels)

    @property
    def status(self) -> np.ndarray:
        """"searched" (every model correct), "misclassified" (none), "unstable" (seeds disagree)."""
        frac = self.correct_fraction
        return np.where(frac == 1.0, "searched", np.where(frac == 0.0, "misclassified", "unstable"))

    def table(self) -> dict:
        return {"target_id": self.target_ids.astype(np.int64), "label": self.labels.astype(np.int64),
                "flip_class": self.flip_classes.astype(np.int64),
                "ensemble_correct": self.correct_fraction.astype(np.float32), "status": self.status.astype(str)}


def flip_classes(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The class the ensemble ranks second for each target (first if second is the label).

    ``logits``: (models, targets, classes); the ensemble ranks classes by mean softmax
    probability over the models.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 2:
        logits = logits[None]
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    mean = probs.mean(0)
    order = np.argsort(-mean, axis=1, kind="stable")
    first, second = order[:, 0], order[:, 1]
    labels = np.asarray(labels, dtype=np.int64)
    return np.where(second == labels, first, second)


def full_data_ensemble(trainer: Retrainer, target_images: np.ndarray, target_labels: np.ndarray,
                       target_ids: np.ndarray, n_models: int = 5, base_seed: int = 0) -> EnsembleResult:
    """Train ``n_models`` full-data models (seed indices 0..n-1) in this process."""
    logits = []
    for index in range(n_models):
        model = trainer.train(seed=training_seed(base_seed, index))
        logits.append(trainer.logits(model, target_images))
    return EnsembleResult(np.asarray(target_ids), np.asarray(target_labels), np.stack(logits))


def timed_train_and_evaluate(trainer: Retrainer, target_image: np.ndarray, target_label: int,
                             removed_ids=(), relabel_ids=(), relabel_to=None, seed: int = 0) -> dict:
    """Train one model and evaluate one target: {correct, margin, seconds}."""
    start = time.perf_counter()
    model = trainer.train(removed_ids, relabel_ids, relabel_to, seed)
    correct, margin = evaluate_target(trainer.logits(model, target_image[None])[0], target_label)
    return {"correct": correct, "margin": margin, "seconds": time.perf_counter() - start}
