"""attribution pretrain --exp EXP: MoCo v2 pretraining of the preset's backbone.

Writes EXP/checkpoints/moco.pt (reused when it exists with the same settings) and
records the stage in EXP/manifest.json. Runs in this process (no Ray needed).
"""

from __future__ import annotations

from attribution.presets import available_presets, load_preset, parse_override


def run(args) -> int:
    from attribution.experiment import Experiment
    from attribution.pretrain import PretrainSettingsChanged, run_pretrain_stage
    from cluster.storage import ExperimentStorage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    if "pretrain" not in preset:
        print(f"preset {preset['name']!r} has no [pretrain] section: nothing to do")
        return 2
    if args.threads:
        preset["pretrain"]["threads"] = args.threads
    exp_dir = args.exp or f"runs/{preset['name']}"
    storage = ExperimentStorage(exp_dir)
    storage.pull()
    exp = Experiment(storage.local).create()
    try:
        summary = run_pretrain_stage(exp, preset, None, force=args.force)
    except PretrainSettingsChanged as error:
        print(f"error: {error}")
        return 1
    storage.push()
    print("pretrain: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "pretrain", help="MoCo v2 self-supervised pretraining of the backbone (EXP/checkpoints/moco.pt)",
        description="Pretrain the preset's backbone with MoCo v2 on the training split (labels unused). "
        f"Presets: {', '.join(available_presets())}.")
    parser.add_argument("--exp", default=None, help="experiment directory or URI (default: runs/PRESET)")
    parser.add_argument("--preset", default="quickstart", help="preset name or .toml path (default: quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set pretrain.max_steps=50 (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true",
                        help="retrain when EXP holds a checkpoint made with other settings "
                        "(the old file is kept as moco-<hash>.pt)")
    parser.set_defaults(func=run)
