"""SIMULATION: projected makespan, GPU utilisation and trainings of the ImageNet-sized
benchmark on 8 / 64 / 512 simulated GPUs (cluster/simulate.py; docs/scale.md).

    python -m benchmarks.scale_model --gpus 8 64 512 [--unit-costs runs/unit_costs.json]
                                     [--out runs/scale_model.json] [--plot runs/scale_model.png]

Nothing is measured here: retraining and inference times are published figures, the
ESVM cost per target is this machine's (benchmarks/unit_costs.py), and the outcomes of
the trainings come from a seeded outcome model. The real BisectionSearch decides which
trainings run, so trainings and supports follow the real search logic.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from cluster.simulate import BANNER, POLICIES, POLICY_NAMES, ScaleInputs, describe_inputs, project


def format_table(projections) -> str:
    reference = {p.inputs.gpus: p for p in projections if p.row()["policy"] == "reference"}
    head = (f"{'GPUs':>5s}  {'policy':11s} {'trainings':>9s} {'vs ref':>7s} {'embed+rank min':>14s} "
            f"{'support h':>10s} {'total h':>9s} {'days':>6s} {'speedup':>8s} {'GPU util':>9s} {'crit. path h':>12s}")
    lines = [head, "-" * len(head)]
    for p in projections:
        row = p.row()
        ref = reference.get(p.inputs.gpus)
        trainings_ratio = f"{row['trainings'] / ref.support.trainings:7.2f}" if ref else "      -"
        speedup = f"{ref.makespan / p.makespan:7.1f}x" if ref else "       -"
        lines.append(f"{row['gpus']:5d}  {row['policy']:11s} {row['trainings']:9d} {trainings_ratio} "
                     f"{(row['embed_h'] + row['rank_h']) * 60:14.1f} {row['support_h']:10.1f} {row['makespan_h']:9.1f} {row['makespan_h'] / 24:6.1f} {speedup} "
                     f"{row['gpu_utilisation']:9.2f} {row['critical_path_h']:12.1f}")
    lines.append("policies: " + "; ".join(f"{k} = {v}" for k, v in POLICY_NAMES.items()))
    lines.append("'vs ref' = trainings / the reference's; speedup = reference makespan / makespan, same GPUs; "
                 "GPU util = busy / available slot time in the support stage")
    return "\n".join(lines)


def plot(projections, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in POLICIES:
        points = sorted((p.inputs.gpus, p.makespan / 86400) for p in projections if p.row()["policy"] == policy)
        if points:
            ax.plot(*zip(*points), marker="o", label=POLICY_NAMES[policy])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (simulated)")
    ax.set_ylabel("projected makespan (days)")
    ax.set_title(f"{BANNER}\nImageNet-sized benchmark, ResNet-18 retraining", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def datamodels_projection(counts, epochs: int, gpus) -> dict:
    """The A100-days of Datamodels' subset models on ImageNet (ResNet-18 on half the
    training set each, FFCV's published time), and the days on each GPU count (the
    models are independent: perfectly parallel)."""
    from attribution.published_costs import FFCV_SOURCE, datamodels_gpu_hours

    rows = [{"models": int(n), "alpha": 0.5, "epochs": int(epochs),
             "gpu_days": datamodels_gpu_hours(int(n), 0.5, int(epochs)) / 24} for n in counts]
    lines = [f"# {BANNER}: Datamodels subset models on ImageNet (ResNet-18, {epochs} epochs, alpha 0.5; "
             f"{FFCV_SOURCE}, linear in the images seen)",
             "| models | A100-days | " + " | ".join(f"days on {g} GPUs" for g in gpus) + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in gpus) + " |"]
    for row in rows:
        lines.append(f"| {row['models']:,} | {row['gpu_days']:,.1f} | "
                     + " | ".join(f"{row['gpu_days'] / g:,.2f}" for g in gpus) + " |")
    return {"rows": rows, "lines": lines}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ScaleInputs()
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--targets", type=int, default=defaults.targets)
    parser.add_argument("--methods", type=int, default=defaults.methods)
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="FFCV ResNet-18 schedule")
    parser.add_argument("--train-minutes", type=float, default=None,
                        help="one retraining on one GPU (default: FFCV's figure for --epochs)")
    parser.add_argument("--trainings-per-gpu", type=int, default=defaults.trainings_per_gpu)
    parser.add_argument("--packing-speedup", type=float, default=defaults.packing_speedup)
    parser.add_argument("--not-found-fraction", type=float, default=defaults.not_found_fraction)
    parser.add_argument("--seed-spread", type=float, default=defaults.seed_spread)
    parser.add_argument("--unit-costs", default=None,
                        help="JSON of benchmarks.unit_costs: its esvm_target_imagenet replaces the default")
    parser.add_argument("--datamodels", type=int, nargs="+", default=[1000, 10_000, 100_000],
                        help="subset-model counts whose ImageNet cost is projected (alpha 0.5, --epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the inputs and rows as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of makespan vs GPUs here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if min(args.gpus) < 1:
        parser.error("--gpus must be positive")
    esvm = defaults.esvm_seconds_per_target
    if args.unit_costs:
        units = json.loads(Path(args.unit_costs).read_text())["units"]
        esvm = units["esvm_target_imagenet"]["seconds"]
    base = ScaleInputs(targets=args.targets, methods=args.methods, epochs=args.epochs, train_minutes=args.train_minutes,
                       trainings_per_gpu=args.trainings_per_gpu, packing_speedup=args.packing_speedup,
                       not_found_fraction=args.not_found_fraction, seed_spread=args.seed_spread,
                       esvm_seconds_per_target=esvm, seed=args.seed)
    projections = project(base, args.gpus, args.policies, progress=not args.no_progress)
    print("\n".join(describe_inputs(base)))
    print()
    print(format_table(projections))
    datamodels = datamodels_projection(args.datamodels, args.epochs, args.gpus)
    print()
    print("\n".join(datamodels["lines"]))
    if args.out:
        from attribution.artifacts import write_json

        write_json(Path(args.out), {"label": BANNER, "inputs": asdict(base),
                                           "rows": [p.row() for p in projections],
                                           "datamodels": datamodels["rows"]})
        print(f"# {BANNER}: written to {args.out}")
    if args.plot:
        plot(projections, Path(args.plot))
        print(f"# {BANNER}: plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
