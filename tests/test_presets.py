"""Presets (quickstart, cifar10, imagenet), the ablations any of them takes, and the
comparison of a preset's experiment with its ablations'."""


import numpy as np
import pandas as pd
import pytest

from attribution import metrics as M
from attribution.compare import compare_experiments, write_comparison
from attribution.experiment import Experiment
from attribution.presets import apply_ablation, available_presets, load_ablations, load_preset
from attribution.stages import available_stages, parse_settings
from cluster.cli import build_parser


def test_presets_exist_and_every_stage_section_validates():
    assert {"quickstart", "cifar10", "imagenet"} <= set(available_presets())
    assert "ablations" not in available_presets()
    for name in available_presets():
        settings = parse_settings(load_preset(name))  # raises on unknown keys / bad values
        assert set(settings.present) <= set(available_stages())
        settings["support"].recipe().train_config(device="cpu")


def test_reference_settings_of_the_paper_presets():
    cifar = parse_settings(load_preset("cifar10"))
    rank, support = cifar["rank"], cifar["support"]
    assert (cifar.data.dataset, rank.top_k, rank.targets, rank.same_class) == ("cifar10", 1280, 100, True)
    assert (support.model, support.budget, support.seeds, support.first_seeds, support.top_k, support.ensemble) == \
        ("resnet9", 7, 5, 1, 1280, 10)
    config = support.recipe().train_config(device="cpu")
    assert (config.epochs, config.batch_size, config.lr, config.label_smoothing) == (24, 512, 0.5, 0.1)
    assert cifar["pretrain"].epochs == 800 and cifar["pretrain"].batch_size == 512
    imagenet = parse_settings(load_preset("imagenet"))
    support = imagenet["support"]
    assert "pretrain" not in imagenet and imagenet["embed"].backbone == "resnet50"
    assert (imagenet["rank"].targets, support.targets, support.model, support.ensemble) == (30, 30, "resnet18", 4)


@pytest.mark.parametrize("preset_name", ["quickstart", "cifar10", "imagenet"])
def test_every_ablation_applies_to_every_preset(preset_name):
    base = load_preset(preset_name)
    for name, ablation in load_ablations().items():
        assert ablation.get("description"), f"ablation {name} needs a description"
        kept = set(base) - set(ablation.get("drop", []))
        absent = sorted({dotted.split(".")[0] for dotted in ablation.get("set", {})} - kept)
        if absent:  # e.g. supervised-features on a preset without [pretrain]: refused, never half-applied
            with pytest.raises(ValueError, match=rf"has no \[{absent[0]}\] section: this ablation does not apply"):
                load_preset(preset_name, ablation=name)
            continue
        preset = load_preset(preset_name, {"support.targets": 3}, ablation=name)
        assert preset["ablation"] == name and preset["support"]["targets"] == 3
        for section in ablation.get("add", {}):  # a stage the preset does not run, added
            assert isinstance(preset[section], dict), (name, section)
        for stage in ablation.get("drop", []):
            assert stage not in preset
        for dotted, value in ablation.get("set", {}).items():
            section, key = dotted.split(".")
            assert preset[section][key] == value
        parse_settings(preset)
    assert "ablation" not in base and load_preset(preset_name) == base  # the preset itself is untouched
    assert apply_ablation(base, "all-class")["rank"]["same_class"] is False
    assert apply_ablation(base, "all-class")["support"]["methods"] == ["esvm"]  # searches only its claims row's
    assert base["rank"].get("same_class", True) is True
    with pytest.raises(ValueError, match="unknown ablation 'nope'; choose one of"):
        load_preset(preset_name, ablation="nope")


def test_run_takes_an_ablation_and_its_base():
    from cluster.commands.run import ablation_base

    args = build_parser().parse_args(["run", "quickstart", "--ablation", "supervised-features"])
    assert args.ablation == "supervised-features" and args.base is None
    assert ablation_base("quickstart", "supervised-features", None) == ("runs/quickstart", False)  # if it exists
    assert ablation_base("quickstart", "all-class", "runs/mine") == ("runs/mine", True)  # must exist
    assert ablation_base("quickstart", None, None) == (None, False)
    with pytest.raises(ValueError, match="--base is for ablation runs"):
        ablation_base("quickstart", None, "runs/mine")


