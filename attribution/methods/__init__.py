"""The registry of attribution methods: the only list of them.

    @register_method
    class MyMethod(AttributionMethod):
        name = "mine"
        stage = "rank"
        ...

    method = create_method("mine", **params)

Ranking, support, metrics, report, cost accounting and the CLI read this registry
(``available_methods()``, ``method_class(name)``); nothing else lists methods. The
built-in methods register when their modules are imported at the end of this file
(method modules import torch and the like only inside ``fit`` / ``score``, so the
registry stays cheap to import); registration order is the order of tables and plots.
"""

from __future__ import annotations

from attribution.methods.base import (
    AttributionMethod,
    CostSpec,
    ScoreBlock,
    Targets,
    TrainingData,
    fill_outside,
)

_REGISTRY: dict[str, type[AttributionMethod]] = {}


def register_method(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, AttributionMethod)):
        raise TypeError(f"{cls!r} is not an AttributionMethod subclass")
    if not cls.name or not cls.stage:
        raise ValueError(f"{cls.__name__} must set the class attributes name and stage")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"method {cls.name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods(stage: str | None = None) -> list[str]:
    """Names of the registered methods (of one stage when given), in registration order."""
    return [name for name, cls in _REGISTRY.items() if stage is None or cls.stage == stage]


def method_class(name: str) -> type[AttributionMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attribution method {name!r}; choose from {available_methods()}")
    return _REGISTRY[name]


def create_method(name: str, **params) -> AttributionMethod:
    """A new, unfitted method by registry name, with its constructor parameters."""
    return method_class(name)(**params)


def order_methods(methods) -> list[str]:
    """``methods`` in registry order; unregistered names (e.g. from an old experiment) last, sorted."""
    known = available_methods()
    methods = list(dict.fromkeys(methods))
    return [m for m in known if m in methods] + sorted(m for m in methods if m not in known)


__all__ = ["AttributionMethod", "CostSpec", "ScoreBlock", "Targets", "TrainingData", "fill_outside",
           "register_method", "available_methods", "method_class", "create_method", "order_methods"]


# The built-in methods (each module registers its classes); a new method adds its module here.
from attribution.methods import similarity  # noqa: E402,F401  esvm, l2, cosine, random
from attribution.methods import trak  # noqa: E402,F401
from attribution.methods import datamodels  # noqa: E402,F401
