"""The TRAK baseline: real traker 0.3.2, real Fashion-MNIST images, real Parquet; no Ray needed
(the trak stage runs in-process: it is constructed without a runtime)."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from attribution import retrain
from attribution.artifacts import SettingsChanged, stored_settings, write_table
from attribution.baselines.trak import TrakScorer, train_checkpoints
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.methods import Targets, TrainingData, available_methods, create_method, method_class
from attribution.ranking import RANKING_SCHEMA
from conftest import write_rank_rankings
from attribution.scores import ScoreStore, rank_block
from attribution.settings import SettingsError
from attribution.stages import StageInputMissing, parse_settings
from attribution.stages.trak import TrakSettings, TrakStage

pytest.importorskip("trak")

TRAIN_PER_CLASS = 30  # 300 real training images
N_PLANTED = 5
SHAPE = (28, 28, 1)


@pytest.fixture(scope="module")
def fmnist():
    train = load_dataset("fashion-mnist", "train", n_per_class=TRAIN_PER_CLASS, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=5, seed=0)
    return train, test


def mlp():
    return retrain.build_model("mlp", 10, SHAPE)


def planted_training_set(train, target_image, target_label, seed):
    """The training images plus N_PLANTED near-duplicates of the target (seeded noise, its label)."""
    rng = np.random.default_rng(seed)
    noisy = target_image[None].astype(np.float32) + rng.normal(0, 8.0, (N_PLANTED, *target_image.shape))
    planted = np.clip(noisy, 0, 255).astype(np.uint8)
    images = np.concatenate([train.images(np.arange(len(train))), planted])
    labels = np.concatenate([train.labels, np.full(N_PLANTED, target_label)]).astype(np.int64)
    ids = np.concatenate([train.ids, np.arange(N_PLANTED) + 10**7]).astype(np.int64)  # ids unused elsewhere
    return images, labels, ids


def test_planted_duplicates_rank_first(fmnist, tmp_path):
    """For 3 targets, the near-duplicates planted in the training set are TRAK's top items.

    Two epochs: on 8 targets all 5 planted images ranked 0-4. With 4 epochs the models fit
    the duplicates so well that TRAK's (1 - p) loss weighting pushed them down for one
    target (a Bag: ranks 59-64), a property of TRAK, not a bug (docs/baselines.md).
    """
    train, test = fmnist
    config = retrain.make_config("mlp", epochs=2)
    for t, position in enumerate([0, 17, 33]):  # targets of three different classes
        target_image, target_label = test.images([position])[0], int(test.labels[position])
        images, labels, ids = planted_training_set(train, target_image, target_label, seed=t)
        trainer = retrain.Retrainer(config, images, labels, ids, train.mean, train.std, 10)
        states, trained, _ = train_checkpoints(trainer, tmp_path / f"ck{t}", 3, base_seed=t, recipe="test",
                                               progress=False)
        assert trained == 3
        scorer = TrakScorer(tmp_path / f"trak{t}", proj_dim=128, batch_size=128, seed=t, progress=False)
        scorer.fit(mlp, states, trainer.x, labels)
        result = scorer.score(retrain.to_tensor(target_image[None], train.mean, train.std), [target_label])
        assert result.scores.shape == (len(ids), 1) and result.projector == "BasicProjector"
        assert result.checkpoints == 3 and result.proj_dim == 128
        order = np.lexsort((ids, -result.scores[:, 0]))
        planted = ids >= 10**7
        top5, top10 = planted[order[:5]].sum(), planted[order[:10]].sum()
        assert top5 >= 4 and top10 == N_PLANTED, (t, np.flatnonzero(planted[order])[:N_PLANTED])
        # a random ranking fails the same criterion: P(>= 4 of 5 planted in its top 5) ~ 1e-9
        rng = np.random.default_rng(t)
        assert planted[rng.permutation(len(ids))[:5]].sum() < 4


def test_the_trak_method_adapts_the_scorer(fmnist, tmp_path):
    """The registered method: a full score block (targets x every training id) equal to the
    scorer's scores; same_class marks the target's class as the candidates."""
    train, test = fmnist
    assert "trak" in available_methods("trak") and method_class("trak").stage == "trak"
    cls = method_class("trak")
    assert cls.signed and cls.inputs == ("images",)
    assert cls.cost.stages == ("trak",) and "scores/trak" in cls.cost.paths
    x = retrain.to_tensor(train.images(np.arange(len(train))), train.mean, train.std)
    torch.manual_seed(0)
    states = [mlp().state_dict()]
    targets = Targets(test.ids[:4], test.labels[:4], images=retrain.to_tensor(test.images(np.arange(4)), train.mean,
                                                                              train.std))
    expected = TrakScorer(tmp_path / "lib", proj_dim=16, seed=3, progress=False).fit(mlp, states, x, train.labels)
    expected = expected.score(targets.images, targets.labels).scores
    for same_class in (False, True):
        method = create_method("trak", proj_dim=16, seed=3, same_class=same_class, save_dir=tmp_path / "m",
                               progress=False)
        assert method.class_restricted is same_class
        assert method.settings()["projector"] == "BasicProjector" and method.settings()["same_class"] is same_class
        method.fit(TrainingData(train.ids, train.labels, images=x, extra={"model_fn": mlp, "checkpoints": states}))
        block = method.score(targets)
        assert block.method == "trak" and block.values.shape == (4, len(train))
        np.testing.assert_array_equal(block.train_ids, train.ids)
        np.testing.assert_array_equal(block.values, expected.T)
        if same_class:
            np.testing.assert_array_equal(block.candidates, targets.labels[:, None] == train.labels[None, :])
        else:
            assert block.candidates is None
    with pytest.raises(ValueError, match="model_fn"):
        create_method("trak", save_dir=tmp_path / "m").fit(TrainingData(train.ids, train.labels, images=x))
    with pytest.raises(RuntimeError, match="fit"):
        create_method("trak").score(targets)


def test_streamed_images_give_the_scores_of_the_held_tensor(fmnist, tmp_path):
    """File-backed training sets: TRAK featurizes from StreamedImages (images decoded a
    batch at a time, here through Retrainer.images_at over an ImageSet that refuses to
    hand out more than one batch) and gets exactly the scores of the in-memory tensor."""
    from attribution.baselines.trak import StreamedImages

    train, test = fmnist
    config = retrain.make_config("mlp", epochs=1)
    held = retrain.Retrainer.from_imageset(config, train)

    class OneBatchAtATime:  # an ImageSet-like source as FolderImageSet is: images(positions) from "files"
        image_shape, largest = train.image_shape, 0

        def __len__(self):
            return len(train)

        def images(self, positions):
            OneBatchAtATime.largest = max(OneBatchAtATime.largest, len(positions))
            return train.images(positions)

    streamed = retrain.Retrainer(config, OneBatchAtATime(), train.labels, train.ids, train.mean, train.std, 10)
    assert streamed.x is None
    torch.manual_seed(0)
    states = [mlp().state_dict(), mlp().state_dict()]
    target_x = retrain.to_tensor(test.images(np.arange(4)), train.mean, train.std)
    expected = TrakScorer(tmp_path / "held", proj_dim=16, batch_size=64, seed=1, progress=False).fit(
        mlp, states, held.x, train.labels).score(target_x, test.labels[:4]).scores
    images = StreamedImages(lambda p: streamed.images_at(torch.from_numpy(p)), len(train))
    got = TrakScorer(tmp_path / "streamed", proj_dim=16, batch_size=64, seed=1, progress=False).fit(
        mlp, states, images, train.labels).score(target_x, test.labels[:4]).scores
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert OneBatchAtATime.largest == 64  # never the whole set (300 images) at once
    with pytest.raises(TypeError, match="slices"):
        images[3]


def test_proj_dim_must_be_below_train_size(fmnist, tmp_path):
    train, _ = fmnist
    x = retrain.to_tensor(train.images(np.arange(len(train))), train.mean, train.std)
    scorer = TrakScorer(tmp_path / "trak", proj_dim=len(train), progress=False)
    with pytest.raises(ValueError, match=r"proj_dim=300 must be smaller than the training-set size 300"):
        scorer.fit(mlp, [mlp().state_dict()], x, train.labels)
    with pytest.raises(ValueError, match="checkpoints is empty"):
        TrakScorer(tmp_path / "trak", proj_dim=8, progress=False).fit(mlp, [], x, train.labels)
    with pytest.raises(ValueError, match="proj_dim must be at least 1"):
        TrakScorer(tmp_path / "trak", proj_dim=0)


def test_budgets_are_the_first_checkpoints_of_one_featurization(fmnist, tmp_path):
    """score_budgets(m) from 3 featurized checkpoints equals featurizing only the first m;
    the per-checkpoint seconds add up, so a smaller budget costs less."""
    train, test = fmnist
    x = retrain.to_tensor(train.images(np.arange(len(train))), train.mean, train.std)
    torch.manual_seed(0)
    states = [mlp().state_dict() for _ in range(3)]
    targets = retrain.to_tensor(test.images([0, 11, 23]), train.mean, train.std)
    target_y = test.labels[[0, 11, 23]]
    scorer = TrakScorer(tmp_path / "all", proj_dim=32, seed=1, progress=False).fit(mlp, states, x, train.labels)
    budgets = scorer.score_budgets(targets, target_y, [3, 1])
    assert sorted(budgets) == [1, 3] and [budgets[m].checkpoints for m in (1, 3)] == [1, 3]
    np.testing.assert_allclose(budgets[3].scores, scorer.score(targets, target_y).scores, rtol=1e-5, atol=1e-7)
    for m in (1, 2):
        alone = TrakScorer(tmp_path / f"m{m}", proj_dim=32, seed=1, progress=False).fit(mlp, states[:m], x,
                                                                                          train.labels)
        want = alone.score(targets, target_y).scores
        got = budgets[1].scores if m == 1 else scorer.score_budgets(targets, target_y, [2])[2].scores
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not np.allclose(budgets[1].scores, budgets[3].scores)
    assert len(scorer.featurize_model_seconds_) == 3 and all(t > 0 for t in scorer.featurize_model_seconds_)
    assert 0 < scorer.featurize_seconds_of(1) < scorer.featurize_seconds_of(3) <= scorer.featurize_seconds_ + 1e-9
    assert 0 < scorer.score_seconds_of(1) < scorer.score_seconds_of(3)
    with pytest.raises(ValueError, match="between 1 and the 3 featurized checkpoints"):
        scorer.score_budgets(targets, target_y, [4])


def test_features_are_kept_per_checkpoint_and_resume_after_an_interruption(fmnist, tmp_path):
    """A fit interrupted while featurizing its second checkpoint keeps the first; the
    rerun featurizes only the second (resuming its finished batches) and scores exactly
    as an uninterrupted fit; other settings, another identity or another checkpoint
    are featurized afresh."""
    from attribution.baselines.trak import StreamedImages

    train, _ = fmnist
    x = retrain.to_tensor(train.images(np.arange(128)), train.mean, train.std)
    y = train.labels[:128]
    torch.manual_seed(0)
    states = [mlp().state_dict(), mlp().state_dict()]
    make = lambda folder, **kw: TrakScorer(tmp_path / folder, proj_dim=8, batch_size=32, seed=3,
                                           progress=False, **kw)
    expected = make("whole").fit(mlp, states, x, y).score(x[:3], y[:3]).scores
    reads = []

    def failing(positions):  # the 7th batch read: the second checkpoint's third batch
        reads.append(len(positions))
        if len(reads) == 7:
            raise KeyboardInterrupt("the machine went away")
        return x[positions]

    with pytest.raises(KeyboardInterrupt):
        make("trak").fit(mlp, states, StreamedImages(failing, len(x)), y, identity={"recipe": "r1"})
    assert (tmp_path / "trak" / "model-000.json").exists() and not (tmp_path / "trak" / "model-001.json").exists()
    reads.clear()
    again = make("trak").fit(mlp, states, StreamedImages(failing, len(x)), y, identity={"recipe": "r1"})
    assert again.featurized_now_ == [1] and len(reads) == 2  # 2 batches were done before the interruption
    np.testing.assert_allclose(again.score(x[:3], y[:3]).scores, expected, rtol=1e-5, atol=1e-6)
    kept = make("trak").fit(mlp, states, x, y, identity={"recipe": "r1"})
    assert kept.featurized_now_ == []
    assert make("trak").fit(mlp, states, x, y, identity={"recipe": "r2"}).featurized_now_ == [0, 1]
    assert make("trak", lambda_reg=0.1).fit(mlp, states, x, y, identity={"recipe": "r2"}).featurized_now_ == [0, 1]
    other = [states[0], mlp().state_dict()]  # a different second checkpoint
    assert make("trak", lambda_reg=0.1).fit(mlp, other, x, y, identity={"recipe": "r2"}).featurized_now_ == [1]


def test_save_dir_is_fresh_and_guarded(fmnist, tmp_path):
    """fit keeps only features of the same settings and checkpoints in its own traker
    folder (stale features never reused) and refuses a foreign folder."""
    train, _ = fmnist
    x = retrain.to_tensor(train.images(np.arange(64)), train.mean, train.std)
    y = train.labels[:64]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no traker files"):
        TrakScorer(foreign, proj_dim=8, progress=False).fit(mlp, [mlp().state_dict()], x, y)
    assert (foreign / "notes.txt").exists()
    torch.manual_seed(0)
    states = [mlp().state_dict()]
    first = TrakScorer(tmp_path / "trak", proj_dim=8, progress=False).fit(mlp, states, x, y)
    s1 = first.score(x[:3], y[:3]).scores
    # a second fit in the same folder with another model: fresh features, not the stale ones
    torch.manual_seed(1)
    other = TrakScorer(tmp_path / "trak", proj_dim=8, progress=False).fit(mlp, [mlp().state_dict()], x, y)
    s2 = other.score(x[:3], y[:3]).scores
    again = TrakScorer(tmp_path / "trak", proj_dim=8, progress=False).fit(mlp, states, x, y)
    np.testing.assert_allclose(again.score(x[:3], y[:3]).scores, s1, rtol=1e-4, atol=1e-6)
    assert not np.allclose(s1, s2)


@pytest.mark.parametrize("model,n,models", [("mlp", 24, 2), ("cnn", 24, 2), ("resnet9", 8, 1)])
def test_project_models_work_with_image_classification(fmnist, tmp_path, model, n, models):
    """MLP, SmallCNN and ResNet-9 (BatchNorm, in-place ReLU) through traker's functional
    gradients (ResNet-9: 6.6M parameters, ~2 s per 8 per-example gradients here: kept tiny)."""
    train, test = fmnist
    x = retrain.to_tensor(train.images(np.arange(n)), train.mean, train.std)
    build = lambda: retrain.build_model(model, 10, SHAPE)  # noqa: E731
    torch.manual_seed(0)
    states = [build().state_dict() for _ in range(models)]
    scorer = TrakScorer(tmp_path / "trak", proj_dim=4, batch_size=8, max_projector_mb=64, progress=False)
    scorer.fit(build, states, x, train.labels[:n])
    targets = retrain.to_tensor(test.images([0, 1]), test.mean, test.std)
    scores = scorer.score(targets, test.labels[:2]).scores
    assert scores.shape == (n, 2) and np.isfinite(scores).all() and np.abs(scores).sum() > 0


def test_checkpoints_are_the_support_ensemble_models(fmnist, tmp_path):
    """Same recipe and seeds as the support stage's ensemble: identical weights, reused on rerun."""
    from attribution.retraining import RetrainWorker, target_arrays, training_arrays

    train, test = fmnist
    config = retrain.make_config("mlp", epochs=2)
    trainer = retrain.Retrainer.from_imageset(config, train)
    states, trained, seconds = train_checkpoints(trainer, tmp_path / "ck", 2, base_seed=7, recipe="r1",
                                                 progress=False)
    assert len(seconds) == 2 and all(t > 0 for t in seconds)
    assert trained == 2 and sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model-000.pt", "model-001.pt"]
    threads = torch.get_num_threads()
    try:
        worker = RetrainWorker(config.to_dict(), training_arrays(train), target_arrays(test, test.ids[:10]), threads=1)
        for index, state in enumerate(states):
            expected = worker({"kind": "ensemble", "torch_seed": retrain.training_seed(7, index)})["logits"]
            model = mlp()
            model.load_state_dict(state)
            np.testing.assert_array_equal(worker.trainer.logits(model.eval(), worker.target_x), expected)
    finally:
        torch.set_num_threads(threads)
    again, trained, stored = train_checkpoints(trainer, tmp_path / "ck", 2, base_seed=7, recipe="r1",
                                               progress=False)
    assert trained == 0 and all(torch.equal(again[0][k], states[0][k]) for k in states[0])
    assert stored == seconds  # a reused model keeps its training seconds (a budget's cost from scratch)
    _, trained, _ = train_checkpoints(trainer, tmp_path / "ck", 2, base_seed=7, recipe="r2", progress=False)
    assert trained == 2  # another recipe fingerprint: retrained


