"""Runs a preset's stages in order on one experiment directory (no Ray here).

Every section of the preset is parsed and validated before the first stage starts
(:func:`attribution.stages.parse_settings`), stage names are checked
(:func:`attribution.stages.select_stages`), and each stage of the registry whose
section the preset has runs in pipeline order. Each stage reads what the earlier ones
wrote and skips work already done, so rerunning the same command resumes.
"""

from __future__ import annotations

import time
from typing import Callable

from attribution.experiment import Experiment
from attribution.stages import parse_settings, select_stages, stage_class


class Pipeline:
    """The stages of one preset on one experiment, with one runtime for their pools.

    ``after_stage(name, summary)`` is called when a stage finished (the storage layer
    uploads there)."""

    def __init__(self, exp: Experiment, preset: dict, runtime=None, *, progress: bool = True,
                 after_stage: Callable[[str, dict], None] | None = None):
        self.exp, self.preset, self.runtime, self.progress = exp, preset, runtime, progress
        self.settings = parse_settings(preset)  # every section validated before any work
        self.after_stage = after_stage

    def stages(self, names=None) -> list[str]:
        """The stages that run: the selected ones (all by default) that the preset has."""
        return [n for n in select_stages(names) if n in self.settings.present]

    def run(self, names=None) -> dict:
        selected = self.stages(names)
        self.exp.create()
        self.exp.record_stage("preset", preset=self.preset)
        summaries = {}
        for name in selected:
            stage = stage_class(name)(self.exp, self.settings, self.runtime, progress=self.progress)
            print(f"\n=== stage {name} ===", flush=True)
            start = time.perf_counter()
            summary = stage()
            summary["seconds"] = round(time.perf_counter() - start, 1)
            self.exp.record_stage(f"timing.{name}", seconds=summary["seconds"])
            summaries[name] = summary
            if self.after_stage:
                self.after_stage(name, summary)
            print(f"=== stage {name} done in {summary['seconds']} s ===", flush=True)
        return summaries
