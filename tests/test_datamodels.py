"""Datamodels: seeded alpha-subset masks, the l1 regression on a planted sparse model, the
order of the zeros (entry order along the l1 path), the "datamodels" method, and the stage
with real Fashion-MNIST images on a real local Ray and in-process (outputs, budgets as
prefix-model variants with their seconds, resume after a crash, retry of a failed training)."""

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from attribution import retrain
from attribution.artifacts import SettingsChanged, read_dataset, write_table
from attribution.baselines.datamodels import (
    DatamodelRegression,
    heldout_split,
    margins_from_logits,
    ranking_key,
    subset_mask,
    subset_masks,
)
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.methods import ScoreBlock, Targets, TrainingData, create_method, method_class
from attribution.retraining import Recipe
from attribution.scores import ScoreStore, rank_block
from attribution.settings import SettingsError
from attribution.stages import StageInputMissing, parse_settings
from attribution.stages.datamodels import LDS_MODEL_OFFSET, DatamodelSettings, DatamodelsStage
from attribution.workqueue import InProcessRuntime, WorkFailed
from faults import FaultyRuntime, SimulatedCrash  # tests/faults.py: the failure-injection seam

# ----------------------------------------------------------------------------- plain Python


def test_subset_masks_are_seeded_alpha_sized_and_extendable():
    masks = subset_masks(101, 40, alpha=0.3, seed=7)
    assert masks.shape == (40, 101) and masks.dtype == bool
    assert (masks.sum(axis=1) == round(0.3 * 101)).all()
    np.testing.assert_array_equal(masks, subset_masks(101, 40, alpha=0.3, seed=7))
    assert not np.array_equal(masks, subset_masks(101, 40, alpha=0.3, seed=8))
    # model m's subset depends on (seed, m) only: more models extend, an offset continues
    np.testing.assert_array_equal(subset_masks(101, 10, 0.3, 7), masks[:10])
    np.testing.assert_array_equal(subset_masks(101, 5, 0.3, 7, first_model=20), masks[20:25])
    np.testing.assert_array_equal(subset_mask(101, 0.3, 7, 33), masks[33])
    assert len({row.tobytes() for row in masks}) == 40  # distinct subsets
    # every image is drawn with probability alpha
    many = subset_masks(200, 400, alpha=0.5, seed=0)
    assert abs(many.mean() - 0.5) < 1e-12 and np.abs(many.mean(axis=0) - 0.5).max() < 0.12
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            subset_masks(100, 3, alpha=bad)
    with pytest.raises(ValueError, match="n_models"):
        subset_masks(100, -1)


def test_margins_match_evaluate_target():
    logits = np.random.default_rng(0).normal(size=(50, 10))
    labels = np.random.default_rng(1).integers(0, 10, 50)
    margins = margins_from_logits(logits, labels)
    expected = [retrain.evaluate_target(row, label)[1] for row, label in zip(logits, labels)]
    np.testing.assert_allclose(margins, expected)
    with pytest.raises(ValueError, match="labels"):
        margins_from_logits(logits, labels[:-1])


