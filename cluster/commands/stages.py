"""One subcommand per registered stage: ``attribution STAGE [EXP] [--exp EXP] ...``.

Built from the stage registry (attribution.stages): a new stage gets its command, with
its own flags (``Stage.flags``), without an edit here. Every stage command takes the
experiment as ``EXP`` or ``--exp`` (a local path or a storage URI), the preset
(``--preset``; default: the preset recorded in EXP by ``attribution run``, else
quickstart), ``--set section.key=value`` overrides and ``--address``.
"""

from __future__ import annotations


def add_common_arguments(parser, default_preset_help: str) -> None:
    parser.add_argument("exp_positional", nargs="?", default=None, metavar="EXP",
                        help="experiment directory (local path or storage URI); same as --exp")
    parser.add_argument("--exp", default=None, help="experiment directory (local path or storage URI)")
    parser.add_argument("--preset", default=None, help=default_preset_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set rank.top_k=100 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: start a local Ray owned by this command, "
                             "only when the stage runs work on a pool)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def experiment_location(args) -> str | None:
    """The experiment a command names, as ``EXP`` or ``--exp EXP`` (both: they must agree)."""
    positional = getattr(args, "exp_positional", None)
    if positional and args.exp and positional != args.exp:
        from attribution.settings import SettingsError

        raise SettingsError(f"two experiments given: EXP {positional!r} and --exp {args.exp!r}; give one of them")
    return args.exp or positional


def stage_command(args) -> int:
    from attribution.presets import load_preset, parse_overrides, with_overrides
    from attribution.stages import parse_settings, stage_class
    from cluster.pipeline import pushed
    from cluster.runtime import RayRuntime
    from cluster.storage import ExperimentStorage

    cls = stage_class(args.stage)
    location = experiment_location(args)
    overrides = parse_overrides(args.overrides)
    options = {}
    for flag in cls.flags:
        value = getattr(args, _dest(flag))
        if value is None or value is False:
            continue
        if flag.setting:
            overrides[flag.setting] = value
        else:
            options[flag.option] = value
    preset = None
    if args.preset:  # validated before anything is downloaded
        preset = load_preset(args.preset, overrides)
        parse_settings(preset)
    if location is None:
        location = f"runs/{preset['name'] if preset else 'quickstart'}"
    storage = ExperimentStorage(location, create=False)
    storage.pull()  # a URI experiment: work on a local copy, resume from what is stored
    # Nothing here creates EXP (the stage does, under its lock, and removes a folder it made
    # when it is refused), so a typo'd path (attribution report /typo) leaves no directory.
    with pushed(storage):  # what finished reaches the URI, also when the stage fails
        exp = storage.experiment()  # names the URI, not the staging folder
        if preset is None:
            recorded = (exp.manifest().get("preset") or {}).get("preset")
            preset = with_overrides(recorded, overrides) if recorded else load_preset("quickstart", overrides)
        settings = parse_settings(preset)  # every section, before anything is written
        stage = cls(exp, settings, RayRuntime(args.address), progress=not args.no_progress, **options)
        summary = stage()
    print(f"{cls.name}: {storage.location}")
    for key, value in summary.items():
        if not isinstance(value, (dict, list)):
            print(f"  {key}: {value}")
    return 0


def _dest(flag) -> str:
    return "flag_" + flag.name.lstrip("-").replace("-", "_")


def register(subparsers):
    from attribution.stages import available_stages, stage_class

    for name in available_stages():
        cls = stage_class(name)
        writes = ", ".join(f"EXP/{p}" for p in cls.artifact_paths(cls.writes))
        parser = subparsers.add_parser(
            name, help=cls.help or f"the {name} stage",
            description=(cls.description or cls.help) + f" Writes {writes}." + (
                f" Reads {', '.join('EXP/' + p for p in cls.artifact_paths(cls.reads))}." if cls.reads else ""))
        add_common_arguments(parser, f"preset name or .toml path for the [{cls.settings_class.section}] (and [data]) "
                                     "settings (default: the preset recorded in EXP, else quickstart)")
        for flag in cls.flags:
            if flag.type is None:
                parser.add_argument(flag.name, dest=_dest(flag), action="store_true", help=flag.help)
            else:
                parser.add_argument(flag.name, dest=_dest(flag), type=flag.type, default=None, help=flag.help,
                                    metavar=flag.name.lstrip("-").upper().replace("-", "_"))
        parser.set_defaults(func=stage_command, stage=name)