# ----------------------------------------------------------------------------- the stage


def stage_preset(**trak):
    section = {"checkpoints": 2, "proj_dim": 64, "batch_size": 100}
    section.update(trak)
    return {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS},
            "support": {"model": "mlp", "epochs": 2}, "rank": {"top_k": TRAIN_PER_CLASS}, "trak": section}


def trak_stage(exp, force=False, **trak):
    return TrakStage(exp, parse_settings(stage_preset(**trak)), progress=False, force=force)


def read_trak_rankings(exp):
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(exp.rankings.glob("trak-*.parquet"))])


def test_trak_stage_writes_scores_and_rankings_and_resumes(fmnist, tmp_path):
    train, test = fmnist
    exp = Experiment(tmp_path / "exp").create()
    assert TrakStage.name == "trak" and TrakStage.reads == ("rankings",)
    assert set(TrakStage.writes) == {"trak", "scores", "rankings"}
    assert [(f.name, f.option) for f in TrakStage.flags] == [("--force", "force")]
    with pytest.raises(StageInputMissing, match="attribution rank"):
        trak_stage(exp)()
    write_table(pa.table({"target_id": [1], "method": ["trak"], "rank": pa.array([0], pa.int32()),
                          "train_id": [2], "score": pa.array([1.0], pa.float32())}), exp.rankings / "other.parquet")
    with pytest.raises(ValueError, match="rank stage"):  # no ranking of a rank-stage method: no targets
        trak_stage(exp)()
    (exp.rankings / "other.parquet").unlink()
    positions = np.array([0, 1, 7, 12, 30])
    write_rank_rankings(exp, train, test, positions)
    target_ids = np.sort(test.ids[positions])

    summary = trak_stage(exp, target_chunk=2)()  # 3 chunks of targets
    classes = sorted({int(c) for c in test.labels[positions]})
    files = sorted(p.name for p in exp.rankings.glob("trak-*.parquet"))
    assert files == [f"trak-class{c:03d}.parquet" for c in classes]
    assert summary["computed_files"] == len(classes) and summary["projector"] == "BasicProjector"
    frame = read_trak_rankings(exp)
    assert all(pq.read_schema(exp.rankings / f).remove_metadata() == RANKING_SCHEMA for f in files)
    assert sorted(frame["target_id"].unique()) == target_ids.tolist() and (frame["method"] == "trak").all()
    for target, group in frame.groupby("target_id"):
        assert group["rank"].tolist() == list(range(TRAIN_PER_CLASS))  # top_k = the rank stage's
        assert (np.diff(group["score"].to_numpy()) <= 0).all() and group["train_id"].is_unique
        assert set(group["train_id"]) <= set(train.ids.tolist())
    # the score store holds every training image's score; the rankings are derived from it
    store = ScoreStore(exp.scores)
    assert store.block_names("trak") == [f"class{c:03d}" for c in classes]
    np.testing.assert_array_equal(store.train_ids(), np.sort(train.ids))
    for block in store.blocks("trak"):
        assert block.values.shape == (len(block.target_ids), len(train)) and block.candidates is None
        assert set(block.target_labels) == {int(test.labels[test.positions_of([block.target_ids[0]])[0]])}
        label = int(block.target_labels[0])
        ranking = pq.read_table(exp.rankings / f"trak-class{label:03d}.parquet")
        assert rank_block(block, TRAIN_PER_CLASS).equals(ranking.replace_schema_metadata(None))
        first = ranking.to_pandas().query("rank == 0")
        assert np.array_equal(first["score"].to_numpy(), block.values.max(axis=1))
    manifest = exp.manifest()["trak"]
    assert manifest["projector"] == "BasicProjector" and manifest["checkpoints"] == 2 and manifest["seconds"] > 0
    assert manifest["trained_checkpoints"] == 2 and manifest["top_k"] == TRAIN_PER_CLASS
    assert len(list((exp.root / "trak" / "checkpoints").glob("model-*.pt"))) == 2

    # rerun: nothing recomputed (the features folder is not even touched)
    features_mtime = (exp.root / "trak" / "features").stat().st_mtime_ns
    summary = trak_stage(exp, target_chunk=2)()
    assert summary["computed_files"] == 0 and summary["reused_files"] == len(classes)
    assert exp.manifest()["trak"]["reused"] is True and exp.manifest()["trak"]["computed_files"] == []
    assert exp.manifest()["trak"]["seconds"] == manifest["seconds"]  # the original compute time is kept
    assert (exp.root / "trak" / "features").stat().st_mtime_ns == features_mtime

    # changed settings: refused, naming the difference, and the advice touches only trak's files
    with pytest.raises(SettingsChanged, match=r"proj_dim: 64 -> 32") as refused:
        trak_stage(exp, proj_dim=32)()
    assert "--force" in str(refused.value) and "trak*-*.parquet" in str(refused.value)
    assert "rankings/*" not in str(refused.value) and "l2" not in str(refused.value)
    # a changed top_k only derives the rankings again from the stored scores
    with pytest.raises(SettingsChanged, match=r"top_k: 30 -> 5"):
        trak_stage(exp, top_k=5)()
    summary = trak_stage(exp, force=True, top_k=5)()
    assert summary["computed_files"] == len(classes) and "trained_checkpoints" not in summary
    assert (exp.root / "trak" / "features").stat().st_mtime_ns == features_mtime
    assert (read_trak_rankings(exp).groupby("target_id").size() == 5).all()
    # force recomputes: same recipe, so the checkpoints are reused
    summary = trak_stage(exp, force=True, proj_dim=32, same_class=True)()
    assert summary["computed_files"] == len(classes) and summary["trained_checkpoints"] == 0
    frame = read_trak_rankings(exp)
    label_of = dict(zip(train.ids.tolist(), train.labels.tolist()))
    target_label = dict(zip(test.ids.tolist(), test.labels.tolist()))
    assert all(label_of[i] == target_label[t] for t, i in zip(frame["target_id"], frame["train_id"]))
    meta = stored_settings(next(exp.rankings.glob("trak-*.parquet")))
    assert meta["proj_dim"] == 32 and meta["same_class"] is True
    block = next(store.blocks("trak"))
    np.testing.assert_array_equal(block.candidates, block.target_labels[:, None] == train.labels[None, :])

    # the rank stage's targets changed: the classes no target has are refused, force deletes them
    dropped = classes[0]
    (exp.rankings / f"l2-class{dropped:03d}.parquet").unlink()
    with pytest.raises(ValueError, match="classes no target of the rank stage has now"):
        trak_stage(exp, proj_dim=32, same_class=True)()
    trak_stage(exp, force=True, proj_dim=32, same_class=True)()
    assert not (exp.rankings / f"trak-class{dropped:03d}.parquet").exists()
    assert f"class{dropped:03d}" not in store.block_names("trak")
    assert len(list(exp.rankings.glob("l2-*.parquet"))) == len(classes) - 1  # other methods' files untouched


