"""The gradient stage on real Fashion-MNIST images: the trajectory, score blocks, rankings, resume."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from attribution import retrain
from attribution.artifacts import SettingsChanged
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.ranking import RANKING_SCHEMA
from attribution.scores import ScoreStore
from attribution.stages import StageInputMissing, parse_settings
from attribution.stages.gradient import GradientSettings, GradientStage
from conftest import write_rank_rankings

pytest.importorskip("dattri")

TRAIN_PER_CLASS = 30


@pytest.fixture(scope="module")
def fmnist():
    return (load_dataset("fashion-mnist", "train", n_per_class=TRAIN_PER_CLASS, seed=0),
            load_dataset("fashion-mnist", "test", n_per_class=5, seed=0))


def preset(**gradient):
    section = {"methods": ["grad-dot", "tracin"], "checkpoints": 2}
    section.update(gradient)
    return {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS},
            "support": {"model": "mlp", "epochs": 3, "engine": "stacked", "precision": "bf16"},
            "rank": {"top_k": TRAIN_PER_CLASS}, "gradient": section}


def stage(exp, force=False, **gradient):
    return GradientStage(exp, parse_settings(preset(**gradient)), progress=False, force=force)


def test_gradient_stage_scores_ranks_and_resumes(fmnist, tmp_path):
    train, test = fmnist
    exp = Experiment(tmp_path / "exp").create()
    positions = np.array([0, 1, 7, 12, 30])
    write_rank_rankings(exp, train, test, positions)
    summary = stage(exp)()
    classes = sorted({int(c) for c in test.labels[positions]})
    for method in ("grad-dot", "tracin"):
        files = sorted(p.name for p in exp.rankings.glob(f"{method}-class*.parquet"))
        assert files == [f"{method}-class{c:03d}.parquet" for c in classes]
        assert all(pq.read_schema(exp.rankings / f).remove_metadata() == RANKING_SCHEMA for f in files)
    assert summary["computed_files"] == 2 * len(classes)
    # the trajectory: epochs 2 and 3 of one training (module engine, fp32), the last the final model
    kept = sorted(p.name for p in (exp.path("gradient") / "checkpoints").glob("*.pt"))
    assert kept == ["epoch-002.pt", "epoch-003.pt"]
    settings = parse_settings(preset())
    config = settings["support"].recipe().train_config()
    config = type(config)(**{**config.to_dict(), "engine": "module", "precision": "fp32"})
    trainer = retrain.Retrainer(config, train.images(np.arange(len(train))), train.labels, train.ids, train.mean,
                                train.std, 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        final = trainer.train(seed=retrain.training_seed(0, 0)).state_dict()
    finally:
        torch.set_num_threads(threads)
    stored = torch.load(exp.path("gradient") / "checkpoints" / "epoch-003.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], stored[k]) for k in final)  # the hook left the training as it is
    # the blocks: every training image scored, signed, finite; Grad-Dot differs from TracInCP
    store = ScoreStore(exp.path("scores"))
    dot = store.read("grad-dot", f"class{classes[0]:03d}")
    tracin = store.read("tracin", f"class{classes[0]:03d}")
    assert dot.values.shape[1] == len(train) and np.isfinite(dot.values).all()
    assert (dot.values < 0).any() and (dot.values > 0).any()
    assert not np.allclose(dot.values, tracin.values)
    manifest = exp.manifest()["gradient"]
    assert set(manifest["method_seconds"]) == {"grad-dot", "tracin"} and manifest["epochs"] == [2, 3]
    # resume: nothing to do; other settings refused, --force recomputes
    assert stage(exp)()["computed_files"] == 0
    with pytest.raises(SettingsChanged):
        stage(exp, checkpoints=3)()
    assert stage(exp, force=True, checkpoints=3)()["computed_files"] == len(classes)  # tracin only


def test_gradient_settings_are_validated_by_name():
    with pytest.raises(Exception, match="gradient.methods"):
        parse_settings(preset(methods=["grad-dot", "nope"]))
    assert GradientSettings(checkpoints=4).kept_epochs(8) == [2, 4, 6, 8]
    assert GradientSettings(checkpoints=3).kept_epochs(2) == [1, 2]


# ----------------------------------------------------------------------------- the further stage


def further_preset(**further):
    section = {"left_out": 12, "targets": 3, "seeds": 2, "epochs": 2, "block": 5, "lr": 1e-2, "loo_seeds": 2}
    section.update(further)
    return {**preset(methods=["grad-dot"]), "further": section}


def test_further_stage_writes_the_gold_standard_and_resumes_per_item(fmnist, tmp_path):
    """The gold scores: (epoch, target, left-out image) rows equal to a direct
    FurtherTrainer computation; a driver killed after 2 of 6 items keeps them and the
    rerun runs the other 4."""
    import pandas as pd

    from attribution.further_training import FurtherTrainer
    from attribution.stages.further import FurtherStage
    from attribution.workqueue import InProcessRuntime
    from faults import FaultyRuntime, SimulatedCrash

    train, test = fmnist
    exp = Experiment(tmp_path / "exp").create()
    write_rank_rankings(exp, train, test, np.array([0, 1, 7, 12, 30]))
    settings = parse_settings(further_preset())
    with pytest.raises(StageInputMissing, match="attribution gradient"):
        FurtherStage(exp, settings, InProcessRuntime(), progress=False)()
    GradientStage(exp, settings, progress=False)()
    with pytest.raises(SimulatedCrash):
        FurtherStage(exp, settings, FaultyRuntime(InProcessRuntime(), crash_after=2), progress=False)()
    assert not (exp.path("further") / "gold.parquet").exists()
    summary = FurtherStage(exp, settings, InProcessRuntime(), progress=False)()
    assert summary["items"] == 2 * 3 and summary["computed"] == 4  # 12 left out in blocks of 5: 3 per seed
    gold = pd.read_parquet(exp.path("further") / "gold.parquet")
    assert len(gold) == 2 * 3 * 12 and set(gold["epoch"]) == {1, 2}
    assert np.isfinite(gold["gold"]).all() and (gold["gold"] != 0).any() and np.isfinite(gold["gold_se"]).all()
    # one entry by hand: the mean over both seeds of (left-out run - full run) of that target
    row = gold[(gold["epoch"] == 2)].iloc[5]
    state = torch.load(exp.path("gradient") / "checkpoints" / "epoch-003.pt", weights_only=True)["state_dict"]
    x = retrain.to_tensor(train.images(np.arange(len(train))), train.mean, train.std)
    t = int(np.flatnonzero(test.ids == row["target_id"])[0])
    tx = retrain.to_tensor(test.images([t]), train.mean, train.std)
    trainer = FurtherTrainer(lambda: retrain.build_model("mlp", 10, (28, 28, 1)), state, x, train.labels, tx,
                             test.labels[[t]], lr=1e-2, epochs=2, batch_size=128)
    position = int(np.flatnonzero(train.ids == row["train_id"])[0])
    expected = np.mean([trainer.run(s, position)[1, 0] - trainer.run(s)[1, 0] for s in (0, 1)])
    np.testing.assert_allclose(row["gold"], expected, rtol=1e-9, atol=1e-15)
    # leave-one-out retraining from scratch: 2 seeds x (12 left out + the full set)
    loo = pd.read_parquet(exp.path("further") / "loo.parquet")
    assert len(loo) == 3 * 12 and np.isfinite(loo["loo"]).all() and (loo["loo"] != 0).any()
    assert exp.manifest()["further"]["loo_trainings"] == 2 * 13
    assert FurtherStage(exp, settings, InProcessRuntime(), progress=False)()["computed"] == 0
    with pytest.raises(SettingsChanged):
        FurtherStage(exp, parse_settings(further_preset(lr=2e-2)), InProcessRuntime(), progress=False)()
