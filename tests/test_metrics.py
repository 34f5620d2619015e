"""Metrics on small hand-computed cases: support curves and AUC, win rates, Jaccard,
LDS on a planted linear model, bootstrap intervals, the cost table."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from attribution import metrics as M
from attribution.methods import available_methods, method_class


def support_frame(rows):
    return pd.DataFrame(rows, columns=["target_id", "method", "mode", "support"])


# ----------------------------------------------------------------------------- curves and AUC


def test_support_curve_counts_found_supports_up_to_k():
    curve = M.support_curve([2, 5, -1], [0, 1, 2, 4, 5, 10])
    np.testing.assert_allclose(curve, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_support_curves_long_table_per_method_and_mode():
    df = support_frame([(1, "l2", "removal", 3), (2, "l2", "removal", -1), (1, "esvm", "removal", 1),
                        (1, "esvm", "mislabel", 0)])
    out = M.support_curves(df, [0, 2, 4])
    esvm = out[(out.method == "esvm") & (out["mode"] == "removal")]["fraction"].tolist()
    l2 = out[(out.method == "l2")]["fraction"].tolist()
    assert esvm == [0.0, 1.0, 1.0] and l2 == [0.0, 0.0, 0.5]
    assert out[out["mode"] == "mislabel"]["fraction"].tolist() == [1.0, 1.0, 1.0]


def test_support_auc_closed_form_matches_numeric_area():
    supports, limit = [2, 5, -1], 10
    # (1 - 2/10) + (1 - 5/10) + 0, over 3 targets
    assert M.support_auc(supports, limit) == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    ks = np.linspace(0, limit, 200_001)
    numeric = np.trapezoid(M.support_curve(supports, ks), ks) / limit
    assert M.support_auc(supports, limit) == pytest.approx(numeric, abs=1e-4)


def test_support_auc_extremes_and_errors():
    assert M.support_auc([0, 0], 8) == 1.0
    assert M.support_auc([-1, -1], 8) == 0.0
    with pytest.raises(ValueError, match="exceeds the limit"):
        M.support_auc([3, 20], 10)
    with pytest.raises(ValueError, match=">= 0 or -1"):
        M.support_auc([-2], 10)
    with pytest.raises(ValueError, match="positive"):
        M.support_auc([1], 0)


def test_support_summary_per_method_and_mode():
    df = support_frame([(1, "esvm", "removal", 2), (2, "esvm", "removal", 5), (3, "esvm", "removal", -1),
                        (1, "l2", "removal", 10), (2, "l2", "removal", -1), (3, "l2", "removal", -1),
                        (1, "esvm", "mislabel", 1)])
    summary = M.support_summary(df, 10, n_boot=200, seed=1)
    row = summary[(summary.method == "esvm") & (summary["mode"] == "removal")].iloc[0]
    assert (row.n_targets, row.n_found, row.median_support) == (3, 2, 3.5)
    assert row.auc == pytest.approx(1.3 / 3)
    assert row.auc_low <= row.auc <= row.auc_high
    l2 = summary[(summary.method == "l2")].iloc[0]
    assert l2.auc == 0.0 and l2.found_rate == pytest.approx(1 / 3)
    assert list(summary.method) == ["esvm", "esvm", "l2"]  # display order, removal first


def test_support_limit_lookup_order():
    assert M.support_limit({"support": {"limit": 64}, "rank": {"top_k": 500}}) == (64, "manifest support.limit")
    assert M.support_limit({"rank": {"top_k": 500}})[0] == 500
    assert M.support_limit({"support": {"settings": {"top_k": 1280}}})[0] == 1280
    df = support_frame([(1, "esvm", "removal", 7), (2, "esvm", "removal", -1)])
    limit, source = M.support_limit({}, df)
    assert limit == 7 and "largest found" in source
    # the support stage's own per-search limits win over every manifest entry
    assert M.support_limit({"support": {"limit": 64}}, df.assign(limit=[100, 90]))[0] == 100


# ----------------------------------------------------------------------------- win rates


def test_pairwise_outcomes_not_found_is_infinite():
    out = M.pairwise_outcomes([2, 5, -1, -1, 4], [3, 5, -1, 7, -1])
    np.testing.assert_array_equal(out, [1, 0, 0, -1, 1])


def test_win_rates_hand_computed():
    df = support_frame([(1, "esvm", "removal", 2), (2, "esvm", "removal", 5), (3, "esvm", "removal", -1),
                        (4, "esvm", "removal", 9),
                        (1, "l2", "removal", 3), (2, "l2", "removal", 5), (3, "l2", "removal", -1),
                        (5, "l2", "removal", 1)])  # targets 4 and 5 are not common: left out
    wins = M.win_rates(df, n_boot=300, seed=0)
    assert len(wins) == 1
    row = wins.iloc[0]
    assert (row.method_a, row.method_b, row.n_targets) == ("esvm", "l2", 3)
    assert (row.wins, row.ties, row.losses) == (1, 2, 0)
    assert row.win_rate == pytest.approx(1 / 3) and row.tie_rate == pytest.approx(2 / 3) and row.loss_rate == 0
    assert 0 <= row.win_low <= row.win_rate <= row.win_high <= 1


# ----------------------------------------------------------------------------- overlap


def rankings_frame(lists):
    rows = [(t, m, r, tid, float(-r)) for (m, t), ids in lists.items() for r, tid in enumerate(ids)]
    return pd.DataFrame(rows, columns=["target_id", "method", "rank", "train_id", "score"])


def test_jaccard_definitions():
    assert M.jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 4)
    assert M.jaccard([], []) == 1.0
    assert M.jaccard([1], [2]) == 0.0


def test_topk_jaccard_mean_over_common_targets():
    # rank order is deliberately shuffled in the frame: ranked_lists must sort by rank
    df = rankings_frame({("esvm", 1): [10, 11, 12, 13], ("l2", 1): [11, 10, 14, 15],
                         ("esvm", 2): [20, 21, 22, 23], ("l2", 2): [24, 25, 26, 20],
                         ("esvm", 3): [30, 31]}).sample(frac=1, random_state=0)
    out = M.topk_jaccard(df, 2, n_boot=100)
    row = out.iloc[0]
    # target 1: {10,11} vs {11,10} -> 1; target 2: {20,21} vs {24,25} -> 0; target 3 not common
    assert (row.n_targets, row["mean"]) == (2, 0.5)
    row4 = M.topk_jaccard(df, 4, n_boot=100).iloc[0]
    # target 1: {10..13} vs {10,11,14,15} -> 2/6; target 2: {20..23} vs {24,25,26,20} -> 1/7
    assert row4["mean"] == pytest.approx((2 / 6 + 1 / 7) / 2)


def test_support_set_jaccard_uses_each_methods_own_support():
    ranks = rankings_frame({("esvm", 1): [10, 11, 12, 13], ("l2", 1): [11, 10, 14, 15],
                            ("esvm", 2): [20, 21, 22, 23], ("l2", 2): [24, 25, 26, 20]})
    sup = support_frame([(1, "esvm", "removal", 1), (1, "l2", "removal", 3),
                         (2, "esvm", "removal", -1), (2, "l2", "removal", 2)])
    out = M.support_set_jaccard(ranks, sup, n_boot=50)
    # only target 1 has both found: {10} vs {11,10,14} -> 1/3
    assert len(out) == 1 and out.iloc[0].n_targets == 1
    assert out.iloc[0]["mean"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- LDS


def planted(n_models=300, n_train=200, n_targets=6, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    true_scores = rng.normal(size=(n_targets, n_train))
    masks = rng.random((n_models, n_train)) < 0.5
    margins = masks @ true_scores.T + noise * rng.normal(size=(n_models, n_targets))
    return masks, margins, true_scores, rng


def test_lds_planted_linear_model_true_scores_near_one_shuffled_near_zero():
    masks, margins, true_scores, rng = planted()
    good = M.lds(masks, margins, true_scores, n_boot=200)
    assert good.mean > 0.97 and good.n_valid == 6
    shuffled = np.stack([rng.permutation(row) for row in true_scores])
    bad = M.lds(masks, margins, shuffled, n_boot=200)
    assert abs(bad.mean) < 0.15
    assert bad.low <= bad.mean <= bad.high


def test_lds_per_target_equals_scipy_spearman_and_constant_target_is_nan():
    masks, margins, true_scores, rng = planted(n_models=40, noise=5.0, seed=3)
    scores = true_scores + rng.normal(size=true_scores.shape)
    margins[:, 2] = 1.0  # constant margin: correlation undefined
    result = M.lds(masks, margins, scores, n_boot=50)
    predicted = masks @ scores.T
    for t in (0, 1, 3):
        assert result.per_target[t] == pytest.approx(spearmanr(predicted[:, t], margins[:, t])[0])
    assert np.isnan(result.per_target[2]) and result.n_valid == 5
    assert result.mean == pytest.approx(np.nanmean(result.per_target))


def test_lds_shape_errors_name_the_shapes():
    masks, margins, scores, _ = planted(n_models=10, n_train=5, n_targets=2)
    with pytest.raises(ValueError, match="n_targets=2, n_train=5"):
        M.lds(masks, margins, scores.T)
    with pytest.raises(ValueError, match="models"):
        M.lds(masks[:5], margins, scores)


def write_planted_store(root, true_scores, train_ids, target_ids, *, blocks=2, extra=None):
    """A score store holding ``true_scores`` as method "trak" in ``blocks`` blocks, and
    ``extra`` ({method: (values, candidates)}) as further methods, block "b0" each."""
    from attribution.methods.base import ScoreBlock
    from attribution.scores import ScoreStore

    store = ScoreStore(root / "scores")
    labels = np.zeros(len(target_ids), np.int64)
    for part in np.array_split(np.arange(len(target_ids)), blocks):
        store.write(ScoreBlock("trak", target_ids[part], labels[part], train_ids, true_scores[part]), f"b{part[0]}", {})
    for method, (values, candidates) in (extra or {}).items():
        store.write(ScoreBlock(method, target_ids, labels, train_ids, values, candidates), "b0", {})
    return store


def write_lds_files(root, masks, margins, train_ids, target_ids):
    model, item = np.nonzero(masks)
    (root / "lds").mkdir()
    pd.DataFrame({"model_id": model, "train_id": train_ids[item]}).to_parquet(root / "lds" / "masks.parquet")
    mm, tt = np.meshgrid(np.arange(len(masks)), np.arange(len(target_ids)), indexing="ij")
    pd.DataFrame({"model_id": mm.ravel(), "target_id": target_ids[tt.ravel()],
                  "margin": margins.ravel()}).to_parquet(root / "lds" / "margins.parquet")


def test_load_lds_data_and_lds_table_from_the_score_store(tmp_path):
    masks, margins, true_scores, rng = planted(n_models=60, n_train=30, n_targets=3, noise=0.01, seed=5)
    train_ids, target_ids = np.arange(100, 130), np.array([900, 901, 902])
    write_lds_files(tmp_path, masks, margins, train_ids, target_ids)
    data = M.load_lds_data(tmp_path)
    assert data.source == "lds" and data.masks.shape == (60, 30)
    np.testing.assert_array_equal(data.masks, masks)
    # the store scores two more training images than the models saw (no model saw them: mask False)
    wide_ids = np.concatenate([train_ids, [500, 501]])
    wide = np.concatenate([true_scores, np.full((3, 2), 1e6)], axis=1).astype(np.float32)
    negated = -wide
    zero = np.zeros_like(wide)
    zero[1:, :5] = 1.0
    store = write_planted_store(tmp_path, wide, wide_ids, target_ids,
                                extra={"l2": (negated, None), "datamodels": (zero, None)})
    table = M.lds_table(store, data, n_boot=50).set_index("method")
    assert table.loc["trak", "lds"] > 0.97 and table.loc["l2", "lds"] < -0.97  # the sign is kept
    assert (table["n_targets"] == 3).all() and (table["n_models"] == 60).all()
    # datamodels' first target has no coefficient: a constant prediction counts 0, not missing
    per = M.lds_per_target(store, data).set_index(["method", "target_id"])
    assert per.loc[("datamodels", 900), "constant"] and np.isnan(per.loc[("datamodels", 900), "lds"])
    assert table.loc["datamodels", "n_constant"] == 1
    assert table.loc["datamodels", "lds"] == pytest.approx(
        (per.loc[("datamodels", 901), "lds"] + per.loc[("datamodels", 902), "lds"]) / 3)
    # a path works as well as a store; rankings are refused (LDS needs the full scores)
    assert M.lds_table(tmp_path / "scores", data, n_boot=50).set_index("method").loc["trak", "lds"] == \
        pytest.approx(table.loc["trak", "lds"])
    with pytest.raises(TypeError, match="full score vectors, not from"):
        M.lds_table(pd.DataFrame({"method": ["trak"]}), data)
    assert M.load_lds_data(tmp_path / "nothing") is None


def test_lds_table_pairs_targets_and_lists_methods_without_lds_targets(tmp_path, monkeypatch):
    masks, margins, true_scores, rng = planted(n_models=30, n_train=20, n_targets=4, noise=1.0, seed=2)
    train_ids, target_ids = np.arange(20), np.array([10, 11, 12, 13])
    write_lds_files(tmp_path, masks, margins, train_ids, target_ids)
    store = write_planted_store(tmp_path, true_scores.astype(np.float32), train_ids, target_ids)
    from attribution.methods.base import ScoreBlock

    # esvm scored only targets 11 and 12 (and 99, which has no margins); l2 none of the LDS targets
    noisy = (true_scores[1:3] + rng.normal(size=(2, 20))).astype(np.float32)
    store.write(ScoreBlock("esvm", [11, 12], [0, 0], train_ids, noisy), "b0", {})
    store.write(ScoreBlock("esvm", [99], [0], train_ids, noisy[:1]), "b1", {})
    store.write(ScoreBlock("l2", [98], [0], train_ids, noisy[:1]), "b0", {})
    data = M.load_lds_data(tmp_path)
    table = M.lds_table(store, data, n_boot=50).set_index("method")
    assert table.loc["trak", "n_scored"] == 4 and table.loc["esvm", "n_scored"] == 2
    assert table.loc["trak", "n_targets"] == table.loc["esvm", "n_targets"] == 2  # paired on 11 and 12
    rho = [spearmanr(masks @ true_scores[t], margins[:, t]).statistic for t in (1, 2)]
    assert table.loc["trak", "lds"] == pytest.approx(np.mean(rho))
    assert table.loc["l2", "n_scored"] == 0 and np.isnan(table.loc["l2", "lds"])
    # memory: LDS reads the store one block at a time (never all targets of all methods)
    sizes = []
    original = type(store).blocks

    def spy(self, method):
        for block in original(self, method):
            sizes.append(block.values.shape[0])
            yield block

    monkeypatch.setattr(type(store), "blocks", spy)
    M.lds_per_target(store, data)
    assert max(sizes) == 2 and len(sizes) == 5


def test_lds_refuses_models_trained_on_images_the_store_does_not_score(tmp_path):
    masks, margins, true_scores, _ = planted(n_models=10, n_train=8, n_targets=2, seed=1)
    write_lds_files(tmp_path, masks, margins, np.arange(8), np.array([5, 6]))
    store = write_planted_store(tmp_path, true_scores[:, :6].astype(np.float32), np.arange(6), np.array([5, 6]),
                                blocks=1)
    with pytest.raises(ValueError, match="saw training ids .* that the score store does not score"):
        M.lds_table(store, M.load_lds_data(tmp_path))


def test_score_summary_counts_non_zeros_and_reads_the_outside_policy(tmp_path):
    from attribution.methods import fill_outside

    train_ids, target_ids = np.arange(10), np.array([1, 2])
    candidates = np.zeros((2, 10), bool)
    candidates[:, :4] = True
    esvm = np.zeros((2, 10), np.float32)
    esvm[0, :4] = [3, -1, 0, 2]
    esvm[1, :4] = [1, 0, 0, 5]
    dm = np.zeros((2, 10), np.float32)
    dm[0, [2, 7]] = [0.5, -0.1]
    store = write_planted_store(tmp_path, np.ones((2, 10), np.float32), train_ids, target_ids, blocks=1,
                                extra={"esvm": (fill_outside(esvm, candidates), candidates), "datamodels": (dm, None)})
    table = M.score_summary(store).set_index("method")
    assert table.loc["esvm", "candidates_median"] == 4 and table.loc["esvm", "n_train"] == 10
    assert (table.loc["esvm", "nonzero_median"], table.loc["esvm", "nonzero_min"]) == (2.5, 2)  # 3 and 2
    assert table.loc["esvm", "observed_outside"].startswith("min") and table.loc["esvm", "outside"] == "min"
    assert bool(table.loc["esvm", "class_restricted"]) is True
    assert (table.loc["datamodels", "nonzero_median"], table.loc["datamodels", "nonzero_min"]) == (1.0, 0)
    assert table.loc["datamodels", "observed_outside"].startswith("none outside")
    assert table.loc["trak", "distinct_median"] == 1


def test_ranking_ties_and_warnings_by_hand():
    rows = []
    # esvm: strict order; datamodels: 2 non-zero then 6 zeros (5 of 7 pairs tie at zero)
    for t in (1, 2):
        rows += [(t, "esvm", r, 100 + r, 10.0 - r) for r in range(8)]
        rows += [(t, "datamodels", r, 200 + r, [0.9, 0.4, 0, 0, 0, 0, 0, 0][r]) for r in range(8)]
    ranks = pd.DataFrame(rows, columns=["target_id", "method", "rank", "train_id", "score"])
    ties = M.ranking_ties(ranks).set_index("method")
    assert ties.loc["esvm", "tied_median"] == 0 and ties.loc["datamodels", "tied_median"] == pytest.approx(5 / 7)
    assert ties.loc["datamodels", "first_tie_median"] == 2 and ties.loc["datamodels", "mostly_tied"] == 2
    assert ties.loc["datamodels", "ties_in_id_order"] == 1.0 and np.isnan(ties.loc["esvm", "ties_in_id_order"])
    assert M.tied_fraction([1.0]) != M.tied_fraction([1.0])  # nan: no pair
    warnings = M.tie_warnings(ties.reset_index())
    assert len(warnings) == 1 and warnings[0].startswith("**warning**: datamodels's rankings are mostly ties")
    stats = pd.DataFrame({"method": ["esvm"], "nonzero_median": [3.0], "candidates_median": [300.0],
                          "nonzero_min": [1]})
    warned = M.tie_warnings(ties.reset_index(), stats)  # esvm: 3 non-zero scores for 8 ranked positions
    assert any("esvm's rankings" in w and "median of 3 non-zero scores of 300" in w for w in warned)
    assert "tied images are in train-id order" in warnings[0]
    # ties broken by a key of the method's own (e.g. datamodels' entry order): said so, not "id order"
    keyed = ranks.copy()
    zeros = (keyed.method == "datamodels") & (keyed["rank"] >= 2)
    keyed.loc[zeros, "train_id"] = 300 - keyed.loc[zeros, "rank"]
    keyed_ties = M.ranking_ties(keyed).set_index("method")
    assert keyed_ties.loc["datamodels", "ties_in_id_order"] == 0.0
    assert "a key of its own" in M.tie_warnings(keyed_ties.reset_index())[0]


def test_frontier_table_joins_cost_support_and_lds_and_lists_what_is_missing():
    costs = pd.DataFrame({"method": ["trak", "trak@m1", "esvm"], "seconds": [900.0, 200.0, None],
                          "missing_stages": ["", "", "rank"], "complete": [True, False, False]})
    summary = pd.DataFrame({"method": ["trak", "trak", "trak@m1"], "mode": ["removal", "mislabel", "removal"],
                            "auc": [0.5, 0.4, 0.2], "auc_low": [0.4, 0.3, 0.1], "auc_high": [0.6, 0.5, 0.3]})
    lds = pd.DataFrame({"method": ["trak", "esvm"], "lds": [0.3, 0.1], "lds_low": [0.2, 0.0], "lds_high": [0.4, 0.2]})
    table = M.frontier_table(["esvm", "trak@m1", "trak"], costs, summary, lds).set_index("method")
    assert list(table.index) == ["esvm", "trak", "trak@m1"] and table.loc["trak@m1", "base"] == "trak"
    assert table.loc["trak", "removal"] == 0.5 and table.loc["trak", "mislabel_high"] == 0.5
    assert table.loc["trak", "lds"] == 0.3 and table.loc["trak", "missing"] == ""
    assert table.loc["trak@m1", "missing"] == "mislabel, lds" and table.loc["trak@m1", "cost_complete"]
    assert table.loc["esvm", "missing"] == "removal, mislabel, compute" and np.isnan(table.loc["esvm", "seconds"])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    rng = np.random.default_rng(0)
    small, large = rng.random(25), rng.random(400)
    lo_s, hi_s = M.bootstrap_ci(small, n_boot=2000, seed=1)
    lo_l, hi_l = M.bootstrap_ci(large, n_boot=2000, seed=1)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)  # ~ 1/sqrt(n): 4x narrower expected
    assert M.bootstrap_ci(small, n_boot=500, seed=7) == M.bootstrap_ci(small, n_boot=500, seed=7)
    assert M.bootstrap_ci([0.3], n_boot=10) == (0.3, 0.3)
    assert all(np.isnan(M.bootstrap_ci([], n_boot=10)))
    with pytest.raises(ValueError):
        M.bootstrap_ci(small, n_boot=0)


# ----------------------------------------------------------------------------- costs


def test_cost_table_sums_stages_and_reports_missing_not_zero(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "moco.pt").write_bytes(b"x" * 1000)
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "train-00000.parquet").write_bytes(b"x" * 300)
    (tmp_path / "embeddings" / ".train-00001.parquet.123.tmp").write_bytes(b"x" * 5000)  # temp: ignored
    (tmp_path / "rankings").mkdir()
    (tmp_path / "rankings" / "esvm-class000.parquet").write_bytes(b"x" * 20)
    (tmp_path / "scores" / "esvm").mkdir(parents=True)
    (tmp_path / "scores" / "esvm" / "class000.parquet").write_bytes(b"x" * 7)
    manifest = {"pretrain": {"seconds": 240.0, "reused": True}, "timing.pretrain": {"seconds": 0.5},
                "timing.embed": {"seconds": 30.0}, "rank": {"compute_seconds": 12.0}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    costs = M.cost_table(tmp_path, ["trak", "esvm", "l2"]).set_index("method")
    assert list(costs.index) == ["esvm", "l2", "trak"]  # registry order
    esvm = costs.loc["esvm"]
    # reused pretrain: its original 240 s, not the 0.5 s reuse; rank from compute_seconds
    assert esvm.seconds == pytest.approx(282.0) and bool(esvm.complete)
    assert esvm.storage_bytes == 1327  # checkpoint + embeddings + score blocks + rankings
    l2 = costs.loc["l2"]
    assert not l2.complete and "rankings/l2-*.parquet" in l2.missing_paths and "scores/l2" in l2.missing_paths
    trak = costs.loc["trak"]
    assert trak.seconds is None or np.isnan(trak.seconds)
    assert trak.missing_stages == "trak" and not trak.complete
    assert trak.storage_bytes is None or np.isnan(trak.storage_bytes)


def test_cost_specs_from_manifest_override_defaults(tmp_path):
    manifest = {"cost_specs": {"trak": {"stages": ["trak.featurize", "trak.score"], "paths": ["trak"]}},
                "timing.trak.featurize": {"seconds": 5.0}}
    row = M.cost_table(tmp_path, ["trak"], manifest=manifest).iloc[0]
    assert row.seconds == 5.0 and row.missing_stages == "trak.score" and row.missing_paths == "trak"


def test_stage_seconds_never_counts_a_reuse_as_the_cost():
    # rank reused every file: its 0.0 s is the reuse, not the cost -> missing, with the reason
    manifest = {"rank": {"compute_seconds": 0.0, "computed_files": [], "reused_files": ["a", "b"]},
                "embed": {"seconds": 0.4, "computed_shards": {"train": 0, "test": 0}},
                "timing.support": {"seconds": 9.0},
                "prep": {"compute_seconds": 3.0, "computed_files": ["a"], "reused_files": ["b"]}}
    assert M.stage_seconds(manifest, "rank") == (None, "reused stored artifacts; their original compute time "
                                                       "is not recorded")
    assert M.stage_seconds(manifest, "embed")[0] is None
    assert M.stage_seconds(manifest, "support") == (9.0, "timing.support")
    value, source = M.stage_seconds(manifest, "prep")
    assert value == 3.0 and "partly reused" in source
    assert M.stage_seconds(manifest, "absent") == (None, "not recorded")
    row = M.cost_table("/nonexistent", ["random"], manifest=manifest).iloc[0]
    assert row.missing_stages.startswith("rank (reused stored artifacts") and not row.complete


def test_every_registered_method_declares_its_cost():
    specs = M.declared_cost_specs()
    assert list(specs) == available_methods()  # registry order, none left without a cost
    for name, spec in specs.items():
        assert spec is method_class(name).cost and spec.stages and spec.paths
        assert any(name in path for path in spec.paths), f"{name}'s cost names none of its own files"


def test_unregistered_method_is_costed_from_the_manifest_or_said_to_have_no_spec(tmp_path):
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "scores.npz").write_bytes(b"x" * 50)
    manifest = {"timing.legacy": {"seconds": 7.0},
                "cost_specs": {"legacy": {"stages": ["legacy"], "paths": ["legacy"], "note": "old run"}}}
    row = M.cost_table(tmp_path, ["legacy"], manifest=manifest).iloc[0]
    assert (row.seconds, row.storage_bytes, row.note, bool(row.complete)) == (7.0, 50, "old run", True)
    row = M.cost_table(tmp_path, ["legacy", "esvm"], manifest={}).iloc[1]
    assert row.method == "legacy" and row.missing_stages == "no cost spec" and not row.complete
    assert "not a registered method" in row.note and "cost_specs" in row.note


# Runs in a fresh interpreter: the registry is process-global, and the methods registered
# here must not leak into other tests.
REGISTERED_AT_TEST_TIME = """
import json, sys
from attribution import metrics as M
from attribution.methods import AttributionMethod, CostSpec, register_method


