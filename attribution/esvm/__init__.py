"""Exemplar-SVM solvers behind one interface.

    solver = get_solver("batched", C=0.1)           # or "sklearn" (reference), "thundersvm"
    scores = solver.decision_values(targets, negatives)   # (T, d), (N, d) -> (T, N) float32

Every solver fits, for each target row, the ESVM with that target as the only positive
and all negatives (the same-class training embeddings), and returns the negatives'
decision values; see :mod:`attribution.esvm.base` for the exact objective.
"""

from __future__ import annotations

from .base import ESVMSolver, balanced_costs, validate_inputs

SOLVERS = ("sklearn", "thundersvm", "batched")


def get_solver(name: str, **params) -> ESVMSolver:
    """The solver called ``name`` ("sklearn", "thundersvm" or "batched") built with ``params``.

    Params are the solver class's keyword arguments (e.g. C, tol, max_iter, device).
    """
    if name == "sklearn":
        from .sklearn_solver import SklearnESVM
        return SklearnESVM(**params)
    if name == "thundersvm":
        from .thundersvm_solver import ThunderSVMESVM
        return ThunderSVMESVM(**params)
    if name == "batched":
        from .batched import BatchedESVM
        return BatchedESVM(**params)
    raise ValueError(f"unknown ESVM solver name {name!r}; choose one of {list(SOLVERS)} "
                     "('sklearn' is the reference, 'batched' the fast torch solver)")


def __getattr__(attr):  # lazy: importing the package must not import torch or sklearn
    if attr == "SklearnESVM":
        from .sklearn_solver import SklearnESVM
        return SklearnESVM
    if attr == "ThunderSVMESVM":
        from .thundersvm_solver import ThunderSVMESVM
        return ThunderSVMESVM
    if attr == "BatchedESVM":
        from .batched import BatchedESVM
        return BatchedESVM
    raise AttributeError(attr)


__all__ = ["ESVMSolver", "get_solver", "SOLVERS", "balanced_costs", "validate_inputs",
           "SklearnESVM", "ThunderSVMESVM", "BatchedESVM"]
