"""Does the removal test tell a good ranking from a random one? Recipes compared at equal cost.

    python -m benchmarks.removal_discrimination --per-class 300 --epochs 8 [--width 128]
        [--engine stacked --precision bf16] [--targets 10] [--json OUT]

For one retraining recipe (MLP, ``--epochs``, ``--per-class`` Fashion-MNIST training
images per class) and ``--targets`` seeded test images that three full-data models all
classify correctly, the top fraction f of the target's class is removed, ranked by
pixel-space l2 distance to the target (a ranking that should matter) or in a seeded
random order (one that should not), for f in 0.1, 0.2, 0.4, 0.6, 0.8, 1.0; the first f at
which at most half of three seeded retrainings still classify the target correctly is
that target's (coarse) removal support. Printed per target, then the median per ranking
and test accuracy. A recipe discriminates when l2's supports are well below random's and
below the whole class (f = 1.0, where every target flips by construction).

One plain process, one torch thread (the figures in docs/support.md come from this).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from attribution import retrain
from attribution.batched_retrain import Change
from attribution.data import load_dataset

FRACTIONS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


def first_flip(trainer, order, target_image, label, seeds) -> float | None:
    """The smallest fraction of ``order`` whose removal flips the target (mean correctness <= 0.5)."""
    for fraction in FRACTIONS:
        removed = order[:int(round(fraction * len(order)))]
        models = trainer.train_many([Change(removed_ids=removed, seed=s) for s in seeds])
        correct = [retrain.evaluate_target(trainer.logits(m, target_image[None])[0], label)[0] for m in models]
        if np.mean(correct) <= 0.5:
            return fraction
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--width", type=int, default=None, help="the MLP's hidden units (default 256)")
    parser.add_argument("--engine", default="module", choices=("module", "stacked"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--targets", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="the target draw")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train = load_dataset("fashion-mnist", "train", n_per_class=args.per_class, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=100, seed=0)
    config = retrain.make_config(args.model, epochs=args.epochs, width=args.width, engine=args.engine,
                                 precision=args.precision)
    trainer = retrain.Retrainer(config,
                                train.images(np.arange(len(train))), train.labels, train.ids, train.mean, train.std,
                                train.num_classes)
    pixels = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float32)
    test_images = test.images(np.arange(len(test)))
    seeds = [retrain.training_seed(0, i) for i in range(3)]
    start = time.perf_counter()
    full = np.stack([trainer.logits(m, test_images) for m in trainer.train_many([Change(seed=s) for s in seeds])])
    correct = (full.argmax(-1) == test.labels[None]).all(0)
    targets = np.random.default_rng(args.seed).permutation(np.flatnonzero(correct))[:args.targets]
    rows = []
    for position in targets.tolist():
        label = int(test.labels[position])
        same = np.flatnonzero(train.labels == label)
        distance = np.linalg.norm(pixels[same] - test_images[position].reshape(-1).astype(np.float32), axis=1)
        orders = {"l2": train.ids[same][np.argsort(distance, kind="stable")],
                  "random": train.ids[same][np.random.default_rng([args.seed, position]).permutation(len(same))]}
        row = {"target_id": int(test.ids[position])}
        row.update({name: first_flip(trainer, order, test_images[position], label, seeds)
                    for name, order in orders.items()})
        rows.append(row)
        print(row, flush=True)
    summary = {"model": args.model, "width": args.width, "engine": args.engine, "precision": args.precision,
               "per_class": args.per_class, "epochs": args.epochs, "targets": len(rows),
               "test_accuracy": float((full.argmax(-1) == test.labels[None]).mean()),
               "seconds": round(time.perf_counter() - start, 1)}
    for name in ("l2", "random"):
        values = [r[name] if r[name] is not None else np.inf for r in rows]
        summary[f"{name}_median_fraction"] = float(np.median(values))
        summary[f"{name}_below_whole_class"] = float(np.mean([v < 1.0 for v in values]))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"summary": summary, "targets": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
