"""The support stage on a real local Ray: real Fashion-MNIST, real Parquet, resume and retry."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from attribution import retrain
from attribution.bisection import BisectionSearch, Trial
from attribution.data import load_dataset
from attribution.experiment import Experiment, read_dataset, write_table_atomic

ray = pytest.importorskip("ray")

TRAIN_PER_CLASS = 30  # 300 real training images: each training takes a few hundredths of a second
KEY = ["target_id", "method", "mode", "k", "seed"]


def preset(**support):
    section = {"model": "mlp", "epochs": 2, "seeds": 5, "budget": 3, "top_k": TRAIN_PER_CLASS, "ensemble": 3,
               "actors": 2, "flush_every": 4, "flush_seconds": 5.0, "speculate": True}
    section.update(support)
    return {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS},
            "support": section}


@pytest.fixture(scope="module")
def ray_local():
    from cluster.runtime import ensure_ray

    ensure_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def setting():
    """Training set, and targets screened in-process the way the workers will see them."""
    torch.set_num_threads(1)
    train = load_dataset("fashion-mnist", "train", n_per_class=TRAIN_PER_CLASS, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=10, seed=0)
    config = retrain.make_config("mlp", epochs=2)
    trainer = retrain.Retrainer.from_imageset(config, train)
    ens = retrain.full_data_ensemble(trainer, test.images(np.arange(len(test))), test.labels, test.ids, 3, 0)
    good = test.ids[ens.status == "searched"][:3]
    bad = test.ids[ens.status == "misclassified"][:1]
    assert len(good) == 3 and len(bad) == 1, "the test set has both kinds for this tiny model"
    targets = np.concatenate([good, bad])
    labels = dict(zip(test.ids.tolist(), test.labels.tolist()))
    return train, targets, labels, good, bad


def write_rankings(exp, train, targets, labels):
    """l2 (pixel distance) and random same-class rankings, as the rank stage writes them."""
    x = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float32)
    test = load_dataset("fashion-mnist", "test")
    for method in ("l2", "random"):
        rows = []
        for target in targets:
            same = np.flatnonzero(train.labels == labels[int(target)])
            if method == "l2":
                t = test.images(test.positions_of([target])).reshape(-1).astype(np.float32)
                score = -np.linalg.norm(x[same] - t, axis=1)
            else:
                score = np.random.default_rng(int(target)).random(len(same))
            order = np.argsort(-score, kind="stable")
            rows.append(pd.DataFrame({"target_id": np.int64(target), "method": method,
                                      "rank": np.arange(len(order), dtype=np.int32),
                                      "train_id": train.ids[same][order].astype(np.int64),
                                      "score": score[order].astype(np.float32)}))
        table = pa.Table.from_pandas(pd.concat(rows), preserve_index=False)
        write_table_atomic(table, exp.rankings / f"{method}.parquet")


def new_exp(path, setting):
    train, targets, labels, _, _ = setting
    exp = Experiment(path).create()
    write_rankings(exp, train, targets, labels)
    return exp


@pytest.fixture(scope="module")
def clean(ray_local, setting, tmp_path_factory):
    from cluster.support import run_support_stage

    _, targets, _, _, _ = setting
    exp = new_exp(tmp_path_factory.mktemp("clean"), setting)
    summary = run_support_stage(exp, preset(targets=targets.tolist()), progress=False)
    return exp, summary


def supports(exp):
    return pd.read_parquet(exp.support).set_index(["target_id", "method", "mode"])["support"].sort_index()


def test_clean_run_outputs(clean, setting):
    exp, summary = clean
    _, targets, _, good, bad = setting
    table = pd.read_parquet(exp.support)
    assert {"target_id", "method", "mode", "support", "trainings", "seconds"} <= set(table.columns)
    assert len(table) == len(good) * 2 * 2  # searched targets x methods x modes
    assert set(table["mode"]) == {"removal", "mislabel"} and set(table["method"]) == {"l2", "random"}
    # the misclassified target is reported, not searched
    screened = pd.read_parquet(exp.root / "support_targets.parquet").set_index("target_id")
    assert screened.loc[int(bad[0]), "status"] == "misclassified"
    assert int(bad[0]) not in set(table["target_id"])
    assert summary["misclassified_targets"] == 1 and summary["searched_targets"] == 3
    # removing the whole class (k = limit = class size) flips every searched target
    assert (table["support"] > 0).all() and (table["support"] <= TRAIN_PER_CLASS).all()
    log = read_dataset(exp.trainings).to_pandas()
    assert not log.duplicated(KEY).any()
    assert len(log) == table["trainings"].sum() == summary["trainings"]
    assert set(log.columns) >= {"target_id", "method", "mode", "k", "seed", "correct", "margin", "seconds"}
    # early decision: fewer than the fixed schedule on the same path
    assert summary["trainings"] < summary["reference_trainings"]
    # every search's support is consistent with its logged votes: flipped at the support
    for row in table.itertuples():
        votes = log[(log.target_id == row.target_id) & (log.method == row.method) & (log["mode"] == row.mode)
                    & (log.k == row.support)]
        assert len(votes) and votes["correct"].mean() <= 0.5 or row.support == TRAIN_PER_CLASS


def test_resume_after_killed_driver_and_retry_of_failed_training(clean, setting, tmp_path):
    """Run A is "killed" after 30 trainings; run B hits a failing training with retries off
    and stops with a clear error; run C retries it and finishes. Nothing finished is ever
    trained again, and the supports equal the clean run's."""
    from cluster.support import DriverStopped, read_trainings, run_support_stage

    _, targets, _, _, _ = setting
    exp = new_exp(tmp_path / "resume", setting)
    config = preset(targets=targets.tolist())
    with pytest.raises(DriverStopped):
        run_support_stage(exp, config, progress=False, stop_after=30)
    first = read_trainings(exp.trainings)
    assert 0 < len(first) <= 30  # what was flushed before the "kill"; the rest is lost
    # a training every run must do (seed 0 at a search's final support) not yet in the log
    table = pd.read_parquet(clean[0].support)
    done = set(map(tuple, first[KEY].itertuples(index=False)))
    candidates = [(int(r.target_id), r.method, r.mode, int(r.support), 0) for r in table.itertuples()
                  if r.support < TRAIN_PER_CLASS]
    key = next(k for k in candidates if k not in done)
    with pytest.raises(RuntimeError, match="rerun the same command"):
        run_support_stage(exp, dict(config, support=dict(config["support"], max_retries=0)), progress=False,
                          fail_once=[key])
    second = read_trainings(exp.trainings)
    summary = run_support_stage(exp, config, progress=False, fail_once=[key])
    assert summary["retried"] == 1
    log = read_dataset(exp.trainings).to_pandas()
    assert not log.duplicated(KEY).any(), "a finished training was repeated"
    assert summary["trained_this_run"] == len(log) - len(second)
    retried = log.set_index(KEY).loc[key]
    assert int(retried["attempt"]) == 1
    pd.testing.assert_series_equal(supports(exp), supports(clean[0]))


