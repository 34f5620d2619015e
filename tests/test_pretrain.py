"""MoCo v2 pretraining on real Fashion-MNIST: tiny runs that write, reload, reuse and repeat,
and the pretrain stage that writes EXP/checkpoints/moco.pt."""

import hashlib
import json

import numpy as np
import pytest
import torch

from attribution.artifacts import SettingsChanged, fingerprint
from attribution.backbones import BackboneSpec, checkpoint_metadata, load_backbone, spec_from_checkpoint
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.knn import knn_accuracy, knn_predict
from attribution.pretrain import MocoPretrainer, SupervisedPretrainer, info_nce, moco_augment
from attribution.settings import SettingsError
from attribution.stages import parse_settings, stage_class
from attribution.stages.pretrain import PretrainSettings, PretrainStage

torch.set_num_threads(1)  # one thread: robust on a shared machine (two spin-wait under load)
# The standard 7x7/2 stem + max-pool on 28 px leaves 7x7 maps: ~15x cheaper than the small
# stem, and the mechanics under test (EMA, queue, loss, checkpoint) are the same.
FAST_SPEC = BackboneSpec("resnet18", small_stem=False, in_channels=1)
TINY = dict(backbone_spec=FAST_SPEC, batch_size=8, queue_size=32, max_steps=3, hidden_dim=32, proj_dim=16, warmup_steps=1,
            progress=False, num_threads=1)


@pytest.fixture(scope="module")
def images():
    return load_dataset("fashion-mnist", "train", n_per_class=4, seed=0)  # 40 real images


def trunk_weights(pretrainer):
    return {k: v.clone() for k, v in pretrainer.encoder_.trunk.state_dict().items()}


def test_augment_is_seeded_and_in_range(images):
    x = torch.from_numpy(images.images(np.arange(8))).permute(0, 3, 1, 2).float() / 255
    a = moco_augment(x, torch.Generator().manual_seed(0), 28)
    b = moco_augment(x, torch.Generator().manual_seed(0), 28)
    c = moco_augment(x, torch.Generator().manual_seed(1), 28)
    assert a.shape == (8, 1, 28, 28) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # full-image crop, no flip, no jitter: the identity
    same = moco_augment(x, torch.Generator().manual_seed(0), 28, min_crop_scale=1.0, flip_p=0.0, jitter_p=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def test_info_nce_prefers_matching_keys():
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    assert info_nce(q, q, queue, 0.1) < info_nce(q, q.roll(1, 0), queue, 0.1)


def test_tiny_pretraining_checkpoint_reloads(images, tmp_path):
    pretrainer = MocoPretrainer(seed=0, **TINY).fit(images)
    assert pretrainer.steps_ == 3 and pretrainer.stopped_by_ == "max_steps"
    assert all(np.isfinite(pretrainer.loss_history_))
    path = pretrainer.save(tmp_path / "moco.pt")
    meta = checkpoint_metadata(path)
    assert meta["pretrain"]["steps"] == 3 and meta["pretrain"]["params"]["batch_size"] == 8
    spec = spec_from_checkpoint(path)
    assert (spec.name, spec.small_stem, spec.in_channels) == ("resnet18", False, 1)
    model = load_backbone(spec)
    x = model.preprocess(images.images(np.arange(6)), images.mean, images.std)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pretrainer.encoder_(x), rtol=0, atol=0)


def test_same_seed_same_weights(images):
    first = trunk_weights(MocoPretrainer(seed=7, **TINY).fit(images))
    second = trunk_weights(MocoPretrainer(seed=7, **TINY).fit(images))
    other = trunk_weights(MocoPretrainer(seed=8, **TINY).fit(images))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["layer4.1.conv2.weight"], other["layer4.1.conv2.weight"])
    # and training changed the weights at all
    torch.manual_seed(7)
    untrained = load_backbone(FAST_SPEC).trunk.state_dict()
    assert not torch.equal(first["conv1.weight"], untrained["conv1.weight"])


