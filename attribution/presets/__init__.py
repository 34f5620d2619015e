"""Presets: TOML files with one section per stage, shipped as package data (attribution/presets/NAME.toml)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent


ABLATIONS_FILE = PRESET_DIR / "ablations.toml"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if p != ABLATIONS_FILE)


def load_ablations() -> dict[str, dict[str, Any]]:
    """The ablations any preset can take (attribution/presets/ablations.toml): name ->
    {description, set: {section.key: value}, drop: [stage, ...], add: {section: {key: value}}}."""
    with open(ABLATIONS_FILE, "rb") as handle:
        return tomllib.load(handle)


def apply_ablation(preset: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of ``preset`` with ablation ``name`` applied (its ``drop`` stages removed,
    its ``add`` sections added (stages the preset does not run, e.g. the gradient family),
    its ``set`` values written); ``preset["ablation"]`` records the name."""
    from attribution.settings import SettingsError, did_you_mean

    ablations = load_ablations()
    if name not in ablations:
        raise SettingsError(f"unknown ablation {name!r}{did_you_mean(name, ablations)}; choose one of "
                            f"{sorted(ablations)} (defined in {ABLATIONS_FILE})")
    ablation = ablations[name]
    out = {key: (dict(value) if isinstance(value, dict) else value) for key, value in preset.items()}
    for stage in ablation.get("drop", []):
        out.pop(stage, None)
    for section, values in ablation.get("add", {}).items():
        out[section] = {**dict(out.get(section) or {}), **dict(values)}
    for dotted, value in ablation.get("set", {}).items():
        section = dotted.split(".")[0]
        if section not in out:  # a stage the preset does not run: the ablation would add it with defaults
            raise SettingsError(f"ablation {name!r} sets {dotted}, but preset {preset.get('name', '?')!r} has no "
                                f"[{section}] section: this ablation does not apply to it (choose another of "
                                f"{sorted(ablations)}, or a preset that runs the {section} stage)")
        _set(out, dotted, value)
    out["ablation"] = name
    return out


def _set(preset: dict[str, Any], dotted: str, value: Any) -> None:
    from attribution.settings import SettingsError

    section, _, key = dotted.rpartition(".")
    target, walked = preset, []
    for part in filter(None, section.split(".")):
        walked.append(part)
        target = target.setdefault(part, {})
        if not isinstance(target, dict):  # e.g. rank.methods.x: methods is a list, not a table
            raise SettingsError(f"cannot set {dotted}: {'.'.join(walked)} is {target!r}, not a table of "
                                "settings; write --set SECTION.KEY=VALUE, e.g. --set rank.top_k=100")
    target[key] = value


def load_preset(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                ablation: str | None = None) -> dict[str, Any]:
    """Load a preset by name (``quickstart``) or path; ``ablation`` names an entry of
    ablations.toml (applied first); ``overrides`` maps ``section.key`` to values."""
    from attribution.settings import SettingsError, did_you_mean

    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        hint = did_you_mean(str(name_or_path), available_presets()) if path.parent == PRESET_DIR else ""
        raise FileNotFoundError(
            f"preset {str(name_or_path)!r} not found (looked for {path}){hint}; give a preset name "
            f"({', '.join(available_presets())}) or the path of a .toml file"
        )
    try:
        with open(path, "rb") as handle:
            preset = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"preset file {path} is not valid TOML ({error}); fix that line of the file") from error
    preset.setdefault("name", path.stem)
    if ablation:
        preset = apply_ablation(preset, ablation)
    return with_overrides(preset, overrides)


def with_overrides(preset: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``preset`` with ``section.key`` overrides written (in place; returned for chaining)."""
    for dotted, value in (overrides or {}).items():
        _set(preset, dotted, value)
    return preset


def section_settings(cls, preset: dict[str, Any], section: str):
    """``cls`` (a dataclass with a ``seed`` field) built from ``preset[section]``; unknown
    keys are refused by name, and a missing seed takes the preset's top-level seed."""
    from dataclasses import fields

    values = dict(preset.get(section) or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown [{section}] setting(s) {unknown}; known: {sorted(known)}")
    settings = cls(**values)
    if settings.seed is None:
        settings.seed = int(preset.get("seed", 0))
    return settings


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with value parsed as TOML (falls back to a string). Only the
    shape is checked here; the settings layer checks that the key exists and the value fits."""
    from attribution.settings import SettingsError

    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key or any(not part for part in key.split(".")):
        raise SettingsError(f"--set {text!r} must look like SECTION.KEY=VALUE, e.g. --set rank.top_k=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def parse_overrides(texts) -> dict[str, Any]:
    """Every ``--set`` of a command, in order (a key given twice: the last value counts)."""
    return dict(parse_override(text) for text in texts or [])
