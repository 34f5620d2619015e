"""Same-class candidates and k-NN rankings from FAISS, checked against numpy brute force
on real Fashion-MNIST features (PCA of the pixels of a seeded subset)."""

import functools

import numpy as np
import pytest

from attribution.candidates import CandidateIndex


@functools.lru_cache(maxsize=None)
def fmnist_features(train_per_class=60, test_per_class=5, dim=16, seed=0):
    """Real Fashion-MNIST items: (train ids, labels, features), (test ids, labels, features).

    Features are a PCA of the raw pixels fitted on the training subset: real image
    structure (near duplicates, class clusters) without needing a backbone.
    """
    from attribution.data import load_dataset

    train = load_dataset("fashion-mnist", "train", n_per_class=train_per_class, seed=seed)
    test = load_dataset("fashion-mnist", "test", n_per_class=test_per_class, seed=seed)
    x_train = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float64) / 255
    x_test = test.images(np.arange(len(test))).reshape(len(test), -1).astype(np.float64) / 255
    mean = x_train.mean(0)
    _, _, vt = np.linalg.svd(x_train - mean, full_matrices=False)
    basis = vt[:dim].T
    f_train = ((x_train - mean) @ basis).astype(np.float32)
    f_test = ((x_test - mean) @ basis).astype(np.float32)
    return (train.ids.copy(), train.labels.copy(), f_train), (test.ids.copy(), test.labels.copy(), f_test)


def brute_force(metric, train, target_feature, label, same_class=True):
    """Numpy float64: (ids, scores) of the candidates sorted by (score desc, id asc)."""
    ids, labels, feats = train
    keep = labels == label if same_class else np.ones(len(ids), bool)
    x, q = feats[keep].astype(np.float64), target_feature.astype(np.float64)
    if metric == "l2":
        scores = -np.sqrt(((x - q) ** 2).sum(1))
    else:
        scores = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    order = np.lexsort((ids[keep], -scores))
    return ids[keep][order], scores[order]


@pytest.fixture(scope="module")
def data():
    return fmnist_features()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_search_equals_numpy_brute_force(data, metric):
    train, (t_ids, t_labels, t_feats) = data
    # fit on a shuffled copy: the index must not depend on the input order
    perm = np.random.default_rng(1).permutation(len(train[0]))
    index = CandidateIndex(metric, device="cpu").fit(train[0][perm], train[1][perm], train[2][perm])
    k = 25
    ids, scores = index.search(t_feats, t_labels, k)
    assert ids.shape == scores.shape == (len(t_ids), k)
    for row in range(len(t_ids)):
        want_ids, want_scores = brute_force(metric, train, t_feats[row], t_labels[row])
        np.testing.assert_array_equal(ids[row], want_ids[:k])
        np.testing.assert_allclose(scores[row], want_scores[:k], rtol=1e-12, atol=1e-12)
        assert set(train[1][np.searchsorted(train[0], ids[row])]) == {t_labels[row]}


def test_all_classes_search_equals_numpy(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("l2", device="cpu").fit(*train)
    ids, _ = index.search(t_feats[:10], t_labels[:10], 30, same_class=False)
    for row in range(10):
        want, _ = brute_force("l2", train, t_feats[row], t_labels[row], same_class=False)
        np.testing.assert_array_equal(ids[row], want[:30])
    # across classes the neighbours are not all of the target's class (real data overlaps)
    labels_found = train[1][np.searchsorted(train[0], ids.ravel())]
    assert len(np.unique(labels_found)) > 1


def test_candidates_whole_class_and_nearest_m(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("l2", device="cpu").fit(*train)
    whole = index.candidates(t_feats, t_labels)
    for row, cand in enumerate(whole):
        np.testing.assert_array_equal(cand, np.sort(train[0][train[1] == t_labels[row]]))
    nearest = index.candidates(t_feats, t_labels, max_candidates=7)
    for row, cand in enumerate(nearest):
        want, _ = brute_force("l2", train, t_feats[row], t_labels[row])
        np.testing.assert_array_equal(cand, np.sort(want[:7]))
    everything = index.candidates(t_feats[:2], t_labels[:2], same_class=False)
    np.testing.assert_array_equal(everything[0], np.sort(train[0]))
    # M larger than the class: the whole class
    big = index.candidates(t_feats[:1], t_labels[:1], max_candidates=10_000)
    np.testing.assert_array_equal(big[0], whole[0])


def test_ties_are_broken_by_id(data):
    train, _ = data
    ids, labels, feats = train
    # three exact duplicates of one item under new ids: equal scores, ordered by id
    extra_ids = np.array([10_000_003, 10_000_001, 10_000_002])
    index = CandidateIndex("l2", device="cpu").fit(
        np.concatenate([ids, extra_ids]), np.concatenate([labels, [labels[0]] * 3]),
        np.concatenate([feats, np.repeat(feats[:1], 3, axis=0)]))
    got, scores = index.search(feats[:1], labels[:1], 4)
    assert got[0].tolist() == [ids[0], 10_000_001, 10_000_002, 10_000_003]
    assert np.all(scores[0] == 0)


def test_short_class_pads_with_minus_one(data):
    train, (t_ids, t_labels, t_feats) = data
    index = CandidateIndex("cosine", device="cpu").fit(*train)
    ids, scores = index.search(t_feats[:2], t_labels[:2], 100)  # a class holds 60 items
    assert (ids[:, :60] >= 0).all() and (ids[:, 60:] == -1).all()
    assert np.isneginf(scores[:, 60:]).all()


def test_bad_inputs_have_clear_errors(data):
    (ids, labels, feats), (t_ids, t_labels, t_feats) = data
    bad = feats.copy()
    bad[[3, 7]] = np.nan
    bad[9, 0] = np.inf
    with pytest.raises(ValueError, match=rf"ids {ids[3]}, {ids[7]}, {ids[9]}"):
        CandidateIndex("l2").fit(ids, labels, bad)
    index = CandidateIndex("l2", device="cpu").fit(ids, labels, feats)
    with pytest.raises(ValueError, match="dimension 15 but the training embeddings have 16"):
        index.search(t_feats[:, :15], t_labels, 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        index.candidates(np.full_like(t_feats[:1], np.nan), t_labels[:1])
    with pytest.raises(ValueError, match="class 42 has no training items"):
        index.candidates(t_feats[:1], np.array([42]))
    with pytest.raises(ValueError, match=r"\['l2', 'cosine'\]"):
        CandidateIndex("euclid")
    with pytest.raises(ValueError, match="duplicate training ids"):
        CandidateIndex("l2").fit(np.array([1, 1]), np.array([0, 0]), feats[:2])
    with pytest.raises(RuntimeError, match="not fitted"):
        CandidateIndex("l2").candidates(t_feats, t_labels)


def test_gpu_request_without_gpu_is_explained(data):
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible: the CPU-only error path does not apply")
    with pytest.raises(ValueError, match="no GPU"):
        CandidateIndex("l2", device="gpu").fit(*data[0])
    # "auto" silently stays on CPU
    assert CandidateIndex("l2", device="auto").fit(*data[0]).use_gpu_ is False
