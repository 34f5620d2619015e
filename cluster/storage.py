"""Experiment directories on shared storage: a local path or a pyarrow.fs URI.

Stages read and write a local directory (fast, simple, atomic renames). When the
experiment lives at a URI (s3://bucket/exp, gs://bucket/exp, hdfs://..., file:///...),
the driver stages it in a local folder: it copies down what exists (so a resubmitted
job resumes), and copies everything up after each stage. Only the driver touches the
storage; workers return results to it, so worker nodes need no credentials.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from attribution.data import cache_dir


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

    def pull(self) -> None:
        """Copy the stored experiment into the local folder (no-op for local paths)."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        self.local.mkdir(parents=True, exist_ok=True)
        info = self._fs.get_file_info(self._remote)
        if info.type == pafs.FileType.NotFound:
            return
        pafs.copy_files(self._remote, str(self.local), source_filesystem=self._fs,
                        destination_filesystem=pafs.LocalFileSystem())

    def push(self) -> None:
        """Copy the local folder to the stored experiment (no-op for local paths).

        Temporary files (leading dot) are never uploaded, so the store only ever holds
        complete artifacts.
        """
        if not self.remote:
            return
        import pyarrow.fs as pafs

        local_fs = pafs.LocalFileSystem()
        for path in sorted(self.local.rglob("*")):
            if path.is_dir() or any(part.startswith(".") for part in path.relative_to(self.local).parts):
                continue
            relative = path.relative_to(self.local).as_posix()
            target = f"{self._remote.rstrip('/')}/{relative}"
            # Parquet artifacts are immutable once written: skip ones already stored.
            if path.suffix != ".json":
                stored = self._fs.get_file_info(target)
                if stored.type == pafs.FileType.File and stored.size == path.stat().st_size:
                    continue
            self._fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(path), target, source_filesystem=local_fs, destination_filesystem=self._fs)
