"""Retraining throughput: today's pool (one model per item) vs batched pools, same trainings,
one run; and the parity of batched training with one-at-a-time training.

    python -m benchmarks.retrain_throughput [--targets 2] [--epochs 8] [--width 128] [--group 16] [--parity 20]
        [--json OUT]       (epochs, width: the quickstart's [support] recipe by default)

Throughput (side by side, same machine, same run):
1. The support stage runs real support searches (quickstart data, pixel rankings, local
   Ray with one single-threaded worker per core) with today's recipe and pool (module
   engine, one model per queue item); the span from its first training submitted to its
   last returned is timed, and its trainings are read from EXP/trainings.
2. Exactly those trainings (same removals, relabels, seeds) are replayed, all submitted
   at once, through pools of the same size: today's (module engine, one model per item)
   and batched ones (the stacked engine, ``--group`` models per item, fp32 and bf16).
   Each pool trains one warm-up group per worker first, so worker start-up is not timed.
3. One plain process trains them one after another (module engine).
4. With ``--stage-batched``, the support stage runs again with the stacked bf16 recipe
   and ``models_per_worker = --group`` (its searches, hence its trainings, are its own).
Reported: trainings per minute of each and the ratio to today's pool.

Parity (``--parity N``, 0 to skip): N full-data models (seed indices 0..N-1) per
variant, test accuracy on the 1,000 quickstart test images (mean +- sd) and seed noise
(the fraction of test images some seeds classify correctly and others not): the MLP
one at a time (module fp32, today) vs stacked fp32 / bf16 trained ``--group`` at a time;
with ``--parity-cnn``, the CNN module fp32 vs module bf16 (the CNN has no stacked engine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attribution import retrain
from attribution.artifacts import read_dataset, write_json
from attribution.experiment import Experiment
from attribution.presets import load_preset
from attribution.workqueue import DelegatingQueue, Runtime, WorkQueue
from benchmarks.search_savings import quickstart_train, write_pixel_rankings


class TimedRuntime(Runtime):
    """A runtime whose queues record the span of the searches' trainings."""

    def __init__(self, inner: Runtime):
        self.inner, self.timing = inner, {}

    def device(self, request):
        return self.inner.device(request)

    def resources(self):
        return self.inner.resources()

    def queue(self, request, worker, *args, **kwargs):
        return TimedQueue(self.inner.queue(request, worker, *args, **kwargs), self.timing)


class TimedQueue(DelegatingQueue):
    """Records when the first training was submitted and the last one finished (groups
    of a BatchingQueue are timed as their items)."""

    def __init__(self, inner: WorkQueue, timing: dict):
        super().__init__(inner)
        self.timing = timing

    def submit(self, item):
        if _trainings(item):
            self.timing.setdefault("first_training", time.perf_counter())
        self.inner.submit(item)

    def next(self, timeout=None):
        done = self.inner.next(timeout)
        if done is not None and _trainings(done.item):
            self.timing["last_training"] = time.perf_counter()
        return done


def _trainings(item) -> bool:
    """Whether a queue item (or group) holds searches' trainings."""
    from attribution.workqueue import Group

    items = item.items if isinstance(item, Group) else (item,)
    return any(isinstance(i, dict) and i.get("kind") == "train" for i in items)


def run_support(exp: Experiment, preset: dict, runtime: Runtime) -> tuple[float, int]:
    """(seconds of the searches' trainings, trainings logged) of one support stage run."""
    from attribution.stages import parse_settings
    from attribution.stages.support import SupportStage

    timed = TimedRuntime(runtime)
    SupportStage(exp, parse_settings(preset), timed)()
    return timed.timing["last_training"] - timed.timing["first_training"], len(read_dataset(exp.trainings))


def replay_items(exp: Experiment, settings) -> tuple[list[dict], np.ndarray]:
    """The trainings of ``exp``'s log as queue items, and the targets they evaluate."""
    import pandas as pd

    from attribution.stages.support import load_rankings

    support = settings["support"]
    rankings, _ = load_rankings(exp.rankings)
    flip = pd.read_parquet(exp.path("support_targets")).set_index("target_id")["flip_class"]
    items = []
    for row in read_dataset(exp.trainings).to_pandas().itertuples(index=False):
        changed = rankings[(int(row.target_id), row.method)][:int(row.k)]
        item = {"kind": "train", "target_id": int(row.target_id), "method": row.method, "mode": row.mode,
                "k": int(row.k), "seed": int(row.seed), "torch_seed": retrain.training_seed(support.seed, int(row.seed))}
        if row.mode == "removal":
            item["removed_ids"] = changed
        else:
            item["relabel_ids"], item["relabel_to"] = changed, int(flip.loc[int(row.target_id)])
        items.append(item)
    return items, np.unique([item["target_id"] for item in items])