def test_trak_settings_are_validated_once_by_name():
    with pytest.raises(SettingsError, match=r"unknown \[trak\] setting\(s\) \['bogus'\]"):
        TrakSettings.from_preset(stage_preset(bogus=1))
    with pytest.raises(SettingsError, match="trak.checkpoints must be >= 1, got 0"):
        TrakSettings.from_preset(stage_preset(checkpoints=0))
    with pytest.raises(SettingsError, match="trak.checkpoints must be an integer >= 1, got 'abc'"):
        TrakSettings.from_preset(stage_preset(checkpoints="abc"))
    with pytest.raises(SettingsError, match="trak.lambda_reg must be >= 0"):
        TrakSettings.from_preset(stage_preset(lambda_reg=-1))
    with pytest.raises(SettingsError, match="trak.device must be"):
        TrakSettings.from_preset(stage_preset(device="tpu"))
    with pytest.raises(SettingsError, match="trak.same_class must be true or false"):
        parse_settings(stage_preset(same_class="yes"))  # refused when the whole preset is parsed
    with pytest.raises(SettingsError, match="trak.variants"):
        TrakSettings.from_preset(stage_preset(variants=["bogus"]))
    with pytest.raises(SettingsError, match="same_class = true already restricts it"):
        TrakSettings.from_preset(stage_preset(variants=["same-class"], same_class=True))
    with pytest.raises(SettingsError, match="trak.budgets"):
        TrakSettings.from_preset(stage_preset(budgets=[0, 5]))
    budgets = TrakSettings.from_preset(stage_preset(checkpoints=5, budgets=[20, 1, 5]))
    assert budgets.budget_variants() == {"trak@m1": 1, "trak": 5, "trak@m20": 20}
    assert TrakSettings.from_preset(stage_preset()).budget_variants() == {"trak": 2}
    settings = TrakSettings.from_preset({"seed": 4, "trak": {}})
    assert (settings.seed, settings.top_k, settings.target_chunk, settings.proj_dim) == (4, None, 1024, 256)
    assert settings.method_params()["seed"] == 4


