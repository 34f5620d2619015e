"""The similarity methods (esvm, l2, cosine, random) and the rank stage, on real
Fashion-MNIST features (PCA of pixels), real FAISS, real Parquet, in process and on a
real local Ray."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from attribution.artifacts import SettingsChanged, stored_settings, write_json, write_table
from attribution.candidates import CandidateIndex
from attribution.esvm import SOLVER_CLASSES, ESVMSolver, available_solvers, get_solver
from attribution.experiment import Experiment
from attribution.methods import (ScoreBlock, Targets, TrainingData, available_methods, create_method, method_class)
from attribution.ranking import RANKING_SCHEMA, load_rankings, ranked_targets, ranking_file_name
from attribution.scores import ScoreStore, rank_block
from attribution.settings import SettingsError
from attribution.stages import parse_settings, stage_class
from attribution.stages.rank import (LEGACY_SETTINGS_KEY, RankSettings, RankStage, check_embeddings, method_params,
                                     unit_settings)
from attribution.workqueue import InProcessRuntime
from faults import FaultyRuntime, SimulatedCrash
from test_candidates import brute_force, fmnist_features

TOP_K = 20
METHODS = ["esvm", "l2", "cosine", "random"]


def write_embeddings(exp: Experiment, train, test):
    """EXP/embeddings in the embed stage's layout (one shard per split + manifest)."""
    from attribution.embedding import FORMAT, MANIFEST_NAME, VERSION, shard_table

    dim = train[2].shape[1]
    splits = {}
    for split, (ids, labels, feats) in (("train", train), ("test", test)):
        name = f"{split}-00000.parquet"
        write_table(shard_table(split, ids, labels, feats), exp.embeddings / name)
        splits[split] = {"rows": len(ids), "complete": True,
                         "shards": [{"file": name, "start": 0, "stop": len(ids), "rows": len(ids)}]}
    write_json(exp.embeddings / MANIFEST_NAME,
               {"format": FORMAT, "version": VERSION, "dim": dim, "dtype": "float32", "splits": splits})


def preset(**rank):
    base = {"methods": METHODS, "solver": "sklearn", "top_k": TOP_K, "targets": 12, "targets_per_task": 2, "seed": 3}
    base.update(rank)
    return {"name": "test", "seed": 0, "rank": base}


def rank_stage(exp, runtime=None, **rank) -> RankStage:
    return RankStage(exp, parse_settings(preset(**rank)), runtime or InProcessRuntime(), progress=False)


def new_exp(path, data) -> Experiment:
    exp = Experiment(path).create()
    write_embeddings(exp, *data)
    return exp


def ranking_files(exp) -> dict:
    return {p.name: pq.read_table(p) for p in sorted(exp.rankings.glob("*.parquet"))}


def of_target(table, target):
    return table.filter(pa.compute.equal(table["target_id"], int(target)))


@pytest.fixture(scope="module")
def data():
    return fmnist_features()


@pytest.fixture(scope="module")
def fitted(data):
    """TrainingData and Targets of the fixture, and a fitted-method factory."""
    (ids, labels, feats), test = data
    train = TrainingData(ids, labels, feats)
    targets = Targets(*test)

    def fit(name, **params):
        return create_method(name, **params).fit(train)

    return train, targets, fit


@pytest.fixture(scope="module")
def ranked_exp(tmp_path_factory, data):
    """One in-process stage run shared by the checks below."""
    exp = new_exp(tmp_path_factory.mktemp("exp"), data)
    summary = rank_stage(exp)()
    return exp, summary


class ConstantSolver(ESVMSolver):
    """Every candidate ties (registered by the tests that use it)."""

    name = "constant"

    def _decision_values(self, targets, negatives):
        return np.zeros((len(targets), len(negatives)), np.float32)


# ----------------------------------------------------------------------------- the registry


def test_rank_methods_are_registered_in_order_with_their_interface():
    assert available_methods("rank") == METHODS
    for name in METHODS:
        cls = method_class(name)
        assert cls.stage == "rank" and cls.inputs == ("features",) and cls.outside == "min"
        assert cls.class_restricted is True
        assert "rank" in cls.cost.stages and f"rankings/{name}-*.parquet" in cls.cost.paths
        assert f"scores/{name}" in cls.cost.paths
        assert cls.cost.note == "the rank stage's time covers every similarity method it computed"
    assert method_class("esvm").signed and not method_class("l2").signed
    assert method_class("random").cost.stages == ("rank",)
    assert method_class("l2").cost.stages == ("pretrain", "embed", "rank")
    # class_restricted follows same_class on the instance
    assert create_method("l2", same_class=False).class_restricted is False


