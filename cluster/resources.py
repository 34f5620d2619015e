"""What every pool asks Ray for, per actor: the one place these numbers live.

Stages describe their pools with :class:`attribution.workqueue.PoolRequest` (a kind:
embed, rank, retrain, regression); :func:`pool_shape` turns a request into a number of
actors and their Ray options, for the cluster's resources. The job driver
(cluster/submit.py) takes its own request from here too, and tests/test_manifests.py
checks that the worker shapes in docker/*.yaml can host them. Change a number here
and the manifests' test says which worker group no longer fits.
"""

from __future__ import annotations

import math

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


def retrain_pool_shape(cluster_resources: dict, model: str, actors: int | None = None,
                       gpus_per_actor: float | None = None) -> tuple[int, float]:
    """(actors, GPU share per actor) of a retraining pool (support, datamodels): ``actors``
    when given, else one per GPU share on a cluster with GPUs, else one per CPU."""
    gpus = float(cluster_resources.get("GPU", 0))
    share = gpus_per_actor
    if share is None:
        share = 0.0 if gpus == 0 else retrain_gpu_share(model)
    if actors:
        n = int(actors)
    elif share > 0:
        n = max(1, int(gpus / share))
    else:
        n = max(1, int(cluster_resources.get("CPU", 1)))
    return n, float(share)


POOL_KINDS = ("embed", "rank", "retrain", "regression")


def pool_shape(request, cluster_resources: dict) -> tuple[int, dict]:
    """(actors, Ray actor options) of a pool: the one sizing rule for every kind.

    embed : one actor per GPU (a whole GPU each) or one per ``threads`` CPUs
    rank : one actor per GPU (sharing the GPUs evenly) or one per CPU; a mixed cluster's
        CPU-only nodes are not counted when there are GPUs, since they could never host
        an actor that asks for a GPU share
    retrain : one per GPU share of the model (:func:`retrain_gpu_share`) or one per CPU
    regression : one per CPU, no GPU
    ``request.actors`` overrides the count; ``request.max_items`` caps it.
    """
    kind = request.kind
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pool kind {kind!r}; known: {list(POOL_KINDS)}")
    cpus = max(1, int(cluster_resources.get("CPU", 1)))
    gpus = float(cluster_resources.get("GPU", 0))
    threads = max(1, int(request.threads or 1))
    if kind == "embed":
        if gpus > 0:
            n, options = request.actors or int(gpus), embed_actor_options(gpu=True)
        else:
            n, options = request.actors or max(1, cpus // threads), embed_actor_options(gpu=False, threads=threads)
    elif kind == "rank":
        n = request.actors or (max(1, int(gpus)) if gpus > 0 else cpus)
        share = min(1.0, gpus / n) if gpus > 0 else 0.0
        options = {"num_cpus": ACTOR_CPUS, "num_gpus": share}
    elif kind == "retrain":
        n, share = retrain_pool_shape(cluster_resources, request.model or "mlp", request.actors,
                                      request.gpus_per_actor)
        options = {"num_cpus": ACTOR_CPUS, "num_gpus": share}
    else:  # regression
        n, options = request.actors or cpus, {"num_cpus": ACTOR_CPUS, "num_gpus": 0}
    if request.max_items is not None:
        n = min(n, int(request.max_items))
    return max(1, int(n)), options


def embed_actor_options(gpu: bool, threads: int = 1) -> dict:
    """Ray options of one embedding actor: a whole GPU and a CPU, or ``threads`` CPUs."""
    if gpu:
        return {"num_gpus": EMBED_ACTOR_GPUS, "num_cpus": ACTOR_CPUS}
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
