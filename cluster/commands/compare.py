"""attribution compare EXP [EXP ...]: a preset and its ablations side by side."""

from __future__ import annotations

import sys


def compare_command(args) -> int:
    from attribution.compare import write_comparison
    from cluster.storage import ExperimentStorage

    labels = args.labels.split(",") if args.labels else None
    try:
        local = []
        for location in args.exps:  # URI experiments: compare local copies
            storage = ExperimentStorage(location, create=False)
            storage.pull()
            local.append(str(storage.local))
        md_path, csv_path = write_comparison(local, args.out, labels, n_boot=args.n_boot, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(md_path.read_text())
    print(f"comparison: {md_path}\ncomparison: {csv_path}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "compare", help="compare the supports of several experiments (a preset and its ablations)",
        description="Support-curve AUCs with bootstrap intervals for every (experiment, method, mode), from "
        "the stored support tables: e.g. attribution compare runs/quickstart runs/quickstart-all-class")
    parser.add_argument("exps", nargs="+", help="experiment directories (local paths or storage URIs)")
    parser.add_argument("--out", default="runs/comparison", help="folder for comparison.md/.csv/.png")
    parser.add_argument("--labels", default=None, help="comma-separated names (default: preset [ablation])")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=compare_command)
