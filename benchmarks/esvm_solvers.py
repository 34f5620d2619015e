"""Benchmark of the Exemplar-SVM solvers: speed and parity with the sklearn reference.

    python -m benchmarks.esvm_solvers                   # Fashion-MNIST PCA-128 + ImageNet-shaped
    python -m benchmarks.esvm_solvers --exp EXP          # the pipeline's embeddings if present
    python -m benchmarks.esvm_solvers --features resnet  # seeded random-init ResNet-18 features

Cases, all in one run so that the speed ratios share the machine's load:
  (a) Fashion-MNIST, one class: every training image of the class as negatives (6000) and
      the quickstart's 500 per class; targets are test images of that class.
  (b) ImageNet-shaped: 1300 negatives x 2048 dims, synthetic post-ReLU average-pooled
      features (seeded), 50 targets (one ImageNet class's validation images).
For each case: sklearn LinearSVC one target at a time (the reference), thundersvm-cpu on a
few targets (it is ~30x slower), and the batched solver on all targets; targets/second,
speedup over sklearn, and parity with sklearn on the targets both solved: mean top-100
overlap and mean Spearman correlation of the decision values.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from attribution.esvm import get_solver

# ----------------------------------------------------------------------------- features


def fashion_mnist_pca_features(dim: int = 128, seed: int = 0, fit_images: int = 3000, classes=None):
    """PCA-`dim` of Fashion-MNIST pixels (in [0,1]); the basis is fit on a seeded sample of
    `fit_images` training images. Only images of `classes` (None: all) are projected.
    Returns (train_labels, train_feats, test_labels, test_feats)."""
    from attribution.data import load_fashion_mnist
    train, test = load_fashion_mnist("train", download=False), load_fashion_mnist("test", download=False)
    rng = np.random.default_rng(seed)
    fit_pos = np.sort(rng.choice(len(train), size=min(fit_images, len(train)), replace=False))
    fit = train.images(fit_pos).reshape(len(fit_pos), -1).astype(np.float32) / 255
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    basis = vt[:dim].T
    out = []
    for ds in (train, test):
        pos = np.arange(len(ds)) if classes is None else np.flatnonzero(np.isin(ds.labels, classes))
        x = ds.images(pos).reshape(len(pos), -1).astype(np.float32) / 255
        out += [ds.labels[pos], ((x - mean) @ basis).astype(np.float32)]
    return tuple(out)


def fashion_mnist_resnet_features(train_positions, test_positions, seed: int = 0, batch: int = 256):
    """512-d features of a seeded random-init ResNet-18 (small stem, 1 channel) for the given
    Fashion-MNIST positions: real images, deterministic, no weights to download."""
    import torch

    from attribution.backbones import BackboneSpec, load_backbone
    from attribution.data import load_fashion_mnist
    torch.manual_seed(seed)
    model = load_backbone(BackboneSpec(name="resnet18", small_stem=True, in_channels=1))
    out = []
    for split, pos in (("train", train_positions), ("test", test_positions)):
        ds = load_fashion_mnist(split, download=False)
        feats = []
        with torch.no_grad():
            for i in range(0, len(pos), batch):
                x = model.preprocess(ds.images(pos[i:i + batch]), ds.mean, ds.std)
                feats.append(model(x).float().numpy())
        out.append((ds.labels[pos], np.concatenate(feats).astype(np.float32)))
    return out[0][0], out[0][1], out[1][0], out[1][1]


def imagenet_like_features(n_negatives: int = 1300, n_targets: int = 50, dim: int = 2048,
                           seed: int = 0, latent_dim: int = 64, latent_scale: float = 0.3,
                           noise: float = 1.0, scale: float = 0.15, positions: int = 49):
    """Synthetic stand-in for one ImageNet class's ResNet-50 pooled features (seeded).

    Like real post-ReLU average-pooled features they are nonnegative, dense after pooling,
    highly correlated within a class (mean cosine ~0.85) and vary along a low-dimensional
    latent: pre-activation h = class bias + W u (u ~ N(0, latent_scale^2 I_64)), then ReLU
    of h plus per-position noise, averaged over `positions` spatial positions. Targets are
    drawn like negatives (other images of the class). `scale` sets the feature norm and so
    the fraction of negatives inside the margin (about a fifth here, as on real data).
    """
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(latent_dim, dim)) / np.sqrt(latent_dim)
    bias = rng.normal(-0.5, 0.5, size=dim)

    def draw(m):
        h = (rng.normal(size=(m, latent_dim)) * latent_scale) @ W + bias
        acc = np.zeros((m, dim))
        for _ in range(positions):
            acc += np.maximum(h + noise * rng.normal(size=(m, dim)), 0)
        return (acc * scale / positions).astype(np.float32)

    return draw(n_targets), draw(n_negatives)


def pipeline_features(exp):
    """(train_labels, train_feats, test_labels, test_feats) from EXP/embeddings, or None."""
    try:
        from attribution.embedding import load_embeddings
        from attribution.experiment import Experiment
    except ImportError as exc:
        print(f"# --exp: attribution.embedding not importable ({exc}); falling back")
        return None
    try:
        e = Experiment(exp)
        train, test = load_embeddings(e, "train"), load_embeddings(e, "test")
    except Exception as exc:  # missing or unreadable embeddings: say so, fall back
        print(f"# --exp {exp}: could not load embeddings ({type(exc).__name__}: {exc}); falling back")
        return None
    return (np.asarray(train.labels), np.asarray(train.features, dtype=np.float32),
            np.asarray(test.labels), np.asarray(test.features, dtype=np.float32))


# ----------------------------------------------------------------------------- parity


def parity(ref: np.ndarray, other: np.ndarray, k: int = 100) -> tuple[float, float]:
    """(mean top-k overlap, mean Spearman) between two (T, N) decision-value matrices."""
    from scipy.stats import spearmanr
    k = min(k, ref.shape[1])
    overlaps, rhos = [], []
    for a, b in zip(ref, other):
        ta = set(np.argpartition(-a, k - 1)[:k].tolist())
        tb = set(np.argpartition(-b, k - 1)[:k].tolist())
        overlaps.append(len(ta & tb) / k)
        rhos.append(spearmanr(a, b)[0])
    return float(np.mean(overlaps)), float(np.mean(rhos))


def timed(solver, targets, negatives):
    t0 = time.perf_counter()
    out = solver.decision_values(targets, negatives)
    return out, time.perf_counter() - t0


def run_case(name, targets, negatives, n_sklearn, n_thunder, batched_params, rows):
    print(f"# case {name}: {len(targets)} targets, negatives {negatives.shape}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    sk_t = targets[:n_sklearn]
    # one-target warm-up calls keep imports and first-call set-up out of the timings
    get_solver("sklearn").decision_values(targets[:1], negatives)
    for _, params in batched_params:
        get_solver("batched", **params).decision_values(targets[:1], negatives)
    ref, t_sk = timed(get_solver("sklearn"), sk_t, negatives)
    sk_rate = len(sk_t) / t_sk
    rows.append((name, "sklearn", len(sk_t), sk_rate, 1.0, 1.0, 1.0, ""))
    for label, params in batched_params:
        solver = get_solver("batched", **params)
        out, t_b = timed(solver, targets, negatives)
        ov, rho = parity(ref, out[:len(sk_t)])
        info = solver.info_
        note = (f"{info['form']}, iters {info['mean_iterations']:.1f}, "
                f"in-margin {(out > -1).mean():.2f}")
        rows.append((name, label, len(targets), len(targets) / t_b, len(targets) / t_b / sk_rate, ov, rho, note))
    if n_thunder:
        try:
            th = get_solver("thundersvm", n_jobs=1)
        except ImportError as exc:
            rows.append((name, "thundersvm", 0, float("nan"), float("nan"), float("nan"), float("nan"), str(exc)[:60]))
        else:
            out, t_th = timed(th, targets[:n_thunder], negatives)
            ov, rho = parity(ref[:n_thunder], out)
            rows.append((name, "thundersvm-cpu", n_thunder, n_thunder / t_th, n_thunder / t_th / sk_rate,
                         ov, rho, "hinge loss, unregularised intercept"))
    print(f"#   done, load average {os.getloadavg()[0]:.1f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", help="experiment directory whose embeddings/ to use (falls back if absent)")
    ap.add_argument("--features", choices=("pca", "resnet"), default="pca",
                    help="fallback Fashion-MNIST features: PCA-128 of pixels or random-init ResNet-18")
    ap.add_argument("--class-index", type=int, default=0, help="Fashion-MNIST class to use")
    ap.add_argument("--targets", type=int, default=400, help="Fashion-MNIST targets for the batched solver")
    ap.add_argument("--sklearn-targets", type=int, default=200, help="targets for sklearn (parity is over these)")
    ap.add_argument("--thunder-targets", type=int, default=3)
    ap.add_argument("--imagenet-targets", type=int, default=50)
    ap.add_argument("--imagenet-sklearn-targets", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads for the batched solver (one row each)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-quickstart", action="store_true", help="skip the 500-per-class case")
    args = ap.parse_args(argv)

    import torch
    source, from_pipeline = None, False
    if args.exp:
        feats = pipeline_features(args.exp)
        if feats is not None:
            source, from_pipeline = f"pipeline embeddings from {args.exp}/embeddings", True
    if source is None:
        if args.features == "pca":
            feats = fashion_mnist_pca_features(classes=[args.class_index])
            source = "Fashion-MNIST PCA-128 of pixels (seed 0)"
        else:
            from attribution.data import load_fashion_mnist
            ytr = load_fashion_mnist("train", download=False).labels
            yte = load_fashion_mnist("test", download=False).labels
            ptr = np.flatnonzero(ytr == args.class_index)
            pte = np.flatnonzero(yte == args.class_index)[:args.targets]
            feats = fashion_mnist_resnet_features(ptr, pte)
            source = "Fashion-MNIST random-init ResNet-18 (small stem, seed 0) 512-d"
    ytr, ftr, yte, fte = feats
    print(f"# features: {source}")
    print(f"# machine: {os.cpu_count()} cpus, torch {torch.__version__}, default torch threads "
          f"{torch.get_num_threads()}; sklearn and thundersvm single-threaded")
    batched = [(f"batched {t}thr", {"device": args.device, "num_threads": t}) for t in args.threads]
    rows = []
    neg = ftr[ytr == args.class_index]
    tg = fte[yte == args.class_index][:args.targets]
    run_case(f"fmnist c{args.class_index} N={len(neg)}", tg, neg, args.sklearn_targets, args.thunder_targets,
             batched, rows)
    if not args.skip_quickstart:
        from attribution.data import load_fashion_mnist, per_class_subset
        if from_pipeline:   # rows are whatever the experiment embedded: subset its own labels
            sub = per_class_subset(ytr, 500, seed=0)
            neg = ftr[sub][ytr[sub] == args.class_index]
        else:               # rows are the class's training images in order: the quickstart's
            full = load_fashion_mnist("train", download=False).labels   # 500/class, seed 0
            chosen = np.zeros(len(full), bool)
            chosen[per_class_subset(full, 500, seed=0)] = True
            neg = ftr[ytr == args.class_index][chosen[full == args.class_index]]
        run_case(f"fmnist c{args.class_index} N={len(neg)} (quickstart)", tg, neg, args.sklearn_targets, 0,
                 batched, rows)
    tg, neg = imagenet_like_features(n_targets=args.imagenet_targets)
    run_case("imagenet-shaped 1300x2048", tg, neg, args.imagenet_sklearn_targets, args.thunder_targets,
             batched, rows)

    print()
    head = f"{'case':34s} {'solver':15s} {'targets':>7s} {'targets/s':>10s} {'speedup':>8s} {'top100':>7s} {'spearman':>9s}  notes"
    print(head)
    print("-" * len(head))
    for case, solver, n, rate, speed, ov, rho, note in rows:
        print(f"{case:34s} {solver:15s} {n:7d} {rate:10.2f} {speed:7.1f}x {ov:7.4f} {rho:9.6f}  {note}")
    print(f"# load average at the end: {os.getloadavg()}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
