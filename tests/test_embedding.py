"""Sharded embedding extraction: the embed stage on a real local Ray and in process, real
Fashion-MNIST, real Parquet.

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
from attribution.artifacts import SettingsChanged, file_sha256  # noqa: E402
from attribution.backbones import BackboneSpec, CheckpointError, load_backbone, save_backbone_checkpoint  # noqa: E402
from attribution.data import DatasetNotFoundError, DatasetSpec  # noqa: E402
from attribution.experiment import Experiment  # noqa: E402
from attribution.settings import SettingsError  # noqa: E402
from attribution.stages import StageInputMissing, parse_settings, stage_class  # noqa: E402
from attribution.stages.embed import EmbedStage  # noqa: E402
from attribution.workqueue import InProcessRuntime, WorkFailed  # noqa: E402
from conftest import require_real_data  # noqa: E402
from faults import FaultyRuntime, SimulatedCrash  # noqa: E402

TRAIN = DatasetSpec("fashion-mnist", "train", n_per_class=4, seed=0)
TEST = DatasetSpec("fashion-mnist", "test", n_per_class=2, seed=0)
BACKBONE = BackboneSpec("resnet18", small_stem=False, in_channels=1)
SHARD = 8  # 40 train images -> 5 shards, 20 test images -> 3 shards
RUN = dict(seed=0, batch_size=8, shard_size=SHARD)


def preset(**embed):
    """The stage's preset: the subsets above, a random-init ResNet-18 (ordinary stem)."""
    section = {"backbone": "resnet18", "checkpoint": "", "small_stem": False, "in_channels": 1,
               "batch_size": 8, "shard_size": SHARD, "actors": 2, "dtype": "float32"}
    section.update(embed)
    return {"name": "tiny", "seed": 0,
            "data": {"dataset": "fashion-mnist", "root": "", "train_per_class": 4, "test_per_class": 2},
            "embed": section}


def embed_stage(exp, runtime, overwrite=False, **embed):
    return EmbedStage(exp, parse_settings(preset(**embed)), runtime, progress=False, overwrite=overwrite)


