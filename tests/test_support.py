"""The support stage: real Fashion-MNIST, real Parquet, on a real local Ray and in-process;
resume after a crashed driver, retry of a failed training, refusal of changed settings."""

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from attribution import retrain
from attribution.artifacts import SettingsChanged, read_dataset, stored_settings, write_table
from attribution.bisection import BisectionSearch, Trial
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.retraining import PartLog
from attribution.settings import SettingsError
from attribution.stages import StageInputMissing, parse_settings, stage_class
from attribution.stages.support import (TRAININGS_SCHEMA, SearchScheduler, SearchTask, SupportStage,
                                        read_trainings)
from attribution.workqueue import InProcessRuntime, QueueWorker, WorkFailed
from tests.faults import FaultyRuntime, SimulatedCrash

ray = pytest.importorskip("ray")

TRAIN_PER_CLASS = 30  # 300 real training images: each training takes a few hundredths of a second
KEY = ["target_id", "method", "mode", "k", "seed"]


def preset(**support):
    section = {"model": "mlp", "epochs": 2, "seeds": 5, "budget": 3, "top_k": TRAIN_PER_CLASS, "ensemble": 3,
               "actors": 2, "flush_every": 4, "flush_seconds": 5.0, "speculate": True}
    section.update(support)
    return {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS},
            "support": section}


def support_stage(exp, preset, runtime, **options) -> SupportStage:
    return SupportStage(exp, parse_settings(preset), runtime, progress=False, **options)


# What tests/faults.py matches failures on (ensemble items have no training key). A
# lambda: Ray pickles it by value (workers cannot import this test module by name).
training_key = lambda item: tuple(item.get(name) for name in KEY)  # noqa: E731


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
        write_table(table, exp.rankings / f"{method}.parquet")


def new_exp(path, setting):
    train, targets, labels, _, _ = setting
    exp = Experiment(path).create()
    write_rankings(exp, train, targets, labels)
    return exp


@pytest.fixture(scope="module")
def clean(ray_runtime, setting, tmp_path_factory):
    _, targets, _, _, _ = setting
    exp = new_exp(tmp_path_factory.mktemp("clean"), setting)
    summary = support_stage(exp, preset(targets=targets.tolist()), ray_runtime)()
    return exp, summary


def supports(exp):
    return pd.read_parquet(exp.support).set_index(["target_id", "method", "mode"])["support"].sort_index()


# ----------------------------------------------------------------------------- on Ray


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
    assert len(log) == table["trainings"].sum() == summary["trainings"] == summary["trained_this_run"]
    assert set(log.columns) == set(TRAININGS_SCHEMA.names)
    assert (log["attempt"] == 0).all() and (log["recipe"] == summary["recipe"]).all()
    assert log["worker"].str.contains(":").all()  # host:pid(@node) of the worker that trained it
    # early decision: fewer than the fixed schedule on the same path
    assert summary["trainings"] < summary["reference_trainings"]
    # every search's support is consistent with its logged votes: flipped at the support
    for row in table.itertuples():
        votes = log[(log.target_id == row.target_id) & (log.method == row.method) & (log["mode"] == row.mode)
                    & (log.k == row.support)]
        assert len(votes) and votes["correct"].mean() <= 0.5 or row.support == TRAIN_PER_CLASS
    # both tables store their settings; the manifest records the stage
    assert stored_settings(exp.support)["support"]["targets"] == targets.tolist()
    assert stored_settings(exp.root / "support_targets.parquet")["support"]["ensemble"] == 3
    entry = exp.manifest()["support"]
    assert entry["outputs"] == ["trainings/", "support_targets.parquet", "support.parquet"]
    assert entry["settings"]["budget"] == 3 and entry["trainings"] == summary["trainings"]
    assert summary["retried"] == summary["requeued"] == 0


