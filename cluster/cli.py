"""The ``attribution`` console command: one subcommand per module in cluster.commands.

One error style for every subcommand, applied here once: a mistake of the user's (a bad
flag, an unknown preset, stage, section or key, a bad value, missing data, a corrupt
checkpoint, changed settings, a missing input, an unknown job, a work item that failed
on every attempt) prints one ``error: ...`` line that names the problem and the fix,
and the command exits with code 2. ``--debug`` (before or after the subcommand) adds
the traceback. Anything else is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import traceback

import cluster.commands

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: a command line it cannot parse (unknown
    flag, missing argument, bad type, typo'd subcommand) is one ``error:`` line naming
    the help to read, exit code 2 (argparse's own exit code; it would print the usage block)."""

    def error(self, message):
        from attribution.settings import did_you_mean

        hint = ""
        typo = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if typo:  # attribution suport ... -> did you mean 'support'?
            hint = did_you_mean(typo.group(1), re.findall(r"'([^']*)'", typo.group(2)))
        self.exit(EXIT_USER_ERROR, f"error: {message}{hint} (see '{self.prog} --help')\n")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix (their message names the fix)."""
    from attribution.artifacts import SettingsChanged
    from attribution.data import DatasetNotFoundError
    from attribution.experiment import ExperimentLocked
    from attribution.settings import SettingsError
    from attribution.stages import StageInputMissing
    from attribution.workqueue import WorkFailed
    from cluster.submit import SubmissionError

    # The named types document what is expected; ValueError / FileNotFoundError cover the
    # other messages of the project written for users (checkpoint, embedding, report errors).
    return (SettingsError, SettingsChanged, StageInputMissing, DatasetNotFoundError, ExperimentLocked, WorkFailed,
            SubmissionError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, TimeoutError)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (a worker's traceback quoted inside it is dropped:
    ``--debug`` shows it)."""
    lines = []
    for line in (str(error) or type(error).__name__).splitlines():
        if line.lstrip().startswith("Traceback (most recent call last)"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="attribution",
        description="Image data attribution at cluster scale: embed, rank (Exemplar SVM), "
        "estimate support by retraining, compare with TRAK and Datamodels, report.",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cluster.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"cluster.commands.{info.name}")
        module.register(subparsers)
    for sub in subparsers.choices.values():
        _add_debug(sub)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # --debug after the subcommand too; SUPPRESS keeps a --debug given before it
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # attribution job status ...
            for sub in action.choices.values():
                _add_debug(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error Parser.error printed (2)
        return stop.code if isinstance(stop.code, int) else EXIT_USER_ERROR
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: finished shards/trainings are kept; rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not isinstance(error, user_errors()):
            raise  # a bug: Python's traceback is what its report needs
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
