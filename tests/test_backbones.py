"""Backbones and checkpoint loading: every supported format written here and read back,
bad files rejected with messages that name the problem, real ImageNet weights on real images."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from attribution.backbones import (
    CHECKPOINT_FORMAT,
    BackboneSpec,
    CheckpointError,
    CheckpointKeysError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnknownCheckpointFormatError,
    checkpoint_metadata,
    detect_format,
    load_backbone,
    read_checkpoint,
    save_backbone_checkpoint,
    spec_from_checkpoint,
)
from conftest import require_foolbox_data

torch.set_num_threads(1)  # one thread: robust on a shared machine (two spin-wait under load)


def source_resnet(name="resnet18", small_stem=False, in_channels=3, seed=0):
    """A torchvision ResNet with random (seeded) weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    with torch.no_grad():  # BN running stats away from (0, 1) so a missed buffer would show
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


@torch.no_grad()
def pooled(net, x):
    """Features of a torchvision ResNet before its fc layer."""
    trunk = nn.Sequential(*list(net.children())[:-1])
    return torch.flatten(trunk(x), 1)


@torch.no_grad()
def features(model, x):
    return model(x)


def inputs(channels=3, size=64, n=4):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def trunk_state(net):
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


# ----------------------------------------------------------------------------- formats


def test_moco_v1v2_checkpoint(tmp_path):
    net = source_resnet()
    state = {f"module.encoder_q.{k}": v for k, v in trunk_state(net).items()}
    # MoCo v2's MLP head, the key encoder and the queue must all be dropped
    state.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.0.bias": torch.randn(512),
                  "module.encoder_q.fc.2.weight": torch.randn(128, 512), "module.encoder_q.fc.2.bias": torch.randn(128),
                  "module.encoder_k.conv1.weight": torch.randn(64, 3, 7, 7),
                  "module.queue": torch.randn(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}}, path)
    assert detect_format(read_checkpoint(path)) == "moco_v1v2"
    model = load_backbone(BackboneSpec("resnet18", checkpoint=str(path)))
    x = inputs()
    assert model.dim == 512
    torch.testing.assert_close(features(model, x), pooled(net, x), rtol=0, atol=0)


def test_moco_v3_checkpoint(tmp_path):
    net = source_resnet("resnet50", seed=3)
    state = {f"module.base_encoder.{k}": v for k, v in trunk_state(net).items()}
    state.update({"module.base_encoder.fc.0.weight": torch.randn(16, 2048),
                  "module.base_encoder.fc.1.running_mean": torch.randn(16),
                  "module.momentum_encoder.conv1.weight": torch.randn(64, 3, 7, 7),
                  "module.predictor.0.weight": torch.randn(16, 16)})
    path = tmp_path / "r-50-100ep.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "scaler": {"scale": 1.0}}, path)
    assert detect_format(read_checkpoint(path)) == "moco_v3"
    assert spec_from_checkpoint(path).name == "resnet50"
    model = load_backbone(BackboneSpec("resnet50", checkpoint=str(path)))
    x = inputs(size=32, n=2)
    assert model.dim == 2048
    torch.testing.assert_close(features(model, x), pooled(net, x), rtol=0, atol=0)


