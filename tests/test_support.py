"""The support stage: real Fashion-MNIST, real Parquet, on a real local Ray and in-process;
resume after a crashed driver, retry of a failed training, refusal of changed settings,
no outcome reused after the rankings changed, small training sets."""

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from attribution import retrain
from attribution.artifacts import SettingsChanged, ids_digest, read_dataset, stored_settings, write_table
from attribution.bisection import BisectionSearch, Trial
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.retraining import PartLog, RetrainWorker, target_arrays, training_arrays
from attribution.settings import SettingsError
from attribution.stages import StageInputMissing, parse_settings, stage_class
from attribution.stages.support import (TRAINING_KEY, TRAININGS_SCHEMA, SearchScheduler, SearchTask, SupportStage,
                                        deterministic, failure_message, item_name, read_trainings,
                                        searched_targets)
from attribution.workqueue import InProcessRuntime, QueueWorker, WorkFailed
from faults import FaultyRuntime, SimulatedCrash

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


def write_rankings(exp, train, targets, labels, random_seed=0):
    """l2 (pixel distance) and random same-class rankings, as the rank stage writes them
    (``random_seed``: another seed of the random method, i.e. other rankings for it)."""
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
                seed = [int(target), random_seed] if random_seed else int(target)
                score = np.random.default_rng(seed).random(len(same))
            order = np.argsort(-score, kind="stable")
            rows.append(pd.DataFrame({"target_id": np.int64(target), "method": method,
                                      "rank": np.arange(len(order), dtype=np.int32),
                                      "train_id": train.ids[same][order].astype(np.int64),
                                      "score": score[order].astype(np.float32)}))
        table = pa.Table.from_pandas(pd.concat(rows), preserve_index=False)
        write_table(table, exp.rankings / f"{method}.parquet")


def new_exp(path, setting, random_seed=0):
    train, targets, labels, _, _ = setting
    exp = Experiment(path).create()
    write_rankings(exp, train, targets, labels, random_seed)
    return exp


@pytest.fixture(scope="module")
def clean(ray_runtime, setting, tmp_path_factory):
    _, targets, _, _, _ = setting
    exp = new_exp(tmp_path_factory.mktemp("clean"), setting)
    summary = support_stage(exp, preset(targets=targets.tolist()), ray_runtime)()
    return exp, summary


def supports(exp):
    return pd.read_parquet(exp.support).set_index(["target_id", "method", "mode"])["support"].sort_index()


def training_keys(log) -> set:
    """The full training keys of a log (a null relabel class as -1: NaN never equals itself)."""
    frame = log[TRAINING_KEY].fillna({"relabel_to": -1}).astype({"relabel_to": int})
    return set(map(tuple, frame.itertuples(index=False)))


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


def test_recomputed_rankings_are_never_answered_from_old_trainings(clean, setting, tmp_path):
    """The random method is ranked again with another seed (as `rank --overwrite` would
    recompute it): support refuses to replace its table without --force; forced, it
    retrains every trial whose ranked prefix changed although the log holds an outcome
    for the same (target, method, mode, k, seed), reuses the trials whose changed set is
    the same (all of l2's, and each search's first test at k = the whole class), and
    reaches exactly the supports of a fresh run on the new rankings."""
    train, targets, labels, _, _ = setting
    exp = Experiment(tmp_path / "reranked")
    shutil.copytree(clean[0].root, exp.root)
    old, before = read_trainings(exp.trainings), pd.read_parquet(exp.support)
    write_rankings(exp, train, targets, labels, random_seed=1)
    config = preset(targets=targets.tolist(), speculate=False)  # required trainings only: a deterministic set
    with pytest.raises(SettingsChanged, match=r"rankings\.random: '[0-9a-f]+' -> '[0-9a-f]+'.*--force"):
        support_stage(exp, config, None)()
    pd.testing.assert_frame_equal(pd.read_parquet(exp.support), before)  # refused: nothing replaced
    summary = support_stage(exp, config, InProcessRuntime(), force=True)()
    log = read_trainings(exp.trainings)
    old_keys = training_keys(old)
    new_keys = training_keys(log) - old_keys
    assert summary["trained_this_run"] == len(new_keys) == len(log) - len(old) > 0  # nothing trained twice
    # what the searches on the new rankings need: a fresh experiment's log
    fresh = new_exp(tmp_path / "fresh", setting, random_seed=1)
    support_stage(fresh, dict(config, support=dict(config["support"], methods=["random"])), InProcessRuntime())()
    needed = training_keys(read_trainings(fresh.trainings))
    assert new_keys == needed - old_keys  # every changed prefix retrained, nothing else
    assert {key[1] for key in new_keys} == {"random"}  # l2's rankings are the same: all of it reused
    reused = needed & old_keys
    assert reused and {key[3] for key in reused} == {TRAIN_PER_CLASS}  # the same set of ids: the same training
    # the old key (target, method, mode, k, seed) had an outcome for these: trained on the old prefix
    assert sum(key[:5] in {old_key[:5] for old_key in old_keys} for key in new_keys) >= len(new_keys) // 2
    got = supports(exp)
    pd.testing.assert_series_equal(got.xs("random", level="method"), supports(fresh).xs("random", level="method"))
    pd.testing.assert_series_equal(got.xs("l2", level="method"), supports(clean[0]).xs("l2", level="method"))
    stored, earlier = stored_settings(exp.support)["rankings"], stored_settings(clean[0].support)["rankings"]
    assert stored["l2"] == earlier["l2"] and stored["random"] != earlier["random"]
    support_stage(exp, config, None)()  # the new rankings are now the stored ones: accepted, nothing to train


