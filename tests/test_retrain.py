"""Retraining: real Fashion-MNIST, the effective training set, determinism, flip class."""

import numpy as np
import pytest
import torch

from attribution import retrain
from attribution.data import load_dataset


@pytest.fixture(scope="module")
def small():
    torch.set_num_threads(1)
    train = load_dataset("fashion-mnist", "train", n_per_class=40, seed=0)  # 400 real images
    test = load_dataset("fashion-mnist", "test", n_per_class=20, seed=0)
    config = retrain.make_config("mlp", epochs=3)
    return retrain.Retrainer.from_imageset(config, train), train, test


def test_removed_and_relabelled_ids_change_the_training_set(small):
    trainer, train, _ = small
    removed = train.ids[[0, 5, 17]]
    relabel = train.ids[np.flatnonzero(train.labels == 3)[:7]]
    subset = trainer.training_set(removed, relabel, relabel_to=6)
    kept_ids = train.ids[subset.positions]
    assert len(kept_ids) == len(train) - 3 and not set(removed) & set(kept_ids)
    relabelled = np.isin(kept_ids, relabel)
    assert relabelled.sum() == 7 and np.all(subset.labels[relabelled] == 6)
    assert np.array_equal(subset.labels[~relabelled], train.labels[subset.positions][~relabelled])
    with pytest.raises(KeyError, match="not in the training set"):
        trainer.training_set([10**9])
    with pytest.raises(ValueError, match="relabel_to"):
        trainer.training_set((), relabel, relabel_to=None)


