"""attribution datamodels --exp EXP: the Datamodels baseline stage on its own."""

from __future__ import annotations

from cluster.commands import run_baseline_stage


def run(args) -> int:
    from cluster.datamodels import run_datamodels_stage

    return run_baseline_stage(args, "datamodels", run_datamodels_stage,
                              "{root}/datamodels (LDS models: {root}/lds)")


def register(subparsers):
    parser = subparsers.add_parser(
        "datamodels", help="Datamodels baseline: subset models, l1 regressions, rankings, LDS models",
        description="Train models on random alpha-subsets (Ray), fit one sparse linear regression per ranked "
        "target, write EXP/rankings/datamodels-*.parquet and the LDS models in EXP/lds/. Resumes when rerun.")
    parser.add_argument("--exp", required=True, help="experiment directory holding rankings/ (path or storage URI)")
    parser.add_argument("--preset", default="quickstart",
                        help="preset name or .toml path (its [data], [datamodels], [support] recipe, [rank] top_k)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set datamodels.models=200 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: start a local Ray owned by this command)")
    parser.set_defaults(func=run)