def test_torchvision_state_dict_and_gray_adaptation(tmp_path):
    net = source_resnet(seed=4)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # includes fc.weight / fc.bias: dropped
    x = inputs()
    rgb = load_backbone(BackboneSpec("resnet18", checkpoint=str(path)))
    torch.testing.assert_close(features(rgb, x), pooled(net, x), rtol=0, atol=0)

    # A 1-channel model from RGB weights: the RGB filters are summed, which equals feeding
    # the gray image repeated into three channels to the original network.
    gray = load_backbone(BackboneSpec("resnet18", in_channels=1, checkpoint=str(path)))
    g = x[:, :1]
    torch.testing.assert_close(features(gray, g), pooled(net, g.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", ["", "backbone."])
def test_lightly_sequential_state_dict(tmp_path, prefix):
    net = source_resnet(small_stem=True, in_channels=1, seed=5)
    backbone = nn.Sequential(*list(net.children())[:-1])  # lightly's way of dropping fc
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    assert "0.weight" in backbone.state_dict() and "4.0.conv1.weight" in backbone.state_dict()
    if prefix:  # a lightly MoCo model's state dict: heads and momentum copies are dropped
        state.update({"projection_head.layers.0.weight": torch.randn(8, 512),
                      "backbone_momentum.0.weight": torch.randn(64, 1, 3, 3)})
    path = tmp_path / "lightly.ckpt"
    torch.save({"state_dict": state}, path)
    assert detect_format(read_checkpoint(path)) == "lightly"
    spec = spec_from_checkpoint(path)
    assert (spec.name, spec.small_stem, spec.in_channels) == ("resnet18", True, 1)
    model = load_backbone(spec)
    x = inputs(channels=1, size=28)
    torch.testing.assert_close(features(model, x), pooled(net, x), rtol=0, atol=0)


def test_project_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1)
    model = load_backbone(spec)
    path = save_backbone_checkpoint(model, tmp_path / "ckpt" / "moco.pt", pretrain={"steps": 3})
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed away
    rebuilt = spec_from_checkpoint(path)
    assert rebuilt == BackboneSpec("resnet18", small_stem=True, in_channels=1, checkpoint=str(path))
    x = inputs(channels=1, size=28)
    torch.testing.assert_close(features(load_backbone(rebuilt), x), features(model, x), rtol=0, atol=0)
    # A caller's spec that disagrees with the file is overridden by the file, with a warning.
    with pytest.warns(UserWarning, match="in_channels=3"):
        loaded = load_backbone(BackboneSpec("resnet18", checkpoint=str(path)))
    assert loaded.spec.in_channels == 1 and loaded.spec.small_stem


def test_narrow_resnet_is_torchvision_shaped_and_round_trips(tmp_path):
    """A width-16 ResNet-18 with a stride-2 small stem: 128-d features, torchvision key
    names, its architecture stored in the checkpoint and rebuilt from the file alone."""
    torch.manual_seed(0)
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1, width=16, stem_stride=2)
    model = load_backbone(spec)
    assert model.dim == spec.dim == 128
    state = model.trunk.state_dict()
    assert tuple(state["conv1.weight"].shape) == (16, 1, 3, 3)
    assert tuple(state["layer4.1.conv2.weight"].shape) == (128, 128, 3, 3)
    assert set(state) == set(trunk_state(source_resnet(small_stem=True, in_channels=1)))  # same names
    x = inputs(channels=1, size=28)
    assert features(model, x).shape == (4, 128)
    assert model.trunk.conv1.stride == (2, 2)
    path = save_backbone_checkpoint(model, tmp_path / "narrow.pt")
    rebuilt = spec_from_checkpoint(path)
    assert (rebuilt.width, rebuilt.stem_stride, rebuilt.small_stem) == (16, 2, True)
    torch.testing.assert_close(features(load_backbone(rebuilt), x), features(model, x), rtol=0, atol=0)
    # a plain state dict of a narrow network: the width is read from the first conv
    torch.save(state, tmp_path / "narrow-torchvision.pt")
    assert spec_from_checkpoint(tmp_path / "narrow-torchvision.pt").width == 16
    assert BackboneSpec("resnet50", width=16).dim == 512


def test_spec_records_of_default_width_are_unchanged():
    """Fields added later are left out of the record at their defaults, so stored records
    of existing backbones (embedding manifests, checkpoints) keep comparing equal."""
    old = {"name": "resnet18", "small_stem": True, "in_channels": 1, "checkpoint": None, "image_size": None,
           "normalize": "dataset"}
    assert BackboneSpec("resnet18", small_stem=True, in_channels=1).to_dict() == old
    assert BackboneSpec.from_dict(old) == BackboneSpec("resnet18", small_stem=True, in_channels=1, width=64)
    assert BackboneSpec("resnet18", small_stem=True, width=32).to_dict()["width"] == 32
    # the default width builds torchvision's own network: the same random init as before
    torch.manual_seed(3)
    ours = load_backbone(BackboneSpec("resnet18")).trunk.state_dict()
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(weights=None).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("fields, message", [
    ({"width": 2}, "width must be an int >= 4"),
    ({"stem_stride": 3, "small_stem": True}, "stem_stride must be 1 or 2"),
    ({"stem_stride": 2}, "set small_stem=True"),
    ({"name": "efficientnet_lite0", "width": 32}, "width is only for ResNets"),
    ({"features": "avg"}, "features must be one of"),
    ({"name": "efficientnet_lite0", "features": "grid"}, "has only 'pooled' features"),
])
def test_bad_architecture_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        BackboneSpec(**fields)


