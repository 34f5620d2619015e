"""An ablation reuses its base experiment: whole stages whose settings and inputs are
unchanged are linked from the base, identical trainings are taken from the base's log,
the base is never modified, and what was reused is recorded. Real Fashion-MNIST, real
torch, the stages on an in-process runtime (no Ray), at a tiny size."""

import json
from pathlib import Path

import pandas as pd
import pytest

from attribution.artifacts import file_sha256, read_dataset
from attribution.experiment import Experiment
from attribution.pipeline import Pipeline
from attribution.presets import apply_ablation
from attribution.reuse import stage_files
from attribution.settings import SettingsError
from attribution.workqueue import InProcessRuntime
from conftest import require_fashion_mnist

PER_CLASS = 30


def tiny_preset() -> dict:
    """pretrain (a few MoCo steps) -> embed -> rank (esvm, l2, random) -> support -> report."""
    return {
        "name": "tiny", "seed": 0,
        "data": {"dataset": "fashion-mnist", "root": "", "train_per_class": PER_CLASS, "test_per_class": 2},
        "pretrain": {"backbone": "resnet18", "small_stem": False, "images": "subset", "max_steps": 2,
                     "batch_size": 8, "queue_size": 16, "shuffle_bn_splits": 1, "warmup_steps": 1,
                     "precision": "fp32", "threads": 1},
        "embed": {"backbone": "resnet18", "checkpoint": "pretrained", "batch_size": 64, "shard_size": 64,
                  "actors": 1},
        "rank": {"methods": ["esvm", "l2", "random"], "solver": "sklearn", "top_k": PER_CLASS, "targets": "all"},
        "support": {"model": "mlp", "epochs": 4, "seeds": 2, "first_seeds": 1, "budget": 2, "targets": 8,
                    "top_k": PER_CLASS, "ensemble": 2, "actors": 1, "speculate": False},
        "report": {"n_boot": 50, "grid_targets": 0},
    }


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, file_sha256(p)) for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    require_fashion_mnist("train", n_per_class=PER_CLASS, seed=0)
    exp = Experiment(tmp_path_factory.mktemp("runs") / "tiny")
    Pipeline(exp, tiny_preset(), InProcessRuntime(), progress=False).run()
    return exp


def run_ablation(base: Experiment, name: str) -> tuple[Experiment, dict]:
    exp = Experiment(base.root.parent / f"tiny-{name}")
    summaries = Pipeline(exp, apply_ablation(tiny_preset(), name), InProcessRuntime(), progress=False,
                         base=base.root).run()
    return exp, summaries


