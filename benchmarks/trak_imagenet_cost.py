"""What TRAK costs on ImageNet, projected from a ratio measured here and published GPU speeds.

    python -m benchmarks.trak_imagenet_cost [--images 32] [--threads 2] [--checkpoints 20] [--proj-dim 4096]

Measured here, side by side in one run on the CPU (ResNet-18 of the imagenet preset's
recipe, 1,000 classes, 224 px, random weights: the cost does not depend on them):

- ``train``: one SGD step per batch (forward + backward + update), seconds per image;
- ``grads``: traker's per-example gradients of the margin (its ``featurize`` with the
  projection switched off: ``NoOpProjector`` is not usable at 11.7M dimensions, so the
  gradient part is timed through ``trak.gradient_computers.FunctionalGradientComputer``
  directly), seconds per image.

Projected (printed as a PROJECTION, not measured): featurizing one checkpoint on an A100 =
the per-image ratio grads / train x FFCV's published per-image training time (35 min for
16 epochs of 1.28M images), plus the random projection as dense FLOPs
(2 x parameters x proj_dim per image) at a stated fraction of the A100's TF32 peak; the
checkpoints' own training (FFCV); and the disk the features take (float32, traker keeps
one array per checkpoint).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

A100_TF32_TFLOPS = 156.0   # NVIDIA A100 datasheet, dense TF32 tensor-core peak
PROJECTION_EFFICIENCY = 0.3  # assumed fraction of that peak a projection kernel reaches


def measure(images: int, threads: int, batch: int = 16) -> dict:
    import torch
    from trak.gradient_computers import FunctionalGradientComputer
    from trak.modelout_functions import ImageClassificationModelOutput

    from attribution import retrain

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = retrain.build_model("resnet18", 1000, (224, 224, 3))
    x = torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rounds = max(1, images // batch)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    model.eval()
    computer = FunctionalGradientComputer(model=model, task=ImageClassificationModelOutput(), grad_dim=sum(
        p.numel() for p in model.parameters()), dtype=torch.float32, device="cpu")

    def grads_step():
        model.eval()  # as traker featurizes: BatchNorm in eval mode (vmap needs fixed statistics)
        computer.compute_per_sample_grad(batch=(x, y))

    out = {}
    for name, step in (("train", train_step), ("grads", grads_step)):
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(rounds):
            step()
        out[name] = (time.perf_counter() - start) / (rounds * batch)
    out["parameters"] = int(sum(p.numel() for p in model.parameters()))
    out["images"], out["threads"], out["batch"] = rounds * batch, threads, batch
    return out


def project(measured: dict, checkpoints: int, proj_dim: int, train_images: int = 1_281_167) -> list[str]:
    from attribution.published_costs import FFCV_SOURCE, resnet18_imagenet_minutes

    ratio = measured["grads"] / measured["train"]
    train_s_per_image = resnet18_imagenet_minutes(16) * 60 / (16 * train_images)  # FFCV: per image and epoch
    grads_min = ratio * train_s_per_image * train_images / 60
    flops = 2.0 * measured["parameters"] * proj_dim * train_images
    projection_min = flops / (A100_TF32_TFLOPS * 1e12 * PROJECTION_EFFICIENCY) / 60
    featurize_min = grads_min + projection_min
    training_min = resnet18_imagenet_minutes(16)
    storage_gb = train_images * proj_dim * 4 / 1e9
    return [
        f"measured here ({measured['images']} images, {measured['threads']} threads, batch {measured['batch']}): "
        f"training {measured['train'] * 1e3:.1f} ms/image, per-example gradients {measured['grads'] * 1e3:.1f} "
        f"ms/image: ratio {ratio:.2f}",
        f"PROJECTION (not measured) for ImageNet, {checkpoints} checkpoints, proj_dim {proj_dim}, one A100:",
        f"  per checkpoint: training {training_min:.0f} min ({FFCV_SOURCE}); per-example gradients "
        f"{grads_min:.1f} min (ratio x FFCV's {train_s_per_image * 1e6:.0f} us per image and epoch); projection "
        f"{projection_min:.1f} min ({flops / 1e15:.0f} PFLOP dense at {PROJECTION_EFFICIENCY:.0%} of "
        f"{A100_TF32_TFLOPS:.0f} TFLOPS TF32)",
        f"  all {checkpoints}: {checkpoints * (training_min + featurize_min) / 60:.1f} A100-hours "
        f"({checkpoints * training_min / 60:.1f} training, {checkpoints * featurize_min / 60:.1f} featurizing); "
        f"features {storage_gb:.0f} GB per checkpoint, {checkpoints * storage_gb / 1e3:.2f} TB in all (float32)",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="images timed per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--proj-dim", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.images < 1 or args.threads < 1 or args.checkpoints < 1 or args.proj_dim < 1:
        parser.error("--images, --threads, --checkpoints and --proj-dim must be >= 1")
    print("\n".join(project(measure(args.images, args.threads), args.checkpoints, args.proj_dim)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
