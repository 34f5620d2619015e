"""Rankings: the plain-Python ranker and the Ray rank stage, on real Fashion-MNIST
features (PCA of pixels), real FAISS, real Parquet and a real local Ray."""

import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from attribution.candidates import CandidateIndex
from attribution.esvm import get_solver
from attribution.experiment import Experiment, write_json_atomic, write_table_atomic
from attribution.ranking import RANKING_SCHEMA, load_rankings, rank_targets
from test_candidates import brute_force, fmnist_features

TOP_K = 20


def write_embeddings(exp: Experiment, train, test):
    """EXP/embeddings in the embed stage's layout (one shard per split + manifest)."""
    from attribution.embedding import FORMAT, MANIFEST_NAME, VERSION, shard_table

    dim = train[2].shape[1]
    splits = {}
    for split, (ids, labels, feats) in (("train", train), ("test", test)):
        name = f"{split}-00000.parquet"
        write_table_atomic(shard_table(split, ids, labels, feats), exp.embeddings / name)
        splits[split] = {"rows": len(ids), "complete": True,
                         "shards": [{"file": name, "start": 0, "stop": len(ids), "rows": len(ids)}]}
    write_json_atomic(exp.embeddings / MANIFEST_NAME,
                      {"format": FORMAT, "version": VERSION, "dim": dim, "dtype": "float32", "splits": splits})


def preset(**rank):
    base = {"methods": ["esvm", "l2", "cosine", "random"], "solver": "sklearn", "top_k": TOP_K,
            "targets": 12, "targets_per_task": 2, "seed": 3}
    base.update(rank)
    return {"name": "test", "seed": 0, "rank": base}


@pytest.fixture(scope="module")
def data():
    return fmnist_features()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ranked_exp(tmp_path_factory, data, ray_local):
    """One stage run shared by the checks below (Ray startup dominates the cost)."""
    from cluster.ranking import run_rank_stage

    exp = Experiment(tmp_path_factory.mktemp("exp")).create()
    write_embeddings(exp, *data)
    summary = run_rank_stage(exp, preset(), address=None)
    return exp, summary


# ----------------------------------------------------------------------------- plain ranker


@pytest.mark.parametrize("method", ["l2", "cosine"])
def test_knn_rankings_equal_numpy(data, method):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex(method, device="cpu").fit(*train)
    table = rank_targets(method, index, t_ids[:6], t_labels[:6], t_feats[:6], top_k=TOP_K)
    assert table.schema == RANKING_SCHEMA
    for row in range(6):
        got = table.filter(pa.compute.equal(table["target_id"], t_ids[row]))
        want_ids, want_scores = brute_force(method, train, t_feats[row], t_labels[row])
        np.testing.assert_array_equal(got["train_id"].to_numpy(), want_ids[:TOP_K])
        np.testing.assert_allclose(got["score"].to_numpy(), want_scores[:TOP_K].astype(np.float32))
        assert got["rank"].to_numpy().tolist() == list(range(TOP_K))
    # l2 scores are negative distances: higher = nearer
    if method == "l2":
        assert (table["score"].to_numpy() <= 0).all()


