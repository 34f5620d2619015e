"""The gradient-based methods (tracin, grad-dot, grad-cos, if-cg, ekfac: dattri 0.3.0 and
kronfluence 1.0.1) on real Fashion-MNIST: 300 training images plus 5 planted
near-duplicates of a test target, two MLP checkpoints trained for 2 epochs (as
tests/test_trak.py trains them), three targets. Every method is fitted once (module
fixture) and its scores are checked against the planted duplicates, against autograd,
and against itself under other memory blockings."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dattri")
pytest.importorskip("kronfluence")

from attribution import retrain  # noqa: E402
from attribution.baselines.trak import train_checkpoints  # noqa: E402
from attribution.data import load_dataset  # noqa: E402
from attribution.methods import Targets, TrainingData, available_methods, create_method, method_class  # noqa: E402

METHODS = ["tracin", "grad-dot", "grad-cos", "if-cg", "ekfac"]
TRACIN_WEIGHTS = [0.5, 2.0]  # unequal: the sum over checkpoints must weight each one
# the 2-epoch MLP's Hessian has eigenvalues down to about -1.6 (top ~23): if-cg needs
# damping above that for CG to converge (its default 1.0 is for trained models)
PARAMS = {"tracin": {"weights": TRACIN_WEIGHTS}, "if-cg": {"damping": 2.0, "max_iter": 10}}
N_PLANTED = 5
SHAPE = (28, 28, 1)
MB = 2 ** 20


def mlp():
    return retrain.build_model("mlp", 10, SHAPE)


def planted_training_set(train, target_image, target_label, seed):
    """The training images plus N_PLANTED near-duplicates of the target (seeded noise, its
    label), with ids above every real id (so the rows stay in ascending id order)."""
    rng = np.random.default_rng(seed)
    noisy = target_image[None].astype(np.float32) + rng.normal(0, 8.0, (N_PLANTED, *target_image.shape))
    planted = np.clip(noisy, 0, 255).astype(np.uint8)
    images = np.concatenate([train.images(np.arange(len(train))), planted])
    labels = np.concatenate([train.labels, np.full(N_PLANTED, target_label)]).astype(np.int64)
    ids = np.concatenate([train.ids, np.arange(N_PLANTED) + 10**7]).astype(np.int64)
    return images, labels, ids


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    train = load_dataset("fashion-mnist", "train", n_per_class=30, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=5, seed=0)
    positions = [0, 17, 33]  # three classes; the first is the planted target
    target_images = test.images(positions)
    images, labels, ids = planted_training_set(train, target_images[0], int(test.labels[positions[0]]), seed=0)
    trainer = retrain.Retrainer(retrain.make_config("mlp", epochs=2), images, labels, ids, train.mean, train.std, 10)
    states, trained, _ = train_checkpoints(trainer, tmp_path_factory.mktemp("ck"), 2, base_seed=0, recipe="test",
                                           progress=False)
    assert trained == 2
    data = TrainingData(ids, labels, images=trainer.x, extra={"model_fn": mlp, "checkpoints": states})
    targets = Targets(test.ids[positions], test.labels[positions],
                      images=retrain.to_tensor(target_images, train.mean, train.std))
    methods, blocks = {}, {}
    for name in METHODS:
        methods[name] = create_method(name, device="cpu", **PARAMS.get(name, {})).fit(data)
        blocks[name] = methods[name].score(targets)
    return {"data": data, "targets": targets, "states": states, "methods": methods, "blocks": blocks}


def test_every_method_gives_a_finite_full_block(fitted):
    data, targets = fitted["data"], fitted["targets"]
    assert available_methods("gradient") == METHODS
    for name in METHODS:
        cls = method_class(name)
        assert cls.stage == "gradient" and cls.inputs == ("images",) and cls.signed and cls.outside == "none"
        assert cls.cost.stages == ("gradient",) and f"scores/{name}" in cls.cost.paths
        assert f"rankings/{name}-*.parquet" in cls.cost.paths and "gradient/checkpoints" in cls.cost.paths
        block, method = fitted["blocks"][name], fitted["methods"][name]
        assert block.method == name and block.values.shape == (3, len(data.ids)) and block.candidates is None
        np.testing.assert_array_equal(block.train_ids, data.ids)
        np.testing.assert_array_equal(block.target_ids, targets.ids)
        np.testing.assert_array_equal(block.target_labels, targets.labels)
        assert np.isfinite(block.values).all() and (block.values > 0).any() and (block.values < 0).any(), name
        assert method.fit_seconds_ > 0 and method.score_seconds_ > 0
    assert fitted["methods"]["grad-dot"].settings() == {}
    assert fitted["methods"]["tracin"].settings() == {"weights": TRACIN_WEIGHTS}
    assert fitted["methods"]["if-cg"].settings() == {"damping": 2.0, "max_iter": 10, "hessian_examples": None,
                                                     "checkpoints": "last"}
    assert fitted["methods"]["ekfac"].settings() == {"damping": None, "empirical_fisher": False,
                                                     "checkpoints": "last", "ignore_unsupported": False, "seed": 0}
    assert max(fitted["methods"]["if-cg"].cg_residuals_) < 0.1  # CG converged
    # methods differ: no two give the same ranking of the first target
    orders = {name: tuple(np.argsort(-fitted["blocks"][name].values[0], kind="stable")[:20]) for name in METHODS}
    assert len(set(orders.values())) == len(METHODS)


def test_planted_duplicates_rank_near_the_top_with_positive_scores(fitted):
    """The sign convention: near-duplicates of the target with its label help it (they
    lower its loss), so every method scores all 5 high and positive: in its top 15 of 305
    (a random ranking: P ~ 1e-7; a flipped sign puts them last)."""
    ids = fitted["data"].ids
    planted = ids >= 10**7
    for name in METHODS:
        row = fitted["blocks"][name].values[0]
        order = np.lexsort((ids, -row))
        ranks = np.flatnonzero(planted[order])
        assert ranks.max() < 15 and (row[planted] > 0).all(), (name, ranks, row[planted])
    rng = np.random.default_rng(0)
    assert np.flatnonzero(planted[rng.permutation(len(ids))]).max() >= 15


def _loss_gradient(model, x, y):
    loss = F.cross_entropy(model(x[None]), torch.as_tensor([int(y)]))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_gradient_products_match_autograd(fitted):
    """The independent check: Grad-Dot = the dot product of the target's and the training
    image's loss gradients (plain autograd on the last checkpoint), Grad-Cos that
    normalised, TracIn the weighted sum of both checkpoints' dot products."""
    data, targets, states = fitted["data"], fitted["targets"], fitted["states"]
    models = []
    for state in states:
        model = mlp()
        model.load_state_dict(state)
        models.append(model.eval())
    pairs = [(0, len(data.ids) - 1), (1, 7), (2, 150)]  # (target row, training position): a planted one first
    for row, col in pairs:
        dots = []
        for model in models:
            g_target = _loss_gradient(model, targets.images[row], targets.labels[row])
            g_train = _loss_gradient(model, data.images[col], data.labels[col])
            dots.append(float(g_target @ g_train))
        cosine = dots[-1] / float(g_target.norm() * g_train.norm())
        np.testing.assert_allclose(fitted["blocks"]["grad-dot"].values[row, col], dots[-1], rtol=1e-4)
        np.testing.assert_allclose(fitted["blocks"]["grad-cos"].values[row, col], cosine, rtol=1e-4)
        tracin = sum(w * d for w, d in zip(TRACIN_WEIGHTS, dots))
        np.testing.assert_allclose(fitted["blocks"]["tracin"].values[row, col], tracin, rtol=1e-4)
        assert abs(dots[0] - dots[1]) > 1e-3 * abs(dots[1])  # the checkpoints differ


