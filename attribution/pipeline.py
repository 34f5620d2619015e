"""Runs a preset's stages in order on one experiment directory (no Ray here).

Every section of the preset is parsed and validated before the first stage starts
(:func:`attribution.stages.parse_settings`), stage names are checked
(:func:`attribution.stages.select_stages`), and each stage of the registry whose
section the preset has runs in pipeline order. Each stage reads what the earlier ones
wrote and skips work already done, so rerunning the same command resumes.

Nothing is recorded before the checks pass: the run holds the experiment's lock (one
writer at a time), refuses a preset whose [data] differs from the one the experiment
records (its artifacts were made on other images), runs every selected stage's
:meth:`~attribution.stages.base.Stage.preflight` (inputs present or produced by an
earlier selected stage, data files present), and records the preset in the manifest
only once the first stage's plan passed its checks (the stage's settings compared with
what EXP holds), so a run refused at any of these steps leaves manifest.json as it was.

An ablation run has a *base* experiment (``base``: the preset's own experiment): each
stage first takes over the base's files of that stage when its settings and every
input are unchanged, and the support stage takes identical trainings from the base's
log (:mod:`attribution.reuse`), so only what the ablation's change reaches is computed.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from attribution.artifacts import SettingsChanged, differences
from attribution.experiment import Experiment
from attribution.reuse import BaseReuse
from attribution.settings import DataSettings
from attribution.stages import parse_settings, select_stages, stage_class

# [data] keys that decide which images the artifacts were made on. The root is left out:
# the same files may live in another folder on another machine (the stages compare what
# they load: embedding ids, checkpoint settings).
DATA_COMPARED = ("dataset", "train_per_class", "test_per_class", "seed")


class Pipeline:
    """The stages of one preset on one experiment, with one runtime for their pools.

    ``after_stage(name, summary)`` is called when a stage finished (the storage layer
    uploads there)."""

    def __init__(self, exp: Experiment, preset: dict, runtime=None, *, progress: bool = True,
                 after_stage: Callable[[str, dict], None] | None = None, base: str | os.PathLike | None = None,
                 base_required: bool = True):
        self.exp, self.preset, self.runtime, self.progress = exp, preset, runtime, progress
        self.settings = parse_settings(preset)  # every section validated before any work
        self.after_stage = after_stage
        # the experiment an ablation reuses (base_required False: a default base that may not exist yet)
        self.base, self.base_required = base, base_required

    def stages(self, names=None) -> list[str]:
        """The stages that run: the selected ones (all by default) that the preset has."""
        return [n for n in select_stages(names) if n in self.settings.present]

    def check_recorded_data(self) -> None:
        """:class:`SettingsChanged` when the experiment records a preset with another [data]
        selection: every artifact in it was made on other images."""
        recorded = (self.exp.manifest().get("preset") or {}).get("preset")
        if not recorded:
            return
        try:
            old = DataSettings.from_preset(recorded).to_dict()
        except ValueError:  # a manifest written by an older version: the stages' own checks decide
            return
        new = self.settings.data.to_dict()
        changes = differences({k: old[k] for k in DATA_COMPARED}, {k: new[k] for k in DATA_COMPARED},
                              prefix="data.")
        if changes:
            name = self.settings.name
            raise SettingsChanged(
                f"{self.exp.location} (preset {recorded.get('name', '?')!r})", changes,
                f"Its artifacts were made on other images: run preset {name!r} into a new experiment "
                f"(--exp runs/{name}), or restore the recorded [data] values.")

    def run(self, names=None) -> dict:
        selected = self.stages(names)
        stages = [stage_class(name)(self.exp, self.settings, self.runtime, progress=self.progress)
                  for name in selected]
        summaries = {}
        with self.exp.lock():
            self.check_recorded_data()
            base = (BaseReuse.open(self.exp, self.base, self.settings.data, required=self.base_required)
                    if self.base is not None else None)
            produced: set[str] = set()
            for stage in stages:  # cheap checks of every stage before the first one starts
                stage.preflight(produced)
                produced.update(stage.writes)
            recorded = False

            def record_preset(stage=None, plan=None) -> None:
                nonlocal recorded
                if not recorded:
                    self.exp.create()
                    self.exp.record_stage("preset", preset=self.preset)
                    if base is not None:
                        base.record()
                    recorded = True

            if not stages:
                record_preset()
            for stage in stages:
                print(f"\n=== stage {stage.name} ===", flush=True)
                start = time.perf_counter()
                summary = (base.run_stage(stage, on_planned=record_preset) if base is not None
                           else stage(on_planned=record_preset))
                summary["seconds"] = round(time.perf_counter() - start, 1)
                self.exp.record_stage(f"timing.{stage.name}", seconds=summary["seconds"])
                summaries[stage.name] = summary
                if self.after_stage:
                    self.after_stage(stage.name, summary)
                print(f"=== stage {stage.name} done in {summary['seconds']} s ===", flush=True)
        return summaries
