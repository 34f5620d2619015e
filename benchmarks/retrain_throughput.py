"""Retraining throughput: the support stage's worker pool vs one plain process, same models.

    python -m benchmarks.retrain_throughput [--targets 2] [--epochs 5]

1. The support stage runs real support searches (quickstart data, pixel rankings, local
   Ray with one single-threaded worker per core); the time its searches' trainings take
   after the workers are up is measured (from the first training submitted to the last
   one returned), and the trainings it did are read from EXP/trainings.
2. One plain process (torch's default thread count) then trains exactly those models
   (same removals, relabels and seeds) one after another.
Reported: trainings per minute of each, and their ratio (goal >= 1.5x on 2 cores).
Ray start-up (ray.init and worker start) is reported separately: it is paid once per
stage, not per training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from attribution import retrain
from attribution.artifacts import read_dataset, write_json
from attribution.experiment import Experiment
from attribution.presets import load_preset
from attribution.workqueue import DelegatingQueue, Runtime, WorkQueue
from benchmarks.search_savings import quickstart_train, write_pixel_rankings


class TimedRuntime(Runtime):
    """A runtime whose queues record how long the workers took to start (the queue
    returns once every worker is up) and the span of the searches' trainings."""

    def __init__(self, inner: Runtime):
        self.inner, self.timing = inner, {}

    def device(self, request):
        return self.inner.device(request)

    def resources(self):
        return self.inner.resources()

    def queue(self, request, worker, *args, **kwargs):
        start = time.perf_counter()
        queue = self.inner.queue(request, worker, *args, **kwargs)
        self.timing["actor_start_s"] = time.perf_counter() - start
        return TimedQueue(queue, self.timing)


class TimedQueue(DelegatingQueue):
    """Records when the first training was submitted and the last one finished."""

    def __init__(self, inner: WorkQueue, timing: dict):
        super().__init__(inner)
        self.timing = timing

    def submit(self, item):
        if item.get("kind") == "train":
            self.timing.setdefault("first_training", time.perf_counter())
        self.inner.submit(item)

    def next(self, timeout=None):
        done = self.inner.next(timeout)
        if done is not None and done.item.get("kind") == "train":
            self.timing["last_training"] = time.perf_counter()
        return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--plain-threads", type=int, default=0,
                        help="torch threads of the plain process (0: torch's default, i.e. one per core)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import pandas as pd

    from attribution.retraining import training_arrays
    from attribution.stages import parse_settings
    from attribution.stages.support import SupportStage, load_rankings
    from cluster.runtime import RayRuntime

    preset = load_preset("quickstart")
    preset["support"] = dict(preset["support"], targets=args.targets, epochs=args.epochs, budget=args.budget,
                             methods=[], modes=["removal", "mislabel"])
    train = quickstart_train(preset)
    exp = Experiment(Path(tempfile.mkdtemp(prefix="throughput-"))).create()
    write_pixel_rankings(exp, train, args.targets, ("l2", "random"))

    ray_runtime = RayRuntime()
    t0 = time.perf_counter()
    ray_runtime.connect()
    ray_init = time.perf_counter() - t0
    runtime = TimedRuntime(ray_runtime)
    settings = parse_settings(preset)
    SupportStage(exp, settings, runtime)()
    timing = runtime.timing
    run_s = timing["last_training"] - timing["first_training"]
    log = read_dataset(exp.trainings).to_pandas()
    n = len(log)

    # The same trainings in one plain process, one after another (default torch threads).
    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    support = settings["support"]
    rankings, _ = load_rankings(exp.rankings)
    flip = pd.read_parquet(exp.path("support_targets")).set_index("target_id")["flip_class"]
    arrays = training_arrays(train)
    trainer = retrain.Retrainer(support.recipe().train_config(), arrays["images"], arrays["labels"], arrays["ids"],
                                arrays["mean"], arrays["std"], arrays["num_classes"])
    start = time.perf_counter()
    for row in log.itertuples(index=False):
        changed = rankings[(int(row.target_id), row.method)][:int(row.k)]
        seed = retrain.training_seed(support.seed, int(row.seed))
        if row.mode == "removal":
            trainer.train(removed_ids=changed, seed=seed)
        else:
            trainer.train(relabel_ids=changed, relabel_to=int(flip.loc[int(row.target_id)]), seed=seed)
    plain_s = time.perf_counter() - start

    figures = {
        "trainings": n, "epochs": args.epochs, "torch_threads_plain": torch.get_num_threads(),
        "scheduler_run_s": round(run_s, 1), "plain_s": round(plain_s, 1),
        "scheduler_per_min": round(60 * n / run_s, 1), "plain_per_min": round(60 * n / plain_s, 1),
        "speedup": round(plain_s / run_s, 2),
        "ray_init_s": round(ray_init, 1), "actor_start_s": round(timing["actor_start_s"], 1),
        "mean_training_s_in_workers": round(float(log["seconds"].mean()), 3),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        write_json(args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
