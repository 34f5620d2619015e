"""attribution compare EXP [EXP ...]: a preset and its ablations side by side."""

from __future__ import annotations


def compare_command(args) -> int:
    from attribution.compare import write_comparison
    from attribution.settings import SettingsError
    from cluster.storage import ExperimentStorage

    locations = list(args.exps) + list(args.exp)
    if not locations:
        raise SettingsError("give the experiments to compare: attribution compare EXP EXP ... "
                            "(or --exp EXP --exp EXP)")
    if args.n_boot < 1:
        raise SettingsError(f"--n-boot must be an integer >= 1, got {args.n_boot}")
    labels = args.labels.split(",") if args.labels else None
    local = []
    for location in locations:  # URI experiments: compare local copies
        storage = ExperimentStorage(location, create=False)
        storage.pull()
        if not storage.local_files():  # a typo'd path or an empty store: say so, create nothing
            raise FileNotFoundError(f"experiment {location} does not exist (or is empty): check the path, or "
                                    f"run its preset first ('attribution run PRESET --exp {location}')")
        local.append(str(storage.local))
    md_path, csv_path = write_comparison(local, args.out, labels, n_boot=args.n_boot, seed=args.seed)
    print(md_path.read_text())
    print(f"comparison: {md_path}\ncomparison: {csv_path}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "compare", help="compare the supports of several experiments (a preset and its ablations)",
        description="Support-curve AUCs with bootstrap intervals for every (experiment, method, mode), from "
        "the stored support tables: e.g. attribution compare runs/quickstart runs/quickstart-all-class "
        "(or --exp runs/quickstart --exp runs/quickstart-all-class)")
    parser.add_argument("exps", nargs="*", metavar="EXP", help="experiment directories (local paths or storage URIs)")
    parser.add_argument("--exp", action="append", default=[], metavar="EXP",
                        help="an experiment to compare (repeatable; same as the positional EXPs)")
    parser.add_argument("--out", default="runs/comparison", help="folder for comparison.md/.csv/.png")
    parser.add_argument("--labels", default=None, help="comma-separated names (default: preset [ablation])")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=compare_command)
