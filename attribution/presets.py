"""Presets: TOML files with one section per stage (benchmarks/presets/NAME.toml)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import benchmarks

PRESET_DIR = Path(benchmarks.__file__).parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a preset by name (``quickstart``) or path; ``overrides`` maps ``section.key`` to values."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise FileNotFoundError(
            f"preset {name_or_path!r} not found (looked for {path}); available: {', '.join(available_presets())}"
        )
    with open(path, "rb") as handle:
        preset = tomllib.load(handle)
    preset.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        target = preset
        for part in filter(None, section.split(".")):
            target = target.setdefault(part, {})
        target[key] = value
    return preset


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with value parsed as TOML (falls back to a string)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
