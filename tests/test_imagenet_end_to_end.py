"""The imagenet preset's code path end to end, on real images in ImageNet layout.

An ImageFolder tree written to a temporary folder (real Fashion-MNIST images saved as
JPEG under ``train/<wnid>/`` and ``val/<wnid>/``, plus foolbox's 20 real ImageNet
photographs spread over the training classes), a MoCo-v2-format ResNet-50 checkpoint
written here, and ``attribution run imagenet`` through the real CLI on a real local Ray:
every stage of the preset (embed with ResNet-50, rank, trak with ResNet-18 checkpoints,
support with ResNet-18 retraining, report) at tiny sizes, each decoding the JPEG files
batch by batch as it would on ImageNet (224 px centre crops). About 3-5 minutes on 2
CPU cores (the ResNet-18 trainings, ~40 s each, are most of it).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image

from attribution.artifacts import read_dataset
from attribution.experiment import Experiment
from conftest import require_fashion_mnist, require_foolbox_data

CLASSES = 4
TRAIN_PER_CLASS = 10   # Fashion-MNIST images per class, plus 5 foolbox photographs each
VAL_PER_CLASS = 3


def write_image_folder(root) -> dict:
    """train/ and val/ of CLASSES wnids; returns the file counts."""
    train = require_fashion_mnist("train", n_per_class=TRAIN_PER_CLASS)
    test = require_fashion_mnist("test", n_per_class=VAL_PER_CLASS)
    folder = require_foolbox_data()
    photos = sorted(p for p in folder.iterdir() if p.name.startswith("imagenet_"))
    assert len(photos) >= CLASSES * 5, f"foolbox ships {len(photos)} ImageNet images"
    counts = {"train": 0, "val": 0}
    for split, images in (("train", train), ("val", test)):
        for position in range(len(images)):
            label = int(images.labels[position])
            if label >= CLASSES:
                continue
            target = root / split / f"n{label:08d}"
            target.mkdir(parents=True, exist_ok=True)
            pixels = images.images([position])[0][..., 0]  # 28 x 28 gray
            Image.fromarray(pixels).save(target / f"fmnist_{int(images.ids[position])}.JPEG", quality=95)
            counts[split] += 1
    for index, path in enumerate(photos[:CLASSES * 5]):  # real photographs, decoded and resized like ImageNet's
        with Image.open(path) as photo:
            photo.convert("RGB").save(root / "train" / f"n{index % CLASSES:08d}" / f"photo_{index}.JPEG")
        counts["train"] += 1
    return counts


def write_moco_resnet50(path) -> None:
    """A checkpoint in facebookresearch/moco's v2 format (module.encoder_q.* with the MLP
    head, the key encoder and the queue), random weights seeded here."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.randn(2048, 2048) * 0.01,
                  "module.encoder_q.fc.0.bias": torch.zeros(2048),
                  "module.encoder_q.fc.2.weight": torch.randn(128, 2048) * 0.01,
                  "module.encoder_q.fc.2.bias": torch.zeros(128),
                  "module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state}, path)


def test_imagenet_preset_runs_every_stage_on_real_image_files(tmp_path, monkeypatch):
    from cluster.cli import main

    root = tmp_path / "imagenet"
    counts = write_image_folder(root)
    assert counts == {"train": CLASSES * (TRAIN_PER_CLASS + 5), "val": CLASSES * VAL_PER_CLASS}
    checkpoint = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    write_moco_resnet50(checkpoint)
    exp = tmp_path / "exp"
    monkeypatch.setenv("RAY_ADDRESS", "local")  # our own Ray, not one another process started
    tiny = {
        "data.root": str(root), "embed.checkpoint": str(checkpoint), "embed.batch_size": 16,
        "embed.shard_size": 32, "embed.actors": 1, "embed.threads_per_actor": 1,
        "rank.targets": CLASSES * VAL_PER_CLASS, "rank.top_k": 12,
        "trak.checkpoints": 1, "trak.budgets": "[]", "trak.proj_dim": 16, "trak.batch_size": 20,
        "trak.threads_per_actor": 1, "trak.shard_size": 40,  # the preset's fan-out: 2 workers, 40 files per item
        # 4 epochs of batch 8 at lr 0.02: about 0.6 validation accuracy from scratch (1 epoch: chance), so
        # the ensemble classifies some targets correctly and they are searched; ~40 s per training here
        "support.epochs": 4, "support.batch_size": 8, "support.lr": 0.02, "support.targets": 1,
        "support.seeds": 1, "support.budget": 1, "support.top_k": 12, "support.ensemble": 2,
        "support.modes": '["removal"]', "support.methods": '["esvm", "trak"]', "support.actors": 2,
        "report.n_boot": 50, "report.grid_targets": 2,
    }
    argv = ["run", "imagenet", "--exp", str(exp), "--no-progress"]
    for key, value in tiny.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0

    experiment = Experiment(exp)
    manifest = experiment.manifest()
    for stage in ("embed", "rank", "trak", "support", "report"):
        assert stage in manifest, f"stage {stage} did not record itself"
    # embed: ResNet-50 (2,048-d) features of every training and validation file
    embeddings = read_dataset(exp / "embeddings")
    assert len(embeddings) == counts["train"] + counts["val"]
    assert len(embeddings.column("embedding")[0]) == 2048
    # rank and trak: every method's rankings for the 4 targets, TRAK over every training file
    rankings = read_dataset(exp / "rankings").to_pandas()
    assert {"esvm", "l2", "random", "trak"} <= set(rankings["method"])
    assert rankings.groupby("method")["target_id"].nunique().min() == CLASSES * VAL_PER_CLASS
    trak = rankings[rankings["method"] == "trak"]
    assert trak.groupby("target_id").size().max() == 12  # top_k over all training files (native TRAK)
    blocks = read_dataset(exp / "scores" / "trak").to_pandas()
    assert len(blocks) == CLASSES * VAL_PER_CLASS
    assert all(len(row) == counts["train"] and np.isfinite(row).all() for row in blocks["scores"])
    assert manifest["trak"]["checkpoints"] == 1 and manifest["trak"]["n_train"] == counts["train"]
    # trained and featurized on two Ray workers, 40 files per item
    pool = manifest["trak"]["pool"]
    assert pool["train_items"] == 1 and pool["featurize_items"] == -(-counts["train"] // 40)
    assert all("@" in worker for worker in pool["workers"])  # host:pid@node: Ray actors
    # support: ResNet-18 retrained from the files, one search per searched target x method
    searches = pd.read_parquet(exp / "support.parquet")
    assert set(searches["method"]) == {"esvm", "trak"} and set(searches["mode"]) == {"removal"}
    assert len(searches) == 2 and (searches["trainings"] >= 1).all()
    assert len(pd.read_parquet(exp / "support_targets.parquet")) == CLASSES * VAL_PER_CLASS  # every target screened
    assert len(read_dataset(exp / "trainings")) >= 1 + len(searches)  # each search trained at least once
    report = (exp / "report.md").read_text()
    assert "esvm" in report and "trak" in report
    assert json.dumps(manifest)  # a readable manifest
    assert not any(p.name.endswith(".tmp") for p in exp.rglob("*")), "a half-written file was left behind"