def test_a_deterministic_training_error_fails_without_suggesting_retries(ray_runtime, setting):
    """Removing every training image fails the same way on every attempt: the worker's
    error is a NotRetried (on Ray too, through the task error), and the stage's message
    says to fix the input, not to raise max_retries; other failures still suggest it."""
    from attribution.workqueue import PoolRequest

    train, targets, _, _, _ = setting
    test = load_dataset("fashion-mnist", "test")
    args = (retrain.make_config("mlp", epochs=1, device="cpu").to_dict(), training_arrays(train),
            target_arrays(test, targets[:1]))
    item = {"kind": "train", "target_id": int(targets[0]), "method": "l2", "mode": "removal", "k": len(train),
            "seed": 0, "removed_ids": train.ids, "torch_seed": 0}
    for runtime in (InProcessRuntime(), ray_runtime):
        with runtime.queue(PoolRequest("retrain", actors=1, model="mlp"), RetrainWorker, *args, max_retries=1,
                           key=item_name) as queue:
            queue.submit(item)
            with pytest.raises(WorkFailed, match=f"every one of the {len(train)} training images was removed") as error:
                while queue.next(timeout=60) is None:
                    pass
            assert queue.retried == 0  # failed at once: another attempt would fail the same way
        assert deterministic(error.value), type(error.value.__cause__)
        message = failure_message(error.value, "EXP/trainings")
        assert "fails the same way on every attempt" in message and "max_retries" not in message
    try:
        raise WorkFailed("training (1, 'l2', 'removal', 3, 0) failed 3 times; last error: OSError: disk full") \
            from OSError("disk full")
    except WorkFailed as transient:
        assert not deterministic(transient)
        assert "raise support.max_retries" in failure_message(transient, "EXP/trainings")


def test_top_k_at_the_training_set_size_caps_removal_below_it(setting, tmp_path, capsys):
    """A ranking of every training image and support.top_k = the training-set size n: the
    removal search tests at most n - 1 images (removing all n leaves nothing to train on),
    says so, and records it as the limit; mislabel may relabel all n. Nothing fails and
    nothing is retried; a larger top_k gives the same searches."""
    train, _, _, good, _ = setting
    n, target = len(train), int(good[0])
    exp = Experiment(tmp_path / "small").create()
    order = np.random.default_rng(5).permutation(n)
    write_table(pa.table({"target_id": np.full(n, target, np.int64), "method": ["random"] * n,
                          "rank": np.arange(n, dtype=np.int32), "train_id": train.ids[order].astype(np.int64),
                          "score": np.linspace(1, 0, n, dtype=np.float32)}), exp.rankings / "random.parquet")
    summary = support_stage(exp, preset(targets=[target], top_k=n, budget=2), InProcessRuntime())()
    assert f"removal searches test at most k = {n - 1}" in capsys.readouterr().err
    table = pd.read_parquet(exp.support).set_index("mode")
    assert table.loc["removal", "limit"] == n - 1 and table.loc["mislabel", "limit"] == n
    assert summary["limit_capped"] == 1 and summary["retried"] == 0 and summary["searches"] == 2
    log = read_trainings(exp.trainings)
    assert log.groupby("mode")["k"].max().to_dict() == {"removal": n - 1, "mislabel": n}
    first = supports(exp)
    again = support_stage(exp, preset(targets=[target], top_k=10 * n, budget=2), InProcessRuntime(), force=True)()
    assert again["trained_this_run"] == 0 and again["limit_capped"] == 1
    pd.testing.assert_series_equal(supports(exp), first)


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
            assert task.relabel_to is None
        else:
            assert item["relabel_ids"].tolist() == [7, 3, 9] and item["relabel_to"] == 4 == task.relabel_to
        # the change a logged training answers for: the set of ids changed (order is irrelevant to a training)
        assert item["change"] == task.change(3) == ids_digest([3, 7, 9])
        reordered = SearchTask(5, "m", mode, np.array([9, 7, 3, 1]), 4, BisectionSearch(4, mode=mode))
        other = SearchTask(5, "m", mode, np.array([7, 3, 1, 9]), 4, BisectionSearch(4, mode=mode))
        assert reordered.change(3) == task.change(3) != other.change(3)
        assert other.change(4) == task.change(4)  # the whole ranking: the same set


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


