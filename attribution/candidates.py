"""Candidate training items for each target, and the l2 / cosine k-NN rankings, via FAISS.

The reference method scores, for a target test image of class ``y``, the training
images of class ``y`` only ("same-class" restriction). :class:`CandidateIndex` holds
the training embeddings in one exact (flat) FAISS index per class, built lazily the
first time a class is asked for, plus one over all classes for the all-classes
ablation (``same_class=False``). Per-class partitions (rather than one index searched
with an ``IDSelector``) are used because they work unchanged on GPU indexes, where
selectors are not supported for every index type, and because a class's partition is
exactly the candidate set.

Metrics:
- ``"l2"``: ``IndexFlatL2``; the score of a training item is the *negative* Euclidean
  distance (higher = closer = more influential), so every ranking sorts scores high to
  low.
- ``"cosine"``: ``IndexFlatIP`` on L2-normalised vectors; the score is the cosine
  similarity (a zero vector has similarity 0 with everything).

FAISS selects the nearest items (on GPU when ``faiss.get_num_gpus() > 0`` and
``device`` allows it); the selected items are then re-scored exactly in float64 and
sorted by (score descending, train id ascending). FAISS's float32 distances depend on
how queries are batched (BLAS vs. direct loops), so this makes results independent of
batching and equal to a numpy brute force; ties are broken by train id.

Returned ids are the training items' ids (the ``id`` column of the embeddings), never
positions.
"""

from __future__ import annotations

import numpy as np

METRICS = ("l2", "cosine")
DEVICES = ("auto", "cpu", "gpu")
# FAISS GPU flat indexes return at most this many neighbours per query.
GPU_MAX_K = 2048
# Extra neighbours fetched beyond k so float32 rounding in FAISS cannot drop an item
# that the exact float64 re-score would place inside the top k.
_SEARCH_MARGIN = 16


def check_finite(features: np.ndarray, ids: np.ndarray, what: str) -> None:
    """Raise ValueError naming the ids whose feature rows hold NaN or inf."""
    bad = ~np.isfinite(features).all(axis=1) if features.ndim == 2 else ~np.isfinite(features)
    if bad.any():
        bad_ids = np.asarray(ids)[bad]
        shown = ", ".join(str(int(i)) for i in bad_ids[:10])
        more = f" (and {len(bad_ids) - 10} more)" if len(bad_ids) > 10 else ""
        raise ValueError(
            f"{what}: {len(bad_ids)} embedding(s) contain NaN or inf, ids {shown}{more}. "
            "Re-run the embed stage (a diverged or corrupt backbone checkpoint is the usual cause)."
        )


def _as_features(features, name: str) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {features.shape}")
    return np.ascontiguousarray(features, dtype=np.float32)


def _normalise(features: np.ndarray, dtype=np.float32) -> np.ndarray:
    x = features.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # a zero vector stays zero (cosine 0 with everything) instead of becoming NaN
    return (x / np.maximum(norms, 1e-30)).astype(dtype)