class TinyMethod(AttributionMethod):
    stage = "tiny"

    def fit(self, train):
        return self

    def score(self, targets):
        raise NotImplementedError


@register_method
class Zeta(TinyMethod):
    name = "zeta"
    cost = CostSpec(("tiny",), ("zeta/features", "rankings/zeta-*.parquet"), "zeta shares the tiny stage")


@register_method
class Alpha(TinyMethod):
    name = "alpha"
    cost = CostSpec(("tiny", "alpha-extra"), ("alpha",))


table = M.cost_table(sys.argv[1], ["legacy", "alpha", "zeta", "esvm"])
print(json.dumps(table.astype(object).where(table.notna(), None).to_dict("records")))
"""


def test_method_registered_at_test_time_is_costed_in_registry_order(tmp_path):
    (tmp_path / "zeta" / "features").mkdir(parents=True)
    (tmp_path / "zeta" / "features" / "part-0.npy").write_bytes(b"x" * 100)
    (tmp_path / "rankings").mkdir()
    (tmp_path / "rankings" / "zeta-class000.parquet").write_bytes(b"x" * 11)
    (tmp_path / "manifest.json").write_text(json.dumps({"timing.tiny": {"seconds": 4.0}}))
    done = subprocess.run([sys.executable, "-c", REGISTERED_AT_TEST_TIME, str(tmp_path)], capture_output=True,
                          text=True, env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {row["method"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])}
    # built-ins first, then the new methods in the order they registered (zeta before alpha,
    # not alphabetical), then the unregistered one
    assert list(rows) == ["esvm", "zeta", "alpha", "legacy"]
    zeta, alpha = rows["zeta"], rows["alpha"]
    assert (zeta["seconds"], zeta["storage_bytes"], zeta["stages"]) == (4.0, 111, "tiny 4.0 s")
    assert zeta["complete"] and zeta["note"] == "zeta shares the tiny stage"
    assert alpha["seconds"] == 4.0 and alpha["missing_stages"] == "alpha-extra" and alpha["missing_paths"] == "alpha"
    assert not alpha["complete"]
    assert rows["legacy"]["missing_stages"] == "no cost spec"
