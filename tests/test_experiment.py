"""The experiment as one trustworthy place: one writer at a time (EXP/.lock), nothing
finished destroyed by a failed --overwrite / --force, nothing recorded by a run that was
refused, and a URI experiment whose staging folder mirrors the store.

Real Fashion-MNIST, real Parquet, real subprocesses for the second writer; no Ray needed
(the stages run on an in-process runtime, file:// URIs stand in for s3:// / gs://).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from attribution import embedding as emb
from attribution.artifacts import SettingsChanged, aside, aside_path, read_dataset, write_table
from attribution.experiment import Experiment, ExperimentLocked
from attribution.pipeline import Pipeline
from attribution.presets import load_preset
from attribution.ranking import RANKING_SCHEMA
from attribution.stages import StageInputMissing, parse_settings
from attribution.stages.embed import EmbedStage
from attribution.stages.pretrain import PretrainStage
from attribution.stages.rank import RankStage
from attribution.workqueue import InProcessRuntime, WorkFailed
from cluster.cli import main
from cluster.storage import ExperimentStorage
from conftest import require_fashion_mnist, write_rank_rankings
from faults import FaultyRuntime, SimulatedCrash

PROJECT = Path(__file__).resolve().parent.parent

# A tiny preset: 40 train / 20 test Fashion-MNIST images, a random-init ResNet-18 with the
# ordinary stem (cheap on 28 px images), 8-image shards -> 5 + 3 shards.
TINY_TOML = """
name = "tiny"
seed = 0

[data]
dataset = "fashion-mnist"
root = ""
train_per_class = 4
test_per_class = 2

[embed]
backbone = "resnet18"
checkpoint = ""
small_stem = false
in_channels = 1
batch_size = 8
shard_size = 8
actors = 1
dtype = "float32"
"""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, hidden ones included (a leftover .aside- or .lock shows)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith((".aside-", ".discard-", ".lock"))]


def run_cli(args, timeout=300) -> subprocess.CompletedProcess:
    """The attribution command in a fresh process (the user's view: exit code, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT)


@pytest.fixture(scope="module")
def fashion_mnist():
    return require_fashion_mnist("train", n_per_class=4, seed=0)


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="module")
def embedded(fashion_mnist, tiny_toml, tmp_path_factory) -> Path:
    """An experiment made by 'attribution run tiny.toml': the preset recorded, 8 embedding shards."""
    exp = Experiment(tmp_path_factory.mktemp("embedded") / "exp")
    Pipeline(exp, load_preset(tiny_toml), InProcessRuntime(), progress=False).run()
    assert len(list(exp.embeddings.glob("*.parquet"))) == 8
    return exp.root


def copy_of(embedded: Path, tmp_path: Path) -> Experiment:
    shutil.copytree(embedded, tmp_path / "exp")
    return Experiment(tmp_path / "exp")


def embed(exp, runtime=None, overwrite=False, **section):
    """The embed stage with the experiment's recorded preset, ``section`` overriding [embed]."""
    preset = json.loads(json.dumps(exp.manifest()["preset"]["preset"]))  # a copy
    preset["embed"].update(section)
    return EmbedStage(exp, parse_settings(preset), runtime or InProcessRuntime(), progress=False,
                      overwrite=overwrite)()


class BrokenRuntime(InProcessRuntime):
    """An in-process runtime whose embedding workers fail every shard on every attempt."""

    def queue(self, request, worker, *args, **kwargs):
        class Broken(worker):
            def __call__(self, item):
                raise RuntimeError("disk on fire")

        return super().queue(request, Broken, *args, **kwargs)


# ----------------------------------------------------------------------------- aside


