"""The stages on a real multi-node Ray cluster: spread over nodes, node loss, killed driver.

``ray.cluster_utils.Cluster`` starts a real head (GCS, raylet, 0 CPUs: it only hosts the
driver, as on a real cluster) and two worker raylets with one CPU each, all on this
machine; removing a worker node kills its raylet and every process on it, the same
failure as a lost machine (detected by the GCS health check, set to ~3 s here).
Real data throughout: 400 + 100 Fashion-MNIST images, a random-init ResNet-18 (small
stem), real FAISS / ESVM rankings, MLP retrainings of 2 epochs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")
from ray.cluster_utils import Cluster  # noqa: E402

from attribution import embedding as emb  # noqa: E402
from attribution.backbones import BackboneSpec  # noqa: E402
from attribution.data import DatasetSpec  # noqa: E402
from attribution.artifacts import read_dataset  # noqa: E402
from attribution.experiment import Experiment  # noqa: E402
from attribution.stages import parse_settings, stage_class  # noqa: E402
from attribution.workqueue import node_of  # noqa: E402
from cluster.runtime import RayRuntime  # noqa: E402
from conftest import require_real_data  # noqa: E402

pytestmark = pytest.mark.timeout(240)  # each test ends by itself well before this

TRAIN_PER_CLASS = 40
TRAIN = DatasetSpec("fashion-mnist", "train", n_per_class=TRAIN_PER_CLASS, seed=0)
TEST = DatasetSpec("fashion-mnist", "test", n_per_class=10, seed=0)
BACKBONE = BackboneSpec("resnet18", small_stem=True, in_channels=1)  # ~7 ms per image on one thread
EMBED = dict(seed=0, batch_size=10, shard_size=10, progress=False)  # 40 + 10 shards
NODE = dict(num_cpus=1, object_store_memory=80 * 2**20)
KEY = ["target_id", "method", "mode", "k", "seed"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def fashion_mnist():
    require_real_data(TRAIN.load, "Fashion-MNIST")  # skips locally, fails with CI set


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + 2 worker nodes (1 CPU each); always torn down, even on failure."""
    if ray.is_initialized():
        ray.shutdown()
    head = dict(num_cpus=0, object_store_memory=80 * 2**20, include_dashboard=False,
                _system_config={"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                                "health_check_failure_threshold": 3})
    # Cluster() writes its address to /tmp/ray/ray_current_cluster, where any ray.init()
    # without an address on this machine (other test runs) would find and join it: put
    # back what was there. This test connects by explicit address.
    address_file = Path(ray._common.utils.get_ray_address_file(None))
    previous = address_file.read_text() if address_file.exists() else None

    def restore_address_file():
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)

    # OMP_NUM_THREADS=1: the raylets pass the test process's environment to their workers
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        cluster = Cluster(initialize_head=True, head_node_args=head)
        restore_address_file()
        try:
            for _ in range(2):
                cluster.add_node(**NODE)
            ray.init(address=cluster.address, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            restore_address_file()


def worker_nodes(cluster) -> set[str]:
    """Ids (first 12 hex digits, as in worker names) of the live worker nodes."""
    return {node.node_id[:12] for node in cluster.worker_nodes}


def restore_two_workers(cluster) -> None:
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()


def remove_worker_node_when(cluster, ready, thread, poll=0.02, timeout=120.0):
    """Kill a worker node (raylet and its workers, no graceful shutdown) as soon as
    ``ready()`` holds while ``thread`` (the stage) still runs. Returns the node id."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert thread.is_alive(), "the stage ended before the node could be removed"
        assert time.monotonic() < deadline, "the stage made no progress"
        time.sleep(poll)
    assert thread.is_alive(), "the stage ended before the node could be removed"
    victim = sorted(cluster.worker_nodes, key=lambda node: node.node_id)[0]
    cluster.remove_node(victim, allow_graceful=False)
    return victim.node_id[:12]


def in_thread(function, *args, **kwargs):
    """Run a stage in a daemon thread (the test thread removes nodes meanwhile)."""
    outcome = {}

    def body():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised by the test
            outcome["error"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread, outcome, timeout=180.0):
    thread.join(timeout)
    assert not thread.is_alive(), f"the stage did not end within {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def shard_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).glob("*.parquet")}


def assert_same_embeddings(folder: Path, clean: Path):
    for split, spec in (("train", TRAIN), ("test", TEST)):
        table, expected = emb.load_embeddings(folder, split), emb.load_embeddings(clean, split)
        ids = spec.load().ids
        np.testing.assert_array_equal(table.ids, np.sort(ids))  # every id once, none missing
        assert len(np.unique(table.ids)) == len(ids)
        np.testing.assert_array_equal(table.ids, expected.ids)
        np.testing.assert_allclose(table.features, expected.features, rtol=1e-5, atol=1e-6)


def support_preset(**support):
    section = {"model": "mlp", "epochs": 2, "seeds": 5, "budget": 3, "top_k": TRAIN_PER_CLASS, "ensemble": 3,
               "flush_every": 4, "flush_seconds": 5.0, "speculate": True, "methods": ["esvm", "l2"]}
    section.update(support)
    return {"name": "multinode", "seed": 0,
            "data": {"dataset": "fashion-mnist", "train_per_class": TRAIN_PER_CLASS, "seed": 0},
            "support": section}


def rank_preset():
    # top_k = the whole class, so removing all of it flips the target (supports are found)
    return {"name": "multinode", "seed": 0,
            "rank": {"methods": ["esvm", "l2"], "solver": "batched", "top_k": TRAIN_PER_CLASS, "targets": 6,
                     "targets_per_task": 1, "seed": 3}}


def run_stage(name, exp, preset, **options):
    """A stage object on the cluster the fixture joined (RayRuntime reuses the connection)."""
    return stage_class(name)(exp, parse_settings(preset), RayRuntime(), progress=False, **options)()


@pytest.fixture(scope="module")
def clean(cluster, tmp_path_factory):
    """embed -> rank -> support on the two worker nodes, no failure: the reference."""
    exp = Experiment(tmp_path_factory.mktemp("clean")).create()
    embedded = embed_on_cluster(exp.embeddings)
    wait_for_free_cpus(2)  # pools are sized to what is free: let the last pool's CPUs come back
    ranked = run_stage("rank", exp, rank_preset())
    wait_for_free_cpus(2)
    supported = run_stage("support", exp, support_preset())
    return exp, embedded, ranked, supported


def embed_on_cluster(folder, **kwargs):
    return emb.embed_datasets(folder, [TRAIN, TEST], BACKBONE, runtime=RayRuntime(), **EMBED, **kwargs)


def wait_for_free_cpus(n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < n:
        assert time.monotonic() < deadline, f"the cluster's {n} CPUs did not come back: {ray.available_resources()}"
        time.sleep(0.2)


def pool_placed() -> bool:
    """Every worker node's CPU is held by an actor: the stage's pool is up (the head has none)."""
    return ray.available_resources().get("CPU", 0) == 0


def placed_for(seconds: float):
    """A condition: the pool has been placed for ``seconds`` (its actors are up and working)."""
    since = []

    def ready() -> bool:
        if not pool_placed():
            return False
        since.append(since[0] if since else time.monotonic())
        return time.monotonic() - since[0] >= seconds

    return ready


# ----------------------------------------------------------------------------- a. spread


def test_stages_spread_work_over_the_worker_nodes(cluster, clean):
    exp, embedded, ranked, supported = clean
    nodes = worker_nodes(cluster)
    assert len(nodes) == 2
    # embedding: every shard embedded once, by workers on both nodes (the driver wrote the files)
    per_worker = embedded["workers"]
    assert sum(per_worker.values()) == 40 + 10 and embedded["requeued"] == 0
    assert {node_of(w) for w in per_worker} == nodes
    assert all(n >= 5 for n in per_worker.values()), per_worker  # both took a real share
    # the same rows as a single-process extraction (spot check: the 10 smallest ids)
    data = TRAIN.load()
    first = np.argsort(data.ids)[:10]
    expected = emb.extract(emb.build_model(BACKBONE, 0), data, first, 10)
    np.testing.assert_allclose(emb.load_embeddings(exp, "train").features[:10], expected, rtol=1e-4, atol=1e-5)
    # ranking: the manifest records who ranked what; both nodes did
    record = exp.manifest()["rank"]
    assert sum(record["targets_per_worker"].values()) == 6 * 2  # targets x methods
    assert {node_of(w) for w in record["targets_per_worker"]} == nodes
    # support: the trainings log's worker column; both nodes trained, nothing twice
    log = read_dataset(exp.trainings).to_pandas()
    assert not log.duplicated(KEY).any()
    assert len(log) == supported["trainings"] > 50
    counts = log["worker"].map(node_of).value_counts()
    assert set(counts.index) == nodes and counts.min() >= 0.2 * len(log), counts.to_dict()
    assert supported["found"] > 0 and supported["retried"] == 0 and supported["requeued"] == 0


def test_actor_slots_replace_a_lost_actor_once_and_gate_its_replacement(cluster):
    """cluster.workers.ActorSlots on its own: a lost actor is replaced once (late errors
    of the old actor are ignored), the replacement takes work only once it answered, and
    a constructor that raises stops the run with the error."""
    from cluster.workers import ActorSlots, worker_name

    class Echo:  # defined here: Ray ships it by value to the worker nodes
        def __init__(self, fail=False):
            if fail:
                raise ValueError("bad configuration")

        def ready(self):
            return worker_name()

        def pid(self):
            return os.getpid()

    remote = ray.remote(num_cpus=1, max_restarts=0)(Echo)
    slots = ActorSlots(lambda: remote.remote(), 2)
    try:
        slots.wait_ready()
        assert slots.usable() == [0, 1]
        assert {node_of(name) for name in slots.names} == worker_nodes(cluster)  # one per node
        old = slots[0]
        ray.kill(old)
        with pytest.raises(ray.exceptions.RayActorError) as lost:
            deadline = time.monotonic() + 60  # the kill is asynchronous: a call may still be answered
            while time.monotonic() < deadline:
                ray.get(old.pid.remote(), timeout=60)
                time.sleep(0.1)
        assert slots.lost(0, lost.value) is True
        assert slots.lost(0, lost.value) is False  # the same loss reported twice: one replacement
        assert slots.usable() == [1] and 0 in slots.starting  # gated until it answers
        slots.wait_ready()  # the killed actor's CPU is free again, so the replacement starts
        assert slots.usable() == [0, 1] and slots.replaced == 1 and slots[0] is not old
        assert slots.lost(0, lost.value) is False  # a late error of the old actor spares the new one
        assert ray.get(slots[0].pid.remote()) > 0
    finally:
        slots.kill()
    broken = ActorSlots(lambda: remote.remote(True), 1)
    try:
        with pytest.raises(RuntimeError, match="(?s)failed to start.*bad configuration"):
            broken.wait_ready()
    finally:
        broken.kill()


# ----------------------------------------------------------------------------- b. node lost while embedding


def test_node_lost_during_embedding_loses_nothing(cluster, clean, tmp_path):
    exp, embedded, _, _ = clean
    folder = tmp_path / "embeddings"
    try:
        thread, outcome = in_thread(embed_on_cluster, folder)
        # both actors placed (each holds queued shards) and two shards written: the node lost now
        # has work in flight
        lost = remove_worker_node_when(cluster, lambda: pool_placed() and len(shard_files(folder)) >= 2, thread)
        result = finished(thread, outcome)
        assert result["splits"]["train"]["complete"] and result["splits"]["test"]["complete"]
        # the lost node's shard went back to the queue and was embedded by the survivor (or,
        # on a loaded machine, the node was lost between two of its shards)
        assert result["requeued"] >= 1 or result["replaced"] >= 1, result
        assert sum(result["workers"].values()) == 50 and result["splits"]["train"]["computed"] == 40
        survivors = {node_of(w) for w in result["workers"]} - {lost}
        assert survivors and survivors <= worker_nodes(cluster)
        # every id exactly once, embeddings identical to the clean run's
        assert_same_embeddings(folder, exp.embeddings)
        assert not list(folder.glob(".*.tmp"))
    finally:
        restore_two_workers(cluster)


# ----------------------------------------------------------------------------- c. node lost while retraining


def test_node_lost_during_support_keeps_supports_and_log(cluster, clean, tmp_path):
    exp_clean, _, _, supported = clean
    exp = Experiment(tmp_path / "exp").create()
    shutil.copytree(exp_clean.rankings, exp.rankings, dirs_exist_ok=True)

    def logged():
        files = [p for p in exp.trainings.glob("part-*.parquet")] if exp.trainings.exists() else []
        return sum(pq.read_metadata(p).num_rows for p in files)

    try:
        thread, outcome = in_thread(run_stage, "support", exp, support_preset())
        lost = remove_worker_node_when(cluster, lambda: logged() >= 12, thread)
        summary = finished(thread, outcome)
    finally:
        restore_two_workers(cluster)
    # the trainings in flight on the lost node went back to the queue and ran elsewhere
    assert summary["requeued"] >= 1 and summary["replaced"] >= 1
    log = read_dataset(exp.trainings).to_pandas()
    assert lost in set(log["worker"].map(node_of))  # it did work before it was lost
    # no training lost or duplicated: the log holds exactly what the searches counted
    assert not log.duplicated(KEY).any()
    table = pd.read_parquet(exp.support)
    assert len(log) == table["trainings"].sum() == summary["trainings"]
    # the same supports as the clean run (trainings are deterministic per (k, seed))
    key = ["target_id", "method", "mode"]
    got = table.set_index(key)["support"].sort_index()
    expected = pd.read_parquet(exp_clean.support).set_index(key)["support"].sort_index()
    pd.testing.assert_series_equal(got, expected)
    assert summary["searches"] == supported["searches"]


def test_node_lost_during_the_support_ensemble_keeps_its_results(cluster, clean, tmp_path):
    """The full-data ensemble runs on the same queue as the searches: a node lost while it
    trains is survived, and the ensemble's table equals a clean run's."""
    # ~1.5 s per CNN model here: the ensemble lasts ~18 s on two workers, long enough to
    # lose a node in its middle
    preset = support_preset(ensemble=24, model="cnn", epochs=20, methods=["esvm"], modes=["removal"], budget=1,
                            seeds=1)
    exp_clean, _, _, _ = clean
    reference = Experiment(tmp_path / "reference").create()
    exp = Experiment(tmp_path / "exp").create()
    for target in (reference, exp):
        shutil.copytree(exp_clean.rankings, target.rankings, dirs_exist_ok=True)
    run_stage("support", reference, preset)
    try:
        thread, outcome = in_thread(run_stage, "support", exp, preset)
        remove_worker_node_when(cluster, placed_for(8.0), thread)
        assert not (exp.root / "support_targets.parquet").exists(), "the ensemble ended before the node was lost"
        summary = finished(thread, outcome)
    finally:
        restore_two_workers(cluster)
    assert summary["requeued"] >= 1
    columns = ["target_id", "label", "flip_class", "ensemble_correct", "status"]
    pd.testing.assert_frame_equal(pd.read_parquet(exp.root / "support_targets.parquet")[columns],
                                  pd.read_parquet(reference.root / "support_targets.parquet")[columns])
    key = ["target_id", "method", "mode"]
    pd.testing.assert_frame_equal(pd.read_parquet(exp.support).sort_values(key)[key + ["support"]].reset_index(drop=True),
                                  pd.read_parquet(reference.support).sort_values(key)[key + ["support"]].reset_index(drop=True))


# ----------------------------------------------------------------------------- d. node lost while ranking


def test_node_lost_during_ranking_gives_the_clean_rankings(cluster, clean, tmp_path):
    exp_clean = clean[0]
    exp = Experiment(tmp_path / "exp").create()
    shutil.copytree(exp_clean.embeddings, exp.embeddings)
    # every test image a target, one per item: the stage runs long enough to lose a node in it
    preset = rank_preset()
    preset["rank"]["targets"] = "all"
    reference = Experiment(tmp_path / "reference").create()
    shutil.copytree(exp_clean.embeddings, reference.embeddings)
    run_stage("rank", reference, preset)
    try:
        thread, outcome = in_thread(run_stage, "rank", exp, preset)
        lost = remove_worker_node_when(cluster, pool_placed, thread)
        finished(thread, outcome)
    finally:
        restore_two_workers(cluster)
    record = exp.manifest()["rank"]
    # the lost node's items went back to the queue, or it was lost before it took any
    assert record["requeued"] >= 1 or lost not in {node_of(w) for w in record["targets_per_worker"]}, record
    for path in sorted(reference.rankings.glob("*.parquet")):
        got, expected = pq.read_table(exp.rankings / path.name), pq.read_table(path)
        assert got.equals(expected), path.name
    assert len(list(exp.rankings.glob("*.parquet"))) == len(list(reference.rankings.glob("*.parquet"))) == 20


# ----------------------------------------------------------------------------- e. killed driver


DRIVER = textwrap.dedent("""
    import sys
    import ray
    from attribution.backbones import BackboneSpec
    from attribution.data import DatasetSpec
    from attribution.embedding import embed_datasets
    from cluster.runtime import RayRuntime

    ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False, log_to_driver=False)
    embed_datasets(sys.argv[2], [DatasetSpec("fashion-mnist", "train", n_per_class={train}, seed=0),
                                 DatasetSpec("fashion-mnist", "test", n_per_class=10, seed=0)],
                   BackboneSpec("resnet18", small_stem=True, in_channels=1), runtime=RayRuntime(), **{embed})
""").format(train=TRAIN_PER_CLASS, embed=EMBED)


def test_killed_embedding_driver_resumes_on_the_cluster(cluster, clean, tmp_path):
    """A driver process is SIGKILLed mid-run (its actors die with its job); a new driver
    computes only the missing shards and gets the clean run's embeddings."""
    exp, _, _, _ = clean
    folder = tmp_path / "embeddings"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(folder)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(shard_files(folder)) < 3:
            assert driver.poll() is None, f"the driver ended early: {driver.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the driver made no progress"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
    before = shard_files(folder)
    assert 3 <= len(before) < 50, "killed mid-run"
    with pytest.raises(emb.IncompleteEmbeddingError):
        emb.load_embeddings(folder, "train")
    result = embed_on_cluster(folder)
    computed = result["splits"]["train"]["computed"] + result["splits"]["test"]["computed"]
    assert computed == 50 - len(before)  # only the missing shards
    after = shard_files(folder)
    assert all(after[name] == mtime for name, mtime in before.items())  # finished files untouched
    assert {node_of(w) for w in result["workers"]} == worker_nodes(cluster)
    assert_same_embeddings(folder, exp.embeddings)