class CandidateIndex:
    """Exact FAISS index over training embeddings, partitioned by class.

    Parameters
    ----------
    metric : "l2" or "cosine"
        Distance used by :meth:`search` and to pick the ``max_candidates`` nearest in
        :meth:`candidates`.
    device : "auto", "cpu" or "gpu"
        "auto" moves indexes to all GPUs when ``faiss.get_num_gpus() > 0`` (a GPU build
        of FAISS and a visible GPU), else stays on CPU; "gpu" raises if none is usable.
    """

    def __init__(self, metric: str = "l2", device: str = "auto"):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; choose one of {list(DEVICES)}")
        self.metric = metric
        self.device = device

    # ------------------------------------------------------------------ fitting
    def fit(self, ids, labels, features) -> "CandidateIndex":
        """Store the training items (sorted by id) and validate them."""
        import faiss

        ids = np.asarray(ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        features = _as_features(features, "training features")
        if not (len(ids) == len(labels) == len(features)):
            raise ValueError(f"{len(ids)} ids, {len(labels)} labels, {len(features)} feature rows: "
                             "they must be the same length")
        if len(ids) == 0:
            raise ValueError("no training items to index: the train embeddings are empty")
        if np.any(ids[1:] < ids[:-1]):  # embeddings are usually stored sorted: avoid a copy
            order = np.argsort(ids, kind="stable")
            ids, labels, features = ids[order], labels[order], features[order]
        if np.any(ids[1:] == ids[:-1]):
            dup = ids[1:][ids[1:] == ids[:-1]][:10].tolist()
            raise ValueError(f"duplicate training ids {dup}: each embedding row needs a unique id")
        check_finite(features, ids, "training embeddings")

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if self.device == "gpu" and gpus == 0:
            raise ValueError("device='gpu' but FAISS sees no GPU (faiss-cpu installed, or no CUDA "
                             "device visible); use device='auto' or 'cpu', or install faiss-gpu")
        self.use_gpu_ = self.device != "cpu" and gpus > 0
        self.ids_, self.labels_, self.features_ = ids, labels, features
        self.dim_ = features.shape[1]
        self.classes_ = np.unique(labels)
        self._partitions: dict = {}
        self._gpu_resources = None  # one StandardGpuResources shared by every partition's GPU index
        return self

    def _check_fitted(self):
        if not hasattr(self, "ids_"):
            raise RuntimeError("CandidateIndex is not fitted: call .fit(ids, labels, features) first")

    def class_positions(self, label) -> np.ndarray:
        """Positions (into ``ids_``, ascending id) of the training items of class ``label``;
        ``label=None`` means all classes."""
        self._check_fitted()
        if label is None:
            return np.arange(len(self.ids_))
        return np.flatnonzero(self.labels_ == int(label))

    def class_size(self, label) -> int:
        return len(self.class_positions(label))

    def _partition(self, label):
        """(positions, exact float64 features, cpu index, gpu index or None) of one class
        (label None: all classes), built on first use."""
        key = None if label is None else int(label)
        if key not in self._partitions:
            import faiss

            positions = self.class_positions(key)
            # exact copies for re-scoring; per partition (not for the whole set at fit)
            # so memory grows only with the classes actually queried
            exact = self.features_[positions].astype(np.float64)
            if self.metric == "cosine":
                exact = _normalise(exact, np.float64)
                cpu = faiss.IndexFlatIP(self.dim_)
            else:
                cpu = faiss.IndexFlatL2(self.dim_)
            cpu.add(np.ascontiguousarray(exact, dtype=np.float32))
            gpu = self._to_gpu(cpu) if self.use_gpu_ and len(positions) else None
            self._partitions[key] = (positions, exact, cpu, gpu)
        return self._partitions[key]

    def _to_gpu(self, cpu):
        """A GPU copy of one partition's index on device 0, sharing one StandardGpuResources:
        ``index_cpu_to_all_gpus`` makes new resources (their own scratch memory) per call, which
        with ImageNet's 1,000 cached class partitions would not fit in a GPU."""
        import faiss

        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu)

    # ------------------------------------------------------------------ queries
    def _check_queries(self, target_features, target_labels):
        self._check_fitted()
        target_features = _as_features(target_features, "target features")
        if target_features.shape[1] != self.dim_:
            raise ValueError(
                f"target embeddings have dimension {target_features.shape[1]} but the training "
                f"embeddings have {self.dim_}: both splits must come from the same embed run"
            )
        target_labels = np.asarray(target_labels, dtype=np.int64).reshape(-1)
        if len(target_labels) != len(target_features):
            raise ValueError(f"{len(target_features)} target rows but {len(target_labels)} labels")
        check_finite(target_features, np.arange(len(target_features)), "target embeddings (row numbers)")
        return target_features, target_labels

    def _require_class(self, label, same_class: bool) -> np.ndarray:
        positions = self.class_positions(label if same_class else None)
        if len(positions) == 0:
            raise ValueError(
                f"class {label} has no training items, so a target of that class has no "
                "same-class candidates; embed training items of every target class, or use "
                "same_class=False"
            )
        return positions

    def _exact_scores(self, query: np.ndarray, exact: np.ndarray) -> np.ndarray:
        """Exact float64 scores (higher = closer) of one query (d,) against rows of a
        partition's exact features."""
        if self.metric == "cosine":
            return exact @ _normalise(query[None, :], np.float64)[0]
        q = query.astype(np.float64)
        out = np.empty(len(exact), dtype=np.float64)
        # direct differences (not |q|^2 + |x|^2 - 2 q.x, which cancels badly for
        # near-duplicates), in chunks to bound memory at large d
        for start in range(0, len(exact), 1024):
            diff = exact[start:start + 1024] - q
            out[start:start + 1024] = np.einsum("ij,ij->i", diff, diff)
        return -np.sqrt(out)

    def _knn_group(self, queries: np.ndarray, label, k: int):
        """k nearest of one partition for queries of one class: ids (T, k), scores (T, k)
        sorted by (score desc, id asc); k must be <= the partition size."""
        positions, exact, cpu, gpu = self._partition(label)
        n = len(positions)
        part_ids = self.ids_[positions]
        k_search = min(n, k + _SEARCH_MARGIN)
        index = gpu if (gpu is not None and k_search <= GPU_MAX_K) else cpu
        q32 = np.ascontiguousarray(_normalise(queries) if self.metric == "cosine" else queries, dtype=np.float32)
        _, local = index.search(q32, k_search)
        out_ids = np.empty((len(queries), k), dtype=np.int64)
        out_scores = np.empty((len(queries), k), dtype=np.float64)
        for row in range(len(queries)):
            chosen = local[row][local[row] >= 0]
            scores = self._exact_scores(queries[row], exact[chosen])
            order = np.lexsort((part_ids[chosen], -scores))
            # If the last searched item ties (or beats) the k-th, items beyond the search
            # window could belong in the top k: score the whole partition for this row.
            if k_search < n and scores[order[-1]] >= scores[order[k - 1]]:
                chosen = np.arange(n)
                scores = self._exact_scores(queries[row], exact)
                order = np.lexsort((part_ids, -scores))
            keep = order[:k]
            out_ids[row] = part_ids[chosen[keep]]
            out_scores[row] = scores[keep]
        return out_ids, out_scores

    def search(self, target_features, target_labels, k: int, same_class: bool = True,
               max_candidates: int | None = None):
        """The k nearest candidates of each target, best first.

        Returns ``(ids, scores)``, both shaped (T, k): int64 train ids and float64 scores
        (negative Euclidean distance for "l2", cosine similarity for "cosine"). When a
        target has fewer than k candidates (a small class, or ``max_candidates < k``), its
        row is padded with id -1 and score -inf.
        """
        target_features, target_labels = self._check_queries(target_features, target_labels)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        limit = k if max_candidates is None else min(k, int(max_candidates))
        ids = np.full((len(target_features), k), -1, dtype=np.int64)
        scores = np.full((len(target_features), k), -np.inf, dtype=np.float64)
        groups = target_labels if same_class else np.zeros(len(target_labels), dtype=np.int64)
        for group in np.unique(groups):
            rows = np.flatnonzero(groups == group)
            label = int(group) if same_class else None
            n = len(self._require_class(label, same_class))
            kk = min(limit, n)
            got_ids, got_scores = self._knn_group(target_features[rows], label, kk)
            ids[rows, :kk], scores[rows, :kk] = got_ids, got_scores
        return ids, scores

    def candidates(self, target_features, target_labels, max_candidates: int | None = None,
                   same_class: bool = True) -> list[np.ndarray]:
        """Candidate train ids of each target, each array sorted by id.

        ``max_candidates=None`` (the reference setting): every training item of the
        target's class (of all classes when ``same_class=False``). An integer M keeps only
        the M nearest of those under this index's metric.
        """
        target_features, target_labels = self._check_queries(target_features, target_labels)
        if max_candidates is not None and int(max_candidates) < 1:
            raise ValueError(f"max_candidates must be None or at least 1, got {max_candidates}")
        out: list[np.ndarray] = [None] * len(target_features)  # type: ignore[list-item]
        groups = target_labels if same_class else np.zeros(len(target_labels), dtype=np.int64)
        for group in np.unique(groups):
            rows = np.flatnonzero(groups == group)
            label = int(group) if same_class else None
            positions = self._require_class(label, same_class)
            if max_candidates is None or int(max_candidates) >= len(positions):
                whole = self.ids_[positions]  # ascending already
                for row in rows:
                    out[row] = whole
            else:
                near, _ = self._knn_group(target_features[rows], label, int(max_candidates))
                for row, row_ids in zip(rows, near):
                    out[row] = np.sort(row_ids)
        return out

    def features_of(self, ids) -> np.ndarray:
        """Raw (un-normalised) float32 training features of the given ids."""
        self._check_fitted()
        ids = np.asarray(ids, dtype=np.int64)
        where = np.clip(np.searchsorted(self.ids_, ids), 0, len(self.ids_) - 1)
        if not np.all(self.ids_[where] == ids):
            missing = ids[self.ids_[where] != ids][:10].tolist()
            raise KeyError(f"ids not among the indexed training items: {missing}")
        return self.features_[where]
