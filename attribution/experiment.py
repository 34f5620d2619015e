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

One writer at a time: every stage and pipeline run holds :meth:`Experiment.lock` (the
hidden file ``EXP/.lock`` names its holder's host, pid, start time and command). A second
process is refused with the holder named; the lock of a process that no longer exists
on this host is taken over with a warning, and whatever that process had moved aside for
a destructive rewrite (:func:`attribution.artifacts.aside`) is restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from attribution.artifacts import restore_asides, write_json


class Experiment:
    """Paths and manifest of one experiment directory.

    ``location``: where the experiment is stored when ``root`` is a local staging copy
    of it (a storage URI, :mod:`cluster.storage`); messages and the report name it."""

    def __init__(self, root: str | os.PathLike, location: str | None = None):
        self.root = Path(root)
        self.location = str(location) if location else str(self.root)

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

    def record_location(self) -> None:
        """Record where the experiment is stored (manifest ``storage.location``) when it is
        a staging copy of a URI, so the report names the URI; a local experiment drops a
        stale record (e.g. one copied down from a store). Writes only on a change."""
        manifest = self.manifest()
        recorded = (manifest.get("storage") or {}).get("location")
        if self.location != str(self.root) and recorded != self.location:
            self.record_stage("storage", location=self.location)
        elif self.location == str(self.root) and "storage" in manifest:
            del manifest["storage"]
            write_json(self.manifest_path, manifest)

    # one writer at a time
    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def lock(self, command: str | None = None) -> "ExperimentLock":
        """The experiment's lock (a context manager, re-entrant within this process):
        ``with exp.lock(): ...``. :class:`ExperimentLocked` when another live process holds it."""
        return ExperimentLock(self, command)

    def check_unlocked(self) -> None:
        """Raise :class:`ExperimentLocked` when another live process holds the lock (writes nothing)."""
        ExperimentLock(self).check()


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
    "gradient": "gradient",
    "further": "further",
    "lds": "lds",
    "trainings": "trainings",
    "support_targets": "support_targets.parquet",
    "support": "support.parquet",
    "report": "report.md",
}


# ----------------------------------------------------------------------------- the lock


class ExperimentLocked(ValueError):
    """Another process holds the experiment's lock; the message names it and how to proceed."""


# lock paths this process holds -> depth (the pipeline holds the lock, its stages take it again)
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (/proc; None where there is none):
    tells a live holder from a new process that got a dead holder's pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    current = _process_start(pid)
    return started is None or current is None or current == started