def test_bad_names_and_parameters():
    with pytest.raises(ValueError, match=r"unknown attribution method 'knn'.*'esvm', 'l2', 'cosine', 'random'"):
        create_method("knn")
    with pytest.raises(ValueError, match=r"unknown ESVM solver 'liblinear'.*\['sklearn', 'thundersvm', 'batched'\]"):
        create_method("esvm", solver="liblinear")
    with pytest.raises(ValueError, match=r"\['sklearn', 'thundersvm', 'batched'\]"):
        get_solver("liblinear")
    with pytest.raises(ValueError, match="max_candidates must be"):
        create_method("l2", max_candidates=-1)
    with pytest.raises(ValueError, match="candidate_metric must be one of"):
        create_method("random", candidate_metric="euclid")
    with pytest.raises(ValueError, match="device must be one of"):
        create_method("cosine", device="tpu")
    with pytest.raises(RuntimeError, match="not fitted"):
        create_method("l2").score(Targets([1], [0], np.zeros((1, 4), np.float32)))
    with pytest.raises(ValueError, match="unknown attribution method 'knn'"):
        ranking_file_name("knn", 0)


def test_solver_registry_is_one_entry_per_solver(monkeypatch, fitted):
    assert available_solvers() == ["sklearn", "thundersvm", "batched"]
    assert get_solver("batched", C=0.2).C == 0.2
    # a new solver: one registry entry, and the esvm method (and [rank] settings) accept it
    monkeypatch.setitem(SOLVER_CLASSES, "constant", f"{__name__}:ConstantSolver")
    assert "constant" in available_solvers() and isinstance(get_solver("constant"), ConstantSolver)
    assert parse_settings(preset(solver="constant"))["rank"].solver == "constant"
    _, targets, fit = fitted
    block = fit("esvm", solver="constant").score(targets.take([0]))
    assert (block.values == 0).all()
    # the method's device reaches solvers that take one; explicit solver_params win
    assert str(create_method("esvm", solver="batched").make_solver().device) == "cpu"
    assert str(create_method("esvm", solver="batched", solver_params={"device": "cpu", "C": 0.3})
               .make_solver().device) == "cpu"
    assert create_method("esvm", solver="sklearn").make_solver().get_params()["C"] == 0.1


# ----------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_knn_scores_are_full_vectors_equal_to_numpy(fitted, data, method):
    train, targets, fit = fitted
    block = fit(method).score(targets.take(np.arange(6)))
    assert block.values.shape == block.candidates.shape == (6, len(train.ids))
    np.testing.assert_array_equal(block.train_ids, train.ids)
    for row in range(6):
        in_class = train.labels == targets.labels[row]
        np.testing.assert_array_equal(block.candidates[row], in_class)
        want_ids, want_scores = brute_force(method, data[0], targets.features[row], targets.labels[row])
        got = block.values[row, np.searchsorted(train.ids, want_ids)]
        np.testing.assert_allclose(got, want_scores.astype(np.float32), rtol=1e-6)
        # outside the class: the target's lowest candidate score
        assert (block.values[row, ~in_class] == block.values[row, in_class].min()).all()
    ranking = rank_block(block, TOP_K)
    assert ranking.schema == RANKING_SCHEMA
    for row in range(6):
        got = of_target(ranking, targets.ids[row])
        want_ids, want_scores = brute_force(method, data[0], targets.features[row], targets.labels[row])
        np.testing.assert_array_equal(got["train_id"].to_numpy(), want_ids[:TOP_K])
        np.testing.assert_allclose(got["score"].to_numpy(), want_scores[:TOP_K].astype(np.float32), rtol=1e-6)
        assert got["rank"].to_numpy().tolist() == list(range(TOP_K))
    if method == "l2":  # negative distances: higher = nearer
        assert (block.values <= 0).all()


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_knn_values_are_bit_identical_to_the_top_k_search(fitted, method):
    """The full vector comes from a search over every candidate; its values are the
    same float32 numbers a top-k search gives (what the rankings always stored)."""
    train, targets, fit = fitted
    scorer = fit(method)
    block = scorer.score(targets)
    index = CandidateIndex(method, device="cpu").fit(train.ids, train.labels, train.features)
    ids, scores = index.search(targets.features, targets.labels, TOP_K)
    for row in range(len(targets)):
        got = block.values[row, np.searchsorted(train.ids, ids[row])]
        np.testing.assert_array_equal(got.view(np.uint32), scores[row].astype(np.float32).view(np.uint32))
        np.testing.assert_array_equal(of_target(rank_block(block, TOP_K), targets.ids[row])["train_id"].to_numpy(),
                                      ids[row])


def test_knn_float32_ties_keep_the_exact_order():
    """Two candidates whose distances differ only below float32 precision: the ranking
    orders them by the exact (float64) distance, as the k-NN rankings always did, not by
    id; the block's float32 scores are equal."""
    eps = np.float32(2.0 ** -12)
    train = TrainingData([3, 7, 9], [0, 0, 0], np.array([[1, eps], [1, 0], [3, 0]], np.float32))
    block = create_method("l2").fit(train).score(Targets([100], [0], np.zeros((1, 2), np.float32)))
    assert block.values[0, 0] == block.values[0, 1] == -1.0  # a float32 tie
    assert block.exact is not None and block.exact[0] < block.exact[1]  # id 3 is farther
    assert rank_block(block, 3)["train_id"].to_pylist() == [7, 3, 9]
    # without the exact scores a tie is broken by id
    plain = ScoreBlock("l2", block.target_ids, block.target_labels, block.train_ids, block.values, block.candidates)
    assert rank_block(plain, 3)["train_id"].to_pylist() == [3, 7, 9]
    with pytest.raises(ValueError, match="2 exact scores for 3 candidate entries"):
        ScoreBlock("l2", block.target_ids, block.target_labels, block.train_ids, block.values, block.candidates,
                   block.exact[:2])


