"""The report stage: EXP/report.md and report.html from whatever EXP holds.

It reads no declared input (a half-finished experiment gets a report that names each
missing table with the stage that writes it), needs no runtime and never starts Ray;
the work is :func:`attribution.report.write_report`, with the [report] section as its
options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from attribution.report import ReportError, write_report
from attribution.settings import Section, setting
from attribution.stages import register_stage
from attribution.stages.base import Flag, Plan, Stage, StageInputMissing


@dataclass
class ReportSettings(Section):
    """The [report] section: how the report's intervals, overlaps, LDS and image grid are made."""

    section: ClassVar[str] = "report"

    n_boot: int = setting(1000, low=1, help="bootstrap resamples over targets for every interval")
    confidence: float = setting(0.95, low=0, high=1, low_open=True, high_open=True,
                                help="level of the bootstrap intervals")
    seed: int = setting(0, help="seed of the bootstrap and of the image grid's choice of targets")
    jaccard_ks: tuple[int, ...] = setting((10, 100), low=1, help="the k of the top-k overlap tables")
    grid_targets: int = setting(4, low=0, help="targets in the image grid (0: no grid)")
    grid_top: int = setting(8, low=0, help="top-ranked training images per method in the grid (0: no grid)")


@register_stage
class ReportStage(Stage):
    """Write the report of an experiment (no retraining, no Ray)."""

    name = "report"
    settings_class = ReportSettings
    reads = ()
    writes = ("report",)
    uses_data = False  # the stored tables only (a missing dataset only drops the image grid)
    flags = (
        Flag("--n-boot", "bootstrap resamples over targets (default 1000)", setting="report.n_boot", type=int),
        Flag("--seed", "seed of the bootstrap and the image-grid targets (default 0)", setting="report.seed",
             type=int),
        Flag("--grid-targets", "targets in the image grid (default 4; 0: no grid)", setting="report.grid_targets",
             type=int),
        Flag("--grid-top", "top-ranked images per method in the grid (default 8)", setting="report.grid_top",
             type=int),
    )
    help = "write EXP/report.md and report.html from the stored tables"
    description = ("Compute support curves, AUCs, win rates, overlaps, LDS and costs from whatever EXP already "
                   "holds (no retraining, no Ray) and write EXP/report.md, EXP/report.html and "
                   "EXP/report_files/*.png. Missing tables are named with the command that produces them.")

    def plan(self) -> Plan:
        # nothing to reuse: the report is cheap and always reflects the tables as they are now
        return Plan(todo=["report"])

    def run(self, plan: Plan) -> dict:
        c = self.config
        try:
            md_path, html_path = write_report(
                self.exp.root, n_boot=c.n_boot, confidence=c.confidence, seed=c.seed, jaccard_ks=c.jaccard_ks,
                grid_targets=c.grid_targets, grid_top=c.grid_top)
        except ReportError as error:  # nothing to report on: refused like any stage's missing input
            raise StageInputMissing(str(error)) from error
        return {"markdown": str(md_path), "html": str(html_path)}
