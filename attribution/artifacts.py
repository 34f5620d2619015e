"""The one artifact layer: atomic writes, fingerprints, stored settings, resume.

Every file a stage writes goes through :func:`atomic_path` (directly or through the
``write_*`` helpers below): it is written to a hidden temporary name beside its final
name and renamed into place, so a reader finds either the complete artifact or none,
and a later run never takes half a file for a finished one. Hidden files (leading dot)
are ignored by every reader and never uploaded by the storage layer.

Resume uses one scheme everywhere: an artifact stores the settings it was computed
with (Parquet metadata under :data:`SETTINGS_KEY`, or a JSON field), a stage compares
them with what it would compute now (:func:`reuse`), and either skips the artifact
(same settings), computes it (missing), or refuses with :class:`SettingsChanged`, whose
message lists each difference as ``key: old -> new`` and says how to proceed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

SETTINGS_KEY = b"attribution.settings"


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On an error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_table(table, path: str | os.PathLike, settings: Mapping | None = None) -> Path:
    """Write a pyarrow Table as Parquet; ``settings`` go into its metadata (see :func:`stored_settings`)."""
    import pyarrow.parquet as pq

    if settings is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[SETTINGS_KEY] = canonical_json(settings).encode()
        table = table.replace_schema_metadata(metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return Path(path)


def write_torch(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ----------------------------------------------------------------------------- reading


def visible_files(folder: str | os.PathLike, pattern: str = "*.parquet") -> list[Path]:
    """Complete files of a folder (temporary and hidden files left out), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


def read_dataset(folder: str | os.PathLike, columns: list[str] | None = None, filters=None):
    """A Parquet dataset folder as one pyarrow Table (hidden and temporary files ignored)."""
    import pyarrow.dataset as ds

    files = [str(p) for p in visible_files(folder)]
    if not files:
        raise FileNotFoundError(f"no Parquet files in {folder}: run the stage that writes it first")
    return ds.dataset(files, format="parquet").to_table(columns=columns, filter=filters)


def stored_settings(path: str | os.PathLike) -> dict | None:
    """The settings a Parquet artifact was written with (None when it has none)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(SETTINGS_KEY)
    return json.loads(raw) if raw else None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- fingerprints


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def fingerprint(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as canonical JSON: the one content key."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def ids_digest(ids) -> str:
    """Fingerprint of a sequence of integer ids (order matters)."""
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- stored settings differ


def differences(stored: Mapping, wanted: Mapping, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every (nested) key whose value differs."""
    out = []
    for key in sorted(set(stored) | set(wanted), key=str):
        old, new = stored.get(key, "(unset)"), wanted.get(key, "(unset)")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += differences(old, new, f"{prefix}{key}.")
        elif _normal(old) != _normal(new):
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def _normal(value):
    # JSON round trips turn tuples into lists: compare them as equal
    return json.loads(canonical_json(value)) if isinstance(value, (tuple, list)) else value


class SettingsChanged(ValueError):
    """An artifact exists but was made with other settings than the ones asked for now."""

    def __init__(self, what: str, changes: list[str], fix: str):
        self.what, self.changes, self.fix = what, list(changes), fix
        shown = "; ".join(self.changes[:12]) + ("; ..." if len(self.changes) > 12 else "")
        super().__init__(f"{what} was made with other settings ({shown or 'settings not recorded'}). {fix}")


def check_settings(what: str, stored: Mapping | None, wanted: Mapping, fix: str) -> None:
    """Raise :class:`SettingsChanged` unless ``stored`` equals ``wanted``."""
    changes = differences(stored or {}, wanted)
    if stored is None or changes:
        raise SettingsChanged(what, changes, fix)


def reuse(path: str | os.PathLike, wanted: Mapping, fix: str, force: bool = False) -> bool:
    """The one resume test for a Parquet artifact: True when ``path`` exists with the
    settings ``wanted`` (skip it), False when it is missing (compute it), and
    :class:`SettingsChanged` when it holds other settings (unless ``force``: then False,
    and the caller overwrites it)."""
    path = Path(path)
    if not path.exists():
        return False
    stored = stored_settings(path)
    if stored is not None and not differences(stored, wanted):
        return True
    if force:
        return False
    check_settings(str(path), stored, wanted, fix)
    return True  # unreachable: check_settings raised


# ----------------------------------------------------------------------------- destructive rewrites

ASIDE_PREFIX = ".aside-"
DISCARD_PREFIX = ".discard-"