def test_random_scores_are_seeded_per_target(fitted, data):
    train, targets, fit = fitted
    first8 = targets.take(np.arange(8))
    group = fit("random", seed=5).score(first8)
    again = fit("random", seed=5).score(first8)
    np.testing.assert_array_equal(group.values, again.values)
    # one target alone gives the same scores as within a group (worker/grouping independent)
    alone = fit("random", seed=5).score(targets.take([3]))
    np.testing.assert_array_equal(alone.values[0], group.values[3])
    # the generator is seeded by (seed, target id): two targets of one class differ
    same = np.flatnonzero(first8.labels == first8.labels[0])
    assert len(same) >= 2, "the fixture's first 8 targets should share a class"
    assert not np.array_equal(group.values[same[0]], group.values[same[1]])
    ranking = rank_block(group, TOP_K)
    for row in (0, 1):
        cand = np.sort(train.ids[train.labels == first8.labels[row]])
        draws = np.random.default_rng([5, int(first8.ids[row])]).random(len(cand), dtype=np.float32)
        np.testing.assert_array_equal(group.values[row, np.searchsorted(train.ids, cand)], draws)
        want = cand[np.lexsort((cand, -draws.astype(np.float64)))[:TOP_K]]
        np.testing.assert_array_equal(of_target(ranking, first8.ids[row])["train_id"].to_numpy(), want)
    other = fit("random", seed=6).score(first8)
    assert not np.array_equal(other.values, group.values)
    # still same-class candidates
    labels = train.labels[np.searchsorted(train.ids, ranking["train_id"].to_numpy())]
    assert np.array_equal(labels, np.repeat(first8.labels, TOP_K))


def test_esvm_scores_are_the_solver_decision_values(fitted, monkeypatch):
    train, targets, fit = fitted
    solver = get_solver("sklearn")
    block = fit("esvm", solver="sklearn").score(targets.take(np.arange(3)))
    cand = np.sort(train.ids[train.labels == targets.labels[0]])
    values = solver.decision_values(targets.features[:1], train.features[np.searchsorted(train.ids, cand)])[0]
    np.testing.assert_array_equal(block.values[0, np.searchsorted(train.ids, cand)], values)
    assert block.exact is None
    order = np.lexsort((cand, -values.astype(np.float64)))[:TOP_K]
    first = of_target(rank_block(block, TOP_K), targets.ids[0])
    np.testing.assert_array_equal(first["train_id"].to_numpy(), cand[order])
    np.testing.assert_array_equal(first["score"].to_numpy(), values[order])
    # every candidate ties (all 600 training items, all-classes mode): ascending ids
    monkeypatch.setitem(SOLVER_CLASSES, "constant", f"{__name__}:ConstantSolver")
    tied = fit("esvm", solver="constant", same_class=False).score(targets.take([0]))
    assert tied.candidates.all()
    np.testing.assert_array_equal(rank_block(tied, 300)["train_id"].to_numpy(), np.sort(train.ids)[:300])


def test_esvm_negative_scores_other_classes_by_likeness(fitted):
    """esvm@negative: the same-class scores are esvm's; the other-class images score <= 0
    and below the target's candidates: its class-size nearest other-class images graded by
    an ESVM against them (more target-like = lower, with the candidates' spread), the rest
    at the neutral floor."""
    from scipy.stats import spearmanr

    train, targets, fit = fitted
    rows = np.array([0, 1, 7])  # two targets of one class, one of another
    esvm = fit("esvm", solver="sklearn").score(targets.take(rows))
    negative = fit("esvm", solver="sklearn", negative_influence=True).score(targets.take(rows))
    assert negative.method == "esvm"
    np.testing.assert_array_equal(negative.candidates, esvm.candidates)
    cand = esvm.candidates
    np.testing.assert_array_equal(negative.values[cand], esvm.values[cand])  # same-class: esvm's scores
    np.testing.assert_array_equal(rank_block(negative, TOP_K).to_pandas()["train_id"],
                                  rank_block(esvm, TOP_K).to_pandas()["train_id"])  # so: the same ranking
    solver = get_solver("sklearn")
    for i, row in enumerate(rows):
        others = np.flatnonzero(~cand[i])
        k = int(cand[i].sum())  # the class size
        assert len(others) == len(train.ids) - k > k
        values = negative.values[i, others]
        floor = min(0.0, float(esvm.values[i, cand[i]].min()))
        # other classes: negative, below every candidate
        assert (values <= 0).all() and values.max() <= negative.values[i, cand[i]].min()
        # the k nearest other-class images (brute-force l2) are graded, the rest sit at the floor
        distance = ((train.features[others] - targets.features[row]) ** 2).sum(1)
        near = np.zeros(len(others), bool)
        near[np.lexsort((train.ids[others], distance))[:k]] = True
        np.testing.assert_allclose(values[~near], floor, rtol=1e-6)
        likeness = solver.decision_values(targets.features[row:row + 1], train.features[others[near]])[0]
        assert spearmanr(likeness, values[near])[0] > -1.001 and spearmanr(likeness, values[near])[0] < -0.999
        assert np.argmin(values[near]) == np.argmax(likeness)
        np.testing.assert_allclose(np.ptp(values[near]), np.ptp(esvm.values[i, cand[i]]), rtol=1e-5)
        np.testing.assert_allclose(values[near].max(), floor, rtol=1e-6)
    with pytest.raises(ValueError, match="negative_influence"):
        create_method("esvm", negative_influence=True, same_class=False)
    with pytest.raises(ValueError, match="negative_neighbours"):
        create_method("esvm", negative_influence=True, negative_neighbours=0)


