"""Further training (Wei et al.'s final-model-only gold standard) on real Fashion-MNIST."""

import numpy as np
import pytest
import torch

from attribution import retrain
from attribution.data import load_dataset
from attribution.further_training import FurtherTrainer, agreement, gold_scores, loo_order

SHAPE = (28, 28, 1)


def mlp():
    return retrain.build_model("mlp", 10, SHAPE)


@pytest.fixture(scope="module")
def trained():
    """A real MLP trained on 300 Fashion-MNIST images, and 6 test targets."""
    train = load_dataset("fashion-mnist", "train", n_per_class=30, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=1, seed=0)
    x = retrain.to_tensor(train.images(np.arange(len(train))), train.mean, train.std)
    tx = retrain.to_tensor(test.images(np.arange(6)), train.mean, train.std)
    y, ty = torch.as_tensor(train.labels), torch.as_tensor(test.labels[:6])
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 50):
            batch = order[start:start + 50]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.state_dict(), x, y, tx, ty


def test_leave_one_out_order_keeps_every_other_image_in_place():
    full = loo_order(10, torch.Generator().manual_seed(3), None)
    loo = loo_order(10, torch.Generator().manual_seed(3), 4)
    assert sorted(full.tolist()) == list(range(10)) and 4 not in loo.tolist()
    assert loo.tolist() == [i for i in full.tolist() if i != 4]


def test_runs_are_deterministic_per_seed_and_differ_by_the_left_out_image(trained):
    state, x, y, tx, ty = trained
    trainer = FurtherTrainer(mlp, state, x, y, tx, ty, lr=1e-2, epochs=2, batch_size=32)
    a, b = trainer.run(seed=1), trainer.run(seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 6) and np.isfinite(a).all()
    assert not np.array_equal(trainer.run(seed=1, left_out=5), a)  # the left-out image mattered
    assert not np.array_equal(trainer.run(seed=2), a)              # another seed, another order
    with pytest.raises(ValueError, match="left_out"):
        trainer.run(seed=1, left_out=len(y))
    with pytest.raises(ValueError, match="lr"):
        FurtherTrainer(mlp, state, x, y, tx, ty, lr=0)


def test_short_full_batch_further_training_is_the_gradient_dot_product(trained):
    """One full-batch step at a small lr: removing image j moves the weights by
    lr/(n-1) * (grad_j - mean grad) to first order, so the target's loss changes by
    lr/(n-1) * grad_t . (grad_j - mean grad): the gold scores agree with that Grad-Dot,
    computed directly (torch.func in float64, independent of the code under test)."""
    from torch.func import functional_call, grad, vmap

    state, x, y, tx, ty = trained
    left = list(range(0, 300, 10))  # 30 left-out images
    trainer = FurtherTrainer(mlp, state, x, y, tx, ty, lr=1e-3, epochs=1, batch_size=len(y))
    runs = [trainer.runs(seed, left) for seed in (0, 1)]
    gold = gold_scores(np.stack([r["full"] for r in runs]), np.stack([r["loo"] for r in runs]))
    assert gold.shape == (1, 6, 30)

    model = mlp()
    model.load_state_dict(state)
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    def grads(images, labels):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, images.double(), labels)
        return torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], dim=1)

    g_all, g_target = grads(x, y), grads(tx, ty)
    centred = g_all[left] - g_all.mean(dim=0)
    expected = (g_target @ centred.T).numpy() * 1e-3 / (len(y) - 1)
    measured = agreement(gold[0], expected)
    assert np.min(measured["cosine"]) > 0.99, measured
    assert np.min(measured["spearman"]) > 0.95, measured
    np.testing.assert_allclose(gold[0], expected, rtol=0.05, atol=1e-3 * np.abs(expected).max())
    # against an unrelated score: no agreement
    shuffled = agreement(gold[0], np.random.default_rng(0).permuted(expected, axis=1))
    assert np.mean(shuffled["cosine"]) < 0.5


def test_gold_scores_and_agreement_by_hand():
    full = np.array([[[1.0, 2.0]], [[3.0, 4.0]]])              # 2 seeds, 1 epoch, 2 targets
    loo = np.array([[[[1.5, 2.0]], [[1.0, 1.0]]],
                    [[[3.5, 4.0]], [[3.0, 5.0]]]])             # 2 seeds, 2 left out, 1 epoch, 2 targets
    gold = gold_scores(full, loo)
    np.testing.assert_allclose(gold, [[[0.5, 0.0], [0.0, 0.0]]])
    result = agreement(np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([[2.0, 4.0], [-3.0, 1.0]]))
    np.testing.assert_allclose(result["cosine"], [1.0, -1.0])
    np.testing.assert_allclose(result["spearman"], [1.0, -1.0])
    assert np.isnan(agreement(np.zeros((1, 3)), np.ones((1, 3)))["cosine"][0])
    with pytest.raises(ValueError, match="agree"):
        gold_scores(full, loo[:1])