def test_memory_blocks_do_not_change_the_scores(fitted):
    """max_block_mb below one target's row (305 floats): blocks of one target and at most
    200 training images (within the bound); the same scores as one block. Checked
    for each of the three block implementations (dattri's TracIn attributor, which
    tracin / grad-dot / grad-cos share; the CG solve reused across column blocks;
    kronfluence's pairwise scores over a subset of the training images)."""
    n_train = len(fitted["data"].ids)
    for name, rows in [("grad-dot", 2), ("if-cg", 1), ("ekfac", 1)]:  # (fewer targets where slow)
        full = fitted["blocks"][name].values[:rows]
        method = copy.copy(fitted["methods"][name])  # the fitted state, another bound
        method.max_block_mb = 200 * 4 / MB
        block = method.score(fitted["targets"].take(np.arange(rows)))
        assert method.blocks_ == [(1, 200), (1, n_train - 200)] * rows, (name, method.blocks_)
        # CG's solution is as exact as its residual (~5e-3 after 10 steps): the rounding of
        # 1 vs 3 targets solved together (vmapped) moves if-cg's scores by ~1e-4 of the largest
        tolerance = 2e-3 if name == "if-cg" else 1e-5
        np.testing.assert_allclose(block.values, full, rtol=1e-4, atol=tolerance * np.abs(full).max(), err_msg=name)
    # the plan: as many targets per block as the bound (and batch_size) allow
    assert create_method("grad-dot", max_block_mb=2 * n_train * 4 / MB).block_shape(3, n_train) == (2, n_train)
    assert create_method("grad-dot", max_block_mb=2 * n_train * 4 / MB - 1e-6).block_shape(3, n_train) == (1, n_train)
    assert create_method("grad-dot", batch_size=2).block_shape(5, n_train) == (2, n_train)
    assert create_method("grad-dot").block_shape(5, n_train) == (5, n_train)
    assert create_method("grad-dot", max_block_mb=7 / MB).block_shape(5, n_train) == (1, 1)


