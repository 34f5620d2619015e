"""The registry of stages: the only list of them, in pipeline order.

    @register_stage
    class MyStage(Stage):
        name = "mine"
        settings_class = MySettings     # section [mine]
        reads = ("rankings",)
        writes = ("mine",)
        ...

The pipeline (``cluster.pipeline``) and the CLI (one subcommand per stage) iterate
:func:`available_stages`; the settings layer parses each stage's section. A stage runs
in a preset when the preset has its section. The order is the registration order of
the modules imported at the end of this file: each stage comes after the stages that
write what it reads.
"""

from __future__ import annotations

from attribution.stages.base import Flag, Plan, Stage, StageInputMissing

_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if not (isinstance(cls, type) and issubclass(cls, Stage)) or not cls.name:
        raise TypeError(f"{cls!r} must be a Stage subclass with a name")
    section = cls.settings_class.section
    if section != cls.name:
        raise ValueError(f"stage {cls.name!r}: its settings class reads section [{section}], expected [{cls.name}]")
    _REGISTRY[cls.name] = cls
    return cls


def available_stages() -> list[str]:
    return list(_REGISTRY)


def stage_class(name: str) -> type[Stage]:
    if name not in _REGISTRY:
        from attribution.settings import did_you_mean

        raise ValueError(f"unknown stage {name!r}{did_you_mean(name, _REGISTRY)}; stages: {available_stages()}")
    return _REGISTRY[name]


def settings_sections() -> dict:
    """{section name: Section class} of every stage (the settings layer parses these)."""
    return {name: cls.settings_class for name, cls in _REGISTRY.items()}


def producer_of(artifact: str) -> str:
    """The stage that writes ``artifact`` (the first, in pipeline order)."""
    for name, cls in _REGISTRY.items():
        if artifact in cls.writes:
            return name
    return "(no stage)"


def parse_settings(preset: dict):
    """Every section of ``preset`` parsed and validated: :class:`attribution.settings.Settings`."""
    from attribution.settings import Settings

    return Settings(preset, settings_sections())


def select_stages(names) -> list[str]:
    """Stage names from a user's list (``--stages``), checked: unknown names are refused."""
    if names is None:
        return available_stages()
    if isinstance(names, str):
        names = names.split(",")
    from attribution.settings import SettingsError, did_you_mean

    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in _REGISTRY]
    if not names:
        raise SettingsError(f"--stages is empty; give comma-separated stage names: {', '.join(available_stages())}")
    if unknown:
        raise SettingsError(f"unknown stage(s) {unknown}{did_you_mean(unknown, _REGISTRY)}; stages: "
                            f"{', '.join(available_stages())}")
    return [n for n in available_stages() if n in names]


__all__ = ["Flag", "Plan", "Stage", "StageInputMissing", "register_stage", "available_stages", "stage_class",
           "settings_sections", "producer_of", "parse_settings", "select_stages"]


# The stages, in pipeline order (each module registers its stage class).
from attribution.stages import pretrain  # noqa: E402,F401
from attribution.stages import embed  # noqa: E402,F401
from attribution.stages import rank  # noqa: E402,F401
from attribution.stages import trak  # noqa: E402,F401  baselines write scores + rankings before support reads every method
from attribution.stages import datamodels  # noqa: E402,F401
from attribution.stages import gradient  # noqa: E402,F401  tracin, grad-dot, grad-cos, if-cg, ekfac
from attribution.stages import further  # noqa: E402,F401  the further-training gold standard (reads gradient)
from attribution.stages import support  # noqa: E402,F401
from attribution.stages import report  # noqa: E402,F401
