"""attribution support --exp EXP: the counterfactual support stage on its own."""

from __future__ import annotations

from attribution.presets import load_preset, parse_override


def run(args) -> int:
    from attribution.experiment import Experiment
    from cluster.support import run_support_stage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    exp = Experiment(args.exp)
    if not exp.rankings.exists():
        raise SystemExit(f"{exp.rankings} does not exist: run 'attribution rank --exp {args.exp}' "
                         "(or 'attribution run PRESET') first")
    summary = run_support_stage(exp, preset, args.address)
    print(f"support: {exp.support}")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "support", help="estimate removal/mislabel support of the rankings by retraining",
        description="Bisection over k with retrained models (Ray); resumes from EXP/trainings/ when rerun.")
    parser.add_argument("--exp", required=True, help="experiment directory holding rankings/")
    parser.add_argument("--preset", default="quickstart", help="preset name or .toml path (its [data] and [support])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set support.targets=20 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: start a local Ray owned by this command)")
    parser.set_defaults(func=run)