def test_grid_features_are_the_third_stage_pooled_to_4x4():
    """features = "grid": the same weights, the third stage's map average-pooled to 4 x 4
    and flattened (checked against the trunk's own layers); the record keeps "pooled" out."""
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1, width=16, stem_stride=2)
    torch.manual_seed(0)
    pooled = load_backbone(spec)
    grid = load_backbone(BackboneSpec(**{**spec.__dict__, "features": "grid"}))
    grid.trunk.load_state_dict(pooled.trunk.state_dict())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        t = pooled.trunk
        third = t.layer3(t.layer2(t.layer1(t.maxpool(t.relu(t.bn1(t.conv1(x)))))))  # 14 -> 7 -> 4 px
        expected = nn.functional.adaptive_avg_pool2d(third, 4).flatten(1)
        out = grid(x)
    assert grid.dim == 64 * 16 == out.shape[1] and torch.allclose(out, expected)
    assert not torch.allclose(out[:, :pooled.dim], pooled(x))  # not the pooled features
    assert "features" not in spec.to_dict() and grid.spec.to_dict()["features"] == "grid"


def test_grid2_features_are_the_second_stage_pooled_to_4x4():
    """features = "grid2": the second stage's map (14 x 14 px for a stride-1 stem on 28 px)
    average-pooled to 4 x 4, from the same weights as the other taps."""
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1, width=16, stem_stride=1)
    torch.manual_seed(0)
    pooled = load_backbone(spec)
    grid2 = load_backbone(BackboneSpec(**{**spec.__dict__, "features": "grid2"}))
    grid2.trunk.load_state_dict(pooled.trunk.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        t = pooled.trunk
        second = t.layer2(t.layer1(t.relu(t.bn1(t.conv1(x)))))
        assert second.shape[-1] == 14
        expected = nn.functional.adaptive_avg_pool2d(second, 4).flatten(1)
        out = grid2(x)
    assert grid2.dim == 32 * 16 == out.shape[1] and torch.allclose(out, expected)
    with pytest.raises(ValueError, match="'grid2' reads a ResNet's stage 2"):
        BackboneSpec("efficientnet_lite0", features="grid2")


def test_grid_sets_the_cells_per_side_also_for_a_checkpoint(tmp_path):
    """grid = 7: the second stage (14 x 14) pooled to 7 x 7 cells (32 x 49 = 1,568-d), the
    same weights as a 4 x 4 read-out; a checkpoint is read out at the caller's grid, and
    the default grid stays out of the spec's record (old manifests keep their hash)."""
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1, width=16, features="grid2")
    assert "grid" not in spec.to_dict() and BackboneSpec(**{**spec.__dict__, "grid": 7}).to_dict()["grid"] == 7
    torch.manual_seed(0)
    path = save_backbone_checkpoint(load_backbone(spec), tmp_path / "moco.pt")
    four = load_backbone(spec_from_checkpoint(path).__class__(**{**spec_from_checkpoint(path).__dict__,
                                                                 "features": "grid2"}))
    seven = load_backbone(BackboneSpec(**{**spec_from_checkpoint(path).__dict__, "features": "grid2", "grid": 7}))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        t = four.trunk
        second = t.layer2(t.layer1(t.relu(t.bn1(t.conv1(x)))))
        out = seven(x)
    assert seven.dim == 32 * 49 == out.shape[1] and four.dim == 32 * 16
    assert torch.allclose(out, nn.functional.adaptive_avg_pool2d(second, 7).flatten(1), atol=1e-5)
    with pytest.raises(ValueError, match="grid must be an int >= 1"):
        BackboneSpec("resnet18", grid=0)


def test_a_checkpoint_is_read_out_with_the_requested_features(tmp_path):
    """A project checkpoint brings its architecture, but the read-out (pooled or grid)
    is the caller's: embedding a pretrained checkpoint with features = "grid" gives grid
    features of the checkpoint's weights."""
    spec = BackboneSpec("resnet18", small_stem=True, in_channels=1, width=16, stem_stride=2)
    torch.manual_seed(1)
    path = save_backbone_checkpoint(load_backbone(spec), tmp_path / "moco.pt")
    stored = spec_from_checkpoint(path)
    pooled = load_backbone(stored)
    grid = load_backbone(BackboneSpec(**{**stored.__dict__, "features": "grid"}))
    assert (pooled.dim, grid.dim) == (128, 1024) and grid.spec.features == "grid"
    assert all(torch.equal(a, b) for a, b in zip(pooled.trunk.state_dict().values(), grid.trunk.state_dict().values()))


