"""Gradient-based attribution methods: TracInCP, Grad-Dot, Grad-Cos, influence functions
(conjugate gradient) and EK-FAC influence, through the libraries ``dattri`` 0.3.0 and
``kronfluence`` 1.0.1.

Every method here scores a target ``z`` against a training image ``x`` from the
per-example gradients of the cross-entropy loss of the image's own (true) label, the
loss of dattri's and kronfluence's examples:

====================  =====================================================================  ==============
method                score(z, x)                                                            library
====================  =====================================================================  ==============
``"tracin"``          sum_c w_c * g_c(x) . g_c(z) over the given checkpoints c (TracInCP)    dattri TracIn
``"grad-dot"``        g(x) . g(z) on the last checkpoint (the final model)                   dattri TracIn
``"grad-cos"``        g(x) . g(z) / (|g(x)| |g(z)|) on the last checkpoint                   dattri TracIn
``"if-cg"``           g(z)^T (H + damping I)^-1 g(x), H the Hessian of the mean training     dattri IF (CG)
                      loss, solved by conjugate gradient
``"ekfac"``           g(z)^T (F + damping I)^-1 g(x), F the EK-FAC approximation of the      kronfluence
                      Fisher of the Linear / Conv2d layers
====================  =====================================================================  ==============

Sign convention (checked in the libraries' sources, no flip needed): every score is
higher when the training image helps the target more, i.e. when a gradient step on it
(TracIn, Grad-Dot) or up-weighting it (influence functions) lowers the target's loss.
dattri's TracIn returns ``+ lr * g_train . g_test``; dattri's influence attributors
return ``+ g_train^T H^-1 g_test`` (= minus Koh & Liang's I_up,loss: the change of the
test loss when the training point is *removed*, times n); kronfluence's pairwise scores
are ``+ g_query^T (F + lambda I)^-1 g_train`` (no negation anywhere in kronfluence's
score path). So all five are "positive = proponent, negative = opponent" (``signed``).
tests/test_gradient_methods.py checks it: near-duplicates of a target planted in the
training set with its label score high and positive under every method.

Inputs (the same for every method, so that one stage, ``"gradient"``, feeds them all):
``fit(TrainingData(ids, labels, images=x, extra={"model_fn": f, "checkpoints": [...]}))``
with ``x`` the normalised NCHW training images (a float tensor or array, or anything with
``len(x)`` and ``x[a:b]`` such as :class:`attribution.baselines.trak.StreamedImages`),
``model_fn()`` building the untrained model the state dicts in ``checkpoints`` belong to
(in training order: the last one is the final model); ``score(Targets(ids, labels,
images=x))`` with the targets' normalised images.

Memory: targets are scored in blocks of at most ``batch_size`` targets such that one
(targets x training images) float32 block never exceeds ``max_block_mb``; when even one
target's row would, the training images are split into column blocks too. The blocks
are written into the returned :class:`ScoreBlock`; the scores do not depend on the
blocking (up to float rounding).

The libraries are imported inside ``fit`` / ``score`` only (the registry stays cheap to
import).
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from typing import ClassVar, Sequence

import numpy as np

from attribution.methods import register_method
from attribution.methods.base import AttributionMethod, CostSpec, ScoreBlock, Targets, TrainingData

FLOAT_BYTES = 4  # the score blocks are float32
MB = 2 ** 20


# ----------------------------------------------------------------------------- helpers


def _resolve_device(device: str, method: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{method}: device={device!r} but CUDA is not available here (use 'auto' or 'cpu')")
    return resolved


def _check_int(name: str, value, minimum: int, method: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{method}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{method}: {name} must be at least {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value, method: str, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{method}: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{method}: {name} must be a finite number {relation} {minimum}, got {value}")
    return value


def _check_device(device, method: str) -> str:
    if not isinstance(device, str):
        raise ValueError(f"{method}: device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    if not ok:
        raise ValueError(f"{method}: device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return device


class _Images:
    """A map-style torch dataset of (normalised image, label) over images held as a
    tensor / array or read in slices (``x[a:b]``), one slice of ``chunk`` images at a time
    (sequential readers such as DataLoaders decode each slice once)."""

    def __init__(self, images, labels, chunk: int):
        import torch

        self.images, self.chunk = images, int(chunk)
        self.labels = torch.as_tensor(np.asarray(labels, np.int64))
        self._start, self._block = None, None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        i = int(i)
        if self._start is None or not self._start <= i < self._start + len(self._block):
            start = (i // self.chunk) * self.chunk
            self._block = _as_tensor(self.images[start:min(start + self.chunk, len(self.labels))])
            self._start = start
        return self._block[i - self._start], self.labels[i]


def _as_tensor(images):
    """A float32 tensor of a batch of images (a tensor, or an array)."""
    import torch

    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    return x.float()


@contextmanager
def _quiet_dattri_tqdm(enabled: bool):
    """dattri 0.3.0's TracIn draws tqdm bars it offers no switch for (``leave=False`` bars,
    one per training batch, on stderr): unless ``progress``, its module's ``tqdm`` is
    swapped for a disabled one while it runs."""
    if enabled:
        yield
        return
    from functools import partial
    from unittest import mock

    import dattri.algorithm.tracin as tracin_module
    from tqdm import tqdm

    with mock.patch.object(tracin_module, "tqdm", partial(tqdm, disable=True)):
        yield


@contextmanager
def _quiet_kronfluence():
    """kronfluence 1.0.1 builds ``torch.cuda.amp.GradScaler`` (disabled unless AMP is on),
    which torch deprecates with a FutureWarning on every factor / score call."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*GradScaler.*", category=FutureWarning)
        yield


