"""Exemplar-SVM solvers behind one interface, and the registry of solvers.

    solver = get_solver("batched", C=0.1)           # or "sklearn" (reference), "thundersvm"
    scores = solver.decision_values(targets, negatives)   # (T, d), (N, d) -> (T, N) float32

Every solver fits, for each target row, the ESVM with that target as the only positive
and all negatives (the same-class training embeddings), and returns the negatives'
decision values; see :mod:`attribution.esvm.base` for the exact objective.

:data:`SOLVER_CLASSES` is the only list of solvers: name -> "module:Class" (modules are
imported on first use, so importing this package imports neither torch nor sklearn).
A new solver is one entry there.
"""

from __future__ import annotations

import importlib

from .base import ESVMSolver, balanced_costs, validate_inputs

SOLVER_CLASSES = {
    "sklearn": "attribution.esvm.sklearn_solver:SklearnESVM",        # the reference LinearSVC
    "thundersvm": "attribution.esvm.thundersvm_solver:ThunderSVMESVM",
    "batched": "attribution.esvm.batched:BatchedESVM",               # the fast torch solver
}
SOLVERS = tuple(SOLVER_CLASSES)  # the registered names, in registry order


def available_solvers() -> list[str]:
    return list(SOLVER_CLASSES)


def solver_class(name: str) -> type[ESVMSolver]:
    """The solver class registered as ``name`` (imports its module)."""
    if name not in SOLVER_CLASSES:
        raise ValueError(f"unknown ESVM solver name {name!r}; choose one of {available_solvers()} "
                         "('sklearn' is the reference, 'batched' the fast torch solver)")
    module, _, attr = SOLVER_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def get_solver(name: str, **params) -> ESVMSolver:
    """The solver called ``name`` built with ``params``.

    Params are the solver class's keyword arguments (e.g. C, tol, max_iter, device).
    """
    return solver_class(name)(**params)


def __getattr__(attr):  # lazy: importing the package must not import torch or sklearn
    for name, path in SOLVER_CLASSES.items():
        if path.rpartition(":")[2] == attr:
            return solver_class(name)
    raise AttributeError(attr)


__all__ = ["ESVMSolver", "get_solver", "solver_class", "available_solvers", "SOLVER_CLASSES", "SOLVERS",
           "balanced_costs", "validate_inputs", "SklearnESVM", "ThunderSVMESVM", "BatchedESVM"]
