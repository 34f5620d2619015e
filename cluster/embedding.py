"""The embed stage on Ray: shards of each split computed by a pool of actors.

Why actors with a streaming submit loop and not Ray Data ``map_batches``:

- The unit of work is a planned shard (fixed position range -> one Parquet file), the
  same unit :mod:`attribution.embedding` checks for resume. The driver submits exactly
  the shards whose files are missing, so resume is "skip finished files" and
  exactly-once is checked on the planned files. Ray Data re-blocks rows as it likes and
  names its output files itself, so neither a finished range nor a file can be mapped
  back to the plan without an extra bookkeeping layer.
- Images never travel through the object store: an actor gets (DatasetSpec, Shard),
  reads the pixels itself batch by batch (a memory map for Fashion-MNIST / CIFAR,
  decoded files for ImageNet) and returns only a row count. Ray Data would read the
  images in one task and ship the blocks to the model actors.
- Memory is bounded by ``IN_FLIGHT_PER_ACTOR`` shards per actor (results are row
  counts, or one shard's table in multi-node mode), and inside an actor by one batch of
  pixels: no step ever holds all images.

Each actor builds the model once (``torch.manual_seed(seed)`` right before
``load_backbone``, so random-init actors all hold the same network). One actor per GPU
when the cluster has GPUs, else one single-threaded actor per CPU: one thread per
process is the robust choice on a busy machine, and N one-thread processes match one
N-thread process on a quiet one.

Multi-node: the experiment directory is the driver's (possibly a staging copy of a
URI, see cluster.storage), so when Ray has more than one node the actors return each
shard's Arrow table and the driver writes the file; on one node they write it
themselves. The checkpoint file is shipped once through the object store in that case
and checked by sha256. The dataset itself must be readable on every node (e.g. the
Debian package installed, or data.root on a shared filesystem): actors read pixels
from it directly. A shard whose actor or node is lost goes back to the queue and the
actor is replaced (cluster.workers.ActorSlots); the summary counts them as ``requeued``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from attribution import embedding as emb
from attribution.data import DatasetSpec
from attribution.experiment import Experiment
from cluster.workers import ActorSlots, worker_name

# One shard per actor at a time: the driver's round trip between shards is milliseconds
# against seconds per shard, and queueing a second shard on a busy actor would leave
# the other actors idle at the end of the run (up to a shard of imbalance each).
IN_FLIGHT_PER_ACTOR = 1


class Embedder:
    """Callable actor body: ``Embedder(...)(dataset_spec, shard) -> rows written``."""

    def __init__(self, backbone_spec, seed: int, folder: str, batch_size: int = emb.DEFAULT_BATCH_SIZE,
                 dtype: str = "float32", checkpoint_sha256: str | None = None, threads: int = 1,
                 device: str | None = None, checkpoint_bytes: bytes | None = None):
        import torch

        if checkpoint_bytes is not None:  # another node: materialise the driver's file locally
            backbone_spec = replace(backbone_spec, checkpoint=str(_local_copy(checkpoint_bytes, checkpoint_sha256)))
        if threads:
            torch.set_num_threads(int(threads))  # the actor owns exactly its num_cpus
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if checkpoint_sha256 is not None:
            from attribution.experiment import file_sha256

            seen = file_sha256(backbone_spec.checkpoint)
            if seen != checkpoint_sha256:
                raise emb.EmbeddingError(
                    f"checkpoint {backbone_spec.checkpoint} on this node has sha256 {seen[:12]}... but the driver's "
                    f"has {checkpoint_sha256[:12]}...: put the same file at the same path on every node")
        self.folder, self.batch_size, self.dtype = folder, int(batch_size), dtype
        self.model = emb.build_model(backbone_spec, seed, device)
        self._sets: dict[DatasetSpec, Any] = {}
        self.name = worker_name()

    def ready(self) -> str:
        return self.name

    def image_set(self, dataset_spec: DatasetSpec):
        if dataset_spec not in self._sets:  # a memory map or a file list: cheap to keep
            self._sets[dataset_spec] = dataset_spec.load()
        return self._sets[dataset_spec]

    def __call__(self, dataset_spec: DatasetSpec, shard: emb.Shard, write: bool = True):
        """Embed one shard: write its file and return the row count (``write=True``), or
        return its Arrow table for the driver to write (``write=False``, multi-node)."""
        image_set = self.image_set(dataset_spec)
        if write:
            return emb.embed_shard(self.model, image_set, shard, self.folder, self.batch_size, self.dtype)
        features = emb.extract(self.model, image_set, shard.positions, self.batch_size)
        return emb.shard_table(shard.split, image_set.ids[shard.start:shard.stop],
                               image_set.labels[shard.start:shard.stop], features, self.dtype)

    def embed(self, dataset_spec: DatasetSpec, shard: emb.Shard, write: bool = True):
        """``__call__`` for Ray handles (they expose named methods only), returning
        ``(result, worker name)``: the stage records which worker embedded each shard."""
        return self(dataset_spec, shard, write), self.name


def _local_copy(data: bytes, sha256: str) -> Path:
    """Write checkpoint bytes once per node into the cache (atomically), named by hash."""
    from attribution.data import cache_dir
    from attribution.experiment import file_sha256

    path = cache_dir() / "checkpoints" / f"{sha256}.pt"
    if not (path.exists() and file_sha256(path) == sha256):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def actor_options(cluster_resources: dict, actors: int | None, threads: int = 1) -> tuple[int, dict]:
    """(number of actors, ray options per actor) for the cluster's resources."""
    from cluster.resources import embed_actor_options

    gpus = int(cluster_resources.get("GPU", 0))
    if gpus > 0:
        count = actors or gpus
        return count, embed_actor_options(gpu=True)
    cpus = int(cluster_resources.get("CPU", 1))
    count = actors or max(1, cpus // max(1, threads))
    return count, embed_actor_options(gpu=False, threads=threads)


def embed_on_ray(folder: str | os.PathLike, dataset_specs: Sequence[DatasetSpec], backbone_spec, *,
                 seed: int = 0, batch_size: int = emb.DEFAULT_BATCH_SIZE,
                 shard_size: int = emb.DEFAULT_SHARD_SIZE, dtype: str = "float32", actors: int | None = None,
                 threads_per_actor: int = 1, overwrite: bool = False, progress: bool = True,
                 stop_after_shards: int | None = None, write_in_actors: bool | None = None) -> dict:
    """Embed the splits into ``folder`` with a Ray actor pool (Ray must be initialised).

    Settings are validated against an existing manifest before any actor starts
    (nothing is written on a mismatch). Finished shards are skipped. Returns per split
    {rows, shards, computed, complete} plus dim, dtype, seconds, images_per_s, actors.
    ``stop_after_shards`` stops after that many shards finished (a simulated crash for
    tests: the splits stay incomplete and a rerun resumes). ``write_in_actors`` (None:
    when Ray has a single node) lets actors write shard files; otherwise they return
    tables and the driver writes. ``workers`` maps each worker (``host:pid@node``) to the
    shards it embedded; ``requeued`` counts shards put back after a lost actor or node.
    """
    import ray

    folder = Path(folder)
    start_time = time.perf_counter()
    # Build the model once here: it gives the dim for the manifest and fails fast on a
    # bad checkpoint before any actor starts.
    model = emb.build_model(backbone_spec, seed)
    sha = emb.checkpoint_hash(backbone_spec)
    manifest = emb.open_manifest(folder, emb.new_manifest(backbone_spec, sha, model.dim, dtype, seed), overwrite)
    dim = model.dim
    del model
    image_sets, work, summary = {}, [], {}
    for spec in dataset_specs:
        image_set = spec.load()
        shards, pending = emb.plan_split(folder, manifest, spec, image_set, shard_size)
        image_sets[spec] = image_set
        work += [(spec, shard) for shard in pending]
        summary[spec.split] = {"rows": len(image_set), "shards": len(shards), "computed": 0}
    total_rows = sum(s["rows"] for s in summary.values())
    pending_rows = sum(shard.rows for _, shard in work)

    n_actors, options = actor_options(ray.cluster_resources(), actors, threads_per_actor)
    n_actors = max(1, min(n_actors, len(work)))
    stopped = False
    workers: dict[str, int] = {}
    requeued = 0
    if write_in_actors is None:
        write_in_actors = sum(1 for node in ray.nodes() if node.get("Alive")) <= 1
    if work:
        # A lost actor (its process or its node) is replaced by the driver and its shard
        # requeued, not restarted by Ray (see cluster.workers); a shard is idempotent (same
        # rows, atomic file), so a retry cannot duplicate anything.
        remote_cls = ray.remote(max_restarts=0, max_task_retries=0, **options)(Embedder)
        ckpt = None
        if sha is not None and not write_in_actors:
            ckpt = ray.put(Path(backbone_spec.checkpoint).read_bytes())
        pool = ActorSlots(lambda: remote_cls.remote(backbone_spec, seed, str(folder), batch_size, dtype, sha,
                                                    threads_per_actor, None, ckpt), n_actors)
        bar = _progress(total_rows, total_rows - pending_rows, progress)
        try:
            stopped, requeued = _run_pool(pool, work, summary, bar, stop_after_shards, folder, write_in_actors,
                                          workers)
        finally:
            bar.close()
            pool.kill()  # free the CPUs/GPUs for the next stage
    for spec in dataset_specs:
        entry = summary[spec.split]
        entry["complete"] = False
        if not stopped:
            emb.finalize_split(folder, manifest, image_sets[spec])
            entry["complete"] = True
    seconds = time.perf_counter() - start_time
    computed_rows = sum(shard.rows for _, shard in work) if not stopped else None
    return {"splits": summary, "dim": dim, "dtype": dtype, "path": str(folder), "actors": n_actors if work else 0,
            "workers": workers, "requeued": requeued, "seconds": round(seconds, 2),
            "images_per_s": round(computed_rows / seconds, 1) if computed_rows else None}


def _run_pool(pool: ActorSlots, work, summary, bar, stop_after_shards, folder, write_in_actors,
              workers: dict, max_losses: int = 3) -> tuple[bool, int]:
    """Streaming submit loop: at most IN_FLIGHT_PER_ACTOR shards per actor at a time.

    A shard whose actor or node was lost goes back to the front of the queue (at most
    ``max_losses`` times) and the actor is replaced. Returns (stopped early by
    ``stop_after_shards``, shards requeued)."""
    import ray

    queue = deque(work)
    in_flight: dict[Any, tuple[int, DatasetSpec, emb.Shard]] = {}
    load = [0] * len(pool)
    losses: dict[str, int] = {}
    done = requeued = 0
    while queue or in_flight:
        pool.poll()  # replacement actors that are up take work again
        while queue and (stop_after_shards is None or done + len(in_flight) < stop_after_shards):
            free = [i for i in pool.usable() if load[i] < IN_FLIGHT_PER_ACTOR]
            if not free:
                break
            actor = min(free, key=load.__getitem__)
            spec, shard = queue.popleft()
            in_flight[pool[actor].embed.remote(spec, shard, write_in_actors)] = (actor, spec, shard)
            load[actor] += 1
        if not in_flight:
            if queue and pool.starting:  # every actor is (re)starting: wait for one
                pool.poll(timeout=None)
                continue
            break
        ready, _ = ray.wait(list(in_flight) + pool.starting_refs(), num_returns=1)
        for ref in ready:
            if ref not in in_flight:
                continue  # a replacement actor answered: pool.poll() puts it in service
            actor, spec, shard = in_flight.pop(ref)
            load[actor] -= 1
            try:
                result, worker = ray.get(ref)  # re-raises a worker's error with its traceback
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
                losses[shard.file] = losses.get(shard.file, 0) + 1
                if losses[shard.file] > max_losses:
                    raise emb.EmbeddingError(
                        f"shard {shard.file} lost its worker {losses[shard.file]} times (last: "
                        f"{str(error).splitlines()[0]}); finished shards are saved: check the nodes' memory and "
                        "health ('ray status') and rerun the same command to resume") from error
                pool.lost(actor, error)
                queue.appendleft((spec, shard))
                requeued += 1
                continue
            if write_in_actors:
                rows = result
            else:
                from attribution.experiment import write_table_atomic

                write_table_atomic(result, Path(folder) / shard.file)
                rows = result.num_rows
            if rows != shard.rows:
                raise emb.EmbeddingError(f"shard {shard.file} wrote {rows} rows, planned {shard.rows}")
            summary[spec.split]["computed"] += 1
            workers[worker] = workers.get(worker, 0) + 1
            done += 1
            bar.update(rows)
        if stop_after_shards is not None and done >= stop_after_shards:
            return bool(queue or in_flight), requeued
    return False, requeued


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="embed", disable=not enabled,
                mininterval=1.0, dynamic_ncols=True)


