"""Unit costs of the stages, measured here: the inputs of the scale model that come from
this machine (docs/scale.md).

    python -m benchmarks.unit_costs [--out runs/unit_costs.json] [--repeats 3]

Every unit runs on ONE torch thread, as one Ray actor does (one CPU each):
  - embed: one image through the quickstart backbone (ResNet-18, small stem, random init:
    the cost does not depend on the weights), batch 256, real Fashion-MNIST images;
  - rank: one target's ESVM with the batched solver, (a) at the quickstart size (500
    same-class negatives x 512 dims: the backbone's features of those real images) and
    (b) ImageNet-shaped (1300 negatives x 2048 dims, benchmarks.esvm_solvers' seeded
    synthetic class);
  - support: one retraining of the quickstart model (MLP, 5 epochs, 5,000 images).
Each unit is timed ``--repeats`` times after a warm-up; the median is reported, with the
load average before and after (the machine may be shared: treat the figures as upper
bounds of the cost on a quiet machine). The JSON goes to ``--out`` (runs/ is git-ignored).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _median_time(function, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure(repeats: int = 3, embed_images: int = 512, imagenet_targets: int = 50, progress: bool = True) -> dict:
    """Measure every unit; returns the JSON-ready record."""
    import torch
    from tqdm.auto import tqdm

    from attribution import embedding as emb
    from attribution import retrain
    from attribution.backbones import BackboneSpec
    from attribution.data import DatasetSpec
    from attribution.esvm import get_solver
    from benchmarks.esvm_solvers import imagenet_like_features

    torch.set_num_threads(1)  # one actor's share
    load_before = os.getloadavg()
    units: dict[str, dict] = {}
    bar = tqdm(total=5, desc="unit costs", disable=not progress, file=sys.stderr)

    # --- embed: the quickstart backbone on real images (quickstart subset, seed 0)
    train = DatasetSpec("fashion-mnist", "train", n_per_class=500, seed=0).load()
    test = DatasetSpec("fashion-mnist", "test", n_per_class=100, seed=0).load()
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1)
    model = emb.build_model(spec, 0, "cpu")
    positions = np.arange(min(embed_images, len(train)))
    emb.extract(model, train, positions[:32], 32)  # warm-up
    seconds, runs = _median_time(lambda: emb.extract(model, train, positions, 256), repeats)
    units["embed_image"] = {"seconds": seconds / len(positions), "per": "image",
                            "setting": f"ResNet-18 small stem, 28x28x1, batch 256, {len(positions)} images per run",
                            "runs_seconds": runs}
    bar.update()

    # --- rank: ESVM per target, quickstart size (class 0's 500 training images as negatives)
    label = 0
    negatives = emb.extract(model, train, np.flatnonzero(train.labels == label), 256)
    targets = emb.extract(model, test, np.flatnonzero(test.labels == label), 256)
    solver = get_solver("batched", device="cpu", num_threads=1)
    solver.decision_values(targets[:2], negatives)  # warm-up
    seconds, runs = _median_time(lambda: solver.decision_values(targets, negatives), repeats)
    units["esvm_target_quickstart"] = {"seconds": seconds / len(targets), "per": "target",
                                       "setting": f"batched solver, {len(negatives)} negatives x {negatives.shape[1]} "
                                                  f"dims, {len(targets)} targets per call",
                                       "runs_seconds": runs}
    bar.update()
    # --- rank: ImageNet-shaped
    targets, negatives = imagenet_like_features(n_targets=imagenet_targets)
    solver.decision_values(targets[:2], negatives)
    seconds, runs = _median_time(lambda: solver.decision_values(targets, negatives), repeats)
    units["esvm_target_imagenet"] = {"seconds": seconds / len(targets), "per": "target",
                                     "setting": f"batched solver, {len(negatives)} negatives x {negatives.shape[1]} "
                                                f"dims (synthetic ImageNet-shaped class), {len(targets)} targets per call",
                                     "runs_seconds": runs}
    bar.update()

    # --- support: one retraining of the quickstart model
    config = retrain.make_config("mlp", epochs=5, device="cpu")
    trainer = retrain.Retrainer.from_imageset(config, train)
    trainer.train(seed=0)  # warm-up
    bar.update()
    seconds, runs = _median_time(lambda: trainer.train(seed=1), repeats)
    units["retrain_quickstart"] = {"seconds": seconds, "per": "training",
                                   "setting": f"MLP 784-256-10, 5 epochs, batch {config.batch_size}, "
                                              f"{len(train)} images", "runs_seconds": runs}
    bar.update()
    bar.close()
    return {"measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": 1,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "repeats": repeats,
            "command": "python -m benchmarks.unit_costs " + " ".join(sys.argv[1:]), "units": units}


def format_table(record: dict) -> str:
    lines = [f"unit costs on {record['cpu_count']} CPUs, one torch thread, measured {record['measured']} "
             f"(load average {record['load_average_before'][0]} -> {record['load_average_after'][0]})",
             f"{'unit':26s} {'per':9s} {'seconds':>10s} {'per second':>11s}  setting"]
    for name, unit in record["units"].items():
        lines.append(f"{name:26s} {unit['per']:9s} {unit['seconds']:10.5f} {1 / unit['seconds']:11.1f}  "
                     f"{unit['setting']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/unit_costs.json", help="JSON output (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per unit; the median is kept")
    parser.add_argument("--embed-images", type=int, default=512, help="images per timed embedding run")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    from attribution.artifacts import write_json

    record = measure(args.repeats, args.embed_images, progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, record)
    print(format_table(record))
    print(f"# written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
