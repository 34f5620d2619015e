"""The reference: sklearn LinearSVC, one target at a time (Singla et al.'s setting)."""

from __future__ import annotations

import warnings

import numpy as np

from .base import ESVMSolver


class SklearnESVM(ESVMSolver):
    """``LinearSVC(C=0.1, class_weight='balanced', tol=1e-6, max_iter=10000)`` per target.

    Squared hinge loss, l2 penalty, intercept_scaling=1 (liblinear regularises the
    intercept). ``dual='auto'`` is sklearn's default; both liblinear paths solve the same
    convex problem. ``random_state`` only fixes liblinear's coordinate order in the dual
    path so repeated runs give bit-identical values.
    """

    name = "sklearn"

    def __init__(self, C: float = 0.1, tol: float = 1e-6, max_iter: int = 10000,
                 dual: str | bool = "auto", random_state: int | None = 0):
        super().__init__(C)
        if not (tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        self.tol, self.max_iter, self.dual, self.random_state = float(tol), max_iter, dual, random_state
        self.n_not_converged = 0  # targets where liblinear hit max_iter (it warns)

    def get_params(self) -> dict:
        return {"C": self.C, "tol": self.tol, "max_iter": self.max_iter, "dual": self.dual,
                "random_state": self.random_state}

    def make_estimator(self):
        from sklearn.svm import LinearSVC
        return LinearSVC(C=self.C, class_weight="balanced", tol=self.tol, max_iter=self.max_iter,
                         dual=self.dual, random_state=self.random_state)

    def _decision_values(self, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        from sklearn.exceptions import ConvergenceWarning
        n = negatives.shape[0]
        out = np.empty((targets.shape[0], n), dtype=np.float32)
        y = np.zeros(n + 1, dtype=np.int64)
        y[0] = 1  # the target is class 1, so decision_function > 0 means "like the target"
        X = np.empty((n + 1, negatives.shape[1]), dtype=np.float32)
        X[1:] = negatives
        for t in range(targets.shape[0]):
            X[0] = targets[t]
            clf = self.make_estimator()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(X, y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                self.n_not_converged += 1
            out[t] = clf.decision_function(negatives)
        return out