# ----------------------------------------------------------------------------- the base


class _GradientMethod(AttributionMethod):
    """What the gradient methods share: inputs, validation, the memory-bounded blocks of
    targets, the timing attributes.

    Common parameters
    -----------------
    device : "auto" (CUDA when available), "cpu" or "cuda[:i]".
    batch_size : training images per gradient batch; also the most targets scored at once.
    max_block_mb : the largest (targets x training images) float32 score block held while
        scoring (a block that would be larger is split into more blocks, by targets and,
        if one target's row is larger, by training images).
    seed : the seed of whatever a method samples (documented per method; unused by the
        deterministic ones, which leave it out of ``settings()``).
    progress : the libraries' progress bars.

    Attributes after ``fit``: ``device_``, ``fit_seconds_``; ``score_seconds_`` adds up the
    ``score`` calls; ``blocks_``: the (targets, training images) shapes of the last
    ``score`` call's blocks.
    """

    stage = "gradient"
    inputs = ("images",)
    signed = True
    outside = "none"  # every training image gets its own score
    uses_all_checkpoints: ClassVar[bool] = False

    def __init__(self, device: str = "auto", batch_size: int = 128, max_block_mb: float = 256.0, seed: int = 0,
                 progress: bool = False):
        name = self.name
        self.device = _check_device(device, name)
        self.batch_size = _check_int("batch_size", batch_size, 1, name)
        self.max_block_mb = _check_float("max_block_mb", max_block_mb, name, 0.0, strict=True)
        if self.max_block_mb * MB < FLOAT_BYTES:
            raise ValueError(f"{name}: max_block_mb={max_block_mb} cannot hold a single float32 score")
        self.seed = _check_int("seed", seed, 0, name)
        self.progress = bool(progress)

    # -- fit ---------------------------------------------------------------------------

    def _checked_inputs(self, train: TrainingData):
        """(model_fn, checkpoints used, a model holding the last one), checked before any
        work: the extra keys, the images, that the checkpoints fit the model and that the
        model outputs class logits for every label."""
        import torch

        missing = [k for k in ("model_fn", "checkpoints") if k not in train.extra]
        if missing or train.images is None:
            raise ValueError(f"{self.name}: fit needs TrainingData(images=normalised images, extra={{'model_fn', "
                             f"'checkpoints'}}); missing {missing + (['images'] if train.images is None else [])}")
        model_fn = train.extra["model_fn"]
        if not callable(model_fn):
            raise ValueError(f"{self.name}: extra['model_fn'] must be a callable building the model, "
                             f"got {type(model_fn).__name__}")
        checkpoints = list(train.extra["checkpoints"])
        if not checkpoints:
            raise ValueError(f"{self.name}: extra['checkpoints'] is empty (give at least one state dict)")
        if len(train.images) != len(train.ids):
            raise ValueError(f"{self.name}: {len(train.images)} training images for {len(train.ids)} training ids")
        if len(train.ids) == 0:
            raise ValueError(f"{self.name}: the training set is empty")
        used = checkpoints if self.uses_all_checkpoints else checkpoints[-1:]
        model = model_fn()
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"{self.name}: model_fn() must return a torch.nn.Module, got {type(model).__name__}")
        for index, state in enumerate(used):
            try:
                model.load_state_dict(state)
            except Exception as exc:  # a state dict of another model
                raise ValueError(f"{self.name}: checkpoint {index} does not fit the model of model_fn(): {exc}") \
                    from exc
        model.eval()
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{self.name}: the model has no trainable parameters to take gradients of")
        probe = _as_tensor(train.images[0:1])
        with torch.no_grad():
            logits = model(probe)
        if logits.ndim != 2:
            raise ValueError(f"{self.name}: the model must output (batch, classes) logits, got shape "
                             f"{tuple(logits.shape)}")
        if len(train.labels) and (train.labels.min() < 0 or train.labels.max() >= logits.shape[1]):
            raise ValueError(f"{self.name}: training labels span {train.labels.min()}..{train.labels.max()} but "
                             f"the model has {logits.shape[1]} classes")
        self.image_shape_ = tuple(probe.shape[1:])
        self.num_classes_ = int(logits.shape[1])
        return model_fn, used, model

    def fit(self, train: TrainingData) -> "_GradientMethod":
        start = time.perf_counter()
        self.__dict__.pop("fit_seconds_", None)  # a failed refit leaves the method unfitted
        device = _resolve_device(self.device, self.name)
        model_fn, checkpoints, model = self._checked_inputs(train)
        self._check_model(model)
        self.device_ = device
        self.train_ids_, self.train_labels_ = train.ids, train.labels
        self.train_images_ = train.images
        self.checkpoints_ = checkpoints
        self._fit(model_fn, checkpoints)
        self.fit_seconds_ = time.perf_counter() - start
        self.score_seconds_ = 0.0
        return self

    def _check_model(self, model) -> None:
        """Refuse (ValueError naming the method and the layer) a model the method cannot
        attribute through; called in ``fit`` before any work."""

    def _fit(self, model_fn, checkpoints) -> None:
        raise NotImplementedError

    # -- score -------------------------------------------------------------------------

    def block_shape(self, n_targets: int, n_train: int) -> tuple[int, int]:
        """(targets, training images) of the largest block: at most ``batch_size`` targets
        and ``max_block_mb`` of float32 scores."""
        budget = int(self.max_block_mb * MB) // FLOAT_BYTES  # floats
        if budget >= n_train:
            return max(1, min(self.batch_size, n_targets, budget // n_train)), n_train
        return 1, max(1, budget)

    def score(self, targets: Targets) -> ScoreBlock:
        import torch

        if not hasattr(self, "fit_seconds_"):
            raise RuntimeError(f"{self.name}: call fit(...) before score(...)")
        if targets.images is None:
            raise ValueError(f"{self.name}: score needs Targets(images=the targets' normalised images)")
        start = time.perf_counter()
        x = _as_tensor(targets.images)
        y = torch.as_tensor(targets.labels, dtype=torch.int64)
        if len(x) != len(targets.ids):
            raise ValueError(f"{self.name}: {len(x)} target images for {len(targets.ids)} target ids")
        if tuple(x.shape[1:]) != self.image_shape_:
            raise ValueError(f"{self.name}: target images of shape {tuple(x.shape[1:])}, the training images are "
                             f"{self.image_shape_}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes_):
            raise ValueError(f"{self.name}: target labels span {int(y.min())}..{int(y.max())} but the model has "
                             f"{self.num_classes_} classes")
        n_train = len(self.train_ids_)
        rows, cols = self.block_shape(len(x), n_train)
        values = np.zeros((len(x), n_train), np.float32)
        self.blocks_ = []
        for r in range(0, len(x), rows):
            prepared = self._prepare(x[r:r + rows], y[r:r + rows])
            for c in range(0, n_train, cols):
                c_end = min(c + cols, n_train)
                block = self._score_block(prepared, c, c_end)
                block = np.asarray(block, np.float32)
                if block.shape != (min(rows, len(x) - r), c_end - c):
                    raise RuntimeError(f"{self.name}: a score block of shape {block.shape} for "
                                       f"{min(rows, len(x) - r)} targets x {c_end - c} training images")
                values[r:r + rows, c:c_end] = block
                self.blocks_.append(block.shape)
        if not np.isfinite(values).all():
            raise ValueError(f"{self.name}: a score is not finite (the solver diverged?); check the method's "
                             f"settings (damping, iterations)")
        self.score_seconds_ += time.perf_counter() - start
        return ScoreBlock(self.name, targets.ids, targets.labels, self.train_ids_, values)

    def _prepare(self, x, y):
        """What scoring the targets (x, y) against any column block needs (computed once
        per block of targets); by default the targets themselves."""
        return x, y

    def _score_block(self, prepared, c_start: int, c_end: int) -> np.ndarray:
        """Scores (targets, c_end - c_start) of the prepared targets over the training
        images at positions c_start..c_end-1."""
        raise NotImplementedError

    def _train_loader(self, c_start: int, c_end: int):
        import torch

        data = _Images(self.train_images_, self.train_labels_, self.batch_size)
        if (c_start, c_end) != (0, len(data)):
            data = torch.utils.data.Subset(data, range(c_start, c_end))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=False)


# ----------------------------------------------------------------------------- dattri


def _dattri_task(model_fn, checkpoints, image_shape, device):
    """dattri's AttributionTask of the cross-entropy of each image's own label (the loss
    of dattri's examples), with images reshaped to (batch, *image_shape): dattri vmaps
    the loss over single examples with (TracIn) or without (influence) a batch axis."""
    import torch
    import torch.nn.functional as F
    from dattri.task import AttributionTask

    model = model_fn().to(device)
    model.eval()

    def loss(params, data):
        image, label = data
        logits = torch.func.functional_call(model, params, (image.reshape(-1, *image_shape),))
        return F.cross_entropy(logits, label.reshape(-1).long())

    return AttributionTask(loss_func=loss, model=model, checkpoints=list(checkpoints))


class _DattriTracIn(_GradientMethod):
    """Grad-Dot, Grad-Cos and TracInCP through ``dattri.algorithm.tracin.TracInAttributor``
    (exact per-example gradients: dattri's random projection is switched off)."""

    normalized: ClassVar[bool] = False

    def _weights(self, n_checkpoints: int) -> list[float]:
        return [1.0] * n_checkpoints

    def _fit(self, model_fn, checkpoints) -> None:
        import torch
        from dattri.algorithm.tracin import TracInAttributor

        self.task_ = _dattri_task(model_fn, checkpoints, self.image_shape_, self.device_)
        self.weights_ = self._weights(len(checkpoints))
        self.attributor_ = TracInAttributor(task=self.task_, weight_list=torch.tensor(self.weights_),
                                            normalized_grad=self.normalized, device=str(self.device_))
        # dattri 0.3.0 has no constructor switch for "no projection" (projector_kwargs=None
        # means its defaults, a 512-d random projection): None after construction = exact
        self.attributor_.projector_kwargs = None
        self._probe()

    def _probe(self) -> None:
        """One training image's gradient: a model torch.func cannot differentiate fails here,
        in fit, not halfway through scoring."""
        data = _Images(self.train_images_, self.train_labels_, 1)
        x, y = data[0]
        try:
            params, _ = self.task_.get_param(ckpt_idx=0)
            self.attributor_.grad_loss_func(params, (x[None].to(self.device_), y[None].to(self.device_)))
        except Exception as exc:
            raise ValueError(f"{self.name}: dattri cannot take per-example gradients of this model "
                             f"(torch.func): {type(exc).__name__}: {exc}") from exc

    def _score_block(self, prepared, c_start, c_end):
        import torch

        x, y = prepared
        test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x), shuffle=False)
        with _quiet_dattri_tqdm(self.progress):
            scores = self.attributor_.attribute(self._train_loader(c_start, c_end), test)  # (train, test)
        return scores.T.detach().cpu().numpy()