def test_aside_restores_on_failure_and_discards_on_success(tmp_path):
    folder, single = tmp_path / "shards", tmp_path / "model.pt"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"old a")
    single.write_bytes(b"old model")
    with pytest.raises(RuntimeError, match="new work failed"):
        with aside([folder, single, tmp_path / "absent"]) as moved:
            assert moved == [folder, single] and not folder.exists()
            assert aside_path(folder).is_dir()  # hidden beside it while the block runs
            folder.mkdir()
            (folder / "half.parquet").write_bytes(b"half of the new work")
            raise RuntimeError("new work failed")
    assert snapshot(tmp_path) == {"shards/a.parquet": b"old a", "model.pt": b"old model"}
    # Ctrl-C counts as a failure too
    with pytest.raises(KeyboardInterrupt):
        with aside([single]):
            single.write_bytes(b"new")
            raise KeyboardInterrupt
    assert single.read_bytes() == b"old model"
    # success: the old version is deleted, or kept under another name
    with aside([folder, single], keep={single: tmp_path / "model-old.pt"}):
        folder.mkdir()
        (folder / "b.parquet").write_bytes(b"new b")
        single.write_bytes(b"new model")
    assert snapshot(tmp_path) == {"shards/b.parquet": b"new b", "model.pt": b"new model",
                                  "model-old.pt": b"old model"}


# ----------------------------------------------------------------------------- finding 2: --overwrite


