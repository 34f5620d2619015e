"""Datasets: real Fashion-MNIST, CIFAR-10 and ImageNet layouts built from real images."""

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attribution.data import (
    DatasetCorruptError,
    DatasetNotFoundError,
    DatasetSpec,
    check_dataset_files,
    load_dataset,
    per_class_subset,
    read_idx,
)
from conftest import require_foolbox_data


def foolbox_images(prefix):
    """The real images the foolbox package ships (file names end in _LABEL)."""
    folder = require_foolbox_data()  # skips locally, fails with CI set
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
    # decoding on threads (a worker holding several CPUs) gives the same pixels in the same order
    threaded = load_dataset("imagenet", "train", root=tmp_path)
    threaded.threads = 3
    positions = np.array([5, 0, 19, 7, 7])
    np.testing.assert_array_equal(threaded.images(positions), train.images(positions))
    assert val.ids.min() == len(train)
    # labels index the sorted class folders of train/, shared by val
    assert train.classes == sorted({f"n{label:08d}" for _, label in images})
    expected = {f"img{i}.JPEG": f"n{label:08d}" for i, (_, label) in enumerate(images)}
    for position, path in enumerate(val.paths):
        assert val.classes[val.labels[position]] == expected[Path(path).name]
    with pytest.raises(DatasetNotFoundError, match="ImageFolder"):
        load_dataset("imagenet", "train", root=tmp_path / "missing")


# ----------------------------------------------------------------------------- missing or damaged files

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def one_line_error(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message  # the CLI prints it as one `error:` line
    return message


def test_fashion_mnist_root_without_files_is_an_error_not_the_system_copy(tmp_path):
    assert all((SYSTEM_FASHION_MNIST / name).exists() for name in FASHION_MNIST_FILES)  # the copy not to fall back on
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", "train", root=empty)
    message = one_line_error(info)
    assert f"data.root {empty} lacks Fashion-MNIST files" in message
    assert all(name in message for name in FASHION_MNIST_FILES)
    assert "--set data.root=PATH" in message and "--set data.root=)" in message  # elsewhere, or the system copy
    assert "bash scripts/setup.sh" in message and "--data-root" not in message
    # a root that does not exist, and one holding only some of the files, are named as such
    with pytest.raises(DatasetNotFoundError, match=r"data\.root .*/typo does not exist"):
        load_dataset("fashion-mnist", "test", root=tmp_path / "typo")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train-images-idx3-ubyte.gz").symlink_to(SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", "train", root=partial)
    missing = one_line_error(info).split("lacks Fashion-MNIST files ")[1].split("]")[0]
    assert "train-labels-idx1-ubyte.gz" in missing and "train-images-idx3-ubyte.gz" not in missing


def test_fashion_mnist_root_with_files_is_used(tmp_path, monkeypatch):
    import attribution.data as data

    # torchvision's layout under the root; the system copy is out of reach, so what loads came from the root
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        (raw / name).symlink_to(SYSTEM_FASHION_MNIST / name)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    test = load_dataset("fashion-mnist", "test", root=tmp_path / "root", n_per_class=3, seed=0)
    assert len(test) == 30 and test.ids.min() >= 60000


def test_truncated_gzip_is_a_corrupt_dataset_error(tmp_path):
    source = SYSTEM_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"
    broken = tmp_path / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(source.read_bytes()[:-200])  # a cut-off download: the gzip stream ends early
    with pytest.raises(DatasetCorruptError) as info:
        read_idx(broken)
    message = one_line_error(info)
    assert str(broken) in message and "truncated or corrupt" in message and "--reinstall" in message
    assert isinstance(info.value, ValueError)


def test_missing_cifar10_names_the_setting_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "train")
    message = one_line_error(info)
    assert "CIFAR-10 (data.dataset = 'cifar10') needs data.root" in message and "--set data.root=PATH" in message
    assert "cifar-10-batches-py" in message and "--data-root" not in message
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "train", root="/nonexistent")
    message = one_line_error(info)
    assert "/nonexistent does not exist" in message and "--set data.root=PATH" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", "test", root=empty)
    assert "['test_batch'] not found in" in one_line_error(info)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-batch", "wrong-shape"])