def test_the_claims_ablations_search_only_esvm_and_leave_the_baselines_to_the_base():
    quickstart = load_preset("quickstart")
    for name in ("supervised-features", "random-features", "all-class"):
        preset = load_preset("quickstart", ablation=name)
        settings = parse_settings(preset)
        assert settings["rank"].methods == ("esvm",) and settings["support"].methods == ("esvm",)
        assert "trak" not in preset and "datamodels" not in preset
        assert settings["support"].targets == parse_settings(quickstart)["support"].targets  # the same targets
    assert parse_settings(load_preset("quickstart", ablation="supervised-features"))["pretrain"].objective == \
        "supervised"
    assert "pretrain" not in load_preset("quickstart", ablation="random-features")


def _fake_experiment(root, supports, limit=100, ablation=None):
    exp = Experiment(root).create()
    preset = {"name": "quickstart", **({"ablation": ablation} if ablation else {})}
    exp.record_stage("preset", preset=preset)
    rows = [{"target_id": t, "method": m, "mode": "removal", "support": s, "limit": limit, "trainings": 10,
             "seconds": 1.0} for (t, m), s in supports.items()]
    pd.DataFrame(rows).to_parquet(exp.support)
    return exp


def test_compare_matches_the_per_experiment_summary(tmp_path):
    base = _fake_experiment(tmp_path / "base", {(1, "esvm"): 5, (2, "esvm"): 40, (3, "esvm"): -1,
                                                (1, "l2"): 9, (2, "l2"): 80, (3, "l2"): -1})
    ablated = _fake_experiment(tmp_path / "abl", {(1, "esvm"): 50, (2, "esvm"): -1, (3, "esvm"): -1},
                               ablation="all-class")
    table = compare_experiments([base.root, ablated.root], n_boot=200)
    assert list(dict.fromkeys(table["experiment"])) == ["quickstart", "quickstart [all-class]"]
    expected = M.support_summary(pd.read_parquet(base.support), 100, n_boot=200)
    mine = table[table["experiment"] == "quickstart"].reset_index(drop=True)
    np.testing.assert_allclose(mine["auc"], expected["auc"])
    esvm = table.set_index(["experiment", "method"])["auc"]
    assert esvm[("quickstart", "esvm")] > esvm[("quickstart [all-class]", "esvm")]  # smaller supports win
    md, csv = write_comparison([base.root, ablated.root], tmp_path / "cmp", n_boot=200)
    assert "quickstart [all-class]" in md.read_text() and (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    # the claims table, the first experiment as the base: same-class (5, 40, nf) vs all-class (50, nf, nf)
    claims = next(line for line in md.read_text().splitlines()
                  if line.startswith("| same-class candidates beat all-class candidates (ESVM) | removal |"))
    assert "| 3 | 35.3 [" in claims  # (45 + 61 + 0) / 3 with not found = 101
    assert "supervised-features" in md.read_text() and "not run: attribution run quickstart --ablation" in md.read_text()
    assert len(pd.read_csv(csv)) == 3
    with pytest.raises(FileNotFoundError, match="run the support stage"):
        compare_experiments([tmp_path / "empty"])
    with pytest.raises(ValueError, match="one label per experiment"):
        compare_experiments([base.root], labels=["a", "b"])


def test_submit_passes_the_ablation_to_the_job():
    from cluster.submit import entrypoint_command

    command = entrypoint_command("cifar10", "s3://b/x", ["data.root=/d"], ablation="all-class")
    args = build_parser().parse_args(command.split()[3:])  # drop "python -m cluster.cli"
    assert (args.preset, args.ablation, args.overrides) == ("cifar10", "all-class", ["data.root=/d"])
