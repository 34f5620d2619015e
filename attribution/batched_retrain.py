"""Many small models trained at once in one process: the "stacked" training engine.

A recipe with ``engine = "stacked"`` (:class:`attribution.retrain.TrainConfig`) trains
its models here instead of one ``nn.Module`` at a time: the weights of G models are
stacked along a leading dimension and every step runs each layer of all G models as one
batched matrix product (``torch.bmm``), with a hand-written backward pass and one fused
SGD pass per model (``torch._fused_sgd_``: weight decay, Nesterov momentum and the
update in a single sweep over the weights; separate elementwise passes over 12 MB of
stacked weights were memory-bound and ate the gain of batching).

Beside the products a step makes few passes over memory: a model's batches of a whole
epoch are drawn at its epoch start into a table (a step's inputs are then one gather for
the group); models are stacked longest first, so the
ones still training are a prefix of the stack and finished ones drop out of every
product; the first layer's bias is added in its product (``baddbmm``); and in bf16 a
model's W1 gradient is converted to fp32 into one reused buffer just before its fused
update, and its bf16 copy of the weights refreshed just after, while both are in cache
(stacked conversions before and after were two more sweeps over all models' weights).

Each model keeps everything of its own, exactly as if it were trained alone:

- initial weights: ``torch.manual_seed(seed)`` then ``build_model``, as
  :meth:`attribution.retrain.Retrainer.train` does;
- batch order (and augmentation): ``torch.randperm`` from its own ``torch.Generator``
  seeded by ``seed``, one per epoch;
- removals and relabels: its own effective training set, so the models of a group
  have ragged sizes. A model's short last batch is padded to the batch size with
  zero-weight rows (its loss is the mean over its real rows), and a model that has
  fewer steps than others in its group is simply not updated after its last step:
  its weights, momentum and learning-rate schedule follow its own step count.

Determinism: the outcome of a (change, seed) does not depend on which other models
share its group, nor on the group's size (tests/test_batched_retrain.py checks this
bitwise): every operation is per model (``bmm`` computes each matrix of the batch on
its own, reductions run over one model's rows, the optimizer is called per model), and
a model alone is padded exactly as in a group. It is not bitwise the module engine's
outcome (other kernels, another summation order); accuracy and seed noise match it
within noise (benchmarks/retrain_throughput.py, docs/support.md).

``precision = "bf16"``: the matrix products take bfloat16 inputs (AVX512_BF16 on CPU;
about twice fp32's throughput) with fp32 master weights, biases, softmax and optimizer.

Only the MLP has a stacked engine. The small CNN batched by grouped convolution or
vmap was slower than one model at a time on this CPU (docs/support.md), so CNN recipes
use the module engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

STACKED_MODELS = ("mlp",)


@dataclass(frozen=True)
class Change:
    """One training of a group: what it removes / relabels, and its seed."""

    removed_ids: Sequence[int] = ()
    relabel_ids: Sequence[int] = ()
    relabel_to: int | None = None
    seed: int = 0


def schedule(config, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(lr, momentum) of every step of a model with ``steps_per_epoch`` steps, as torch's
    schedulers set them on a real optimizer (OneCycleLR also cycles momentum 0.85..0.95)."""
    from attribution.retrain import _lr_lambda

    dummy = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([dummy], lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    elif config.schedule == "triangular":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps_per_epoch))
    else:
        scheduler = None
    lrs, momenta = np.empty(total), np.empty(total)
    group = optimizer.param_groups[0]
    for step in range(total):
        lrs[step], momenta[step] = group["lr"], group["momentum"]
        if scheduler is not None:
            optimizer.step()  # keeps torch from warning about the order of step() calls
            scheduler.step()
    return lrs, momenta


