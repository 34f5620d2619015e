"""Data loading at ImageNet scale: images/s per core of the file-backed loader.

The imagenet preset reads its images through :class:`attribution.data.FolderImageSet`
(PIL: JPEG decode, bilinear resize of the shorter side to 256, centre crop 224). This
benchmark measures, on the same files and side by side in one run:

- ``pil``: that loader, one process, one thread (the rate per core);
- ``pil x2 threads``: the same loader with its ``threads`` decoding in parallel in one
  process (PIL releases the GIL while it decodes and resizes): what a GPU actor that
  holds several CPUs gets;
- ``torchvision``: ``torchvision.io.decode_jpeg`` + an antialiased resize and crop (the
  other decoder installed here), one thread;
- ``decoded shard``: reading the same crops from a pre-decoded uint8 array on disk
  (``numpy.load(mmap_mode="r")``, random batches), the layout docs/scale.md proposes
  for retraining (decode once, read many times);
- ``pil, N processes``: N loader processes at once (N = the cores), the aggregate rate.

Images: real photographs at ImageNet's typical size. By default foolbox's 20 real
ImageNet validation images (test extra), resized to 500 x 375 (ImageNet's most common
training-image size; mean ~400 x 350) and written as quality-90 JPEGs, repeated to
``--images`` files; ``--root`` points at a real ImageFolder (e.g. ImageNet's train/)
instead and reads the first ``--images`` files of it.

    python -m benchmarks.loader_throughput                     # 1000 images x 3 rounds, ~2 min
    python -m benchmarks.loader_throughput --root /data/imagenet/train --images 2000

Run it on a quiet machine: every figure is CPU time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGENET_TYPICAL_SIZE = (500, 375)


def sample_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEG files at ImageNet's typical size from foolbox's real ImageNet images."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise SystemExit("foolbox (the test extra: pip install -e .[test]) is not installed: its real ImageNet "
                         "images are the default source; or pass --root <an ImageFolder of JPEGs>")
    sources = sorted((Path(spec.origin).parent / "data").glob("imagenet_*"))
    if not sources:
        raise SystemExit(f"no imagenet_* images in {Path(spec.origin).parent / 'data'}; pass --root")
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        path = folder / f"n{i % 20:08d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(sources[i % len(sources)]) as image:
            image = image.convert("RGB").resize(IMAGENET_TYPICAL_SIZE, Image.BICUBIC)
            # a seeded flip and crop jitter: no two files are byte-identical
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            image.save(path, quality=90)
        files.append(path)
    return files


def root_files(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise SystemExit(f"--root {root}: no <class>/<image>.JPEG files under it (the ImageFolder layout)")
    return files[:n]


def folder_set(files: list[Path], threads: int = 1):
    from attribution.data import FolderImageSet

    return FolderImageSet("bench", "train", [str(p) for p in files], np.zeros(len(files), np.int64),
                          np.arange(len(files)), ["c"], (0.5,) * 3, (0.25,) * 3, threads=threads)


def time_pil(files: list[Path], batch: int, threads: int = 1) -> float:
    images = folder_set(files, threads)
    begin = time.perf_counter()
    for start in range(0, len(files), batch):
        images.images(np.arange(start, min(len(files), start + batch)))
    return len(files) / (time.perf_counter() - begin)


def time_torchvision(files: list[Path], batch: int) -> float:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as F

    begin = time.perf_counter()
    for start in range(0, len(files), batch):
        out = []
        for path in files[start:start + batch]:
            image = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
            image = F.center_crop(F.resize(image, 256, antialias=True), [224, 224])
            out.append(image)
        torch.stack(out)
    return len(files) / (time.perf_counter() - begin)


def time_decoded_shard(files: list[Path], batch: int, folder: Path, seed: int = 0) -> float:
    """Decode once into one uint8 .npy shard, then read random batches of it."""
    pixels = folder_set(files).images(np.arange(len(files)))
    path = folder / "shard-00000.npy"
    np.save(path, pixels)
    shard = np.load(path, mmap_mode="r")
    order = np.random.default_rng(seed).permutation(len(files))
    rounds = 5
    begin = time.perf_counter()
    for _ in range(rounds):
        for start in range(0, len(files), batch):
            np.ascontiguousarray(shard[np.sort(order[start:start + batch])])
    return rounds * len(files) / (time.perf_counter() - begin)


def _process_rate(args) -> tuple[float, float, int]:
    files, batch = args
    os.environ["OMP_NUM_THREADS"] = "1"
    begin = time.perf_counter()
    images = folder_set(files)
    for start in range(0, len(files), batch):
        images.images(np.arange(start, min(len(files), start + batch)))
    return begin, time.perf_counter(), len(files)


def time_processes(files: list[Path], batch: int, processes: int) -> float:
    """Aggregate images/s of ``processes`` loader processes, each on its own share."""
    shares = [files[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_process_rate, [(share[:2], batch) for share in shares])  # warm: imports
        spans = pool.map(_process_rate, [(share, batch) for share in shares])
    begin, end = min(s[0] for s in spans), max(s[1] for s in spans)
    return sum(s[2] for s in spans) / (end - begin)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="files to read (default 1000)")
    parser.add_argument("--root", type=Path, help="an ImageFolder (class folders of JPEGs) to read instead")
    parser.add_argument("--batch", type=int, default=64, help="images per read (default 64)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="loader processes at once for the aggregate rate (default: the cores)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every method; the median is shown")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.images < args.batch:
        parser.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        tmp = Path(tmp)
        files = root_files(args.root, args.images) if args.root else sample_files(tmp / "train", args.images)
        sizes = [os.path.getsize(p) for p in files]
        time_pil(files[:args.batch], args.batch)  # warm the page cache and the imports
        time_torchvision(files[:args.batch], args.batch)
        runs = {"pil": lambda: time_pil(files, args.batch),
                "pil x2 threads": lambda: time_pil(files, args.batch, threads=2),
                "torchvision": lambda: time_torchvision(files, args.batch),
                "decoded shard": lambda: time_decoded_shard(files, args.batch, tmp),
                f"pil, {args.processes} processes": lambda: time_processes(files, args.batch, args.processes)}
        # the methods alternate, repeats times: a drift of the machine's speed hits them alike
        samples: dict = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                samples[name].append(run())
        rates = {name: float(np.median(values)) for name, values in samples.items()}
    result = {"images": len(files), "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1),
              "source": str(args.root) if args.root else f"foolbox ImageNet images as {IMAGENET_TYPICAL_SIZE} JPEGs",
              "cores": os.cpu_count(), "repeats": args.repeats,
              "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()}, "images_per_s": {k: round(v, 1) for k, v in rates.items()}}
    print(f"{len(files)} images ({result['source']}, mean {result['mean_file_kb']} KB), decode + resize 256 + "
          "crop 224:")
    for name, rate in rates.items():
        print(f"  {name:24s} {rate:9.1f} images/s   (rounds: {', '.join(f'{v:.0f}' for v in samples[name])})")
    per_core = rates["pil"]
    print(f"per core (pil, 1 thread): {per_core:.0f} images/s = {1000 / per_core:.1f} ms per image")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
