"""Datasets: real Fashion-MNIST, CIFAR-10 and ImageNet layouts built from real images."""

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attribution.data import (
    DatasetNotFoundError,
    DatasetSpec,
    load_dataset,
    per_class_subset,
    read_idx,
)


def foolbox_images(prefix):
    """The real images the foolbox package ships (file names end in _LABEL)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.skip("foolbox (test extra) is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    files = sorted(p for p in folder.iterdir() if p.name.startswith(prefix + "_"))
    assert files, f"no {prefix} images in {folder}"
    return [(np.asarray(Image.open(p).convert("RGB")), int(p.stem.split("_")[-1])) for p in files]


def test_fashion_mnist_real_files():
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.image_shape == (28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # ids are unique across splits and stable
    assert train.ids[0] == 0 and test.ids[0] == 60000
    assert len(np.intersect1d(train.ids, test.ids)) == 0
    # the first training image of Fashion-MNIST is an ankle boot (label 9)
    assert train.labels[0] == 9 and test.labels[0] == 9
    pixels = train.images([0, 1])
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 28, 28, 1)
    assert 0 < pixels.mean() < 255


def test_per_class_subset_is_seeded_and_balanced():
    spec = DatasetSpec("fashion-mnist", "train", n_per_class=7, seed=3)
    first, again = spec.load(), spec.load()
    other = DatasetSpec("fashion-mnist", "train", n_per_class=7, seed=4).load()
    assert np.array_equal(first.ids, again.ids)
    assert not np.array_equal(first.ids, other.ids)
    assert np.bincount(first.labels).tolist() == [7] * 10
    # the subset keeps the original ids, labels and pixels
    full = load_dataset("fashion-mnist", "train")
    positions = full.positions_of(first.ids)
    assert np.array_equal(full.labels[positions], first.labels)
    assert np.array_equal(full.images(positions[:5]), first.images(range(5)))


def test_per_class_subset_keeps_small_classes_whole():
    labels = np.array([0, 0, 0, 1])
    assert per_class_subset(labels, 2, seed=0).tolist().count(3) == 1
    with pytest.raises(ValueError, match="n_per_class"):
        per_class_subset(labels, 0, seed=0)


def test_missing_fashion_mnist_names_path_and_fix(tmp_path, monkeypatch):
    import attribution.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_download_fashion_mnist", lambda root: None)  # no network here
    with pytest.raises(DatasetNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train")


def test_truncated_idx_is_rejected(tmp_path):
    source = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    raw = gzip.open(source).read()
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(broken, "wb") as handle:
        handle.write(raw[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(broken)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("mnist-typo", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("fashion-mnist", "validation")


def test_cifar10_torchvision_layout_with_real_images(tmp_path):
    images = foolbox_images("cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    chunks = np.array_split(np.arange(len(images)), 6)
    for name, chunk in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], chunks):
        batch = {
            "data": np.stack([images[i][0].transpose(2, 0, 1).reshape(-1) for i in chunk]),
            "labels": [images[i][1] for i in chunk],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(train) + len(test) == len(images)
    assert train.image_shape == (32, 32, 3)
    assert np.array_equal(train.images([0])[0], images[0][0])
    assert train.labels.tolist() == [label for _, label in images[: len(train)]]
    assert test.ids[0] == 50000
    # a missing batch names the folder and how to make it
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_batch.*CIFAR10"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_imagenet_image_folder_with_real_images(tmp_path):
    images = foolbox_images("imagenet")
    for index, (pixels, label) in enumerate(images):
        # every class in train/ (as in ImageNet); every fourth image also in val/
        for split in ("train", "val") if index % 4 == 0 else ("train",):
            target = tmp_path / split / f"n{label:08d}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(target / f"img{index}.JPEG")
    train = load_dataset("imagenet", "train", root=tmp_path)
    val = load_dataset("imagenet", "test", root=tmp_path)
    assert len(train) == len(images) and len(val) == (len(images) + 3) // 4
    assert train.images([0]).shape == (1, 224, 224, 3)
    assert val.ids.min() == len(train)
    # labels index the sorted class folders of train/, shared by val
    assert train.classes == sorted({f"n{label:08d}" for _, label in images})
    expected = {f"img{i}.JPEG": f"n{label:08d}" for i, (_, label) in enumerate(images)}
    for position, path in enumerate(val.paths):
        assert val.classes[val.labels[position]] == expected[Path(path).name]
    with pytest.raises(DatasetNotFoundError, match="ImageFolder"):
        load_dataset("imagenet", "train", root=tmp_path / "missing")
