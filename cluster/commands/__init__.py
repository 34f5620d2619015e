"""One module per ``attribution`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace). ``cluster.cli`` discovers them.
"""


def run_baseline_stage(args, stage: str, run_stage, where: str, **stage_kwargs) -> int:
    """Shared body of the baseline subcommands (trak, datamodels): load the preset, stage
    the experiment locally, check the rank stage ran, run, push, print the summary."""
    import sys

    from attribution.experiment import Experiment
    from attribution.presets import load_preset, parse_override
    from cluster.storage import ExperimentStorage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    storage = ExperimentStorage(args.exp)
    storage.pull()  # a URI experiment: work on a local copy, resume from what is stored
    exp = Experiment(storage.local)
    if not exp.rankings.exists():
        raise SystemExit(f"{exp.rankings} does not exist: run 'attribution rank --exp {args.exp}' "
                         f"(or 'attribution run PRESET') first; {stage} attributes the rank stage's targets")
    try:
        summary = run_stage(exp, preset, args.address, **stage_kwargs)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.push()
    print(f"{stage}: {where.format(root=storage.local, rankings=exp.rankings)}")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0
