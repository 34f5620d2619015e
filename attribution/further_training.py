"""Further training: the final-model-only gold standard of Wei et al. (arXiv 2412.03906).

When only the final model exists, retraining from scratch without an image asks a
question the final model cannot answer (another model). Wei et al. propose instead: from
the final weights, continue training with a small learning rate once on the full
training set and once per leave-one-out set, with the same seed and the same sample
order (the left-out image is dropped from each epoch's permutation, every other image
keeps its order); the gold score of a left-out image for a target is the change of the
target's loss, averaged over seeds:

    gold[t, j] = mean_s ( loss_t(further training without j, seed s)
                          - loss_t(further training on everything, seed s) )

positive: removing j raises the target's loss, i.e. j helps it (the sign of every
method's scores here). The losses are recorded after each epoch of further training,
so one run gives the gold standard at every length up to the longest (the paper's
main figure plots agreement against that length). Their code (IBM/fimoda,
``fimoda/tabular/training.py``: ``RandomSamplerLOO``) does the same with SGD at lr
1e-4 on tabular MLPs.

Plain Python (no Ray): :class:`FurtherTrainer` runs one seed's full run and any number
of leave-one-out runs; the gold stage fans (seed, block of left-out images) items out
over a pool and averages.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def loo_order(n: int, generator: torch.Generator, left_out: int | None) -> torch.Tensor:
    """One epoch's sample order: a permutation of 0..n-1 drawn from ``generator``, without
    ``left_out`` (the same draw with or without it, so every other image keeps its place
    in the sequence; batches after it shift by one, as in fimoda's RandomSamplerLOO)."""
    order = torch.randperm(n, generator=generator)
    return order if left_out is None else order[order != int(left_out)]


class FurtherTrainer:
    """Continues training a final model on the full or a leave-one-out training set.

    Parameters
    ----------
    model_fn : builds the untrained model the state dict belongs to
    state : the final model's state dict
    train_x : normalised NCHW training images (a tensor, or anything whose ``x[index]``
        with a tensor of positions returns them: :class:`attribution.retrain.Retrainer`'s
        ``images_at`` over files)
    train_y : the training labels
    target_x, target_y : the targets whose loss is recorded
    lr : SGD learning rate (small: the run stays near the final model)
    epochs : epochs of further training; the losses are recorded after each
    batch_size : images per step
    device : "cpu" or "cuda[:i]"
    dtype : "float64" (default) or "float32": the weights and images during further
        training. A left-out image changes a target's loss by ~lr/n x a gradient dot
        product, near float32's rounding of the loss itself after short further
        training; float64 keeps that signal (2x the CPU time of float32)
    """

    def __init__(self, model_fn: Callable[[], torch.nn.Module], state: dict, train_x, train_y, target_x, target_y,
                 lr: float = 1e-3, epochs: int = 4, batch_size: int = 64, device: str = "cpu",
                 dtype: str = "float64"):
        if not float(lr) > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if int(epochs) < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if dtype not in ("float64", "float32"):
            raise ValueError(f'dtype must be "float64" or "float32", got {dtype!r}')
        self.model_fn, self.state = model_fn, state
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.train_x = train_x if callable(getattr(train_x, "__getitem__", None)) else torch.as_tensor(train_x)
        self.train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
        self.target_x = torch.as_tensor(target_x).to(self.device, self.dtype)
        self.target_y = torch.as_tensor(np.asarray(target_y), dtype=torch.long).to(self.device)
        self.lr, self.epochs, self.batch_size = float(lr), int(epochs), int(batch_size)
        self.n = len(self.train_y)

    def images(self, positions: torch.Tensor) -> torch.Tensor:
        return self.train_x[positions].to(self.device, self.dtype)

    def target_losses(self, model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return F.cross_entropy(model(self.target_x), self.target_y, reduction="none").double().cpu().numpy()

    def run(self, seed: int, left_out: int | None = None) -> np.ndarray:
        """(epochs, targets) float64: each target's loss after each epoch of further
        training with ``seed``, on everything (``left_out=None``) or without the training
        image at position ``left_out``."""
        if left_out is not None and not 0 <= int(left_out) < self.n:
            raise ValueError(f"left_out must be a training position in [0, {self.n}), got {left_out}")
        model = self.model_fn()
        model.load_state_dict(self.state)
        model = model.to(self.device, self.dtype)
        # plain SGD as in the paper's code; eval mode keeps dropout / batch-norm statistics
        # of the final model fixed (the models here have neither; a CNN with BN would)
        model.eval()
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(int(seed))
        losses = np.empty((self.epochs, len(self.target_y)), np.float64)
        for epoch in range(self.epochs):
            order = loo_order(self.n, generator, left_out)
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                loss = F.cross_entropy(model(self.images(batch)), self.train_y[batch].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses[epoch] = self.target_losses(model)
        return losses

    def runs(self, seed: int, left_out: Sequence[int]) -> dict:
        """One seed: the full run and one leave-one-out run per position in ``left_out``.
        Returns {"full": (epochs, targets), "loo": (len(left_out), epochs, targets),
        "seconds": float}."""
        begin = time.perf_counter()
        full = self.run(seed)
        loo = np.stack([self.run(seed, int(j)) for j in left_out]) if len(left_out) else \
            np.zeros((0, self.epochs, len(self.target_y)))
        return {"full": full, "loo": loo, "seconds": time.perf_counter() - begin}


def gold_scores(full: np.ndarray, loo: np.ndarray) -> np.ndarray:
    """The gold standard from the runs of several seeds: ``full`` (seeds, epochs,
    targets), ``loo`` (seeds, left_out, epochs, targets) -> (epochs, targets, left_out):
    the mean over seeds of the leave-one-out loss minus the full loss (positive: the
    left-out image helps the target)."""
    full, loo = np.asarray(full, np.float64), np.asarray(loo, np.float64)
    if full.ndim != 3 or loo.ndim != 4 or loo.shape[0] != full.shape[0] or loo.shape[2:] != full.shape[1:]:
        raise ValueError(f"full (seeds, epochs, targets) and loo (seeds, left_out, epochs, targets) must agree, got "
                         f"{full.shape} and {loo.shape}")
    delta = loo - full[:, None]                      # (seeds, left_out, epochs, targets)
    return delta.mean(axis=0).transpose(1, 2, 0)     # (epochs, targets, left_out)


def agreement(scores: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Per target, how a method's scores of the left-out images agree with the gold
    scores: ``scores`` and ``gold`` (targets, left_out) -> {"cosine": (targets,),
    "spearman": (targets,)} (Wei et al.'s two measures; NaN where a row is constant)."""
    from scipy.stats import spearmanr

    scores, gold = np.asarray(scores, np.float64), np.asarray(gold, np.float64)
    if scores.shape != gold.shape or scores.ndim != 2:
        raise ValueError(f"scores and gold must both be (targets, left_out), got {scores.shape} and {gold.shape}")
    norms = np.linalg.norm(scores, axis=1) * np.linalg.norm(gold, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, (scores * gold).sum(axis=1) / norms, np.nan)
    spearman = np.array([spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
                         for a, b in zip(scores, gold)])
    return {"cosine": cosine, "spearman": spearman}