def planted(n_train=150, n_models=300, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    masks = subset_masks(n_train, n_models, 0.5, seed)
    w = np.zeros((2, n_train))
    support = [rng.choice(n_train, 5, replace=False) for _ in range(2)]
    for t in range(2):
        w[t, support[t]] = rng.uniform(1.0, 2.0, 5) * rng.choice([-1, 1], 5)
    margins = 3.0 + masks @ w.T + rng.normal(0, noise, (n_models, 2))
    return masks, margins, w, support


def test_regression_recovers_a_planted_sparse_model():
    masks, margins, w, support = planted()
    model = DatamodelRegression(n_alphas=25, eps=1e-4, heldout_fraction=0.2, patience=None, seed=0).fit(masks, margins)
    assert model.coef_.shape == (2, 150) and model.intercept_.shape == (2,)
    for t in range(2):
        top = np.argsort(-np.abs(model.coef_[t]))[:5]
        assert set(top) == set(support[t]), "the largest coefficients are the planted images"
        np.testing.assert_array_equal(np.sign(model.coef_[t, support[t]]), np.sign(w[t, support[t]]))
        mse = model.heldout_mse_path_[t]
        chosen = model.alpha_index_[t]
        # held-out selection beats both ends of the path: the all-zero model and the
        # weakest l1 (near least squares on 240 models x 150 images: overfit)
        assert 0 < chosen < len(mse) - 1
        assert mse[chosen] < mse[0] and mse[chosen] < mse[-1]
        assert model.alpha_[t] == model.alphas_[t, chosen]
    # fresh models: the datamodel predicts their margins
    fresh = subset_masks(150, 100, 0.5, seed=99)
    truth = 3.0 + fresh @ w.T
    assert model.score(fresh, truth) > 0.9
    # early stopping on the held-out error picks the same strength at a fraction of the path
    quick = DatamodelRegression(n_alphas=25, eps=1e-4, patience=3, seed=0).fit(masks, margins)
    np.testing.assert_array_equal(quick.alpha_index_, model.alpha_index_)
    assert np.isnan(quick.heldout_mse_path_[:, -1]).all()
    np.testing.assert_allclose(quick.coef_, model.coef_, atol=1e-6)


def test_regression_validates_shapes_and_split():
    masks, margins, _, _ = planted(n_train=20, n_models=30)
    reg = DatamodelRegression(seed=0)
    with pytest.raises(ValueError, match="masks must be 2-D"):
        reg.fit(masks[0], margins)
    with pytest.raises(ValueError, match="same model"):
        reg.fit(masks[:-1], margins)
    bad = margins.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reg.fit(masks, bad)
    with pytest.raises(ValueError, match="heldout_fraction"):
        DatamodelRegression(heldout_fraction=1.0).fit(masks, margins)
    with pytest.raises(ValueError, match="at least 2"):
        heldout_split(5, 0.1, 0)
    with pytest.raises(RuntimeError, match="not fitted"):
        DatamodelRegression().predict(masks)
    fit, held = heldout_split(30, 0.2, 4)
    assert len(held) == 6 and not set(fit) & set(held) and set(fit) | set(held) == set(range(30))
    np.testing.assert_array_equal(heldout_split(30, 0.2, 4)[1], held)


def test_the_datamodels_method_scores_are_the_coefficients():
    masks, margins, _, support = planted()
    cls = method_class("datamodels")
    assert cls.stage == "datamodels" and cls.signed and "scores/datamodels" in cls.cost.paths
    train_ids = np.arange(150, dtype=np.int64) * 3 + 100
    train_labels = np.arange(150) % 3
    target_ids, target_labels = np.array([7, 8]), np.array([0, 2])
    train = TrainingData(train_ids, train_labels, extra={"masks": masks, "margins": margins.astype(np.float32),
                                                         "target_ids": target_ids})
    reference = DatamodelRegression(n_alphas=25, eps=1e-4, patience=None, seed=0).fit(masks,
                                                                                     margins.astype(np.float32))
    for same_class in (False, True):
        method = create_method("datamodels", n_alphas=25, eps=1e-4, patience=None, seed=0, same_class=same_class)
        assert method.class_restricted is same_class and method.settings()["patience"] is None
        block = method.fit(train).score(Targets(target_ids[::-1], target_labels[::-1]))  # any order of targets
        assert block.method == "datamodels" and block.values.dtype == np.float32
        np.testing.assert_array_equal(block.target_ids, [8, 7])
        np.testing.assert_array_equal(block.values, reference.coef_[::-1].astype(np.float32))
        np.testing.assert_array_equal(method.summary_["alpha"], reference.alpha_)
        assert method.summary_["fit_models"] + method.summary_["heldout_models"] == 300
        if same_class:
            np.testing.assert_array_equal(block.candidates, target_labels[::-1, None] == train_labels[None, :])
        else:
            assert block.candidates is None
        ranking = rank_block(block, 5).to_pandas()
        top = ranking[ranking.target_id == 7]["train_id"].to_numpy()
        if not same_class:
            positives = [i for i in support[0] if reference.coef_[0, i] > 0]
            assert set(top[:len(positives)]) == set(train_ids[positives])  # the planted positive images first
    with pytest.raises(KeyError, match="no margins"):
        method.score(Targets([9], [0]))
    with pytest.raises(ValueError, match="masks must be"):
        create_method("datamodels").fit(TrainingData(train_ids[:10], train_labels[:10], extra=train.extra))


def graded(n_train=40, n_models=1500, noise=0.05, seed=0):
    """Planted effects: 4 large ones (the lasso keeps them at a strong penalty) and a graded
    ladder of small ones, 0.30 .. -0.30 in steps of 0.05 (the lasso leaves them at zero),
    the remaining images without effect."""
    rng = np.random.default_rng(seed)
    masks = subset_masks(n_train, n_models, 0.5, seed)
    w = np.zeros(n_train)
    large, ladder = np.arange(4), np.arange(4, 17)
    w[large] = [2.0, 1.5, -1.0, -2.5]
    w[ladder] = np.linspace(0.30, -0.30, len(ladder))
    order = rng.permutation(n_train)  # planted images at scattered ids, not in id order
    w = w[np.argsort(order)]
    margins = 1.0 + masks @ w + rng.normal(0, noise, n_models)
    return masks, margins[:, None], w


def entry_strengths(masks, margins, alphas):
    """Independent of the project: the strength at which each image first becomes non-zero
    along sklearn's l1 path of the centred problem (NaN: never within ``alphas``)."""
    from sklearn.linear_model import lasso_path

    x = masks.astype(np.float64) - masks.mean(axis=0)
    y = margins[:, 0] - margins[:, 0].mean()
    _, coefs, _ = lasso_path(x, y, alphas=alphas, max_iter=5000, tol=1e-8)
    entered = np.full(masks.shape[1], np.nan)
    for j, alpha in enumerate(alphas):  # descending
        new = np.isnan(entered) & (coefs[:, j] != 0)
        entered[new] = alpha
    return entered, np.sign(coefs[:, -1])


def test_zeros_are_ranked_by_their_signed_entry_along_the_l1_path():
    """The stated rule on a hand-made case: non-zero coefficients keep their order and values;
    the zeros sit between the positive and the negative ones, ordered by the strength at
    which they enter the path (earlier = higher if positive, lower if negative)."""
    masks, margins, w = graded()
    alpha = 0.1  # keeps the four large effects (|effect| / 4 >= 0.25), zeroes the ladder (<= 0.075)
    model = DatamodelRegression(alphas=[alpha], seed=0, tol=1e-8, max_iter=5000).fit(masks, margins)
    coef, corr = model.coef_[0], model.residual_correlation_[0]
    nonzero = np.flatnonzero(coef)
    assert set(nonzero) == set(np.flatnonzero(np.abs(w) >= 1.0)), "the strong penalty keeps the large effects"
    # the correlation is the lasso's own: x^T (y - X coef) / n on the centred refit, <= alpha at the zeros
    x = masks - masks.mean(axis=0)
    y = margins[:, 0] - margins[:, 0].mean()
    np.testing.assert_allclose(corr, x.T @ (y - x @ coef) / len(y), atol=1e-12)
    assert np.abs(corr[coef == 0]).max() <= alpha * (1 + 1e-6)
    np.testing.assert_allclose(corr[nonzero], alpha * np.sign(coef[nonzero]), atol=1e-5)  # KKT at the active set

    key = ranking_key(coef.astype(np.float32), corr.astype(np.float32))[0]
    np.testing.assert_array_equal(key[nonzero], coef.astype(np.float32)[nonzero].astype(np.float64))
    positive_min, negative_max = coef[coef > 0].min(), coef[coef < 0].max()
    assert (key[coef == 0] < positive_min).all() and (key[coef == 0] > negative_max).all()

    # the rule against sklearn's path continued below alpha: each ladder image enters in the
    # order of its key among the zeros (positives from the top, negatives from the bottom)
    ladder = np.flatnonzero((np.abs(w) > 0.01) & (np.abs(w) < 1.0))
    entered, sign = entry_strengths(masks, margins, np.geomspace(alpha, alpha * 1e-2, 200))
    assert not np.isnan(entered[ladder]).any(), "every ladder image enters the continued path"
    np.testing.assert_array_equal(sign[ladder], np.sign(w[ladder]))
    path_order = ladder[np.lexsort((ladder, -(sign[ladder] * entered[ladder])))]  # signed entry strength
    key_order = ladder[np.argsort(-key[ladder], kind="stable")]
    np.testing.assert_array_equal(key_order, path_order)
    np.testing.assert_array_equal(key_order, ladder[np.argsort(-w[ladder])])  # = the planted effects' order

    # the method's block: scores are the coefficients, the ranking follows the key; deterministic
    train_ids = np.arange(len(w), dtype=np.int64) * 7 + 3
    train = TrainingData(train_ids, np.zeros(len(w), np.int64), extra={
        "masks": masks, "margins": margins.astype(np.float32), "target_ids": np.array([5])})
    rankings = []
    for _ in range(2):
        method = create_method("datamodels", n_alphas=2, eps=0.5, seed=0)
        method.regression = lambda: DatamodelRegression(alphas=[alpha], seed=0, tol=1e-8, max_iter=5000)
        block = method.fit(train).score(Targets([5], [0]))
        np.testing.assert_array_equal(block.values[0], coef.astype(np.float32))
        rankings.append(rank_block(block, len(w)).to_pandas())
    pd.testing.assert_frame_equal(rankings[0], rankings[1])
    ranked = rankings[0]["train_id"].to_numpy()
    expected = train_ids[np.lexsort((train_ids, -key))]
    np.testing.assert_array_equal(ranked, expected)
    positives = np.sum(coef > 0)
    np.testing.assert_array_equal(ranked[:positives], train_ids[nonzero][np.argsort(-coef[nonzero])][:positives])
    np.testing.assert_array_equal(rankings[0]["score"].to_numpy()[positives:positives + 5], 0.0)  # scores untouched
    # zero_order="id": the zeros in id order instead (the plain sort)
    method = create_method("datamodels", zero_order="id")
    method.regression = lambda: DatamodelRegression(alphas=[alpha], seed=0, tol=1e-8, max_iter=5000)
    plain = rank_block(method.fit(train).score(Targets([5], [0])), len(w)).to_pandas()["train_id"].to_numpy()
    zeros = plain[positives:positives + int((coef == 0).sum())]
    np.testing.assert_array_equal(zeros, np.sort(zeros))
    assert not np.array_equal(plain, ranked)
    with pytest.raises(ValueError, match="zero_order"):
        create_method("datamodels", zero_order="ridge")


def test_ranking_key_edge_cases():
    # an all-zero row: the zeros in correlation order; a row without zeros: the coefficients
    key = ranking_key(np.zeros((1, 4), np.float32), np.array([[0.1, -0.3, 0.2, 0.0]], np.float32))
    assert np.argsort(-key[0]).tolist() == [2, 0, 3, 1]
    full = np.array([[0.5, -0.25, 1.0]], np.float32)
    np.testing.assert_array_equal(ranking_key(full, np.ones((1, 3))), full.astype(np.float64))
    # tiny non-zero coefficients still bound the zeros' keys
    coef = np.array([[1e-7, 0.0, -1e-7, 0.0]], np.float32)
    key = ranking_key(coef, np.array([[9.0, 5.0, -9.0, -4.0]]))
    assert np.argsort(-key[0]).tolist() == [0, 1, 3, 2]
    with pytest.raises(ValueError, match="same shape"):
        ranking_key(coef, np.zeros((1, 3)))


def test_rankings_from_coefficients():
    """Rankings derived from a coefficient block: ties (the many zeros of a sparse fit) by id;
    with same_class only the target's class is ranked."""
    coef = np.array([[0.0, 2.0, -1.0, 0.5, 0.0], [1.0, 0.0, 0.0, 3.0, 0.0]], np.float32)
    train_ids = np.array([10, 11, 12, 13, 14])
    train_labels = np.array([0, 0, 1, 1, 0])
    frame = rank_block(ScoreBlock("datamodels", [7, 8], [0, 1], train_ids, coef), 3).to_pandas()
    assert set(frame["method"]) == {"datamodels"}
    assert frame[frame.target_id == 7]["train_id"].tolist() == [11, 13, 10]  # ties (0.0) by id
    candidates = np.array([0, 1])[:, None] == train_labels[None, :]
    same = rank_block(ScoreBlock("datamodels", [7, 8], [0, 1], train_ids, coef, candidates), 3).to_pandas()
    assert same[same.target_id == 7]["train_id"].tolist() == [11, 10, 14]
    assert same[same.target_id == 8]["train_id"].tolist() == [13, 12]


def test_settings_are_validated_by_name():
    with pytest.raises(SettingsError, match=r"unknown \[datamodels\] setting"):
        DatamodelSettings.from_preset({"datamodels": {"modles": 3}})
    with pytest.raises(SettingsError, match="heldout"):
        DatamodelSettings.from_preset({"datamodels": {"models": 5}})
    with pytest.raises(SettingsError, match="lds_models"):
        DatamodelSettings.from_preset({"datamodels": {"lds_models": 2}})
    with pytest.raises(SettingsError, match=r"datamodels.alpha must be in \(0.0, 1.0\)"):
        DatamodelSettings.from_preset({"datamodels": {"alpha": 1.0}})
    with pytest.raises(SettingsError, match=r"budgets.*exceed models"):
        DatamodelSettings.from_preset({"datamodels": {"models": 100, "budgets": [50, 200]}})
    with pytest.raises(SettingsError, match="budgets = 5 .* held-out"):
        DatamodelSettings.from_preset({"datamodels": {"models": 100, "budgets": [5]}})
    with pytest.raises(SettingsError, match="twice"):
        DatamodelSettings.from_preset({"datamodels": {"models": 100, "budgets": [50, 50]}})
    with pytest.raises(SettingsError, match="zero_order"):
        DatamodelSettings.from_preset({"datamodels": {"zero_order": "ridge"}})
    budgeted = DatamodelSettings.from_preset({"datamodels": {"models": 100, "budgets": [100, 50, 20]}})
    assert budgeted.variants() == [("datamodels@n20", 20), ("datamodels@n50", 50), ("datamodels", 100)]
    assert DatamodelSettings.from_preset({}).variants() == [("datamodels", 400)]
    with pytest.raises(SettingsError, match="datamodels.max_retries must be >= 0"):
        parse_settings({"datamodels": {"max_retries": -1}})  # refused when the whole preset is parsed
    settings = DatamodelSettings.from_preset({"seed": 3, "datamodels": {"lr": 0.05}})
    config = settings.recipe(Recipe("mlp", epochs=4)).train_config()
    assert settings.seed == 3 and config.epochs == 4 and config.lr == 0.05
    assert settings.method_params()["seed"] == 3
    assert DatamodelsStage.reads == ("rankings",) and DatamodelsStage.flags == ()
    assert set(DatamodelsStage.writes) == {"datamodels", "lds", "scores", "rankings"}


# ----------------------------------------------------------------------------- the stage

ray = pytest.importorskip("ray")

TRAIN_PER_CLASS = 30  # 300 real training images
MODELS, LDS_MODELS = 24, 16


def preset(**datamodels):
    section = {"models": MODELS, "lds_models": LDS_MODELS, "top_k": 40, "actors": 2, "flush_every": 4,
               "flush_seconds": 5.0}
    section.update(datamodels)
    return {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS},
            "support": {"model": "mlp", "epochs": 2}, "datamodels": section}


