"""Image datasets with a stable integer id per item.

Every dataset is an :class:`ImageSet`: parallel arrays ``ids``, ``labels`` and a
lazy ``images(positions)`` reader, so that a shard of a large dataset can be read
without loading the rest. Ids are unique across the splits of one dataset (test ids
follow the train ids) and never change under subsetting, so tables written by any
stage can be joined on them.

Loaders:
- Fashion-MNIST: the original IDX files (Debian package ``dataset-fashion-mnist``
  installs them under /usr/share/datasets/fashion-mnist), decompressed once into a
  cache and memory-mapped. Without a root: the system copy, then the cache, then
  torchvision's download where a network exists. With a root (``data.root``): that
  folder only, so a root without the files is an error, never a silent switch to
  another copy.
- CIFAR-10: the torchvision (python pickle) layout, ``ROOT/cifar-10-batches-py``.
- ImageNet: the ImageFolder layout, ``ROOT/train/<wnid>/*.JPEG``, ``ROOT/val/<wnid>/*``.

Errors: :class:`DatasetNotFoundError` (a ``FileNotFoundError``) when files are missing,
:class:`DatasetCorruptError` (a ``ValueError``) when a file exists but cannot be read;
both messages name the file or folder and the fix, on one line.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from attribution.artifacts import atomic_path, write_text

SPLITS = ("train", "test")
DATASETS = ("fashion-mnist", "cifar10", "imagenet")

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but cannot be read (truncated, not the expected format);
    the message names the file and how to replace it."""


def cache_dir() -> Path:
    """Where decompressed dataset files are cached (``ATTRIBUTION_CACHE`` overrides)."""
    root = os.environ.get("ATTRIBUTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "image-attribution"
    )
    return Path(root)