def test_resume_after_crashed_driver_and_retry_of_failed_training(ray_runtime, clean, setting, tmp_path):
    """Run A "crashes" after 30 items; run B hits a failing training with retries off and
    stops with a clear error; run C retries it and finishes. Nothing finished is ever
    trained again, and the supports equal the clean run's."""
    _, targets, _, _, _ = setting
    exp = new_exp(tmp_path / "resume", setting)
    config = preset(targets=targets.tolist())
    with pytest.raises(SimulatedCrash):
        support_stage(exp, config, FaultyRuntime(ray_runtime, crash_after=30))()
    first = read_trainings(exp.trainings)
    assert 0 < len(first) <= 30  # the 3 ensemble models were items too; what was in flight is lost
    assert not exp.support.exists()
    # a training every run must do (seed 0 at a search's final support) not yet in the log
    table = pd.read_parquet(clean[0].support)
    done = set(map(tuple, first[KEY].itertuples(index=False)))
    candidates = [(int(r.target_id), r.method, r.mode, int(r.support), 0) for r in table.itertuples()
                  if r.support < TRAIN_PER_CLASS]
    key = next(k for k in candidates if k not in done)
    failing = FaultyRuntime(ray_runtime, fail_first=[key], key=training_key)
    with pytest.raises(WorkFailed, match="rerun the same command"):
        support_stage(exp, dict(config, support=dict(config["support"], max_retries=0)), failing)()
    second = read_trainings(exp.trainings)
    assert len(second) >= len(first) and key not in set(map(tuple, second[KEY].itertuples(index=False)))
    summary = support_stage(exp, config, FaultyRuntime(ray_runtime, fail_first=[key], key=training_key))()
    assert summary["retried"] == 1
    log = read_dataset(exp.trainings).to_pandas()
    assert not log.duplicated(KEY).any(), "a finished training was repeated"
    assert summary["trained_this_run"] == len(log) - len(second)
    retried = log.set_index(KEY).loc[key]
    assert int(retried["attempt"]) == 1
    pd.testing.assert_series_equal(supports(exp), supports(clean[0]))


def test_changed_settings_are_refused_unless_forced(clean, setting, tmp_path):
    """support.parquet and support_targets.parquet keep their settings: another setting
    that would replace them is refused naming the key; --force replaces them. Runs that
    need no training need no runtime at all."""
    _, targets, _, good, _ = setting
    exp = Experiment(tmp_path / "copy")
    shutil.copytree(clean[0].root, exp.root)
    before = pd.read_parquet(exp.support)
    config = preset(targets=targets.tolist())
    # the same settings: everything is in the log, nothing is trained, the table is the same
    summary = support_stage(exp, config, None)()
    assert summary["trained_this_run"] == 0 and summary["trainings"] == clean[1]["trainings"]
    pd.testing.assert_frame_equal(pd.read_parquet(exp.support), before)
    # scheduling settings are not results: they never refuse
    support_stage(exp, preset(targets=targets.tolist(), actors=1, speculate=False, queue_depth=1), None)()
    one = [int(good[0])]
    with pytest.raises(SettingsChanged, match=r"support\.targets: \[.*\] -> \[.*\]\)\. Rerun with --force") as error:
        support_stage(exp, preset(targets=one), None)()
    assert str(exp.support) in str(error.value)
    with pytest.raises(SettingsChanged, match="support.ensemble: 3 -> 4"):
        support_stage(exp, preset(targets=targets.tolist(), ensemble=4), None)()
    pd.testing.assert_frame_equal(pd.read_parquet(exp.support), before)  # nothing was replaced
    # forced: the screening of the targets and their trainings are reused, the table replaced
    summary = support_stage(exp, preset(targets=one), None, force=True)()
    table = pd.read_parquet(exp.support)
    assert set(table["target_id"]) == set(one) and len(table) == 4 and summary["trained_this_run"] == 0
    assert stored_settings(exp.support)["support"]["targets"] == one
    pd.testing.assert_series_equal(supports(exp), supports(clean[0]).loc[one])
    support_stage(exp, preset(targets=one), None)()  # now the stored settings
    # support_targets.parquet on its own: another recipe is refused there too
    exp.support.unlink()
    with pytest.raises(SettingsChanged, match=r"support_targets\.parquet .*support\.epochs: 2 -> 3"):
        support_stage(exp, preset(targets=one, epochs=3), None)()


