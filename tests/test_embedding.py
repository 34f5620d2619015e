"""Sharded embedding extraction: real local Ray, real Fashion-MNIST, real Parquet.

Small subsets (40 train / 20 test images) and a ResNet-18 with the ordinary stem
(cheap on 28 px images) keep the file within a few minutes on 2 busy cores.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from attribution import embedding as emb  # noqa: E402
from attribution.backbones import BackboneSpec, save_backbone_checkpoint  # noqa: E402
from attribution.data import DatasetSpec, DatasetNotFoundError  # noqa: E402
from attribution.experiment import Experiment  # noqa: E402
from cluster.embedding import embed_on_ray  # noqa: E402

TRAIN = DatasetSpec("fashion-mnist", "train", n_per_class=4, seed=0)
TEST = DatasetSpec("fashion-mnist", "test", n_per_class=2, seed=0)
BACKBONE = BackboneSpec("resnet18", small_stem=False, in_channels=1)
SHARD = 8  # 40 train images -> 5 shards, 20 test images -> 3 shards
RUN = dict(seed=0, batch_size=8, shard_size=SHARD, progress=False)


@pytest.fixture(scope="module", autouse=True)
def fashion_mnist():
    try:
        TRAIN.load()
    except DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST not installed: {error}")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process extraction: what every Ray run must reproduce."""
    folder = tmp_path_factory.mktemp("reference") / "embeddings"
    summary = emb.embed_datasets(folder, [TRAIN, TEST], BACKBONE, seed=0, batch_size=8, shard_size=SHARD)
    assert summary["train"] == {"rows": 40, "shards": 5, "computed": 5, "complete": True}
    return {split: emb.load_embeddings(folder, split) for split in ("train", "test")}


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_ray_matches_single_process_and_every_id_once(ray_local, reference, tmp_path):
    folder = tmp_path / "embeddings"
    result = embed_on_ray(folder, [TRAIN, TEST], BACKBONE, actors=2, **RUN)
    assert result["splits"]["train"]["complete"] and result["splits"]["test"]["complete"]
    assert result["dim"] == 512 and result["actors"] == 2
    for split, spec in (("train", TRAIN), ("test", TEST)):
        table = emb.load_embeddings(tmp_path, split)  # the experiment dir works as well as the folder
        expected = spec.load()
        # every id of the split exactly once, sorted, with its label
        np.testing.assert_array_equal(table.ids, np.sort(expected.ids))
        assert len(np.unique(table.ids)) == len(expected)
        np.testing.assert_array_equal(table.labels, expected.labels[np.argsort(expected.ids)])
        assert table.features.dtype == np.float32 and table.features.shape == (len(expected), 512)
        # random init: actors seeded the same way build the same network as this process
        np.testing.assert_allclose(table.features, reference[split].features, rtol=1e-4, atol=1e-5)
        assert np.abs(table.features).max() > 0
    files = sorted(p.name for p in folder.glob("*.parquet"))
    assert files == [f"test-{i:05d}.parquet" for i in range(3)] + [f"train-{i:05d}.parquet" for i in range(5)]
    schema = pq.read_schema(folder / "train-00000.parquet")
    assert schema.names == ["id", "split", "label", "embedding"]
    assert schema.field("id").type == pa.int64() and schema.field("label").type == pa.int64()
    assert schema.field("embedding").type == pa.list_(pa.field("item", pa.float32()), 512)
    assert set(pq.read_table(folder / "test-00002.parquet").column("split").to_pylist()) == {"test"}
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["dim"] == 512 and manifest["checkpoint_sha256"] is None and manifest["seed"] == 0
    assert manifest["splits"]["train"]["rows"] == 40 and len(manifest["splits"]["train"]["shards"]) == 5