def test_streamed_training_images_give_the_same_scores(fitted):
    """A training set read in slices (StreamedImages, as file-backed sets reach TRAK),
    never more than one batch at a time: the scores of the held tensor."""
    from attribution.baselines.trak import StreamedImages

    data = fitted["data"]
    largest = []

    def read(positions):
        largest.append(len(positions))
        return data.images[torch.as_tensor(positions)]

    streamed = TrainingData(data.ids, data.labels, images=StreamedImages(read, len(data.ids)), extra=data.extra)
    method = create_method("grad-dot", device="cpu", batch_size=64).fit(streamed)
    block = method.score(fitted["targets"].take([1]))
    np.testing.assert_allclose(block.values, fitted["blocks"]["grad-dot"].values[1:2], rtol=1e-4,
                               atol=1e-6 * np.abs(block.values).max())
    assert max(largest) == 64


def test_ekfac_refuses_a_layer_kronfluence_cannot_track(fitted):
    """A LayerNorm (trainable weight and bias) between the Linear layers: EK-FAC fails in
    fit, before any factor is computed, naming the method, the layer and the supported
    types; with ignore_unsupported=True it attributes through the Linear layers."""
    data = fitted["data"]

    def with_layer_norm():
        model = _small_model()
        model.insert(3, torch.nn.LayerNorm(16))  # after the first Linear: layer '3'
        return model

    torch.manual_seed(0)
    small = TrainingData(data.ids[:40], data.labels[:40], images=data.images[:40],
                         extra={"model_fn": with_layer_norm, "checkpoints": [with_layer_norm().state_dict()]})
    method = create_method("ekfac", device="cpu")
    with pytest.raises(ValueError, match=r"ekfac: layer '3' \(LayerNorm\) .*supported layer types: Conv2d, Linear"):
        method.fit(small)
    assert not hasattr(method, "analyzers_") and not hasattr(method, "fit_seconds_")
    lenient = create_method("ekfac", device="cpu", ignore_unsupported=True).fit(small)
    block = lenient.score(fitted["targets"].take([0]))
    assert block.values.shape == (1, 40) and np.isfinite(block.values).all() and np.abs(block.values).max() > 0
    # the dattri methods differentiate any torch module: the same model is fine for grad-dot
    assert np.isfinite(create_method("grad-dot", device="cpu").fit(small).score(
        fitted["targets"].take([0])).values).all()