# ----------------------------------------------------------------------------- bad input


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone(BackboneSpec("resnet18", checkpoint=str(tmp_path / "nope.pt")))


def test_truncated_file(tmp_path):
    path = tmp_path / "half.pt"
    torch.save(source_resnet().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"half\.pt.*truncated or corrupt.*again"):
        load_backbone(BackboneSpec("resnet18", checkpoint=str(path)))
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="half.pt"):
        read_checkpoint(path)


def assert_corrupt_message(info, path):
    """One line naming the file, the damage and the fix, and a ValueError (the CLI's clean error)."""
    message = str(info.value)
    assert "\n" not in message, message
    assert f"checkpoint {path} (" in message and "truncated or corrupt" in message, message
    assert "copy it again" in message and "attribution pretrain --exp EXP" in message, message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("garbage", [b"abc", b"\x00\x00\x00", b"hello, this is a text file\n",
                                     b"\x80\x02garbage", bytes(range(256)) * 4, b"PK\x03\x04zip?"])
def test_garbage_bytes_are_a_corrupt_checkpoint(tmp_path, garbage):
    # a few garbage bytes used to raise a bare IndexError / KeyError, or were blamed on "Python objects"
    path = tmp_path / "garbage.pt"
    path.write_bytes(garbage)
    for read in (read_checkpoint, spec_from_checkpoint, checkpoint_metadata,
                 lambda p: load_backbone(BackboneSpec("resnet18", checkpoint=str(p)))):
        with pytest.raises(CorruptCheckpointError) as info:
            read(path)
        assert_corrupt_message(info, path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_checkpoint_truncated_anywhere_is_corrupt(tmp_path, zip_format):
    path = tmp_path / "cut.pt"
    model = load_backbone(BackboneSpec("resnet18", small_stem=True, in_channels=1))
    save_backbone_checkpoint(model, path)
    if not zip_format:  # the legacy (torch < 1.6) serialisation some published checkpoints use
        torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    for length in (1, 2, 10, 100, len(data) // 3, len(data) - 1):
        path.write_bytes(data[:length])
        with pytest.raises(CorruptCheckpointError) as info:
            checkpoint_metadata(path)
        assert_corrupt_message(info, path)
    path.write_bytes(data)  # the intact file reads
    assert checkpoint_metadata(path)["format"] == CHECKPOINT_FORMAT


def test_python_objects_are_refused_with_the_resave_fix(tmp_path):
    from collections import OrderedDict
    from fractions import Fraction  # any class outside torch's weights-only allowlist

    path = tmp_path / "pickled.pt"
    torch.save(OrderedDict(step=Fraction(1, 3), state_dict=trunk_state(source_resnet())), path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert not isinstance(info.value, CorruptCheckpointError)  # the file is intact; it needs a re-save
    assert "holds Python objects" in str(info.value) and "weights_only=False" in str(info.value)


def test_missing_checkpoint_is_a_file_not_found_naming_the_fix(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError) as info:
        read_checkpoint(path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value) and "attribution pretrain --exp EXP" in str(info.value)


def test_project_checkpoint_without_weights_is_corrupt_not_a_key_error(tmp_path):
    path = tmp_path / "hollow.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "spec": {"name": "resnet18"}}, path)
    for read in (spec_from_checkpoint, checkpoint_metadata,
                 lambda p: load_backbone(BackboneSpec("resnet18", checkpoint=str(p)))):
        with pytest.raises(CorruptCheckpointError, match=r"hollow\.pt is marked .* lacks its 'spec' or 'trunk'"):
            read(path)


def test_wrong_keys_are_listed(tmp_path):
    state = trunk_state(source_resnet())
    del state["layer4.1.bn2.weight"]
    state["layer9.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointKeysError) as info:
        load_backbone(BackboneSpec("resnet18", checkpoint=str(path)))
    message = str(info.value)
    assert "1 missing keys: ['layer4.1.bn2.weight']" in message
    assert "1 unexpected keys: ['layer9.extra.weight']" in message
    assert "bad.pt" in message


def test_many_missing_keys_are_counted(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(source_resnet().state_dict(), path)
    with pytest.raises(CheckpointKeysError, match=r"missing keys: .*\(\+\d+ more\)"):
        load_backbone(BackboneSpec("resnet50", checkpoint=str(path)))


def test_stem_and_channel_mismatch_name_the_fix(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(trunk_state(source_resnet(small_stem=True, in_channels=1)), path)
    with pytest.raises(CheckpointKeysError, match="in_channels=1"):
        load_backbone(BackboneSpec("resnet18", small_stem=True, in_channels=3, checkpoint=str(path)))
    with pytest.raises(CheckpointKeysError, match="small_stem=True"):
        load_backbone(BackboneSpec("resnet18", small_stem=False, in_channels=1, checkpoint=str(path)))


def test_unknown_format_lists_formats(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": {"encoder.w": torch.zeros(2)}, "step": 3}, path)
    with pytest.raises(UnknownCheckpointFormatError, match=r"moco_v1v2.*moco_v3.*torchvision.*lightly"):
        load_backbone(BackboneSpec("resnet18", checkpoint=str(path)))


def test_spec_validation_names_argument():
    with pytest.raises(ValueError, match="BackboneSpec.name"):
        BackboneSpec("vgg16")
    with pytest.raises(ValueError, match="BackboneSpec.in_channels"):
        BackboneSpec("resnet18", in_channels=2)
    with pytest.raises(ValueError, match="BackboneSpec.normalize"):
        BackboneSpec("resnet18", normalize="cifar")
    assert BackboneSpec("resnet18").normalize == "dataset"


def test_random_resnet_contract():
    model = load_backbone(BackboneSpec("resnet18", small_stem=True, in_channels=1))
    images = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    x = model.preprocess(images, (0.286,), (0.353,))
    assert x.shape == (3, 1, 28, 28)
    assert features(model, x).shape == (3, 512)


# ----------------------------------------------------------------------------- real weights


def foolbox_imagenet():
    """The 20 real ImageNet validation images foolbox ships (file name ends in the label),
    resized (shorter side 256) and centre-cropped to 224 as for ImageNet evaluation."""
    folder = require_foolbox_data()  # skips locally, fails with CI set
    files = sorted(folder.glob("imagenet_*"))
    assert len(files) == 20, f"expected 20 imagenet_* images in {folder}"
    images = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = 256 / min(w, h)
            image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            w, h = image.size
            left, top = (w - 224) // 2, (h - 224) // 2
            images.append(np.asarray(image.crop((left, top, left + 224, top + 224))))
    return np.stack(images), np.array([int(p.stem.split("_")[-1]) for p in files])


def test_efficientnet_lite0_classifies_real_images():
    images, labels = foolbox_imagenet()
    model = load_backbone(BackboneSpec("efficientnet_lite0"))
    assert model.dim == 1280 and model.spec.image_size == 224 and model.spec.normalize == "imagenet"
    with torch.no_grad():
        x = model.preprocess(images, (0.5,) * 3, (0.5,) * 3)  # dataset stats ignored: imagenet normalisation
        feats = model(x)
        logits = model.trunk.classifier(feats)
    assert feats.shape == (20, 1280)
    top5 = logits.topk(5, dim=1).indices.numpy()
    top1_hits = int((top5[:, 0] == labels).sum())
    top5_hits = int((top5 == labels[:, None]).any(axis=1).sum())
    # Measured: 16/20 top-1 and 19/20 top-5 (chance: 0.02 and 0.1 images). Random weights get 0.
    assert top1_hits >= 14, f"top-1 {top1_hits}/20"
    assert top5_hits >= 17, f"top-5 {top5_hits}/20"


def test_efficientnet_gray_input():
    """Fashion-MNIST-like 1-channel uint8 images go through the same preprocessing."""
    model = load_backbone(BackboneSpec("efficientnet_lite0"))
    images = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28, 1), dtype=np.uint8)
    x = model.preprocess(images, (0.286,), (0.353,))
    assert x.shape == (2, 3, 224, 224)
    assert features(model, x).shape == (2, 1280)