@register_method
class TracIn(_DattriTracIn):
    """TracInCP (Pruthi et al. 2020): sum over the checkpoints c of
    ``weights[c] * g_c(train) . g_c(target)``; with one checkpoint, Grad-Dot times its weight.

    Parameters
    ----------
    weights : one non-negative weight per checkpoint given to ``fit`` (TracIn's learning
        rate at each checkpoint), or None: equal weights, 1.0 each (the sum of the
        checkpoints' Grad-Dot scores).
    Others as :class:`GradDot`; deterministic (``seed`` unused).

    TracInCP is defined for checkpoints along one training run; given independently
    trained final models it is their summed Grad-Dot (an ensemble).
    """

    name = "tracin"
    uses_all_checkpoints = True
    cost = CostSpec(("gradient",), ("gradient/checkpoints", "scores/tracin", "rankings/tracin-*.parquet"))
    description = "TracInCP (dattri): learning-rate-weighted gradient dot products summed over checkpoints"

    def __init__(self, weights: Sequence[float] | None = None, device: str = "auto", batch_size: int = 128,
                 max_block_mb: float = 256.0, seed: int = 0, progress: bool = False):
        super().__init__(device, batch_size, max_block_mb, seed, progress)
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) == 0:
                raise ValueError(f"tracin: weights must be None or a non-empty list of numbers, got {weights!r}")
            weights = [_check_float(f"weights[{i}]", w, "tracin") for i, w in enumerate(weights)]
            if not any(w > 0 for w in weights):
                raise ValueError(f"tracin: weights are all zero, every score would be 0: {weights}")
        self.weights = weights

    def _weights(self, n_checkpoints: int) -> list[float]:
        if self.weights is None:
            return [1.0] * n_checkpoints
        if len(self.weights) != n_checkpoints:
            raise ValueError(f"tracin: {len(self.weights)} weights for {n_checkpoints} checkpoints "
                             f"(give one weight per checkpoint, or weights=None)")
        return list(self.weights)

    def _checked_inputs(self, train: TrainingData):
        result = super()._checked_inputs(train)
        self._weights(len(result[1]))  # before any work
        return result

    def settings(self) -> dict:
        return {"weights": None if self.weights is None else list(self.weights)}


