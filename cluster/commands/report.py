"""attribution report EXP: EXP/report.md and EXP/report.html from the stored tables."""

from __future__ import annotations

import sys


def report_command(args) -> int:
    from attribution.report import ReportError, write_report
    from cluster.storage import ExperimentStorage

    storage = ExperimentStorage(args.exp)
    storage.pull()  # a URI experiment: report on a local copy, then store the report beside the tables
    try:
        md_path, html_path = write_report(storage.local, n_boot=args.n_boot, seed=args.seed,
                                          grid_targets=args.grid_targets, grid_top=args.grid_top)
    except (ReportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage.push()
    where = f" (stored at {args.exp})" if storage.remote else ""
    print(f"report: {md_path}\nreport: {html_path}{where}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser(
        "report", help="write EXP/report.md and report.html from the stored tables",
        description="Compute support curves, AUCs, win rates, overlaps, LDS and costs from whatever "
        "EXP already holds (no retraining, no Ray) and write EXP/report.md, EXP/report.html and "
        "EXP/report_files/*.png. Missing tables are named with the command that produces them.")
    parser.add_argument("exp", help="experiment directory (local path or storage URI)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over targets (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the image-grid targets")
    parser.add_argument("--grid-targets", type=int, default=4, help="targets in the image grid (default 4)")
    parser.add_argument("--grid-top", type=int, default=8, help="top-ranked images per method in the grid")
    parser.set_defaults(func=report_command)