def test_resume_recomputes_only_missing_shards(ray_local, reference, tmp_path):
    folder = tmp_path / "embeddings"
    # a crash after 3 shards: the split stays incomplete and cannot be read
    first = embed_on_ray(folder, [TRAIN], BACKBONE, actors=2, stop_after_shards=3, **RUN)
    assert first["splits"]["train"]["complete"] is False
    with pytest.raises(emb.IncompleteEmbeddingError, match="rerun"):
        emb.load_embeddings(folder, "train")
    # one more finished shard lost (a deleted file), and a half-written temp file left behind
    (folder / "train-00000.parquet").unlink(missing_ok=True)
    (folder / ".train-00004.parquet.99999.tmp").write_bytes(b"PAR1 half a file")
    before = _mtimes(folder)
    assert 1 <= len(before) <= 4
    # the rerun uses the multi-node mode (actors return tables, the driver writes)
    second = embed_on_ray(folder, [TRAIN], BACKBONE, actors=2, write_in_actors=False, **RUN)
    assert second["splits"]["train"]["complete"]
    assert second["splits"]["train"]["computed"] == 5 - len(before)  # only the missing shards
    after = _mtimes(folder)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished files untouched
    assert not list(folder.glob(".*.tmp"))  # leftovers of killed writers are cleaned up
    table = emb.load_embeddings(folder, "train")
    np.testing.assert_array_equal(table.ids, reference["train"].ids)
    np.testing.assert_allclose(table.features, reference["train"].features, rtol=1e-4, atol=1e-5)
    # a third run has nothing to do
    third = embed_on_ray(folder, [TRAIN], BACKBONE, actors=2, **RUN)
    assert third["splits"]["train"]["computed"] == 0 and _mtimes(folder) == after


def test_temp_and_truncated_files(reference, tmp_path):
    folder = tmp_path / "embeddings"
    emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=0, batch_size=8, shard_size=SHARD)
    # the reader ignores temp files and unlisted files
    (folder / ".train-00001.parquet.4242.tmp").write_bytes(b"garbage")
    (folder / "train-99999.parquet").write_bytes(b"not listed in the manifest")
    table = emb.load_embeddings(folder, "train")
    np.testing.assert_allclose(table.features, reference["train"].features, rtol=1e-4, atol=1e-5)
    # a shard file truncated outside the atomic writer is not "done": it is recomputed
    data = (folder / "train-00002.parquet").read_bytes()
    (folder / "train-00002.parquet").write_bytes(data[: len(data) // 2])
    summary = emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=0, batch_size=8, shard_size=SHARD)
    assert summary["train"]["computed"] == 1
    assert not (folder / "train-99999.parquet").exists()  # outside the plan: removed
    np.testing.assert_allclose(emb.load_embeddings(folder, "train").features, reference["train"].features,
                               rtol=1e-4, atol=1e-5)


def test_mismatched_settings_are_refused_and_nothing_written(reference, tmp_path):
    folder = tmp_path / "embeddings"
    emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=0, batch_size=8, shard_size=SHARD)
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    # a backbone with another dim (ResNet-50: 2048)
    wider = BackboneSpec("resnet50", small_stem=False, in_channels=1)
    with pytest.raises(emb.EmbeddingManifestMismatch) as error:
        emb.embed_datasets(folder, [TRAIN], wider, seed=0, batch_size=8, shard_size=SHARD)
    message = str(error.value)
    assert "dim: existing 512 vs requested 2048" in message and "backbone.name" in message
    assert "--overwrite" in message and "new experiment directory" in message
    # another dataset selection for the same split
    with pytest.raises(emb.EmbeddingManifestMismatch, match="data.n_per_class"):
        emb.embed_datasets(folder, [DatasetSpec("fashion-mnist", "train", n_per_class=3)], BACKBONE,
                           seed=0, batch_size=8, shard_size=SHARD)
    # another random init
    with pytest.raises(emb.EmbeddingManifestMismatch, match="seed: existing 0 vs requested 1"):
        emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=1, batch_size=8, shard_size=SHARD)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot
    # --overwrite replaces the embedding; a new shard_size re-plans the split
    summary = emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=1, batch_size=8, shard_size=16, overwrite=True)
    assert summary["train"] == {"rows": 40, "shards": 3, "computed": 3, "complete": True}
    other_seed = emb.load_embeddings(folder, "train")
    assert not np.allclose(other_seed.features, reference["train"].features)  # the seed decides the weights


def test_empty_and_bad_inputs(tmp_path):
    with pytest.raises(emb.EmbeddingError, match="no images"):
        emb.plan_shards(0, 10, "train")
    with pytest.raises(ValueError, match="shard_size"):
        emb.plan_shards(10, 0, "train")
    empty = TRAIN.load().subset([])
    manifest = emb.open_manifest(tmp_path / "e", emb.new_manifest(BACKBONE, None, 512, "float32", 0))
    with pytest.raises(emb.EmbeddingError, match="no images"):
        emb.plan_split(tmp_path / "e", manifest, TRAIN, empty, 8)
    with pytest.raises(emb.IncompleteEmbeddingError, match="attribution embed"):
        emb.load_embeddings(tmp_path / "nothing", "train")
    with pytest.raises(emb.IncompleteEmbeddingError, match="not embedded"):
        emb.load_embeddings(tmp_path / "e", "test")