class ImageSet:
    """One split of a dataset: ids, labels and a lazy image reader.

    ``images(positions)`` returns uint8 pixels shaped (n, H, W, C); positions index
    this set (0..len-1), not ids. ``mean`` and ``std`` are per-channel statistics in
    [0, 1] units for normalisation.
    """

    name: str
    split: str
    ids: np.ndarray
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def in_memory(self) -> bool:
        """True when every image can be materialised as one array (small datasets);
        False for sets decoded from files on read (ImageNet): consumers then read batches."""
        return False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images ``images`` returns."""
        raise NotImplementedError

    def images(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def subset(self, positions: Sequence[int] | np.ndarray) -> "ImageSet":
        return _Subset(self, np.asarray(positions, dtype=np.int64))

    def positions_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions of the given ids in this set; raises KeyError naming missing ids."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        where = np.searchsorted(sorted_ids, ids)
        where = np.clip(where, 0, len(sorted_ids) - 1)
        found = sorted_ids[where] == ids if len(sorted_ids) else np.zeros(len(ids), bool)
        if not np.all(found):
            missing = ids[~found][:10].tolist()
            raise KeyError(f"ids not in {self.name}/{self.split}: {missing}")
        return order[where]

    def describe(self) -> dict:
        counts = np.bincount(self.labels, minlength=self.num_classes).tolist() if len(self) else []
        return {"dataset": self.name, "split": self.split, "items": len(self), "per_class": counts}


class ArrayImageSet(ImageSet):
    """Images held in (or memory-mapped from) one uint8 array shaped (N, H, W, C)."""

    def __init__(self, name, split, pixels, labels, ids, classes, mean, std):
        if len(pixels) != len(labels) or len(labels) != len(ids):
            raise ValueError(
                f"{name}/{split}: {len(pixels)} images, {len(labels)} labels, {len(ids)} ids; "
                "they must be the same length"
            )
        self.name, self.split = name, split
        self._pixels = pixels
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.classes = list(classes)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def image_shape(self):
        return tuple(self._pixels.shape[1:])

    @property
    def in_memory(self) -> bool:
        return True

    def images(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        return np.ascontiguousarray(self._pixels[positions])


class _Subset(ImageSet):
    def __init__(self, parent: ImageSet, positions: np.ndarray):
        if len(positions) and (positions.min() < 0 or positions.max() >= len(parent)):
            raise IndexError(f"subset positions out of range for {parent.name}/{parent.split}")
        self._parent, self._positions = parent, positions
        self.name, self.split = parent.name, parent.split
        self.ids = parent.ids[positions]
        self.labels = parent.labels[positions]
        self.classes, self.mean, self.std = parent.classes, parent.mean, parent.std

    @property
    def image_shape(self):
        return self._parent.image_shape

    @property
    def in_memory(self) -> bool:
        return self._parent.in_memory

    def images(self, positions):
        return self._parent.images(self._positions[np.asarray(positions, dtype=np.int64)])


class FolderImageSet(ImageSet):
    """Image files decoded on read, resized (shorter side) and centre-cropped to a square.

    ``threads`` > 1 decodes a batch's files on that many threads (PIL releases the GIL
    while it decodes and resizes): for a worker that holds several CPUs, e.g. a GPU
    embedding actor (benchmarks/loader_throughput.py measures the gain)."""

    def __init__(self, name, split, paths, labels, ids, classes, mean, std, size=224, resize=256, threads=1):
        self.name, self.split = name, split
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.classes = list(classes)
        self.mean, self.std = tuple(mean), tuple(std)
        self.size, self.resize = size, resize
        if int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = int(threads)

    @property
    def image_shape(self):
        return (self.size, self.size, 3)

    def images(self, positions):
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.size, self.size, 3), dtype=np.uint8)

        def read(row: int) -> None:
            out[row] = self.decode(self.paths[positions[row]])

        if self.threads > 1 and len(positions) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.threads, len(positions))) as pool:
                list(pool.map(read, range(len(positions))))
        else:
            for row in range(len(positions)):
                read(row)
        return out

    def decode(self, path) -> np.ndarray:
        """One file as (size, size, 3) uint8: shorter side resized to ``resize``, centre crop."""
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = self.resize / min(w, h)
            image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                 Image.BILINEAR)
            w, h = image.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            return np.asarray(image.crop((left, top, left + self.size, top + self.size)))


# ----------------------------------------------------------------------------- IDX


REINSTALL_FASHION_MNIST = ("replace the file: 'apt-get install --reinstall dataset-fashion-mnist' for the "
                           "system copy, or copy it again into data.root")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) fully into memory."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        # a cut-off download or copy: gzip reports it as EOFError / BadGzipFile
        raise DatasetCorruptError(
            f"{path} is truncated or corrupt and cannot be decompressed ({type(error).__name__}: {error}); "
            f"{REINSTALL_FASHION_MNIST}"
        ) from error
    return _parse_idx(data, path)


def _parse_idx(data: bytes, path) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetCorruptError(f"{path} is not an IDX file (bad magic number); {REINSTALL_FASHION_MNIST}")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DatasetCorruptError(f"{path}: only unsigned-byte IDX files are supported (type code "
                                  f"{dtype_code:#x}); {REINSTALL_FASHION_MNIST}")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DatasetCorruptError(f"{path} is truncated or corrupt: its header is cut off; {REINSTALL_FASHION_MNIST}")
    shape = struct.unpack(">" + "I" * ndim, data[4:offset])
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise DatasetCorruptError(
            f"{path} is truncated or corrupt: header says {shape} ({expected} bytes) "
            f"but it holds {len(data) - offset} bytes; {REINSTALL_FASHION_MNIST}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_size_matches(path: Path) -> bool:
    """True when a cached raw IDX file is as long as its header says (a cache damaged
    after it was written is decompressed again instead of failing in np.memmap)."""
    with open(path, "rb") as handle:
        header = handle.read(4)
        if len(header) < 4:
            return False
        ndim = header[3]
        dims = handle.read(4 * ndim)
    if len(dims) < 4 * ndim:
        return False
    shape = struct.unpack(">" + "I" * ndim, dims)
    return path.stat().st_size == 4 + 4 * ndim + int(np.prod(shape))


def _idx_memmap(gz_path: Path, cache: Path) -> np.ndarray:
    """Decompress an IDX .gz once into the cache (atomically) and memory-map it."""
    target = cache / (gz_path.name[:-3] if gz_path.name.endswith(".gz") else gz_path.name + ".raw")
    stamp = f"{gz_path.stat().st_size}-{int(gz_path.stat().st_mtime)}"
    stamp_file = target.with_suffix(".stamp")
    if not (target.exists() and stamp_file.exists() and stamp_file.read_text() == stamp
            and _idx_size_matches(target)):
        read_idx(gz_path)  # validates the header and length before anything is cached
        opener = gzip.open if gz_path.name.endswith(".gz") else open
        # a reader never sees a half-written cache file
        with atomic_path(target) as tmp, opener(gz_path, "rb") as source, open(tmp, "wb") as out:
            shutil.copyfileobj(source, out)
        write_text(stamp_file, stamp)
    with open(target, "rb") as handle:
        header = handle.read(4)
        ndim = header[3]
        shape = struct.unpack(">" + "I" * ndim, handle.read(4 * ndim))
    return np.memmap(target, dtype=np.uint8, mode="r", offset=4 + 4 * ndim, shape=shape)


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


FASHION_MNIST_FILE_NAMES = tuple(name for pair in FASHION_MNIST_FILES.values() for name in pair)


def _fashion_mnist_folder(folder: Path) -> Path | None:
    """``folder`` or torchvision's ``folder/FashionMNIST/raw`` when it holds all four files."""
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        if all((sub / name).exists() for name in FASHION_MNIST_FILE_NAMES):
            return sub
    return None


