"""The report from small fixed tables in a temporary experiment directory: files,
valid non-trivial PNGs, tables in the Markdown, partial experiments, the command."""

import functools
import json

import numpy as np
import pyarrow.parquet as pq
import pandas as pd
import pytest
from PIL import Image

from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.artifacts import write_json, write_table
from attribution.report import ReportError, write_report
from conftest import real_data_or_none

METHODS = ["esvm", "l2", "random", "trak"]
TOP = 12
N_TARGETS = 8
LIMIT = 64


@functools.cache
def fashion_mnist_or_none():
    """The real splits; None on a developer machine without them (a failure with CI set)."""
    return real_data_or_none(lambda: (load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")),
                             "Fashion-MNIST")


def make_experiment(root, *, support=True, trainings=True, dataset="fashion-mnist", data_root=""):
    """Rankings, support, trainings and manifest with fixed, known contents.

    Ids are real Fashion-MNIST ids when the dataset is installed (same-class training
    ids for the similarity methods, any class for trak), so the image grid has real
    images to show; otherwise plain integer ids.
    """
    rng = np.random.default_rng(0)
    exp = Experiment(root).create()
    if fashion_mnist_or_none() is not None:
        train, test = fashion_mnist_or_none()
        targets = test.ids[:N_TARGETS]
        target_labels = test.labels[:N_TARGETS]
        pools = {int(t): train.ids[train.labels == y][:200] for t, y in zip(targets, target_labels)}
        everything = train.ids[:2000]
    else:
        targets = np.arange(60000, 60000 + N_TARGETS)
        pools = {int(t): np.arange(200) + 1000 * i for i, t in enumerate(targets)}
        everything = np.arange(2000)
    for method in METHODS:
        rows = []
        for t in targets:
            pool = everything if method == "trak" else pools[int(t)]
            ids = rng.choice(pool, size=TOP, replace=False)
            for r, tid in enumerate(ids):
                rows.append((int(t), method, r, int(tid), float(TOP - r) - 0.5))
        df = pd.DataFrame(rows, columns=["target_id", "method", "rank", "train_id", "score"])
        df["rank"] = df["rank"].astype("int32")
        df["score"] = df["score"].astype("float32")
        import pyarrow as pa

        write_table(pa.Table.from_pandas(df, preserve_index=False), exp.rankings / f"{method}-class000.parquet")
    if support:
        fixed = {"esvm": [2, 4, 8, 16, 3, 5, -1, 9], "l2": [4, 4, 16, 32, 6, -1, -1, 9],
                 "random": [32, -1, -1, 64, -1, 50, -1, -1], "trak": [1, 8, 12, -1, 2, 20, 30, 10]}
        rows = [(int(t), m, mode, (s if mode == "removal" else max(-1, s // 2)), 7, 1.5)
                for m, values in fixed.items() for mode in ("removal", "mislabel")
                for t, s in zip(targets, values)]
        sup = pd.DataFrame(rows, columns=["target_id", "method", "mode", "support", "trainings", "seconds"])
        sup.to_parquet(exp.support)
    if trainings:
        rows = [(int(t), "esvm", "removal", k, seed, k < 8, 1.0 - k / 8, 0.7)
                for t in targets for k in (0, 8, 4) for seed in range(2)]
        tr = pd.DataFrame(rows, columns=["target_id", "method", "mode", "k", "seed", "correct", "margin", "seconds"])
        exp.trainings.mkdir(exist_ok=True)
        tr.to_parquet(exp.trainings / "part-00000.parquet")
    (exp.checkpoints).mkdir(exist_ok=True)
    (exp.checkpoints / "moco.pt").write_bytes(b"\0" * 4096)
    exp.embeddings.mkdir(exist_ok=True)
    (exp.embeddings / "train-00000.parquet").write_bytes(b"\0" * 2048)
    manifest = {
        "preset": {"preset": {"name": "tiny", "seed": 0, "data": {
            "dataset": dataset, "root": data_root, "train_per_class": 200, "test_per_class": 10, "seed": 0}}},
        "timing.pretrain": {"seconds": 240.0}, "timing.embed": {"seconds": 30.0}, "timing.rank": {"seconds": 12.0},
        "timing.trak": {"seconds": 900.0},
        "rank": {"top_k": TOP, "methods": METHODS[:3]}, "support": {"limit": LIMIT, "num_tests": 2},
        "trak": {"settings": {"proj_dim": 64, "seed": 0}},
    }
    write_json(exp.manifest_path, manifest)
    return exp


def assert_png_has_content(path, min_side=200):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert min(pixels.shape[:2]) >= min_side
    # not blank: many distinct colours and real variation across the picture
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert pixels.std() > 10


def test_full_report_files_tables_and_plots(tmp_path):
    exp = make_experiment(tmp_path / "exp")
    md_path, html_path = write_report(exp.root, n_boot=200, seed=0)
    assert md_path == exp.root / "report.md" and html_path.exists()
    md = md_path.read_text()
    for method in METHODS:
        assert f"| {method} |" in md
    # the AUC table with hand-checkable values: esvm removal AUC over limit 64
    esvm = np.array([2, 4, 8, 16, 3, 5, -1, 9])
    expected = np.mean(np.where(esvm >= 0, 1 - esvm / LIMIT, 0))
    assert "| method | mode | found | median_support | AUC |" in md
    assert f"| esvm | removal | 7/8 | 5.0 | {expected:.3f} [" in md
    assert "A smaller" in md and "mean Jaccard" in md and "Retraining log" in md
    assert "(limit from manifest support.limit)" in md
    # costs: esvm = pretrain + embed + rank; datamodels-free experiment; trak storage missing
    assert "| esvm | 4.7 min | pretrain 240.0 s + embed 30.0 s + rank 12.0 s |" in md
    assert "| trak | 15.0 min | trak 900.0 s |  |" in md  # stage recorded: no ">=" though its files are missing
    assert "trak/checkpoints" in md
    # rankings hold 12 items: the k=100 overlap row would duplicate k=12 and is left out
    assert "| esvm | l2 | 10 | 8 |" in md and "| esvm | l2 | 100 |" not in md
    # LDS missing and said so, with the stage that writes it
    assert "LDS masks and margins" in md and "`attribution datamodels --exp EXP`" in md
    # the stages' settings, for every stage of the registry that recorded some
    assert "- rank settings: top_k=12" in md and "- trak settings: proj_dim=64, seed=0" in md
    headings = [line for line in md.splitlines() if line.startswith("#")]
    assert headings == ["# Attribution report: tiny", "## Claims", "## Experiment", "## Not yet available",
                        "## Data support",
                        "### Per-target comparisons", "## Overlap between methods",
                        "## Linear datamodeling score (LDS)", "## Cost of producing the attributions",
                        "## Retraining log", "## Top-ranked training images"]
    for name in ("support_curves", "support_scatter", "quality_vs_cost"):
        png = exp.root / "report_files" / f"{name}.png"
        assert f"report_files/{name}.png" in md
        assert_png_has_content(png)
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<table>" in html
    assert not list(exp.root.rglob(".*.tmp"))  # atomic writes left no temporaries
    if fashion_mnist_or_none() is not None:
        assert_png_has_content(exp.root / "report_files" / "top_ranked.png")
        assert "Image grid skipped" not in md
    else:
        assert "Image grid skipped" in md


def test_report_from_rankings_only_names_missing_commands(tmp_path):
    exp = make_experiment(tmp_path / "exp", support=False, trainings=False)
    md_path, _ = write_report(exp.root, n_boot=50, grid_targets=2, grid_top=4)
    md = md_path.read_text()
    assert "No support table yet: run `attribution support --exp EXP`" in md
    assert "support.parquet" in md and "Not yet available" in md
    assert "mean Jaccard" in md
    assert not (exp.root / "report_files" / "support_curves.png").exists()


def test_report_with_unavailable_dataset_skips_grid_without_crashing(tmp_path):
    exp = make_experiment(tmp_path / "exp", dataset="cifar10", data_root=str(tmp_path / "no-cifar"))
    md = write_report(exp.root, n_boot=50)[0].read_text()
    assert "Image grid skipped" in md and "DatasetNotFoundError" in md
    assert "| esvm | removal |" in md  # the rest of the report is intact


def test_report_with_lds_data(tmp_path):
    exp = make_experiment(tmp_path / "exp", trainings=False)
    ranks = pd.concat(pd.read_parquet(p) for p in sorted(exp.rankings.glob("*.parquet")))
    train_ids = np.unique(ranks["train_id"])
    targets = np.unique(ranks["target_id"])
    rng = np.random.default_rng(1)
    masks = rng.random((40, len(train_ids))) < 0.5
    model, item = np.nonzero(masks)
    (exp.root / "lds").mkdir()
    pd.DataFrame({"model_id": model, "train_id": train_ids[item]}).to_parquet(exp.root / "lds" / "masks.parquet")
    mm, tt = np.meshgrid(np.arange(40), np.arange(len(targets)), indexing="ij")
    pd.DataFrame({"model_id": mm.ravel(), "target_id": targets[tt.ravel()],
                  "margin": rng.normal(size=mm.size)}).to_parquet(exp.root / "lds" / "margins.parquet")
    md = write_report(exp.root, n_boot=50)[0].read_text()
    assert "Spearman correlation over 40 subset models" in md
    section = md.split("## Linear datamodeling score")[1].split("## ")[0]
    for method in METHODS:
        assert f"| {method} | 8 |" in section


def test_empty_experiment_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no tables to report on"):
        write_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "absent")


def test_report_stage_reads_the_report_section_and_records_itself(tmp_path):
    from attribution.settings import SettingsError
    from attribution.stages import parse_settings, producer_of, stage_class
    from attribution.stages.report import ReportStage

    exp = make_experiment(tmp_path / "exp", support=False, trainings=False)
    assert stage_class("report") is ReportStage and producer_of("report") == "report"
    settings = parse_settings({"report": {"n_boot": 20, "grid_targets": 0}})
    summary = ReportStage(exp, settings)()  # no runtime: the report never starts Ray
    md = (exp.root / "report.md").read_text()
    assert summary["markdown"] == str(exp.root / "report.md") and summary["html"] == str(exp.root / "report.html")
    assert "Image grid disabled" in md and "(20 resamples, seed 0)" in md
    recorded = exp.manifest()["report"]
    assert recorded["settings"]["n_boot"] == 20 and recorded["settings"]["jaccard_ks"] == [10, 100]
    ReportStage(exp, settings)()  # the manifest now has a report section: not listed among the stages' settings
    assert "- report settings" not in (exp.root / "report.md").read_text()
    with pytest.raises(SettingsError, match=r"unknown \[report\] setting\(s\) \['nboot'\]"):
        parse_settings({"report": {"nboot": 20}})
    with pytest.raises(SettingsError, match="report.lds_fill must be a number or 'min', got 'max'"):
        parse_settings({"report": {"lds_fill": "max"}})
    with pytest.raises(SettingsError, match="report.n_boot must be an integer >= 1, got 'abc'"):
        parse_settings({"report": {"n_boot": "abc"}})
    (tmp_path / "empty").mkdir()
    from attribution.stages import StageInputMissing

    with pytest.raises(StageInputMissing, match="no tables to report on"):
        ReportStage(tmp_path / "empty", settings)()


def test_report_flags_set_report_settings():
    from attribution.stages.report import ReportSettings, ReportStage

    flags = {flag.name: flag for flag in ReportStage.flags}
    assert set(flags) == {"--n-boot", "--seed", "--grid-targets", "--grid-top"}
    for flag in flags.values():
        section, key = flag.setting.split(".")
        assert section == ReportSettings.section == "report" and key in ReportSettings.__dataclass_fields__
        assert flag.type is int and flag.option is None
    assert ReportStage.reads == () and ReportStage.writes == ("report",)


def test_report_command_prints_paths(tmp_path, capsys):
    from cluster.cli import main

    exp = make_experiment(tmp_path / "exp", support=False)
    assert main(["report", str(exp.root), "--n-boot", "50", "--grid-targets", "1"]) == 0
    out = capsys.readouterr().out
    assert str(exp.root / "report.md") in out and str(exp.root / "report.html") in out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no tables to report on" in capsys.readouterr().err


def test_report_survives_an_unreadable_table_and_widens_a_too_small_limit(tmp_path):
    exp = make_experiment(tmp_path / "exp", trainings=False)
    manifest = json.loads(exp.manifest_path.read_text())
    del manifest["support"]  # the limit now comes from rank.top_k = 12, below found supports (up to 64)
    write_json(exp.manifest_path, manifest)
    exp.trainings.mkdir()
    (exp.trainings / "part-00000.parquet").write_bytes(b"not parquet")
    md = write_report(exp.root, n_boot=50, grid_targets=0)[0].read_text()
    assert "trainings could not be read" in md and "attribution support --exp EXP" in md
    assert "the largest found support, which exceeds the recorded limit (manifest rank.top_k)" in md
    assert "over k in [0, 64]" in md
    assert "Image grid disabled" in md


@pytest.mark.parametrize("keep", ["support.parquet", "trainings"])
def test_report_without_rankings(tmp_path, keep):
    exp = make_experiment(tmp_path / "exp")
    import shutil

    shutil.rmtree(exp.rankings)
    if keep == "trainings":
        exp.support.unlink()
    md = write_report(exp.root, n_boot=50)[0].read_text()
    assert "No rankings yet: run `attribution rank --exp EXP`" in md
    assert ("| esvm | removal | 7/8 |" in md) == (keep == "support.parquet")
    assert "Retraining log" in md


def test_report_with_an_empty_support_table_says_why(tmp_path):
    """Every target screened out: the support section says so instead of failing."""
    exp = make_experiment(tmp_path / "exp")
    table = pq.read_table(exp.support)
    pq.write_table(table.slice(0, 0), exp.support)
    md, _ = write_report(exp.root, n_boot=50)
    text = md.read_text()
    assert "The support table has no searches: every selected target was screened out" in text
    assert "Per-target comparisons" not in text
