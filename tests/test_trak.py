"""The TRAK baseline: real traker 0.3.2, real Fashion-MNIST images, real Parquet; no Ray needed."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from attribution import retrain
from attribution.baselines.trak import TrakScorer, train_checkpoints
from attribution.data import load_dataset
from attribution.experiment import Experiment, write_table_atomic
from attribution.ranking import RANKING_SCHEMA

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
        states, trained = train_checkpoints(trainer, tmp_path / f"ck{t}", 3, base_seed=t, recipe="test",
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


def test_save_dir_is_fresh_and_guarded(fmnist, tmp_path):
    """fit deletes its own traker folder (stale features never reused) but no foreign folder."""
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
    from cluster.support import RetrainWorker

    train, test = fmnist
    config = retrain.make_config("mlp", epochs=2)
    trainer = retrain.Retrainer.from_imageset(config, train)
    states, trained = train_checkpoints(trainer, tmp_path / "ck", 2, base_seed=7, recipe="r1", progress=False)
    assert trained == 2 and sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model-000.pt", "model-001.pt"]
    threads = torch.get_num_threads()
    try:
        arrays = {"images": train.images(np.arange(len(train))), "labels": train.labels, "ids": train.ids,
                  "mean": train.mean, "std": train.std, "num_classes": 10}
        targets = {"images": test.images(np.arange(10)), "labels": test.labels[:10], "ids": test.ids[:10]}
        worker = RetrainWorker(config.to_dict(), arrays, targets, threads=1)
        for index, state in enumerate(states):
            expected = worker.ensemble_member(retrain.training_seed(7, index))
            model = mlp()
            model.load_state_dict(state)
            np.testing.assert_array_equal(worker.trainer.logits(model.eval(), worker.target_x), expected)
    finally:
        torch.set_num_threads(threads)
    again, trained = train_checkpoints(trainer, tmp_path / "ck", 2, base_seed=7, recipe="r1", progress=False)
    assert trained == 0 and all(torch.equal(again[0][k], states[0][k]) for k in states[0])
    _, trained = train_checkpoints(trainer, tmp_path / "ck", 2, base_seed=7, recipe="r2", progress=False)
    assert trained == 2  # another recipe fingerprint: retrained


# ----------------------------------------------------------------------------- the stage


def stage_preset(**trak):
    section = {"checkpoints": 2, "proj_dim": 64, "batch_size": 100}
    section.update(trak)
    return {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS},
            "support": {"model": "mlp", "epochs": 2}, "rank": {"top_k": TRAIN_PER_CLASS}, "trak": section}


def write_rank_rankings(exp, train, test, target_positions):
    """An l2 (pixel distance) same-class ranking per target, as the rank stage writes it."""
    x = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float32)
    for label in np.unique(test.labels[target_positions]):
        rows = []
        for p in target_positions[test.labels[target_positions] == label]:
            same = np.flatnonzero(train.labels == label)
            score = -np.linalg.norm(x[same] - test.images([p]).reshape(-1).astype(np.float32), axis=1)
            order = np.argsort(-score, kind="stable")
            rows.append(pd.DataFrame({"target_id": np.int64(test.ids[p]), "method": "l2",
                                      "rank": np.arange(len(order), dtype=np.int32),
                                      "train_id": train.ids[same][order].astype(np.int64),
                                      "score": score[order].astype(np.float32)}))
        table = pa.Table.from_pandas(pd.concat(rows), preserve_index=False).cast(RANKING_SCHEMA)
        write_table_atomic(table, exp.rankings / f"l2-class{int(label):03d}.parquet")


def test_trak_stage_writes_rankings_and_resumes(fmnist, tmp_path):
    from cluster.cli import main
    from cluster.trak import SETTINGS_KEY, TrakSettings, run_trak_stage

    train, test = fmnist
    exp = Experiment(tmp_path / "exp").create()
    with pytest.raises(ValueError, match="run the rank stage first"):
        run_trak_stage(exp, stage_preset(), progress=False)
    positions = np.array([0, 1, 7, 12, 30])
    write_rank_rankings(exp, train, test, positions)
    target_ids = np.sort(test.ids[positions])

    summary = run_trak_stage(exp, stage_preset(target_chunk=2), progress=False)  # 3 chunks of targets
    classes = sorted({int(c) for c in test.labels[positions]})
    files = sorted(p.name for p in exp.rankings.glob("trak-*.parquet"))
    assert files == [f"trak-class{c:03d}.parquet" for c in classes]
    assert summary["computed_files"] == len(classes) and summary["projector"] == "BasicProjector"
    frame = pd.concat([pq.read_table(exp.rankings / f).to_pandas() for f in files])
    assert all(pq.read_schema(exp.rankings / f).remove_metadata() == RANKING_SCHEMA for f in files)
    assert sorted(frame["target_id"].unique()) == target_ids.tolist() and (frame["method"] == "trak").all()
    for target, group in frame.groupby("target_id"):
        assert group["rank"].tolist() == list(range(TRAIN_PER_CLASS))  # top_k = the rank stage's
        assert (np.diff(group["score"].to_numpy()) <= 0).all() and group["train_id"].is_unique
        assert set(group["train_id"]) <= set(train.ids.tolist())
    # the stored score matrix agrees with the rankings
    chunks = sorted((exp.root / "trak" / "scores").glob("chunk-*.npz"))
    assert len(chunks) == 3
    stored = {}
    for path in chunks:
        with np.load(path) as z:
            assert z["scores"].shape == (len(train), len(z["target_ids"]))
            for j, t in enumerate(z["target_ids"]):
                stored[int(t)] = dict(zip(z["train_ids"].tolist(), z["scores"][:, j]))
    first = frame[frame["rank"] == 0].set_index("target_id")
    for t, row in first.iterrows():
        assert np.isclose(stored[t][row.train_id], row.score) and row.score == max(stored[t].values())
    manifest = exp.manifest()["trak"]
    assert manifest["projector"] == "BasicProjector" and manifest["checkpoints"] == 2 and manifest["seconds"] > 0
    assert len(list((exp.root / "trak" / "checkpoints").glob("model-*.pt"))) == 2

    # rerun through the CLI: nothing recomputed (the features folder is not even touched)
    preset_path = tmp_path / "tiny.toml"
    preset_path.write_text(toml(stage_preset(target_chunk=2)))
    features_mtime = (exp.root / "trak" / "features").stat().st_mtime_ns
    assert main(["trak", "--exp", str(exp.root), "--preset", str(preset_path)]) == 0
    assert exp.manifest()["trak"]["reused"] is True and exp.manifest()["trak"]["computed_files"] == []
    assert exp.manifest()["trak"]["seconds"] == manifest["seconds"]  # the original compute time is kept
    assert (exp.root / "trak" / "features").stat().st_mtime_ns == features_mtime

    # changed settings: refused, naming the difference; force recomputes
    with pytest.raises(ValueError, match=r"proj_dim: 64 -> 32"):
        run_trak_stage(exp, stage_preset(proj_dim=32), progress=False)
    summary = run_trak_stage(exp, stage_preset(proj_dim=32, same_class=True), force=True, progress=False)
    assert summary["computed_files"] == len(classes) and summary["trained_checkpoints"] == 0  # same recipe
    frame = pd.concat([pq.read_table(p).to_pandas() for p in exp.rankings.glob("trak-*.parquet")])
    label_of = dict(zip(train.ids.tolist(), train.labels.tolist()))
    target_label = dict(zip(test.ids.tolist(), test.labels.tolist()))
    assert all(label_of[i] == target_label[t] for t, i in zip(frame["target_id"], frame["train_id"]))
    meta = json.loads(pq.read_schema(next(exp.rankings.glob("trak-*.parquet"))).metadata[SETTINGS_KEY])
    assert meta["proj_dim"] == 32 and meta["same_class"] is True

    with pytest.raises(ValueError, match=r"unknown \[trak\] setting\(s\) \['bogus'\]"):
        TrakSettings.from_preset(stage_preset(bogus=1))
    with pytest.raises(ValueError, match="trak.checkpoints must be an integer >= 1"):
        TrakSettings.from_preset(stage_preset(checkpoints=0))


def toml(preset: dict) -> str:
    lines = [f'name = "{preset["name"]}"', f'seed = {preset["seed"]}']
    for section in ("data", "support", "rank", "trak"):
        lines.append(f"[{section}]")
        for key, value in preset[section].items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"