@contextlib.contextmanager
def _serialized(root: Path):
    """Processes taking the lock of ``root`` do so one at a time (flock on the folder, where
    the filesystem has it), so two of them never take over one stale lock together."""
    try:
        import fcntl

        fd = os.open(root, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):  # e.g. NFS without directory locks: the link alone decides
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class ExperimentLock:
    """``EXP/.lock``: created atomically (a complete file hard-linked into place, which fails
    when one exists), removed on exit. See :meth:`Experiment.lock`."""

    def __init__(self, exp: Experiment, command: str | None = None):
        self.exp = exp
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self._created: list[Path] = []
        self.key = str(exp.lock_path.resolve())  # which lock this process holds (re-entrance)

    def record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": self.command}

    def holder(self) -> dict | None:
        """The lock file's record (None: no lock); an unreadable one counts as held by an unknown process."""
        path = self.exp.lock_path
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            return holder if isinstance(holder, dict) else {"unreadable": text[:200]}
        except json.JSONDecodeError:
            return {"unreadable": text[:200]}

    def _mine(self, holder: dict) -> bool:
        return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()

    def _stale(self, holder: dict) -> bool:
        """Held by a process of this host that no longer runs (another host's cannot be checked)."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        return not _alive(holder["pid"], holder.get("process_start"))

    def refusal(self, holder: dict) -> ExperimentLocked:
        path = self.exp.lock_path
        if "unreadable" in holder:
            return ExperimentLocked(
                f"{self.exp.location} is locked by {path}, which does not name its holder: another run may be "
                f"starting; if none is, delete {path} and rerun")
        pid, host = holder.get("pid"), holder.get("host")
        stop = f"kill {pid}" if host == socket.gethostname() else f"on {host}"
        return ExperimentLocked(
            f"{self.exp.location} is in use by process {pid} on host {host} (since {holder.get('started')}: "
            f"{holder.get('command')!r}); one run at a time writes an experiment: wait for it to finish, stop it "
            f"({stop}), or use another --exp. If that process is gone, delete {path} and rerun")

    def check(self) -> None:
        holder = self.holder()
        if holder is not None and not self._mine(holder) and not self._stale(holder):
            raise self.refusal(holder)

    # ------------------------------------------------------------------ acquire / release
    def __enter__(self) -> "ExperimentLock":
        with _HELD_GUARD:
            if _HELD.get(self.key):
                _HELD[self.key] += 1
                return self
        root = self.exp.root
        self._created = [d for d in (root, *root.parents) if not d.exists()]  # removed again when left empty
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:  # e.g. no permission: nothing can be written there, so there is no writer to exclude
            self._created = []
            with _HELD_GUARD:
                _HELD[self.key] = 1
            return self
        try:
            with _serialized(root):
                self._acquire()
        except BaseException:
            self._remove_created_root()
            raise
        with _HELD_GUARD:
            _HELD[self.key] = 1
        try:
            restored = restore_asides(root)
        except BaseException:
            self._release()
            raise
        for path in restored:
            warnings.warn(f"restored {path}: a --overwrite/--force run that rewrote it stopped before the new "
                          "version passed its checks", stacklevel=2)
        return self

    def _acquire(self) -> None:
        path = self.exp.lock_path
        tmp = path.with_name(f".lock.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.record(), indent=2))
        try:
            for _ in range(20):
                try:
                    os.link(tmp, path)  # atomic, and fails when a lock exists
                    return
                except FileExistsError:
                    pass
                except OSError:  # a filesystem without hard links: exclusive create
                    try:
                        with open(path, "x") as handle:
                            handle.write(tmp.read_text())
                        return
                    except FileExistsError:
                        pass
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if "unreadable" in holder:
                    time.sleep(0.05)  # an exclusive create still writing its record
                    holder = self.holder()
                    if holder is None or "unreadable" not in holder:
                        continue
                if not self._stale(holder):
                    raise self.refusal(holder)
                warnings.warn(f"taking over the lock of {self.exp.location} from process {holder.get('pid')} "
                              f"on {holder.get('host')} (started {holder.get('started')}), which no longer runs",
                              stacklevel=3)
                self._take_over(holder)
            raise ExperimentLocked(f"could not take the lock {path} (it keeps changing hands): rerun")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: dict) -> None:
        """Remove a dead holder's lock file, unless another process replaced it meanwhile."""
        path = self.exp.lock_path
        moved = path.with_name(f".lock.stale.{os.getpid()}")
        try:
            os.replace(path, moved)
        except FileNotFoundError:
            return
        try:
            current = json.loads(moved.read_text())
        except (OSError, json.JSONDecodeError):
            current = None
        if current != stale:  # a live process took it between our read and the rename: give it back
            try:
                os.link(moved, path)
            except FileExistsError:
                pass
        moved.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        with _HELD_GUARD:
            _HELD[self.key] -= 1
            if _HELD[self.key]:
                return
            del _HELD[self.key]
        self._release()

    def _release(self) -> None:
        with _HELD_GUARD:
            _HELD.pop(self.key, None)
        holder = self.holder()
        if holder is not None and self._mine(holder):
            self.exp.lock_path.unlink(missing_ok=True)
        self._remove_created_root()

    def _remove_created_root(self) -> None:
        # a run refused before writing anything leaves no empty experiment directory behind
        for folder in self._created:  # the experiment folder first, then the parents made for it
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        self._created = []