def test_trak_stage_budgets_and_same_class_variant(fmnist, tmp_path):
    """budgets [1, 3] with checkpoints 2 and the same-class variant: four methods with their
    own blocks, rankings and seconds from one featurization; resumable per variant and class."""
    from attribution.methods import fill_outside

    train, test = fmnist
    exp = Experiment(tmp_path / "exp").create()
    positions = np.array([0, 7, 12])
    write_rank_rankings(exp, train, test, positions)
    classes = sorted({int(c) for c in test.labels[positions]})
    names = ["trak", "trak@m1", "trak@m3", "trak@same-class"]
    summary = trak_stage(exp, budgets=[1, 3], variants=["same-class"])()
    store = ScoreStore(exp.scores)
    assert sorted(store.methods()) == sorted(names)
    for name in names:
        assert sorted(p.name for p in exp.rankings.glob(f"{name}-class*.parquet")) == [
            f"{name}-class{c:03d}.parquet" for c in classes]
    assert summary["computed_files"] == 4 * len(classes) and summary["trained_checkpoints"] == 3
    manifest = exp.manifest()["trak"]
    assert manifest["variants"]["trak@m3"] == {"checkpoints": 3} and manifest["budgets"] == [1, 2, 3]
    seconds = manifest["method_seconds"]
    assert set(seconds) == set(names) and all(v > 0 for v in seconds.values())
    assert seconds["trak@m1"] < seconds["trak"] < seconds["trak@m3"] <= manifest["seconds"] + 0.1
    assert seconds["trak@same-class"] == seconds["trak"]  # derived from trak's scores
    label_of = dict(zip(train.ids.tolist(), train.labels.tolist()))
    for c in classes:
        trak, m1, m3 = (store.read(n, f"class{c:03d}") for n in ("trak", "trak@m1", "trak@m3"))
        assert trak.method == "trak" and m1.method == "trak@m1" and trak.candidates is None
        assert not np.allclose(trak.values, m1.values) and not np.allclose(trak.values, m3.values)
        assert stored_settings(exp.rankings / f"trak@m1-class{c:03d}.parquet")["checkpoints"] == 1
        # same-class: candidates = the target's class, outside = the row's lowest candidate score
        view = store.read("trak@same-class", f"class{c:03d}")
        np.testing.assert_array_equal(view.candidates, view.target_labels[:, None] == train.labels[None, :])
        np.testing.assert_array_equal(view.values, fill_outside(trak.values, view.candidates))
        ranking = pq.read_table(exp.rankings / f"trak@same-class-class{c:03d}.parquet").to_pandas()
        target_label = dict(zip(view.target_ids.tolist(), view.target_labels.tolist()))
        assert all(label_of[i] == target_label[t] for t, i in zip(ranking["target_id"], ranking["train_id"]))
        assert (ranking["method"] == "trak@same-class").all()
        native = pq.read_table(exp.rankings / f"trak-class{c:03d}.parquet").to_pandas()
        assert any(label_of[i] != target_label[t] for t, i in zip(native["target_id"], native["train_id"]))

    # rerun: nothing to do; the seconds of the computing run are kept
    again = trak_stage(exp, budgets=[1, 3], variants=["same-class"])()
    assert again["computed_files"] == 0 and exp.manifest()["trak"]["method_seconds"] == seconds
    # one variant's unit gone (block and ranking): only it is recomputed, from the stored checkpoints
    victim = classes[0]
    (exp.rankings / f"trak@m1-class{victim:03d}.parquet").unlink()
    store.block_path("trak@m1", f"class{victim:03d}").unlink()
    (exp.rankings / f"trak@same-class-class{victim:03d}.parquet").unlink()  # derived again from trak's block
    kept = {p.name: p.stat().st_mtime_ns for p in exp.rankings.glob("trak*.parquet")}
    redo = trak_stage(exp, budgets=[1, 3], variants=["same-class"])()
    assert redo["computed_files"] == 2 and redo["trained_checkpoints"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in exp.rankings.glob("trak*.parquet") if p.name in kept} == kept
    after = exp.manifest()["trak"]["method_seconds"]
    assert after["trak"] == seconds["trak"] and after["trak@m3"] == seconds["trak@m3"]  # not recomputed: kept
    assert 0 < after["trak@m1"] < after["trak@m3"]
    block = store.read("trak@m1", f"class{victim:03d}")
    assert stored_settings(store.block_path("trak@m1", f"class{victim:03d}"))["checkpoints"] == 1
    assert np.isfinite(block.values).all()
    # a budget the settings no longer ask for: refused, then deleted with --force
    with pytest.raises(ValueError, match="no longer ask for"):
        trak_stage(exp, budgets=[1], variants=["same-class"])()
    trak_stage(exp, force=True, budgets=[1], variants=["same-class"])()
    assert "trak@m3" not in store.methods() and not list(exp.rankings.glob("trak@m3-*.parquet"))
    assert "trak@m3" not in exp.manifest()["trak"]["method_seconds"]