def test_damaged_cifar10_batch_is_a_corrupt_dataset_error(tmp_path, damage):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]})
    contents = {"garbage": b"abc", "truncated": good[: len(good) // 2],
                "not-a-batch": pickle.dumps([1, 2, 3]),
                "wrong-shape": pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]})}[damage]
    (folder / "test_batch").write_bytes(contents)
    with pytest.raises(DatasetCorruptError) as info:
        load_dataset("cifar10", "test", root=tmp_path)
    message = one_line_error(info)
    assert str(folder / "test_batch") in message and "CIFAR10" in message  # the file and how to remake it
    # the intact batch still loads
    (folder / "test_batch").write_bytes(good)
    assert len(load_dataset("cifar10", "test", root=tmp_path)) == 4


def test_check_dataset_files_raises_what_the_loader_would_without_reading(tmp_path):
    # the preflight a command runs before deleting or computing anything: same errors, no data read
    check_dataset_files("fashion-mnist")  # the system copy
    check_dataset_files("fashion-mnist", root=str(SYSTEM_FASHION_MNIST))
    for name, root in (("fashion-mnist", tmp_path / "empty"), ("cifar10", None), ("cifar10", "/nonexistent"),
                       ("imagenet", None), ("imagenet", tmp_path)):
        with pytest.raises(DatasetNotFoundError) as checked:
            check_dataset_files(name, root)
        with pytest.raises(DatasetNotFoundError) as loaded:
            load_dataset(name, "train", root=root)
        assert str(checked.value) == str(loaded.value)
        assert "--set data.root=" in one_line_error(checked)
    (tmp_path / "train" / "n01").mkdir(parents=True)  # train/ present, val/ missing: the test split is named
    with pytest.raises(DatasetNotFoundError, match=r"ImageNet folder .*/val not found"):
        check_dataset_files("imagenet", tmp_path)
    check_dataset_files("imagenet", tmp_path, splits=("train",))
    with pytest.raises(ValueError, match="dataset must be one of"):
        check_dataset_files("mnist", None)


def test_missing_imagenet_names_the_setting(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("imagenet", "train")
    assert "--set data.root=PATH" in one_line_error(info)


# ----------------------------------------------------------------------------- CI: fail, never skip

REAL_DATA_TESTS = '''
import pytest

import attribution.data as data
from conftest import real_data_or_none, require_fashion_mnist


def test_root_without_files(tmp_path):
    require_fashion_mnist("train", root=str(tmp_path / "empty"))


def test_system_copy_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_download_fashion_mnist", lambda root: None)  # no network here
    require_fashion_mnist("test")


def test_stand_in_data_locally(tmp_path):
    assert real_data_or_none(lambda: data.load_dataset("fashion-mnist", "test", root=str(tmp_path)),
                             "Fashion-MNIST") is None
'''


def run_real_data_tests(tmp_path, ci):
    module = tmp_path / "test_needs_data.py"
    module.write_text(REAL_DATA_TESTS)
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "tests"), str(repo)])  # the real conftest helpers
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(module)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("ci", ["1", "true"])
def test_missing_real_data_fails_when_ci_is_set(tmp_path, ci):
    code, output = run_real_data_tests(tmp_path, ci)
    assert code == 1, output
    assert "3 failed" in output and "skipped" not in output, output  # stand-in data is no excuse either
    assert "CI must run the real-data tests: run `bash scripts/setup.sh`" in output
    assert "lacks Fashion-MNIST files" in output  # the loader's own message says which files
    assert "Traceback" not in output and "During handling" not in output  # one clean line per test


def test_missing_real_data_skips_on_a_developer_machine(tmp_path):
    code, output = run_real_data_tests(tmp_path, None)
    assert code == 0, output
    assert "1 passed, 2 skipped" in output, output
    assert "bash scripts/setup.sh" in output  # the skip reason names the fix too
