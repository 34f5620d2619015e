"""The Exemplar-SVM solver interface shared by every solver.

An Exemplar SVM (Malisiewicz et al. 2011; Singla et al. 2023 for attribution) has one
positive, the target embedding, and many negatives, here the same-class training
embeddings. Its decision value on each negative is that negative's attribution score.
All targets of one class share the negatives, so solvers take every target of a class
at once and may share work between them (the batched solver does).

The reference problem (sklearn ``LinearSVC(C=0.1, class_weight='balanced', tol=1e-6,
max_iter=10000)``) for one target x_t with negatives x_1..x_N, z = [x; 1]:

    min_{v=[w;b]}  1/2 ||v||^2 + C_pos * max(0, 1 - z_t.v)^2 + C_neg * sum_i max(0, 1 + z_i.v)^2

with 'balanced' weights C_pos = C (N+1)/2 and C_neg = C (N+1)/(2N). The intercept b is
regularised like the weights because liblinear appends intercept_scaling (=1) as a
constant feature; every solver here solves this same objective so they can be compared.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


def balanced_costs(C: float, n_negatives: int) -> tuple[float, float]:
    """(C_pos, C_neg) of sklearn's class_weight='balanced' for 1 positive and N negatives.

    sklearn: weight_c = n_samples / (n_classes * count_c), so the lone positive weighs
    (N+1)/2 and each negative (N+1)/(2N); both classes carry the same total weight.
    """
    n = n_negatives + 1
    return C * n / 2.0, C * n / (2.0 * n_negatives)


def _as_matrix(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    except Exception as exc:  # e.g. ragged lists
        raise ValueError(f"{name} must be a 2-D numeric array; could not convert it: {exc}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows = embeddings, shape (n, d)); got shape {arr.shape}. "
                         f"Reshape a single embedding with {name}[None, :].")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
        raise ValueError(f"{name} holds NaN or infinite values in {len(bad)} row(s) (first rows: "
                         f"{bad[:5].tolist()}); fix or drop those embeddings before fitting ESVMs "
                         "(non-finite features usually mean a diverged or corrupt backbone).")
    return arr


def validate_inputs(targets: Any, negatives: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert (targets, negatives) to C-contiguous float32 matrices.

    Raises ValueError naming the argument and the fix for: non-2-D input, non-numeric
    dtype, NaN/inf values, no negatives, and a feature-dimension mismatch.
    """
    targets = _as_matrix(targets, "targets")
    negatives = _as_matrix(negatives, "negatives")
    if negatives.shape[0] == 0:
        raise ValueError("negatives is empty (shape (0, d)): an ESVM needs at least one negative. "
                         "Pass the same-class training embeddings; a class with no training images "
                         "cannot be ranked.")
    if targets.shape[1] != negatives.shape[1]:
        raise ValueError(f"dimension mismatch: targets have {targets.shape[1]} features but negatives "
                         f"have {negatives.shape[1]}; embed both with the same backbone/projection.")
    if negatives.shape[1] == 0:
        raise ValueError("negatives have 0 features; pass embeddings with d >= 1")
    return targets, negatives


class ESVMSolver(abc.ABC):
    """Fits one Exemplar SVM per target against shared negatives.

    Subclasses implement :meth:`_decision_values` on validated float32 arrays.
    """

    name: str = "abstract"

    def __init__(self, C: float = 0.1):
        if not (isinstance(C, (int, float)) and np.isfinite(C) and C > 0):
            raise ValueError(f"C must be a positive finite number, got {C!r}")
        self.C = float(C)

    def decision_values(self, targets, negatives) -> np.ndarray:
        """(T, N) float32: row t = decision values of all N negatives under target t's ESVM.

        targets: (T, d) float32, negatives: (N, d) float32 (array-likes or torch tensors).
        Higher value = the negative is more like the target (ranked earlier).
        """
        targets, negatives = validate_inputs(targets, negatives)
        if targets.shape[0] == 0:
            return np.zeros((0, negatives.shape[0]), dtype=np.float32)
        out = np.asarray(self._decision_values(targets, negatives), dtype=np.float32)
        assert out.shape == (targets.shape[0], negatives.shape[0]), out.shape
        return out

    @abc.abstractmethod
    def _decision_values(self, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        ...

    def get_params(self) -> dict:
        return {"C": self.C}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
