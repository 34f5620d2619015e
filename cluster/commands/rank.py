"""attribution rank --exp EXP: the rank stage alone (ESVM, l2, cosine, random rankings)."""

from __future__ import annotations

import sys

from attribution.presets import load_preset, parse_override


def rank_command(args) -> int:
    from attribution.experiment import Experiment
    from cluster.ranking import run_rank_stage
    from cluster.storage import ExperimentStorage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    storage = ExperimentStorage(args.exp)
    storage.pull()  # a URI experiment: work on a local copy, resume from what is stored
    try:
        summary = run_rank_stage(Experiment(storage.local), preset, args.address)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.push()
    print("rank: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    print(f"rankings: {storage.local / 'rankings'}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "rank", help="rank training images for each target (ESVM, l2, cosine, random)",
        description="Read EXP/embeddings and write EXP/rankings/<method>-class<label>.parquet on Ray. "
        "Finished (method, class) files are kept, so rerunning resumes.")
    parser.add_argument("--exp", required=True, help="experiment directory (local path or storage URI)")
    parser.add_argument("--preset", default="quickstart", help="preset name or .toml path for the [rank] settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set rank.top_k=100 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: start a local Ray owned by this command)")
    parser.set_defaults(func=rank_command)