def stage(exp, runtime, **datamodels):
    return DatamodelsStage(exp, parse_settings(preset(**datamodels)), runtime, progress=False)


@pytest.fixture
def torch_threads():
    """In-process retraining workers set this process's torch threads to one: restore them."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setting():
    train = load_dataset("fashion-mnist", "train", n_per_class=TRAIN_PER_CLASS, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=2, seed=0)
    targets = test.ids[[0, 1, 5, 9, 14]]  # a few classes, two targets in one of them
    labels = dict(zip(test.ids.tolist(), test.labels.tolist()))
    return train, targets, labels


def new_exp(path, setting):
    """An experiment with random same-class rankings of the targets, as the rank stage writes them."""
    train, targets, labels = setting
    exp = Experiment(path).create()
    rows = []
    for target in targets:
        same = train.ids[train.labels == labels[int(target)]]
        order = np.random.default_rng(int(target)).permutation(len(same))
        rows.append(pd.DataFrame({"target_id": np.int64(target), "method": "random",
                                  "rank": np.arange(len(same), dtype=np.int32), "train_id": same[order],
                                  "score": np.linspace(1, 0, len(same), dtype=np.float32)}))
    write_table(pa.Table.from_pandas(pd.concat(rows), preserve_index=False), exp.rankings / "random.parquet")
    return exp


@pytest.fixture(scope="module")
def clean(ray_runtime, setting, tmp_path_factory):
    exp = new_exp(tmp_path_factory.mktemp("clean"), setting)
    summary = stage(exp, ray_runtime)()
    return exp, summary


def margins_table(exp, folder="datamodels"):
    return pd.read_parquet(exp.root / folder / "margins.parquet").sort_values(["model_id", "target_id"])


def test_stage_writes_tables_that_metrics_load(clean, setting):
    from attribution.metrics import load_lds_data, lds_table
    from attribution.ranking import load_rankings

    exp, summary = clean
    train, targets, labels = setting
    assert summary["trained_this_run"] == MODELS + LDS_MODELS and summary["targets"] == len(targets)
    masks = pd.read_parquet(exp.root / "datamodels" / "masks.parquet")
    assert sorted(masks["model_id"].unique()) == list(range(MODELS))
    assert (masks.groupby("model_id").size() == 150).all()  # alpha 0.5 of 300 images
    assert set(masks["train_id"]) <= set(train.ids.tolist())
    margins = margins_table(exp)
    assert len(margins) == MODELS * len(targets) and set(margins["target_id"]) == set(targets.tolist())
    assert margins["margin"].std() > 0
    parts = read_dataset(exp.root / "datamodels" / "models").to_pandas()
    assert (parts["attempt"] == 0).all() and parts["worker"].str.contains(":").all()

    data = load_lds_data(exp.root)
    assert data.source == "lds" and data.masks.shape == (LDS_MODELS, len(train))
    assert data.margins.shape == (LDS_MODELS, len(targets)) and (data.masks.sum(axis=1) == 150).all()
    lds_masks = pd.read_parquet(exp.root / "lds" / "masks.parquet")
    assert lds_masks["model_id"].min() >= MODELS  # never a regression model

    rankings = load_rankings(exp, "datamodels").to_pandas()
    assert set(rankings["target_id"]) == set(targets.tolist())
    assert (rankings.groupby("target_id").size() == 40).all()
    # native setting: every class is a candidate; the order follows the coefficients
    assert rankings["train_id"].map(dict(zip(train.ids, train.labels))).nunique() > 1
    coef = pd.read_parquet(exp.root / "datamodels" / "regressions" / "coef-class{:03d}.parquet".format(
        labels[int(targets[0])]))
    per_target = pd.concat(pd.read_parquet(p) for p in (exp.root / "datamodels" / "regressions").glob("targets-*"))
    assert set(per_target["target_id"]) == set(targets.tolist())
    assert (per_target["heldout_mse"] <= per_target["heldout_mse_zero_model"] + 1e-12).all()
    first = rankings[rankings.target_id == targets[0]].sort_values("rank")
    assert (np.diff(first["score"].to_numpy()) <= 0).all()
    nonzero = coef[coef.target_id == targets[0]]
    if len(nonzero):
        assert first["score"].iloc[0] == pytest.approx(max(nonzero["coef"].max(), 0.0))
    # the score blocks hold every coefficient (zeros included); the rankings are derived from them
    store = ScoreStore(exp.scores)
    every_coef = pd.concat(pd.read_parquet(p) for p in (exp.root / "datamodels" / "regressions").glob("coef-*"))
    assert len(store.block_names("datamodels")) == len(set(labels[int(t)] for t in targets))
    for block in store.blocks("datamodels"):
        assert block.values.shape == (len(block.target_ids), len(train)) and block.candidates is None
        for t, row in zip(block.target_ids, block.values):
            stored = every_coef[every_coef.target_id == t]
            np.testing.assert_array_equal(row[np.isin(block.train_ids, stored["train_id"])],
                                          stored.sort_values("train_id")["coef"].to_numpy())
            assert np.count_nonzero(row) == len(stored)
        ranked = rankings[rankings.target_id.isin(block.target_ids)].reset_index(drop=True)
        # the ranking's order: the coefficients, the zeros by their stored entry strength
        keyed = dataclasses.replace(block, exact=ranking_key(block.values, entry_correlations(exp, block)).ravel())
        pd.testing.assert_frame_equal(rank_block(keyed, 40).to_pandas(), ranked)
        by_id = rank_block(block, 40).to_pandas()
        zeros = ranked["score"].to_numpy() == 0
        if zeros.sum() > 2:  # the zeros are not in id order (they were before the entry key)
            assert not by_id["train_id"].equals(ranked["train_id"])
    table = lds_table(store, data, n_boot=50)  # from the full score vectors
    assert set(table["method"]) == {"datamodels"} and (table["n_models"] == LDS_MODELS).all()
    # manifest: what the cost table and the report read
    entry = exp.manifest()["datamodels"]
    assert entry["models"] == MODELS and entry["alpha"] == 0.5 and entry["seconds"] > 0
    assert entry["reused"] is False and "alpha_median" in entry["regularisation"]
    assert entry["regularisation"]["nonzero_median"] == per_target["n_nonzero"].median()
    assert entry["regularisation"]["nonzero_max"] == per_target["n_nonzero"].max()
    assert entry["zero_order"] == "entry" and entry["budgets"] == []
    assert set(entry["method_seconds"]) == {"datamodels"}
    assert 0 < entry["method_seconds"]["datamodels"] <= entry["seconds"]  # the LDS models are not its cost


def entry_correlations(exp, block, folder="regressions"):
    """(targets, n_train) residual correlations of a block's targets, from entry-classNNN."""
    table = pd.concat(pd.read_parquet(p) for p in (exp.root / "datamodels" / folder).glob("entry-*"))
    by_target = dict(zip(table["target_id"], table["correlation"]))
    return np.stack([np.asarray(by_target[int(t)], np.float32) for t in block.target_ids])


