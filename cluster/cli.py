"""The ``attribution`` console command: one subcommand per module in cluster.commands."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import cluster.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attribution",
        description="Image data attribution at cluster scale: embed, rank (Exemplar SVM), "
        "estimate support by retraining, compare with TRAK and Datamodels, report.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cluster.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"cluster.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished shards/trainings are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
