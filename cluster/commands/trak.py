"""attribution trak --exp EXP: the TRAK baseline stage on its own."""

from __future__ import annotations

import sys

from attribution.presets import load_preset, parse_override


def run(args) -> int:
    from attribution.experiment import Experiment
    from cluster.storage import ExperimentStorage
    from cluster.trak import run_trak_stage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    storage = ExperimentStorage(args.exp)
    storage.pull()  # a URI experiment: work on a local copy, resume from what is stored
    exp = Experiment(storage.local)
    if not exp.rankings.exists():
        raise SystemExit(f"{exp.rankings} does not exist: run 'attribution rank --exp {args.exp}' "
                         "(or 'attribution run PRESET') first; trak attributes the rank stage's targets")
    try:
        summary = run_trak_stage(exp, preset, args.address, force=args.force)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.push()
    print(f"trak: {storage.local / 'trak'} (rankings: {exp.rankings}/trak-*.parquet)")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0


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