def test_in_process_runtime_gives_the_ray_supports(clean, setting, tmp_path):
    """One in-process worker (no Ray): the same trainings, hence the same supports."""
    _, _, _, good, _ = setting
    exp = new_exp(tmp_path / "inprocess", setting)
    summary = support_stage(exp, preset(targets=[int(good[1])], methods=["l2"], modes=["removal"]),
                            InProcessRuntime())()
    assert summary["searches"] == 1 and summary["trained_this_run"] == summary["trainings"]
    pd.testing.assert_series_equal(supports(exp), supports(clean[0]).loc[[(int(good[1]), "l2", "removal")]])
    log = read_trainings(exp.trainings)
    ray_log = read_trainings(clean[0].trainings).set_index(KEY)
    same = ray_log.loc[[tuple(k) for k in log[KEY].itertuples(index=False)]]
    np.testing.assert_array_equal(log["correct"].to_numpy(), same["correct"].to_numpy())
    np.testing.assert_array_equal(log["margin"].to_numpy(), same["margin"].to_numpy())


# ----------------------------------------------------------------------------- in-process


def test_items_remove_or_relabel_the_ranked_prefix():
    ranked = np.array([7, 3, 9, 1], dtype=np.int64)
    for mode in ("removal", "mislabel"):
        task = SearchTask(5, "m", mode, ranked, 4, BisectionSearch(4, mode=mode))
        item = task.item(Trial(3, 2), base_seed=0)
        assert item["kind"] == "train" and item["torch_seed"] == retrain.training_seed(0, 2)
        assert (item["target_id"], item["method"], item["mode"], item["k"], item["seed"]) == (5, "m", mode, 3, 2)
        if mode == "removal":
            assert item["removed_ids"].tolist() == [7, 3, 9] and "relabel_ids" not in item
        else:
            assert item["relabel_ids"].tolist() == [7, 3, 9] and item["relabel_to"] == 4


class ThresholdWorker(QueueWorker):
    """A real worker of a rule known in advance: the target flips once k >= flip_at[target]."""

    def __init__(self, flip_at):
        self.flip_at, self.items = flip_at, []

    def __call__(self, item):
        self.items.append(item)
        correct = item["k"] < self.flip_at[item["target_id"]]
        return {"correct": correct, "margin": 1.0 if correct else -1.0, "seconds": 0.5}


