"""GPU check: every CUDA path of the project, its parity with the CPU path and its speed.

    python -m benchmarks.gpu_check [--out gpu_check.json]     # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --device cpu --tiny         # the CPU stands in for the GPU

No GPU was available where this project was written, so these paths have never run;
this command is the first thing to run when a GPU machine is lent (about 3-5 minutes on
one modern GPU; each check prints its own time). Checks, in order (:data:`CHECKS`):

- faiss      CandidateIndex(device="gpu") vs device="cpu": neighbour overlap, queries/s
             (needs the ``gpu`` extra, faiss-gpu; without it the check says so and is skipped)
- esvm       get_solver("batched", device="cuda") vs get_solver("sklearn"): top-100 overlap,
             Spearman, targets/s; ImageNet-shaped 1300 x 2048 and Fashion-MNIST PCA 6000 x 128
- embed      a real local Ray: an embedding actor with a whole GPU (cluster/resources.py
             embed_actor_options) running the embed stage's Embedder (ResNet-50, 224 px) vs
             a one-CPU actor: feature cosine, images/s
- retrain    retraining actors with the GPU share of cluster/resources.py retrain_gpu_share
             (several on one GPU) vs one actor: trainings/min; accuracy of the same
             (seed, change) on CPU vs CUDA
- stacked    the stacked engine (attribution/batched_retrain.py) on CUDA, 16 and 64 models
             per call: trainings/min, accuracy vs the same engine on CPU
- precision  bf16 stacked MLPs, the CNN with fp16 autocast + GradScaler (mixed_precision)
             and with bf16 autocast, each vs fp32 on CPU: accuracy, trainings/min
- trak       TrakScorer on CUDA (CudaProjector when fast_jl imports, else BasicProjector on
             CUDA, said so) and with fp16 features vs the CPU path: agreement of the scores
             compared with two CPU projections of different seeds (the projection's own noise)

Each check is a function ``check_x(ctx, report)`` registered in :data:`CHECKS`; a check
that raises is reported with its error and the others still run. Status per check:
pass, fail (a parity figure outside its tolerance), error (it raised), skipped (it could
not run here, e.g. faiss without GPU support). Exit code 1 when any check failed or
raised, else 0. Without CUDA (and without ``--device cpu``) the command says so and exits
0. ``--device cpu`` runs every check with the CPU standing in for the GPU (rows marked
"simulated: no GPU"); ``--tiny`` shrinks every size so that this takes well under a
minute (tests/test_gpu_check.py runs it). It installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from attribution.embedding import Embedder

SIMULATED = "simulated: no GPU"

# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Every size the checks use: ``FULL`` for a GPU (about 3-5 minutes in all), ``TINY``
    for the CPU stand-in of the test."""

    # faiss: classes x per-class training items of dim d, queries per class, k
    faiss_classes: int = 10
    faiss_per_class: int = 1300
    faiss_dim: int = 2048
    faiss_queries: int = 20
    faiss_k: int = 1280
    faiss_raw_queries: int = 2000
    # esvm: ImageNet-shaped negatives x dim, Fashion-MNIST PCA dim and negatives
    esvm_imagenet: tuple = (1300, 2048)
    esvm_imagenet_positions: int = 49
    esvm_fmnist_dim: int = 128
    esvm_fmnist_negatives: int = 6000
    esvm_targets: int = 300
    esvm_sklearn_targets: int = 20
    esvm_cpu_targets: int = 60
    # embed: backbone, images the GPU / CPU actor embed, batch
    embed_backbone: str = "resnet50"
    embed_image_size: int = 224
    embed_gpu_images: int = 1024
    embed_cpu_images: int = 16
    embed_batch: int = 128
    # retraining: Fashion-MNIST per-class subsets, the quickstart's MLP recipe
    train_per_class: int = 300
    test_per_class: int = 100
    mlp_width: int = 128
    mlp_epochs: int = 8
    cnn_epochs: int = 5
    removed_fraction: float = 0.05
    pool_trainings: int = 48
    parity_models: int = 8
    cnn_models: int = 6
    stack_groups: tuple = (16, 64)
    stack_trainings: int = 64
    # trak
    trak_train: int = 2000
    trak_targets: int = 100
    trak_checkpoints: int = 2
    trak_proj_dim: int = 512
    trak_batch: int = 128


FULL = Sizes()
TINY = Sizes(faiss_classes=3, faiss_per_class=60, faiss_dim=32, faiss_queries=4, faiss_k=20, faiss_raw_queries=50,
             esvm_imagenet=(120, 64), esvm_imagenet_positions=4, esvm_fmnist_dim=16, esvm_fmnist_negatives=300,
             esvm_targets=6, esvm_sklearn_targets=3, esvm_cpu_targets=3,
             embed_backbone="resnet18", embed_image_size=28, embed_gpu_images=48, embed_cpu_images=16, embed_batch=16,
             train_per_class=30, test_per_class=20, mlp_width=32, mlp_epochs=2, cnn_epochs=1, pool_trainings=6,
             parity_models=3, cnn_models=2, stack_groups=(4,), stack_trainings=8,
             trak_train=200, trak_targets=5, trak_checkpoints=1, trak_proj_dim=16, trak_batch=50)

# tolerances of the parity figures (each row says which it used)
MIN_NEIGHBOUR_OVERLAP = 0.999     # faiss GPU vs CPU: both re-score exactly in float64
MIN_ESVM_OVERLAP = 0.99           # batched vs sklearn (README: 0.9999 / 1.000 on CPU)
MIN_FEATURE_COSINE = 0.999        # GPU convolutions may use TF32 (about 1e-3 relative)
ACCURACY_FLOOR = 0.01             # accuracy difference always tolerated (seed noise ~0.004)
TRAK_SLACK = 0.05                 # GPU-vs-CPU agreement may be this much below CPU-vs-CPU(seed 1)


# ----------------------------------------------------------------------------- reports


@dataclass
class Row:
    """One line of the table: what was compared, its parity and speed, and the figures."""

    what: str
    parity: str
    speed: str
    ok: bool | None = None        # None: informational (no parity test)
    figures: dict = field(default_factory=dict)


