"""A preset's stages on an experiment at a local path or a storage URI, pools on Ray."""

from __future__ import annotations

from attribution.experiment import Experiment
from attribution.pipeline import Pipeline
from cluster.runtime import RayRuntime
from cluster.storage import ExperimentStorage


def run_preset(preset: dict, exp_dir: str, address: str | None = None, stages=None, progress: bool = True) -> dict:
    """Run the preset's stages; ``exp_dir`` is a local path or a pyarrow.fs URI.

    The preset is validated before anything is downloaded or written."""
    storage = ExperimentStorage(exp_dir, create=False)
    pipeline = Pipeline(Experiment(storage.local), preset, RayRuntime(address), progress=progress,
                        after_stage=lambda name, summary: storage.push())
    pipeline.stages(stages)  # unknown stage names are refused before any work
    storage.pull()  # resume from what a previous run stored
    summaries = pipeline.run(stages)
    storage.push()  # the manifest, also when the preset has no stage to run
    return summaries
