"""Backbones that map images to pooled feature vectors.

Contract used by every stage (embedding, pretraining, ablations)::

    spec = BackboneSpec(name="resnet18", small_stem=True, in_channels=1, checkpoint=None)
    model = load_backbone(spec)          # a FeatureExtractor (torch.nn.Module), eval mode
    x = model.preprocess(images_uint8_nhwc, data_mean, data_std)   # float tensor NCHW
    features = model(x)                  # (n, model.dim) float32

``preprocess`` owns channel adaptation, resizing and normalisation, so callers pass raw
uint8 pixels from :class:`attribution.data.ImageSet`.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Sequence

import numpy as np
import torch
from torch import nn

BACKBONES = ("resnet18", "resnet50")


@dataclass(frozen=True)
class BackboneSpec:
    name: str = "resnet18"
    small_stem: bool = False      # 3x3 stride-1 first conv and no max-pool, for 28/32 px images
    in_channels: int = 3          # 1 for grayscale models; 3-channel models get gray images repeated
    checkpoint: str | None = None  # path to a torchvision / MoCo / lightly / project checkpoint
    image_size: int | None = None  # resize inputs to this side (None: keep the dataset's size)
    normalize: str = "dataset"     # "dataset": the dataset's mean/std; "imagenet": ImageNet's

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureExtractor(nn.Module):
    """A trunk returning pooled features, plus the preprocessing it expects."""

    IMAGENET_MEAN = (0.485, 0.456, 0.406)
    IMAGENET_STD = (0.229, 0.224, 0.225)

    def __init__(self, trunk: nn.Module, dim: int, spec: BackboneSpec):
        super().__init__()
        self.trunk, self.dim, self.spec = trunk, dim, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def resnet_trunk(name: str, small_stem: bool, in_channels: int) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (global-average-pooled output)."""
    import torchvision

    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def load_backbone(spec: BackboneSpec) -> FeatureExtractor:
    trunk, dim = resnet_trunk(spec.name, spec.small_stem, spec.in_channels)
    model = FeatureExtractor(trunk, dim, spec)
    if spec.checkpoint:
        raise NotImplementedError("checkpoint loading is added by the backbones work")
    return model.eval()
