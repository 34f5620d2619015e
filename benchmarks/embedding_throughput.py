"""Embedding throughput: the Ray actor pool vs a plain single-process torch loop.

Both embed the same Fashion-MNIST train images with the same backbone and write the
same Parquet shards through the one extraction path (:func:`attribution.embedding.embed_datasets`);
the plain loop runs it on an in-process runtime using every core through torch's
intra-op threads (``torch.set_num_threads(cpus)``), the Ray pool on
``cluster.runtime.RayRuntime`` with one single-threaded actor per core.
Times are wall-clock and include building the model(s) and writing the files, for
Ray also starting the actors (``ray.init`` itself is excluded: a cluster is up
already in real use). The goal is Ray >= 0.9x the plain loop.

    python -m benchmarks.embedding_throughput                    # all 60000 images
    python -m benchmarks.embedding_throughput --limit 6000 --repeats 2

The load average is printed before and after: on a shared machine both numbers move
with other people's work; ``--repeats`` alternates the two methods to even that out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from attribution import embedding as emb
from attribution.backbones import BackboneSpec
from attribution.data import DatasetSpec


def dataset_spec(limit: int | None) -> DatasetSpec:
    """The train split, or a seeded class-balanced subset of about ``limit`` images."""
    if not limit or limit >= 60000:
        return DatasetSpec("fashion-mnist", "train")
    return DatasetSpec("fashion-mnist", "train", n_per_class=max(1, limit // 10), seed=0)


def run_plain(spec, backbone, folder, batch_size, shard_size, threads) -> float:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    emb.embed_datasets(folder, [spec], backbone, seed=0, batch_size=batch_size, shard_size=shard_size,
                       overwrite=True)
    return time.perf_counter() - start


def run_ray(runtime, spec, backbone, folder, batch_size, shard_size, actors, threads_per_actor) -> float:
    start = time.perf_counter()
    emb.embed_datasets(folder, [spec], backbone, seed=0, batch_size=batch_size, shard_size=shard_size,
                       overwrite=True, runtime=runtime, actors=actors, threads=threads_per_actor)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="embed about this many images (default: all 60000)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--small-stem", type=int, default=1, help="1: 3x3 stem (the quickstart's), 0: 7x7/2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                        help="cores for both: plain-loop torch threads, local Ray num_cpus")
    parser.add_argument("--actors", type=int, default=0, help="Ray actors (0: cpus // threads-per-actor)")
    parser.add_argument("--threads-per-actor", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="alternate plain/Ray this many times")
    parser.add_argument("--address", default=None, help="Ray address (default: a local Ray with --cpus)")
    args = parser.parse_args(argv)

    from cluster.runtime import RayRuntime

    spec = dataset_spec(args.limit)
    n = len(spec.load())
    backbone = BackboneSpec(args.backbone, small_stem=bool(args.small_stem) and args.backbone != "efficientnet_lite0",
                            in_channels=1 if args.backbone != "efficientnet_lite0" else 3)
    print(f"images: {n}  backbone: {backbone.name} small_stem={backbone.small_stem}  batch {args.batch_size}  "
          f"shard {args.shard_size}  cpus {args.cpus}", flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    runtime = RayRuntime(args.address, num_cpus=args.cpus if args.address is None else None)
    runtime.connect()  # outside the timings: a cluster is up already in real use
    work = tempfile.mkdtemp(prefix="embed-bench-")
    plain, ray_times = [], []
    try:
        for _ in range(args.repeats):
            seconds = run_plain(spec, backbone, os.path.join(work, "plain"), args.batch_size, args.shard_size,
                                args.cpus)
            plain.append(seconds)
            print(f"  plain torch loop ({args.cpus} threads): {seconds:.1f} s = {n / seconds:.1f} img/s", flush=True)
            seconds = run_ray(runtime, spec, backbone, os.path.join(work, "ray"), args.batch_size,
                              args.shard_size, args.actors or None, args.threads_per_actor)
            ray_times.append(seconds)
            print(f"  Ray actor pool: {seconds:.1f} s = {n / seconds:.1f} img/s", flush=True)
        ours = emb.load_embeddings(os.path.join(work, "ray"), "train").features
        ref = emb.load_embeddings(os.path.join(work, "plain"), "train").features
        max_diff = float(abs(ours - ref).max())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain_rate, ray_rate = n / statistics.median(plain), n / statistics.median(ray_times)
    print(f"load average after: {os.getloadavg()}")
    print(f"plain torch loop: {plain_rate:.1f} img/s   Ray actor pool: {ray_rate:.1f} img/s   "
          f"ratio Ray/plain: {ray_rate / plain_rate:.2f}   (max |diff| of features {max_diff:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