# ----------------------------------------------------------------------------- the stage on a pool


def trak_blocks(exp) -> dict:
    store = ScoreStore(exp.path("scores"))
    return {p.stem: store.read("trak", p.stem) for p in sorted((exp.path("scores") / "trak").glob("class*.parquet"))}


def pooled_stage(exp, runtime, **trak):
    return TrakStage(exp, parse_settings(stage_preset(**trak)), runtime, progress=False)


def test_trak_stage_on_a_pool_scores_as_in_process_and_resumes_per_shard(fmnist, tmp_path):
    """trak.actors != 1: the checkpoints train on the pool and each one's training images
    are featurized shard_size at a time on it; the driver stores the rows and finalizes.
    The scores equal the in-process stage's; a driver killed mid-featurizing keeps every
    shard it stored, and the rerun asks the workers for the other shards only."""
    from attribution.workqueue import InProcessRuntime
    from faults import FaultyRuntime, SimulatedCrash

    train, test = fmnist
    positions = np.array([0, 1, 7, 12, 30])
    reference = Experiment(tmp_path / "reference").create()
    write_rank_rankings(reference, train, test, positions)
    trak_stage(reference)()
    expected = trak_blocks(reference)

    exp = Experiment(tmp_path / "pooled").create()
    write_rank_rankings(exp, train, test, positions)
    crashing = FaultyRuntime(InProcessRuntime(), crash_after=3)  # 300 images / 64: 5 shards per checkpoint
    with pytest.raises(SimulatedCrash):
        pooled_stage(exp, crashing, actors=2, shard_size=64)()
    assert len(list((exp.path("trak") / "checkpoints").glob("model-*.pt"))) == 2  # trained on the pool
    featured = exp.path("trak") / "features" / "work-000" / "0" / "_is_featurized.mmap"
    assert np.load(featured, mmap_mode="r").sum() == 3 * 64  # three shards stored before the crash
    asked = []

    class Counting(InProcessRuntime):
        def queue(self, request, worker, *args, **kwargs):
            assert request.kind == "trak"
            queue = super().queue(request, worker, *args, **kwargs)
            submit = queue.submit
            queue.submit = lambda item: (asked.append(item), submit(item))[1]
            return queue

    summary = pooled_stage(exp, Counting(), actors=2, shard_size=64)()
    assert summary["trained_checkpoints"] == 0
    assert sorted((it["model"], it["start"]) for it in asked) == \
        [(0, 192), (0, 256)] + [(1, start) for start in range(0, 300, 64)]
    got = trak_blocks(exp)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].values, expected[name].values, rtol=1e-4, atol=1e-6)
    assert not list((exp.path("trak") / "features").glob("work-*"))  # every checkpoint finalized and moved