def test_training_is_deterministic_per_seed_and_seeds_differ(small):
    trainer, _, _ = small
    a, b, c = trainer.train(seed=3), trainer.train(seed=3), trainer.train(seed=4)
    sa, sb, sc = (m.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_relabelling_a_whole_class_flips_it(small):
    """Really relabelled: with every 'Trouser' labelled 'Dress', trousers are predicted as dresses."""
    trainer, train, test = small
    trousers = train.ids[train.labels == 1]
    model = trainer.train(relabel_ids=trousers, relabel_to=3, seed=0)
    x = test.images(np.flatnonzero(test.labels == 1))
    predictions = trainer.logits(model, x).argmax(1)
    assert np.mean(predictions == 3) > 0.8
    # removal of the class: it is never predicted any more
    model = trainer.train(removed_ids=trousers, seed=0)
    assert np.mean(trainer.logits(model, x).argmax(1) == 1) < 0.05
    # the full-data model does learn it (the test is not vacuous)
    model = trainer.train(seed=0)
    assert np.mean(trainer.logits(model, x).argmax(1) == 1) > 0.8


def test_evaluate_target_margin():
    correct, margin = retrain.evaluate_target(np.array([0.1, 2.0, 1.5]), 1)
    assert correct and margin == pytest.approx(0.5)
    correct, margin = retrain.evaluate_target(np.array([3.0, 2.0, 1.5]), 1)
    assert not correct and margin == pytest.approx(-1.0)


def test_flip_class_is_second_or_first_when_second_is_label():
    logits = np.array([[[5.0, 3.0, 1.0], [1.0, 5.0, 3.0], [2.0, 0.0, 9.0]]])  # one model, 3 targets
    labels = np.array([0, 0, 2])
    # target 0: correct, second = 1; target 1: wrong (first 1, second 2 -> 2, not the label);
    # target 2: correct, second = 0
    assert retrain.flip_classes(logits, labels).tolist() == [1, 2, 0]
    labels = np.array([0, 2, 2])  # target 1: first 1, second 2 = label -> first
    assert retrain.flip_classes(logits, labels).tolist() == [1, 1, 0]
    # the ensemble ranks by mean probability over models
    two = np.array([[[4.0, 3.0, 0.0]], [[4.0, 0.0, 3.5]]])
    assert retrain.flip_classes(two, np.array([0])).tolist() == [2]


def test_ensemble_status_and_real_ensemble(small):
    result = retrain.EnsembleResult(np.array([10, 11, 12]), np.array([0, 0, 0]),
                                    np.array([[[1.0, 0], [0, 1.0], [1.0, 0]],
                                              [[1.0, 0], [0, 1.0], [0, 1.0]]]))
    assert result.status.tolist() == ["searched", "misclassified", "unstable"]
    trainer, _, test = small
    real = retrain.full_data_ensemble(trainer, test.images(np.arange(60)), test.labels[:60], test.ids[:60], 3)
    assert real.logits.shape == (3, 60, 10)
    assert 0.6 < real.correct.mean() < 0.95  # a real model on real data
    flips = real.flip_classes
    assert np.all(flips[real.status == "searched"] != real.labels[real.status == "searched"])


def test_recipes_and_models():
    ref = retrain.RECIPES["cifar10-resnet9"]
    assert (ref.lr, ref.epochs, ref.batch_size, ref.weight_decay, ref.label_smoothing, ref.warmup_epochs) == \
        (0.5, 24, 512, 5e-4, 0.1, 5)
    with pytest.raises(ValueError, match="unknown model"):
        retrain.make_config("vgg")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        retrain.make_config("mlp", epoch=3)
    for name, shape in (("resnet9", (32, 32, 3)), ("mobilenetv2", (32, 32, 3)), ("resnet18", (32, 32, 3)),
                        ("resnet18", (64, 96, 3)), ("cnn", (28, 28, 1)),
                        ("mlp", (28, 28, 1))):
        model = retrain.build_model(name, 10, shape).eval()
        with torch.no_grad():
            out = model(torch.zeros(2, shape[2], shape[0], shape[1]))
        assert out.shape == (2, 10), name


def test_resnet9_recipe_trains_on_rgb_with_augmentation():
    """The reference recipe's code path (triangular lr, label smoothing, augmentation), tiny and on CPU."""
    config = retrain.make_config("resnet9", epochs=1, batch_size=8, device="cpu", mixed_precision=False)
    assert config.schedule == "triangular" and config.augment == "flip_translate_cutout"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(16, 32, 32, 3), dtype=np.uint8)
    trainer = retrain.Retrainer(config, images, np.arange(16) % 10, np.arange(16) + 100, (0.5,) * 3, (0.25,) * 3)
    model = trainer.train(removed_ids=[100, 101], seed=1)
    assert trainer.logits(model, images[:3]).shape == (3, 10)
    x = torch.randn(4, 3, 32, 32)
    out = retrain._augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_training_seed_is_stable():
    assert retrain.training_seed(0, 1) == retrain.training_seed(0, 1) != retrain.training_seed(0, 2)
    assert retrain.training_seed(1, 1) != retrain.training_seed(0, 1)


