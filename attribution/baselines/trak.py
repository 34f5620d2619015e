"""TRAK (Park et al. 2023) through MadryLab's ``traker`` package (plain Python, no Ray).

The library the ``"trak"`` attribution method (:mod:`attribution.methods.trak`) adapts
to the method interface; the trak stage (:mod:`attribution.stages.trak`) trains the
checkpoints with :func:`train_checkpoints` and writes scores and rankings.

:class:`TrakScorer` wraps ``trak.TRAKer`` with task ``"image_classification"``:

1. ``fit(model_fn, checkpoints, train_x, train_y)``: for every checkpoint (a state
   dict of ``model_fn()``), per-example gradients of the margin of each training
   image, randomly projected to ``proj_dim`` (``featurize``), then
   ``Phi (Phi^T Phi + lambda I)^-1`` per checkpoint (``finalize_features``).
2. ``score(target_x, target_y)``: the targets' projected gradients per checkpoint and
   ``finalize_scores``: a (train x target) matrix, averaged over the checkpoints;
   higher = the training image raises the target's margin more.
   ``score_budgets(target_x, target_y, counts)``: the scores of the first m checkpoints
   for each m in ``counts`` from one featurization (traker's ``finalize_scores(model_ids=
   ...)``; each checkpoint's features are finalized on their own, so the first m of M
   featurized checkpoints give exactly the scores of featurizing only m).

Pitfalls of traker 0.3.2 handled here (docs/baselines.md):
- ``load_from_save_dir=False`` is broken (``experiments.json`` is never created, so
  scoring fails): the scorer always uses ``load_from_save_dir=True`` on a save
  directory whose settings it recorded (``attribution-features.json``): one made with
  other settings is deleted and recreated (stale features are never picked up), one
  with the same settings keeps its finished checkpoints.
- Map / reduce over checkpoints (traker's SLURM pattern): each checkpoint is
  featurized by :meth:`TrakScorer.featurize_checkpoint` in a TRAKer save dir of its
  own (``work-NNN/``; parallel TRAKers on one save dir race on its JSON files), moved
  into the shared dir when finalized; one TRAKer over the shared dir then scores.
- Projector: ``CudaProjector`` needs CUDA and the ``fast_jl`` kernel (which often fails
  to build); otherwise :class:`BasicProjector` (dense Gaussian matrix). traker's own
  BasicProjector regenerates its matrix block by block for EVERY batch (100 columns a
  block), which dominates the CPU time; here the block is as wide as
  ``max_projector_mb`` allows (the whole matrix for small models), so it is generated
  once per checkpoint. traker frees the matrix in ``finalize_features`` and then fails
  to regenerate a single-block matrix when scoring (AttributeError ``proj_matrix``):
  :class:`_BasicProjector` regenerates it.
- ``finalize_scores`` holds a (train x targets) float32 matrix in memory (the users'
  OOM at 1M x 50k): ``score`` handles the targets it is given in one traker
  experiment, so callers bound memory by passing chunks of targets
  (the trak stage does, ``trak.target_chunk``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

TASK = "image_classification"
# Files traker writes into its save_dir: the folder is ours to delete only if it holds these.
_TRAKER_MARKERS = ("metadata.json", "experiments.json")
# What the features in a save dir were made with (TrakScorer.open_features).
FEATURES_FILE = "attribution-features.json"


def _basic_projector_class():
    from trak.projectors import BasicProjector

    class _BasicProjector(BasicProjector):
        """traker's BasicProjector, regenerating a freed single-block matrix.

        ``TRAKer.finalize_features`` calls ``free_memory()``; with one block and an
        unchanged model id, ``project`` then uses the deleted matrix (traker 0.3.2 bug).
        """

        def project(self, grads, model_id):
            if self.num_blocks == 1 and not self.proj_matrix_available and model_id == self.model_id:
                self.generate_sketch_matrix(self.generator_states[0])
            return super().project(grads, model_id)

    return _BasicProjector


def cuda_projector_available() -> bool:
    """CUDA is usable and traker's ``fast_jl`` kernel imports."""
    if not torch.cuda.is_available():
        return False
    try:
        import fast_jl  # noqa: F401
    except Exception:
        return False
    return True


