"""A preset's stages on an experiment at a local path or a storage URI, pools on Ray."""

from __future__ import annotations

import contextlib
import sys

from attribution.pipeline import Pipeline
from cluster.runtime import RayRuntime
from cluster.storage import ExperimentStorage


@contextlib.contextmanager
def pushed(storage: ExperimentStorage):
    """Push the staging folder to the store when the block ends, also when it fails: a
    failed or interrupted stage's finished units (shards, trainings) must reach the URI,
    not stay only in this machine's staging cache. A failing push then only warns, so
    the stage's own error is the one reported."""
    try:
        yield storage
    except BaseException:
        try:
            storage.push()
        except Exception as error:  # noqa: BLE001 - the original error matters more
            print(f"warning: could not copy the finished work to {storage.location}: {error}", file=sys.stderr)
        raise
    storage.push()


def run_preset(preset: dict, exp_dir: str, address: str | None = None, stages=None, progress: bool = True,
               base: str | None = None, base_required: bool = True) -> dict:
    """Run the preset's stages; ``exp_dir`` is a local path or a pyarrow.fs URI.

    ``base``: a local experiment directory whose unchanged work an ablation reuses
    (:mod:`attribution.reuse`); ``base_required`` False: a missing base only means
    everything is computed. The preset is validated before anything is downloaded or written."""
    from attribution.settings import SettingsError
    from cluster.storage import is_uri

    if base is not None and is_uri(str(base)):
        raise SettingsError(f"--base {base}: the base experiment must be a local directory (copy it here first, "
                            "e.g. with 'attribution compare' staging, or omit --base)")
    storage = ExperimentStorage(exp_dir, create=False)
    pipeline = Pipeline(storage.experiment(), preset, RayRuntime(address), progress=progress,
                        after_stage=lambda name, summary: storage.push(), base=base, base_required=base_required)
    pipeline.stages(stages)  # unknown stage names are refused before any work
    storage.pull()  # resume from what a previous run stored
    with pushed(storage):  # the manifest too, also when the preset has no stage to run
        return pipeline.run(stages)