def fit_models(exp, n_models):
    """(masks, margins, target_ids) of models 0 .. n_models-1 from the long tables."""
    masks = pd.read_parquet(exp.root / "datamodels" / "masks.parquet")
    train_ids = ScoreStore(exp.scores).train_ids()
    dense = np.zeros((n_models, len(train_ids)), bool)
    masks = masks[masks.model_id < n_models]
    dense[masks["model_id"].to_numpy(), np.searchsorted(train_ids, masks["train_id"].to_numpy())] = True
    margins = margins_table(exp).pivot(index="model_id", columns="target_id", values="margin")
    return dense, margins.loc[range(n_models)].to_numpy(np.float32), margins.columns.to_numpy(), train_ids


def test_budgets_are_prefix_variants_with_their_seconds_and_resume(clean, tmp_path):
    """budgets = [8, 16]: datamodels@n8 and @n16 are fitted on the first 8 / 16 models (no
    training: the models are there), with their own blocks, rankings and seconds; a rerun
    redoes only a deleted unit of one variant, and the same."""
    from attribution.ranking import load_rankings

    base, _ = clean
    root = tmp_path / "budgets"
    shutil.copytree(base.root, root, ignore=shutil.ignore_patterns(".lock"))
    exp = Experiment(root)
    summary = stage(exp, InProcessRuntime(), budgets=(16, 8))()
    assert summary["trained_this_run"] == 0 and summary["variants"] == ["datamodels@n8", "datamodels@n16", "datamodels"]
    classes = len(ScoreStore(exp.scores).block_names("datamodels"))
    assert summary["reused_files"] == classes and summary["computed_files"] == 2 * classes  # plain kept as it was
    store = ScoreStore(exp.scores)
    settings = DatamodelSettings.from_preset(preset(budgets=(16, 8)))
    train_ids = store.train_ids()
    train = load_dataset("fashion-mnist", "train", n_per_class=TRAIN_PER_CLASS, seed=0)
    labels = dict(zip(train.ids.tolist(), train.labels.tolist()))
    for name, n in (("datamodels@n8", 8), ("datamodels@n16", 16)):
        masks, margins, target_ids, _ = fit_models(exp, n)
        block = next(store.blocks(name))
        cols = [int(np.flatnonzero(target_ids == t)[0]) for t in block.target_ids]
        method = create_method("datamodels", **settings.method_params())
        method.fit(TrainingData(train_ids, np.array([labels[int(i)] for i in train_ids]), extra={
            "masks": masks, "margins": margins[:, cols], "target_ids": block.target_ids}))
        np.testing.assert_array_equal(block.values, method.coef_)  # the prefix models' regression
        ranking = load_rankings(exp, name).to_pandas()
        assert set(ranking["method"]) == {name} and ranking["target_id"].nunique() == len(target_ids)
        assert (exp.root / "datamodels" / f"regressions@n{n}" / f"entry-class{block.target_labels[0]:03d}.parquet"
                ).exists()
    plain = next(store.blocks("datamodels"))
    assert not np.array_equal(next(store.blocks("datamodels@n8")).values, plain.values)

    # seconds: each variant's models' share of the training wall time + its regressions
    entry = exp.manifest()["datamodels"]
    parts = read_dataset(exp.root / "datamodels" / "models").to_pandas().set_index("model_id")["seconds"]
    factor = entry["training_wall_per_worker_second"]
    assert factor == base.manifest()["datamodels"]["training_wall_per_worker_second"] > 0  # from the training run
    assert set(entry["method_seconds"]) == {"datamodels@n8", "datamodels@n16", "datamodels"}
    for name, n in (("datamodels@n8", 8), ("datamodels@n16", 16), ("datamodels", MODELS)):
        variant = entry["variants"][name]
        assert variant["models"] == n and variant["nonzero_min"] <= variant["nonzero_median"] <= variant["nonzero_max"]
        assert variant["training_seconds"] == pytest.approx(factor * parts.loc[range(n)].sum(), abs=0.051)
        assert entry["method_seconds"][name] == pytest.approx(
            variant["training_seconds"] + variant["regression_seconds"], abs=0.11)
    seconds = entry["method_seconds"]
    assert seconds["datamodels@n8"] < seconds["datamodels@n16"] < seconds["datamodels"]

    # resume per variant and class: a lost ranking is derived again from the stored scores
    # and entry strengths, a lost score block is refitted; both the same as before
    before = {name: load_rankings(exp, name).to_pandas() for name in summary["variants"]}
    label = int(plain.target_labels[0])
    (exp.rankings / f"datamodels@n8-class{label:03d}.parquet").unlink()
    store.block_path("datamodels@n16", f"class{label:03d}").unlink()
    again = stage(exp, InProcessRuntime(), budgets=(8, 16))()
    assert again["trained_this_run"] == 0 and again["computed_files"] == 2
    # a variant left alone keeps the seconds of the run that computed it
    assert exp.manifest()["datamodels"]["method_seconds"]["datamodels"] == seconds["datamodels"]
    assert again["reused_files"] == 3 * classes - 2
    for name, frame in before.items():
        pd.testing.assert_frame_equal(load_rankings(exp, name).to_pandas(), frame)
    with pytest.warns(UserWarning, match=r"datamodels@n8.*not among datamodels.budgets"):
        stage(exp, None, budgets=(16,))()  # a dropped budget's files stay, with a warning
    quiet = stage(exp, None, budgets=(8, 16))()  # nothing to do: no pool needed
    assert quiet["computed_files"] == 0 and quiet["method_seconds"] == again["method_seconds"]
    assert exp.manifest()["datamodels"]["method_seconds"] == again["method_seconds"]