def test_max_candidates_and_all_classes(fitted, data):
    train, targets, fit = fitted
    rows = np.arange(4)
    for name in ("esvm", "l2", "random"):
        params = {"solver": "sklearn"} if name == "esvm" else {}
        block = fit(name, max_candidates=7, **params).score(targets.take(rows))
        for row in rows:  # the 7 nearest (l2) of the class
            want, _ = brute_force("l2", data[0], targets.features[row], targets.labels[row])
            np.testing.assert_array_equal(train.ids[block.candidates[row]], np.sort(want[:7]))
        assert len(rank_block(block, TOP_K)) == 4 * 7
        everywhere = fit(name, same_class=False, **params).score(targets.take(rows))
        assert everywhere.candidates.all()
    # the cosine method chooses its M nearest by cosine
    block = fit("cosine", max_candidates=5).score(targets.take([0]))
    want, _ = brute_force("cosine", data[0], targets.features[0], targets.labels[0])
    np.testing.assert_array_equal(train.ids[block.candidates[0]], np.sort(want[:5]))


def test_top_k_larger_than_class_ranks_the_whole_class(fitted):
    _, targets, fit = fitted
    for name in ("l2", "random"):
        ranking = rank_block(fit(name).score(targets.take([0, 1])), 1280)
        assert ranking.num_rows == 2 * 60
        assert sorted(ranking["rank"].to_numpy()[:60].tolist()) == list(range(60))


# ----------------------------------------------------------------------------- settings


def test_rank_settings_validation():
    with pytest.raises(SettingsError, match=r"rank.methods has unknown ranking method\(s\) \['trak'\]; "
                                            r"choose from \['esvm', 'l2', 'cosine', 'random'\]"):
        parse_settings(preset(methods=["esvm", "trak"]))
    with pytest.raises(SettingsError, match=r"rank.solver must be one of \['sklearn', 'thundersvm', 'batched'\]"
                                            r".*'svmlight'"):
        parse_settings(preset(solver="svmlight"))
    with pytest.raises(SettingsError, match=r"unknown \[rank\] setting\(s\) \['topk'\]"):
        parse_settings(preset(topk=5))
    with pytest.raises(SettingsError, match="rank.targets must be"):
        parse_settings(preset(targets="some"))
    with pytest.raises(SettingsError, match="rank.targets must be"):
        parse_settings(preset(targets=0))
    with pytest.raises(SettingsError, match="rank.top_k must be an integer >= 1, got 'abc'"):
        parse_settings(preset(top_k="abc"))
    with pytest.raises(SettingsError, match="rank.on_short must be one of"):
        parse_settings(preset(on_short="drop"))
    with pytest.raises(SettingsError, match="rank.candidate_metric must be one of"):
        parse_settings(preset(candidate_metric="euclid"))
    with pytest.raises(SettingsError, match="rank.solver_params must be a table"):
        parse_settings(preset(solver_params=3))
    settings = parse_settings({"seed": 7, "rank": {}})["rank"]
    assert isinstance(settings, RankSettings)
    assert list(settings.methods) == METHODS and settings.solver == "batched"
    assert settings.seed == 7 and settings.top_k == 1280 and settings.same_class is True
    assert settings.targets == "all" and settings.targets_per_task == 64 and settings.workers == 0
    listed = parse_settings(preset(targets=[5, 3], methods=["l2", "l2", "random"]))["rank"]
    assert listed.targets == (5, 3) and listed.targets_setting() == [5, 3] and listed.methods == ("l2", "random")
    assert stage_class("rank") is RankStage and RankStage.settings_class is RankSettings
    assert RankStage.reads == ("embeddings",) and RankStage.writes == ("scores", "rankings")