def test_rows_of_another_prefix_relabel_class_or_an_older_log_answer_nothing(tmp_path):
    """A logged training answers a search only for the same set of changed ids and the
    same relabel class; rows of a log written before those columns existed answer
    nothing, and a log mixing both kinds of parts keeps the new columns."""
    ranked = np.arange(20, dtype=np.int64)

    def tasks(order=ranked, flip=0):
        return [SearchTask(1, "m", mode, order, flip, BisectionSearch(20, 8, 5, 1, True, mode, key=mode))
                for mode in ("removal", "mislabel")]

    first = SearchScheduler(tasks(), base_seed=0, recipe="r", log=PartLog(tmp_path / "log", TRAININGS_SCHEMA))
    first.run(InProcessRuntime().queue(None, ThresholdWorker, {1: 7}))
    first.log.flush()
    log = read_trainings(tmp_path / "log", "r")
    assert log["change"].notna().all() and log.loc[log["mode"] == "removal", "relabel_to"].isna().all()
    assert (log.loc[log["mode"] == "mislabel", "relabel_to"] == 0).all()
    assert SearchScheduler(tasks(), 0, "r").resume(log) == len(log)  # the same rankings: every row answers
    # the same ids ranked in another order: only k = 20 (every id) changes the same set
    assert SearchScheduler(tasks(ranked[::-1].copy()), 0, "r").resume(log) == int((log["k"] == 20).sum()) > 0
    # another flip class: the mislabel rows relabelled to another class, the removal rows still answer
    assert SearchScheduler(tasks(flip=3), 0, "r").resume(log) == int((log["mode"] == "removal").sum())
    # an older part (sorted first, so its schema would decide) without the columns, and a new one
    legacy = pa.schema([f for f in TRAININGS_SCHEMA if f.name not in ("change", "relabel_to")])
    write_table(pa.Table.from_pandas(log[legacy.names], schema=legacy, preserve_index=False),
                tmp_path / "mixed" / "part-0-legacy.parquet")
    newer = PartLog(tmp_path / "mixed", TRAININGS_SCHEMA)
    mislabel = log[log["mode"] == "mislabel"]
    for row in mislabel.to_dict("records"):
        newer.add(dict(row, relabel_to=int(row["relabel_to"])))
    newer.flush()
    mixed = read_trainings(tmp_path / "mixed", "r")
    assert len(mixed) == len(log) + len(mislabel) and mixed["change"].isna().sum() == len(log)
    assert SearchScheduler(tasks(), 0, "r").resume(mixed) == len(mislabel)


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


def test_searched_targets_meet_the_count_in_a_seeded_order():
    """A number of targets is met from the correctly classified ones (the others are
    skipped, not counted), the draw is seeded, and asking for more only adds targets."""
    ids = np.arange(100, 130)
    status = np.where(ids % 3 == 0, "misclassified", np.where(ids % 7 == 0, "unstable", "searched"))
    screening = pd.DataFrame({"target_id": ids, "status": status})
    eligible = set(ids[status == "searched"].tolist())
    ten = searched_targets(screening, 10, seed=3)
    assert len(ten) == 10 and set(ten.tolist()) <= eligible and list(ten) == sorted(ten)
    assert np.array_equal(ten, searched_targets(screening, 10, seed=3))
    assert not np.array_equal(ten, searched_targets(screening, 10, seed=4))
    assert set(ten.tolist()) <= set(searched_targets(screening, 15, seed=3).tolist())
    assert set(searched_targets(screening, 1000, seed=3).tolist()) == eligible  # fewer exist: all of them
    listed = searched_targets(screening, (101, 102, 105), seed=3)  # a list: the correctly classified ones
    assert listed.tolist() == [101]  # 102 and 105 are misclassified
