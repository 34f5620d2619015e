"""Published GPU times of the GPU retraining recipes: the one source of the scheduler
simulator (:mod:`cluster.simulate`) and of the cost checks that refuse a run whose
projected cost is out of proportion (the datamodels stage on ImageNet).

Nothing here is measured on this project's machines; each figure names its source.
Plain Python (no torch): the simulator imports it without a deep-learning stack.
"""

from __future__ import annotations

IMAGENET_TRAIN_IMAGES = 1_281_167

# FFCV's published ResNet-18 ImageNet training times on ONE A100 (minutes, per epoch
# count; top-1 in the comment): github.com/libffcv/ffcv-imagenet README, "Configurations".
FFCV_RESNET18_1xA100_MINUTES = {16: 35.0, 24: 51.6, 32: 68.9, 40: 85.5, 56: 119.4, 88: 187.3}
# top-1: 16 -> 0.669, 24 -> 0.688, 32 -> 0.700, 40 -> 0.706, 56 -> 0.713, 88 -> 0.724
FFCV_SOURCE = "FFCV ResNet-18 ImageNet, 1 x A100 (github.com/libffcv/ffcv-imagenet README table)"


def resnet18_imagenet_minutes(epochs: int, train_images: int = IMAGENET_TRAIN_IMAGES) -> float:
    """A100-minutes of one ResNet-18 training of ``epochs`` epochs on ``train_images``
    ImageNet images: FFCV's figure for that epoch count, else its per-epoch rate at the
    nearest published count, scaled linearly with the number of images."""
    if epochs < 1 or train_images < 1:
        raise ValueError(f"epochs and train_images must be >= 1, got {epochs}, {train_images}")
    if epochs in FFCV_RESNET18_1xA100_MINUTES:
        full = FFCV_RESNET18_1xA100_MINUTES[epochs]
    else:
        nearest = min(FFCV_RESNET18_1xA100_MINUTES, key=lambda e: abs(e - epochs))
        full = FFCV_RESNET18_1xA100_MINUTES[nearest] / nearest * epochs
    return full * train_images / IMAGENET_TRAIN_IMAGES


def datamodels_gpu_hours(models: int, alpha: float, epochs: int,
                         train_images: int = IMAGENET_TRAIN_IMAGES) -> float:
    """A100-hours of ``models`` ResNet-18 subset models, each on ``alpha`` of
    ``train_images`` ImageNet images (training time linear in the images seen)."""
    return models * resnet18_imagenet_minutes(epochs, max(1, int(round(alpha * train_images)))) / 60.0
