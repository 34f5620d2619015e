"""A battery of bad inputs through the real ``attribution`` command, against a real
experiment (Fashion-MNIST embedded, ranked, TRAK-scored and support-searched at tiny
settings, once per module).

For every input: exit code 2, one ``error:`` line that names the problem and the fix,
no traceback, nothing started (no Ray), and the experiment's files byte-for-byte as they
were (paths a typo names are not created either). Most cases call ``cluster.cli.main``
in this process; a few run ``python -m cluster.cli`` to see exactly what a user sees.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from conftest import require_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent

# Small enough to build in ~20 s in process: 200 training / 30 test images, a random-init
# backbone (no pretraining), l2 + random rankings (top 5), TRAK on 2 models, a support
# search of 3 targets with a 1-epoch-class budget.
TINY_PRESET = """\
name = "tiny"
seed = 0

[data]
dataset = "fashion-mnist"
train_per_class = 20
test_per_class = 3

[embed]
checkpoint = ""
batch_size = 64
shard_size = 50
actors = 1

[rank]
methods = ["l2", "random"]
top_k = 5
targets = 4
solver = "batched"

[trak]
checkpoints = 2
proj_dim = 16
batch_size = 64

[support]
model = "mlp"
epochs = 4
seeds = 2
budget = 6
targets = 3
top_k = 5
ensemble = 2
actors = 1
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The experiment (made by the pipeline's own code, in process) and the files the
    cases refer to."""
    import torch

    from attribution.experiment import Experiment
    from attribution.pipeline import Pipeline
    from attribution.presets import load_preset
    from attribution.workqueue import InProcessRuntime

    require_fashion_mnist("train")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad-inputs")
    preset = root / "tiny.toml"
    preset.write_text(TINY_PRESET)
    exp = root / "exp"
    Pipeline(Experiment(exp), load_preset(preset), InProcessRuntime(), progress=False).run()
    for artifact in ("embeddings", "rankings", "scores", "trak", "trainings", "support.parquet", "manifest.json"):
        assert (exp / artifact).exists(), f"the tiny experiment lacks {artifact}"
    pristine = root / "pristine"
    shutil.copytree(exp, pristine)

    garbage = root / "garbage.pt"
    garbage.write_bytes(os.urandom(40))
    whole = root / "whole.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 1, 3, 3)}}, whole)
    truncated = root / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    broken = root / "broken.toml"
    broken.write_text('name = "broken"\n[data\ndataset = "fashion-mnist"\n')
    empty = root / "empty-root"
    empty.mkdir()
    return {"exp": str(exp), "preset": str(preset), "garbage": str(garbage), "truncated": str(truncated),
            "broken": str(broken), "empty": str(empty), "missing": str(root / "no-such-folder"),
            "typo": str(root / "exp-typo"), "out": str(root / "comparison"), "root": root, "pristine": pristine}


def snapshot(root) -> dict[str, str]:
    """Every file (hidden ones too) and folder under ``root``: relative path -> sha256."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        out[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def refused(argv, world, capsys) -> str:
    """Run the command in process; assert the one-line refusal; return the message."""
    before = snapshot(world["exp"])
    try:
        code = main([part.format(**world) for part in argv])
    finally:
        ray = sys.modules.get("ray")
        started = ray is not None and ray.is_initialized()
        if started:  # shut down here, so the next case is judged on its own
            ray.shutdown()
    err = capsys.readouterr().err
    assert not started, "a refused command started Ray"
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert_unchanged(world, before)
    return lines[0]


def assert_unchanged(world, before) -> None:
    """The experiment is as ``before``; if not, it is restored (so the next case is judged
    on its own) and the case fails."""
    after = snapshot(world["exp"])
    if after != before:
        shutil.rmtree(world["exp"])
        shutil.copytree(world["pristine"], world["exp"])
    changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
    assert not changed, f"a refused command changed the experiment: {changed}"


CASES = {
    # ------------------------------------------------------------------ names
    "unknown preset": (["run", "quickstrat", "--exp", "{exp}"],
                       ["preset 'quickstrat' not found", "did you mean 'quickstart'", "give a preset name"]),
    "broken preset file": (["run", "{broken}", "--exp", "{exp}"],
                           ["{broken} is not valid TOML", "at line 2", "fix that line"]),
    "typo'd stage": (["run", "{preset}", "--exp", "{exp}", "--stages", "embedd"],
                     ["unknown stage(s) ['embedd']", "did you mean 'embed'", "stages: pretrain, embed"]),
    "typo'd stage after a space": (["run", "{preset}", "--exp", "{exp}", "--stages", "rank, suport"],
                                   ["unknown stage(s) ['suport']", "did you mean 'support'"]),
    "a stage the preset lacks": (["run", "{preset}", "--exp", "{exp}", "--stages", "pretrain"],
                                 ["--stages pretrain", "no [pretrain] section",
                                  "its stages are embed, rank, trak, support"]),
    "typo'd section": (["run", "{preset}", "--exp", "{exp}", "--set", "suport.targets=1"],
                       ["unknown preset section(s) or key(s) ['suport']", "did you mean 'support'"]),
    "typo'd section in a stage command": (["support", "--exp", "{exp}", "--set", "suport.targets=1"],
                                          ["['suport']", "did you mean 'support'"]),
    "typo'd key": (["support", "--exp", "{exp}", "--set", "support.budgett=2"],
                   ["unknown [support] setting(s) ['budgett']", "did you mean 'budget'", "known: ["]),
    "key without its section": (["run", "{preset}", "--exp", "{exp}", "--set", "top_k=3"],
                                ["['top_k']", "did you mean 'rank.top_k'"]),
    "--set without a value": (["rank", "--exp", "{exp}", "--set", "rank.top_k"],
                              ["--set 'rank.top_k' must look like SECTION.KEY=VALUE", "e.g. --set rank.top_k=100"]),
    "--set into a list": (["run", "{preset}", "--exp", "{exp}", "--set", "rank.methods.l2=1"],
                          ["cannot set rank.methods.l2", "not a table"]),
    "typo'd ablation": (["run", "{preset}", "--exp", "{exp}", "--ablation", "all-clas"],
                        ["unknown ablation 'all-clas'", "did you mean 'all-class'", "choose one of"]),
    "typo'd command": (["suport", "--exp", "{exp}"], ["invalid choice: 'suport'", "did you mean 'support'"]),
    "unknown flag": (["rank", "--exp", "{exp}", "--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    "flag of the wrong type": (["report", "--exp", "{exp}", "--n-boot", "abc"],
                               ["argument --n-boot: invalid int value: 'abc'"]),
    "two experiments": (["rank", "{exp}", "--exp", "{typo}"], ["two experiments given", "give one of them"]),
    # ------------------------------------------------------------------ values (every section parsed up front)
    "rank.top_k=abc": (["run", "{preset}", "--exp", "{exp}", "--set", "rank.top_k=abc"],
                       ["rank.top_k must be an integer >= 1, got 'abc'"]),
    "support.seeds=-1": (["run", "{preset}", "--exp", "{exp}", "--set", "support.seeds=-1"],
                         ["support.seeds must be >= 1, got -1"]),
    "support.modes": (["support", "--exp", "{exp}", "--set", 'support.modes=["removal", "flip"]'],
                      ["support.modes", "'flip'", "'mislabel'"]),
    "embed.dtype": (["run", "{preset}", "--exp", "{exp}", "--set", "embed.dtype=float61"],
                    ["embed.dtype must be one of", "got 'float61'", "did you mean 'float16'"]),
    "data.train_per_class": (["run", "{preset}", "--exp", "{exp}", "--set", "data.train_per_class=-5"],
                             ["data.train_per_class must be >= 0, got -5"]),
    "data.dataset": (["run", "{preset}", "--exp", "{exp}", "--set", "data.dataset=mnist"],
                     ["data.dataset must be one of ['fashion-mnist', 'cifar10', 'imagenet'], got 'mnist'"]),
    "rank.methods": (["rank", "--exp", "{exp}", "--set", 'rank.methods=["esvn"]'], ["'esvn'", "'esvm'"]),
    "trak.device": (["trak", "--exp", "{exp}", "--set", "trak.device=gpu"], ["trak.device must be", "'gpu'"]),
    "report.confidence": (["report", "--exp", "{exp}", "--set", "report.confidence=2"],
                          ["report.confidence must be in (0, 1), got 2"]),
    "report --n-boot 0": (["report", "{exp}", "--n-boot", "0"], ["report.n_boot must be >= 1, got 0"]),
    "a later stage's bad value refused before the first": (
        ["run", "quickstart", "--exp", "{exp}", "--set", "pretrain.lr=abc"], ["pretrain.lr must be", "'abc'"]),
    # ------------------------------------------------------------------ data and checkpoints
    "CIFAR-10 without data.root": (["embed", "--exp", "{exp}", "--overwrite", "--set", "data.dataset=cifar10"],
                                   ["cifar10", "needs data.root", "--set data.root=PATH"]),
    "CIFAR-10 at a missing root": (
        ["embed", "--exp", "{exp}", "--overwrite", "--set", "data.dataset=cifar10", "--set", "data.root={missing}"],
        ["{missing}", "does not exist", "--set data.root=PATH"]),
    "Fashion-MNIST root without the files": (
        ["embed", "--exp", "{exp}", "--overwrite", "--set", "data.root={empty}"],
        ["{empty}", "train-images-idx3-ubyte.gz", "--set data.root=PATH"]),
    "run with a missing data.root": (["run", "{preset}", "--exp", "{exp}", "--set", "data.root={missing}"],
                                     ["{missing}", "does not exist", "--set data.root=PATH"]),
    "another preset's data into this experiment": (
        ["run", "cifar10", "--exp", "{exp}", "--set", "data.root={missing}"],
        ["data.dataset: 'fashion-mnist' -> 'cifar10'", "into a new experiment"]),
    "another training subset into this experiment": (
        ["run", "{preset}", "--exp", "{exp}", "--set", "data.train_per_class=30"],
        ["data.train_per_class: 20 -> 30", "new experiment"]),
    "garbage checkpoint": (["embed", "--exp", "{exp}", "--overwrite", "--set", "embed.checkpoint={garbage}"],
                           ["{garbage}", "truncated or corrupt", "copy it again"]),
    "truncated checkpoint": (["embed", "--exp", "{exp}", "--overwrite", "--set", "embed.checkpoint={truncated}"],
                             ["{truncated}", "truncated or corrupt", "copy it again"]),
    "missing checkpoint": (["embed", "--exp", "{exp}", "--set", "embed.checkpoint={missing}/moco.pt"],
                           ["{missing}/moco.pt", "does not exist", "'pretrained'"]),
    # ------------------------------------------------------------------ changed settings: key: old -> new, and the fix
    "changed embed settings": (["embed", "--exp", "{exp}", "--set", "embed.dtype=float16"],
                               ["dtype: 'float32' -> 'float16'", "--overwrite", "new experiment directory"]),
    "changed rank settings": (["rank", "--exp", "{exp}", "--set", "rank.top_k=3"],
                              ["top_k: 5 -> 3", "rankings/l2-*.parquet", "new --exp"]),
    "changed trak settings": (["trak", "--exp", "{exp}", "--set", "trak.proj_dim=8"],
                              ["proj_dim: 16 -> 8", "--force", "new --exp"]),
    "changed support settings": (["support", "--exp", "{exp}", "--set", "support.budget=2"],
                                 ["support.budget: 6 -> 2", "--force", "new --exp"]),
    "changed support targets and budget": (
        ["support", "--exp", "{exp}", "--set", "support.targets=1", "--set", "support.budget=2"],
        ["support.budget: 6 -> 2", "support.targets: 3 -> 1", "--force"]),
    # ------------------------------------------------------------------ missing experiments and inputs
    "report of a missing experiment": (["report", "{typo}"], ["{typo}", "attribution run PRESET --exp"]),
    "report --exp of a missing experiment": (["report", "--exp", "{typo}"], ["{typo}"]),
    "a stage's missing input": (["support", "--exp", "{typo}"],
                                ["the support stage needs {typo}/rankings", "run 'attribution rank --exp {typo}'"]),
    "compare of a missing experiment": (["compare", "{exp}", "{typo}", "--out", "{out}"],
                                        ["experiment {typo} does not exist", "check the path"]),
    "compare with the wrong number of labels": (["compare", "--exp", "{exp}", "--labels", "a,b", "--out", "{out}"],
                                                ["2 labels for 1 experiments", "one label per experiment"]),
    "compare with repeated labels": (["compare", "{exp}", "--exp", "{exp}", "--labels", "a,a", "--out", "{out}"],
                                     ["repeat a name", "its own label"]),
    "job without an address": (["job", "status", "raysubmit_1"], ["--address http://HEAD:8265"]),
}


@pytest.mark.parametrize("argv, messages", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused_in_one_line_and_changes_nothing(argv, messages, world, capsys):
    message = refused(argv, world, capsys)
    for expected in messages:
        assert expected.format(**world) in message, message
    created = [world[path] for path in ("typo", "out", "missing") if Path(world[path]).exists()]
    for path in created:  # removed, so the next case is judged on its own
        shutil.rmtree(path)
    assert not created, f"a path given by mistake was created: {created}"


def test_the_experiment_still_works_after_the_battery(world, capsys):
    """The refusals above left a usable experiment: the report is written from it."""
    copy = world["root"] / "copy"
    shutil.copytree(world["exp"], copy)
    assert main(["report", "--exp", str(copy), "--n-boot", "20", "--grid-targets", "0"]) == 0
    assert (copy / "report.md").is_file()
    capsys.readouterr()


def test_a_second_writer_is_refused_naming_the_holder(world, capsys):
    """The experiment's lock: a second command is refused with the holder's host and pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom attribution.experiment import Experiment\n"
         "with Experiment(sys.argv[1]).lock('attribution support (holder)'):\n"
         "    print('locked', flush=True)\n    sys.stdin.readline()\n", world["exp"]],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(world["exp"])
        code = main(["support", "--exp", world["exp"]])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"process {holder.pid} on host {socket.gethostname()}" in err
        assert "wait for it to finish" in err and "another --exp" in err
        assert_unchanged(world, before)
    finally:
        holder.communicate("\n", timeout=60)  # releases the lock (this test started it)
    assert holder.returncode == 0
    assert not (Path(world["exp"]) / ".lock").exists()


def run_cli(*args, timeout=300):
    """The user's view: a fresh ``python -m cluster.cli`` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_what_a_user_sees_is_one_line_without_a_traceback(world):
    """The issue's own example (support.parquet was replaced by an empty one, exit code 0)
    and an unknown preset, in a fresh process; --debug adds the traceback."""
    before = snapshot(world["exp"])
    result = run_cli("support", "--exp", world["exp"], "--set", "support.targets=1", "--set", "support.budget=2")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "support.budget: 6 -> 2" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("run", "quickstrat", "--exp", world["exp"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "did you mean 'quickstart'" in result.stderr
    result = run_cli("--debug", "support", "--exp", world["exp"], "--set", "support.budget=2")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "SettingsChanged" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert_unchanged(world, before)