def test_margins_are_those_of_a_model_trained_on_the_subset(clean, setting, torch_threads):
    """A worker's margins equal an in-process training on the same subset and torch seed."""
    exp, _ = clean
    train, targets, _ = setting
    torch.set_num_threads(1)
    ids = np.sort(train.ids)
    trainer = retrain.Retrainer.from_imageset(retrain.make_config("mlp", epochs=2), train)
    test = load_dataset("fashion-mnist", "test")
    pos = test.positions_of(np.sort(targets))
    for model_id, folder in ((3, "datamodels"), (LDS_MODEL_OFFSET + 2, "lds")):
        mask = subset_mask(len(ids), 0.5, 0, model_id)
        stored = pd.read_parquet(exp.root / folder / "masks.parquet")
        assert set(stored.loc[stored.model_id == model_id, "train_id"]) == set(ids[mask])
        model = trainer.train(removed_ids=ids[~mask], seed=retrain.training_seed(0, model_id))
        expected = margins_from_logits(trainer.logits(model, test.images(pos)), test.labels[pos])
        got = margins_table(exp, folder)
        got = got[got.model_id == model_id].sort_values("target_id")["margin"].to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_rerun_trains_nothing_and_changed_settings_are_refused(clean):
    exp, _ = clean
    parts = sorted(p.name for p in (exp.root / "datamodels" / "models").glob("*.parquet"))
    seconds = exp.manifest()["datamodels"]["seconds"]
    summary = stage(exp, None)()  # nothing to compute: no pool needed
    assert summary["trained_this_run"] == 0 and summary["computed_files"] == 0 and summary["reused_files"] > 0
    assert sorted(p.name for p in (exp.root / "datamodels" / "models").glob("*.parquet")) == parts
    entry = exp.manifest()["datamodels"]
    assert entry["reused"] is True and entry["seconds"] == seconds  # the computing run's time is kept
    with pytest.raises(SettingsChanged, match="alpha: 0.5 -> 0.4") as refused:
        stage(exp, None, alpha=0.4)()
    assert "datamodels/models" in str(refused.value) and "random" not in str(refused.value)
    with pytest.raises(SettingsChanged, match="models: 24 -> 30") as refused:
        stage(exp, None, models=30)()
    assert "datamodels-*.parquet" in str(refused.value) and "random" not in str(refused.value)
    assert sorted(p.name for p in (exp.root / "datamodels" / "models").glob("*.parquet")) == parts