def test_validation_names_the_argument(images):
    with pytest.raises(ValueError, match="batch_size"):
        MocoPretrainer(batch_size=1, max_steps=1)
    with pytest.raises(ValueError, match="temperature"):
        MocoPretrainer(temperature=0, max_steps=1)
    with pytest.raises(ValueError, match="epochs, max_steps or time_budget_s"):
        MocoPretrainer()
    with pytest.raises(ValueError, match="backbone_spec"):
        MocoPretrainer(BackboneSpec("resnet18", checkpoint="x.pt"), max_steps=1)
    with pytest.raises(ValueError, match="batch_size .64. exceeds the 40"):
        MocoPretrainer(batch_size=64, max_steps=1, progress=False).fit(images)


def tiny_preset(**pretrain):
    settings = {"backbone": "resnet18", "small_stem": False, "images": "subset", "max_steps": 2,
                "batch_size": 8, "queue_size": 16, "hidden_dim": 32, "proj_dim": 16, "seed": 0, "threads": 1}
    settings.update(pretrain)
    return {"name": "tiny", "seed": 0,
            "data": {"dataset": "fashion-mnist", "root": "", "train_per_class": 2, "test_per_class": 1},
            "pretrain": settings}


def pretrain(exp, force=False, **settings):
    return PretrainStage(exp, parse_settings(tiny_preset(**settings)), progress=False, force=force)()


def test_stage_is_registered_with_its_flags():
    assert stage_class("pretrain") is PretrainStage
    assert PretrainStage.reads == () and PretrainStage.writes == ("checkpoint",)
    flags = {f.name: f for f in PretrainStage.flags}
    assert flags["--force"].option == "force"
    assert flags["--threads"].setting == "pretrain.threads" and flags["--threads"].type is int


def test_stage_writes_then_reuses(tmp_path, capsys):
    exp = Experiment(tmp_path / "exp").create()
    first = pretrain(exp)
    path = exp.path("checkpoint")
    assert path == exp.checkpoints / "moco.pt"
    assert path.exists() and first["reused"] is False and first["steps"] == 2
    assert first["train_images"] == 20
    stamp = path.stat().st_mtime_ns
    manifest = json.loads(exp.manifest_path.read_text())
    assert manifest["pretrain"]["config_hash"] == first["config_hash"]
    assert manifest["pretrain"]["spec"]["in_channels"] == 1
    assert manifest["pretrain"]["settings"]["max_steps"] == 2
    assert spec_from_checkpoint(path).small_stem is False
    stored = checkpoint_metadata(path)["pretrain"]
    assert stored["config_hash"] == fingerprint(stored["settings"]) == first["config_hash"]
    assert stored["settings"]["data"] == {"dataset": "fashion-mnist", "root": "", "images": "subset",
                                          "train_per_class": 2, "seed": 0}

    # same settings (threads are not part of the result): reused, not rewritten
    capsys.readouterr()
    second = pretrain(exp, threads=None)
    assert second["reused"] is True and second["config_hash"] == first["config_hash"]
    assert second["steps"] == 2 and second["seconds"] == first["seconds"]  # the training's, kept
    assert path.stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out
    assert exp.manifest()["pretrain"]["reused"] is True

    # other settings: refused with the differences listed, unless forced
    with pytest.raises(SettingsChanged, match=r"max_steps: 2 -> 3.*--force"):
        pretrain(exp, max_steps=3)
    with pytest.raises(SettingsChanged, match=r"seed: 0 -> 1"):
        pretrain(exp, seed=1)
    assert path.stat().st_mtime_ns == stamp
    third = pretrain(exp, force=True, max_steps=3)
    assert third["reused"] is False and third["steps"] == 3
    assert (exp.checkpoints / f"moco-{first['config_hash']}.pt").exists()
    # the forced checkpoint is reused with its settings
    assert pretrain(exp, max_steps=3)["reused"] is True