# ----------------------------------------------------------------------------- preset -> specs


def resolve_checkpoint(exp: Experiment, value: str | None) -> str | None:
    """embed.checkpoint: "pretrained" -> EXP/checkpoints/moco.pt, "" -> None, else a path."""
    if not value:
        return None
    if value == "pretrained":
        path = exp.checkpoints / "moco.pt"
        if not path.exists():
            raise FileNotFoundError(
                f"embed.checkpoint = 'pretrained' but {path} does not exist: run the pretrain stage first "
                f"('attribution run PRESET --exp {exp.root} --stages pretrain'), or set --set embed.checkpoint=\"\" "
                "for the random-init ablation, or --set embed.checkpoint=PATH for a MoCo checkpoint")
        return str(path)
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"embed.checkpoint {value!r} does not exist: pass a checkpoint file, "
                                "'pretrained' (EXP/checkpoints/moco.pt) or \"\" (random init)")
    return str(path.resolve())


def specs_from_preset(exp: Experiment, preset: dict) -> tuple[list[DatasetSpec], Any, dict]:
    """(dataset specs for train and test, BackboneSpec, run options) from a preset.

    ``[embed]`` keys: backbone, checkpoint, batch_size, shard_size, actors (0 or absent:
    one per GPU / CPU), threads_per_actor, dtype, seed (default: the preset's seed);
    and for a run without a checkpoint small_stem / in_channels / image_size / normalize
    (defaults: small stem for images up to 64 px, the dataset's channel count)."""
    from attribution.backbones import BackboneSpec, spec_from_checkpoint

    data, embed = dict(preset.get("data", {})), dict(preset.get("embed", {}))
    name, root = data.get("dataset", "fashion-mnist"), (data.get("root") or None)
    data_seed = int(data.get("seed", preset.get("seed", 0)))
    specs = [DatasetSpec(name, "train", root, _per_class(data.get("train_per_class")), data_seed),
             DatasetSpec(name, "test", root, _per_class(data.get("test_per_class")), data_seed)]
    backbone = embed.get("backbone", "resnet18")
    checkpoint = resolve_checkpoint(exp, embed.get("checkpoint", ""))
    if checkpoint:
        spec = spec_from_checkpoint(checkpoint)
        if spec.name != backbone:
            raise ValueError(f"embed.backbone = {backbone!r} but {checkpoint} holds a {spec.name}: "
                             f"set --set embed.backbone={spec.name}")
        overrides = {k: embed[k] for k in ("image_size", "normalize") if k in embed}
        spec = replace(spec, **overrides) if overrides else spec
    else:
        h, _, c = specs[0].load().image_shape
        resnet = backbone != "efficientnet_lite0"
        spec = BackboneSpec(name=backbone, small_stem=bool(embed.get("small_stem", resnet and h <= 64)),
                            in_channels=int(embed.get("in_channels", c if resnet else 3)),
                            image_size=embed.get("image_size") or None, normalize=embed.get("normalize", "auto"))
    options = {"seed": int(embed.get("seed", preset.get("seed", 0))),
               "batch_size": int(embed.get("batch_size", emb.DEFAULT_BATCH_SIZE)),
               "shard_size": int(embed.get("shard_size", emb.DEFAULT_SHARD_SIZE)),
               "actors": int(embed.get("actors", 0)) or None,
               "threads_per_actor": int(embed.get("threads_per_actor", 1)),
               "dtype": str(embed.get("dtype", "float32"))}
    return specs, spec, options