def test_scheduler_resumes_from_known_outcomes_and_never_repeats_them(tmp_path):
    flip_at = {1: 7, 2: 100}
    ranked = np.arange(20, dtype=np.int64)

    def tasks():
        return [SearchTask(t, "m", "removal", ranked, 0, BisectionSearch(20, 8, 5, 1, True, "removal", key=t))
                for t in flip_at]

    runtime = InProcessRuntime()
    first = SearchScheduler(tasks(), base_seed=0, recipe="r", log=PartLog(tmp_path, TRAININGS_SCHEMA))
    first.run(runtime.queue(None, ThresholdWorker, flip_at))
    first.log.flush()
    assert [t.search.support for t in first.tasks] == [7, -1]  # target 2 never flips within the limit
    log = read_trainings(tmp_path, "r")
    assert len(log) == len(first.trained) == sum(t.search.trainings for t in first.tasks)
    assert (log["attempt"] == 0).all() and not log["speculative"].any()
    assert log["seconds"].sum() == pytest.approx(sum(t.seconds for t in first.tasks))
    # half of the log known in advance: only the other half is trained again
    known = log.iloc[:len(log) // 2]
    second = SearchScheduler(tasks(), base_seed=0, recipe="r")
    assert second.resume(known) == len(known)
    queue = runtime.queue(None, ThresholdWorker, flip_at)
    second.run(queue)
    trained = [training_key(item) for item in queue.worker.items]
    assert set(trained).isdisjoint(map(tuple, known[KEY].itertuples(index=False)))
    assert len(trained) == len(log) - len(known)
    assert [t.search.support for t in second.tasks] == [7, -1]
    # everything known: nothing is submitted
    third = SearchScheduler(tasks(), base_seed=0, recipe="r")
    third.resume(log)
    assert not third.active
    third.run(runtime.queue(None, ThresholdWorker, flip_at))
    assert third.trained == []


def test_trainings_of_other_recipes_are_ignored_not_refused(tmp_path):
    log = PartLog(tmp_path, TRAININGS_SCHEMA)
    row = {"target_id": 1, "method": "m", "mode": "removal", "k": 3, "seed": 0, "correct": True, "margin": 0.5,
           "seconds": 0.1, "attempt": 0, "worker": "w", "speculative": False, "finished_at": 0.0}
    log.add(dict(row, recipe="a"))
    log.add(dict(row, recipe="b", correct=False))
    log.add(dict(row, recipe="a", seed=1))
    log.add(dict(row, recipe="a", margin=9.0))  # a duplicate key: the first row wins
    log.flush()
    frame = read_trainings(tmp_path, "a")
    assert len(frame) == 2 and set(frame["recipe"]) == {"a"} and frame["correct"].all()
    assert frame.set_index("seed").loc[0, "margin"] == 0.5
    assert len(read_trainings(tmp_path, "b")) == 1 and len(read_trainings(tmp_path)) == 2
    empty = read_trainings(tmp_path / "none", "a")
    assert len(empty) == 0 and list(empty.columns) == TRAININGS_SCHEMA.names


def test_settings_errors_name_the_key():
    for support, message in [({"seedz": 3}, r"unknown \[support\] setting\(s\) \['seedz'\]"),
                             ({"modes": ["delete"]}, r"support\.modes\[0\] must be one of"),
                             ({"seeds": 0}, r"support\.seeds must be >= 1"),
                             ({"budget": -1}, r"support\.budget must be >= 0"),
                             ({"targets": 0}, r"support\.targets must be an integer >= 1"),
                             ({"targets": "some"}, r"support\.targets must be an integer or a list"),
                             ({"methods": ["nope"]}, r"support\.methods must name registered methods"),
                             ({"model": "vgg"}, r"support\.model .*unknown model/recipe 'vgg'"),
                             ({"flush_seconds": 0}, r"support\.flush_seconds must be > 0")]:
        with pytest.raises(SettingsError, match=message):
            parse_settings({"support": support})
    settings = parse_settings({"seed": 4, "support": {"model": "cnn", "epochs": 1}})["support"]
    assert settings.seed == 4 and settings.recipe().train_config("cpu").epochs == 1
    assert settings.modes == ("removal", "mislabel") and settings.methods == ()


def test_stage_declares_its_artifacts_and_flags():
    assert stage_class("support") is SupportStage
    assert SupportStage.reads == ("rankings",)
    assert SupportStage.writes == ("trainings", "support_targets", "support")
    assert [(f.name, f.option) for f in SupportStage.flags] == [("--force", "force")]


def test_inputs_are_checked_before_any_training(setting, tmp_path):
    exp = Experiment(tmp_path / "empty").create()
    with pytest.raises(StageInputMissing, match="rank stage"):
        support_stage(exp, preset(), None)()
    # rankings made on another training subset: refused before any worker starts
    exp = new_exp(tmp_path / "other", setting)
    with pytest.raises(ValueError, match="another training subset"):
        support_stage(exp, dict(preset(), data={"dataset": "fashion-mnist", "train_per_class": 10}), None)()
    with pytest.raises(ValueError, match=r"methods \['esvm'\] are not in"):
        support_stage(exp, preset(methods=["esvm"]), None)()
    assert not exp.trainings.exists() and not exp.support.exists()