def test_imagenet_recipe_reads_real_images_batch_by_batch(tmp_path):
    """The ImageNet path: an ImageFolder set (real ImageNet images from foolbox) is not
    materialised; the Retrainer decodes each batch from the files, and gives the same
    model as the in-memory path on the same pixels."""
    from PIL import Image

    from test_data import foolbox_images

    for index, (pixels, label) in enumerate(foolbox_images("imagenet")[:8]):
        folder = tmp_path / "train" / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{index}.png")  # lossless: both paths see the same pixels
    from attribution.data import load_imagenet

    train = load_imagenet("train", tmp_path, size=64)
    assert not train.in_memory
    config = retrain.make_config("resnet18", epochs=1, batch_size=4, device="cpu", mixed_precision=False)
    assert config.model == "resnet18" and config.label_smoothing == 0.1
    lazy = retrain.Retrainer.from_imageset(config, train)
    assert lazy.x is None and lazy.image_shape == (64, 64, 3)
    eager = retrain.Retrainer(config, train.images(np.arange(len(train))), train.labels, train.ids, train.mean,
                              train.std, train.num_classes)
    removed = train.ids[:2]
    a, b = lazy.train(removed_ids=removed, seed=3), eager.train(removed_ids=removed, seed=3)
    probe = train.images([0, 1])
    np.testing.assert_allclose(lazy.logits(a, probe), eager.logits(b, probe), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- attribution.retraining


def test_recipe_and_its_fingerprint():
    from attribution.retraining import Recipe, recipe_fingerprint

    config = Recipe("mlp", epochs=3, lr=0.05).train_config("cpu")
    assert (config.model, config.epochs, config.lr, config.batch_size, config.device) == ("mlp", 3, 0.05, 128, "cpu")
    assert Recipe("fmnist-cnn").train_config("cpu") == retrain.make_config("cnn", device="cpu")
    data = {"dataset": "fashion-mnist", "root": None, "train_per_class": 30, "seed": 0}
    key = recipe_fingerprint(config, data, 0, 300)
    assert key == recipe_fingerprint(Recipe("mlp", 3, None, 0.05).train_config("cuda"), data, 0, 300)  # not the device
    assert len({key, recipe_fingerprint(config, data, 1, 300), recipe_fingerprint(config, data, 0, 299),
                recipe_fingerprint(Recipe("mlp", 4, None, 0.05).train_config("cpu"), data, 0, 300),
                recipe_fingerprint(config, dict(data, seed=1), 0, 300)}) == 5


def test_part_log_keeps_rows_and_read_parts_refuses_other_settings(tmp_path):
    import pyarrow as pa

    from attribution.artifacts import SettingsChanged
    from attribution.retraining import PartLog, read_parts

    schema = pa.schema([("model_id", pa.int64()), ("seconds", pa.float32())])
    assert read_parts(tmp_path / "log") is None
    log = PartLog(tmp_path / "log", schema, settings={"models": 4}, flush_every=2, flush_seconds=3600)
    for model_id in range(3):
        log.add({"model_id": model_id, "seconds": 0.5})
    assert len(list((tmp_path / "log").glob("part-*.parquet"))) == 1  # flushed at 2 rows; 1 row waits
    log.flush()
    log.flush()  # nothing left: no empty part
    assert sorted(read_parts(tmp_path / "log", {"models": 4}).column("model_id").to_pylist()) == [0, 1, 2]
    again = PartLog(tmp_path / "log", schema, settings={"models": 5})
    assert again.run_id != log.run_id  # a second run never overwrites the first one's parts
    again.add({"model_id": 9, "seconds": 0.1})
    again.flush()
    with pytest.raises(SettingsChanged, match="models: 4 -> 5"):
        read_parts(tmp_path / "log", {"models": 5}, fix="delete the folder")
    assert read_parts(tmp_path / "log").num_rows == 4  # without settings: every part


def test_retrain_worker_items(small):
    """One worker, every item kind, in-process: the same models as a Retrainer of this process."""
    from attribution.retraining import RetrainWorker, target_arrays, training_arrays

    trainer, train, test = small
    targets = target_arrays(test, test.ids[:5])
    worker = RetrainWorker(trainer.config.to_dict(), training_arrays(train), targets)
    removed = train.ids[:10]
    result, name = worker.call({"kind": "train", "target_id": int(test.ids[2]), "removed_ids": removed,
                                "torch_seed": 7}, 0)
    logits = trainer.logits(trainer.train(removed, seed=7), test.images(test.positions_of(test.ids[2:3])))[0]
    assert (result["correct"], result["margin"]) == retrain.evaluate_target(logits, test.labels[2])
    assert name == worker.ready() and ":" in name
    ensemble = worker({"kind": "ensemble", "torch_seed": 3})["logits"]
    assert ensemble.shape == (5, 10)
    np.testing.assert_array_equal(ensemble, trainer.logits(trainer.train(seed=3), targets["images"]))
    subset = worker({"kind": "subset", "removed_ids": removed, "torch_seed": 7})
    assert subset["margins"].shape == (5,) and subset["margins"].dtype == np.float32
    with pytest.raises(ValueError, match="unknown retraining job kind"):
        worker({"kind": "nope"})


def test_deterministic_input_errors_are_not_retried_errors(small):
    """Every error a retraining's input makes deterministically (an empty training set,
    unknown ids or targets, a bad relabel class, mismatched shapes, an unknown item kind)
    is a NotRetried (the queue fails it at once) and a ValueError, with its message."""
    import pickle

    from attribution.retraining import RetrainWorker, target_arrays, training_arrays
    from attribution.workqueue import NotRetried

    trainer, train, test = small
    cases = [
        (lambda: trainer.train(removed_ids=train.ids, seed=0), retrain.EmptyTrainingSet,
         f"every one of the {len(train)} training images was removed"),
        (lambda: trainer.training_set([10**9]), retrain.UnknownIds, r"ids not in the training set: \[1000000000\]"),
        (lambda: trainer.training_set((), train.ids[:2], relabel_to=10), retrain.RetrainInputError,
         r"relabel_to must be a class in \[0, 10\), got 10"),
        (lambda: retrain.Retrainer(trainer.config, np.zeros((3, 28, 28, 1), np.uint8), np.zeros(2), np.arange(3),
                                   (0.5,), (0.5,)), retrain.RetrainInputError, "3 images, 2 labels, 3 ids"),
        (lambda: retrain.build_model("cnn", 10, (28, 32, 1)), retrain.RetrainInputError, "square images"),
    ]
    worker = RetrainWorker(trainer.config.to_dict(), training_arrays(train), target_arrays(test, test.ids[:2]))
    cases += [
        (lambda: worker({"kind": "train", "target_id": int(test.ids[5]), "torch_seed": 0}), retrain.UnknownIds,
         f"target {int(test.ids[5])} is not among this pool's 2 targets"),
        (lambda: worker({"kind": "train", "target_id": int(test.ids[0]), "removed_ids": train.ids, "torch_seed": 0}),
         retrain.EmptyTrainingSet, "was removed: nothing to train on"),
        (lambda: worker({"kind": "nope"}), retrain.RetrainInputError, "unknown retraining job kind 'nope'"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as error:
            call()
        assert isinstance(error.value, NotRetried) and isinstance(error.value, ValueError), kind
        again = pickle.loads(pickle.dumps(error.value))  # how Ray ships a worker's error to the driver
        assert type(again) is type(error.value) and str(again) == str(error.value)
    # unknown ids stay a KeyError for lookups, with a readable message (not KeyError's quoted repr)
    with pytest.raises(KeyError) as error:
        trainer.positions_of([10**9])
    assert str(error.value).startswith("ids not in the training set")


def test_mlp_width_is_a_recipe_field():
    """width sets the MLP's hidden units, changes the fingerprint only when set, and is
    refused for models without one."""
    narrow = retrain.make_config("mlp", epochs=1, width=32, device="cpu")
    model = retrain.build_model("mlp", 10, (28, 28, 1), narrow.width)
    assert model.net[1].out_features == 32 and model.net[3].in_features == 32
    assert retrain.build_model("mlp", 10, (28, 28, 1)).net[1].out_features == 256
    default = retrain.make_config("mlp", epochs=1, device="cpu")
    assert default.fingerprint() != narrow.fingerprint()
    assert default.fingerprint() == retrain.make_config("mlp", epochs=1, width=None, device="cpu").fingerprint()
    with pytest.raises(ValueError, match="width"):
        retrain.make_config("cnn", width=32, device="cpu")
    images = np.random.default_rng(0).integers(0, 255, (40, 28, 28, 1), dtype=np.uint8)
    trainer = retrain.Retrainer(narrow, images, np.arange(40) % 10, np.arange(40), (0.5,), (0.5,))
    assert trainer.train(seed=1).net[1].out_features == 32