def test_agreement_table_pairs_methods_on_the_gold_targets(tmp_path):
    """A method whose scores are the gold scores agrees perfectly, their negation at -1,
    noise near 0; the table pairs the methods on the targets every one scored, and the
    findings follow the intervals, not the wording."""
    import pandas as pd

    from attribution import metrics as M
    from attribution.methods import ScoreBlock
    from attribution.report import further_findings
    from attribution.scores import ScoreStore

    rng = np.random.default_rng(0)
    train_ids, target_ids, left_out = np.arange(100, 140), np.array([5, 6, 7, 8]), np.arange(100, 140, 4)
    gold_cube = rng.normal(size=(2, 4, 10))  # (epochs, targets, left out)
    gold = pd.DataFrame([{"epoch": e + 1, "target_id": t, "train_id": j, "gold": gold_cube[e, ti, ji]}
                         for e in range(2) for ti, t in enumerate(target_ids) for ji, j in enumerate(left_out)])
    store = ScoreStore(tmp_path / "scores")
    full = np.zeros((4, 40))
    full[:, (left_out - 100)] = gold_cube[0]
    labels = np.zeros(4, np.int64)
    for name, values in (("grad-dot", full), ("if-cg", -full), ("random", rng.normal(size=(4, 40)))):
        store.write(ScoreBlock(name, target_ids, labels, train_ids, values.astype(np.float32)), "class000", {})
    per_target = M.further_agreement_per_target(store, gold)
    table = M.further_agreement_table(per_target, n_boot=200)
    at = table.set_index(["method", "epoch"])
    assert at.loc[("grad-dot", 1), "cosine"] == pytest.approx(1.0, abs=1e-6)
    assert at.loc[("grad-dot", 1), "spearman"] == pytest.approx(1.0)
    assert at.loc[("if-cg", 1), "cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert abs(at.loc[("grad-dot", 2), "cosine"]) < 0.8  # epoch 2's gold is other numbers
    assert set(table["n_targets"]) == {4}
    findings = further_findings(table)
    verdicts = [line for line in findings if line.startswith("Wei et al.'s finding by")]
    assert len(verdicts) == 2 and "by cosine" in verdicts[0] and "by spearman" in verdicts[1]
    assert "**not reproduced**" in verdicts[0]  # if-cg is not "lower but stable" here: it is the negation


def test_dattri_ordering_is_checked_with_paired_differences(tmp_path):
    """Scores built so that LDS falls along dattri's order (trak's scores are the true
    linear model, each later method adds more noise): every pair "confirmed"; the
    reversed construction: "reversed"."""
    from types import SimpleNamespace

    from attribution import metrics as M
    from attribution.methods import ScoreBlock
    from attribution.report import dattri_ordering
    from attribution.scores import ScoreStore

    rng = np.random.default_rng(1)
    n_train, n_targets, n_models = 60, 30, 80
    train_ids, target_ids = np.arange(n_train), np.arange(1000, 1000 + n_targets)
    masks = rng.random((n_models, n_train)) < 0.5
    truth = rng.normal(size=(n_targets, n_train))
    margins = masks.astype(float) @ truth.T + 0.1 * rng.normal(size=(n_models, n_targets))
    data = M.LDSData(masks, margins, train_ids, target_ids, "lds")
    order = ["trak", "if-cg", "tracin", "grad-dot", "grad-cos"]
    for reverse in (False, True):
        store = ScoreStore(tmp_path / f"scores{reverse}")
        for rank, name in enumerate(order[::-1] if reverse else order):
            noise = [0.0, 1.0, 3.0, 9.0, 9.0][rank]
            values = truth + noise * rng.normal(size=truth.shape)
            store.write(ScoreBlock(name, target_ids, np.zeros(n_targets, np.int64), train_ids,
                                   values.astype(np.float32)), "class000", {})
        r = SimpleNamespace(store=store, lds_data=data, boot={"n_boot": 300, "confidence": 0.95, "seed": 0})
        scored = M.lds_table(store, data, n_boot=300)
        line = dattri_ordering(r, scored)[0]
        verdicts = [part.rsplit(": ", 1)[1] for part in line.split("paired differences: ")[1].split("; ")]
        if reverse:
            assert verdicts[1:] == ["reversed"] * 3, line  # trak and if-cg: both noisiest here
        else:
            assert verdicts == ["confirmed"] * 4, line
    assert dattri_ordering(r, scored[scored["method"] != "if-cg"]) == []  # not all there: not stated
