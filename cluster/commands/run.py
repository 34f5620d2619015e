"""attribution run PRESET: every stage of a preset, locally or on a Ray cluster."""

from __future__ import annotations

from attribution.presets import available_presets, load_ablations, load_preset, parse_override


def add_run_arguments(parser):
    parser.add_argument("--exp", default=None, help="experiment directory (default: runs/PRESET)")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: start a local Ray owned by this run)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages to run "
                        "(unknown names are refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--ablation", default=None, metavar="NAME",
                        help="apply an ablation from attribution/presets/ablations.toml "
                             f"({', '.join(sorted(load_ablations()))}); default --exp becomes runs/PRESET-NAME")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set data.train_per_class=100 (repeatable)")


def run(args) -> int:
    import sys

    from attribution.artifacts import SettingsChanged
    from attribution.settings import SettingsError
    from attribution.stages import StageInputMissing
    from cluster.pipeline import run_preset

    try:
        preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides), ablation=args.ablation)
        exp_dir = args.exp or f"runs/{preset['name']}" + (f"-{args.ablation}" if args.ablation else "")
        summaries = run_preset(preset, exp_dir, address=args.address, stages=args.stages,
                               progress=not args.no_progress)
    except (SettingsError, SettingsChanged, StageInputMissing, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nexperiment directory: {exp_dir}")
    for name, summary in summaries.items():
        print(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list))))
    return 0


def register(subparsers):
    parser = subparsers.add_parser("run", help="run a preset's stages end to end",
                                   description=f"Run every stage of a preset. Presets: {', '.join(available_presets())}.")
    parser.add_argument("preset", help="preset name or path to a .toml file")
    add_run_arguments(parser)
    parser.set_defaults(func=run)

    quick = subparsers.add_parser("quickstart", help="the quickstart preset (Fashion-MNIST, CPU, local Ray)",
                                  description="Same as 'attribution run quickstart'.")
    add_run_arguments(quick)
    quick.set_defaults(func=run, preset="quickstart")