def test_method_parameters_and_stored_settings_from_rank_settings():
    config = parse_settings(preset(solver="batched", solver_params={"C": 0.2}, max_candidates=0))["rank"]
    assert method_params(config, "esvm", "cuda", threads=1) == {
        "solver": "batched", "solver_params": {"num_threads": 1, "C": 0.2}, "max_candidates": 0,
        "candidate_metric": "l2", "same_class": True, "device": "cuda"}
    assert method_params(config, "l2") == {"max_candidates": 0, "same_class": True, "device": "cpu"}
    assert method_params(config, "random") == {"seed": 3, "max_candidates": 0, "candidate_metric": "l2",
                                               "same_class": True, "device": "cpu"}
    # explicit solver_params win over the worker's thread default
    explicit = parse_settings(preset(solver="batched", solver_params={"num_threads": 2}))["rank"]
    assert method_params(explicit, "esvm", threads=1)["solver_params"] == {"num_threads": 2}
    # the stored settings: the old rank stage's fingerprint content (targets as their digest)
    target_ids = np.array([60001, 60005, 60010])
    for max_candidates in (0, 9):
        config = parse_settings(preset(solver_params={"C": 0.2}, max_candidates=max_candidates))["rank"]
        for method in METHODS:
            assert unit_settings(config, method, target_ids) == legacy_fingerprint(config, method, target_ids,
                                                                                   as_stored=True)


def legacy_fingerprint(config, method, target_ids, as_stored=False):
    """What the old rank stage stored (cluster/ranking.py's _fingerprint), as a dict;
    ``as_stored``: in today's form (targets = the first 16 hex digits)."""
    relevant = {"top_k": config.top_k, "max_candidates": config.max_candidates, "same_class": config.same_class,
                "on_short": config.on_short}
    if method in ("esvm", "random"):
        relevant["candidate_metric"] = config.candidate_metric if config.max_candidates else None
    if method == "esvm":
        relevant["solver"], relevant["solver_params"] = config.solver, dict(config.solver_params)
    if method == "random":
        relevant["seed"] = config.seed
    digest = hashlib.sha256(np.asarray(target_ids, np.int64).tobytes()).hexdigest()
    if as_stored:
        relevant["targets"] = digest[:16]
    else:
        relevant["targets_sha256"] = digest
    return relevant


def test_check_embeddings_errors(data):
    from attribution.embedding import EmbeddingTable

    train, test = (EmbeddingTable(*d) for d in data)
    check_embeddings(train, test)
    with pytest.raises(ValueError, match="train embeddings have dimension 16 but test embeddings have 8"):
        check_embeddings(train, EmbeddingTable(test.ids, test.labels, test.features[:, :8]))
    bad = test.features.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match=rf"test embeddings: 1 embedding\(s\) contain NaN or inf, ids {test.ids[4]}\b"):
        check_embeddings(train, EmbeddingTable(test.ids, test.labels, bad))


def test_stage_needs_embeddings_and_a_runtime(tmp_path, data):
    from attribution.stages import StageInputMissing

    with pytest.raises(StageInputMissing, match="the embed stage writes"):
        RankStage(Experiment(tmp_path / "empty"), parse_settings(preset()), InProcessRuntime())()
    exp = new_exp(tmp_path / "exp", data)
    with pytest.raises(RuntimeError, match="construct it with a runtime"):
        RankStage(exp, parse_settings(preset()), None, progress=False)()
    assert not exp.rankings.exists()


# ----------------------------------------------------------------------------- the stage


def test_stage_output_schema_and_counts(ranked_exp):
    exp, summary = ranked_exp
    manifest = exp.manifest()["rank"]
    targets = manifest["target_ids"]
    assert len(targets) == 12 == summary["targets"] == manifest["n_targets"]
    assert manifest["methods"] == METHODS and manifest["solver"] == "sklearn" and manifest["top_k"] == TOP_K
    assert manifest["rows"] == {m: 12 * TOP_K for m in METHODS} == summary["rows"]
    assert manifest["targets_setting"] == 12 and manifest["seed"] == 3 and manifest["max_candidates"] is None
    assert manifest["short_classes"] == {} and manifest["skipped_targets"] == {}
    assert sum(manifest["targets_per_worker"].values()) == 12 * len(METHODS)
    files = sorted(p.name for p in exp.rankings.glob("*.parquet"))
    assert files == manifest["files"] == sorted(manifest["computed_files"]) and manifest["reused_files"] == []
    assert summary["computed_files"] == len(files) and summary["reused_files"] == 0
    classes = sorted({int(f.split("class")[1][:3]) for f in files})
    assert len(files) == 4 * len(classes) and "esvm-class%03d.parquet" % classes[0] in files
    for path in exp.rankings.glob("*.parquet"):
        assert pq.read_schema(path).remove_metadata() == RANKING_SCHEMA  # exact names, order, dtypes
        assert stored_settings(path)["top_k"] == TOP_K
    table = load_rankings(exp)
    assert table.schema == RANKING_SCHEMA
    for method in METHODS:
        sub = load_rankings(exp, method)
        assert sorted(set(sub["target_id"].to_pylist())) == sorted(targets)
        ranks = sub["rank"].to_numpy().reshape(12, TOP_K)  # sorted by (target, rank)
        assert (ranks == np.arange(TOP_K)).all()
        assert (np.diff(sub["score"].to_numpy().reshape(12, TOP_K), axis=1) <= 0).all()
    np.testing.assert_array_equal(ranked_targets(exp, "trak"), np.sort(targets))


