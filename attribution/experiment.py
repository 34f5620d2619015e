"""The experiment directory: every stage reads and writes named artifacts here.

Layout (``EXP`` is the directory given on the command line)::

    EXP/manifest.json          one section per stage: its settings, inputs, outputs
    EXP/checkpoints/           backbones pretrained by ``attribution pretrain``
    EXP/embeddings/            Parquet dataset, one file per shard, + _manifest.json
    EXP/rankings/              Parquet dataset, one file per (method, class)
    EXP/trainings/             Parquet log, one row per retraining
    EXP/support.parquet        support per (target, method, mode)
    EXP/report.md, report.html

Writes are atomic (a temporary file renamed into place), so an interrupted stage
leaves either a complete artifact or none: a later run never mistakes half a file for
a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


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
        write_json_atomic(self.manifest_path, manifest)
        return entry


def settings_differences(stored: dict, current: dict) -> str:
    """``key: old -> new`` for every key whose value differs (for "changed settings" errors)."""
    keys = sorted(set(stored) | set(current))
    diffs = [f"{k}: {stored.get(k, '(unset)')!r} -> {current.get(k, '(unset)')!r}" for k in keys
             if stored.get(k) != current.get(k)]
    return "; ".join(diffs) or "(no difference in the compared keys)"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file so that it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_dataset(folder: str | os.PathLike, columns: list[str] | None = None, filters=None) -> pa.Table:
    """Read a Parquet dataset folder, ignoring temporary and hidden files."""
    import pyarrow.dataset as ds

    folder = Path(folder)
    files = sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {folder}: run the stage that writes it first")
    dataset = ds.dataset(files, format="parquet")
    return dataset.to_table(columns=columns, filter=filters)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