def test_a_crashed_run_resumes_and_a_failed_training_is_retried(clean, setting, ray_runtime, tmp_path, torch_threads):
    from attribution.ranking import load_rankings

    exp = new_exp(tmp_path / "resume", setting)
    with pytest.raises(SimulatedCrash):  # in-process: the driver stops after 10 finished models
        stage(exp, FaultyRuntime(InProcessRuntime(), crash_after=10))()
    first = read_dataset(exp.root / "datamodels" / "models").to_pandas()
    assert 0 < len(first) <= 10 and not (exp.root / "datamodels" / "masks.parquet").exists()
    missing = next(m for m in range(MODELS) if m not in set(first["model_id"]))
    failing = FaultyRuntime(ray_runtime, fail_first=[missing], key=lambda item: item.get("model_id"))
    with pytest.raises(WorkFailed, match="rerun the same command"):
        stage(exp, failing, max_retries=0)()
    second = read_dataset(exp.root / "datamodels" / "models").to_pandas()
    assert missing not in set(second["model_id"])
    failing = FaultyRuntime(ray_runtime, fail_first=[missing], key=lambda item: item.get("model_id"))
    summary = stage(exp, failing)()
    log = read_dataset(exp.root / "datamodels" / "models").to_pandas()
    assert summary["retried"] == 1 and not log["model_id"].duplicated().any()
    assert summary["trained_this_run"] == MODELS + LDS_MODELS - len(second)
    assert int(log.set_index("model_id").loc[missing, "attempt"]) == 1
    # deterministic per model id (and alike in-process and on Ray): the same margins and
    # rankings as the uninterrupted run
    pd.testing.assert_frame_equal(margins_table(exp).reset_index(drop=True),
                                  margins_table(clean[0]).reset_index(drop=True))
    assert load_rankings(exp, "datamodels").equals(load_rankings(clean[0], "datamodels"))


