"""One settings layer: a typed dataclass per preset section, parsed and validated once.

A preset (TOML; :mod:`attribution.presets`) has one section per stage plus ``[data]``.
Each section is a :class:`Section` subclass: its fields are the keys, with defaults,
types and allowed values declared by :func:`setting`. :meth:`Section.from_preset`
refuses unknown keys by name, checks every value against its declared type and range
(``rank.top_k must be an integer >= 1, got 'abc'``), fills ``seed = None`` from the
preset's top-level seed, and runs the section's own :meth:`Section.check` for rules
that involve several keys. :func:`parse_settings` does this for every section of a
preset before any stage starts, so a bad ``--set`` is refused before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

_UNSET = object()


def setting(default: Any = _UNSET, *, choices: tuple | None = None, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False,
            default_factory=None, help: str = ""):
    """A section field: ``choices`` (allowed values, also for each item of a tuple field),
    ``low`` / ``high`` bounds (inclusive unless ``*_open``), a one-line ``help``."""
    metadata = {"choices": choices, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "help": help}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class SettingsError(ValueError):
    """A preset value is missing, unknown or out of range; the message names the key."""


def did_you_mean(unknown, known) -> str:
    """`` (did you mean 'top_k'?)`` for the words of ``unknown`` close to one of ``known``
    (difflib), ``""`` when none is: every "unknown name" message of the project uses it."""
    words = [unknown] if isinstance(unknown, str) else list(unknown)
    known = [str(k) for k in known]
    hints = []
    for word in words:
        match = difflib.get_close_matches(str(word), known, n=1, cutoff=0.6)
        if match:
            hints.append(f"{match[0]!r}" + (f" for {word!r}" if len(words) > 1 else ""))
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


@dataclass
class Section:
    """Base of every preset section's settings (a dataclass: one field per key)."""

    section: ClassVar[str] = ""

    @classmethod
    def from_preset(cls, preset: Mapping) -> "Section":
        values = preset.get(cls.section)
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise SettingsError(f"[{cls.section}] must be a table of settings, got {values!r}")
        return cls.from_dict(values, preset_seed=preset.get("seed", 0))

    @classmethod
    def from_dict(cls, values: Mapping, preset_seed: int = 0) -> "Section":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"unknown [{cls.section}] setting(s) {unknown}{did_you_mean(unknown, known)}; "
                                f"known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        parsed = {name: _coerce(f"{cls.section}.{name}", values[name], hints[name], known[name].metadata)
                  for name in values}
        settings = cls(**parsed)
        if "seed" in known and settings.seed is None:
            settings.seed = _coerce(f"{cls.section}.seed", preset_seed, int, {})
        settings.check()
        return settings

    def check(self) -> None:
        """Rules involving several keys; raise :class:`SettingsError` naming them."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def defaults(cls) -> dict:
        """{key: default} of the keys that have one, in :meth:`to_dict`'s form."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = _plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = _plain(f.default_factory())
        return out

    def fail(self, key: str, message: str):
        raise SettingsError(f"{self.section}.{key} {message}")


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(kind) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}
    if kind in names:
        return names[kind]
    origin = typing.get_origin(kind)
    if origin in (tuple, list):
        return "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "unset" for a in typing.get_args(kind))
    return getattr(kind, "__name__", str(kind))


