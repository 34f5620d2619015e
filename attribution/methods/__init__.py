"""The registry of attribution methods: the only list of them.

    @register_method
    class MyMethod(AttributionMethod):
        name = "mine"
        stage = "rank"
        ...

    method = create_method("mine", **params)

A stage may produce several *variants* of one method (a budget sweep, a same-class
restriction): ``"trak@m20"``, ``"datamodels@n1000"``, ``"trak@same-class"``. A variant
name is ``<registered name>@<tag>`` (:func:`variant_name`); it resolves to the
registered class (:func:`method_class`), has its own rankings, score blocks and cost,
and is listed right after its base method (:func:`order_methods`).

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


VARIANT_SEPARATOR = "@"


def variant_name(base: str, tag: str) -> str:
    """``<base>@<tag>``: the name of a variant of the registered method ``base``."""
    method_class(base)
    tag = str(tag)
    if not tag or not all(ch.isalnum() or ch in "-_." for ch in tag):
        raise ValueError(f"variant tag {tag!r} of {base!r}: use letters, digits, '-', '_' or '.'")
    return f"{base}{VARIANT_SEPARATOR}{tag}"


def split_variant(name: str) -> tuple[str, str | None]:
    """(base name, variant tag or None) of a method or variant name."""
    base, sep, tag = str(name).partition(VARIANT_SEPARATOR)
    return base, (tag if sep else None)


def method_class(name: str) -> type[AttributionMethod]:
    """The registered class of a method or of a variant (``<base>@<tag>``)."""
    base, _ = split_variant(name)
    if base not in _REGISTRY:
        raise ValueError(f"unknown attribution method {name!r}; choose from {available_methods()}"
                         + (" (a variant is <method>@<tag>)" if _ else ""))
    return _REGISTRY[base]


def is_method(name: str) -> bool:
    """Whether ``name`` is a registered method or a variant of one."""
    return split_variant(name)[0] in _REGISTRY


def create_method(name: str, **params) -> AttributionMethod:
    """A new, unfitted method by registry name, with its constructor parameters."""
    return method_class(name)(**params)


def _natural(text: str) -> list:
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def order_methods(methods) -> list[str]:
    """``methods`` in registry order, each base followed by its variants (tags in natural
    order: m1, m5, m20); unregistered names (e.g. from an old experiment) last, sorted."""
    known = available_methods()
    methods = list(dict.fromkeys(methods))
    ordered = []
    for base in known:
        if base in methods:
            ordered.append(base)
        tags = sorted((split_variant(m)[1] for m in methods if m != base and split_variant(m)[0] == base), key=_natural)
        ordered += [variant_name(base, tag) for tag in tags]
    return ordered + sorted(m for m in methods if m not in ordered)


__all__ = ["AttributionMethod", "CostSpec", "ScoreBlock", "Targets", "TrainingData", "fill_outside",
           "register_method", "available_methods", "method_class", "create_method", "order_methods",
           "variant_name", "split_variant", "is_method", "VARIANT_SEPARATOR"]


# The built-in methods (each module registers its classes); a new method adds its module here.
from attribution.methods import similarity  # noqa: E402,F401  esvm, l2, cosine, random
from attribution.methods import trak  # noqa: E402,F401
from attribution.methods import datamodels  # noqa: E402,F401
from attribution.methods import gradient  # noqa: E402,F401  tracin, grad-dot, grad-cos, if-cg, ekfac