def test_jobs_remove_or_relabel_the_ranked_prefix():
    from cluster.support import SearchTask, SupportScheduler, SupportSettings

    ranked = np.array([7, 3, 9, 1], dtype=np.int64)
    scheduler = SupportScheduler({}, {}, SupportSettings(seed=0), "/nonexistent", "r")
    for mode in ("removal", "mislabel"):
        task = SearchTask(5, "m", mode, ranked, 4, BisectionSearch(4, mode=mode))
        job = scheduler._job(task, Trial(3, 2), 0, False)
        assert job["torch_seed"] == retrain.training_seed(0, 2)
        if mode == "removal":
            assert job["removed_ids"].tolist() == [7, 3, 9] and "relabel_ids" not in job
        else:
            assert job["relabel_ids"].tolist() == [7, 3, 9] and job["relabel_to"] == 4


def test_settings_errors_name_the_fix(tmp_path):
    from cluster.support import SupportSettings, load_rankings

    with pytest.raises(ValueError, match="unknown \\[support\\] keys"):
        SupportSettings.from_preset({"support": {"seedz": 3}})
    with pytest.raises(ValueError, match="modes"):
        SupportSettings.from_preset({"support": {"modes": ["delete"]}})
    with pytest.raises(FileNotFoundError, match="attribution rank"):
        load_rankings(tmp_path / "rankings")


def test_cli_parses():
    from cluster.cli import build_parser

    args = build_parser().parse_args(["support", "--exp", "x", "--set", "support.targets=3"])
    assert args.exp == "x" and args.overrides == ["support.targets=3"] and args.preset == "quickstart"