@register_method
class GradDot(_DattriTracIn):
    """Grad-Dot: the dot product of the training image's and the target's loss gradients
    (all trainable parameters) at the last checkpoint, the final model.

    ``GradDot(device="auto", batch_size=128, max_block_mb=256, seed=0, progress=False)``;
    deterministic (``seed`` unused). fit's extra: ``model_fn``, ``checkpoints`` (the last one
    is used)."""

    name = "grad-dot"
    cost = CostSpec(("gradient",), ("gradient/checkpoints", "scores/grad-dot", "rankings/grad-dot-*.parquet"))
    description = "Grad-Dot (dattri): loss-gradient dot products on the final model"


@register_method
class GradCos(_DattriTracIn):
    """Grad-Cos: the cosine of the training image's and the target's loss gradients at the
    last checkpoint (Grad-Dot normalised; a zero gradient scores 0).

    Parameters as :class:`GradDot`."""

    name = "grad-cos"
    normalized = True
    cost = CostSpec(("gradient",), ("gradient/checkpoints", "scores/grad-cos", "rankings/grad-cos-*.parquet"))
    description = "Grad-Cos (dattri): loss-gradient cosines on the final model"


@register_method
class InfluenceCG(_GradientMethod):
    """Influence functions, ``g(target)^T (H + damping I)^-1 g(train)``, the inverse-Hessian
    vector products by conjugate gradient (``dattri.algorithm.influence_function.IFAttributorCG``).

    Parameters
    ----------
    damping : added to the Hessian (dattri's ``regularization``); must exceed the
        magnitude of the Hessian's most negative eigenvalue. The Hessian of a trained
        network is indefinite, and CG on an indefinite system divides by negative
        curvature: it diverges, and its scores come out with the wrong sign (measured on
        the 784-256-10 MLP on 305 Fashion-MNIST images: extreme eigenvalues -1.6 / +23
        after 2 epochs, -0.47 / +20 after 10; damping 0.01 gave relative CG residuals of
        1-10 and planted duplicates of a target ranked last, damping 2 residuals below
        1e-5). Default 1.0: above the negative curvature of a trained MLP, small beside
        its top eigenvalues, and a condition number (~20-40) that 30 CG steps solve.
        Models trained less need more (the tests' 2-epoch MLP: 2.0); the residual check
        below says when.
    max_iter : CG iterations per inverse-Hessian vector product (dattri runs all of them:
        its ``tol`` is not implemented under vmap). Default 30 (dattri's 10 leaves a
        residual of ~1e-2 at damping 1 on the MLP; 30: ~1e-6).
    max_residual : ``score`` refuses (ValueError) a CG solution whose relative residual
        |g - (H + damping I) x| / |g| exceeds it (x = 0 has 1; the check costs one more
        Hessian-vector product per block of targets); ``cg_residuals_`` lists them.
        Default 0.1.
    hessian_examples : the Hessian is that of the mean loss over this many training
        images (a seeded random subset), or None: all of them (the exact training
        Hessian). CG's memory grows with it times the targets per block.
    checkpoints : "last" (the final model, the classical influence function) or "all"
        (the mean of the checkpoints' scores, each with its own Hessian; dattri's ensemble).
    seed : draws the ``hessian_examples`` subset (unused when None).
    Others as :class:`GradDot`.

    Why CG rather than LiSSA: LiSSA is stochastic (one random mini-batch per recursion
    step, dattri's default 5,000 steps for one estimate) and converges only with its
    ``scaling`` above the top Hessian eigenvalue and its damping above the negative
    curvature, both tuned per model, with no check of the result; CG is deterministic,
    uses the full-batch Hessian, converges in tens of steps once damped, and its
    residual is checked.

    Cost: every CG step is one Hessian-vector product over the ``hessian_examples``
    images for each target of a block (vmapped: memory ~ targets per block x those
    images' activations), so a block costs (max_iter + 1) x targets x hessian_examples
    forward-and-two-backward passes; on large training sets bound it with
    ``hessian_examples`` (and ``batch_size``, the most targets per block).

    Attributes after ``score``: ``cg_residuals_`` (every target's relative residual, per
    checkpoint, in scoring order).
    """

    name = "if-cg"
    cost = CostSpec(("gradient",), ("gradient/checkpoints", "scores/if-cg", "rankings/if-cg-*.parquet"))
    description = "influence functions (dattri, conjugate-gradient inverse-Hessian-vector products)"

    def __init__(self, damping: float = 1.0, max_iter: int = 30, hessian_examples: int | None = None,
                 checkpoints: str = "last", max_residual: float = 0.1, device: str = "auto", batch_size: int = 128,
                 max_block_mb: float = 256.0, seed: int = 0, progress: bool = False):
        super().__init__(device, batch_size, max_block_mb, seed, progress)
        self.damping = _check_float("damping", damping, self.name, 0.0, strict=True)
        self.max_iter = _check_int("max_iter", max_iter, 1, self.name)
        self.max_residual = _check_float("max_residual", max_residual, self.name, 0.0, strict=True)
        self.hessian_examples = None if hessian_examples is None else _check_int(
            "hessian_examples", hessian_examples, 1, self.name)
        if checkpoints not in ("last", "all"):
            raise ValueError(f"{self.name}: checkpoints must be 'last' or 'all', got {checkpoints!r}")
        self.checkpoints = checkpoints
        self.uses_all_checkpoints = checkpoints == "all"

    def settings(self) -> dict:
        settings = {"damping": self.damping, "max_iter": self.max_iter, "hessian_examples": self.hessian_examples,
                    "checkpoints": self.checkpoints}
        if self.hessian_examples is not None:
            settings["seed"] = self.seed
        return settings

    def _fit(self, model_fn, checkpoints) -> None:
        import torch
        from dattri.algorithm.influence_function import IFAttributorCG

        self.task_ = _dattri_task(model_fn, checkpoints, self.image_shape_, self.device_)
        self.attributor_ = IFAttributorCG(task=self.task_, device=str(self.device_), max_iter=self.max_iter,
                                          regularization=self.damping)
        n = len(self.train_ids_)
        positions = np.arange(n)
        if self.hessian_examples is not None and self.hessian_examples < n:
            positions = np.sort(np.random.default_rng(self.seed).choice(n, self.hessian_examples, replace=False))
        data = _Images(self.train_images_, self.train_labels_, self.batch_size)
        hessian_x = torch.stack([data[int(i)][0] for i in positions]).to(self.device_)
        hessian_y = torch.as_tensor(self.train_labels_[positions]).to(self.device_)
        self.hessian_data_ = (hessian_x, hessian_y)
        # dattri's transform_test_rep adds up one inverse-Hessian product per batch of the
        # cached loader (sum_b H_b^-1 v, which is (sum_b H_b)^-1 v only for one batch): the
        # Hessian's images are handed over as a single batch
        self.attributor_.cache(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(hessian_x, hessian_y),
                                                           batch_size=len(positions), shuffle=False))
        self.cg_residuals_ = []
        self._probe()

    def _damped_hvp(self, ckpt: int):
        """v -> (H + damping I) v at checkpoint ``ckpt`` (dattri's hvp, vmapped over rows)."""
        import torch
        from dattri.func.hessian import hvp_at_x

        params, _ = self.task_.get_param(ckpt)
        loss = self.task_.get_loss_func()
        hvp = hvp_at_x(lambda p: loss(p, self.hessian_data_), x=(params.detach(),), mode="rev-rev",
                       regularization=self.damping)
        return torch.func.vmap(hvp)

    def _probe(self) -> None:
        """One Hessian-vector product of one training gradient in fit: a model whose Hessian
        torch.func cannot take fails here with a clear error, before any scoring."""
        data = _Images(self.train_images_, self.train_labels_, 1)
        x, y = data[0]
        try:
            rep = self.attributor_.generate_train_rep(0, (x[None, None].to(self.device_), y[None, None].to(
                self.device_)))
            self._damped_hvp(0)(rep.detach())
        except Exception as exc:
            raise ValueError(f"{self.name}: dattri cannot take Hessian-vector products of this model "
                             f"(torch.func): {type(exc).__name__}: {exc}") from exc

    def _prepare(self, x, y):
        """(H + damping I)^-1 g(target) of every checkpoint, CG solved once per block of
        targets and checked: dattri's BaseInnerProductAttributor.attribute would solve it
        once per *training batch*; the same library calls (generate_test_rep,
        transform_test_rep, generate_train_rep) in the other loop order solve it once."""
        x, y = x.to(self.device_), y.to(self.device_)
        solved_all = []
        for ckpt in range(len(self.task_.get_checkpoints())):
            gradient = self.attributor_.generate_test_rep(ckpt, (x[None], y[None])).detach()
            solved = self.attributor_.transform_test_rep(ckpt, gradient).detach()
            solved = self._resolve_breakdowns(ckpt, gradient, solved)
            # CG's relative residual |g - (H + damping I) x| / |g| (x = 0 has 1): high when CG
            # met negative curvature (damping below the Hessian's most negative eigenvalue,
            # then the scores are noise, often of the wrong sign) or did not converge
            residual = (gradient - self._damped_hvp(ckpt)(solved)).norm(dim=1) / gradient.norm(dim=1).clamp_min(
                1e-30)
            residual = residual.detach().cpu().numpy()
            self.cg_residuals_.extend(residual.tolist())
            bad = ~(residual <= self.max_residual)
            if bad.any():
                raise ValueError(f"{self.name}: conjugate gradient did not solve (H + damping I) x = g for "
                                 f"{int(bad.sum())} of {len(residual)} targets (relative residual up to "
                                 f"{np.nanmax(residual):.3g} > max_residual={self.max_residual}; checkpoint "
                                 f"{ckpt}): the Hessian's negative curvature exceeds damping={self.damping} or "
                                 f"max_iter={self.max_iter} iterations are too few; raise damping")
            solved_all.append(solved)
        return solved_all

    def _resolve_breakdowns(self, ckpt: int, gradient, solved):
        """dattri 0.3.0's CG runs all ``max_iter`` steps (its ``tol`` is a TODO under vmap):
        once a vector's residual reaches 0 (an easy system: a small model, few
        ``hessian_examples``, strong damping) the next step divides 0 by 0 and the row
        comes back NaN. Such rows are solved again with dattri's CG at half the steps
        until finite: the iterate before the breakdown is the converged one (the residual
        check that follows still applies)."""
        from functools import partial

        import torch
        from dattri.func.hessian import ihvp_cg

        broken = ~torch.isfinite(solved).all(dim=1)
        steps = self.max_iter
        while broken.any() and steps > 1:
            steps //= 2
            params, _ = self.task_.get_param(ckpt)
            loss = partial(self.task_.get_loss_func(), **{self.task_.loss_func_data_key: self.hessian_data_})
            cg = ihvp_cg(loss, max_iter=steps, regularization=self.damping)
            solved[broken] = cg((params.detach(),), gradient[broken]).detach()
            broken = ~torch.isfinite(solved).all(dim=1)
        return solved

    def _score_block(self, prepared, c_start, c_end):
        import torch

        block = torch.zeros((len(prepared[0]), c_end - c_start), dtype=torch.float32, device=self.device_)
        for ckpt, solved in enumerate(prepared):
            offset = 0
            for batch_x, batch_y in self._train_loader(c_start, c_end):
                data = (batch_x.to(self.device_)[None], batch_y.to(self.device_)[None])
                train_rep = self.attributor_.transform_train_rep(ckpt, self.attributor_.generate_train_rep(ckpt, data))
                block[:, offset:offset + len(batch_x)] += (solved @ train_rep.T).detach()
                offset += len(batch_x)
        return (block / len(prepared)).cpu().numpy()  # the checkpoints' mean, as dattri's attribute


