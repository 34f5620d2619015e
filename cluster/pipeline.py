"""Runs a preset's stages in order on one experiment directory.

Each stage reads what the previous ones wrote in EXP and skips work already done, so
rerunning the same command resumes an interrupted run.
"""

from __future__ import annotations

import importlib
import time

from attribution.experiment import Experiment
from cluster.storage import ExperimentStorage

# (stage name, "module:function"); each function takes (exp, preset, address) and
# returns a dict summary (what it wrote).
STAGES = [
    ("pretrain", "attribution.pretrain:run_pretrain_stage"),
    ("embed", "cluster.embedding:run_embed_stage"),
    ("rank", "cluster.ranking:run_rank_stage"),
    # baselines write EXP/rankings/{trak,datamodels}-*.parquet before support reads every method
    ("trak", "cluster.trak:run_trak_stage"),
    ("datamodels", "cluster.datamodels:run_datamodels_stage"),
    ("support", "cluster.support:run_support_stage"),
    ("report", "attribution.report:run_report_stage"),
]


def run_preset(preset: dict, exp_dir: str, address: str | None = None, stages: list[str] | None = None) -> dict:
    """Run the preset's stages; ``exp_dir`` is a local path or a pyarrow.fs URI."""
    storage = ExperimentStorage(exp_dir)
    storage.pull()  # resume from what a previous run stored
    exp = Experiment(storage.local).create()
    exp.record_stage("preset", preset=preset)
    storage.push()
    summaries = {}
    selected = [s for s in STAGES if stages is None or s[0] in stages]
    for name, target in selected:
        if name not in preset:
            continue
        module_name, function_name = target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        print(f"\n=== stage {name} ===", flush=True)
        start = time.perf_counter()
        summary = function(exp, preset, address) or {}
        summary["seconds"] = round(time.perf_counter() - start, 1)
        exp.record_stage(f"timing.{name}", seconds=summary["seconds"])
        summaries[name] = summary
        storage.push()
        print(f"=== stage {name} done in {summary['seconds']} s ===", flush=True)
    return summaries