def replay(runtime, pool, config, train: dict, targets: dict, items: list[dict], group: int) -> float:
    """Seconds the pool takes for ``items`` (submitted at once), after a warm-up group per worker."""
    request = pool.pool_request(config.model)
    queue = pool.open_queue(runtime, request, config, train, targets,
                            key=lambda item: (item["target_id"], item["method"], item["k"], item["seed"]))
    try:
        warm = items[:max(1, queue.size) * group]
        for _ in queue.map(warm):
            pass
        start = time.perf_counter()
        count = sum(1 for _ in queue.map(items))
        assert count == len(items), (count, len(items))
        return time.perf_counter() - start
    finally:
        queue.close()


def throughput(args) -> dict:
    from dataclasses import replace

    from attribution.retraining import RetrainPoolSettings, target_arrays, training_arrays
    from attribution.stages import parse_settings
    from cluster.runtime import RayRuntime

    preset = load_preset("quickstart")
    # "today": the preset's recipe trained the way it was before batching (module engine,
    # fp32, one model per queue item)
    preset["support"] = dict(preset["support"], targets=args.targets, budget=args.budget, methods=[],
                             modes=["removal", "mislabel"], models_per_worker=1, engine="module", precision="fp32",
                             **({"epochs": args.epochs} if args.epochs else {}),
                             **({"width": args.width} if args.width else {}))
    train_set = quickstart_train(preset)
    exp = Experiment(Path(tempfile.mkdtemp(prefix="throughput-"))).create()
    write_pixel_rankings(exp, train_set, args.targets, ("l2", "random"))
    runtime = RayRuntime()
    t0 = time.perf_counter()
    runtime.connect()
    figures = {"ray_init_s": round(time.perf_counter() - t0, 1), "group": args.group,
               "recipe": parse_settings(preset)["support"].recipe().train_config().to_dict()}

    stage_s, n = run_support(exp, preset, runtime)
    figures["stage_today"] = {"trainings": n, "seconds": round(stage_s, 1), "per_min": round(60 * n / stage_s, 1)}

    settings = parse_settings(preset)
    items, target_ids = replay_items(exp, settings)
    train = training_arrays(train_set)
    targets = target_arrays(settings["data"].load("test", subset=False), target_ids)
    base = settings["support"].recipe().train_config()
    variants = {"pool_today": (replace(base), 1),
                "pool_stacked_fp32": (replace(base, engine="stacked"), args.group),
                "pool_stacked_bf16": (replace(base, engine="stacked", precision="bf16"), args.group)}
    for name, (config, group) in variants.items():
        pool = RetrainPoolSettings(models_per_worker=group, actors=0)
        seconds = replay(runtime, pool, config, train, targets, items, group)
        figures[name] = {"trainings": len(items), "seconds": round(seconds, 1), "per_min": round(60 * len(items) / seconds, 1),
                         "models_per_item": group, "engine": config.engine, "precision": config.precision}

    # the same trainings in one plain process, one after another (module engine)
    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    trainer = retrain.Retrainer(base, train["images"], train["labels"], train["ids"], train["mean"], train["std"],
                                train["num_classes"])
    start = time.perf_counter()
    for item in items:
        trainer.train(item.get("removed_ids", ()), item.get("relabel_ids", ()), item.get("relabel_to"),
                      item["torch_seed"])
    plain_s = time.perf_counter() - start
    figures["plain_process"] = {"trainings": len(items), "seconds": round(plain_s, 1),
                                "per_min": round(60 * len(items) / plain_s, 1), "torch_threads": torch.get_num_threads()}

    if args.stage_batched:
        batched = dict(preset)
        batched["support"] = dict(preset["support"], engine="stacked", precision="bf16", models_per_worker=args.group)
        exp2 = Experiment(Path(tempfile.mkdtemp(prefix="throughput-batched-"))).create()
        write_pixel_rankings(exp2, train_set, args.targets, ("l2", "random"))
        seconds, count = run_support(exp2, batched, runtime)
        figures["stage_stacked_bf16"] = {"trainings": count, "seconds": round(seconds, 1),
                                         "per_min": round(60 * count / seconds, 1), "models_per_item": args.group}

    today = figures["pool_today"]["per_min"]
    for name, entry in figures.items():
        if isinstance(entry, dict) and "per_min" in entry:
            entry["ratio_to_pool_today"] = round(entry["per_min"] / today, 2)
    return figures