@pytest.fixture(scope="module", autouse=True)
def fashion_mnist():
    require_real_data(TRAIN.load, "Fashion-MNIST")  # skips locally, fails with CI set


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process extraction: what every Ray run must reproduce."""
    folder = tmp_path_factory.mktemp("reference") / "embeddings"
    summary = emb.embed_datasets(folder, [TRAIN, TEST], BACKBONE, **RUN)
    assert summary["splits"]["train"] == {"rows": 40, "shards": 5, "computed": 5, "complete": True}
    assert summary["actors"] == 1 and summary["requeued"] == 0
    return {split: emb.load_embeddings(folder, split) for split in ("train", "test")}


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_stage_is_registered_with_its_flags():
    assert stage_class("embed") is EmbedStage
    assert EmbedStage.writes == ("embeddings",) and EmbedStage.reads == ()
    assert [(f.name, f.option) for f in EmbedStage.flags] == [("--overwrite", "overwrite")]
    with pytest.raises(SettingsError, match=r"embed.dtype must be one of \['float32', 'float16'\], got 'float64'"):
        parse_settings(preset(dtype="float64"))
    with pytest.raises(SettingsError, match="embed.shard_size must be >= 1, got 0"):
        parse_settings(preset(shard_size=0))
    with pytest.raises(SettingsError, match="embed.actors must be an integer >= 0, got 'two'"):
        parse_settings(preset(actors="two"))
    with pytest.raises(SettingsError, match=r"unknown \[embed\] setting\(s\) \['shards'\]"):
        parse_settings(preset(shards=3))


def test_ray_matches_single_process_and_every_id_once(ray_runtime, reference, tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    summary = embed_stage(exp, ray_runtime)()
    assert summary["rows"] == 60 and summary["dim"] == 512 and summary["computed_shards"] == 8
    record = exp.manifest()["embed"]
    assert record["actors"] == 2 and record["rows"] == {"train": 40, "test": 20}
    assert record["computed_shards"] == {"train": 5, "test": 3} and record["requeued_shards"] == 0
    assert sum(record["shards_per_worker"].values()) == 8
    assert record["settings"]["shard_size"] == SHARD and record["checkpoint_sha256"] is None
    for split, spec in (("train", TRAIN), ("test", TEST)):
        table = emb.load_embeddings(exp.root, split)  # the experiment dir works as well as the folder
        expected = spec.load()
        # every id of the split exactly once, sorted, with its label
        np.testing.assert_array_equal(table.ids, np.sort(expected.ids))
        assert len(np.unique(table.ids)) == len(expected)
        np.testing.assert_array_equal(table.labels, expected.labels[np.argsort(expected.ids)])
        assert table.features.dtype == np.float32 and table.features.shape == (len(expected), 512)
        # random init: workers seeded the same way build the same network as this process
        np.testing.assert_allclose(table.features, reference[split].features, rtol=1e-4, atol=1e-5)
        assert np.abs(table.features).max() > 0
    folder = exp.path("embeddings")
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


def test_crash_then_resume_recomputes_only_missing_shards(ray_runtime, reference, tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    folder = exp.path("embeddings")
    # the driver dies after 3 shards: the splits stay incomplete and cannot be read
    with pytest.raises(SimulatedCrash):
        embed_stage(exp, FaultyRuntime(ray_runtime, crash_after=3))()
    written = sorted(_mtimes(folder))
    assert len(written) == 3  # the driver wrote each shard as it arrived, nothing after the crash
    assert "embed" not in exp.manifest()
    with pytest.raises(emb.IncompleteEmbeddingError, match="rerun"):
        emb.load_embeddings(folder, "train")
    # one more finished shard lost (a deleted file), and a half-written temp file left behind
    (folder / written[0]).unlink()
    (folder / ".train-00004.parquet.99999.tmp").write_bytes(b"PAR1 half a file")
    before = _mtimes(folder)
    # the rerun, in process this time: the same shards, whichever runtime computes them
    summary = embed_stage(exp, InProcessRuntime())()
    assert summary["computed_shards"] == 8 - len(before) == 6  # only the missing shards
    after = _mtimes(folder)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished files untouched
    assert not list(folder.glob(".*.tmp"))  # leftovers of killed writers are cleaned up
    for split in ("train", "test"):
        table = emb.load_embeddings(folder, split)
        np.testing.assert_array_equal(table.ids, reference[split].ids)
        np.testing.assert_allclose(table.features, reference[split].features, rtol=1e-4, atol=1e-5)
    # a third run has nothing to do, and needs no runtime for it
    summary = embed_stage(exp, None)()
    assert summary["computed_shards"] == 0 and _mtimes(folder) == after


def test_failing_shard_is_retried_then_reported(reference, tmp_path):
    """Through the queue's retries (tests/faults.py seam): one failure per shard is
    absorbed; a shard failing on every attempt names itself."""
    exp = Experiment(tmp_path / "exp").create()
    runtime = FaultyRuntime(InProcessRuntime(), fail_first=["train-00001.parquet"], key=emb.shard_key)
    embed_stage(exp, runtime)()
    record = exp.manifest()["embed"]
    assert record["retried_shards"] == 1 and record["computed_shards"] == {"train": 5, "test": 3}
    np.testing.assert_allclose(emb.load_embeddings(exp, "train").features, reference["train"].features,
                               rtol=1e-4, atol=1e-5)

    class Broken(emb.Embedder):
        def __call__(self, item):
            raise RuntimeError("disk on fire")

    folder = tmp_path / "broken"
    plan = emb.plan_embedding(folder, [TEST], BACKBONE, **RUN)
    with pytest.raises(WorkFailed, match="(?s)test-00000.parquet failed 3 times.*disk on fire"):
        emb.run_embedding(plan, BrokenRuntime(Broken), progress=False)
    with pytest.raises(emb.IncompleteEmbeddingError):
        emb.load_embeddings(folder, "test")


class BrokenRuntime(InProcessRuntime):
    """An in-process runtime whose workers are ``worker_cls`` instead of the one asked for."""

    def __init__(self, worker_cls):
        super().__init__()
        self.worker_cls = worker_cls

    def queue(self, request, worker, *args, **kwargs):
        return super().queue(request, self.worker_cls, *args, **kwargs)


def test_temp_and_truncated_files(reference, tmp_path):
    folder = tmp_path / "embeddings"
    emb.embed_datasets(folder, [TRAIN], BACKBONE, **RUN)
    # the reader ignores temp files and unlisted files
    (folder / ".train-00001.parquet.4242.tmp").write_bytes(b"garbage")
    (folder / "train-99999.parquet").write_bytes(b"not listed in the manifest")
    table = emb.load_embeddings(folder, "train")
    np.testing.assert_allclose(table.features, reference["train"].features, rtol=1e-4, atol=1e-5)
    # a shard file truncated outside the atomic writer is not "done": it is recomputed
    data = (folder / "train-00002.parquet").read_bytes()
    (folder / "train-00002.parquet").write_bytes(data[: len(data) // 2])
    summary = emb.embed_datasets(folder, [TRAIN], BACKBONE, **RUN)
    assert summary["splits"]["train"]["computed"] == 1
    assert not (folder / "train-99999.parquet").exists()  # outside the plan: removed
    assert not (folder / ".train-00001.parquet.4242.tmp").exists()
    np.testing.assert_allclose(emb.load_embeddings(folder, "train").features, reference["train"].features,
                               rtol=1e-4, atol=1e-5)


def test_mismatched_settings_are_refused_and_nothing_written(reference, tmp_path):
    folder = tmp_path / "embeddings"
    emb.embed_datasets(folder, [TRAIN], BACKBONE, **RUN)
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    # a backbone with another dim (ResNet-50: 2048), in the one "key: old -> new" format
    wider = BackboneSpec("resnet50", small_stem=False, in_channels=1)
    with pytest.raises(emb.EmbeddingManifestMismatch) as error:
        emb.embed_datasets(folder, [TRAIN], wider, **RUN)
    assert isinstance(error.value, SettingsChanged) and isinstance(error.value, emb.EmbeddingError)
    message = str(error.value)
    assert "dim: 512 -> 2048" in message and "backbone.name: 'resnet18' -> 'resnet50'" in message
    assert "--overwrite" in message and "new experiment directory" in message
    # another dataset selection for the same split
    with pytest.raises(emb.EmbeddingManifestMismatch, match="data.n_per_class: 4 -> 3"):
        emb.embed_datasets(folder, [DatasetSpec("fashion-mnist", "train", n_per_class=3)], BACKBONE, **RUN)
    # another random init
    with pytest.raises(emb.EmbeddingManifestMismatch, match="seed: 0 -> 1"):
        emb.embed_datasets(folder, [TRAIN], BACKBONE, **{**RUN, "seed": 1})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot
    # --overwrite replaces the embedding; a new shard_size re-plans the split
    summary = emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=1, batch_size=8, shard_size=16, overwrite=True)
    assert summary["splits"]["train"] == {"rows": 40, "shards": 3, "computed": 3, "complete": True}
    other_seed = emb.load_embeddings(folder, "train")
    assert not np.allclose(other_seed.features, reference["train"].features)  # the seed decides the weights
    # without --overwrite, another shard_size alone recomputes (the old files no longer line up)
    summary = emb.embed_datasets(folder, [TRAIN], BACKBONE, seed=1, batch_size=8, shard_size=SHARD)
    assert summary["splits"]["train"]["computed"] == 5
    assert sorted(p.name for p in folder.glob("*.parquet")) == [f"train-{i:05d}.parquet" for i in range(5)]
    np.testing.assert_allclose(emb.load_embeddings(folder, "train").features, other_seed.features,
                               rtol=1e-4, atol=1e-5)


def test_overwrite_checks_the_inputs_before_deleting(reference, tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    embed_stage(exp, InProcessRuntime())()
    folder = exp.path("embeddings")
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    # a bad data root: refused before anything is deleted
    settings = preset()
    settings["data"].update(dataset="cifar10", root=str(tmp_path / "no-such-dataset"))
    with pytest.raises(DatasetNotFoundError):
        EmbedStage(exp, parse_settings(settings), InProcessRuntime(), progress=False, overwrite=True)()
    # an unreadable checkpoint: refused before anything is deleted
    bad = save_backbone_checkpoint(load_backbone(BACKBONE), tmp_path / "bad.pt")
    bad.write_bytes(bad.read_bytes()[:-1000])  # truncated
    with pytest.raises(CheckpointError, match="bad.pt .* truncated or corrupt"):
        embed_stage(exp, InProcessRuntime(), overwrite=True, checkpoint=str(bad))()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot
    # a good input: overwritten
    summary = embed_stage(exp, InProcessRuntime(), overwrite=True, seed=1)()
    assert summary["computed_shards"] == 8
    assert not np.allclose(emb.load_embeddings(exp, "train").features, reference["train"].features)


def test_empty_and_bad_inputs(tmp_path):
    with pytest.raises(emb.EmbeddingError, match="no images"):
        emb.plan_shards(0, 10, "train")
    with pytest.raises(ValueError, match="shard_size"):
        emb.plan_shards(10, 0, "train")
    empty = TRAIN.load().subset([])
    with pytest.raises(emb.EmbeddingError, match="no images"):
        emb.plan_split(tmp_path / "e", None, TRAIN, empty, 8)
    with pytest.raises(emb.IncompleteEmbeddingError, match="attribution embed"):
        emb.load_embeddings(tmp_path / "nothing", "train")
    emb.embed_datasets(tmp_path / "e", [TEST], BACKBONE, **RUN)
    with pytest.raises(emb.IncompleteEmbeddingError, match="not embedded"):
        emb.load_embeddings(tmp_path / "e", "train")


def test_float16_storage(reference, tmp_path):
    folder = tmp_path / "embeddings"
    emb.embed_datasets(folder, [TEST], BACKBONE, **RUN, dtype="float16")
    schema = pq.read_schema(folder / "test-00000.parquet")
    assert schema.field("embedding").type.value_type == pa.float16()
    table = emb.load_embeddings(folder, "test")
    assert table.features.dtype == np.float32
    np.testing.assert_allclose(table.features, reference["test"].features, rtol=2e-3, atol=2e-3)


def test_stage_with_checkpoint(ray_runtime, tmp_path):
    """The stage end to end with embed.checkpoint = "pretrained": the missing checkpoint is
    named with its producer, its weights are used, and a changed file is refused."""
    exp = Experiment(tmp_path / "exp").create()
    small = dict(checkpoint="pretrained", batch_size=10)

    def stage(**extra):
        settings = preset(**small, **extra)
        settings["data"].update(train_per_class=2, test_per_class=1)
        return EmbedStage(exp, parse_settings(settings), ray_runtime, progress=False)

    # the experiment has no pretrained checkpoint yet
    with pytest.raises(StageInputMissing, match="(?s)checkpoints/moco.pt.*pretrain.*embed.checkpoint"):
        stage()()
    assert not exp.path("embeddings").exists()
    torch.manual_seed(3)
    path = save_backbone_checkpoint(load_backbone(BACKBONE), exp.path("checkpoint"))
    with pytest.raises(SettingsError, match="embed.backbone = 'resnet50' but .* holds a resnet18"):
        stage(backbone="resnet50")()
    stage()()
    record = exp.manifest()["embed"]
    assert record["rows"] == {"train": 20, "test": 10} and record["dim"] == 512
    assert record["checkpoint_sha256"] == emb.read_manifest(exp)["checkpoint_sha256"] == file_sha256(path)
    train = emb.load_embeddings(exp, "train")
    # the checkpoint's weights were used: the same network in this process gives the same features
    model = load_backbone(BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(path)}))
    data = DatasetSpec("fashion-mnist", "train", n_per_class=2).load()
    np.testing.assert_allclose(train.features, emb.extract(model, data, np.arange(len(data)), 10),
                               rtol=1e-4, atol=1e-5)
    # another checkpoint at the same path: refused with the fix named, nothing rewritten
    before = _mtimes(exp.path("embeddings"))
    torch.manual_seed(4)
    save_backbone_checkpoint(load_backbone(BACKBONE), path)
    with pytest.raises(emb.EmbeddingManifestMismatch) as error:
        stage()()
    assert "checkpoint_sha256" in str(error.value) and "--overwrite" in str(error.value)
    assert _mtimes(exp.path("embeddings")) == before


def test_narrow_random_init_backbone(tmp_path):
    """embed.width / stem_stride build the random-init ablation's network with the preset's
    narrow architecture (in process); an efficientnet_lite0 keeps its own architecture."""
    exp = Experiment(tmp_path / "exp").create()
    stage = embed_stage(exp, InProcessRuntime(), small_stem=True, width=16, stem_stride=2)
    train = TRAIN.load()
    spec = stage.backbone_spec(train)
    assert (spec.width, spec.stem_stride, spec.small_stem, spec.dim) == (16, 2, True, 128)
    stage()
    record = exp.manifest()["embed"]
    assert record["dim"] == 128 and record["backbone"]["width"] == 16
    torch.manual_seed(0)  # embed.seed = the preset's seed
    expected = emb.extract(load_backbone(spec), train, np.arange(len(train)), 8)
    np.testing.assert_allclose(emb.load_embeddings(exp, "train").features, expected, rtol=1e-4, atol=1e-5)
    lite = embed_stage(exp, InProcessRuntime(), backbone="efficientnet_lite0", small_stem=False, in_channels=3,
                       width=16).backbone_spec(train)
    assert (lite.name, lite.width, lite.stem_stride) == ("efficientnet_lite0", 64, 1)
    with pytest.raises(SettingsError, match="embed.stem_stride is the small stem's stride"):
        parse_settings(preset(stem_stride=2))  # the test preset sets small_stem = false


def test_worker_gets_checkpoint_bytes(tmp_path, monkeypatch):
    """A node without the driver's file rebuilds it from the shipped bytes (a
    content-addressed copy in the cache); without bytes, a different file is refused."""
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    path = save_backbone_checkpoint(load_backbone(BACKBONE), tmp_path / "moco.pt")
    sha, data = file_sha256(path), path.read_bytes()
    elsewhere = BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(tmp_path / "absent" / "moco.pt")})
    embedder = emb.Embedder(elsewhere, 0, batch_size=8, checkpoint_sha256=sha, checkpoint_bytes=data)
    copy = tmp_path / "cache" / "checkpoints" / f"{sha}.pt"
    assert copy.read_bytes() == data and not list(copy.parent.glob(".*"))
    table = embedder((TEST, emb.Shard("test", 0, 0, 4)))
    assert table.num_rows == 4 and table.schema == emb.embedding_schema(512)
    expected = emb.extract(load_backbone(BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(path)})),
                           TEST.load(), np.arange(4), 8)
    np.testing.assert_allclose(emb.embedding_matrix(table.column("embedding"), 512), expected, rtol=1e-4, atol=1e-5)
    # the driver's path holds the same file: used as is, no copy needed
    at_path = BackboneSpec.from_dict({**BACKBONE.to_dict(), "checkpoint": str(path)})
    assert emb.worker_checkpoint(at_path, sha, data) == at_path
    with pytest.raises(emb.EmbeddingError, match="same file at the same path"):
        emb.Embedder(at_path, 0, checkpoint_sha256="0" * 64)
    with pytest.raises(emb.EmbeddingError, match="do not have sha256"):
        emb.Embedder(elsewhere, 0, checkpoint_sha256="0" * 64, checkpoint_bytes=data)


def test_embed_pool_shape_follows_cluster_resources():
    """The embed pool is sized by cluster.resources.pool_shape (no sizing in the stage)."""
    from attribution.workqueue import PoolRequest
    from cluster.resources import pool_shape

    assert pool_shape(PoolRequest("embed"), {"CPU": 2.0}) == (2, {"num_cpus": 1})
    assert pool_shape(PoolRequest("embed", threads=2), {"CPU": 8.0}) == (4, {"num_cpus": 2})
    assert pool_shape(PoolRequest("embed"), {"CPU": 8.0, "GPU": 2.0}) == (2, {"num_gpus": 1, "num_cpus": 1})
    assert pool_shape(PoolRequest("embed", actors=1), {"CPU": 8.0, "GPU": 2.0}) == (1, {"num_gpus": 1, "num_cpus": 1})
    assert pool_shape(PoolRequest("embed", actors=4, max_items=3), {"CPU": 8.0}) == (3, {"num_cpus": 1})