class CheckSkipped(Exception):
    """The check cannot run on this machine (the message says why and the fix)."""


class CheckReport:
    """What a check collects while it runs; kept when it raises half-way."""

    def __init__(self, simulated: bool):
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.simulated = simulated

    def row(self, what: str, parity: str, speed: str, ok: bool | None = None, **figures) -> Row:
        if self.simulated:
            what = f"{what} [{SIMULATED}]"
        row = Row(what, parity, speed, ok, {k: _plain(v) for k, v in figures.items()})
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class CheckResult:
    name: str
    status: str                   # pass | fail | error | skipped
    seconds: float
    rows: list[Row]
    notes: list[str]
    error: str | None = None


@dataclass(frozen=True)
class Check:
    name: str
    what: str
    run: Callable[["Context", CheckReport], None]


def _plain(value):
    """JSON-ready figures (numpy scalars and arrays become Python numbers and lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- context


class Context:
    """What every check shares: the device that plays the GPU, sizes, seed, a scratch
    folder, the Fashion-MNIST subsets and one local Ray (started on first use)."""

    def __init__(self, device: str, sizes: Sizes, seed: int = 0, work: str | os.PathLike | None = None,
                 ray_cpus: int | None = None):
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu' (the CPU standing in for the GPU), got {device!r}")
        self.device, self.sizes, self.seed = device, sizes, int(seed)
        self.simulated = device == "cpu"
        self.work = Path(work) if work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.ray_cpus = ray_cpus or (2 if self.simulated else max(2, min(os.cpu_count() or 2, 8)))
        self._data: dict = {}
        self.cpu_references: dict = {}  # CPU accuracies of (recipe, changes), shared by the checks
        self._runtime = None
        self._previous_ray_address: str | None = None

    # the device the "GPU" side of each comparison runs on
    @property
    def faiss_device(self) -> str:
        return "cpu" if self.simulated else "gpu"

    def sync(self) -> None:
        """Wait for queued CUDA work, so that timers measure it."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def fmnist(self, split: str, per_class: int):
        """A seeded per-class subset of real Fashion-MNIST (the quickstart's kind)."""
        key = (split, per_class)
        if key not in self._data:
            from attribution.data import load_dataset

            self._data[key] = load_dataset("fashion-mnist", split, n_per_class=per_class, seed=self.seed)
        return self._data[key]

    def runtime(self):
        """The project's RayRuntime on a local Ray owned by this run (one GPU, or none)."""
        if self._runtime is None:
            from cluster.runtime import RayRuntime, ensure_ray

            # our own cluster even when RAY_ADDRESS points at another one
            self._previous_ray_address = os.environ.get("RAY_ADDRESS")
            os.environ["RAY_ADDRESS"] = "local"
            ensure_ray(None, num_cpus=self.ray_cpus, num_gpus=0 if self.simulated else 1)
            self._runtime = RayRuntime()
        return self._runtime

    def close(self) -> None:
        if self._runtime is not None:
            import ray

            ray.shutdown()
            self._runtime = None
            if self._previous_ray_address is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = self._previous_ray_address


# ----------------------------------------------------------------------------- helpers


def timed(fn, ctx: Context, *args, **kwargs):
    """(fn(*args, **kwargs), seconds), CUDA work included."""
    ctx.sync()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    ctx.sync()
    return out, time.perf_counter() - start


def ratio(fast: float, slow: float) -> str:
    return f"{fast / slow:.1f}x" if slow > 0 else "n/a"


def row_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of |set(a_row) & set(b_row)| / k for two (T, k) id arrays (-1: padding)."""
    values = []
    for x, y in zip(a, b):
        x, y = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
        values.append(len(x & y) / max(1, len(x), len(y)))
    return float(np.mean(values)) if values else float("nan")


def _max_finite_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| where both are finite (search pads short rows with -inf)."""
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[both] - b[both]).max()) if both.any() else 0.0


def accuracy_parity(device_acc: Sequence[float], cpu_acc: Sequence[float], floor: float = ACCURACY_FLOOR) -> dict:
    """Paired accuracy difference of the same (seed, change) on the device and on CPU:
    ok when |mean difference| <= max(3 standard errors of the paired differences, floor)."""
    a, b = np.asarray(device_acc, float), np.asarray(cpu_acc, float)
    diff = a - b
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    tol = max(3 * se, floor)
    return {"device_mean": float(a.mean()), "cpu_mean": float(b.mean()), "cpu_sd": float(b.std(ddof=1)) if len(b) > 1
            else 0.0, "mean_diff": float(diff.mean()), "tolerance": tol, "models": len(diff),
            "ok": bool(abs(diff.mean()) <= tol)}


def accuracy_text(p: dict) -> str:
    return (f"acc {p['device_mean']:.4f} vs {p['cpu_mean']:.4f} cpu (diff {p['mean_diff']:+.4f}, "
            f"tol {p['tolerance']:.4f}, {p['models']} models)")


def removal_changes(train_ids: np.ndarray, n: int, fraction: float, seed: int) -> list:
    """n (seed, change) pairs: change i removes a seeded random ``fraction`` of the training
    ids, seed i is the support stage's training_seed(seed, i)."""
    from attribution.batched_retrain import Change
    from attribution.retrain import training_seed

    m = max(1, int(round(fraction * len(train_ids))))
    changes = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        removed = np.sort(rng.choice(np.asarray(train_ids), size=m, replace=False)).tolist()
        changes.append(Change(removed_ids=removed, seed=training_seed(seed, i)))
    return changes


def accuracy_of(trainer, model, test_x, test_labels) -> float:
    return float(np.mean(trainer.logits(model, test_x).argmax(1) == test_labels))