def test_trak_stage_fans_out_over_ray_workers(fmnist, tmp_path, ray_runtime):
    """The same on a real local Ray: two workers, the scores of the in-process stage."""
    train, test = fmnist
    positions = np.array([0, 7, 30])
    reference = Experiment(tmp_path / "reference").create()
    write_rank_rankings(reference, train, test, positions)
    trak_stage(reference, checkpoints=1)()
    exp = Experiment(tmp_path / "ray").create()
    write_rank_rankings(exp, train, test, positions)
    pooled_stage(exp, ray_runtime, checkpoints=1, actors=2, shard_size=100)()
    expected, got = trak_blocks(reference), trak_blocks(exp)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].values, expected[name].values, rtol=1e-4, atol=1e-6)


def test_trak_pool_refuses_workers_on_another_device_than_the_driver(fmnist, tmp_path):
    from attribution.workqueue import InProcessRuntime

    train, test = fmnist
    exp = Experiment(tmp_path / "exp").create()
    write_rank_rankings(exp, train, test, np.array([0]))
    with pytest.raises(SettingsError, match="trak.actors = 0.*featurize on cuda.*--driver-gpus 1"):
        pooled_stage(exp, InProcessRuntime(device="cuda"), actors=0)()
    assert not exp.path("trak").exists() or not any(exp.path("trak").iterdir())