class _Model:
    """The per-model state of a group: its data, batch order and schedule."""

    def __init__(self, positions: np.ndarray, labels: np.ndarray, seed: int, config, lr_cache: dict):
        self.positions = torch.from_numpy(np.asarray(positions, np.int64))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.n = len(self.positions)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.steps_per_epoch = math.ceil(self.n / config.batch_size)
        self.total = config.epochs * self.steps_per_epoch
        if self.steps_per_epoch not in lr_cache:
            lr_cache[self.steps_per_epoch] = schedule(config, self.steps_per_epoch)
        self.lrs, self.momenta = lr_cache[self.steps_per_epoch]

    def epoch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next epoch's batches at once, padded to ``steps_per_epoch`` full batches:
        positions (indexes of the full training set) and labels (steps, batch), and each
        row's loss weight (steps, batch): 1 / (real rows of its batch), 0 for padding.
        The order is the module engine's: one ``randperm`` of the model's own generator."""
        perm = torch.randperm(self.n, generator=self.generator)
        padded = self.steps_per_epoch * batch_size
        positions = torch.zeros(padded, dtype=torch.int64)
        labels = torch.zeros(padded, dtype=torch.int64)
        positions[:self.n], labels[:self.n] = self.positions[perm], self.labels[perm]
        weight = torch.full((self.steps_per_epoch, batch_size), 1.0 / batch_size)
        last = self.n - (self.steps_per_epoch - 1) * batch_size
        weight[-1] = 0.0
        weight[-1, :last] = 1.0 / last
        shape = (self.steps_per_epoch, batch_size)
        return positions.view(shape), labels.view(shape), weight

    def rows_in(self, step: int, batch_size: int) -> int:
        """Real (unpadded) rows of step ``step``'s batch."""
        within = step % self.steps_per_epoch
        return min(batch_size, self.n - within * batch_size)