def clustered_features(classes: int, per_class: int, dim: int, queries: int, seed: int):
    """Seeded class-clustered float32 features (class centre + low-rank variation + noise):
    (train ids, labels, features, query features, query labels)."""
    rng = np.random.default_rng(seed)
    latent = max(2, min(32, dim // 4))
    basis = rng.normal(size=(latent, dim)) / math.sqrt(latent)
    feats, labels, qf, ql = [], [], [], []
    for c in range(classes):
        centre = rng.normal(size=dim)
        for count, out, lab in ((per_class, feats, labels), (queries, qf, ql)):
            x = centre + rng.normal(size=(count, latent)) @ basis + 0.5 * rng.normal(size=(count, dim))
            out.append(x.astype(np.float32))
            lab.append(np.full(count, c))
    ids = np.arange(classes * per_class, dtype=np.int64) * 3 + 7   # ids are not positions
    return ids, np.concatenate(labels), np.concatenate(feats), np.concatenate(qf), np.concatenate(ql)


# ----------------------------------------------------------------------------- checks


def _gpu_free_bytes(ctx: Context) -> int | None:
    """Free memory of the CUDA device (device-wide: FAISS allocates outside torch), or None."""
    if ctx.simulated:
        return None
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])


def _partition_memory_row(report: CheckReport, held: int, s: Sizes, imagenet_classes: int = 1000) -> None:
    """GPU memory the per-class GPU indexes hold, projected to ImageNet's classes: each
    class partition is copied to the GPU (one StandardGpuResources shared by all partitions)
    and every partition queried stays cached; the projection must fit in the GPU."""
    import torch

    total = torch.cuda.mem_get_info()[1]
    per_class = held / s.faiss_classes
    data = s.faiss_per_class * s.faiss_dim * 4
    projected = per_class * imagenet_classes
    report.row(f"GPU memory of {s.faiss_classes} cached class partitions",
               f"{per_class / 2**20:.0f} MiB per class (its vectors: {data / 2**20:.1f} MiB); "
               f"{imagenet_classes} classes: {projected / 2**30:.1f} GiB of {total / 2**30:.1f} GiB",
               "", bool(projected <= total), held_bytes=held, per_class_bytes=per_class, vector_bytes=data,
               projected_bytes=projected, gpu_total_bytes=total)


def check_faiss(ctx: Context, report: CheckReport) -> None:
    """CandidateIndex on a FAISS GPU index vs the CPU one: the same neighbours, queries/s."""
    import faiss

    from attribution.candidates import CandidateIndex

    s = ctx.sizes
    ids, labels, feats, queries, qlabels = clustered_features(s.faiss_classes, s.faiss_per_class, s.faiss_dim,
                                                              s.faiss_queries, ctx.seed)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    report.note(f"faiss {getattr(faiss, '__version__', '?')}, GPUs faiss sees: {gpus}")
    if not ctx.simulated and gpus == 0:
        cpu = CandidateIndex("l2", "cpu").fit(ids, labels, feats)
        cpu.search(queries[:1], qlabels[:1], s.faiss_k)
        _, seconds = timed(cpu.search, ctx, queries, qlabels, s.faiss_k)
        report.row(f"CandidateIndex l2 cpu only, k={s.faiss_k}", "n/a (no GPU index)",
                   f"{len(queries) / seconds:.0f} q/s cpu", None, cpu_queries_per_s=len(queries) / seconds)
        raise CheckSkipped("this faiss has no GPU support (faiss-cpu installed, or faiss sees no GPU): "
                           "pip uninstall -y faiss-cpu && pip install -e '.[gpu]' (the faiss-gpu wheel), then rerun")
    cases = [("l2", True), ("cosine", True), ("l2", False)]
    for metric, same_class in cases:
        cpu = CandidateIndex(metric, "cpu").fit(ids, labels, feats)
        gpu = CandidateIndex(metric, ctx.faiss_device).fit(ids, labels, feats)
        if not ctx.simulated and not gpu.use_gpu_:
            raise RuntimeError("CandidateIndex(device='gpu') did not move its indexes to the GPU (use_gpu_ False)")
        k = min(s.faiss_k, len(ids) if not same_class else s.faiss_per_class)
        free_before = _gpu_free_bytes(ctx) if metric == "l2" and same_class else None
        for index in (cpu, gpu):  # partitions are built on first use: not timed
            index.search(queries, qlabels, 1, same_class=same_class)
        if metric == "l2" and same_class and free_before is not None:
            _partition_memory_row(report, free_before - _gpu_free_bytes(ctx), s)
        (cpu_ids, cpu_scores), t_cpu = timed(cpu.search, ctx, queries, qlabels, k, same_class=same_class)
        (gpu_ids, gpu_scores), t_gpu = timed(gpu.search, ctx, queries, qlabels, k, same_class=same_class)
        overlap = row_overlap(gpu_ids, cpu_ids)
        identical = bool(np.array_equal(gpu_ids, cpu_ids))
        q_gpu, q_cpu = len(queries) / t_gpu, len(queries) / t_cpu
        scope = "same-class" if same_class else "all-class"
        report.row(f"CandidateIndex.search {metric} {scope} k={k}",
                   f"overlap {overlap:.4f}{' (identical)' if identical else ''}",
                   f"{q_gpu:.0f} vs {q_cpu:.0f} q/s ({ratio(q_gpu, q_cpu)})", overlap >= MIN_NEIGHBOUR_OVERLAP,
                   overlap=overlap, identical=identical, gpu_queries_per_s=q_gpu, cpu_queries_per_s=q_cpu,
                   queries=len(queries), k=k, train_items=len(ids), dim=s.faiss_dim,
                   max_score_diff=_max_finite_diff(cpu_scores, gpu_scores))
        del cpu, gpu  # free this case's GPU partitions before the next case builds its own
    if ctx.simulated:
        report.note("GPU memory held by the cached class partitions is measured on CUDA only")
    report.note("search() re-scores the selected items exactly in float64 on the CPU, so its queries/s include "
                "that; the raw row is FAISS alone")
    # raw FAISS: one flat index over every item, many queries
    rng = np.random.default_rng(ctx.seed)
    raw_q = np.ascontiguousarray(feats[rng.choice(len(feats), s.faiss_raw_queries)] +
                                 0.1 * rng.normal(size=(s.faiss_raw_queries, s.faiss_dim)).astype(np.float32))
    cpu_index = faiss.IndexFlatL2(s.faiss_dim)
    cpu_index.add(feats)
    k = min(s.faiss_k, len(feats))
    # one GPU and one StandardGpuResources, as attribution.candidates places its indexes
    resources = None if ctx.simulated else faiss.StandardGpuResources()
    gpu_index = cpu_index if ctx.simulated else faiss.index_cpu_to_gpu(resources, 0, cpu_index)
    gpu_index.search(raw_q[:8], k)
    (_, raw_cpu), t_cpu = timed(cpu_index.search, ctx, raw_q, k)
    (_, raw_gpu), t_gpu = timed(gpu_index.search, ctx, raw_q, k)
    overlap = row_overlap(raw_gpu, raw_cpu)
    q_gpu, q_cpu = len(raw_q) / t_gpu, len(raw_q) / t_cpu
    # float32 distances differ between GPU and CPU kernels: near-ties may swap at the k-th place
    report.row(f"raw faiss IndexFlatL2 {len(feats)} x {s.faiss_dim}, k={k}", f"overlap {overlap:.4f}",
               f"{q_gpu:.0f} vs {q_cpu:.0f} q/s ({ratio(q_gpu, q_cpu)})", overlap >= 0.99,
               overlap=overlap, gpu_queries_per_s=q_gpu, cpu_queries_per_s=q_cpu, queries=len(raw_q), k=k)


