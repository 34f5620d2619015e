"""attribution trak --exp EXP: the TRAK baseline stage on its own."""

from __future__ import annotations

from cluster.commands import run_baseline_stage


def run(args) -> int:
    from cluster.trak import run_trak_stage

    return run_baseline_stage(args, "trak", run_trak_stage, "{root}/trak (rankings: {rankings}/trak-*.parquet)",
                              force=args.force)


def register(subparsers):
    parser = subparsers.add_parser(
        "trak", help="TRAK baseline (traker): checkpoints, features, scores, rankings",
        description="Train the [support] recipe's full-data models, compute TRAK scores with traker for every "
        "target the rank stage ranked and write EXP/rankings/trak-*.parquet. A rerun with the same settings "
        "does nothing; changed settings are refused unless --force.")
    parser.add_argument("--exp", required=True, help="experiment directory holding rankings/ (path or storage URI)")
    parser.add_argument("--preset", default="quickstart",
                        help="preset name or .toml path (its [data], [trak], [support] recipe, [rank] top_k)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set trak.proj_dim=1024 (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="recompute trak rankings stored with other settings instead of refusing")
    parser.add_argument("--address", default=None,
                        help="accepted for symmetry with the other stages; TRAK runs in this process")
    parser.set_defaults(func=run)
