"""attribution datamodels --exp EXP: the Datamodels baseline stage on its own."""

from __future__ import annotations

import sys

from attribution.presets import load_preset, parse_override


def run(args) -> int:
    from attribution.experiment import Experiment
    from cluster.datamodels import run_datamodels_stage
    from cluster.storage import ExperimentStorage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    storage = ExperimentStorage(args.exp)
    storage.pull()  # a URI experiment: work on a local copy, resume from what is stored
    exp = Experiment(storage.local)
    if not exp.rankings.exists():
        raise SystemExit(f"{exp.rankings} does not exist: run 'attribution rank --exp {args.exp}' "
                         "(or 'attribution run PRESET') first; datamodels attributes the rank stage's targets")
    try:
        summary = run_datamodels_stage(exp, preset, args.address)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.push()
    print(f"datamodels: {storage.local / 'datamodels'} (LDS models: {storage.local / 'lds'})")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0


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