def check_esvm(ctx: Context, report: CheckReport) -> None:
    """The batched ESVM solver on CUDA vs the sklearn reference (and the batched CPU path)."""
    import torch

    from attribution.esvm import get_solver
    from benchmarks.esvm_solvers import fashion_mnist_pca_features, imagenet_like_features, parity

    s = ctx.sizes
    n_neg, dim = s.esvm_imagenet
    tg, neg = imagenet_like_features(n_negatives=n_neg, n_targets=s.esvm_targets, dim=dim, seed=ctx.seed,
                                     positions=s.esvm_imagenet_positions)
    cases = [(f"ImageNet-shaped {n_neg} x {dim}", tg, neg)]
    _, ftr, _, fte = fashion_mnist_pca_features(dim=s.esvm_fmnist_dim, seed=ctx.seed,
                                                fit_images=min(3000, s.esvm_fmnist_negatives), classes=[0])
    cases.append((f"Fashion-MNIST PCA {s.esvm_fmnist_negatives} x {s.esvm_fmnist_dim}",
                  fte[:s.esvm_targets], ftr[:s.esvm_fmnist_negatives]))
    if ctx.simulated:
        report.note("the stand-in solver runs on CPU with the CUDA path's padded batched Newton systems forced "
                    "(BatchedESVM._use_padded), so the GPU code path's arithmetic is what is compared")
    for name, targets, negatives in cases:
        solver = get_solver("batched", device=ctx.device)
        if ctx.simulated:
            solver._use_padded = True
        solver.decision_values(targets[:2], negatives)  # warm-up: CUDA context, kernels
        out, t_dev = timed(solver.decision_values, ctx, targets, negatives)
        info = dict(solver.info_)
        n_sk = min(s.esvm_sklearn_targets, len(targets))
        ref, t_sk = timed(get_solver("sklearn").decision_values, ctx, targets[:n_sk], negatives)
        n_cpu = min(s.esvm_cpu_targets, len(targets))
        cpu_out, t_cpu = timed(get_solver("batched", device="cpu", num_threads=torch.get_num_threads()).decision_values,
                               ctx, targets[:n_cpu], negatives)
        k = min(100, max(10, len(negatives) // 4))   # top-k of a quarter at tiny sizes, else top-100
        ov, rho = parity(ref, out[:n_sk], k=k)
        ov_cpu, rho_cpu = parity(cpu_out, out[:n_cpu], k=k)
        rate, sk_rate, cpu_rate = len(targets) / t_dev, n_sk / t_sk, n_cpu / t_cpu
        report.row(f"batched ESVM {name} vs sklearn", f"top-{k} {ov:.4f}, spearman {rho:.5f} ({n_sk} targets)",
                   f"{rate:.1f} vs {sk_rate:.2f} targets/s ({ratio(rate, sk_rate)})", ov >= MIN_ESVM_OVERLAP,
                   top_k=k, top_overlap=ov, spearman=rho, targets_per_s=rate, sklearn_targets_per_s=sk_rate,
                   targets=len(targets), sklearn_targets=n_sk, form=info.get("form"),
                   mean_iterations=info.get("mean_iterations"), unconverged=info.get("unconverged"))
        report.row(f"batched ESVM {name} vs batched on CPU", f"top-{k} {ov_cpu:.4f}, spearman {rho_cpu:.5f}",
                   f"{rate:.1f} vs {cpu_rate:.1f} targets/s ({ratio(rate, cpu_rate)})", ov_cpu >= MIN_ESVM_OVERLAP,
                   top_k=k, top_overlap=ov_cpu, spearman=rho_cpu, targets_per_s=rate, cpu_targets_per_s=cpu_rate,
                   cpu_threads=torch.get_num_threads())


PROBE_SPEC_NAME = "gpu-check-in-memory"


class EmbedProbe(Embedder):
    """The embed stage's worker (:class:`attribution.embedding.Embedder`) holding an
    in-memory image set instead of loading a DatasetSpec, timed per shard in the actor."""

    def __init__(self, backbone_spec, seed: int, batch_size: int, device: str, image_set):
        super().__init__(backbone_spec, seed, batch_size, threads=1, device=device)
        from attribution.data import DatasetSpec

        self.spec = DatasetSpec(name=PROBE_SPEC_NAME)
        self._sets[self.spec] = image_set

    def embed(self, index: int, start: int, stop: int):
        """(features (n, dim), seconds, device of the model) of rows [start, stop)."""
        import torch

        from attribution.embedding import Shard, embedding_matrix

        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        table = self((self.spec, Shard("train", index, start, stop)))
        seconds = time.perf_counter() - begin
        return embedding_matrix(table.column("embedding"), self.model.dim), seconds, str(device)


def embedding_images(ctx: Context, n: int):
    """An in-memory ArrayImageSet of n real Fashion-MNIST images, upsampled to the
    backbone's side and made RGB when it is ImageNet-sized (so no resize is timed)."""
    import torch

    from attribution.backbones import FeatureExtractor
    from attribution.data import ArrayImageSet

    s = ctx.sizes
    data = ctx.fmnist("train", max(1, -(-n // 10)))
    positions = np.arange(min(n, len(data)))
    pixels = data.images(positions)
    mean, std = data.mean, data.std
    if s.embed_image_size != pixels.shape[1]:
        chunks = []
        for start in range(0, len(pixels), 256):
            x = torch.from_numpy(pixels[start:start + 256]).permute(0, 3, 1, 2).float()
            x = torch.nn.functional.interpolate(x, size=(s.embed_image_size,) * 2, mode="bilinear",
                                                align_corners=False)
            chunks.append(x.clamp(0, 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy())
        pixels = np.ascontiguousarray(np.concatenate(chunks))
        mean, std = FeatureExtractor.IMAGENET_MEAN, FeatureExtractor.IMAGENET_STD
    return ArrayImageSet(PROBE_SPEC_NAME, "train", pixels, data.labels[positions], data.ids[positions], data.classes,
                         mean, std)


def check_embed(ctx: Context, report: CheckReport) -> None:
    """A GPU embedding actor (a whole GPU, the embed pool's shape) vs a one-CPU actor."""
    from attribution.backbones import BackboneSpec
    from cluster.resources import embed_actor_options

    s = ctx.sizes
    ray = ctx.runtime().connect()
    if s.embed_backbone == "resnet50":
        spec = BackboneSpec("resnet50", in_channels=3, normalize="dataset")
    else:  # the quickstart's kind of backbone (small stem, narrow), random init
        spec = BackboneSpec(s.embed_backbone, small_stem=True, in_channels=1, width=8)
    images = embedding_images(ctx, max(s.embed_gpu_images, s.embed_cpu_images))
    report.note(f"backbone {spec.name} (random init, seed {ctx.seed}), {images.image_shape} images from Fashion-MNIST, "
                f"batch {s.embed_batch}; images/s measured inside each actor after a warm-up batch")
    shared = ray.put(images)
    gpu_options = embed_actor_options(gpu=not ctx.simulated)
    cpu_options = embed_actor_options(gpu=False, threads=1)
    gpu_actor = ray.remote(max_restarts=0, **gpu_options)(EmbedProbe).remote(
        spec, ctx.seed, s.embed_batch, ctx.device, shared)
    cpu_actor = ray.remote(max_restarts=0, **cpu_options)(EmbedProbe).remote(
        spec, ctx.seed, min(s.embed_batch, s.embed_cpu_images), "cpu", shared)
    try:
        n_gpu, n_cpu = min(s.embed_gpu_images, len(images)), min(s.embed_cpu_images, len(images))
        ray.get([gpu_actor.embed.remote(0, 0, min(s.embed_batch, n_gpu)), cpu_actor.embed.remote(0, 0, 2)])
        gpu_feats, t_gpu, gpu_dev = ray.get(gpu_actor.embed.remote(1, 0, n_gpu))
        cpu_feats, t_cpu, cpu_dev = ray.get(cpu_actor.embed.remote(1, 0, n_cpu))
    finally:
        for actor in (gpu_actor, cpu_actor):
            ray.kill(actor)
    if not ctx.simulated and not gpu_dev.startswith("cuda"):
        raise RuntimeError(f"the GPU embedding actor's model is on {gpu_dev}, not CUDA")
    a, b = gpu_feats[:n_cpu].astype(np.float64), cpu_feats.astype(np.float64)
    cosine = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    rate_gpu, rate_cpu = n_gpu / t_gpu, n_cpu / t_cpu
    report.row(f"Embedder {spec.name} actor {gpu_dev} ({gpu_options}) vs cpu actor ({cpu_options})",
               f"cosine min {cosine.min():.6f}, max rel diff {rel:.1e} ({n_cpu} images)",
               f"{rate_gpu:.1f} vs {rate_cpu:.1f} img/s ({ratio(rate_gpu, rate_cpu)})",
               bool(cosine.min() >= MIN_FEATURE_COSINE), min_cosine=float(cosine.min()), max_rel_diff=rel,
               gpu_images_per_s=rate_gpu, cpu_images_per_s=rate_cpu, gpu_images=n_gpu, cpu_images=n_cpu,
               actor_device=gpu_dev, dim=int(gpu_feats.shape[1]))


def _retrain_data(ctx: Context):
    from attribution.retrain import to_tensor

    s = ctx.sizes
    train_set, test_set = ctx.fmnist("train", s.train_per_class), ctx.fmnist("test", s.test_per_class)
    test_images = test_set.images(np.arange(len(test_set)))
    return train_set, test_set, test_images, to_tensor(test_images, test_set.mean, test_set.std)


def _cpu_reference(ctx: Context, config, train_set, changes, test_x, test_labels) -> list[float]:
    """Test accuracies of ``changes`` trained on CPU in fp32 with ``config``'s recipe
    (computed once per recipe and changes: two checks may compare against the same)."""
    from dataclasses import replace

    from attribution.retrain import Retrainer

    cpu = replace(config, device="cpu", mixed_precision=False, precision="fp32")
    key = (cpu.fingerprint(), len(train_set), tuple((c.seed, tuple(c.removed_ids)) for c in changes))
    if key not in ctx.cpu_references:
        trainer = Retrainer.from_imageset(cpu, train_set)
        ctx.cpu_references[key] = [accuracy_of(trainer, m, test_x, test_labels) for m in trainer.train_many(changes)]
    return ctx.cpu_references[key]


def _wait_for_workers(queue, timeout: float = 300.0) -> None:
    """Block until every actor of a Ray queue answered ready(), so that no worker start-up
    is timed (a queue without actor slots, e.g. in-process, returns at once)."""
    slots = getattr(queue, "slots", None)
    deadline = time.monotonic() + timeout
    while slots is not None and slots.starting:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(slots.starting)} of {len(slots)} workers not started after {timeout:.0f} s: "
                               "the cluster cannot place them (see `ray status`)")
        slots.poll(timeout=5.0, wait_all=True)


def check_retrain(ctx: Context, report: CheckReport) -> None:
    """Retraining actors with a fractional GPU share, several on one GPU, vs one actor."""
    from attribution import retrain
    from attribution.retraining import RetrainPoolSettings, training_arrays
    from cluster.resources import retrain_gpu_share

    s = ctx.sizes
    runtime = ctx.runtime()
    train_set, test_set, test_images, test_x = _retrain_data(ctx)
    config = retrain.make_config("mlp", resolve_device=False, epochs=s.mlp_epochs, width=s.mlp_width,
                                 device=ctx.device)
    changes = removal_changes(train_set.ids, s.pool_trainings, s.removed_fraction, ctx.seed)
    items = [{"kind": "ensemble", "index": i, "removed_ids": c.removed_ids, "torch_seed": c.seed}
             for i, c in enumerate(changes)]
    train = training_arrays(train_set)
    # the workers evaluate every test image ("ensemble" jobs return logits on all targets)
    targets = {"images": test_images, "labels": np.asarray(test_set.labels, np.int64),
               "ids": np.asarray(test_set.ids, np.int64)}
    share = retrain_gpu_share("mlp")
    many = ctx.ray_cpus if ctx.simulated else max(1, min(int(round(1 / share)), ctx.ray_cpus))
    report.note(f"recipe mlp width {s.mlp_width}, {s.mlp_epochs} epochs, {len(train_set)} images, module engine fp32; "
                f"GPU share per actor from cluster/resources.py: {share:g} (simulated: CPU actors)")
    rates, accuracies = {}, {}
    for actors in (1, many):
        pool = RetrainPoolSettings(actors=actors, models_per_worker=1)
        request = pool.pool_request("mlp", max_items=len(items))
        queue = pool.open_queue(runtime, request, config, train, targets, key=lambda item: f"training {item['index']}")
        with queue:
            _wait_for_workers(queue)
            for _ in queue.map(items[:2 * queue.size]):  # warm-up: first calls, CUDA kernels
                pass
            start = time.perf_counter()
            done = list(queue.map(items))
            seconds = time.perf_counter() - start
            options = getattr(queue, "options", None)  # each actor's Ray options (RayWorkQueue)
        acc = {d.item["index"]: float(np.mean(np.asarray(d.result["logits"]).argmax(1) == test_set.labels))
               for d in done}
        rates[actors], accuracies[actors] = 60 * len(items) / seconds, acc
        report.row(f"retrain pool {actors} actor(s) x {options or 'cpu'}", "", f"{rates[actors]:.0f} trainings/min",
                   None, trainings=len(items), seconds=seconds, trainings_per_min=rates[actors], actors=actors,
                   actor_options=options)
    n_par = min(s.parity_models, len(items))
    cpu_acc = _cpu_reference(ctx, config, train_set, changes[:n_par], test_x, test_set.labels)
    dev_acc = [accuracies[many][i] for i in range(n_par)]
    p = accuracy_parity(dev_acc, cpu_acc)
    report.row(f"{many} actors sharing one GPU vs 1 actor; same (seed, change) vs CPU", accuracy_text(p),
               f"{rates[many]:.0f} vs {rates[1]:.0f} trainings/min ({ratio(rates[many], rates[1])})", p["ok"],
               accuracy=p, trainings_per_min=rates[many], one_actor_trainings_per_min=rates[1])


def check_stacked(ctx: Context, report: CheckReport) -> None:
    """The stacked engine (many MLPs per call) on CUDA: trainings/min, accuracy vs CPU."""
    from attribution import retrain

    s = ctx.sizes
    train_set, test_set, _, test_x = _retrain_data(ctx)
    config = retrain.make_config("mlp", resolve_device=False, epochs=s.mlp_epochs, width=s.mlp_width,
                                 engine="stacked", device=ctx.device)
    changes = removal_changes(train_set.ids, s.stack_trainings, s.removed_fraction, ctx.seed)
    n_par = min(s.parity_models, len(changes))
    cpu_acc = _cpu_reference(ctx, config, train_set, changes[:n_par], test_x, test_set.labels)
    for group in s.stack_groups:
        trainer = retrain.Retrainer.from_imageset(config, train_set)
        trainer.train_many(changes[:min(group, 2)])  # warm-up
        models, seconds = [], 0.0
        for start in range(0, len(changes), group):
            got, t = timed(trainer.train_many, ctx, changes[start:start + group])
            models += got
            seconds += t
        rate = 60 * len(models) / seconds
        p = accuracy_parity([accuracy_of(trainer, m, test_x, test_set.labels) for m in models[:n_par]], cpu_acc)
        report.row(f"stacked fp32, {group} models per call", accuracy_text(p), f"{rate:.0f} trainings/min", p["ok"],
                   accuracy=p, trainings=len(models), seconds=seconds, trainings_per_min=rate, group=group)


def check_precision(ctx: Context, report: CheckReport) -> None:
    """bf16 stacked MLPs, the CNN with fp16 autocast + GradScaler and with bf16, vs fp32 on CPU."""
    from attribution import retrain

    s = ctx.sizes
    train_set, test_set, _, test_x = _retrain_data(ctx)
    group = s.stack_groups[0]
    variants = [
        ("stacked MLP bf16", retrain.make_config("mlp", resolve_device=False, epochs=s.mlp_epochs, width=s.mlp_width,
                                                 engine="stacked", precision="bf16", device=ctx.device),
         max(s.parity_models, group), group),
        ("CNN fp16 autocast + GradScaler", retrain.make_config("cnn", resolve_device=False, epochs=s.cnn_epochs,
                                                               mixed_precision=True, device=ctx.device),
         s.cnn_models, 1),
        ("CNN bf16 autocast", retrain.make_config("cnn", resolve_device=False, epochs=s.cnn_epochs, precision="bf16",
                                                  device=ctx.device), s.cnn_models, 1),
    ]
    if ctx.simulated:
        report.note("fp16 autocast and GradScaler are CUDA-only in retrain.py (mixed_precision needs a CUDA device): "
                    "the CPU stand-in of the fp16 row trains in fp32; the bf16 rows run real bf16 on CPU")
    for name, config, n_models, per_call in variants:
        changes = removal_changes(train_set.ids, n_models, s.removed_fraction, ctx.seed)
        trainer = retrain.Retrainer.from_imageset(config, train_set)
        trainer.train_many(changes[:1])  # warm-up
        models, seconds = [], 0.0
        for start in range(0, len(changes), per_call):
            got, t = timed(trainer.train_many, ctx, changes[start:start + per_call])
            models += got
            seconds += t
        n_par = min(s.parity_models, len(models))
        cpu_acc = _cpu_reference(ctx, config, train_set, changes[:n_par], test_x, test_set.labels)
        p = accuracy_parity([accuracy_of(trainer, m, test_x, test_set.labels) for m in models[:n_par]], cpu_acc)
        rate = 60 * len(models) / seconds
        report.row(f"{name} vs fp32 on CPU", accuracy_text(p), f"{rate:.0f} trainings/min", p["ok"], accuracy=p,
                   trainings=len(models), seconds=seconds, trainings_per_min=rate,
                   config={"model": config.model, "engine": config.engine, "precision": config.precision,
                           "mixed_precision": config.mixed_precision, "device": config.device})


def _score_agreement(a: np.ndarray, b: np.ndarray, k: int = 100) -> tuple[float, float]:
    """(mean top-k overlap, mean Spearman) of two (n_train, n_targets) score matrices, per target."""
    from benchmarks.esvm_solvers import parity

    return parity(a.T, b.T, k=k)


def check_trak(ctx: Context, report: CheckReport) -> None:
    """TrakScorer on CUDA (CudaProjector if fast_jl imports) and fp16, vs the CPU path."""
    from attribution import retrain
    from attribution.baselines.trak import TrakScorer, cuda_projector_available

    s = ctx.sizes
    train_all, test_set = ctx.fmnist("train", max(1, -(-s.trak_train // 10))), ctx.fmnist("test", s.test_per_class)
    n = min(s.trak_train, len(train_all))
    images = train_all.images(np.arange(n))
    labels = np.asarray(train_all.labels[:n])
    config = retrain.make_config("mlp", resolve_device=False, epochs=s.mlp_epochs, width=s.mlp_width, device="cpu")
    trainer = retrain.Retrainer(config, images, labels, np.asarray(train_all.ids[:n]), train_all.mean, train_all.std,
                                train_all.num_classes)
    states = [{k: v.detach().cpu().clone() for k, v in trainer.train(seed=retrain.training_seed(ctx.seed, i))
               .state_dict().items()} for i in range(s.trak_checkpoints)]
    shape, width, classes = trainer.image_shape, s.mlp_width, trainer.num_classes

    def model_fn():
        return retrain.build_model("mlp", classes, shape, width)

    train_x = retrain.to_tensor(images, train_all.mean, train_all.std)
    target_pos = np.arange(min(s.trak_targets, len(test_set)))
    target_x = retrain.to_tensor(test_set.images(target_pos), test_set.mean, test_set.std)
    target_y = np.asarray(test_set.labels[target_pos])
    if not ctx.simulated:
        report.note("fast_jl imports: TRAKer builds its CudaProjector" if cuda_projector_available() else
                    "fast_jl does not import (traker's CUDA kernel is not built): CudaProjector unavailable, "
                    "running BasicProjector on CUDA")

    def run(device, seed, half=False, tag=""):
        scorer = TrakScorer(ctx.work / f"trak-{device}-{seed}{tag}", proj_dim=s.trak_proj_dim, batch_size=s.trak_batch,
                            device=device, seed=seed, use_half_precision=half, progress=False)
        # traker's finalize_* draw tqdm bars whatever progress says: keep them off the table
        with contextlib.redirect_stderr(io.StringIO()):
            _, fit_s = timed(scorer.fit, ctx, model_fn, states, train_x, labels)
            result, score_s = timed(scorer.score, ctx, target_x, target_y)
        return result, fit_s, score_s

    cpu0, cpu_fit, _ = run("cpu", 0)
    cpu1, _, _ = run("cpu", 1)
    k = min(100, max(1, n // 10))
    base_top, base_rho = _score_agreement(cpu0.scores, cpu1.scores, k)
    variants = [("fp32", False)] + ([] if ctx.simulated else [("fp16 features", True)])
    cpu_rate = n * len(states) / cpu_fit
    for label, half in variants:
        got, fit_s, score_s = run(ctx.device, 0, half, tag=label.split()[0])
        top, rho = _score_agreement(got.scores, cpu0.scores, k)
        ok = bool(rho >= base_rho - TRAK_SLACK and top >= base_top - 2 * TRAK_SLACK)
        rate = n * len(states) / fit_s
        report.row(f"TRAK {got.projector} on {ctx.device} {label} vs BasicProjector cpu",
                   f"top-{k} {top:.3f} / rho {rho:.3f} (cpu seed 0 vs 1: {base_top:.3f} / {base_rho:.3f})",
                   f"featurize {rate:.0f} vs {cpu_rate:.0f} img/s ({ratio(rate, cpu_rate)})", ok,
                   projector=got.projector, top_overlap=top, spearman=rho, baseline_top_overlap=base_top,
                   baseline_spearman=base_rho, featurize_images_per_s=rate, cpu_featurize_images_per_s=cpu_rate,
                   score_seconds=score_s, train_images=n, targets=len(target_y), checkpoints=len(states),
                   proj_dim=s.trak_proj_dim, half_precision=half)


CHECKS: tuple[Check, ...] = (
    Check("faiss", "FAISS GPU index vs CPU (CandidateIndex)", check_faiss),
    Check("esvm", "batched ESVM on CUDA vs sklearn", check_esvm),
    Check("embed", "GPU embedding actor vs CPU actor (Ray)", check_embed),
    Check("retrain", "fractional-GPU retraining actors (Ray)", check_retrain),
    Check("stacked", "stacked engine on CUDA", check_stacked),
    Check("precision", "bf16 / fp16 training paths", check_precision),
    Check("trak", "TRAK projector on CUDA", check_trak),
)


# ----------------------------------------------------------------------------- running


def run_check(check: Check, ctx: Context) -> CheckResult:
    """One check, its time and status; an exception becomes status "error" with its message."""
    report = CheckReport(ctx.simulated)
    start = time.perf_counter()
    status, error = "pass", None
    try:
        check.run(ctx, report)
        if any(row.ok is False for row in report.rows):
            status = "fail"
    except CheckSkipped as why:
        status, error = "skipped", str(why)
    except Exception as exc:  # noqa: BLE001 - a failing check must not stop the others
        status = "error"
        error = f"{type(exc).__name__}: {exc}"
        report.notes.append(traceback.format_exc(limit=6).strip())
    return CheckResult(check.name, status, time.perf_counter() - start, report.rows, report.notes, error)


def run_checks(ctx: Context, checks: Sequence[Check] = CHECKS, echo: bool = True) -> list[CheckResult]:
    results = []
    for check in checks:
        if echo:
            print(f"# {check.name}: {check.what} ...", flush=True)
        result = run_check(check, ctx)
        if echo:
            print(f"#   {result.status} in {result.seconds:.1f} s" + (f": {result.error}" if result.error else ""),
                  flush=True)
        results.append(result)
    return results


def exit_code(results: Sequence[CheckResult]) -> int:
    """1 when a check that could run failed or raised; skipped checks do not count."""
    return 1 if any(r.status in ("fail", "error") for r in results) else 0


def format_table(results: Sequence[CheckResult]) -> str:
    header = ("check", "status", "time", "what", "parity", "speed", "ok")
    lines = []
    for r in results:
        rows = r.rows or [Row("-", "", "", None)]
        for i, row in enumerate(rows):
            ok = "" if row.ok is None else ("yes" if row.ok else "NO")
            lines.append((r.name if i == 0 else "", r.status if i == 0 else "", f"{r.seconds:.1f}s" if i == 0 else "",
                          row.what, row.parity, row.speed, ok))
    widths = [max(len(str(x[c])) for x in [header] + lines) for c in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    for r in results:
        if r.error:
            out.append(f"{r.name}: {r.status}: {r.error}")
        for note in r.notes:
            if r.status != "error" or not note.startswith("Traceback"):
                out.append(f"{r.name}: note: {note}")
    return "\n".join(out)


def environment(device: str) -> dict:
    """What ran: versions, the GPU, faiss's GPUs, fast_jl, the load average."""
    import torch

    env = {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda, "cuda_available":
           torch.cuda.is_available(), "device": device, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus_visible"] = torch.cuda.device_count()
    try:
        import faiss

        env["faiss"] = getattr(faiss, "__version__", "?")
        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as exc:
        env["faiss"] = f"not importable: {exc}"
    from attribution.baselines.trak import cuda_projector_available

    env["fast_jl"] = cuda_projector_available()
    return env


def select_checks(names: str | None) -> list[Check]:
    if not names:
        return list(CHECKS)
    known = {c.name: c for c in CHECKS}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"error: unknown check(s) {unknown} in --checks; choose from {list(known)}")
    return [known[n] for n in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto / cuda: the GPU (without CUDA: say so, exit 0); cpu: the CPU stands in for the GPU")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU test; seconds, not minutes)")
    parser.add_argument("--checks", default=None, help=f"comma-separated subset of {[c.name for c in CHECKS]}")
    parser.add_argument("--out", default=None, help="write every figure to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:10s} {c.what}")
        return 0
    checks = select_checks(args.checks)

    import torch

    device = "cuda" if args.device in ("auto", "cuda") else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
              "sees none): nothing to check. Run it on a machine with a CUDA GPU; "
              "`python -m benchmarks.gpu_check --device cpu --tiny` exercises the checks with the CPU standing in.")
        if args.out:
            from attribution.artifacts import write_json

            write_json(args.out, {"cuda": False, "ran": False, "environment": environment("none"), "checks": [],
                                  "exit_code": 0})
        return 0
    env = environment(device)
    simulated = device == "cpu"
    fast_jl = "yes" if env["fast_jl"] else "no"
    stand_in = f" | {SIMULATED.upper()}: the CPU stands in" if simulated else ""
    print(f"gpu_check on {env.get('gpu', 'CPU')} | torch {env['torch']} (CUDA build {env['torch_cuda_build']}) | "
          f"faiss {env.get('faiss')} sees {env.get('faiss_gpus')} GPU(s) | fast_jl {fast_jl} | "
          f"load average {env['load_average'][0]:.1f}{stand_in}", flush=True)
    ctx = Context(device, TINY if args.tiny else FULL, seed=args.seed, work=args.work)
    start = time.perf_counter()
    try:
        results = run_checks(ctx, checks)
    finally:
        ctx.close()
    total = time.perf_counter() - start
    code = exit_code(results)
    print()
    print(format_table(results))
    print(f"\n{len(results)} checks in {total:.1f} s: " +
          ", ".join(f"{s} {sum(r.status == s for r in results)}" for s in ("pass", "fail", "error", "skipped")) +
          (f"  [{SIMULATED}]" if simulated else "") + f"  load average {os.getloadavg()[0]:.1f}; exit {code}")
    if args.out:
        from attribution.artifacts import write_json

        write_json(args.out, {"cuda": not simulated, "ran": True, "simulated": simulated, "tiny": args.tiny,
                              "environment": env, "sizes": asdict(ctx.sizes), "total_seconds": total,
                              "checks": [asdict(r) for r in results], "exit_code": code})
        print(f"figures: {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
