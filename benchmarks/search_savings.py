"""Trainings per search and wall time: early decision (+ speculation) vs the reference
fixed schedule (1 + budget x 5 seeds), at identical supports, on quickstart data.

    python -m benchmarks.search_savings [--exp EXP] [--targets 4] [--methods l2,random]

With ``--exp`` the rankings in EXP/rankings are used (e.g. a quickstart run's esvm, l2,
...); without it, pixel-space l2 and seeded random same-class rankings are written to a
temporary experiment (same format as the rank stage). Both schedules run for real on a
local Ray (each in its own experiment directory, so nothing is shared between them),
and the supports must match exactly. The reference run's log is also replayed: early
decision's exact count, and the perfect-foresight bound (every step decided by 3 of 5
seeds), the most any schedule with identical outcomes could save. Goal: >= 35% fewer
trainings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.artifacts import write_json, write_table
from attribution.presets import load_preset


def write_pixel_rankings(exp: Experiment, train, n_targets: int, methods=("l2", "random"), seed: int = 0) -> None:
    """Same-class rankings in pixel space (l2) and seeded random ones, in the rank stage's format."""
    test = load_dataset(train.name, "test", n_per_class=100, seed=seed)
    rng = np.random.default_rng(seed)
    targets = np.sort(rng.choice(test.ids, size=n_targets, replace=False))
    x = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float32)
    for method in methods:
        frames = []
        for target in targets:
            position = test.positions_of([target])
            label = int(test.labels[position][0])
            same = np.flatnonzero(train.labels == label)
            if method == "l2":
                score = -np.linalg.norm(x[same] - test.images(position).reshape(-1).astype(np.float32), axis=1)
            elif method == "random":
                score = np.random.default_rng([seed, int(target)]).random(len(same))
            else:
                raise ValueError(f"pixel rankings support l2 and random, not {method!r}")
            order = np.argsort(-score, kind="stable")
            frames.append(pd.DataFrame({"target_id": np.int64(target), "method": method,
                                        "rank": np.arange(len(order), dtype=np.int32),
                                        "train_id": train.ids[same][order].astype(np.int64),
                                        "score": score[order].astype(np.float32)}))
        write_table(pa.Table.from_pandas(pd.concat(frames), preserve_index=False), exp.rankings / f"{method}.parquet")


def quickstart_train(preset: dict):
    """The training subset the preset's [data] describes (what the support stage trains on)."""
    from attribution.settings import DataSettings

    return DataSettings.from_preset(preset).load("train")


def prepare(args, preset):
    work = Path(tempfile.mkdtemp(prefix="support-bench-"))
    source = work / "source"
    if args.exp:
        shutil.copytree(Path(args.exp) / "rankings", source / "rankings")
    else:
        write_pixel_rankings(Experiment(source).create(), quickstart_train(preset), args.targets,
                             tuple(args.methods.split(",")))
    return work, source


def run_variant(work: Path, source: Path, preset: dict, name: str, runtime, **support) -> tuple[dict, pd.DataFrame]:
    from attribution.stages import parse_settings
    from attribution.stages.support import SupportStage

    exp = Experiment(work / name).create()
    shutil.copytree(source / "rankings", exp.rankings)
    variant = dict(preset, support=dict(preset["support"], **support))
    start = time.perf_counter()
    summary = SupportStage(exp, parse_settings(variant), runtime)()
    summary["stage_seconds"] = round(time.perf_counter() - start, 1)
    return summary, pd.read_parquet(exp.support)


def replay_savings(reference_exp: Path, reference_table: pd.DataFrame, budget: int, seeds: int,
                   first_seeds: int) -> dict:
    """Exact trainings of early decision, and the least any seed order could spend,
    replayed from the reference run's log.

    The fixed schedule trains every seed at every k on a search's path, and early decision
    tests the same k (its votes are identical), so the reference log holds every outcome
    early decision can ask for: ``early`` is exact, not an estimate. ``foresight`` trains,
    at every step, only a deciding majority (3 of 5): what early decision would cost if it
    knew in advance which seeds agree, the bound on any saving at identical outcomes.
    """
    from attribution.bisection import BisectionSearch, run_search
    from attribution.stages.support import read_trainings

    log = read_trainings(reference_exp / "trainings")
    outcomes = {(int(r.target_id), r.method, r.mode, int(r.k), int(r.seed)): (bool(r.correct), float(r.margin))
                for r in log.itertuples()}
    early = foresight = 0
    for row in reference_table.itertuples():
        key = (int(row.target_id), row.method, row.mode)
        search = run_search(BisectionSearch(int(row.limit), budget, seeds, first_seeds, True, row.mode, key),
                            lambda k, seed: outcomes[key + (k, seed)])
        if search.support != row.support:
            raise AssertionError(f"replay of {key} gave support {search.support}, the reference run {row.support}")
        early += search.trainings
        foresight += sum(step.seeds // 2 + 1 for step in search.steps)
    return {"early": early, "foresight": foresight}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", default=None, help="experiment with rankings/ (default: pixel rankings)")
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--methods", default="l2,random")
    parser.add_argument("--budget", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    preset = load_preset("quickstart")
    preset["support"] = dict(preset.get("support", {}), targets=args.targets, budget=args.budget, epochs=args.epochs,
                             methods=[])
    work, source = prepare(args, preset)
    from cluster.runtime import RayRuntime

    runtime = RayRuntime()  # one local Ray for the three variants
    reference, ref_table = run_variant(work, source, preset, "reference", runtime, early_decision=False,
                                       speculate=False)
    s = preset["support"]
    replayed = replay_savings(work / "reference", ref_table, args.budget, s.get("seeds", 5), s.get("first_seeds", 1))
    early, early_table = run_variant(work, source, preset, "early", runtime, early_decision=True, speculate=False)
    spec, spec_table = run_variant(work, source, preset, "early_speculate", runtime, early_decision=True,
                                   speculate=True)
    key = ["target_id", "method", "mode"]
    merged = ref_table[key + ["support", "trainings"]].merge(
        early_table[key + ["support", "trainings"]], on=key, suffixes=("_ref", "_early")).merge(
        spec_table[key + ["support", "trainings"]].rename(columns={"support": "support_spec",
                                                                   "trainings": "trainings_spec"}), on=key)
    identical = bool((merged.support_ref == merged.support_early).all()
                     and (merged.support_ref == merged.support_spec).all())
    figures = {
        "searches": len(merged),
        "supports_identical": identical,
        "trainings_reference": int(merged.trainings_ref.sum()),
        "trainings_early": int(merged.trainings_early.sum()),
        "trainings_early_speculate": int(merged.trainings_spec.sum()),
        "per_search_reference": round(merged.trainings_ref.mean(), 2),
        "per_search_early": round(merged.trainings_early.mean(), 2),
        "saving_early": round(1 - merged.trainings_early.sum() / merged.trainings_ref.sum(), 3),
        # replayed from the reference log: early decision (exact) and perfect foresight (the bound)
        "replay_trainings_early": replayed["early"],
        "replay_trainings_foresight": replayed["foresight"],
        "replay_saving_foresight": round(1 - replayed["foresight"] / merged.trainings_ref.sum(), 3),
        "saving_early_speculate": round(1 - merged.trainings_spec.sum() / merged.trainings_ref.sum(), 3),
        "wall_reference_s": reference["stage_seconds"], "wall_early_s": early["stage_seconds"],
        "wall_early_speculate_s": spec["stage_seconds"],
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        write_json(args.out, figures)
    if not identical:
        print("MISMATCH: supports differ between schedules\n", merged[merged.support_ref != merged.support_early])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
