"""The stacked training engine (many models at once in one process): real Fashion-MNIST,
bitwise independence of a model from its group, ragged removals and relabels, the same
models as one-at-a-time training, grouped worker items, and a support search on a real
local Ray with batching on."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from attribution import retrain
from attribution.batched_retrain import Change, StackedMLPTrainer, _Model, schedule
from attribution.data import load_dataset
from attribution.retraining import RetrainPoolSettings, RetrainWorker, target_arrays, training_arrays
from attribution.workqueue import BatchingQueue, InProcessRuntime, ItemFailed, PoolRequest


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)  # as a pool worker
    train = load_dataset("fashion-mnist", "train", n_per_class=40, seed=0)  # 400 real images
    test = load_dataset("fashion-mnist", "test", n_per_class=20, seed=0)
    return train, test


def trainer(train, epochs=2, **fields):
    return retrain.Retrainer.from_imageset(retrain.make_config("mlp", epochs=epochs, engine="stacked", **fields), train)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_is_bitwise_the_same_alone_and_in_any_group(data, precision):
    train, _ = data
    stacked = trainer(train, precision=precision)
    job = Change(removed_ids=train.ids[:37], seed=5)  # fewer steps than the full-data models beside it
    others = [Change(seed=100), Change(removed_ids=train.ids[200:203], seed=101),
              Change(relabel_ids=train.ids[50:90], relabel_to=3, seed=102), Change(seed=103),
              Change(removed_ids=train.ids[::3], seed=104), Change(seed=105), Change(seed=106)]
    alone = stacked.train_many([job])[0]
    in_eight = stacked.train_many(others[:3] + [job] + others[3:])
    in_two = stacked.train_many([others[4], job])
    assert same(alone, in_eight[3]) and same(alone, in_two[1])
    assert same(stacked.train(job.removed_ids, seed=5), alone)  # train() is a group of one
    assert same(in_eight[4], stacked.train_many([others[3]])[0])  # and so is every other member
    assert not same(alone, stacked.train_many([replace(job, seed=6)])[0])  # the seed matters


def test_stacked_fp32_trains_the_module_engines_model_within_rounding(data):
    """Same initial weights, batch order and schedule as one-at-a-time training: the
    hand-written backward, fused optimizer and schedules reproduce torch's to rounding."""
    train, _ = data
    module = retrain.Retrainer.from_imageset(retrain.make_config("mlp", epochs=2), train)
    stacked = trainer(train)
    removed, relabel = train.ids[:57], train.ids[100:140]  # a short last batch and a ragged size
    a = module.train(removed, relabel, 7, seed=11).state_dict()
    b = stacked.train_many([Change(removed, relabel, 7, 11), Change(seed=3)])[0].state_dict()
    for name in a:
        scale = float(a[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) < 1e-3 * scale + 1e-5, name
    c = module.train(seed=12).state_dict()  # another seed is far away: the tolerance is meaningful
    assert float((a["net.1.weight"] - c["net.1.weight"]).abs().max()) > 100 * float(
        (a["net.1.weight"] - b["net.1.weight"]).abs().max())


def test_each_model_sees_exactly_its_own_images_every_epoch(data):
    train, _ = data
    stacked = trainer(train, epochs=3)
    subset = stacked.checked_training_set(train.ids[5:105], train.ids[200:230], 4)
    model = _Model(subset.positions, subset.labels, seed=9, config=stacked.config, lr_cache={})
    removed_positions = set(stacked.positions_of(train.ids[5:105]).tolist())
    relabelled = set(stacked.positions_of(train.ids[200:230]).tolist())
    batch = stacked.config.batch_size
    generator = torch.Generator().manual_seed(9)  # the module engine's order: one randperm per epoch
    orders = []
    for epoch in range(3):
        rows, y, weight = model.epoch(batch)
        assert rows.shape == y.shape == weight.shape == (model.steps_per_epoch, batch)
        real = weight > 0
        assert torch.allclose(weight.sum(1), torch.ones(model.steps_per_epoch))  # each batch: a mean over its rows
        assert [model.rows_in(step, batch) for step in range(model.steps_per_epoch)] == real.sum(1).tolist()
        seen = rows[real].tolist()
        assert seen == subset.positions[torch.randperm(model.n, generator=generator).numpy()].tolist()
        assert sorted(seen) == sorted(subset.positions.tolist())  # each kept image once, no removed one
        assert not removed_positions & set(seen)
        labels = dict(zip(seen, y[real].tolist()))
        assert all(labels[p] == 4 for p in relabelled)
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order every epoch
    assert model.total == 3 * int(np.ceil(300 / 128))
    # the schedule is torch's: OneCycleLR warms lr up from lr/25 and cycles momentum down from 0.95
    lrs, momenta = schedule(stacked.config, model.steps_per_epoch)
    assert len(lrs) == model.total and lrs[0] < lrs.max() == pytest.approx(stacked.config.lr, rel=0.05)
    assert momenta[0] == pytest.approx(0.95) and momenta.min() < 0.9


def test_removals_and_relabels_really_change_the_stacked_models(data):
    train, test = data
    stacked = trainer(train, epochs=3)
    trousers = train.ids[train.labels == 1]
    full, removed, relabelled = stacked.train_many([Change(seed=0), Change(removed_ids=trousers, seed=0),
                                                    Change(relabel_ids=trousers, relabel_to=3, seed=0)])
    x = test.images(np.flatnonzero(test.labels == 1))
    assert np.mean(stacked.logits(full, x).argmax(1) == 1) > 0.8
    assert np.mean(stacked.logits(removed, x).argmax(1) == 1) < 0.05
    assert np.mean(stacked.logits(relabelled, x).argmax(1) == 3) > 0.8


def test_bad_changes_are_refused_before_any_training(data):
    train, _ = data
    stacked = trainer(train)
    with pytest.raises(retrain.UnknownIds, match="not in the training set"):
        stacked.train_many([Change(seed=0), Change(removed_ids=[10**9], seed=1)])
    with pytest.raises(retrain.EmptyTrainingSet, match="nothing to train on"):
        stacked.train_many([Change(removed_ids=train.ids, seed=1)])
    with pytest.raises(ValueError, match="engine 'stacked' trains models \\['mlp'\\] only.*engine 'module'"):
        retrain.make_config("cnn", engine="stacked")
    with pytest.raises(ValueError, match="precision must be one of"):
        retrain.make_config("mlp", precision="fp16")
    with pytest.raises(ValueError, match="in memory"):
        StackedMLPTrainer(_OnDisk(stacked))


class _OnDisk:
    """A Retrainer's view whose images are read from files (x is None), as for ImageNet."""

    def __init__(self, retrainer):
        self.config, self.device, self.x = retrainer.config, retrainer.device, None


def test_engine_and_precision_are_in_the_fingerprint_only_when_not_the_defaults():
    base = retrain.make_config("mlp", epochs=5)
    assert base.engine == "module" and base.precision == "fp32"
    fields = {k: v for k, v in base.to_dict().items() if k not in ("engine", "precision")}
    assert retrain.TrainConfig(**fields).fingerprint() == base.fingerprint()  # older recipes keep their key
    keys = {base.fingerprint(), replace(base, engine="stacked").fingerprint(),
            replace(base, precision="bf16").fingerprint(), replace(base, engine="stacked", precision="bf16").fingerprint()}
    assert len(keys) == 4
    assert retrain.make_config("fmnist-mlp-bf16").engine == "stacked"


def test_auto_precision_resolves_to_what_the_device_runs_natively(monkeypatch):
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(retrain, "native_bf16", lambda device="cpu", native=native: native)
        config = retrain.make_config("mlp", engine="stacked", precision="auto")
        assert config.precision == expected  # the config (and its fingerprint) names what runs
        assert config.fingerprint() == retrain.make_config("mlp", engine="stacked", precision=expected).fingerprint()
    monkeypatch.setattr(retrain, "native_bf16", lambda device="cpu": False)
    with pytest.warns(RuntimeWarning, match="emulated.*'auto'"):
        retrain.make_config("mlp", engine="stacked", precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        retrain.TrainConfig(precision="auto")  # resolved by make_config, never stored


def test_worker_trains_a_group_and_fails_only_its_bad_item(data):
    train, test = data
    config = retrain.make_config("mlp", epochs=2, engine="stacked")
    targets = target_arrays(test, test.ids[:5])
    worker = RetrainWorker(config.to_dict(), training_arrays(train), targets)
    jobs = [{"kind": "train", "target_id": int(test.ids[0]), "removed_ids": train.ids[:20], "torch_seed": 1},
            {"kind": "train", "target_id": 10**9, "torch_seed": 2},  # not a target of this pool
            {"kind": "subset", "removed_ids": train.ids[::2], "torch_seed": 3},
            {"kind": "ensemble", "torch_seed": 4}]
    results = worker.run_group(jobs)
    assert isinstance(results[1], ItemFailed) and isinstance(results[1].error, retrain.UnknownIds)
    alone = [worker(job) for job in (jobs[0], jobs[2], jobs[3])]  # each job alone: the same outcome
    assert results[0]["correct"] == alone[0]["correct"] and results[0]["margin"] == alone[0]["margin"]
    assert np.array_equal(results[2]["margins"], alone[1]["margins"])
    assert np.array_equal(results[3]["logits"], alone[2]["logits"]) and results[3]["logits"].shape == (5, 10)
    with pytest.raises(retrain.UnknownIds):
        worker(jobs[1])


def test_pool_settings_group_only_stacked_recipes(data):
    train, test = data
    pool = RetrainPoolSettings(models_per_worker=8)
    stacked, module = retrain.make_config("fmnist-mlp-bf16", epochs=1), retrain.make_config("mlp", epochs=1)
    assert pool.group_size(stacked) == 8 and pool.group_size(module) == 1  # module engine: one model per item
    arrays, targets = training_arrays(train), target_arrays(test, test.ids[:3])
    queue = pool.open_queue(InProcessRuntime(), PoolRequest("retrain"), stacked, arrays, targets)
    assert isinstance(queue, BatchingQueue) and queue.free() == 8
    plain = pool.open_queue(InProcessRuntime(), PoolRequest("retrain"), module, arrays, targets)
    assert not isinstance(plain, BatchingQueue)
    items = [{"kind": "ensemble", "member": i, "torch_seed": i} for i in range(3)]
    logits = {done.item["member"]: done.result["logits"] for done in queue.map(items)}
    assert sorted(logits) == [0, 1, 2] and not np.array_equal(logits[0], logits[1])


# ----------------------------------------------------------------------------- on Ray


def test_support_search_on_ray_with_batching(ray_runtime, tmp_path):
    """A small support search with the stacked recipe, 4 models per item, on real Ray;
    every logged outcome is the one the same training gives alone in this process."""
    from attribution.experiment import Experiment
    from attribution.stages.support import load_rankings
    from test_support import preset, support_stage, write_rankings

    train = load_dataset("fashion-mnist", "train", n_per_class=30, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=10, seed=0)
    targets = test.ids[:2]
    labels = dict(zip(test.ids.tolist(), test.labels.tolist()))
    exp = Experiment(tmp_path / "exp").create()
    write_rankings(exp, train, targets, labels)
    config = preset(targets=targets.tolist(), model="fmnist-mlp-stacked", models_per_worker=4, budget=2)
    summary = support_stage(exp, config, ray_runtime)()
    assert summary["searches"] > 0 and summary["trained_this_run"] > 0
    log = pd.read_parquet(exp.trainings)
    assert len(log) == summary["trained_this_run"]
    # replay a few logged trainings one by one in this process: bitwise the same outcomes
    rankings, _ = load_rankings(exp.rankings)
    flip = pd.read_parquet(exp.path("support_targets")).set_index("target_id")["flip_class"]
    stacked = retrain.Retrainer.from_imageset(retrain.make_config("fmnist-mlp-stacked", epochs=2), train)
    test_all = load_dataset("fashion-mnist", "test")
    for row in log.head(4).itertuples(index=False):
        changed = rankings[(int(row.target_id), row.method)][:int(row.k)]
        if row.mode == "removal":
            model = stacked.train(removed_ids=changed, seed=int(row.torch_seed))
        else:
            model = stacked.train(relabel_ids=changed, relabel_to=int(flip.loc[int(row.target_id)]),
                                  seed=int(row.torch_seed))
        image = test_all.images(test_all.positions_of([int(row.target_id)]))
        correct, margin = retrain.evaluate_target(stacked.logits(model, image)[0], labels[int(row.target_id)])
        assert correct == row.correct and np.float32(margin) == np.float32(row.margin)