class StackedMLPTrainer:
    """Trains groups of MLPs (784-width-10 for Fashion-MNIST) of one
    :class:`attribution.retrain.Retrainer`'s training set at once.

    ``train(changes)`` returns one trained ``nn.Module`` per change, in order, each as
    :meth:`Retrainer.train` would return it (eval mode, on the trainer's device)."""

    def __init__(self, retrainer):
        config = retrainer.config
        if config.model not in STACKED_MODELS:
            raise ValueError(f"the stacked engine trains {STACKED_MODELS} only, got model {config.model!r}")
        self.retrainer, self.config = retrainer, config
        self.device = retrainer.device
        self.compute_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        if retrainer.x is None:
            raise ValueError("the stacked engine needs the training images in memory (an in-memory ImageSet)")
        # flattened once, in the matmul's dtype (bf16: the inputs are rounded once, not per step)
        self.x_flat = retrainer.x.reshape(len(retrainer.x), -1).to(self.compute_dtype).contiguous()
        # the same rows seen as 8-byte words when they divide: gathering a step's batches
        # copies whole rows, and index_select copies 8-byte elements a little faster than bf16
        # (4.4 vs 4.9 us per model's batch here)
        row_bytes = self.x_flat.shape[1] * self.x_flat.element_size()
        self._row_words = torch.int64 if row_bytes % 8 == 0 else self.compute_dtype
        self._x_words = self.x_flat.view(self._row_words)
        self._lr_cache: dict = {}

    # ------------------------------------------------------------------ public
    def train(self, changes: Sequence[Change]) -> list[torch.nn.Module]:
        """Validate every change (a bad one raises before any training), then train them all."""
        subsets = [self.retrainer.checked_training_set(c.removed_ids, c.relabel_ids, c.relabel_to) for c in changes]
        if not changes:
            return []
        models = [_Model(s.positions, s.labels, c.seed, self.config, self._lr_cache) for s, c in zip(subsets, changes)]
        # longest first, so the models still training are always a prefix of the stack and
        # the finished ones drop out of every product (a stable order: ties keep theirs)
        order = sorted(range(len(models)), key=lambda g: -models[g].total)
        params = self._initial_weights([changes[g].seed for g in order])
        self._fit([models[g] for g in order], params)
        trained = self._modules(params)
        result: list = [None] * len(models)
        for rank, g in enumerate(order):
            result[g] = trained[rank]
        return result

    # ------------------------------------------------------------------ internals
    def _initial_weights(self, seeds: Sequence[int]) -> list[torch.Tensor]:
        """Stacked (W1 (G, D, H), b1 (G, 1, H), W2 (G, H, C), b2 (G, 1, C)) of fresh
        models, each from ``torch.manual_seed(seed)`` + build_model as the module engine."""
        from attribution.retrain import build_model

        per_model = []
        for seed in seeds:
            torch.manual_seed(int(seed))
            model = build_model(self.config.model, self.retrainer.num_classes, self.retrainer.image_shape,
                                self.config.width)
            first, second = model.net[1], model.net[3]
            per_model.append((first.weight.detach().t(), first.bias.detach()[None], second.weight.detach().t(),
                              second.bias.detach()[None]))
        return [torch.stack([m[i] for m in per_model]).contiguous().to(self.device) for i in range(4)]

    def _fit(self, models: list[_Model], params: list[torch.Tensor]) -> None:
        """Train the stacked ``params`` in place; ``models`` longest first (``train``)."""
        config, dtype, device = self.config, self.compute_dtype, self.device
        g_count, batch, classes = len(models), config.batch_size, self.retrainer.num_classes
        w1, b1, w2, b2 = params
        dim, width = w1.shape[1], w1.shape[2]
        momenta = [torch.zeros_like(p) for p in params]
        low = dtype != torch.float32

        # Every step's tensors are allocated once: multi-megabyte tensors allocated per
        # step cost page faults, and the step is otherwise close to the matmul's peak.
        def buffer(*shape, like_dtype=dtype):
            return torch.empty(*shape, dtype=like_dtype, device=device)

        # bf16: the products' copies of the weights, refreshed right after each update
        w1c, w2c, b1c = (buffer(*w1.shape), buffer(*w2.shape), buffer(*b1.shape)) if low else (w1, w2, b1)
        if low:
            w1c.copy_(w1), w2c.copy_(w2), b1c.copy_(b1)
        x = buffer(g_count, batch, dim)
        hidden, logits_c = buffer(g_count, batch, width), buffer(g_count, batch, classes)
        grad_logits_c = buffer(g_count, batch, classes) if low else None
        logits_f = torch.empty(g_count, batch, classes, device=device) if low else None
        grad_hidden = buffer(g_count, batch, width)
        g_w1c = buffer(*w1.shape)
        g_w2c = buffer(*w2.shape)
        g_w2 = torch.empty_like(w2) if low else g_w2c
        g_b1, g_b2 = torch.empty_like(b1), torch.empty_like(b2)
        # bf16: one model's W1 gradient in fp32 at a time, converted just before its update
        # (a stacked fp32 copy would be another pass over memory; this one stays in cache)
        g_w1_one = torch.empty(dim, width, device=device) if low else None
        views = [([p[g] for p in params], [g_w1_one if low else g_w1c[g], g_b1[g], g_w2[g], g_b2[g]],
                  [m[g] for m in momenta]) for g in range(g_count)]
        smoothing = float(config.label_smoothing)
        nesterov = bool(config.nesterov and config.momentum > 0)
        hot = torch.full((g_count, batch, 1), smoothing - 1.0, device=device)
        # each model's current epoch of batches (positions, labels, row weights), refilled at
        # its own epoch starts; a step's batches are then one gather for the whole group
        longest = max(m.steps_per_epoch for m in models)
        positions = torch.zeros(g_count * longest, batch, dtype=torch.int64)
        labels = torch.zeros(g_count * longest, batch, dtype=torch.int64)
        weights = torch.zeros(g_count * longest, batch)
        first_row = np.arange(g_count) * longest
        steps_per_epoch = np.array([m.steps_per_epoch for m in models])
        totals = [m.total for m in models]
        active = g_count
        for step in range(totals[0]):
            while totals[active - 1] <= step:  # models are longest first: the active ones are a prefix
                active -= 1
            k = active
            within = step % steps_per_epoch[:k]
            for g in np.flatnonzero(within == 0):  # a new epoch: the same generator call as the module engine
                rows = slice(first_row[g], first_row[g] + steps_per_epoch[g])
                positions[rows], labels[rows], weights[rows] = models[g].epoch(batch)
            table_rows = torch.from_numpy(first_row[:k] + within)
            index = positions.index_select(0, table_rows)
            y = labels.index_select(0, table_rows).to(device).unsqueeze(-1)
            row_scale = weights.index_select(0, table_rows).to(device).unsqueeze(-1)
            xs, hs, gh = x[:k], hidden[:k], grad_hidden[:k]
            self._inputs(index.to(device), models, step, out=xs)
            # forward
            torch.baddbmm(b1c[:k], xs, w1c[:k], out=hs).relu_()  # the bias added in the product's pass
            torch.bmm(hs, w2c[:k], out=logits_c[:k])
            if low:
                logits = logits_f[:k]
                logits.copy_(logits_c[:k])
            else:
                logits = logits_c[:k]
            logits.add_(b2[:k])
            # d(mean cross-entropy over each model's real rows) / d logits: softmax - target distribution
            # softmax by hand: torch.softmax over a last dimension of 10 is 4x slower here
            grad_logits = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
            grad_logits.div_(grad_logits.sum(-1, keepdim=True))
            grad_logits.scatter_add_(2, y, hot[:k])
            if smoothing:
                grad_logits.sub_(smoothing / classes)
            grad_logits.mul_(row_scale)
            if low:
                glc = grad_logits_c[:k]
                glc.copy_(grad_logits)
            else:
                glc = grad_logits
            # backward (no gradient for the inputs)
            torch.sum(grad_logits, 1, keepdim=True, out=g_b2[:k])
            torch.bmm(hs.transpose(1, 2), glc, out=g_w2c[:k])
            torch.bmm(glc, w2c[:k].transpose(1, 2), out=gh)
            torch.ops.aten.threshold_backward.grad_input(gh, hs, 0, grad_input=gh)
            torch.bmm(xs.transpose(1, 2), gh, out=g_w1c[:k])
            torch.sum(gh, 1, keepdim=True, dtype=torch.float32, out=g_b1[:k])
            if low:
                g_w2[:k].copy_(g_w2c[:k])
            for g in range(k):  # one fused pass per model, with its own step's lr and momentum
                model = models[g]
                if low:
                    g_w1_one.copy_(g_w1c[g])
                torch._fused_sgd_(*views[g], weight_decay=config.weight_decay, momentum=float(model.momenta[step]),
                                  lr=float(model.lrs[step]), dampening=0.0, nesterov=nesterov, maximize=False,
                                  is_first_step=step == 0)
                if low:  # while the updated weights are still in cache
                    w1c[g].copy_(w1[g])
            if low:
                w2c[:k].copy_(w2[:k]), b1c[:k].copy_(b1[:k])

    def _inputs(self, index: torch.Tensor, models, step: int, out: torch.Tensor) -> None:
        """The step's (k, B, D) inputs of the first k models into ``out`` (compute dtype);
        augmented per model (its real rows, with its own generator, as the module engine)
        when the recipe says so."""
        k, batch = index.shape
        if self.config.augment == "none":
            torch.index_select(self._x_words, 0, index.view(-1), out=out.view(k * batch, -1).view(self._row_words))
            return
        from attribution.retrain import _augment

        images = self.retrainer.x.index_select(0, index.view(-1)).view(k, batch, *self.retrainer.x.shape[1:])
        for g in range(k):
            rows = models[g].rows_in(step, batch)
            images[g, :rows] = _augment(images[g, :rows], models[g].generator)
        out.copy_(images.reshape(k, batch, -1))

    def _modules(self, params: list[torch.Tensor]) -> list[torch.nn.Module]:
        from attribution.retrain import build_model

        w1, b1, w2, b2 = params
        modules = []
        for g in range(len(w1)):
            model = build_model(self.config.model, self.retrainer.num_classes, self.retrainer.image_shape,
                                self.config.width)
            with torch.no_grad():
                model.net[1].weight.copy_(w1[g].t()), model.net[1].bias.copy_(b1[g, 0])
                model.net[3].weight.copy_(w2[g].t()), model.net[3].bias.copy_(b2[g, 0])
            modules.append(model.to(self.device).eval())
        return modules


def check_stackable(config) -> None:
    """Refuse a recipe the stacked engine cannot train, naming the setting and the fix."""
    if config.model not in STACKED_MODELS:
        raise ValueError(f"engine 'stacked' trains models {list(STACKED_MODELS)} only, got model {config.model!r}: "
                         "use engine 'module' (the small CNN batched was slower than one at a time, "
                         "docs/support.md)")


def as_changes(jobs: Sequence[dict]) -> list[Change]:
    """Changes of queue items (``removed_ids``, ``relabel_ids``, ``relabel_to``, ``torch_seed``)."""
    return [Change(job.get("removed_ids", ()), job.get("relabel_ids", ()), job.get("relabel_to"),
                   int(job["torch_seed"])) for job in jobs]
