"""The experiment directory: every stage reads and writes named artifacts here.

Layout (``EXP`` is the directory given on the command line)::

    EXP/manifest.json          one section per stage: its settings, inputs, outputs
    EXP/checkpoints/           backbones pretrained by ``attribution pretrain``
    EXP/embeddings/            Parquet dataset, one file per shard, + _manifest.json
    EXP/rankings/              Parquet dataset, one file per (method, class)
    EXP/trainings/             Parquet log, one row per retraining
    EXP/support.parquet        support per (target, method, mode)
    EXP/report.md, report.html

Writes go through :mod:`attribution.artifacts` (a temporary file renamed into place), so
an interrupted stage leaves either a complete artifact or none.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from attribution.artifacts import write_json


class Experiment:
    """Paths and manifest of one experiment directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # named artifacts
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def rankings(self) -> Path:
        return self.root / "rankings"

    @property
    def trainings(self) -> Path:
        return self.root / "trainings"

    @property
    def support(self) -> Path:
        return self.root / "support.parquet"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    def path(self, artifact: str) -> Path:
        """Where the named artifact (a key of :data:`ARTIFACTS`) lives in this experiment."""
        if artifact not in ARTIFACTS:
            raise KeyError(f"unknown artifact {artifact!r}; known: {sorted(ARTIFACTS)}")
        return self.root / ARTIFACTS[artifact]

    def has(self, artifact: str) -> bool:
        """Whether the named artifact exists (a folder counts when it holds a complete file)."""
        path = self.path(artifact)
        if path.is_dir():
            return any(not p.name.startswith(".") for p in path.rglob("*") if p.is_file())
        return path.exists()

    def create(self) -> "Experiment":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # manifest: one JSON object, one key per stage
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        return json.loads(self.manifest_path.read_text())

    def record_stage(self, stage: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the manifest under ``stage`` (with a timestamp)."""
        manifest = self.manifest()
        entry = dict(manifest.get(stage, {}))
        entry.update(fields)
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest[stage] = entry
        write_json(self.manifest_path, manifest)
        return entry


# The names the stages' ``reads`` / ``writes`` declare, and where each lives under EXP.
# One entry per artifact: Experiment.path(name) is the only way stages build these paths.
ARTIFACTS = {
    "manifest": "manifest.json",
    "checkpoint": "checkpoints/moco.pt",
    "embeddings": "embeddings",
    "scores": "scores",
    "rankings": "rankings",
    "trak": "trak",
    "datamodels": "datamodels",
    "lds": "lds",
    "trainings": "trainings",
    "support_targets": "support_targets.parquet",
    "support": "support.parquet",
    "report": "report.md",
}
