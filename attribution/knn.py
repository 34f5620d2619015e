"""Feature quality by k-nearest-neighbour classification (cosine similarity).

The standard monitor of self-supervised features (Wu et al. 2018, used by MoCo): L2-
normalise the features, find each test item's ``k`` most similar training items, and
vote with weights ``exp(similarity / temperature)`` (``weighting="exp"``) or one vote
each (``"uniform"``). No training, no hyper-parameter search: it measures how well the
embedding's geometry alone separates classes, which is what the Exemplar SVM ranking
relies on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

WEIGHTINGS = ("exp", "uniform")


def _normalise(features) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.dim() != 2:
        raise ValueError(f"features must be 2-d (n, dim), got shape {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=1)


def knn_predict(train_features, train_labels, test_features, k: int = 20, weighting: str = "exp",
                temperature: float = 0.07, num_classes: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """Predicted label of each test row by cosine k-NN over the training rows."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    train, test = _normalise(train_features), _normalise(test_features)
    labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
    if len(labels) != len(train):
        raise ValueError(f"train_labels has {len(labels)} entries for {len(train)} train_features rows")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train_features have {train.shape[1]} columns, test_features {test.shape[1]}")
    k = min(k, len(train))
    num_classes = int(num_classes or int(labels.max()) + 1)
    out = []
    for start in range(0, len(test), batch_size):
        similarity = test[start:start + batch_size] @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = torch.exp(top_sim / temperature) if weighting == "exp" else torch.ones_like(top_sim)
        votes = torch.zeros(len(top_sim), num_classes).scatter_add_(1, labels[top_idx], weights)
        out.append(votes.argmax(dim=1))
    return torch.cat(out).numpy() if out else np.empty(0, np.int64)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20,
                 weighting: str = "exp", temperature: float = 0.07) -> float:
    """Fraction of test rows whose k-NN prediction equals ``test_labels``."""
    predicted = knn_predict(train_features, train_labels, test_features, k=k, weighting=weighting,
                            temperature=temperature)
    test_labels = np.asarray(test_labels)
    if len(test_labels) != len(predicted):
        raise ValueError(f"test_labels has {len(test_labels)} entries for {len(predicted)} test_features rows")
    return float(np.mean(predicted == test_labels))


@torch.no_grad()
def extract_features(model, images, batch_size: int = 256, progress: bool = False,
                     positions: Sequence[int] | None = None, bf16: bool = False) -> np.ndarray:
    """(n, model.dim) float32 features of an ImageSet through a FeatureExtractor.

    ``bf16`` runs the model under bfloat16 autocast: 2-3x faster on CPUs with native bf16,
    features within ~1e-2 relative of float32 (enough for k-NN evaluation).
    """
    from tqdm.auto import tqdm

    model.eval()
    positions = np.arange(len(images)) if positions is None else np.asarray(positions)
    chunks = [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    out = []
    for chunk in tqdm(chunks, desc="features", unit="batch", disable=not progress, mininterval=2.0):
        x = model.preprocess(images.images(chunk), images.mean, images.std)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x).float().numpy())
    return np.concatenate(out) if out else np.empty((0, model.dim), np.float32)


def pixel_features(images, positions: Sequence[int] | None = None) -> np.ndarray:
    """Raw pixels as features (the baseline any learned embedding should beat or match)."""
    positions = np.arange(len(images)) if positions is None else np.asarray(positions)
    pixels = images.images(positions).reshape(len(positions), -1).astype(np.float32) / 255.0
    return pixels
