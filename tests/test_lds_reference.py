"""The project's LDS against two independent computations on a stored case: dattri's
``dattri.metric.lds`` (PyPI dattri 0.3.0) and a plain scipy Spearman loop.

The case is an experiment folder as the stages write it: a score store (EXP/scores, two
blocks) and held-out subset models (EXP/lds/masks.parquet + margins.parquet) whose
margins follow a seeded synthetic linear datamodel plus noise. The project reads the
store block by block (:func:`attribution.metrics.lds_table`); the references get the
dense matrix. Scores that equal the planted model give a high LDS; a noisy copy a lower
one; the negated scores the negated LDS."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from attribution import metrics as M
from attribution.methods.base import ScoreBlock
from attribution.scores import ScoreStore

N_TRAIN, N_TARGETS, N_MODELS, SUBSET = 300, 12, 80, 150


@pytest.fixture(scope="module")
def stored_case(tmp_path_factory):
    """(EXP, train ids, target ids, {method: dense scores}, masks, margins)."""
    root = tmp_path_factory.mktemp("lds-reference")
    rng = np.random.default_rng(13)
    train_ids = np.sort(rng.choice(10_000, N_TRAIN, replace=False)).astype(np.int64)
    target_ids = np.arange(50_000, 50_000 + N_TARGETS, dtype=np.int64)
    truth = rng.normal(size=(N_TARGETS, N_TRAIN))
    masks = np.zeros((N_MODELS, N_TRAIN), bool)
    for m in range(N_MODELS):  # fixed-size subsets (dattri takes index rows of one length)
        masks[m, rng.choice(N_TRAIN, SUBSET, replace=False)] = True
    margins = masks @ truth.T + rng.normal(scale=3.0, size=(N_MODELS, N_TARGETS))
    methods = {"trak": truth, "datamodels": truth + rng.normal(scale=1.5, size=truth.shape), "l2": -truth}
    methods = {m: v.astype(np.float32) for m, v in methods.items()}
    store = ScoreStore(root / "scores")
    labels = np.zeros(N_TARGETS, np.int64)
    for method, values in methods.items():
        for part in np.array_split(np.arange(N_TARGETS), 2):
            store.write(ScoreBlock(method, target_ids[part], labels[part], train_ids, values[part]),
                        f"block{part[0]:03d}", {"case": "lds-reference"})
    model, item = np.nonzero(masks)
    (root / "lds").mkdir()
    pd.DataFrame({"model_id": model + 1_000_000, "train_id": train_ids[item]}).to_parquet(root / "lds" / "masks.parquet")
    mm, tt = np.meshgrid(np.arange(N_MODELS), np.arange(N_TARGETS), indexing="ij")
    pd.DataFrame({"model_id": mm.ravel() + 1_000_000, "target_id": target_ids[tt.ravel()],
                  "margin": margins.ravel()}).to_parquet(root / "lds" / "margins.parquet")
    return root, train_ids, target_ids, methods, masks, margins


def project_lds(root):
    per_target = M.lds_per_target(root / "scores", M.load_lds_data(root))
    table = M.lds_table(root / "scores", M.load_lds_data(root), n_boot=200, per_target=per_target)
    return per_target, table.set_index("method")


def test_project_lds_equals_a_plain_scipy_spearman(stored_case):
    root, _, target_ids, methods, masks, margins = stored_case
    per_target, table = project_lds(root)
    for method, values in methods.items():
        predicted = masks.astype(np.float64) @ values.astype(np.float64).T
        rho = np.array([spearmanr(predicted[:, j], margins[:, j]).statistic for j in range(N_TARGETS)])
        ours = per_target[per_target.method == method].set_index("target_id").loc[target_ids, "lds"].to_numpy()
        np.testing.assert_allclose(ours, rho, atol=1e-9)
        assert table.loc[method, "lds"] == pytest.approx(rho.mean(), abs=1e-9)
        assert table.loc[method, "lds_low"] <= table.loc[method, "lds"] <= table.loc[method, "lds_high"]
    assert table.loc["trak", "lds"] > 0.8  # the planted model: high, as expected
    assert table.loc["trak", "lds"] > table.loc["datamodels", "lds"] > 0.3  # noise lowers it
    assert table.loc["l2", "lds"] == pytest.approx(-table.loc["trak", "lds"], abs=1e-9)  # sign kept


def test_project_lds_equals_dattri(stored_case):
    dattri_metric = pytest.importorskip(
        "dattri.metric", reason="dattri is not installed: pip install dattri==0.3.0 (in the [test] extra)")
    import torch

    root, _, target_ids, methods, masks, margins = stored_case
    per_target, table = project_lds(root)
    indices = torch.as_tensor(np.stack([np.flatnonzero(row) for row in masks]))  # (models, subset size)
    for method, values in methods.items():
        score = torch.as_tensor(values.astype(np.float64).T)  # dattri: (n_train, n_test)
        corr, _ = dattri_metric.lds(score, (torch.as_tensor(margins), indices))
        ours = per_target[per_target.method == method].set_index("target_id").loc[target_ids, "lds"].to_numpy()
        np.testing.assert_allclose(ours, corr.numpy(), atol=1e-9)
        assert table.loc[method, "lds"] == pytest.approx(float(corr.mean()), abs=1e-9)
