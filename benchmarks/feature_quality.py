"""k-NN feature quality of the backbones on the quickstart subsets.

    python3 -m benchmarks.feature_quality [--checkpoint PATH | --exp EXP] [--threads 1]

Embeds the preset's train subset (500/class) and test subset (100/class) of
Fashion-MNIST with each backbone and prints cosine k-NN (k=20) test accuracy:

- raw pixels (the floor any embedding should approach or beat);
- ResNet-18, small stem, random initialisation (seed 0);
- the MoCo v2 checkpoint: --checkpoint, or EXP/checkpoints/moco.pt made (or reused) by
  the preset's pretrain stage;
- EfficientNet-Lite0, ImageNet-supervised, images resized to 224 (slow on CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from attribution.backbones import BackboneSpec, load_backbone, spec_from_checkpoint
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.knn import extract_features, knn_accuracy, pixel_features
from attribution.presets import load_preset, parse_override


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--checkpoint", default=None, help="MoCo checkpoint to evaluate (default: pretrain one)")
    parser.add_argument("--exp", default="runs/feature-quality", help="where a pretrained checkpoint is made/reused")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared machine)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated rows to skip: pixels,random,moco,efficientnet")
    parser.add_argument("--fp32", action="store_true", help="extract features in float32 (default: bf16 autocast)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    data, seed = preset["data"], int(preset.get("seed", 0))
    root = data.get("root") or None
    train = load_dataset(data["dataset"], "train", root=root, n_per_class=data["train_per_class"], seed=seed)
    test = load_dataset(data["dataset"], "test", root=root, n_per_class=data["test_per_class"], seed=seed)
    print(f"{data['dataset']}: {len(train)} train, {len(test)} test images; cosine k-NN, k={args.k}", flush=True)

    results = []

    def report(name, train_x, test_x, seconds, note=""):
        weighted = knn_accuracy(train_x, train.labels, test_x, test.labels, k=args.k)
        uniform = knn_accuracy(train_x, train.labels, test_x, test.labels, k=args.k, weighting="uniform")
        results.append({"features": name, "dim": int(train_x.shape[1]), "knn_weighted": weighted,
                        "knn_uniform": uniform, "seconds": round(seconds, 1), "note": note})
        print(f"  {name:<34} dim {train_x.shape[1]:>5}  k-NN {weighted:.3f} (uniform votes {uniform:.3f})"
              f"  {seconds:6.1f} s {note}", flush=True)

    def embed(model):
        start = time.perf_counter()
        bf16 = not args.fp32
        out = (extract_features(model, train, bf16=bf16), extract_features(model, test, bf16=bf16))
        return out + (time.perf_counter() - start,)

    if "pixels" not in skip:
        start = time.perf_counter()
        report("raw pixels", pixel_features(train), pixel_features(test), time.perf_counter() - start)
    if "random" not in skip:
        torch.manual_seed(0)
        report("resnet18 small-stem, random init", *embed(load_backbone(
            BackboneSpec("resnet18", small_stem=True, in_channels=train.image_shape[-1]))))
    if "moco" not in skip:
        note = ""
        path = args.checkpoint
        if path is None:
            from attribution.stages import parse_settings, stage_class

            summary = stage_class("pretrain")(Experiment(args.exp).create(), parse_settings(preset))()
            path = summary["checkpoint"]
            note = (f"({'reused' if summary['reused'] else 'trained'}: {summary.get('steps')} steps, "
                    f"{summary.get('seconds')} s, stopped by {summary.get('stopped_by')})")
        report("resnet18 small-stem, MoCo v2", *embed(load_backbone(spec_from_checkpoint(path))), note)
    if "efficientnet" not in skip:
        report("efficientnet_lite0 ImageNet, 224 px", *embed(load_backbone(BackboneSpec("efficientnet_lite0"))))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