def seed_noise(correct: np.ndarray) -> float:
    """Fraction of test images some models classify correctly and others not ((models, images) bool)."""
    return float(np.mean(correct.any(0) & ~correct.all(0)))


def parity(args) -> dict:
    from dataclasses import replace

    from attribution.batched_retrain import Change

    torch.set_num_threads(1)
    preset = load_preset("quickstart")
    from attribution.settings import DataSettings

    data = DataSettings.from_preset(preset)
    train_set, test_set = data.load("train"), data.load("test")
    test_x = test_set.images(np.arange(len(test_set)))
    seeds = [retrain.training_seed(0, i) for i in range(args.parity)]
    support = load_preset("quickstart")["support"]
    mlp = retrain.make_config("mlp", epochs=args.epochs or support.get("epochs"),
                              width=args.width or support.get("width"))
    variants = {"mlp module fp32 (today)": (mlp, 1)}
    variants["mlp stacked fp32"] = (replace(variants["mlp module fp32 (today)"][0], engine="stacked"), args.group)
    variants["mlp stacked bf16"] = (replace(variants["mlp stacked fp32"][0], precision="bf16"), args.group)
    if args.parity_cnn:
        cnn = retrain.make_config("cnn")
        variants["cnn module fp32 (today)"] = (cnn, 1)
        variants["cnn module bf16"] = (replace(cnn, precision="bf16"), 1)
    rows = {}
    for name, (config, group) in variants.items():
        trainer = retrain.Retrainer.from_imageset(config, train_set)
        start = time.perf_counter()
        models = []
        for i in range(0, len(seeds), group):
            models += trainer.train_many([Change(seed=s) for s in seeds[i:i + group]])
        seconds = time.perf_counter() - start
        correct = np.stack([trainer.logits(m, test_x).argmax(1) == test_set.labels for m in models])
        accuracy = correct.mean(1)
        rows[name] = {"models": len(models), "accuracy_mean": round(float(accuracy.mean()), 4),
                      "accuracy_sd": round(float(accuracy.std(ddof=1)), 4), "seed_noise": round(seed_noise(correct), 4),
                      "s_per_model": round(seconds / len(models), 3), "models_per_call": group}
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=0, help="0: the quickstart's [support] epochs")
    parser.add_argument("--width", type=int, default=0, help="the MLP's hidden units; 0: the quickstart's")
    parser.add_argument("--budget", type=int, default=5)
    parser.add_argument("--group", type=int, default=16, help="models per item of the batched pools")
    parser.add_argument("--plain-threads", type=int, default=0,
                        help="torch threads of the plain process (0: torch's default, i.e. one per core)")
    parser.add_argument("--stage-batched", action="store_true",
                        help="also run the support stage with the stacked bf16 recipe and --group models per item")
    parser.add_argument("--parity", type=int, default=20, help="seeds per variant of the parity part (0: skip)")
    parser.add_argument("--parity-cnn", action="store_true", help="parity of the CNN too (module fp32 vs bf16)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", "--out", dest="json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    figures = {}
    if not args.skip_throughput:
        figures["throughput"] = throughput(args)
        print(f"{'throughput':28s} {'trainings':>9s} {'seconds':>8s} {'per min':>8s} {'ratio':>6s}")
        for name, entry in figures["throughput"].items():
            if isinstance(entry, dict) and "per_min" in entry:
                print(f"{name:28s} {entry['trainings']:9d} {entry['seconds']:8.1f} {entry['per_min']:8.1f} "
                      f"{entry['ratio_to_pool_today']:6.2f}")
    if args.parity:
        figures["parity"] = parity(args)
        print(f"\n{'parity (full-data models)':28s} {'models':>6s} {'accuracy':>16s} {'seed noise':>10s} {'s/model':>8s}")
        for name, row in figures["parity"].items():
            print(f"{name:28s} {row['models']:6d} {row['accuracy_mean']:9.4f} +- {row['accuracy_sd']:.4f} "
                  f"{row['seed_noise']:10.4f} {row['s_per_model']:8.3f}")
    if args.json:
        write_json(args.json, figures)
    else:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
