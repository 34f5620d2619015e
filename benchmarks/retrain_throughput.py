"""Retraining throughput: the Ray support scheduler vs one plain process, same models.

    python -m benchmarks.retrain_throughput [--targets 2] [--epochs 5]

1. The scheduler runs real support searches (quickstart data, pixel rankings, local
   Ray with one single-threaded actor per core); its stage wall time after the
   actors are up is measured, and the trainings it did are read from EXP/trainings.
2. One plain process (torch's default thread count) then trains exactly those models
   (same removals, relabels and seeds) one after another.
Reported: trainings per minute of each, and their ratio (goal >= 1.5x on 2 cores).
Ray start-up (ray.init and actor start) is reported separately: it is paid once per
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
from attribution.experiment import Experiment, read_dataset
from attribution.presets import load_preset
from benchmarks.search_savings import quickstart_train, write_pixel_rankings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--plain-threads", type=int, default=0,
                        help="torch threads of the plain process (0: torch's default, i.e. one per core)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import cluster.support as cs
    from cluster.runtime import ensure_ray

    preset = load_preset("quickstart")
    preset["support"] = dict(preset["support"], targets=args.targets, epochs=args.epochs, budget=args.budget,
                             methods=[], modes=["removal", "mislabel"])
    train = quickstart_train(preset)
    exp = Experiment(Path(tempfile.mkdtemp(prefix="throughput-"))).create()
    write_pixel_rankings(exp, train, args.targets, ("l2", "random"))

    t0 = time.perf_counter()
    ensure_ray(None)
    ray_init = time.perf_counter() - t0
    # Time the scheduler's run() alone (actors already up), by wrapping it.
    timing = {}
    original_run, original_pool = cs.SupportScheduler.run, cs.SupportScheduler._pool

    def timed_pool(self):
        start = time.perf_counter()
        out = original_pool(self)
        timing["actor_start_s"] = time.perf_counter() - start
        return out

    def timed_run(self, tasks):
        start = time.perf_counter()
        out = original_run(self, tasks)
        timing["run_s"] = time.perf_counter() - start
        timing["tasks"] = tasks
        return out

    cs.SupportScheduler.run, cs.SupportScheduler._pool = timed_run, timed_pool
    try:
        cs.run_support_stage(exp, preset, None)
    finally:
        cs.SupportScheduler.run, cs.SupportScheduler._pool = original_run, original_pool
    log = read_dataset(exp.trainings).to_pandas()
    n = len(log)
    tasks = {t.key: t for t in timing["tasks"]}

    # The same trainings in one plain process, one after another (default torch threads).
    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    settings = cs.SupportSettings.from_preset(preset)
    config = settings.train_config()
    arrays = cs._data_arrays(train)
    trainer = retrain.Retrainer(config, arrays["images"], arrays["labels"], arrays["ids"], arrays["mean"],
                                arrays["std"], arrays["num_classes"])
    start = time.perf_counter()
    for row in log.itertuples(index=False):
        task = tasks[(int(row.target_id), row.method, row.mode)]
        changed = task.ranked_ids[:int(row.k)]
        seed = retrain.training_seed(settings.seed, int(row.seed))
        if row.mode == "removal":
            trainer.train(removed_ids=changed, seed=seed)
        else:
            trainer.train(relabel_ids=changed, relabel_to=task.flip_class, seed=seed)
    plain_s = time.perf_counter() - start

    figures = {
        "trainings": n, "epochs": args.epochs, "torch_threads_plain": torch.get_num_threads(),
        "scheduler_run_s": round(timing["run_s"], 1), "plain_s": round(plain_s, 1),
        "scheduler_per_min": round(60 * n / timing["run_s"], 1), "plain_per_min": round(60 * n / plain_s, 1),
        "speedup": round(plain_s / timing["run_s"], 2),
        "ray_init_s": round(ray_init, 1), "actor_start_s": round(timing["actor_start_s"], 1),
        "mean_training_s_in_workers": round(float(log["seconds"].mean()), 3),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