def test_inputs_errors_name_the_fix(tmp_path):
    with pytest.raises(StageInputMissing, match="attribution rank"):
        stage(Experiment(tmp_path).create(), InProcessRuntime())()
    exp = Experiment(tmp_path / "few").create()
    write_table(pa.table({"target_id": [int(load_dataset("fashion-mnist", "test").ids[0])],
                          "method": ["random"], "rank": pa.array([0], pa.int32()),
                          "train_id": [int(load_dataset("fashion-mnist", "train", n_per_class=30).ids[0])],
                          "score": pa.array([1.0], pa.float32())}), exp.rankings / "random.parquet")
    with pytest.raises(ValueError, match="lds_models"):  # too few LDS models to cover every image
        stage(exp, InProcessRuntime(), lds_models=4)()
    subset = set(load_dataset("fashion-mnist", "train", n_per_class=30).ids.tolist())
    outside = next(i for i in load_dataset("fashion-mnist", "train").ids.tolist() if i not in subset)
    write_table(pa.table({"target_id": [int(load_dataset("fashion-mnist", "test").ids[0])],
                          "method": ["random"], "rank": pa.array([0], pa.int32()), "train_id": [outside],
                          "score": pa.array([1.0], pa.float32())}), exp.rankings / "random.parquet")
    with pytest.raises(ValueError, match="another training subset"):  # rankings of another [data] subset
        stage(exp, InProcessRuntime())()
    assert not (exp.root / "datamodels").exists()  # refused before any work