def resolve_device(device: str) -> str:
    """``device`` with "auto" resolved: CUDA when torch sees it, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; use device='auto' or 'cpu'")
    return str(device)


def projector_name(device: str) -> str:
    """The projector TRAK uses on ``device``: "CudaProjector" (CUDA with the fast_jl
    kernel) or "BasicProjector" (a dense Gaussian matrix, :class:`TrakScorer`'s CPU path)."""
    device = resolve_device(device)
    return "CudaProjector" if device.startswith("cuda") and cuda_projector_available() else "BasicProjector"


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch threads (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class TrakScores:
    """Scores of one ``score`` call: ``scores`` (n_train, n_targets) float32."""

    scores: np.ndarray
    projector: str
    proj_dim: int
    checkpoints: int
    seconds: float  # this call's target gradients of the first ``checkpoints`` models + their finalize_scores


class TrakScorer:
    """TRAK scores of training images for targets, from M model checkpoints.

    Parameters
    ----------
    save_dir : traker's working folder (projected gradients, features, score mmaps);
        kept between runs with the same settings (finished checkpoints are reused), else
        deleted and recreated by ``fit``. It must be a folder only TRAK uses.
    proj_dim : dimension of the random projection of per-example gradients; must be
        smaller than the training-set size (X^T X is proj_dim x proj_dim).
    lambda_reg : ridge term added to X^T X before inverting (traker's ``lambda_reg``).
    batch_size : images per featurize / score call (per-example gradients of a batch
        are held in memory: batch_size x number of parameters floats).
    device : "auto" (CUDA when available, else CPU), "cpu" or "cuda[:i]".
    seed : projector seed (traker's ``projector_seed``).
    use_half_precision : float16 features (traker's default on GPU); keep False on CPU.
    max_projector_mb : memory for one block of the CPU projection matrix; the whole
        matrix (parameters x proj_dim floats) when it fits, generated once per checkpoint.
    grad_wrt : parameter names to take gradients of (None: all parameters).
    progress : tqdm bars.
    """

    def __init__(self, save_dir: str | os.PathLike, proj_dim: int = 512, lambda_reg: float = 0.0,
                 batch_size: int = 128, device: str = "auto", seed: int = 0, use_half_precision: bool = False,
                 max_projector_mb: int = 1024, grad_wrt: Sequence[str] | None = None, progress: bool = True):
        if int(proj_dim) < 1:
            raise ValueError(f"proj_dim must be at least 1, got {proj_dim}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if float(lambda_reg) < 0:
            raise ValueError(f"lambda_reg must be >= 0, got {lambda_reg}")
        if int(max_projector_mb) < 1:
            raise ValueError(f"max_projector_mb must be at least 1, got {max_projector_mb}")
        self.save_dir = Path(save_dir)
        self.proj_dim = int(proj_dim)
        self.lambda_reg = float(lambda_reg)
        self.batch_size = int(batch_size)
        self.device = device
        self.seed = int(seed)
        self.use_half_precision = bool(use_half_precision)
        self.max_projector_mb = int(max_projector_mb)
        self.grad_wrt = list(grad_wrt) if grad_wrt else None
        self.progress = progress

    # ------------------------------------------------------------------ helpers
    def resolve_device(self) -> str:
        """The device ``fit`` will use (:func:`resolve_device`)."""
        return resolve_device(self.device)

    def _fresh_save_dir(self) -> None:
        folder = self.save_dir
        if folder.exists():
            entries = [p.name for p in folder.iterdir()]
            if entries and not any(m in entries for m in (*_TRAKER_MARKERS, FEATURES_FILE)):
                raise ValueError(f"save_dir {folder} is not empty and holds no traker files ({entries[:5]}); "
                                 "TrakScorer deletes its save_dir, so give it a folder of its own")
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    def feature_settings(self, n_train: int, identity: dict | None = None) -> dict:
        """What the stored features depend on: a save dir recorded with other values is
        started afresh by :meth:`open_features`."""
        device = self.resolve_device()
        return {"proj_dim": self.proj_dim, "lambda_reg": self.lambda_reg, "seed": self.seed,
                "use_half_precision": self.use_half_precision, "max_projector_mb": self.max_projector_mb,
                "grad_wrt": self.grad_wrt, "projector": projector_name(device), "n_train": int(n_train),
                "identity": dict(identity or {})}

    def open_features(self, n_train: int, identity: dict | None = None,
                      digests: Sequence[str] | None = None) -> dict[int, float]:
        """Keep the save dir when its features were made with these settings (and the
        caller's ``identity``: checkpoints' recipe, training ids), else start it afresh.
        Returns {model id: featurize seconds} of the checkpoints already finalized there
        (each one's ``model-NNN.json``, with the :func:`state_digest` of the checkpoint
        it was made from: one whose digest differs from ``digests[id]`` is redone); leftovers of an interrupted run (a checkpoint's
        unfinished work folder is kept: traker resumes it batch by batch; target
        gradients and score mmaps) are dealt with here."""
        import json

        from attribution.artifacts import write_json

        wanted = self.feature_settings(n_train, identity)
        marker = self.save_dir / FEATURES_FILE
        stored = None
        if marker.exists():
            try:
                stored = json.loads(marker.read_text())
            except ValueError:
                stored = None
        if stored != json.loads(json.dumps(wanted)):
            self._fresh_save_dir()
            write_json(marker, wanted)
        for path in [*self.save_dir.glob("scores/*.mmap"), *self.save_dir.glob("[0-9]*/*_grads.mmap")]:
            path.unlink()  # target gradients / scores of an interrupted score call
        done = {}
        for path in self.save_dir.glob("model-*.json"):
            model_id = int(path.stem.split("-")[1])
            record = json.loads(path.read_text())
            same = digests is not None and model_id < len(digests) and record.get("digest") == digests[model_id]
            if same and (self.save_dir / f"id_{model_id}.json").exists() and (self.save_dir / str(model_id)).is_dir():
                done[model_id] = float(record["seconds"])
        return done

    def featurize_checkpoint(self, model_fn: Callable[[], torch.nn.Module], state: dict, model_id: int,
                             train_x, train_y, bar=None) -> float:
        """Featurize and finalize ONE checkpoint into the save dir (which
        :meth:`open_features` prepared): the map step of traker's map / reduce over
        checkpoints, runnable in any process that sees the save dir.

        It works in a folder of its own, ``work-NNN/`` (a TRAKer save dir holding only
        this model id: parallel workers never write the same traker metadata), resumes
        there batch by batch after an interruption (traker's per-image ``is_featurized``;
        the images of a finished batch are not even read), then moves the finished
        features into the shared save dir and writes ``model-NNN.json`` (its seconds)
        last: the mark that this checkpoint is done. Returns its seconds."""
        from trak import TRAKer

        begin = time.perf_counter()
        train_x = train_x if isinstance(train_x, StreamedImages) else torch.as_tensor(train_x, dtype=torch.float32)
        train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
        n, model_id = len(train_x), int(model_id)
        device = self.resolve_device()
        model = model_fn().to(device)
        n_grad = sum(p.numel() for name, p in model.named_parameters()
                     if self.grad_wrt is None or name in self.grad_wrt)
        projector, _ = self._projector(n_grad, device)
        work = self.save_dir / f"work-{model_id:03d}"
        work.mkdir(exist_ok=True)
        traker = TRAKer(model=model, task=TASK, train_set_size=n, save_dir=str(work), load_from_save_dir=True,
                        device=device, projector=projector, proj_dim=self.proj_dim,
                        use_half_precision=self.use_half_precision, projector_seed=self.seed,
                        grad_wrt=self.grad_wrt, lambda_reg=self.lambda_reg, logging_level=logging.WARNING)
        if traker.saver.model_ids.get(model_id, {}).get("is_finalized") != 1:
            traker.load_checkpoint(state, model_id=model_id)
            done = np.asarray(traker.saver.current_store["is_featurized"]).reshape(-1) == 1
            for start in range(0, n, self.batch_size):
                stop = min(n, start + self.batch_size)
                if not done[start:stop].all():
                    traker.featurize(batch=(train_x[start:stop].to(device), train_y[start:stop].to(device)),
                                     inds=np.arange(start, stop))
                if bar is not None:
                    bar.update(1)
            # del_grads: the raw projected gradients are not needed once the features exist
            traker.finalize_features(model_ids=[model_id], del_grads=True)
        del traker
        return self._publish(model_id, state, time.perf_counter() - begin)

    def _publish(self, model_id: int, state: dict, seconds: float) -> float:
        """Move a finalized checkpoint's features from ``work-NNN/`` into the shared save
        dir and write its ``model-NNN.json`` last (the mark that it is done)."""
        from attribution.artifacts import write_json

        work = self.save_dir / f"work-{model_id:03d}"
        target = self.save_dir / str(model_id)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work / str(model_id), target)
        os.replace(work / f"id_{model_id}.json", self.save_dir / f"id_{model_id}.json")
        shutil.rmtree(work)
        write_json(self.save_dir / f"model-{model_id:03d}.json", {"seconds": seconds, "digest": state_digest(state)})
        return seconds

    # ------------------------------------------------------------------ map / reduce over shards
    def worker_params(self) -> dict:
        """Constructor parameters a worker's scorer needs to project rows exactly as this
        one would (all but the save dir, the device and the bars)."""
        return {"proj_dim": self.proj_dim, "lambda_reg": self.lambda_reg, "batch_size": self.batch_size,
                "seed": self.seed, "use_half_precision": self.use_half_precision,
                "max_projector_mb": self.max_projector_mb, "grad_wrt": self.grad_wrt}

    def checkpoint_rows(self, model_fn: Callable[[], torch.nn.Module], state: dict, model_id: int,
                        n_train: int) -> "CheckpointRows":
        """The driver's side of featurizing one checkpoint on workers: its ``work-NNN/``
        folder (the one :meth:`featurize_checkpoint` uses, so either resumes the other),
        which takes the rows workers projected (:meth:`project_rows`) and finalizes."""
        return CheckpointRows(self, model_fn, state, int(model_id), int(n_train))

    def project_rows(self, model_fn: Callable[[], torch.nn.Module], state: dict, model_id: int, train_x, train_y,
                     start: int, stop: int, scratch: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """A worker's side: the projected gradients and out-to-loss terms of training
        positions start..stop-1 for one checkpoint, as traker's ``featurize`` computes
        them (a TRAKer over just these rows in ``scratch``, a local folder it empties;
        the same projector seed and model id, so the same projection as in one process).
        ``train_x`` / ``train_y`` index the full training set; images are read
        ``batch_size`` at a time. Returns (grads (rows, proj_dim), out_to_loss (rows,))."""
        from trak import TRAKer

        device = self.resolve_device()
        model = model_fn().to(device)
        n_grad = sum(p.numel() for name, p in model.named_parameters()
                     if self.grad_wrt is None or name in self.grad_wrt)
        key = (n_grad, device)
        if getattr(self, "_projector_cache", (None,))[0] != key:  # one projection matrix per worker
            self._projector_cache = (key, self._projector(n_grad, device)[0])
        scratch = Path(scratch)
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        try:
            traker = TRAKer(model=model, task=TASK, train_set_size=stop - start, save_dir=str(scratch),
                            load_from_save_dir=True, device=device, projector=self._projector_cache[1],
                            proj_dim=self.proj_dim, use_half_precision=self.use_half_precision,
                            projector_seed=self.seed, grad_wrt=self.grad_wrt, lambda_reg=self.lambda_reg,
                            logging_level=logging.WARNING)
            traker.load_checkpoint(state, model_id=int(model_id))
            labels = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
            for a in range(start, stop, self.batch_size):
                b = min(stop, a + self.batch_size)
                traker.featurize(batch=(train_x[a:b].to(device), labels[a:b].to(device)),
                                 inds=np.arange(a - start, b - start))
            store = traker.saver.current_store
            return np.array(store["grads"]), np.array(store["out_to_loss"]).reshape(-1)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _projector(self, n_grad: int, device: str):
        """(projector or None = let TRAKer build its CUDA one, name)."""
        if projector_name(device) == "CudaProjector":
            return None, "CudaProjector"
        from trak.projectors import ProjectionType

        block = max(1, min(self.proj_dim, (self.max_projector_mb << 20) // (4 * n_grad)))
        # Gaussian on CPU: traker's own CPU choice (Bernoulli sampling lacks float16 on CPU).
        projector = _basic_projector_class()(grad_dim=n_grad, proj_dim=self.proj_dim, seed=self.seed,
                                             proj_type=ProjectionType.normal, device=device, block_size=block,
                                             dtype=torch.float32)
        return projector, "BasicProjector"

    def _batches(self, x, y: torch.Tensor, device: str):
        for start in range(0, len(x), self.batch_size):
            yield x[start:start + self.batch_size].to(device), y[start:start + self.batch_size].to(device)

    # ------------------------------------------------------------------ fit / score
    def fit(self, model_fn: Callable[[], torch.nn.Module], checkpoints: Sequence[dict], train_x, train_y,
            identity: dict | None = None, featurize: Callable[[list[int]], dict[int, float]] | None = None
            ) -> "TrakScorer":
        """Featurize the training set for every checkpoint, then open the features for scoring.

        model_fn : builds the (untrained) model the state dicts belong to.
        checkpoints : M state dicts.
        train_x : normalised NCHW float tensor (``attribution.retrain.to_tensor``), or a
            :class:`StreamedImages` (decoded from files ``batch_size`` images at a time).
        train_y : integer labels.
        identity : what else the features depend on (the checkpoints' recipe, the
            training ids): features stored in the save dir with the same settings and
            identity are kept, per checkpoint (:meth:`open_features`); others are deleted.
        featurize : ``featurize(scorer, model_ids) -> {model id: seconds}`` featurizes
            those checkpoints elsewhere (the trak stage fans shards of training images out
            over Ray workers: :meth:`project_rows` there, :meth:`checkpoint_rows` here);
            None: one after the other here (:meth:`featurize_checkpoint`).
        """
        from tqdm.auto import tqdm
        from trak import TRAKer

        if not isinstance(train_x, StreamedImages):
            train_x = torch.as_tensor(train_x, dtype=torch.float32)
        train_y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
        n = len(train_x)
        if len(train_y) != n:
            raise ValueError(f"{n} training images but {len(train_y)} labels: they must match")
        if len(checkpoints) < 1:
            raise ValueError("checkpoints is empty: TRAK needs at least one trained model (state dict)")
        if self.proj_dim >= n:
            raise ValueError(f"proj_dim={self.proj_dim} must be smaller than the training-set size {n} "
                             f"(X^T X of {n} projected gradients is then singular); lower proj_dim, "
                             f"e.g. --set trak.proj_dim={max(1, n // 2)}")
        start = time.perf_counter()
        self.checkpoints_ = list(checkpoints)
        self.n_train_ = n
        seconds = self.open_features(n, identity, [state_digest(state) for state in self.checkpoints_])
        todo = [i for i in range(len(self.checkpoints_)) if i not in seconds]
        self.featurized_now_ = list(todo)
        if todo and featurize is not None:
            seconds.update(featurize(self, todo))
        elif todo:
            steps = len(todo) * math.ceil(n / self.batch_size)
            with tqdm(total=steps, desc=f"trak featurize ({len(todo)} models)", unit="batch",
                      disable=not self.progress, file=sys.stderr, dynamic_ncols=True) as bar:
                for model_id in todo:
                    seconds[model_id] = self.featurize_checkpoint(model_fn, self.checkpoints_[model_id], model_id,
                                                                  train_x, train_y, bar=bar)
        # per-checkpoint seconds (featurize + finalize, measured when it was featurized):
        # what featurizing only the first m checkpoints costs (budgets)
        self.featurize_model_seconds_ = [float(seconds[i]) for i in range(len(self.checkpoints_))]
        self.finalize_features_seconds_ = 0.0  # in each checkpoint's seconds
        # the reduce side: one TRAKer over the shared save dir scores with every checkpoint
        device = self.resolve_device()
        model = model_fn().to(device)
        n_grad = sum(p.numel() for name, p in model.named_parameters()
                     if self.grad_wrt is None or name in self.grad_wrt)
        projector, name = self._projector(n_grad, device)
        self.traker_ = TRAKer(model=model, task=TASK, train_set_size=n, save_dir=str(self.save_dir),
                              load_from_save_dir=True, device=device, projector=projector, proj_dim=self.proj_dim,
                              use_half_precision=self.use_half_precision, projector_seed=self.seed,
                              grad_wrt=self.grad_wrt, lambda_reg=self.lambda_reg, logging_level=logging.WARNING)
        missing = [i for i in range(len(self.checkpoints_))
                   if self.traker_.saver.model_ids.get(i, {}).get("is_finalized") != 1]
        if missing:
            raise RuntimeError(f"checkpoints {missing} have no finalized TRAK features in {self.save_dir} "
                               "after featurizing; rerun the trak stage (it resumes)")
        self.projector_ = type(self.traker_.projector).__name__ if projector is None else name
        self.device_ = device
        self.featurize_seconds_ = time.perf_counter() - start
        self.score_model_seconds_ = [0.0] * len(self.checkpoints_)  # target gradients, summed over calls
        self.finalize_scores_seconds_: dict[int, float] = {}        # per checkpoint count, summed over calls
        self._experiments = 0
        return self

    def featurize_seconds_of(self, count: int) -> float:
        """Seconds featurizing and finalizing the first ``count`` checkpoints took (each
        measured when it was featurized, in this run or the one whose features are kept)."""
        return float(sum(self.featurize_model_seconds_[:int(count)]))

    def score_seconds_of(self, count: int) -> float:
        """Seconds the score calls spent on the scores of the first ``count`` checkpoints."""
        count = int(count)
        return float(sum(self.score_model_seconds_[:count]) + self.finalize_scores_seconds_.get(count, 0.0))

    def score(self, target_x, target_y) -> TrakScores:
        """Scores (n_train, n_targets) for these targets from every checkpoint; memory
        ~ n_train x n_targets floats."""
        if not hasattr(self, "traker_"):
            raise RuntimeError("call fit(...) before score(...)")
        count = len(self.checkpoints_)
        return self.score_budgets(target_x, target_y, [count])[count]

    def score_budgets(self, target_x, target_y, counts: Sequence[int]) -> dict[int, TrakScores]:
        """{m: scores of the first m checkpoints} for each m in ``counts`` (1 <= m <= the
        checkpoints given to ``fit``): the targets' gradients are computed once, for the
        largest m, and traker's ``finalize_scores(model_ids=range(m))`` averages each prefix.
        Memory ~ n_train x n_targets floats per count held at once."""
        if not hasattr(self, "traker_"):
            raise RuntimeError("call fit(...) before score(...)")
        featurized = len(self.checkpoints_)
        counts = sorted({int(m) for m in counts})
        if not counts or counts[0] < 1 or counts[-1] > featurized:
            raise ValueError(f"counts must be checkpoint counts between 1 and the {featurized} featurized "
                             f"checkpoints, got {counts}; featurize more checkpoints or lower the budgets")
        target_x = torch.as_tensor(target_x, dtype=torch.float32)
        target_y = torch.as_tensor(np.asarray(target_y), dtype=torch.long)
        if len(target_x) != len(target_y) or len(target_x) == 0:
            raise ValueError(f"{len(target_x)} target images and {len(target_y)} labels: need the same, >= 1")
        exp_name = f"targets{self._experiments:05d}"  # a fresh traker experiment per call
        self._experiments += 1
        call_model_seconds = []
        for model_id, state in enumerate(self.checkpoints_[:counts[-1]]):
            begin = time.perf_counter()
            self.traker_.start_scoring_checkpoint(exp_name=exp_name, checkpoint=state, model_id=model_id,
                                                  num_targets=len(target_x))
            for xb, yb in self._batches(target_x, target_y, self.device_):
                self.traker_.score(batch=(xb, yb), num_samples=len(xb))
            call_model_seconds.append(time.perf_counter() - begin)
            self.score_model_seconds_[model_id] += call_model_seconds[-1]
        results = {}
        for count in counts:
            begin = time.perf_counter()
            scores = np.array(self.traker_.finalize_scores(exp_name=exp_name, model_ids=list(range(count))),
                              dtype=np.float32)
            finalize = time.perf_counter() - begin
            self.finalize_scores_seconds_[count] = self.finalize_scores_seconds_.get(count, 0.0) + finalize
            if not np.isfinite(scores).all():
                raise ValueError(f"TRAK scores of {count} checkpoint(s) contain NaN/inf (X^T X badly "
                                 "conditioned?); raise lambda_reg or lower proj_dim")
            results[count] = TrakScores(scores, self.projector_, self.proj_dim, count,
                                        sum(call_model_seconds[:count]) + finalize)
        # the returned matrices are now ours: drop traker's copies (score mmap, target gradients)
        self.traker_.saver.current_store.pop(f"{exp_name}_scores", None)
        self.traker_.scores = None
        for path in [self.save_dir / "scores" / f"{exp_name}.mmap",
                     *self.save_dir.glob(f"*/{exp_name}_grads.mmap")]:
            path.unlink(missing_ok=True)
        return results


class CheckpointRows:
    """One checkpoint being featurized by workers: the driver stores each shard of rows
    they return in ``work-NNN/`` (traker's own memory maps: ``grads``, ``out_to_loss``,
    ``is_featurized``), then finalizes and publishes it (:meth:`TrakScorer._publish`).
    Made by :meth:`TrakScorer.checkpoint_rows`; the rows already stored there (an
    interrupted run) are not asked for again (:meth:`pending`)."""

    def __init__(self, scorer: TrakScorer, model_fn, state: dict, model_id: int, n_train: int):
        from trak import TRAKer

        self.scorer, self.state, self.model_id, self.n = scorer, state, model_id, n_train
        device = scorer.resolve_device()
        model = model_fn().to(device)
        n_grad = sum(p.numel() for name, p in model.named_parameters()
                     if scorer.grad_wrt is None or name in scorer.grad_wrt)
        work = scorer.save_dir / f"work-{model_id:03d}"
        work.mkdir(exist_ok=True)
        self.traker = TRAKer(model=model, task=TASK, train_set_size=n_train, save_dir=str(work),
                             load_from_save_dir=True, device=device,
                             projector=_stored_rows_projector(n_grad, scorer.proj_dim, scorer.seed, device),
                             proj_dim=scorer.proj_dim, use_half_precision=scorer.use_half_precision,
                             projector_seed=scorer.seed, grad_wrt=scorer.grad_wrt, lambda_reg=scorer.lambda_reg,
                             logging_level=logging.WARNING)
        self.finalized = self.traker.saver.model_ids.get(model_id, {}).get("is_finalized") == 1
        if not self.finalized:
            self.traker.load_checkpoint(state, model_id=model_id)
        self.seconds = 0.0  # the workers' seconds for this checkpoint's rows, and finalizing

    def featurized(self) -> np.ndarray:
        return np.asarray(self.traker.saver.current_store["is_featurized"]).reshape(-1) == 1

    def pending(self, shard_size: int) -> list[tuple[int, int]]:
        """The shards (start, stop) of ``shard_size`` positions with a row not stored yet."""
        if self.finalized:
            return []
        done = self.featurized()
        return [(a, min(self.n, a + shard_size)) for a in range(0, self.n, int(shard_size))
                if not done[a:a + shard_size].all()]

    def write(self, start: int, stop: int, grads: np.ndarray, out_to_loss: np.ndarray, seconds: float) -> None:
        if grads.shape != (stop - start, self.scorer.proj_dim) or len(out_to_loss) != stop - start:
            raise ValueError(f"checkpoint {self.model_id}, rows {start}..{stop}: got gradients {grads.shape} "
                             f"and {len(out_to_loss)} out-to-loss terms")
        store = self.traker.saver.current_store
        store["grads"][start:stop] = np.asarray(grads, dtype=store["grads"].dtype)
        store["out_to_loss"][start:stop] = np.asarray(out_to_loss, dtype=store["out_to_loss"].dtype).reshape(-1, 1)
        store["is_featurized"][start:stop] = 1
        for name in ("grads", "out_to_loss", "is_featurized"):
            store[name].flush()  # on disk before the shard counts as done
        self.traker.saver.serialize_current_model_id_metadata()
        self.seconds += float(seconds)

    def finish(self) -> float:
        """Finalize (Phi (Phi^T Phi)^-1 on this process's device) and publish; returns the
        checkpoint's seconds (workers' + finalizing)."""
        if not self.featurized().all():
            raise RuntimeError(f"checkpoint {self.model_id}: {int((~self.featurized()).sum())} training images "
                               "not featurized yet")
        begin = time.perf_counter()
        if not self.finalized:
            self.traker.finalize_features(model_ids=[self.model_id], del_grads=True)
        del self.traker
        return self.scorer._publish(self.model_id, self.state, self.seconds + time.perf_counter() - begin)


def _stored_rows_projector(grad_dim: int, proj_dim: int, seed: int, device: str):
    """A projector for a TRAKer that only stores rows projected elsewhere and finalizes
    them: traker records its matrix type in the save dir's metadata (it must read as
    the workers' projector's), and frees it before finalizing; it never projects."""
    from trak.projectors import AbstractProjector, ProjectionType

    class StoredRowsProjector(AbstractProjector):
        def __init__(self):
            cuda = projector_name(device) == "CudaProjector"
            # the types TrakScorer's projectors use: TRAKer's CudaProjector, our Gaussian BasicProjector
            super().__init__(grad_dim, proj_dim, seed, ProjectionType.rademacher if cuda else ProjectionType.normal,
                             device)

        def project(self, grads, model_id):
            raise RuntimeError("this TRAKer stores rows projected by the workers; it does not project")

        def free_memory(self):
            pass

    return StoredRowsProjector()


# ----------------------------------------------------------------------------- file-backed data


class StreamedImages:
    """A training set too large to hold, as :class:`TrakScorer` reads it: ``len(x)`` and
    ``x[a:b]``, the normalised NCHW images of positions a..b-1 decoded on demand by
    ``read(positions)`` (e.g. :meth:`attribution.retrain.Retrainer.images_at` over an
    ImageFolder), so that featurizing holds one batch of images at a time."""

    def __init__(self, read: Callable[[np.ndarray], torch.Tensor], n: int):
        if int(n) < 1:
            raise ValueError(f"StreamedImages needs at least one image, got n={n}")
        self.read, self.n = read, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError(f"StreamedImages takes slices (a batch of positions), got {type(index).__name__}")
        return self.read(np.arange(*index.indices(self.n)))


# ----------------------------------------------------------------------------- checkpoints


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, shapes, dtypes and values: which checkpoint a
    checkpoint's stored TRAK features were made from."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def checkpoint_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"model-{int(index):03d}.pt"


def train_checkpoints(trainer, folder: str | os.PathLike, n_models: int, base_seed: int, recipe: str,
                      threads: int | None = 1, progress: bool = True,
                      train_many: Callable | None = None) -> tuple[list[dict], int, list[float]]:
    """The full-data models with seed indices 0..n-1 (the support stage's ensemble).

    ``trainer``: an :class:`attribution.retrain.Retrainer`. Each model uses torch seed
    ``retrain.training_seed(base_seed, i)``, as the support ensemble does; ``threads=1``
    matches the support workers (one torch thread), so the weights are the same.
    A stored ``model-NNN.pt`` with the same ``recipe`` fingerprint and torch seed is
    reused. ``train_many([(index, torch_seed), ...])``: trains the missing ones
    elsewhere (the trak stage's pool), yielding (index, state dict, seconds) as each
    finishes; None: one after the other here. Returns (state dicts, number trained now,
    each model's training seconds: measured now, or stored with a reused model when it
    was trained; what training it costs from scratch, which a budget's cost counts).
    """
    from tqdm.auto import tqdm

    from attribution.artifacts import write_torch
    from attribution.retrain import training_seed

    states: list = [None] * int(n_models)
    seconds = [float("nan")] * int(n_models)
    missing = []
    for index in range(int(n_models)):
        path, torch_seed = checkpoint_path(folder, index), training_seed(base_seed, index)
        if path.exists():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("recipe") == recipe and stored.get("torch_seed") == torch_seed:
                states[index] = stored["state_dict"]
                seconds[index] = float(stored.get("train_seconds", float("nan")))  # nan: an older file
                continue
        missing.append((index, torch_seed))

    def here(todo):
        for index, torch_seed in todo:
            begin = time.perf_counter()
            with torch_threads(threads):
                model = trainer.train(seed=torch_seed)
            yield index, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, \
                time.perf_counter() - begin

    seeds = dict(missing)
    with tqdm(total=int(n_models), initial=int(n_models) - len(missing), desc="trak checkpoints", unit="model",
              disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for index, state, took in (train_many or here)(missing):
            seconds[index], states[index] = float(took), state
            write_torch({"state_dict": state, "recipe": recipe, "seed_index": index, "torch_seed": seeds[index],
                         "config": trainer.config.to_dict(), "train_seconds": seconds[index]},
                        checkpoint_path(folder, index))
            bar.update(1)
    return states, len(missing), seconds
