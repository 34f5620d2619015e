"""attribution run PRESET: every stage of a preset, locally or on a Ray cluster."""

from __future__ import annotations

from attribution.presets import available_presets, load_ablations, load_preset, parse_overrides


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
    parser.add_argument("--base", default=None, metavar="EXP",
                        help="with --ablation: the experiment whose unchanged work is reused (default: runs/PRESET; "
                             "its files are linked or copied, never modified)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set data.train_per_class=100 (repeatable)")


def checked_preset(preset_name: str, overrides: list[str], ablation: str | None = None,
                   stages: str | None = None) -> tuple[dict, list[str] | None]:
    """Everything a user typed for a run, checked before anything is downloaded, written
    or submitted (``run`` and ``submit`` share it): the preset and ablation exist, every
    ``--set`` names a known key with a valid value, every ``--stages`` name is a stage
    this preset runs. Returns the preset and the selected stage names (None: all)."""
    from attribution.settings import SettingsError
    from attribution.stages import parse_settings, select_stages

    preset = load_preset(preset_name, parse_overrides(overrides), ablation=ablation)
    settings = parse_settings(preset)
    if stages is None:
        return preset, None
    selected = select_stages(stages)
    absent = [name for name in selected if name not in settings.present]
    if absent:  # the pipeline would skip them: nothing the user asked for is dropped silently
        what = f"the {preset['name']} preset" + (f" with ablation {ablation!r}" if ablation else "")
        raise SettingsError(
            f"--stages {','.join(absent)}: {what} has no [{'], ['.join(absent)}] section, so nothing would run; "
            f"its stages are {', '.join(settings.present) or '(none)'}: choose among them, or add the section "
            f"(--set {absent[0]}.KEY=VALUE, or a preset that has it)")
    return preset, selected


def default_exp(preset_name: str, ablation: str | None) -> str:
    return f"runs/{preset_name}" + (f"-{ablation}" if ablation else "")


def ablation_base(preset_name: str, ablation: str | None, base: str | None) -> tuple[str | None, bool]:
    """The base experiment of a run and whether it must exist: --base (must exist), else
    for an ablation the preset's default experiment (used when it exists), else none."""
    from attribution.settings import SettingsError

    if base is not None:
        if not ablation:
            raise SettingsError("--base is for ablation runs: add --ablation NAME (a run of the preset itself "
                                "has no base to reuse)")
        return base, True
    return (default_exp(preset_name, None), False) if ablation else (None, False)


def run(args) -> int:
    from cluster.pipeline import run_preset

    preset, stages = checked_preset(args.preset, args.overrides, args.ablation, args.stages)
    exp_dir = args.exp or default_exp(preset["name"], args.ablation)
    base, base_required = ablation_base(preset["name"], args.ablation, getattr(args, "base", None))
    summaries = run_preset(preset, exp_dir, address=args.address, stages=stages, progress=not args.no_progress,
                           base=base, base_required=base_required)
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
