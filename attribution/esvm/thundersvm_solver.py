"""thundersvm-cpu (PyPI ``thundersvm-cpu`` 0.3.3), linear kernel, one target at a time.

It is not the same problem as the reference: thundersvm is libsvm's SMO, i.e. the plain
hinge loss with an unregularised intercept, so its rankings agree with LinearSVC's only
approximately; and it is about 30x slower than liblinear here. Kept as the GPU-capable
option of the original code and for comparison.
"""

from __future__ import annotations

import numpy as np

from .base import ESVMSolver, balanced_costs

INSTALL_HINT = (
    "the 'thundersvm' solver needs the thundersvm CPU build: pip install thundersvm-cpu==0.3.3 "
    "(or the extra: pip install 'image-attribution[thundersvm]'); or use get_solver('batched') "
    "(fast, same objective as the reference) or get_solver('sklearn') (the reference). Note: the "
    "PyPI 'thundersvm' GPU wheel is a CUDA 9.0 build (needs libcusparse.so.9.0) that cannot load "
    "on current systems."
)


def _import_svc():
    try:
        from thundersvm import SVC
    except Exception as exc:  # ImportError, or OSError from a wheel whose shared library won't load
        raise ImportError(f"{INSTALL_HINT} (import failed: {type(exc).__name__}: {exc})") from exc
    return SVC


class ThunderSVMESVM(ESVMSolver):
    """thundersvm ``SVC(kernel='linear')`` with the 'balanced' class weights passed explicitly.

    thundersvm has no class_weight='balanced'; the weights are computed as sklearn would
    (1 positive, N negatives). n_jobs: CPU threads thundersvm may use (-1: all).
    """

    name = "thundersvm"

    def __init__(self, C: float = 0.1, tol: float = 1e-3, max_iter: int = -1, n_jobs: int = 1):
        super().__init__(C)
        if not (tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        self.tol, self.max_iter, self.n_jobs = float(tol), int(max_iter), int(n_jobs)
        self._SVC = _import_svc()  # fail at construction with the install hint, not mid-run

    def get_params(self) -> dict:
        return {"C": self.C, "tol": self.tol, "max_iter": self.max_iter, "n_jobs": self.n_jobs}

    def _decision_values(self, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        n = negatives.shape[0]
        c_pos, c_neg = balanced_costs(self.C, n)
        out = np.empty((targets.shape[0], n), dtype=np.float32)
        X = np.empty((n + 1, negatives.shape[1]), dtype=np.float64)
        X[1:] = negatives
        y = np.zeros(n + 1, dtype=np.float64)
        y[0] = 1.0
        for t in range(targets.shape[0]):
            X[0] = targets[t]
            model = self._SVC(kernel="linear", C=self.C, tol=self.tol, max_iter=self.max_iter,
                              n_jobs=self.n_jobs,
                              class_weight={1: c_pos / self.C, 0: c_neg / self.C})
            model.fit(X, y)
            # libsvm orients the decision function towards the first label it sees; the
            # target is row 0, so positive values mean "like the target", as in sklearn.
            out[t] = np.asarray(model.decision_function(negatives), dtype=np.float64).ravel()
        return out