def _small_model():
    return torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(49, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 10))


def test_checkpoint_ensembles_average_the_checkpoints(fitted):
    """checkpoints="all" (if-cg, ekfac): the mean of the scores of each checkpoint alone
    (a small model, two checkpoints, 60 images: cheap factors and Hessians)."""
    data, targets = fitted["data"], fitted["targets"].take([0, 1])
    torch.manual_seed(1)
    states = [_small_model().state_dict() for _ in range(2)]

    def training(checkpoints):
        return TrainingData(data.ids[:60], data.labels[:60], images=data.images[:60],
                            extra={"model_fn": _small_model, "checkpoints": checkpoints})

    for name, params in [("if-cg", {"damping": 5.0}), ("ekfac", {})]:
        both = create_method(name, device="cpu", checkpoints="all", **params).fit(training(states))
        got = both.score(targets).values
        first = create_method(name, device="cpu", **params).fit(training(states[:1])).score(targets).values
        # "last" (the default) takes the final checkpoint only
        last = create_method(name, device="cpu", **params).fit(training(states)).score(targets).values
        np.testing.assert_allclose(got, (first + last) / 2, rtol=1e-4, atol=1e-6 * np.abs(got).max(), err_msg=name)
        assert not np.allclose(first, last, rtol=0.1)


def test_if_cg_refuses_an_unconverged_solve(fitted):
    """Damping below the 2-epoch MLP's negative curvature (-1.6): CG diverges; score says
    so (residual, damping) instead of returning scores of arbitrary sign."""
    method = create_method("if-cg", device="cpu", damping=0.01, max_iter=5).fit(fitted["data"])
    with pytest.raises(ValueError, match=r"if-cg: conjugate gradient did not solve .*raise damping"):
        method.score(fitted["targets"].take([0]))
    assert method.cg_residuals_[0] > 0.1


def test_bad_inputs_and_parameters_are_named(fitted):
    data, targets = fitted["data"], fitted["targets"]
    bad = [("tracin", {"weights": [1.0, -1.0]}, "weights\\[1\\]"), ("tracin", {"weights": []}, "weights"),
           ("grad-dot", {"device": "gpu"}, "device"), ("grad-cos", {"batch_size": 0}, "batch_size"),
           ("if-cg", {"max_block_mb": 0}, "max_block_mb"), ("if-cg", {"damping": -1}, "damping"),
           ("if-cg", {"max_iter": 0}, "max_iter"), ("if-cg", {"checkpoints": "first"}, "checkpoints"),
           ("ekfac", {"empirical_fisher": "yes"}, "empirical_fisher"), ("ekfac", {"seed": -1}, "seed")]
    for name, params, match in bad:
        with pytest.raises(ValueError, match=f"{name}: {match}"):
            create_method(name, **params)
    for name in METHODS:
        with pytest.raises(RuntimeError, match=f"{name}: call fit"):
            create_method(name).score(targets)
        with pytest.raises(ValueError, match=f"{name}: fit needs .*missing \\['checkpoints'\\]"):
            create_method(name).fit(TrainingData(data.ids, data.labels, images=data.images,
                                                 extra={"model_fn": mlp}))
    three = TrainingData(data.ids, data.labels, images=data.images,
                         extra={"model_fn": mlp, "checkpoints": fitted["states"] + fitted["states"][:1]})
    with pytest.raises(ValueError, match="tracin: 2 weights for 3 checkpoints"):
        create_method("tracin", weights=TRACIN_WEIGHTS).fit(three)
    other = TrainingData(data.ids, data.labels, images=data.images,
                         extra={"model_fn": lambda: retrain.build_model("mlp", 10, SHAPE, width=32),
                                "checkpoints": fitted["states"]})
    with pytest.raises(ValueError, match="grad-dot: checkpoint 0 does not fit the model"):
        create_method("grad-dot").fit(other)
    with pytest.raises(ValueError, match="grad-dot: target labels span .* but the model has 10 classes"):
        fitted["methods"]["grad-dot"].score(Targets(targets.ids[:1], [10], images=targets.images[:1]))