def _coerce(key: str, value: Any, kind, meta: Mapping) -> Any:
    """``value`` checked against the annotation ``kind`` and the field's metadata."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg, meta)
            except SettingsError as error:
                errors.append(error)
        raise SettingsError(f"{key} must be {_describe(kind)}{_range(meta)}, got {value!r}")
    if origin in (tuple, list):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise SettingsError(f"{key} must be a list, got {value!r}")
        (item_kind, *_rest) = typing.get_args(kind) or (Any,)
        return tuple(_coerce(f"{key}[{i}]", item, item_kind, meta) for i, item in enumerate(items))
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key} must be an integer{_range(meta)}, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key} must be a number{_range(meta)}, got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise SettingsError(f"{key} must be a string, got {value!r}")
    elif kind is dict:
        if not isinstance(value, Mapping):
            raise SettingsError(f"{key} must be a table, e.g. {key.rpartition('.')[2]} = {{ C = 0.1 }}, got {value!r}")
        return dict(value)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise SettingsError(f"{key} must be one of {list(choices)}, got {value!r}"
                            + (did_you_mean(value, choices) if isinstance(value, str) else ""))
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        raise SettingsError(f"{key} must be {_range(meta).strip()}, got {value!r}")
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        raise SettingsError(f"{key} must be {_range(meta).strip()}, got {value!r}")
    return value


def _range(meta: Mapping) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        left, right = "(" if meta.get("low_open") else "[", ")" if meta.get("high_open") else "]"
        return f" in {left}{low}, {high}{right}"
    if low is not None:
        return f" {'>' if meta.get('low_open') else '>='} {low}"
    if high is not None:
        return f" {'<' if meta.get('high_open') else '<='} {high}"
    return ""


# ----------------------------------------------------------------------------- [data]


@dataclass
class DataSettings(Section):
    """The [data] section: which images every stage works on (parsed once, here)."""

    section: ClassVar[str] = "data"

    dataset: str = setting("fashion-mnist", choices=("fashion-mnist", "cifar10", "imagenet"),
                           help="dataset name")
    root: str = setting("", help="dataset folder; empty: the dataset's default location")
    train_per_class: int = setting(0, low=0, help="training images per class (0: the whole split)")
    test_per_class: int = setting(0, low=0, help="test images per class (0: the whole split)")
    seed: int | None = setting(None, help="seed of the per-class subsets; unset: the preset's seed")

    def root_or_none(self) -> str | None:
        return self.root or None

    def load(self, split: str, subset: bool = True):
        """The ImageSet of ``split`` (``subset``: the per-class subset the stages use)."""
        from attribution.data import load_dataset

        per_class = (self.train_per_class if split == "train" else self.test_per_class) if subset else 0
        return load_dataset(self.dataset, split, self.root_or_none(), n_per_class=per_class or None,
                            seed=int(self.seed))

    def spec(self, split: str):
        """The :class:`attribution.data.DatasetSpec` of ``split``'s subset (what embedding workers load)."""
        from attribution.data import DatasetSpec

        per_class = self.train_per_class if split == "train" else self.test_per_class
        return DatasetSpec(self.dataset, split, self.root_or_none(), per_class or None, int(self.seed))

    def check_available(self) -> None:
        """:class:`attribution.data.DatasetNotFoundError` when the dataset's files are not where
        data.root says (existence only, nothing read: the stages' preflight). Without a root,
        Fashion-MNIST is looked up (system copy, cache, download) by the loader itself."""
        from pathlib import Path

        from attribution.data import FASHION_MNIST_FILES, DatasetNotFoundError

        root = Path(self.root).expanduser() if self.root else None
        if self.dataset == "fashion-mnist":
            if root is None:
                return
            names = [name for pair in FASHION_MNIST_FILES.values() for name in pair]
            folders, holding = (root, root / "FashionMNIST" / "raw"), ", ".join(names)
        elif self.dataset == "cifar10":
            names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
            folders = (root, root / "cifar-10-batches-py") if root else ()
            holding = "cifar-10-batches-py/ (torchvision's layout)"
        else:
            names = ["train", "val"]
            folders, holding = ((root,) if root else ()), "train/ and val/ (ImageFolder layout)"
        fix = f"--set data.root=PATH, the folder holding {holding}"
        if root is None:
            raise DatasetNotFoundError(f"data.dataset = {self.dataset!r} needs data.root: {fix}")
        if not root.is_dir():
            raise DatasetNotFoundError(f"data.root {str(root)!r} ({self.dataset}) does not exist: {fix}")
        if not any(all((folder / name).exists() for name in names) for folder in folders):
            missing = [name for name in names if not (root / name).exists()]
            raise DatasetNotFoundError(f"data.root {str(root)!r} ({self.dataset}) lacks {', '.join(missing)} (looked "
                                       f"in {' and '.join(str(f) for f in folders)}): {fix}")

    def key(self) -> dict:
        """What identifies the training subset (part of every retraining fingerprint)."""
        return {"dataset": self.dataset, "root": self.root_or_none(),
                "train_per_class": self.train_per_class or None, "seed": int(self.seed)}


# ----------------------------------------------------------------------------- the whole preset

TOP_LEVEL_KEYS = ("name", "seed", "ablation", "description")


class Settings:
    """Every section of one preset, parsed once: ``settings.data``, ``settings["rank"]``.

    ``sections`` maps section names to their :class:`Section` classes (the stage
    registry provides them). Sections absent from the preset are parsed from defaults
    when asked for (a stage may read another stage's section, e.g. the retraining recipe
    of [support]); ``present`` lists the ones the preset has (the stages that run)."""

    def __init__(self, preset: Mapping, sections: Mapping[str, type[Section]]):
        self.preset = dict(preset)
        self.name = str(preset.get("name", "preset"))
        self.seed = _coerce("seed", preset.get("seed", 0), int, {})
        known = set(sections) | {DataSettings.section}
        unknown = sorted(k for k, v in preset.items() if isinstance(v, Mapping) and k not in known)
        unknown += sorted(k for k, v in preset.items() if not isinstance(v, Mapping) and k not in TOP_LEVEL_KEYS)
        if unknown:
            raise SettingsError(f"unknown preset section(s) or key(s) {unknown}"
                                f"{_suggest_names(unknown, preset, sections)}; known sections: "
                                f"{sorted(known)}, top-level keys: {list(TOP_LEVEL_KEYS)}")
        self._classes = dict(sections)
        self._parsed: dict[str, Section] = {"data": DataSettings.from_preset(preset)}
        self.present = [name for name in sections if name in preset]
        for name in self.present:  # every present section validated now, before any work
            self[name]

    @property
    def data(self) -> DataSettings:
        return self._parsed["data"]

    def __getitem__(self, section: str) -> Section:
        if section not in self._parsed:
            if section not in self._classes:
                raise KeyError(f"no settings class for section [{section}]")
            self._parsed[section] = self._classes[section].from_preset(self.preset)
        return self._parsed[section]

    def __contains__(self, section: str) -> bool:
        return section in self.preset


def _suggest_names(unknown, preset: Mapping, sections: Mapping[str, type[Section]]) -> str:
    """Close matches for unknown preset names: a section (``suport`` -> ``support``), a
    top-level key, or, for a bare key that belongs to sections (``top_k``), ``rank.top_k``."""
    known = sorted(set(sections) | {DataSettings.section}) + list(TOP_LEVEL_KEYS)
    classes = {DataSettings.section: DataSettings, **sections}
    hints = []
    for name in unknown:
        owners = [f"{section}.{name}" for section, cls in classes.items()
                  if name in {f.name for f in dataclasses.fields(cls)}]
        if owners and not isinstance(preset.get(name), Mapping):
            hints.append(" or ".join(repr(o) for o in owners) + (f" for {name!r}" if len(unknown) > 1 else ""))
            continue
        match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if match:
            hints.append(f"{match[0]!r}" + (f" for {name!r}" if len(unknown) > 1 else ""))
    return f" (did you mean {', '.join(hints)}?)" if hints else ""
