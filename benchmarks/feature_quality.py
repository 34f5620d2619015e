"""k-NN feature quality of the backbones on the quickstart subsets, side by side.

    python3 -m benchmarks.feature_quality [--exp EXP] [--checkpoint PATH] [--threads 1]
                                          [--skip pixels,random,moco,supervised,efficientnet]

Embeds the preset's train subset (quickstart: 300/class) and test subset (100/class) of
Fashion-MNIST with each backbone and prints one table of cosine k-NN (k=20) test
accuracy (train subset -> test subset):

- raw pixels (the floor a useful embedding must beat);
- the preset's [pretrain] backbone at random initialisation (torch seed = preset seed);
- that backbone pretrained with MoCo v2: --checkpoint, or EXP/checkpoints/moco.pt made
  (or reused) by the preset's pretrain stage;
- the same backbone trained supervised (cross-entropy with the labels of the same images,
  same augmentation, order and step count: ``pretrain.objective = "supervised"``), made
  or reused in EXP-supervised; the paper's supervised-features ablation;
- EfficientNet-Lite0, ImageNet-supervised, images resized to 224 (slow on CPU).

Each ResNet row is shown with every feature tap of the embed stage (``[embed] features``):
"pooled" (the global-average-pooled last stage), "grid" (the third stage pooled to an
N x N grid) and "grid2" (the second stage pooled to N x N), N = the preset's embed.grid.

Pretraining runs with the preset's pretrain.threads; --threads is for feature extraction.
The trained rows note their steps, seconds and what stopped them (a "time_budget" stop
means the cap cut the run short of its step count).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

from attribution.backbones import FEATURE_TAPS, BackboneSpec, load_backbone, spec_from_checkpoint
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.knn import extract_features, knn_accuracy, pixel_features
from attribution.presets import load_preset, parse_override

ROWS = ("pixels", "random", "moco", "supervised", "efficientnet")


def pretrained(preset: dict, exp: str, objective: str) -> tuple[str, str]:
    """(checkpoint path, note) of the preset's pretrain stage with ``objective`` in ``exp``."""
    from attribution.stages import parse_settings, stage_class

    preset = copy.deepcopy(preset)
    preset["pretrain"]["objective"] = objective
    summary = stage_class("pretrain")(Experiment(exp).create(), parse_settings(preset))()
    planned = summary.get("planned_steps")
    note = (f"{'reused' if summary['reused'] else 'trained'}: {summary.get('steps')}"
            f"{f'/{planned}' if planned else ''} steps, {summary.get('seconds')} s, "
            f"stopped by {summary.get('stopped_by')}")
    return summary["checkpoint"], note


def describe(spec: BackboneSpec) -> str:
    stem = f"small stem /{spec.stem_stride}" if spec.small_stem else "stem 7x7/2"
    return f"{spec.name} w{spec.width} {stem}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--checkpoint", default=None, help="MoCo checkpoint to evaluate (default: pretrain one)")
    parser.add_argument("--exp", default="runs/feature-quality",
                        help="where the MoCo checkpoint is made/reused (the supervised one: EXP-supervised)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for feature extraction (1 is robust on a shared machine)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--skip", default="", help=f"comma-separated rows to skip: {','.join(ROWS)}")
    parser.add_argument("--fp32", action="store_true", help="extract features in float32 (default: bf16 autocast)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(ROWS):
        parser.error(f"--skip: unknown rows {sorted(skip - set(ROWS))}; known: {','.join(ROWS)}")

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    data, seed = preset["data"], int(preset.get("seed", 0))
    root = data.get("root") or None
    train = load_dataset(data["dataset"], "train", root=root, n_per_class=data["train_per_class"], seed=seed)
    test = load_dataset(data["dataset"], "test", root=root, n_per_class=data["test_per_class"], seed=seed)
    print(f"{data['dataset']}: {len(train)} train, {len(test)} test images; cosine k-NN, k={args.k}", flush=True)

    from attribution.stages.pretrain import PretrainSettings

    backbone = PretrainSettings.from_preset(preset).backbone_spec(in_channels=train.image_shape[-1])
    grid = int(preset.get("embed", {}).get("grid", 4))  # the embed stage's grid pooling (--set embed.grid=N)
    results = []

    def report(name, train_x, test_x, seconds, note=""):
        weighted = knn_accuracy(train_x, train.labels, test_x, test.labels, k=args.k)
        uniform = knn_accuracy(train_x, train.labels, test_x, test.labels, k=args.k, weighting="uniform")
        results.append({"features": name, "dim": int(train_x.shape[1]), "knn_weighted": weighted,
                        "knn_uniform": uniform, "seconds": round(seconds, 1), "note": note})
        print(f"  {name}: k-NN {weighted:.3f}  {note}", flush=True)

    def embed(model):
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        bf16 = not args.fp32
        out = (extract_features(model, train, bf16=bf16), extract_features(model, test, bf16=bf16))
        return out + (time.perf_counter() - start,)

    if "pixels" not in skip:
        start = time.perf_counter()
        report("raw pixels", pixel_features(train), pixel_features(test), time.perf_counter() - start)
    def both_taps(spec, label, note, seed_first=None):
        """The backbone's pooled features and its 4 x 4 grids of third- and second-stage
        features (the embed stage's ``features``), each from the same weights."""
        for features in FEATURE_TAPS:
            if seed_first is not None:
                torch.manual_seed(seed_first)  # the same random weights for both taps
            tap = features if features == "pooled" else f"{features} {grid}x{grid}"
            report(f"{describe(spec)}, {label}, {tap}",
                   *embed(load_backbone(replace(spec, features=features, grid=grid))), note)

    if "random" not in skip:
        both_taps(backbone, "random init", f"torch seed {seed}", seed_first=seed)
    if "moco" not in skip:
        path, note = (args.checkpoint, "given checkpoint") if args.checkpoint else pretrained(preset, args.exp, "moco")
        both_taps(spec_from_checkpoint(path), "MoCo v2 (self-supervised)", note)
    if "supervised" not in skip:
        path, note = pretrained(preset, f"{args.exp}-supervised", "supervised")
        both_taps(spec_from_checkpoint(path), "supervised (labels)", note)
    if "efficientnet" not in skip:
        report("efficientnet_lite0, ImageNet-supervised, 224 px",
               *embed(load_backbone(BackboneSpec("efficientnet_lite0"))))

    print(f"\n| features | dim | k-NN-{args.k} (exp votes) | k-NN-{args.k} (uniform) | embed s | note |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in results:
        print(f"| {row['features']} | {row['dim']} | {row['knn_weighted']:.3f} | {row['knn_uniform']:.3f} "
              f"| {row['seconds']:.1f} | {row['note']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