def aside_path(path: str | os.PathLike) -> Path:
    """Where :func:`aside` keeps the old version of ``path`` while it is rewritten."""
    path = Path(path)
    return path.with_name(ASIDE_PREFIX + path.name)


@contextlib.contextmanager
def aside(paths, keep: Mapping | None = None) -> Iterator[list[Path]]:
    """Move the existing ``paths`` (files or folders) out of the way of a destructive
    rewrite (``--overwrite``, ``--force``) and yield the ones moved.

    Each is renamed to a hidden ``.aside-NAME`` beside it (hidden: no reader or upload
    sees it). If the block raises (any exception, Ctrl-C included), whatever it wrote at
    a moved path is removed and the old version is renamed back, so a rewrite that fails
    its checks destroys nothing finished. If it succeeds, the old versions are deleted,
    or renamed to ``keep[path]`` when given (pretrain keeps ``moco-<hash>.pt``). A
    process killed inside the block leaves the ``.aside-`` names: the next holder of the
    experiment lock restores them (:func:`restore_asides`)."""
    keep = {Path(k): Path(v) for k, v in (keep or {}).items()}
    moved: list[Path] = []
    try:
        for path in map(Path, paths):
            hidden = aside_path(path)
            if os.path.lexists(hidden):  # an earlier rewrite was killed: its old version is the finished one
                restore_aside(hidden)
            if os.path.lexists(path):
                os.replace(path, hidden)
                moved.append(path)
        yield list(moved)
    except BaseException:
        for path in reversed(moved):
            restore_aside(aside_path(path))
        raise
    for path in moved:
        hidden = aside_path(path)
        if path in keep:
            os.replace(hidden, keep[path])
        else:
            # renamed first, deleted second: a kill while deleting leaves a .discard- name
            # (deleted by the next lock holder), never a half-deleted .aside- to restore
            trash = path.with_name(DISCARD_PREFIX + path.name)
            _remove(trash)
            os.replace(hidden, trash)
            _remove(trash)


def restore_aside(hidden: str | os.PathLike) -> Path:
    """Put the ``.aside-NAME`` at ``hidden`` back at ``NAME``, replacing what is there now."""
    hidden = Path(hidden)
    if not hidden.name.startswith(ASIDE_PREFIX):
        raise ValueError(f"{hidden} is not an aside name ({ASIDE_PREFIX}NAME)")
    path = hidden.with_name(hidden.name[len(ASIDE_PREFIX):])
    _remove(path)
    os.replace(hidden, path)
    return path


def restore_asides(root: str | os.PathLike) -> list[Path]:
    """Restore every ``.aside-`` under ``root`` and delete every ``.discard-`` left by a
    process killed inside :func:`aside`; returns the restored paths. Call it only while
    holding the experiment's lock (no live rewrite can own them then)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted((p for p in root.rglob("*") if p.name.startswith((ASIDE_PREFIX, DISCARD_PREFIX))),
                   key=lambda p: len(p.parts))
    restored, handled = [], []
    for path in found:
        if any(parent in handled for parent in path.parents):
            continue  # inside a folder already restored or deleted
        handled.append(path)
        if path.name.startswith(DISCARD_PREFIX):
            _remove(path)
        else:
            restored.append(restore_aside(path))
    return restored


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


# ----------------------------------------------------------------------------- sharing another experiment's files


def link_or_copy(source: str | os.PathLike, path: str | os.PathLike) -> str:
    """Put the file ``source`` (another experiment's finished artifact) at ``path`` without
    ever modifying ``source``: a hard link when the filesystem allows one, else a copy.
    Returns "linked" or "copied".

    A hard link shares the bytes, which is safe because every writer of this project
    replaces a file (:func:`atomic_path`: write a temporary file, rename it into place)
    instead of writing into it, so rewriting ``path`` later gives it a new inode and
    leaves ``source`` as it was. Like every write here the new name appears atomically."""
    import shutil

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            os.link(source, tmp)
            how = "linked"
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(source, tmp)
            how = "copied"
    return how


def same_file_content(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two files hold the same bytes: one inode (a hard link) is equal without
    reading, a different size is unequal without reading, else their SHA-256 decide."""
    a, b = Path(a), Path(b)
    if not (a.is_file() and b.is_file()):
        return False
    if os.path.samefile(a, b):
        return True
    if a.stat().st_size != b.stat().st_size:
        return False
    return file_sha256(a) == file_sha256(b)