def _per_class(value) -> int | None:
    return int(value) if value else None  # 0 / absent: the whole split


def run_embed_stage(exp: Experiment, preset: dict, address: str | None = None, *, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Pipeline stage: embed the preset's train and test subsets into EXP/embeddings.

    Connects with ``cluster.runtime.ensure_ray(address)`` (a local Ray when None) and
    leaves Ray running: the caller owns the process and its Ray."""
    from cluster.runtime import ensure_ray

    specs, backbone_spec, options = specs_from_preset(exp, preset)
    ensure_ray(address)
    result = embed_on_ray(exp.embeddings, specs, backbone_spec, overwrite=overwrite, progress=progress, **options)
    manifest = emb.read_manifest(exp.embeddings)
    exp.record_stage("embed", path="embeddings", backbone=backbone_spec.to_dict(),
                     checkpoint_sha256=manifest["checkpoint_sha256"], dim=result["dim"], dtype=result["dtype"],
                     rows={k: v["rows"] for k, v in result["splits"].items()},
                     computed_shards={k: v["computed"] for k, v in result["splits"].items()},
                     shards_per_worker=result["workers"], requeued_shards=result["requeued"],
                     settings=options, seconds=result["seconds"])
    return {"rows": sum(v["rows"] for v in result["splits"].values()), "dim": result["dim"],
            "computed_shards": sum(v["computed"] for v in result["splits"].values()),
            "written": str(exp.embeddings), "images_per_s": result["images_per_s"]}