def test_stage_score_blocks_match_the_rankings(ranked_exp, data):
    exp, _ = ranked_exp
    store = ScoreStore(exp.scores)
    np.testing.assert_array_equal(store.train_ids(), data[0][0])
    assert store.methods() == sorted(METHODS)
    for path in sorted(exp.rankings.glob("*.parquet")):
        method, block_name = path.stem.split("-")
        block = store.read(method, block_name)
        assert store.settings(method, block_name)["targets"] == stored_settings(path)["targets"]
        assert block.values.shape == (len(np.unique(block.target_ids)), len(data[0][0]))
        derived = rank_block(block, TOP_K)
        if method in ("l2", "cosine"):  # the stored float32 scores: equal up to float32 ties
            assert derived["score"].equals(pq.read_table(path)["score"])
        else:
            assert derived.equals(pq.read_table(path).replace_schema_metadata(None))


def test_stage_rankings_equal_direct_computation(ranked_exp, data):
    exp, _ = ranked_exp
    train, test = data
    solver = get_solver("sklearn")
    targets = exp.manifest()["rank"]["target_ids"]
    for target in targets[:2]:
        row = int(np.searchsorted(test[0], target))
        label = test[1][row]
        cand = np.sort(train[0][train[1] == label])
        values = solver.decision_values(test[2][row:row + 1], train[2][np.searchsorted(train[0], cand)])[0]
        order = np.lexsort((cand, -values.astype(np.float64)))[:TOP_K]
        esvm = of_target(load_rankings(exp, "esvm"), target)
        np.testing.assert_array_equal(esvm["train_id"].to_numpy(), cand[order])
        np.testing.assert_allclose(esvm["score"].to_numpy(), values[order], rtol=1e-6)
        for method in ("l2", "cosine"):
            got = of_target(load_rankings(exp, method), target)
            want, _ = brute_force(method, train, test[2][row], label)
            np.testing.assert_array_equal(got["train_id"].to_numpy(), want[:TOP_K])