def _find_fashion_mnist(root: str | os.PathLike | None) -> Path | None:
    # A root the user typed is the only place looked at: falling back to another copy
    # would run the experiment on data other than the one asked for.
    if root:
        return _fashion_mnist_folder(Path(root))
    for folder in (FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist"):
        found = _fashion_mnist_folder(folder)
        if found is not None:
            return found
    return None


def _missing_root_message(root: Path) -> str:
    if not root.exists():
        where = f"data.root {root} does not exist"
    elif not root.is_dir():
        where = f"data.root {root} is not a folder"
    else:
        missing = [n for n in FASHION_MNIST_FILE_NAMES if not (root / n).exists()]
        where = f"data.root {root} lacks Fashion-MNIST files {missing} (also looked in {root / 'FashionMNIST' / 'raw'})"
    return (f"{where}; it must hold {', '.join(FASHION_MNIST_FILE_NAMES)}. Fix: copy those four files into "
            f"{root}, point data.root at the folder holding them (--set data.root=PATH), or leave it empty "
            f"(--set data.root=) to use the system copy in {FASHION_MNIST_SYSTEM_DIR} "
            "(installed by 'bash scripts/setup.sh')")


def _fashion_mnist_at_root(root) -> Path:
    """The folder under data.root holding the four files, or the error naming root and the fix."""
    folder = _find_fashion_mnist(root)
    if folder is None:
        raise DatasetNotFoundError(_missing_root_message(Path(root)))
    return folder


def load_fashion_mnist(split: str, root=None, download: bool = True) -> ArrayImageSet:
    folder = _fashion_mnist_at_root(root) if root else _find_fashion_mnist(None)
    if folder is None and download:
        folder = _download_fashion_mnist(None)
    if folder is None:
        looked = ", ".join(str(p) for p in (FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist"))
        raise DatasetNotFoundError(
            f"Fashion-MNIST IDX files not found (looked in {looked}; torchvision's download failed). "
            "Install them with 'apt-get update && apt-get install dataset-fashion-mnist' (Debian/Ubuntu; "
            "'bash scripts/setup.sh' does this), or set data.root to a folder holding "
            f"{', '.join(FASHION_MNIST_FILE_NAMES)} (--set data.root=PATH)"
        )
    image_file, label_file = FASHION_MNIST_FILES[split]
    cache = cache_dir() / "idx"
    pixels = _idx_memmap(folder / image_file, cache)
    labels = read_idx(folder / label_file).astype(np.int64)
    if pixels.shape[0] != labels.shape[0]:
        raise DatasetCorruptError(f"Fashion-MNIST {split} in {folder}: {pixels.shape[0]} images but "
                                  f"{labels.shape[0]} labels; {REINSTALL_FASHION_MNIST}")
    offset = 0 if split == "train" else 60000
    ids = np.arange(len(labels), dtype=np.int64) + offset
    return ArrayImageSet("fashion-mnist", split, pixels[..., None], labels, ids,
                         FASHION_MNIST_CLASSES, mean=(0.2860,), std=(0.3530,))


def _download_fashion_mnist(root) -> Path | None:
    """torchvision's download into the cache, for machines with a network but without the
    Debian package (only when no data.root was given)."""
    target = Path(root) if root else cache_dir() / "fashion-mnist"
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except Exception:  # no network, or a mirror is down: the caller raises the clear error
        return None
    return _find_fashion_mnist(target)


# ----------------------------------------------------------------------------- CIFAR-10


CIFAR10_MAKE = ("python3 -c 'import torchvision; torchvision.datasets.CIFAR10(\"PATH\", download=True)' "
                "on a machine with a network makes it")


def _cifar10_batches(split: str, root) -> list[Path]:
    """The batch files of ``split`` under data.root, or the error naming what is missing and the fix."""
    if root is None:
        raise DatasetNotFoundError(
            "CIFAR-10 (data.dataset = 'cifar10') needs data.root: set it to the folder holding "
            f"cifar-10-batches-py/ (--set data.root=PATH; torchvision's layout, {CIFAR10_MAKE})"
        )
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"CIFAR-10 data.root {folder} {'is not a folder' if folder.exists() else 'does not exist'}: "
            "set data.root to the folder holding "
            f"cifar-10-batches-py/ (--set data.root=PATH; {CIFAR10_MAKE})"
        )
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10 {split} files {missing} not found in {folder}. Expected torchvision's layout "
            "PATH/cifar-10-batches-py/{data_batch_1..5,test_batch}: point data.root at PATH "
            f"(--set data.root=PATH); {CIFAR10_MAKE}"
        )
    return [folder / name for name in names]


def load_cifar10(split: str, root) -> ArrayImageSet:
    pixels, labels = [], []
    for path in _cifar10_batches(split, root):
        batch_pixels, batch_labels = _read_cifar10_batch(path)
        pixels.append(batch_pixels)
        labels.append(batch_labels)
    pixels_all, labels_all = np.concatenate(pixels), np.concatenate(labels)
    offset = 0 if split == "train" else 50000
    ids = np.arange(len(labels_all), dtype=np.int64) + offset
    return ArrayImageSet("cifar10", split, pixels_all, labels_all, ids, CIFAR10_CLASSES,
                         mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle batch -> (uint8 NHWC pixels, int64 labels); a damaged or foreign
    file is a DatasetCorruptError naming it, whatever unpickling or reshaping raised."""
    replace = f"replace it with a fresh copy of the batch ({CIFAR10_MAKE})"
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
    except Exception as error:  # truncated or garbage bytes raise any of a dozen types
        raise DatasetCorruptError(
            f"{path} is not a readable CIFAR-10 python batch ({type(error).__name__}: {str(error)[:200]}); {replace}"
        ) from error
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        found = sorted(map(str, batch))[:10] if isinstance(batch, dict) else type(batch).__name__
        raise DatasetCorruptError(
            f"{path} is not a CIFAR-10 python batch (expected a dict with 'data' and 'labels', found {found}); "
            f"{replace}"
        )
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetCorruptError(
            f"{path}: 'data' is shaped {data.shape} for {len(labels)} labels, expected ({len(labels)}, 3072); "
            f"{replace}"
        )
    return data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


# ----------------------------------------------------------------------------- ImageNet


def _require_image_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet folder {folder} not found. Expected the ImageFolder layout "
            "PATH/train/<wnid>/*.JPEG and PATH/val/<wnid>/*.JPEG (val sorted into class folders): "
            "point data.root at PATH (--set data.root=PATH)"
        )


def _list_image_folder(folder: Path, classes: list[str] | None):
    _require_image_folder(folder)
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes or found
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    return classes, paths, labels


IMAGENET_SPLIT_FOLDERS = {"train": "train", "test": "val"}


def _imagenet_root(root) -> Path:
    if root is None:
        raise DatasetNotFoundError("ImageNet (data.dataset = 'imagenet') needs data.root: set it to a folder "
                                   "with train/ and val/ in ImageFolder layout (--set data.root=PATH)")
    return Path(root)


def load_imagenet(split: str, root, size: int = 224) -> FolderImageSet:
    root = _imagenet_root(root)
    # Class order (and so labels) comes from train/; val ids follow all train ids.
    classes, train_paths, train_labels = _list_image_folder(root / "train", None)
    if split == "train":
        paths, labels, offset = train_paths, train_labels, 0
    else:
        _, paths, labels = _list_image_folder(root / "val", classes)
        offset = len(train_paths)
    if not paths:
        raise DatasetNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root / IMAGENET_SPLIT_FOLDERS[split]}/<wnid>/: "
            "point data.root at an ImageFolder layout (--set data.root=PATH)")
    ids = np.arange(len(paths), dtype=np.int64) + offset
    return FolderImageSet("imagenet", split, paths, labels, ids, classes,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), size=size,
                          resize=round(size * 256 / 224))


# ----------------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to rebuild one split anywhere (a Ray worker, another machine).

    ``n_per_class`` keeps a seeded random subset of that many items per class.
    """

    name: str = "fashion-mnist"
    split: str = "train"
    root: str | None = None
    n_per_class: int | None = None
    seed: int = 0

    def load(self) -> ImageSet:
        return load_dataset(self.name, self.split, root=self.root, n_per_class=self.n_per_class, seed=self.seed)


def _root_path(root) -> str | None:
    """data.root as given ("" in a preset: the default location; ``~`` expanded)."""
    return os.path.expanduser(os.fspath(root)) if root else None


def check_dataset_files(name: str, root=None, splits: Sequence[str] = SPLITS) -> None:
    """Raise the loader's own :class:`DatasetNotFoundError` when ``name``'s files for
    ``splits`` are not where ``root`` says; existence only, nothing is read, so a command
    can check its inputs before it deletes or computes anything. Fashion-MNIST without a
    root is not checked here: the loader may still find or download it."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    root = _root_path(root)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if name == "fashion-mnist" and root:
            _fashion_mnist_at_root(root)
        elif name == "cifar10":
            _cifar10_batches(split, root)
        elif name == "imagenet":
            _require_image_folder(_imagenet_root(root) / IMAGENET_SPLIT_FOLDERS[split])


def load_dataset(name: str, split: str, root=None, n_per_class: int | None = None, seed: int = 0) -> ImageSet:
    """Load one split of a dataset, optionally a seeded ``n_per_class`` subset."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = _root_path(root)
    if name == "fashion-mnist":
        data = load_fashion_mnist(split, root)
    elif name == "cifar10":
        data = load_cifar10(split, root)
    else:
        data = load_imagenet(split, root)
    if len(data) == 0:
        raise ValueError(f"{name}/{split} at {root} holds no images")
    if n_per_class is not None:
        data = data.subset(per_class_subset(data.labels, n_per_class, seed))
    return data


def per_class_subset(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset with ``n_per_class`` items of each class
    (all of a class's items when it has fewer)."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n_per_class}")
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, size=min(n_per_class, len(members)), replace=False))
    return np.sort(np.concatenate(keep))