def test_random_ranking_is_seeded_per_target(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("l2", device="cpu").fit(*train)
    group = rank_targets("random", index, t_ids[:8], t_labels[:8], t_feats[:8], top_k=TOP_K, seed=5)
    again = rank_targets("random", index, t_ids[:8], t_labels[:8], t_feats[:8], top_k=TOP_K, seed=5)
    assert group.equals(again)
    # one target alone gives the same permutation as within a group (worker/grouping independent)
    alone = rank_targets("random", index, t_ids[3:4], t_labels[3:4], t_feats[3:4], top_k=TOP_K, seed=5)
    assert alone.equals(group.filter(pa.compute.equal(group["target_id"], t_ids[3])))
    # the generator is seeded by (seed, target id): two targets of one class differ
    same = np.flatnonzero(t_labels[:8] == t_labels[0])
    assert len(same) >= 2, "the fixture's first 8 targets should share a class"
    rankings = [group.filter(pa.compute.equal(group["target_id"], t_ids[r]))["train_id"].to_numpy() for r in same[:2]]
    assert not np.array_equal(*rankings)
    for tid in (t_ids[0], t_ids[1]):
        cand = np.sort(train[0][train[1] == t_labels[t_ids == tid][0]])
        draws = np.random.default_rng([5, int(tid)]).random(len(cand), dtype=np.float32)
        want = cand[np.lexsort((cand, -draws.astype(np.float64)))[:TOP_K]]
        got = group.filter(pa.compute.equal(group["target_id"], tid))["train_id"].to_numpy()
        np.testing.assert_array_equal(got, want)
    other = rank_targets("random", index, t_ids[:8], t_labels[:8], t_feats[:8], top_k=TOP_K, seed=6)
    assert not np.array_equal(other["train_id"].to_numpy(), group["train_id"].to_numpy())
    # still same-class candidates
    labels = train[1][np.searchsorted(train[0], group["train_id"].to_numpy())]
    assert np.array_equal(labels, np.repeat(t_labels[:8], TOP_K))


def test_esvm_ranking_matches_solver_and_breaks_ties_by_id(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("l2", device="cpu").fit(*train)
    solver = get_solver("sklearn")
    table = rank_targets("esvm", index, t_ids[:3], t_labels[:3], t_feats[:3], top_k=TOP_K, solver=solver)
    cand = np.sort(train[0][train[1] == t_labels[0]])
    values = solver.decision_values(t_feats[:1], index.features_of(cand))[0]
    order = np.lexsort((cand, -values.astype(np.float64)))[:TOP_K]
    first = table.filter(pa.compute.equal(table["target_id"], t_ids[0]))
    np.testing.assert_array_equal(first["train_id"].to_numpy(), cand[order])
    np.testing.assert_array_equal(first["score"].to_numpy(), values[order])

    class ConstantSolver:  # every candidate ties: the ranking must be ascending ids
        def decision_values(self, targets, negatives):
            return np.zeros((len(targets), len(negatives)), np.float32)

    # all 600 training items tie (all-classes mode): an unstable sort would scramble them
    tied = rank_targets("esvm", index, t_ids[:1], t_labels[:1], t_feats[:1], top_k=300,
                        solver=ConstantSolver(), same_class=False)
    np.testing.assert_array_equal(tied["train_id"].to_numpy(), np.sort(train[0])[:300])


def test_top_k_larger_than_class(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("l2", device="cpu").fit(*train)
    for method in ("l2", "random"):
        # default "keep": the whole class (60 items) is ranked
        table = rank_targets(method, index, t_ids[:2], t_labels[:2], t_feats[:2], top_k=1280)
        assert table.num_rows == 2 * 60
        assert sorted(table["rank"].to_numpy()[:60].tolist()) == list(range(60))
        with pytest.raises(ValueError, match=r"only 60 candidate training items but top_k=1280.*rank.top_k=60"):
            rank_targets(method, index, t_ids[:2], t_labels[:2], t_feats[:2], top_k=1280, on_short="error")


def test_ranker_bad_names(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("l2", device="cpu").fit(*train)
    with pytest.raises(ValueError, match=r"\['esvm', 'l2', 'cosine', 'random'\]"):
        rank_targets("knn", index, t_ids[:1], t_labels[:1], t_feats[:1])
    with pytest.raises(ValueError, match="needs a CandidateIndex\\(metric='cosine'\\)"):
        rank_targets("cosine", index, t_ids[:1], t_labels[:1], t_feats[:1])
    with pytest.raises(ValueError, match="needs a solver"):
        rank_targets("esvm", index, t_ids[:1], t_labels[:1], t_feats[:1])
    with pytest.raises(ValueError, match=r"\['sklearn', 'thundersvm', 'batched'\]"):
        get_solver("liblinear")


def test_rank_settings_errors():
    from cluster.ranking import rank_settings

    with pytest.raises(ValueError, match=r"unknown ranking method.*\['esvm', 'l2', 'cosine', 'random'\]"):
        rank_settings(preset(methods=["esvm", "trak"]))
    with pytest.raises(ValueError, match=r"unknown ESVM solver 'svmlight'.*\['sklearn', 'thundersvm', 'batched'\]"):
        rank_settings(preset(solver="svmlight"))
    with pytest.raises(ValueError, match="unknown \\[rank\\] setting"):
        rank_settings(preset(topk=5))
    with pytest.raises(ValueError, match="rank.targets"):
        rank_settings(preset(targets="some"))
    settings = rank_settings({"seed": 7, "rank": {}})
    assert settings["methods"] == ["esvm", "l2", "cosine", "random"] and settings["solver"] == "batched"
    assert settings["seed"] == 7 and settings["top_k"] == 1280 and settings["same_class"] is True


def test_check_inputs_errors(data):
    from attribution.embedding import EmbeddingTable
    from cluster.ranking import check_inputs

    train, test = (EmbeddingTable(*d) for d in data)
    check_inputs(train, test)
    with pytest.raises(ValueError, match="train embeddings have dimension 16 but test embeddings have 8"):
        check_inputs(train, EmbeddingTable(test.ids, test.labels, test.features[:, :8]))
    bad = test.features.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match=rf"test embeddings: 1 embedding\(s\) contain NaN or inf, ids {test.ids[4]}\b"):
        check_inputs(train, EmbeddingTable(test.ids, test.labels, bad))


# ----------------------------------------------------------------------------- the Ray stage


def test_stage_output_schema_and_counts(ranked_exp):
    exp, summary = ranked_exp
    manifest = exp.manifest()["rank"]
    targets = manifest["target_ids"]
    assert len(targets) == 12 == summary["targets"]
    assert manifest["methods"] == ["esvm", "l2", "cosine", "random"] and manifest["solver"] == "sklearn"
    assert manifest["rows"] == {m: 12 * TOP_K for m in manifest["methods"]}
    files = sorted(p.name for p in exp.rankings.glob("*.parquet"))
    assert files == manifest["files"]
    classes = sorted({int(f.split("class")[1][:3]) for f in files})
    assert len(files) == 4 * len(classes) and "esvm-class%03d.parquet" % classes[0] in files
    for path in exp.rankings.glob("*.parquet"):
        schema = pq.read_schema(path)
        assert schema.remove_metadata() == RANKING_SCHEMA  # exact names, order, dtypes
    table = load_rankings(exp)
    assert table.schema == RANKING_SCHEMA
    for method in manifest["methods"]:
        sub = load_rankings(exp, method)
        assert sorted(set(sub["target_id"].to_pylist())) == sorted(targets)
        ranks = sub["rank"].to_numpy().reshape(12, TOP_K)  # sorted by (target, rank)
        assert (ranks == np.arange(TOP_K)).all()
        # scores non-increasing along each ranking
        assert (np.diff(sub["score"].to_numpy().reshape(12, TOP_K), axis=1) <= 0).all()


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
        esvm = load_rankings(exp, "esvm")
        esvm = esvm.filter(pa.compute.equal(esvm["target_id"], target))
        np.testing.assert_array_equal(esvm["train_id"].to_numpy(), cand[order])
        np.testing.assert_allclose(esvm["score"].to_numpy(), values[order], rtol=1e-6)
        for method in ("l2", "cosine"):
            got = load_rankings(exp, method)
            got = got.filter(pa.compute.equal(got["target_id"], target))
            want, _ = brute_force(method, train, test[2][row], label)
            np.testing.assert_array_equal(got["train_id"].to_numpy(), want[:TOP_K])


def test_stage_resumes_only_missing_file(ranked_exp, data):
    from cluster.cli import main

    exp, _ = ranked_exp
    files = sorted(exp.rankings.glob("*.parquet"))
    random_before = load_rankings(exp, "random")
    victim = files[1]
    victim_content = pq.read_table(victim)
    victim.unlink()
    before = {p.name: os.stat(p).st_mtime_ns for p in files if p != victim}
    preset_path = exp.root / "test.toml"
    preset_path.write_text(
        'name = "test"\nseed = 0\n[rank]\nmethods = ["esvm", "l2", "cosine", "random"]\nsolver = "sklearn"\n'
        f"top_k = {TOP_K}\ntargets = 12\ntargets_per_task = 2\n")
    # through the CLI subcommand; the seed comes from --set
    assert main(["rank", "--exp", str(exp.root), "--preset", str(preset_path), "--set", "rank.seed=3"]) == 0
    manifest = exp.manifest()["rank"]
    assert manifest["computed_files"] == [victim.name]
    assert victim.name not in manifest["reused_files"] and len(manifest["reused_files"]) == len(files) - 1
    after = {p.name: os.stat(p).st_mtime_ns for p in files if p != victim}
    assert after == before  # untouched
    assert pq.read_table(victim).equals(victim_content)  # recomputed identically
    assert load_rankings(exp, "random").equals(random_before)
    # changed settings on existing files: refused, naming the fix
    assert main(["rank", "--exp", str(exp.root), "--preset", str(preset_path), "--set", "rank.seed=4",
                 "--set", "rank.methods=[\"random\"]"]) == 2
    from cluster.ranking import run_rank_stage

    with pytest.raises(ValueError, match="other settings.*delete"):
        run_rank_stage(exp, preset(seed=4, methods=["random"]), None)


def test_stage_random_differs_across_seeds(tmp_path, data, ray_local, ranked_exp):
    from cluster.ranking import run_rank_stage

    exp = Experiment(tmp_path / "other").create()
    write_embeddings(exp, *data)
    # same targets as ranked_exp (explicit ids), another seed for the permutation
    targets = ranked_exp[0].manifest()["rank"]["target_ids"]
    run_rank_stage(exp, preset(methods=["random"], targets=targets, seed=4), None)
    first = load_rankings(ranked_exp[0], "random")
    second = load_rankings(exp, "random")
    assert first["target_id"].equals(second["target_id"])
    assert not first["train_id"].equals(second["train_id"])


def test_stage_skips_targets_without_training_class(tmp_path, data, ray_local):
    from cluster.ranking import run_rank_stage

    (ids, labels, feats), test = data
    keep = labels != 4  # no training items of class 4
    exp = Experiment(tmp_path / "missing").create()
    write_embeddings(exp, (ids[keep], labels[keep], feats[keep]), test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_rank_stage(exp, preset(methods=["l2"], targets="all", top_k=1280, targets_per_task=50), None)
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
        run_rank_stage(exp, preset(methods=["cosine"], targets="all", top_k=1280, on_short="error"), None)
