"""Experiment directories on shared storage: a local path or a pyarrow.fs URI.

Stages read and write a local directory (fast, simple, atomic renames). When the
experiment lives at a URI (s3://bucket/exp, gs://bucket/exp, hdfs://..., file:///...),
the driver stages it in a local folder: it copies down what exists (so a resubmitted
job resumes), and copies everything up after each stage. Only the driver touches the
storage; workers return results to it, so worker nodes need no credentials.

The store is the experiment, the staging folder only a copy: :meth:`ExperimentStorage.pull`
makes the folder mirror the store, so an experiment deleted from the store starts empty
instead of coming back from this machine's cache. Files the folder holds that the store
lacks are removed when they were in the store at the last pull or push (the store lost
them: deleted by the user), and kept when they were written here after it (finished
work of a run stopped before it could push; the next push stores it). Hidden files
(the lock, temporary and moved-aside files) are never touched, and a folder whose lock
a live run holds is not pulled at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from attribution.artifacts import write_json
from attribution.data import cache_dir
from attribution.experiment import Experiment

SYNC_RECORD = ".synced.json"  # relative path -> size of every file the store held at the last pull / push


def is_uri(location: str) -> bool:
    return "://" in str(location)


class ExperimentStorage:
    """Local working directory of an experiment, mirrored to ``location`` when it is a URI."""

    def __init__(self, location: str, staging_root: str | os.PathLike | None = None, create: bool = True):
        self.location = str(location)
        if is_uri(self.location):
            import pyarrow.fs as pafs

            try:
                self._fs, self._remote = pafs.FileSystem.from_uri(self.location)
            except Exception as error:  # unknown scheme, missing credentials, ...
                raise ValueError(
                    f"cannot open experiment storage {self.location!r}: {error}. Use a local path, "
                    "or a URI pyarrow.fs understands (s3://, gs://, hdfs://, file://) with credentials "
                    "set in the environment."
                ) from error
            key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            root = Path(staging_root) if staging_root else cache_dir() / "staging"
            self.local = root / key
        else:
            self._fs = self._remote = None
            self.local = Path(self.location)
        if create:
            self.local.mkdir(parents=True, exist_ok=True)

    @property
    def remote(self) -> bool:
        return self._fs is not None

    def experiment(self) -> Experiment:
        """The staging folder as an :class:`Experiment` that names its storage location
        (messages and the report name the URI, not this machine's cache)."""
        return Experiment(self.local, location=self.location if self.remote else None)

    # ------------------------------------------------------------------ what each side holds
    def stored_files(self) -> dict[str, int] | None:
        """{relative path: size} of the store's complete files (None: no experiment stored there)."""
        import pyarrow.fs as pafs

        info = self._fs.get_file_info(self._remote)
        if info.type == pafs.FileType.NotFound:
            return None
        base = self._remote.rstrip("/")
        out = {}
        for entry in self._fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            relative = entry.path[len(base):].lstrip("/")
            if entry.type == pafs.FileType.File and not _hidden(relative):
                out[relative] = entry.size
        return out

    def local_files(self) -> dict[str, list[int]]:
        """{relative path: [size, mtime_ns]} of the staging folder's complete files (hidden ones left out)."""
        if not self.local.is_dir():
            return {}
        out = {}
        for path in self.local.rglob("*"):
            relative = path.relative_to(self.local).as_posix()
            if path.is_file() and not _hidden(relative):
                stat = path.stat()
                out[relative] = [stat.st_size, stat.st_mtime_ns]
        return out

    def sync_record(self) -> dict[str, list[int]] | None:
        """The files the store held at the last pull or push, each with the [size, mtime_ns]
        of its local copy then (None: not recorded, e.g. a cache made before this record
        existed: every file then counts as synced)."""
        try:
            record = json.loads((self.local / SYNC_RECORD).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    # ------------------------------------------------------------------ pull / push
    def pull(self) -> None:
        """Make the local folder mirror the stored experiment (no-op for local paths): see
        the module docstring. Refused (:class:`attribution.experiment.ExperimentLocked`)
        while a live run holds the folder's lock: its work is not stored yet."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        Experiment(self.local, location=self.location).check_unlocked()
        self.local.mkdir(parents=True, exist_ok=True)
        stored = self.stored_files()
        synced = self.sync_record()
        removed, kept = [], []
        for relative in sorted(set(self.local_files()) - set(stored or {})):
            if stored is not None and synced is not None and relative not in synced:
                kept.append(relative)  # finished here after the last sync and never stored: keep it
                continue
            (self.local / relative).unlink()
            removed.append(relative)
        _remove_empty_folders(self.local)
        if removed:
            print(f"staging: removed {len(removed)} file(s) that {self.location} no longer holds "
                  f"(e.g. {removed[0]}); the store is the experiment", file=sys.stderr)
        if kept:
            print(f"staging: keeping {len(kept)} finished file(s) a stopped run wrote in {self.local} but never "
                  f"stored (e.g. {kept[0]}); the next push stores them", file=sys.stderr)
        if stored:
            pafs.copy_files(self._remote, str(self.local), source_filesystem=self._fs,
                            destination_filesystem=pafs.LocalFileSystem())
        local = self.local_files()
        write_json(self.local / SYNC_RECORD, {k: local[k] for k in (stored or {}) if k in local})

    def push(self) -> None:
        """Copy the local folder to the stored experiment (no-op for local paths).

        Temporary files (leading dot) are never uploaded, so the store only ever holds
        complete artifacts. A file is skipped when the store holds it and its local copy
        is unchanged since the last sync (same size and mtime), so one rewritten in
        place (``--overwrite``, ``--force``) is uploaded even at the same size.
        """
        if not self.remote:
            return
        import pyarrow.fs as pafs

        local_fs = pafs.LocalFileSystem()
        record = self.sync_record()
        local = self.local_files()
        for relative, stat in sorted(local.items()):
            path = self.local / relative
            target = f"{self._remote.rstrip('/')}/{relative}"
            if path.suffix != ".json" and (record is None or record.get(relative) == stat):
                stored = self._fs.get_file_info(target)
                if stored.type == pafs.FileType.File and stored.size == stat[0]:
                    continue
            self._fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(path), target, source_filesystem=local_fs, destination_filesystem=self._fs)
        # the store now holds every local file, and still what it held before (push deletes nothing)
        write_json(self.local / SYNC_RECORD, {**(record or {}), **local})


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not _hidden(folder.relative_to(root).as_posix()) and not any(folder.iterdir()):
            folder.rmdir()
