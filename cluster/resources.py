"""What every pool asks Ray for, per actor: the one place these numbers live.

Stages describe their pools with :class:`attribution.workqueue.PoolRequest` (a kind:
embed, rank, retrain, regression); :func:`pool_shape` turns a request into a number of
actors and their Ray options, for what the cluster can place for this job when the pool
is created (its nodes' free resources: the job driver's ENTRYPOINT_CPUS and other live
pools already subtracted). tests/test_manifests.py checks that the worker shapes in
docker/*.yaml can host these actors. Change a number here and the manifests' test says
which worker group no longer fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Every actor (embedding, ranking, retraining) reserves one CPU and runs one torch
# thread: one thread per process is the robust choice on shared cores.
ACTOR_CPUS = 1
# An embedding actor on a GPU node holds one model on one whole GPU.
EMBED_ACTOR_GPUS = 1
# A retraining actor's GPU share: small models (Fashion-MNIST MLP / CNN) leave most of
# a GPU idle, so four share one; the CIFAR-10 ResNet-9 / MobileNetV2 take a whole GPU.
SMALL_RETRAIN_MODELS = ("mlp", "cnn")
SMALL_MODEL_GPU_SHARE = 0.25
LARGE_MODEL_GPU_SHARE = 1.0
# The job driver (attribution submit's entrypoint) reserves a CPU so it is never starved.
ENTRYPOINT_CPUS = 1.0
# Ray's default object store size is this fraction of a node's memory
# (ray._private.ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION).
OBJECT_STORE_FRACTION = 0.3

# Training-split sizes and class counts of the supported datasets (full splits).
TRAIN_IMAGES = {"fashion-mnist": 60_000, "cifar10": 50_000, "imagenet": 1_281_167}
CLASSES = {"fashion-mnist": 10, "cifar10": 10, "imagenet": 1000}


def retrain_gpu_share(model: str) -> float:
    """GPU share of one retraining actor for ``model`` on a cluster with GPUs."""
    return SMALL_MODEL_GPU_SHARE if model in SMALL_RETRAIN_MODELS else LARGE_MODEL_GPU_SHARE


POOL_KINDS = ("embed", "rank", "retrain", "regression", "trak")


class PoolTooLarge(ValueError):
    """A pool's worker asks for more than any single node of the cluster has: Ray could
    never place it, so the pool is refused before any actor is requested."""


@dataclass(frozen=True)
class NodeResources:
    """One alive node: what it has (``total``) and what nothing holds now (``free``: not
    this job's driver, not another pool, not another job), as {"CPU": ..., "GPU": ...}."""

    total: Mapping[str, float]
    free: Mapping[str, float]


def as_nodes(resources: Mapping[str, float] | Sequence[NodeResources]) -> tuple[NodeResources, ...]:
    """``resources`` as nodes: a plain dict is one node that has it all and holds nothing
    yet (how tests and callers without a cluster describe resources)."""
    if isinstance(resources, Mapping):
        return (NodeResources(dict(resources), dict(resources)),)
    return tuple(resources)


def actors_fitting(options: Mapping, resources: Mapping[str, float]) -> int:
    """How many actors with Ray ``options`` (num_cpus / num_gpus) fit in ``resources``."""
    counts = []
    for option, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        need = float(options.get(option) or 0)
        if need > 0:
            # the tolerance: shares like 0.25 GPU add up to whole GPUs despite rounding
            counts.append(int(float(resources.get(name, 0)) / need + 1e-9))
    return min(counts) if counts else 0


def describe(resources: Mapping, options: bool = False) -> str:
    """"1 CPU, 0.25 GPU" for Ray options (``options``) or a resource dict."""
    keys = (("num_cpus", "CPU"), ("num_gpus", "GPU")) if options else (("CPU", "CPU"), ("GPU", "GPU"))
    parts = [f"{float(resources.get(key) or 0):g} {name}" for key, name in keys
             if name == "CPU" or float(resources.get(key) or 0) > 0]
    return ", ".join(parts)


def actor_options(request, nodes: Sequence[NodeResources]) -> dict:
    """Ray options of one actor of the pool ``request`` describes (see :func:`pool_shape`).

    Whether the GPU shape is used depends on the GPUs the cluster *has*, never on how
    many are free at this moment: the device a stage computes on must not depend on load."""
    gpus = sum(float(node.total.get("GPU", 0)) for node in nodes)
    kind = request.kind
    if kind == "embed":
        return embed_actor_options(gpu=gpus > 0, threads=max(1, int(request.threads or 1)))
    if kind == "rank":
        # one actor per GPU, or the requested number sharing the GPUs evenly
        share = (min(1.0, gpus / int(request.actors)) if request.actors else 1.0) if gpus > 0 else 0.0
        return {"num_cpus": ACTOR_CPUS, "num_gpus": share}
    if kind == "retrain":
        share = request.gpus_per_actor
        if share is None:
            share = retrain_gpu_share(request.model or "mlp") if gpus > 0 else 0.0
        return {"num_cpus": ACTOR_CPUS, "num_gpus": float(share)}
    if kind == "trak":
        # per-example gradients of a whole checkpoint's shard: a whole GPU, or CPUs;
        # gpus_per_actor = 0 keeps it on CPUs (trak.device = "cpu")
        share = request.gpus_per_actor
        if share is None:
            share = LARGE_MODEL_GPU_SHARE if gpus > 0 else 0.0
        return {"num_cpus": max(ACTOR_CPUS, int(request.threads or 1)), "num_gpus": float(share)}
    return {"num_cpus": ACTOR_CPUS, "num_gpus": 0}  # regression


def pool_shape(request, resources: Mapping[str, float] | Sequence[NodeResources]) -> tuple[int, dict]:
    """(actors, Ray actor options) of a pool: the one sizing rule for every kind.

    ``resources``: the cluster's alive nodes (:class:`NodeResources`; ``RayRuntime``
    gathers them when the pool is created), or one dict for a single node that holds
    nothing yet. Per actor:

    embed : a whole GPU and a CPU on a cluster with GPUs, else ``threads`` CPUs
    rank : a CPU and one GPU (``request.actors`` of them share the GPUs evenly) or no GPU
    retrain : a CPU and the model's GPU share (:func:`retrain_gpu_share`) or no GPU
    regression : a CPU, no GPU
    trak : ``threads`` CPUs and a whole GPU (``gpus_per_actor``, 0: none) or no GPU

    The number of actors is what the nodes' *free* resources can place now, counted per
    node (an actor cannot span nodes; on a mixed cluster CPU-only nodes host no actor
    that asks for a GPU share): a job's driver (ENTRYPOINT_CPUS) and other live pools
    hold theirs already, and an actor asked for beyond that would wait for resources
    that never come. ``request.actors`` overrides the count (an autoscaler may add
    nodes; the queue says which workers could not be placed); ``request.max_items``
    caps it: never more actors than items. When nothing is free right now, one actor is
    asked for and the queue reports if it cannot be placed. Raises :class:`PoolTooLarge`
    when no node could host even one actor.
    """
    if request.kind not in POOL_KINDS:
        raise ValueError(f"unknown pool kind {request.kind!r}; known: {list(POOL_KINDS)}")
    nodes = as_nodes(resources)
    options = actor_options(request, nodes)
    if not any(actors_fitting(options, node.total) for node in nodes):
        largest = max(nodes, key=lambda node: (float(node.total.get("GPU", 0)), float(node.total.get("CPU", 0))),
                      default=NodeResources({}, {}))
        fix = "add a node that large"
        if request.kind == "embed":
            fix = f"lower embed.threads_per_actor (CPUs per worker) or {fix}"
        elif request.kind == "trak":
            fix = f"lower trak.threads_per_actor or {fix}"
        elif request.kind == "retrain" and request.gpus_per_actor is not None:
            fix = f"lower gpus_per_actor of [support] / [datamodels] or {fix}"
        raise PoolTooLarge(f"the {request.kind} pool's workers each ask for {describe(options, options=True)}, more "
                           f"than any node of this cluster has (largest: {describe(largest.total)}): {fix}")
    placeable = sum(actors_fitting(options, node.free) for node in nodes)
    n = int(request.actors) if request.actors else max(1, placeable)
    if request.max_items is not None:
        n = min(n, int(request.max_items))
    return max(1, n), options


def embed_actor_options(gpu: bool, threads: int = 1) -> dict:
    """Ray options of one embedding actor: ``threads`` CPUs (its torch threads on CPU; on
    either, the threads that decode image files), and a whole GPU on a GPU cluster."""
    if gpu:
        return {"num_gpus": EMBED_ACTOR_GPUS, "num_cpus": max(ACTOR_CPUS, int(threads))}
    return {"num_cpus": threads}


def gpu_node_min_cpus(gpus: int) -> int:
    """CPUs a node with ``gpus`` GPUs needs so that every actor its GPUs can host gets
    its CPU (retraining actors of small models: 1 / SMALL_MODEL_GPU_SHARE per GPU), plus
    the job driver, which may be placed on any node with a free CPU. With fewer, the
    retraining pool waits forever for actors Ray cannot place."""
    per_gpu = max(EMBED_ACTOR_GPUS, math.ceil(1 / SMALL_MODEL_GPU_SHARE), math.ceil(1 / LARGE_MODEL_GPU_SHARE))
    return int(gpus * per_gpu * ACTOR_CPUS + math.ceil(ENTRYPOINT_CPUS))


def rank_object_store_bytes(preset: dict) -> int:
    """Bytes the rank stage puts in the object store: the training embeddings as float32
    (every node that hosts ranking actors maps a copy). An upper bound when the preset
    subsamples ``train_per_class`` (ImageNet classes have 732-1300 images)."""
    from attribution.backbones import FEATURE_DIMS

    data, embed = preset.get("data", {}), preset.get("embed", {})
    dataset = data.get("dataset", "fashion-mnist")
    per_class = data.get("train_per_class")
    images = TRAIN_IMAGES[dataset] if not per_class else min(TRAIN_IMAGES[dataset], int(per_class) * CLASSES[dataset])
    return images * FEATURE_DIMS[embed.get("backbone", "resnet18")] * 4


def min_node_memory_bytes(preset: dict) -> int:
    """Memory a node that hosts ranking actors needs so that Ray's default object store
    holds the training embeddings."""
    return math.ceil(rank_object_store_bytes(preset) / OBJECT_STORE_FRACTION)