def test_checkpoint_of_the_old_hash_scheme_is_reused(tmp_path):
    """Checkpoints written before the fingerprint scheme changed (config_hash = sha256 of
    json.dumps(settings, sort_keys=True)) are reused: their stored settings are compared."""
    exp = Experiment(tmp_path / "exp").create()
    pretrain(exp, time_budget_s=3600)
    path = exp.path("checkpoint")
    payload = torch.load(path, weights_only=False)
    settings = payload["pretrain"]["settings"]
    assert settings["time_budget_s"] == 3600.0
    settings["time_budget_s"] = 3600  # the old code stored the preset's value as written (an int)
    old_hash = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert old_hash != payload["pretrain"]["config_hash"]
    payload["pretrain"]["config_hash"] = old_hash
    torch.save(payload, path)
    stamp = path.stat().st_mtime_ns
    again = pretrain(exp, time_budget_s=3600)
    assert again["reused"] is True and again["config_hash"] == old_hash
    assert path.stat().st_mtime_ns == stamp
    forced = pretrain(exp, force=True, max_steps=3)
    assert forced["reused"] is False and (exp.checkpoints / f"moco-{old_hash}.pt").exists()


def test_unreadable_checkpoint_is_trained_again(tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    path = exp.path("checkpoint")
    pretrain(exp, max_steps=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # e.g. a disk problem
    with pytest.warns(UserWarning, match="unreadable"):
        summary = pretrain(exp)
    assert summary["reused"] is False and checkpoint_metadata(path)["pretrain"]["steps"] == 2
    assert sorted(p.name for p in exp.checkpoints.iterdir()) == ["moco.pt"]


def test_settings_are_validated_with_the_key_named(tmp_path):
    with pytest.raises(SettingsError, match=r"unknown \[pretrain\] setting\(s\) \['bacth_size'\]"):
        parse_settings(tiny_preset(bacth_size=8))
    with pytest.raises(SettingsError, match=r"pretrain.images must be one of \['full', 'subset'\], got 'all'"):
        parse_settings(tiny_preset(images="all"))
    with pytest.raises(SettingsError, match=r"pretrain.temperature must be in \(0, 10\], got 0.0"):
        parse_settings(tiny_preset(temperature=0))
    with pytest.raises(SettingsError, match="pretrain.batch_size must be an integer >= 2, got 'abc'"):
        parse_settings(tiny_preset(batch_size="abc"))
    with pytest.raises(SettingsError, match="pretrain.epochs or pretrain.max_steps or pretrain.time_budget_s"):
        parse_settings(tiny_preset(max_steps=0))
    with pytest.raises(SettingsError, match="pretrain.shuffle_bn_splits must be at most batch_size // 2 = 4"):
        parse_settings(tiny_preset(shuffle_bn_splits=5))
    with pytest.raises(SettingsError, match="pretrain.backbone must be one of"):
        parse_settings(tiny_preset(backbone="efficientnet_lite0"))
    settings = parse_settings({"name": "p", "seed": 7, "pretrain": {"time_budget_s": 60}})["pretrain"]
    assert settings.seed == 7 and settings.time_budget_s == 60.0 and settings.batch_size == 128


NARROW = BackboneSpec("resnet18", small_stem=True, in_channels=1, width=16, stem_stride=2)  # cheap, 128-d


def leave_one_out_1nn(model, images):
    """1-NN accuracy of each image among the others (cosine): how well features cluster by class."""
    with torch.no_grad():
        x = model.preprocess(images.images(np.arange(len(images))), images.mean, images.std)
        f = torch.nn.functional.normalize(model(x), dim=1)
    similarity = f @ f.T
    similarity.fill_diagonal_(-2.0)
    return float(np.mean(images.labels[similarity.argmax(1).numpy()] == images.labels))


def test_supervised_pretraining_learns_the_labels(images):
    """Cross-entropy on the labels with the shared loop: seeded, and it fits 40 real images."""
    fit = dict(batch_size=20, max_steps=25, lr=0.05, warmup_steps=0, min_crop_scale=1.0, flip_p=0.0, jitter_p=0.0,
               progress=False, num_threads=1)
    first = SupervisedPretrainer(NARROW, seed=3, **fit).fit(images)
    second = SupervisedPretrainer(NARROW, seed=3, **fit).fit(images)
    assert first.summary()["method"] == "supervised" and first.stopped_by_ == "max_steps"
    assert first.loss_history_ == second.loss_history_
    assert all(torch.equal(a, b) for a, b in zip(trunk_weights(first).values(), trunk_weights(second).values()))
    assert np.mean(first.loss_history_[-5:]) < 0.2 * np.mean(first.loss_history_[:5])
    # the backbone's features now group the classes it was trained on (random init: ~0.3)
    torch.manual_seed(3)
    untrained = leave_one_out_1nn(load_backbone(NARROW), images)
    assert leave_one_out_1nn(first.encoder_, images) >= max(0.8, untrained + 0.3)


def test_the_time_cap_is_reported_not_silent(images):
    """A run the cap stops before its step count says so: stopped_by, steps < planned_steps."""
    capped = MocoPretrainer(seed=0, **{**TINY, "max_steps": 100_000, "time_budget_s": 0.5}).fit(images)
    summary = capped.summary()
    assert summary["stopped_by"] == "time_budget" and summary["planned_steps"] == 100_000
    assert 1 <= summary["steps"] < 100_000


def test_supervised_objective_in_the_stage(tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    summary = pretrain(exp, objective="supervised", width=16, stem_stride=2, small_stem=True)
    assert summary["objective"] == "supervised" and summary["method"] == "supervised"
    assert summary["steps"] == summary["planned_steps"] == 2 and summary["stopped_by"] == "max_steps"
    stored = checkpoint_metadata(exp.path("checkpoint"))["pretrain"]
    assert stored["method"] == "supervised" and stored["settings"]["objective"] == "supervised"
    assert "queue_size" not in stored["settings"]  # MoCo-only keys do not key a supervised run
    assert stored["settings"]["backbone"] == {"name": "resnet18", "small_stem": True, "in_channels": 1,
                                              "width": 16, "stem_stride": 2}
    spec = spec_from_checkpoint(exp.path("checkpoint"))
    assert (spec.width, spec.stem_stride) == (16, 2)
    assert exp.manifest()["pretrain"]["objective"] == "supervised"
    # another objective is another checkpoint: refused unless forced
    with pytest.raises(SettingsChanged, match="objective: 'supervised' -> '.unset.'"):
        pretrain(exp, width=16, stem_stride=2, small_stem=True)


def test_the_stage_warns_when_the_cap_cuts_the_run(tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    with pytest.warns(UserWarning, match=r"time_budget_s = 0.5 s stopped the run after \d+ of its 100000 steps"):
        summary = pretrain(exp, max_steps=100_000, time_budget_s=0.5)
    assert summary["stopped_by"] == "time_budget" and summary["steps"] < summary["planned_steps"] == 100_000
    assert exp.manifest()["pretrain"]["stopped_by"] == "time_budget"
    reused = pretrain(exp, max_steps=100_000, time_budget_s=0.5)
    assert reused["reused"] and reused["stopped_by"] == "time_budget" and reused["planned_steps"] == 100_000


def test_default_settings_key_the_checkpoint_as_before():
    """Keys added later stay out of the stored settings at the values older checkpoints were
    trained with, so an older checkpoint with the same settings is still reused."""
    before = {"backbone", "data", "batch_size", "queue_size", "temperature", "momentum", "lr", "weight_decay",
              "epochs", "max_steps", "time_budget_s", "hidden_dim", "proj_dim", "min_crop_scale",
              "shuffle_bn_splits", "warmup_steps", "precision", "seed"}
    sections = parse_settings(tiny_preset())
    settings = sections["pretrain"].checkpoint_settings(sections.data, in_channels=1)
    assert set(settings) == before and set(settings["backbone"]) == {"name", "small_stem", "in_channels"}
    flipless = parse_settings(tiny_preset(flip_p=0.0))["pretrain"].checkpoint_settings(sections.data, 1)
    assert flipless["flip_p"] == 0.0


def test_objective_is_validated():
    with pytest.raises(SettingsError, match=r"pretrain.objective must be one of \['moco', 'supervised'\], got 'simclr'"):
        parse_settings(tiny_preset(objective="simclr"))
    with pytest.raises(SettingsError, match="pretrain.stem_stride is the small stem's stride"):
        parse_settings(tiny_preset(stem_stride=2, small_stem=False))
    with pytest.raises(SettingsError, match="pretrain.width must be"):
        parse_settings(tiny_preset(width=2))
    assert isinstance(parse_settings(tiny_preset(objective="supervised"))["pretrain"], PretrainSettings)


def test_knn_on_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    train_labels, test_labels = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 10)
    train = centres[train_labels] + rng.normal(size=(90, 16))
    test = centres[test_labels] + rng.normal(size=(30, 16))
    assert knn_accuracy(train, train_labels, test, test_labels, k=5) == 1.0
    # shuffled training labels: near chance
    assert knn_accuracy(train, rng.permutation(train_labels), test, test_labels, k=5) < 0.7
    assert knn_predict(train, train_labels, test[:4], k=1, weighting="uniform").tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="weighting"):
        knn_predict(train, train_labels, test, weighting="cosine")


def test_symmetric_loss_queries_both_views_and_enqueues_both_keys(images):
    """Symmetric MoCo: every view is a query, so each step enqueues 2 x batch keys; it is
    seeded like the one-sided loss and trains other weights than it."""
    symmetric = MocoPretrainer(seed=0, symmetric=True, **TINY).fit(images)
    again = MocoPretrainer(seed=0, symmetric=True, **TINY).fit(images)
    one_sided = MocoPretrainer(seed=0, **TINY).fit(images)
    assert symmetric._queue_ptr == (3 * 2 * 8) % 32 and one_sided._queue_ptr == (3 * 8) % 32
    assert symmetric.loss_history_ == again.loss_history_
    assert symmetric.loss_history_[0] != one_sided.loss_history_[0]
    assert symmetric.get_params()["symmetric"] is True and "symmetric" not in one_sided.get_params()
    with pytest.raises(ValueError, match="symmetric must be True or False"):
        MocoPretrainer(symmetric="yes", max_steps=1)


def test_head_bn_puts_batchnorm_in_the_projection_head(images):
    """head_bn: the MoCo v3-style head (BatchNorm after both layers; the last without affine
    parameters); the backbone saved is the same architecture either way."""
    with_bn = MocoPretrainer(seed=0, head_bn=True, **TINY).fit(images)
    norms = [m for m in with_bn.network_.query.head if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 and norms[0].affine and not norms[1].affine
    assert all(np.isfinite(with_bn.loss_history_))
    plain = MocoPretrainer(seed=0, **TINY).fit(images)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.network_.query.head)
    assert trunk_weights(with_bn).keys() == trunk_weights(plain).keys()
    assert not torch.equal(trunk_weights(with_bn)["conv1.weight"], trunk_weights(plain)["conv1.weight"])


def test_new_moco_options_key_the_checkpoint_only_when_set():
    sections = parse_settings(tiny_preset(symmetric=True, head_bn=True))
    settings = sections["pretrain"].checkpoint_settings(sections.data, in_channels=1)
    assert settings["symmetric"] is True and settings["head_bn"] is True
    pretrainer = sections["pretrain"].pretrainer(1, progress=False)
    assert pretrainer.symmetric and pretrainer.head_bn
    supervised = parse_settings(tiny_preset(objective="supervised", symmetric=True))
    assert "symmetric" not in supervised["pretrain"].checkpoint_settings(supervised.data, in_channels=1)