def test_an_ablation_that_changes_only_the_methods_retrains_nothing(base):
    before = snapshot(base.root)
    exp, summaries = run_ablation(base, "esvm-vs-l2")
    stages = exp.manifest()["base"]["stages"]
    print({k: (v["reused"], v["linked_files"]) for k, v in stages.items()})
    assert exp.manifest()["base"]["root"] == str(base.root.resolve())
    # the checkpoint and the embeddings are the base's (hard links); rank runs (other methods list)
    assert stages["pretrain"]["reused"] and stages["embed"]["reused"]
    assert stages["embed"]["linked_files"] == len(stage_files(base.root, "embed")) > 0
    assert not stages["rank"]["reused"] and "rank.methods" in stages["rank"]["reason"]
    # the same rankings -> every training of every search is the base's; none is new
    support = summaries["support"]
    assert support["trained_this_run"] == 0 and support["trainings_from_base"] > 0
    assert stages["support"]["trainings_from_base"] == support["trainings_from_base"]
    columns = ["target_id", "method", "mode", "support", "trainings", "limit", "flip_class"]
    ours = pd.read_parquet(exp.support)[columns].sort_values(columns[:3]).reset_index(drop=True)
    theirs = pd.read_parquet(base.support)
    theirs = theirs[theirs["method"].isin(["esvm", "l2"])][columns].sort_values(columns[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs)
    # the full-data ensemble is the base's too, and the ablation's log holds what it used
    assert (exp.root / "support_targets.parquet").stat().st_ino == (base.root / "support_targets.parquet").stat().st_ino
    assert len(read_dataset(exp.trainings)) == support["trainings_from_base"]
    assert snapshot(base.root) == before  # the base is untouched: same files, same bytes, same inodes
    # a rerun takes nothing twice
    again = Pipeline(exp, apply_ablation(tiny_preset(), "esvm-vs-l2"), InProcessRuntime(), progress=False,
                     base=base.root).run()
    assert again["support"]["trained_this_run"] == 0 and again["support"]["trainings_from_base"] == 0
    assert len(read_dataset(exp.trainings)) == support["trainings_from_base"]


def test_an_ablation_of_the_support_stage_only_reuses_every_earlier_stage(base):
    """Only [support] differs: pretrain, embed AND rank are the base's. The embedding
    manifest records the pretrained checkpoint relative to its experiment
    ("checkpoints/moco.pt"), so the two experiments' manifests are byte-equal and the
    rank stage sees unchanged inputs (it used to record each experiment's own path)."""
    exp = Experiment(base.root.parent / "tiny-support-only")
    preset = tiny_preset()
    preset["support"] = {**preset["support"], "methods": ["esvm"]}
    Pipeline(exp, preset, InProcessRuntime(), progress=False, base=base.root).run()
    stages = exp.manifest()["base"]["stages"]
    assert all(stages[s]["reused"] for s in ("pretrain", "embed", "rank")), stages
    assert json.loads((exp.root / "embeddings" / "_manifest.json").read_text())["checkpoint"] == "checkpoints/moco.pt"


def test_a_setting_added_since_the_base_ran_is_no_change_at_its_default():
    from attribution.reuse import comparable_settings
    from attribution.stages.datamodels import DatamodelSettings

    config = DatamodelSettings.from_preset({"datamodels": {"models": 40}})
    recorded = {k: v for k, v in config.to_dict().items() if k != "accept_cost"}  # an older base's record
    assert comparable_settings(config, recorded) == recorded
    confirmed = DatamodelSettings.from_preset({"datamodels": {"models": 40, "accept_cost": True}})
    assert comparable_settings(confirmed, recorded)["accept_cost"] is True  # off its default: a change


def test_new_features_recompute_from_embed_on_and_share_the_whole_class_trainings(base):
    before = snapshot(base.root)
    exp, summaries = run_ablation(base, "random-features")
    stages = exp.manifest()["base"]["stages"]
    print({k: (v["reused"], v["reason"]) for k, v in stages.items()})
    assert "pretrain" not in stages  # dropped by the ablation
    assert not stages["embed"]["reused"] and "embed.checkpoint" in stages["embed"]["reason"]
    assert not stages["rank"]["reused"]
    support = summaries["support"]
    # other rankings: only the trainings at k = the whole class (the same ids removed / relabelled)
    # are the base's; the bisection steps below it are new
    assert support["trainings_from_base"] > 0 and support["trained_this_run"] > 0
    log = read_dataset(exp.trainings).to_pandas()
    assert len(log) == support["trainings_from_base"] + support["trained_this_run"]
    searches = pd.read_parquet(exp.support)
    assert set(searches["method"]) == {"esvm"}
    assert support["trainings_from_base"] <= len(searches)  # first_seeds = 1: one whole-class test per search
    assert snapshot(base.root) == before


def test_a_changed_pretraining_reaches_embed_through_its_input(base):
    """As supervised-features does: only [pretrain] changes; embed's own settings are the
    same, but its input (the checkpoint) is not, so embed and everything after it run."""
    preset = tiny_preset()
    preset["pretrain"]["max_steps"] = 3
    preset["rank"]["methods"] = preset["support"]["methods"] = ["esvm"]
    preset["ablation"] = "longer-pretraining"
    exp = Experiment(base.root.parent / "tiny-longer-pretraining")
    Pipeline(exp, preset, InProcessRuntime(), progress=False, base=base.root).run()
    stages = exp.manifest()["base"]["stages"]
    assert not stages["pretrain"]["reused"] and "pretrain.max_steps" in stages["pretrain"]["reason"]
    assert not stages["embed"]["reused"]
    assert stages["embed"]["reason"] == "an input differs: checkpoints/moco.pt (other content)"
    assert file_sha256(exp.root / "checkpoints/moco.pt") != file_sha256(base.root / "checkpoints/moco.pt")


def test_a_named_base_must_exist_and_differ_from_the_experiment(base, tmp_path):
    preset = apply_ablation(tiny_preset(), "all-class")
    with pytest.raises(SettingsError, match="no experiment there"):
        Pipeline(Experiment(tmp_path / "x"), preset, InProcessRuntime(), progress=False,
                 base=tmp_path / "missing").run()
    with pytest.raises(SettingsError, match="is the experiment being written"):
        Pipeline(base, preset, InProcessRuntime(), progress=False, base=base.root).run()
    assert json.loads(base.manifest_path.read_text()).get("base") is None