def test_embed_overwrite_that_fails_leaves_every_shard_byte_identical(embedded, tmp_path, capsys):
    exp = copy_of(embedded, tmp_path)
    before = snapshot(exp.root)
    # the new embedding's driver stops after 2 of 8 shards (as a kill would end it)
    with pytest.raises(SimulatedCrash):
        embed(exp, FaultyRuntime(InProcessRuntime(), crash_after=2), overwrite=True, seed=1)
    assert snapshot(exp.root) == before
    # a shard fails on every attempt
    with pytest.raises(WorkFailed, match="disk on fire"):
        embed(exp, BrokenRuntime(), overwrite=True, seed=1)
    assert snapshot(exp.root) == before
    # the command: another dataset at a root that does not exist, refused before anything moves
    code = main(["embed", "--exp", str(exp.root), "--overwrite", "--set", "data.dataset=cifar10",
                 "--set", f"data.root={tmp_path / 'nonexistent'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "nonexistent" in err and "--set data.root=" in err
    assert snapshot(exp.root) == before
    # an overwrite that succeeds replaces the shards and leaves nothing aside
    old = emb.load_embeddings(exp, "train").features
    summary = embed(exp, overwrite=True, seed=1)
    assert summary["computed_shards"] == 8
    assert not np.allclose(emb.load_embeddings(exp, "train").features, old)
    assert hidden_leftovers(exp.root) == []


def test_pretrain_force_that_fails_keeps_the_checkpoint(fashion_mnist, tmp_path):
    exp = Experiment(tmp_path / "exp")

    def pretrain(force=False, **settings):
        section = {"backbone": "resnet18", "small_stem": False, "images": "subset", "max_steps": 1,
                   "batch_size": 8, "queue_size": 16, "hidden_dim": 32, "proj_dim": 16, "seed": 0, "threads": 1}
        section.update(settings)
        preset = {"name": "tiny", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": 2,
                                                       "test_per_class": 1}, "pretrain": section}
        return PretrainStage(exp, parse_settings(preset), progress=False, force=force)()

    first = pretrain()
    before = snapshot(exp.checkpoints)
    # the new training fails (a batch larger than the 20 images): moco.pt stays where it was
    with pytest.raises(ValueError, match="exceeds the 20 training images"):
        pretrain(force=True, batch_size=32, queue_size=32)
    assert snapshot(exp.checkpoints) == before
    # a forced training that succeeds keeps the old checkpoint as moco-<its hash>.pt, as before
    second = pretrain(force=True, max_steps=2)
    assert second["config_hash"] != first["config_hash"]
    assert (exp.checkpoints / f"moco-{first['config_hash']}.pt").read_bytes() == before["moco.pt"]
    assert hidden_leftovers(exp.root) == []


def test_trak_force_that_fails_restores_the_files_it_replaced(tmp_path):
    pytest.importorskip("trak")
    from attribution.data import load_dataset
    from attribution.stages.trak import TrakStage

    train = require_fashion_mnist("train", n_per_class=10, seed=0)
    test = load_dataset("fashion-mnist", "test", n_per_class=5, seed=0)
    exp = Experiment(tmp_path / "exp")
    positions = np.array([0, 1, 7])  # targets of two classes
    write_rank_rankings(exp, train, test, positions)

    def trak(force=False, **section):
        preset = {"name": "test", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": 10},
                  "support": {"model": "mlp", "epochs": 1}, "rank": {"top_k": 10},
                  "trak": {"checkpoints": 1, "proj_dim": 16, "batch_size": 100, **section}}
        return TrakStage(exp, parse_settings(preset), progress=False, force=force)()

    def trak_files():
        rankings = {f"rankings/{k}": v for k, v in snapshot(exp.rankings).items() if k.startswith("trak")}
        return {**rankings, **{f"scores/{k}": v for k, v in snapshot(exp.scores).items()}}

    trak()
    before = trak_files()
    classes = np.unique(test.labels[positions])
    assert len([k for k in before if k.startswith("rankings/trak-")]) == len(classes) > 1
    # one class's targets leave the rank stage (its trak files become stale), then a forced
    # rerun fails in the new computation (proj_dim must be below the 100 training images)
    dropped = int(test.labels[positions[0]])
    (exp.rankings / f"l2-class{dropped:03d}.parquet").unlink()
    with pytest.raises(ValueError, match="proj_dim=100 must be smaller than the training-set size 100"):
        trak(force=True, proj_dim=100)
    assert trak_files() == before  # the stale class's files and the other class's are back
    assert hidden_leftovers(exp.root) == []


# ----------------------------------------------------------------------------- finding 4: the manifest


def test_a_refused_run_leaves_the_experiment_as_it_was(embedded, tiny_toml, tmp_path, capsys):
    exp = copy_of(embedded, tmp_path)
    before = snapshot(exp.root)
    # the command: another preset (other [data]) into this experiment
    code = main(["run", "cifar10", "--exp", str(exp.root), "--set", "data.root=/nonexistent", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.dataset: 'fashion-mnist' -> 'cifar10'" in err and "data.train_per_class: 4 -> " in err
    assert "new experiment" in err and "--exp" in err
    assert snapshot(exp.root) == before
    # the same data selection at a root without the files: refused by the stages' preflight
    code = main(["run", str(tiny_toml), "--exp", str(exp.root), "--set", f"data.root={tmp_path / 'empty'}",
                 "--no-progress"])
    assert code == 2 and "empty" in capsys.readouterr().err
    assert snapshot(exp.root) == before
    # changed settings, refused by the first stage's plan: the preset is not recorded either
    code = main(["run", str(tiny_toml), "--exp", str(exp.root), "--set", "embed.seed=1", "--no-progress"])
    assert code == 2 and "seed: 0 -> 1" in capsys.readouterr().err
    assert snapshot(exp.root) == before
    # a run that passes its checks records its preset
    code = main(["run", str(tiny_toml), "--exp", str(exp.root), "--set", "embed.batch_size=4", "--no-progress"])
    assert code == 0
    assert exp.manifest()["preset"]["preset"]["embed"]["batch_size"] == 4


def test_preflight_counts_what_earlier_selected_stages_write(embedded, tmp_path):
    exp = Experiment(tmp_path / "new")
    preset = {"name": "p", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": 4}, "rank": {}}
    stage = RankStage(exp, parse_settings(preset), progress=False)
    with pytest.raises(StageInputMissing, match="which the embed stage writes"):
        stage.preflight()
    stage.preflight(produced={"embeddings"})  # the embed stage runs first in the same pipeline
    # a pipeline whose stage lacks its input is refused before anything is written
    with pytest.raises(StageInputMissing):
        Pipeline(exp, preset, InProcessRuntime(), progress=False).run()
    assert not exp.root.exists()
    # a changed [data] selection is refused by the pipeline itself, with each key on its own
    moved = copy_of(embedded, tmp_path)
    other = load_preset(PROJECT / "attribution" / "presets" / "quickstart.toml")
    with pytest.raises(SettingsChanged, match=r"data\.test_per_class: 2 -> 100"):
        Pipeline(moved, other, InProcessRuntime(), progress=False).run(["report"])


# ----------------------------------------------------------------------------- finding 7: the lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_is_reentrant_and_refuses_a_second_process(tmp_path):
    exp = Experiment(tmp_path / "exp").create()
    probe = ("import sys; from attribution.experiment import Experiment\n"
             "with Experiment(sys.argv[1]).lock(): print('took it')")
    with exp.lock(command="attribution run quickstart --stages support"):
        holder = json.loads(exp.lock_path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "attribution run quickstart --stages support" and holder["started"]
        with exp.lock():  # the pipeline holds it and its stages take it again
            pass
        assert exp.lock_path.exists()
        second = subprocess.run([sys.executable, "-c", probe, str(exp.root)], capture_output=True, text=True,
                                cwd=PROJECT, timeout=120)
        assert second.returncode != 0 and "took it" not in second.stdout
        assert "ExperimentLocked" in second.stderr
        assert f"in use by process {os.getpid()} on host {socket.gethostname()}" in second.stderr
        assert f"kill {os.getpid()}" in second.stderr and "delete" in second.stderr
    assert not exp.lock_path.exists()
    again = subprocess.run([sys.executable, "-c", probe, str(exp.root)], capture_output=True, text=True,
                           cwd=PROJECT, timeout=120)
    assert again.returncode == 0 and "took it" in again.stdout
    # a lock held on another host cannot be checked: refused, naming that host
    exp.lock_path.write_text(json.dumps({"host": "node-7", "pid": 4242, "started": "2026-12-01T10:00:00",
                                         "command": "attribution run quickstart"}))
    with pytest.raises(ExperimentLocked, match="process 4242 on host node-7 .* delete .*\\.lock"):
        with exp.lock():
            pass
    assert exp.lock_path.exists()  # not ours to remove


def test_a_stale_lock_is_taken_over_and_its_rewrite_undone(embedded, tmp_path):
    """A process killed during 'embed --overwrite' left its lock, the old shards moved aside
    and half of the new ones; the next command restores the finished embedding."""
    exp = copy_of(embedded, tmp_path)
    before = snapshot(exp.root)
    os.replace(exp.embeddings, aside_path(exp.embeddings))
    exp.embeddings.mkdir()
    (exp.embeddings / "train-00000.parquet").write_bytes(b"half of a new shard set")
    (exp.root / ".discard-scores").mkdir()  # a kill while deleting what a finished rewrite replaced
    exp.lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                         "started": "2026-12-01T10:00:00", "command": "attribution embed --overwrite"}))
    with pytest.warns(UserWarning) as caught:
        summary = embed(exp)
    messages = " | ".join(str(w.message) for w in caught)
    assert "taking over the lock" in messages and "which no longer runs" in messages
    assert "restored" in messages and "embeddings" in messages
    assert summary["computed_shards"] == 0  # the restored embedding is complete: nothing to recompute
    after = snapshot(exp.root)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert hidden_leftovers(exp.root) == []


def test_a_refused_command_leaves_no_directory(tmp_path, capsys):
    missing = tmp_path / "typo" / "exp"
    with pytest.raises(RuntimeError):
        with Experiment(missing).lock():
            raise RuntimeError("the stage's checks failed")
    assert not (tmp_path / "typo").exists()
    assert main(["report", "--exp", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


SUPPORT_RUN = """
import json, sys
from attribution.experiment import Experiment
from attribution.stages import parse_settings
from attribution.stages.support import SupportStage
from attribution.workqueue import InProcessRuntime
exp = Experiment(sys.argv[1])
preset = exp.manifest()["preset"]["preset"]
print(json.dumps(SupportStage(exp, parse_settings(preset), InProcessRuntime(), progress=False)(), default=str))
"""


def test_two_support_runs_at_once_the_second_is_refused_and_nothing_is_duplicated(tmp_path):
    """The issue's two 'attribution run quickstart --stages support' at once: process A runs the
    support stage; B, started while A holds the lock (A is paused there with SIGSTOP, so the
    overlap is certain), is refused naming A; A finishes; no training is logged twice."""
    per_class = 20
    train = require_fashion_mnist("train", n_per_class=per_class, seed=0)
    from attribution.data import load_dataset

    test = load_dataset("fashion-mnist", "test", n_per_class=2, seed=0)
    exp = Experiment(tmp_path / "exp").create()
    x = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float32)
    rows = []
    for p in range(8):  # 8 targets: with this tiny model about half are stable enough to be searched
        same = np.flatnonzero(train.labels == test.labels[p])
        score = -np.linalg.norm(x[same] - test.images([p]).reshape(-1).astype(np.float32), axis=1)
        order = np.argsort(-score, kind="stable")
        rows.append(pd.DataFrame({"target_id": np.int64(test.ids[p]), "method": "l2",
                                  "rank": np.arange(len(order), dtype=np.int32),
                                  "train_id": train.ids[same][order].astype(np.int64),
                                  "score": score[order].astype(np.float32)}))
    write_table(pa.Table.from_pandas(pd.concat(rows), preserve_index=False).cast(RANKING_SCHEMA),
                exp.rankings / "l2.parquet")
    preset = {"name": "tiny", "seed": 0, "data": {"dataset": "fashion-mnist", "train_per_class": per_class},
              "support": {"model": "mlp", "epochs": 2, "seeds": 3, "budget": 2, "top_k": per_class, "ensemble": 3,
                          "actors": 1, "targets": [int(i) for i in test.ids[:8]], "modes": ["removal"]}}
    exp.record_stage("preset", preset=preset)  # as 'attribution run' records it: B's command reads it

    a = subprocess.Popen([sys.executable, "-c", SUPPORT_RUN, str(exp.root)], cwd=PROJECT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # A holds the lock once its record names A
            try:
                if json.loads(exp.lock_path.read_text())["pid"] == a.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert a.poll() is None, f"A ended before it took the lock: {a.communicate()}"
            assert time.monotonic() < deadline, "A never took the lock"
            time.sleep(0.02)
        os.kill(a.pid, signal.SIGSTOP)
        b = run_cli(["support", "--exp", str(exp.root), "--no-progress"])
        os.kill(a.pid, signal.SIGCONT)
        assert b.returncode == 2, b.stdout[-2000:] + b.stderr[-2000:]
        assert f"in use by process {a.pid} on host {socket.gethostname()}" in b.stderr
        assert "Traceback" not in b.stderr and "wait for it to finish" in b.stderr
        out, err = a.communicate(timeout=600)
        assert a.returncode == 0, err[-3000:]
    finally:
        if a.poll() is None:
            os.kill(a.pid, signal.SIGCONT)
            a.kill()
            a.wait()
    summary = json.loads(out.strip().splitlines()[-1])
    log = read_dataset(exp.trainings).to_pandas()
    key = ["target_id", "method", "mode", "k", "seed"]
    assert len(log) == summary["trained_this_run"] > 0
    assert not log.duplicated(key).any()
    # B's stage, rerun once A is done, reuses everything and trains nothing twice
    from attribution.stages.support import SupportStage

    again = SupportStage(exp, parse_settings(preset), InProcessRuntime(), progress=False)()
    assert again["trained_this_run"] == 0 and len(read_dataset(exp.trainings).to_pandas()) == len(log)
    assert not exp.lock_path.exists()


# ----------------------------------------------------------------------------- finding 9: URI staging


def test_the_staging_folder_mirrors_the_store(tmp_path, capsys):
    stored = tmp_path / "stored"
    uri = f"file://{stored}"
    storage = ExperimentStorage(uri, staging_root=tmp_path / "staging")
    local = storage.local
    (stored / "rankings").mkdir(parents=True)
    (stored / "rankings" / "l2-class000.parquet").write_bytes(b"ranking")
    (stored / "manifest.json").write_text("{}")
    storage.pull()
    assert snapshot(local).keys() >= {"rankings/l2-class000.parquet", "manifest.json"}
    # a finished file written here after the last sync (a run stopped before its push) is kept;
    # a file the store no longer holds is removed; hidden files of a run are never touched
    (local / "trainings").mkdir()
    (local / "trainings" / "part-1.parquet").write_bytes(b"finished, not pushed yet")
    (local / ".lock.123.tmp").write_bytes(b"hidden")
    (stored / "rankings" / "l2-class000.parquet").unlink()
    storage.pull()
    assert not (local / "rankings" / "l2-class000.parquet").exists()
    assert (local / "trainings" / "part-1.parquet").exists()
    assert (local / ".lock.123.tmp").exists()
    assert "removed 1 file(s)" in capsys.readouterr().err
    storage.push()
    assert (stored / "trainings" / "part-1.parquet").read_bytes() == b"finished, not pushed yet"
    # a file rewritten in place (--overwrite / --force) is uploaded even at the same size
    rewritten = local / "trainings" / "part-1.parquet"
    rewritten.write_bytes(b"rewritten, same length!!")
    assert len(b"rewritten, same length!!") == len(b"finished, not pushed yet")
    os.utime(rewritten, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    storage.push()
    assert (stored / "trainings" / "part-1.parquet").read_bytes() == b"rewritten, same length!!"
    # the issue: the stored experiment deleted, then resubmitted -> nothing comes back from the cache
    shutil.rmtree(stored)
    storage.pull()
    assert [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")] == []
    # a cache made before the sync record existed mirrors the store too
    (local / "support.parquet").write_bytes(b"from an old cache")
    (local / ".synced.json").unlink()
    stored.mkdir()
    storage.pull()
    assert not (local / "support.parquet").exists()


def test_pull_is_refused_while_a_run_holds_the_staging_folder(tmp_path):
    stored = tmp_path / "stored"
    stored.mkdir()
    storage = ExperimentStorage(f"file://{stored}", staging_root=tmp_path / "staging")
    (storage.local / "rankings").mkdir(parents=True)
    (storage.local / "rankings" / "unpushed.parquet").write_bytes(b"work of the live run")
    storage.local.joinpath(".lock").write_text(json.dumps({"host": "node-7", "pid": 1, "started": "now",
                                                           "command": "attribution run"}))
    with pytest.raises(ExperimentLocked, match="node-7"):
        storage.pull()
    assert (storage.local / "rankings" / "unpushed.parquet").exists()


def test_the_report_names_the_uri_not_the_staging_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_CACHE", str(tmp_path / "cache"))  # the staging folder lives here
    stored = tmp_path / "stored"
    uri = f"file://{stored}"
    table = pa.table({"target_id": np.repeat([60000, 60001], 3).astype(np.int64), "method": ["l2"] * 6,
                      "rank": pa.array(np.tile(np.arange(3), 2), pa.int32()), "train_id": np.arange(6, dtype=np.int64),
                      "score": pa.array(np.linspace(1, 0, 6), pa.float32())}).cast(RANKING_SCHEMA)
    write_table(table, stored / "rankings" / "l2-class000.parquet")
    assert main(["report", "--exp", uri, "--grid-targets", "0", "--n-boot", "10", "--no-progress"]) == 0
    report = (stored / "report.md").read_text()
    staging = ExperimentStorage(uri, create=False).local
    assert f"Experiment `{uri}`" in report and str(staging) not in report
    assert json.loads((stored / "manifest.json").read_text())["storage"]["location"] == uri