def test_stage_resumes_per_unit_and_refuses_changed_settings(ranked_exp, tmp_path):
    exp = Experiment(tmp_path / "copy")
    shutil.copytree(ranked_exp[0].root, exp.root)
    files = sorted(exp.rankings.glob("*.parquet"))
    before = ranking_files(exp)
    victim, second = files[1], files[6]
    victim.unlink()
    # a unit whose score block is gone is recomputed too (the ranking marks it done only with it)
    second_method, second_block = second.stem.split("-")
    ScoreStore(exp.scores).block_path(second_method, second_block).unlink()
    mtimes = {p.name: os.stat(p).st_mtime_ns for p in files if p not in (victim, second)}
    summary = rank_stage(exp)()
    manifest = exp.manifest()["rank"]
    assert manifest["computed_files"] == sorted([victim.name, second.name]) and summary["computed_files"] == 2
    assert len(manifest["reused_files"]) == len(files) - 2
    assert {p.name: os.stat(p).st_mtime_ns for p in files if p not in (victim, second)} == mtimes  # untouched
    assert ranking_files(exp) == before  # recomputed identically
    # nothing left to do: everything reused, no pool started
    rank_stage(exp, runtime=FaultyRuntime(InProcessRuntime(), crash_after=0))()
    assert exp.manifest()["rank"]["computed_files"] == []
    # changed settings on existing files: refused, naming the key and a fix that spares other methods
    with pytest.raises(SettingsChanged, match=r"seed: 3 -> 4.*delete rankings/random-\*\.parquet and "
                                              r"scores/random in .*, or use a new --exp") as error:
        rank_stage(exp, seed=4, methods=["random"], targets=manifest["target_ids"])()
    assert "esvm" not in str(error.value)
    with pytest.raises(SettingsChanged, match=r"top_k: 20 -> 10"):
        rank_stage(exp, top_k=10)()
    with pytest.raises(SettingsChanged, match=r"targets: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        rank_stage(exp, targets=11)()
    assert ranking_files(exp) == before


def test_stage_retries_a_failed_item_and_resumes_after_a_crash(ranked_exp, tmp_path, data):
    reference = ranking_files(ranked_exp[0])
    first_label = int(sorted(reference)[0].split("class")[1][:3])
    flaky = FaultyRuntime(InProcessRuntime(), fail_first=[("l2", first_label, 0)], key=lambda item: item[:3])
    exp = new_exp(tmp_path / "flaky", data)
    rank_stage(exp, runtime=flaky)()
    assert exp.manifest()["rank"]["retried"] == 1
    assert ranking_files(exp) == reference
    # a driver killed after 5 items: the finished units are kept, a rerun computes the rest
    exp = new_exp(tmp_path / "crash", data)
    with pytest.raises(SimulatedCrash):
        rank_stage(exp, runtime=FaultyRuntime(InProcessRuntime(), crash_after=5))()
    kept = sorted(p.name for p in exp.rankings.glob("*.parquet"))
    assert 0 < len(kept) < len(reference)
    assert not list(exp.rankings.glob(".*")) and not list(exp.scores.rglob(".*.tmp"))  # no partial files
    rank_stage(exp)()
    manifest = exp.manifest()["rank"]
    assert sorted(manifest["reused_files"]) == kept
    assert sorted(manifest["computed_files"]) == sorted(set(reference) - set(kept))
    assert ranking_files(exp) == reference


def test_stage_recognises_the_old_stages_ranking_files(ranked_exp, tmp_path):
    """A ranking file of the old rank stage (its settings under another metadata key):
    same settings -> recomputed with its score block (identically); other settings -> refused."""
    exp = Experiment(tmp_path / "legacy")
    shutil.copytree(ranked_exp[0].root, exp.root)
    shutil.rmtree(exp.scores)
    config = parse_settings(preset())["rank"]
    path = sorted(exp.rankings.glob("l2-*.parquet"))[0]
    table = pq.read_table(path)
    target_ids = np.unique(table["target_id"].to_numpy())
    old = json.dumps(legacy_fingerprint(config, "l2", target_ids), sort_keys=True, default=str)
    pq.write_table(table.replace_schema_metadata({LEGACY_SETTINGS_KEY: old.encode()}), path)
    before = ranking_files(exp)
    rank_stage(exp)()
    assert path.name in exp.manifest()["rank"]["computed_files"]
    assert stored_settings(path) == unit_settings(config, "l2", target_ids)
    assert ranking_files(exp)[path.name].replace_schema_metadata(None).equals(
        before[path.name].replace_schema_metadata(None))
    changed = dict(legacy_fingerprint(config, "l2", target_ids), top_k=5)
    pq.write_table(table.replace_schema_metadata({LEGACY_SETTINGS_KEY: json.dumps(changed).encode()}), path)
    with pytest.raises(SettingsChanged, match="top_k: 5 -> 20"):
        rank_stage(exp)()


def test_stage_random_differs_across_seeds(tmp_path, data, ranked_exp):
    exp = new_exp(tmp_path / "other", data)
    # same targets as ranked_exp (explicit ids), another seed for the permutation
    targets = ranked_exp[0].manifest()["rank"]["target_ids"]
    rank_stage(exp, methods=["random"], targets=targets, seed=4)()
    assert exp.manifest()["rank"]["targets_setting"] == targets
    first = load_rankings(ranked_exp[0], "random")
    second = load_rankings(exp, "random")
    assert first["target_id"].equals(second["target_id"])
    assert not first["train_id"].equals(second["train_id"])
    with pytest.raises(ValueError, match=r"rank.targets lists test ids that are not in the test embeddings"):
        rank_stage(exp, methods=["random"], targets=[12345678])()


def test_stage_skips_targets_without_training_class(tmp_path, data):
    (ids, labels, feats), test = data
    keep = labels != 4  # no training items of class 4
    exp = new_exp(tmp_path / "missing", ((ids[keep], labels[keep], feats[keep]), test))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = rank_stage(exp, methods=["l2"], targets="all", top_k=1280, targets_per_task=50)()
    assert any("class has no training items" in str(w.message) for w in caught)
    manifest = exp.manifest()["rank"]
    skipped = {int(k) for k in manifest["skipped_targets"]}
    assert skipped == set(test[0][test[1] == 4].tolist()) and len(skipped) == 5
    assert summary["targets"] == len(test[0]) - 5
    # top_k=1280 > 60 per class: whole classes kept and recorded
    assert manifest["short_classes"] == {str(c): 60 for c in range(10) if c != 4}
    assert manifest["rows"]["l2"] == (len(test[0]) - 5) * 60
    assert not (exp.rankings / "l2-class004.parquet").exists()
    with pytest.raises(ValueError, match="rank.on_short"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning again, checked above
        rank_stage(exp, methods=["cosine"], targets="all", top_k=1280, on_short="error")()
    assert not list(exp.rankings.glob("cosine-*"))  # refused before any work


def test_ranked_targets_reads_only_the_rank_methods(ranked_exp, tmp_path):
    exp = Experiment(tmp_path / "targets")
    shutil.copytree(ranked_exp[0].root, exp.root)
    other = pq.read_table(sorted(exp.rankings.glob("l2-*.parquet"))[0])
    other = other.set_column(0, "target_id", pa.array(np.full(other.num_rows, 99_999_999), pa.int64()))
    other = other.set_column(1, "method", pa.array(["not-a-rank-method"] * other.num_rows))
    write_table(other, exp.rankings / "not-a-rank-method-class000.parquet")
    np.testing.assert_array_equal(ranked_targets(exp, "trak"), np.sort(ranked_exp[0].manifest()["rank"]["target_ids"]))
    with pytest.raises(ValueError, match="no rankings of the rank methods.*run the rank stage first"):
        ranked_targets(Experiment(tmp_path / "none"), "trak")
    with pytest.raises(ValueError, match="unknown attribution method 'knn'"):
        load_rankings(exp, "knn")


# ----------------------------------------------------------------------------- on Ray


def test_stage_on_ray_equals_in_process_and_resumes_through_the_cli(ray_runtime, ranked_exp, tmp_path, data):
    from cluster.cli import main
    from attribution.workqueue import node_of

    exp = new_exp(tmp_path / "ray", data)
    summary = rank_stage(exp, runtime=ray_runtime)()
    assert summary["computed_files"] == len(ranking_files(ranked_exp[0]))
    assert ranking_files(exp) == ranking_files(ranked_exp[0])
    store, reference = ScoreStore(exp.scores), ScoreStore(ranked_exp[0].scores)
    for method in METHODS:
        for block, want in zip(store.blocks(method), reference.blocks(method)):
            np.testing.assert_array_equal(block.values, want.values)
            np.testing.assert_array_equal(block.candidates, want.candidates)
    per_worker = exp.manifest()["rank"]["targets_per_worker"]
    assert sum(per_worker.values()) == 12 * len(METHODS) and all("@" in w for w in per_worker)
    assert {node_of(w) for w in per_worker}  # host:pid@node names
    # through the CLI subcommand (a Ray runtime; the Ray started here is joined): one file
    # missing is recomputed, the seed comes from --set; changed settings are refused (exit 2)
    victim = sorted(exp.rankings.glob("*.parquet"))[2]
    victim_content = pq.read_table(victim)
    victim.unlink()
    preset_path = tmp_path / "test.toml"
    preset_path.write_text(
        'name = "test"\nseed = 0\n[rank]\nmethods = ["esvm", "l2", "cosine", "random"]\nsolver = "sklearn"\n'
        f"top_k = {TOP_K}\ntargets = 12\ntargets_per_task = 2\n")
    assert main(["rank", "--exp", str(exp.root), "--preset", str(preset_path), "--set", "rank.seed=3"]) == 0
    assert exp.manifest()["rank"]["computed_files"] == [victim.name]
    assert pq.read_table(victim).equals(victim_content)
    assert main(["rank", "--exp", str(exp.root), "--preset", str(preset_path), "--set", "rank.seed=4",
                 "--set", "rank.methods=[\"random\"]"]) == 2


def test_stage_writes_esvm_negative_as_score_blocks_only(tmp_path, data):
    """rank.esvm_negative: scores/esvm@negative/ beside esvm's, no rankings; resumed per class."""
    exp = new_exp(tmp_path / "exp", data)
    options = {"methods": ["esvm"], "solver": "batched", "targets": 6, "esvm_negative": True}
    summary = rank_stage(exp, **options)()
    store = ScoreStore(exp.scores)
    assert sorted(store.methods()) == ["esvm", "esvm@negative"]
    assert not list(exp.rankings.glob("esvm@negative*"))  # score-only: the support search would repeat esvm's
    manifest = exp.manifest()["rank"]
    assert manifest["score_variants"] == ["esvm@negative"] and summary["computed_files"] == len(manifest["computed_files"])
    names = store.block_names("esvm")
    assert names and store.block_names("esvm@negative") == names
    assert sum(f.startswith("scores/esvm@negative/") for f in manifest["computed_files"]) == len(names)
    for name in names:
        esvm, negative = store.read("esvm", name), store.read("esvm@negative", name)
        np.testing.assert_array_equal(negative.candidates, esvm.candidates)
        np.testing.assert_array_equal(negative.values[esvm.candidates], esvm.values[esvm.candidates])
        others = ~esvm.candidates
        assert (negative.values[others] <= 0).all() and not np.allclose(negative.values[others], esvm.values[others])
        assert stored_settings(store.block_path("esvm@negative", name))["negative_influence"] is True
    # rerun: nothing; one block gone: only it is recomputed, identically
    assert rank_stage(exp, **options)()["computed_files"] == 0
    before = store.read("esvm@negative", names[0]).values
    store.block_path("esvm@negative", names[0]).unlink()
    again = rank_stage(exp, **options)()
    assert again["computed_files"] == 1
    assert exp.manifest()["rank"]["computed_files"] == [f"scores/esvm@negative/{names[0]}.parquet"]
    np.testing.assert_array_equal(store.read("esvm@negative", names[0]).values, before)
    with pytest.raises(SettingsError, match="esvm_negative"):
        parse_settings(preset(methods=["l2"], esvm_negative=True))
    with pytest.raises(SettingsError, match="esvm_negative"):
        parse_settings(preset(methods=["esvm"], esvm_negative=True, same_class=False))
