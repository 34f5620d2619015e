"""attribution embed --exp EXP: the embed stage alone (resumable, sharded, on Ray)."""

from __future__ import annotations

import sys

from attribution.presets import load_preset, parse_override


def embed_command(args) -> int:
    from attribution.embedding import EmbeddingError
    from attribution.experiment import Experiment
    from cluster.embedding import run_embed_stage
    from cluster.storage import ExperimentStorage

    preset = load_preset(args.preset, dict(parse_override(o) for o in args.overrides))
    storage = ExperimentStorage(args.exp)
    storage.pull()  # resume from what a previous run stored (no-op for a local path)
    exp = Experiment(storage.local).create()
    try:
        summary = run_embed_stage(exp, preset, args.address, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    except (EmbeddingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.push()
    print(", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "embed", help="embed the preset's train/test images into EXP/embeddings (Parquet shards)",
        description="Embed the train and test subsets of a preset's [data] section with its [embed] backbone, "
        "one Parquet file per shard, on a Ray actor pool. Rerunning resumes: finished shards are skipped.")
    parser.add_argument("--exp", required=True, help="experiment directory (local path or storage URI)")
    parser.add_argument("--preset", default="quickstart", help="preset name or .toml path (default: quickstart)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a preset value, e.g. --set embed.checkpoint=\"\" (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray address to join (default: start a local Ray owned by this command)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete EXP/embeddings first (needed when the backbone, checkpoint or data changed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=embed_command)