def test_imagenet_datamodels_is_refused_with_its_projected_cost_unless_confirmed(tmp_path):
    """ImageNet Datamodels runs only when asked (a [datamodels] section), and then the
    preflight (before any stage starts) refuses it with the projected A100-days unless
    datamodels.accept_cost is set; nothing is written either way."""
    from attribution.presets import load_preset

    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    asked = {"data.root": str(tmp_path / "imagenet"), "datamodels.models": 1000}
    assert "datamodels" not in parse_settings(load_preset("imagenet", {"data.root": "x"})).present
    exp = Experiment(tmp_path / "exp")
    stage = DatamodelsStage(exp, parse_settings(load_preset("imagenet", asked)))
    # 1,100 models x 17.5 A100-minutes (half of FFCV's 35-minute 16-epoch ResNet-18 run)
    assert stage.projected_gpu_hours() == pytest.approx(1100 * 17.5 / 60, rel=1e-5)
    with pytest.raises(SettingsError, match=r"project to 321 A100-hours \(13\.4 A100-days.*datamodels\.accept_cost"):
        stage.preflight(produced={"rankings"})
    assert not (tmp_path / "exp").exists()
    confirmed = DatamodelsStage(exp, parse_settings(load_preset("imagenet", {**asked, "datamodels.accept_cost": True})))
    confirmed.preflight(produced={"rankings"})  # confirmed: no refusal
    # the CPU recipes have no published cost: measured by the stage, never refused
    assert DatamodelsStage(exp, parse_settings(load_preset("quickstart"))).projected_gpu_hours() is None