def test_float16_storage(reference, tmp_path):
    folder = tmp_path / "embeddings"
    emb.embed_datasets(folder, [TEST], BACKBONE, seed=0, batch_size=8, shard_size=SHARD, dtype="float16")
    schema = pq.read_schema(folder / "test-00000.parquet")
    assert schema.field("embedding").type.value_type == pa.float16()
    table = emb.load_embeddings(folder, "test")
    assert table.features.dtype == np.float32
    np.testing.assert_allclose(table.features, reference["test"].features, rtol=2e-3, atol=2e-3)


def test_cli_stage_with_checkpoint(ray_local, tmp_path, capsys):
    """`attribution embed` end to end: the stage reads the preset, records the manifest,
    and a changed checkpoint file is refused."""
    from cluster.cli import main

    exp = Experiment(tmp_path / "exp").create()
    small = ["--set", "data.train_per_class=2", "--set", "data.test_per_class=1", "--set", "embed.shard_size=8",
             "--set", "embed.batch_size=10", "--set", "embed.actors=2", "--no-progress"]
    # quickstart wants the pretrained checkpoint, which this experiment does not have
    assert main(["embed", "--exp", str(exp.root)] + small) == 2
    assert not exp.embeddings.exists()
    torch.manual_seed(3)
    from attribution.backbones import load_backbone

    path = save_backbone_checkpoint(load_backbone(BACKBONE), exp.checkpoints / "moco.pt")
    assert main(["embed", "--exp", str(exp.root)] + small) == 0
    record = exp.manifest()["embed"]
    assert record["rows"] == {"train": 20, "test": 10} and record["dim"] == 512
    assert record["checkpoint_sha256"] == emb.read_manifest(exp)["checkpoint_sha256"] is not None
    train = emb.load_embeddings(exp, "train")
    # the checkpoint's weights were used: the same network in this process gives the same features
    model = load_backbone(BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(path)}))
    data = DatasetSpec("fashion-mnist", "train", n_per_class=2).load()
    np.testing.assert_allclose(train.features, emb.extract(model, data, np.arange(len(data)), 10),
                               rtol=1e-4, atol=1e-5)
    # another checkpoint at the same path: refused with the fix named, nothing rewritten
    before = _mtimes(exp.embeddings)
    torch.manual_seed(4)
    save_backbone_checkpoint(load_backbone(BACKBONE), path)
    assert main(["embed", "--exp", str(exp.root)] + small) == 2
    message = capsys.readouterr().err
    assert "checkpoint_sha256" in message and "--overwrite" in message
    assert _mtimes(exp.embeddings) == before

def test_actor_gets_checkpoint_through_object_store(tmp_path, monkeypatch):
    """Multi-node mode: a node without the driver's file rebuilds it from the shipped
    bytes; a different file is refused by its hash."""
    from attribution.backbones import load_backbone
    from attribution.experiment import file_sha256
    from cluster.embedding import Embedder

    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    path = save_backbone_checkpoint(load_backbone(BACKBONE), tmp_path / "moco.pt")
    sha, data = file_sha256(path), path.read_bytes()
    elsewhere = BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(tmp_path / "absent" / "moco.pt")})
    embedder = Embedder(elsewhere, 0, str(tmp_path / "out"), batch_size=8, checkpoint_sha256=sha, threads=0,
                        checkpoint_bytes=data)
    table = embedder(TEST, emb.Shard("test", 0, 0, 4), write=False)
    assert table.num_rows == 4 and not (tmp_path / "out").exists()
    expected = emb.extract(load_backbone(BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(path)})),
                           TEST.load(), np.arange(4), 8)
    np.testing.assert_allclose(emb._embedding_matrix(table.column("embedding"), 512), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(emb.EmbeddingError, match="same file at the same path"):
        Embedder(BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(path)}), 0, str(tmp_path),
                 checkpoint_sha256="0" * 64, threads=0)


def test_actor_options_follow_cluster_resources():
    from cluster.embedding import actor_options

    assert actor_options({"CPU": 2.0}, None) == (2, {"num_cpus": 1})
    assert actor_options({"CPU": 8.0}, None, threads=2) == (4, {"num_cpus": 2})
    assert actor_options({"CPU": 8.0, "GPU": 2.0}, None) == (2, {"num_gpus": 1, "num_cpus": 1})
    assert actor_options({"CPU": 8.0, "GPU": 2.0}, 1) == (1, {"num_gpus": 1, "num_cpus": 1})