# ----------------------------------------------------------------------------- kronfluence

_KRON_TASK = None


def _kronfluence_task_class():
    """kronfluence's Task for classification: the summed cross-entropy of the true label
    (training loss and measurement alike); with ``sample=True`` (the true Fisher) labels
    drawn from the model's predictive distribution, as kronfluence's examples do."""
    global _KRON_TASK
    if _KRON_TASK is None:
        import torch
        import torch.nn.functional as F
        from kronfluence.task import Task

        class ClassificationTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                images, labels = batch
                logits = model(images)
                if sample:
                    with torch.no_grad():
                        probs = F.softmax(logits.detach().float(), dim=-1)
                        labels = torch.multinomial(probs, num_samples=1).flatten()
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch, model):
                images, labels = batch
                return F.cross_entropy(model(images), labels, reduction="sum")

        _KRON_TASK = ClassificationTask
    return _KRON_TASK


@register_method
class EKFAC(_GradientMethod):
    """EK-FAC influence (Grosse et al. 2023) through kronfluence:
    ``g(target)^T (F + damping I)^-1 g(train)`` over the model's Linear and Conv2d layers,
    F the eigenvalue-corrected Kronecker-factored Fisher fitted on the training images.

    Parameters
    ----------
    damping : added to the EK-FAC eigenvalues (kronfluence's ``damping_factor``), or None:
        kronfluence's heuristic, 0.1 x the mean eigenvalue of each layer (the default:
        scale-free, so it needs no tuning per model).
    empirical_fisher : False (default): the true Fisher, labels sampled from the model
        (seeded by ``seed``); True: the empirical Fisher of the true labels.
    checkpoints : "last" (the final model) or "all" (the mean of every checkpoint's
        scores, each with its own factors).
    ignore_unsupported : False (default): ``fit`` refuses a model with trainable
        parameters in layers kronfluence cannot track (anything but Linear and Conv2d,
        e.g. BatchNorm, LayerNorm, Embedding), whose influence would be silently left
        out; True: attribute through the supported layers only (kronfluence's own
        behaviour, as in the EK-FAC paper's choice of layers).
    device : as :class:`GradDot`; kronfluence runs on accelerate's device: "cpu" or the
        process's current CUDA device ("cuda" / "cuda:0" / "auto").
    Others as :class:`GradDot`.

    Factors (covariances, eigenvectors, corrected eigenvalues) are fitted in ``fit`` into
    a temporary folder owned by this object.
    """

    name = "ekfac"
    cost = CostSpec(("gradient",), ("gradient/checkpoints", "scores/ekfac", "rankings/ekfac-*.parquet"))
    description = "EK-FAC influence functions (kronfluence) over the Linear and Conv2d layers"

    def __init__(self, damping: float | None = None, empirical_fisher: bool = False, checkpoints: str = "last",
                 ignore_unsupported: bool = False, device: str = "auto", batch_size: int = 128,
                 max_block_mb: float = 256.0, seed: int = 0, progress: bool = False):
        super().__init__(device, batch_size, max_block_mb, seed, progress)
        self.damping = None if damping is None else _check_float("damping", damping, self.name, 0.0)
        if not isinstance(empirical_fisher, bool):
            raise ValueError(f"{self.name}: empirical_fisher must be True or False, got {empirical_fisher!r}")
        if not isinstance(ignore_unsupported, bool):
            raise ValueError(f"{self.name}: ignore_unsupported must be True or False, got {ignore_unsupported!r}")
        if checkpoints not in ("last", "all"):
            raise ValueError(f"{self.name}: checkpoints must be 'last' or 'all', got {checkpoints!r}")
        self.empirical_fisher, self.ignore_unsupported = empirical_fisher, ignore_unsupported
        self.checkpoints = checkpoints
        self.uses_all_checkpoints = checkpoints == "all"

    def settings(self) -> dict:
        settings = {"damping": self.damping, "empirical_fisher": self.empirical_fisher,
                    "checkpoints": self.checkpoints, "ignore_unsupported": self.ignore_unsupported}
        if not self.empirical_fisher:
            settings["seed"] = self.seed
        return settings

    def _check_model(self, model) -> None:
        import torch
        from kronfluence.module import TrackedModule

        supported = tuple(TrackedModule.SUPPORTED_MODULES)
        names = ", ".join(sorted(t.__name__ for t in supported))
        tracked = []
        for layer, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if isinstance(module, supported):
                if isinstance(module, torch.nn.Conv2d) and module.padding_mode != "zeros":
                    raise ValueError(f"{self.name}: layer {layer!r} (Conv2d) pads with {module.padding_mode!r}; "
                                     f"kronfluence's EK-FAC unfolds convolutions with zero padding only")
                if isinstance(module, torch.nn.Conv2d) and isinstance(module.padding, str):
                    self._check_string_padding(layer, module)
                tracked.append(layer)
            elif own and not self.ignore_unsupported:
                raise ValueError(f"{self.name}: layer {layer!r} ({type(module).__name__}) has trainable parameters "
                                 f"that kronfluence's EK-FAC cannot track; supported layer types: {names} "
                                 f"(ignore_unsupported=True attributes through those layers only)")
        if not tracked:
            raise ValueError(f"{self.name}: the model has no layer kronfluence's EK-FAC supports ({names})")

    def _check_string_padding(self, layer, module) -> None:
        # kronfluence (module/conv2d.py) refuses unequal left/right padding (padding="same"
        # with an even kernel) only while computing: refuse it here, before any work
        for k, s, d in zip(_pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)):
            if module.padding == "same" and (d * (k - 1)) % 2 == 1:
                raise ValueError(f"{self.name}: layer {layer!r} (Conv2d) has padding='same' with an even kernel "
                                 f"(unequal padding), which kronfluence's EK-FAC does not support")

    def _fit(self, model_fn, checkpoints) -> None:
        import logging

        import torch
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        if self.device_.type == "cuda" and (self.device_.index or 0) != torch.cuda.current_device():
            raise ValueError(f"{self.name}: kronfluence runs on the process's current CUDA device "
                             f"({torch.cuda.current_device()}), not {self.device}: select the device with "
                             f"torch.cuda.set_device or CUDA_VISIBLE_DEVICES")
        self._tmp = tempfile.TemporaryDirectory(prefix="ekfac-")  # removed with this object
        task = _kronfluence_task_class()()
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=self.empirical_fisher,
                                      covariance_max_examples=None, lambda_max_examples=None)
        data = _Images(self.train_images_, self.train_labels_, self.batch_size)
        self.analyzers_ = []
        for index, state in enumerate(checkpoints):
            model = model_fn()
            model.load_state_dict(state)
            model = prepare_model(model.to(self.device_), task)
            analyzer = Analyzer(analysis_name=f"checkpoint{index}", model=model, task=task,
                                cpu=self.device_.type == "cpu", log_level=logging.WARNING,
                                disable_tqdm=not self.progress, output_dir=self._tmp.name)
            with torch.random.fork_rng(devices=[] if self.device_.type == "cpu" else [self.device_]), \
                    _quiet_kronfluence():
                torch.manual_seed(self.seed)  # the true Fisher's sampled labels
                analyzer.fit_all_factors(factors_name="ekfac", dataset=data, per_device_batch_size=self.batch_size,
                                         factor_args=factor_args, overwrite_output_dir=True)
            self.analyzers_.append(analyzer)

    def _score_block(self, prepared, c_start, c_end):
        import torch
        from kronfluence.arguments import ScoreArguments

        x, y = prepared

        score_args = ScoreArguments(damping_factor=self.damping)
        query = torch.utils.data.TensorDataset(x, y)
        train = _Images(self.train_images_, self.train_labels_, self.batch_size)
        total = 0.0
        for analyzer in self.analyzers_:
            with _quiet_kronfluence():
                scores = analyzer.compute_pairwise_scores(
                    scores_name="block", factors_name="ekfac", query_dataset=query, train_dataset=train,
                    per_device_query_batch_size=len(x), per_device_train_batch_size=self.batch_size,
                    train_indices=list(range(c_start, c_end)), score_args=score_args, overwrite_output_dir=True)
            if scores is None:  # not the main process (kronfluence's multi-process runs)
                scores = analyzer.load_pairwise_scores(scores_name="block")
            total = total + scores["all_modules"].float().cpu()  # (targets, train)
        return (total / len(self.analyzers_)).numpy()


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
