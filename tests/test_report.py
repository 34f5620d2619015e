"""The report from small fixed tables in a temporary experiment directory: files,
valid non-trivial PNGs, tables in the Markdown, partial experiments, the command."""

import functools
import json

import numpy as np
import pyarrow.parquet as pq
import pandas as pd
import pytest
from PIL import Image

from attribution import metrics as M
from attribution.data import load_dataset
from attribution.experiment import Experiment
from attribution.artifacts import write_json, write_table
from attribution.report import ReportError, write_report
from conftest import real_data_or_none

METHODS = ["esvm", "l2", "random", "trak", "datamodels"]
VARIANTS = ["trak@m1", "trak@m20"]          # ranked variants (rankings + score blocks)
SCORE_ONLY = ["esvm@negative"]                # a score-only variant (blocks, no rankings)
TOP = 12
N_TARGETS = 8
LIMIT = 64
N_MODELS = 40
DM_NONZERO = 3  # datamodels: non-zero coefficients per target (target 0: none at all)

# Removal supports per target (mislabel: half, rounded down; not found stays -1). Chosen so
# that some claims have one sign on every target (a verdict a bootstrap cannot miss).
SUPPORTS = {"esvm": [2, 4, 8, 16, 3, 5, 40, 9], "l2": [4, 5, 16, 32, 6, -1, -1, 12],
            "random": [32, -1, -1, 64, -1, 50, -1, -1], "trak": [1, 8, 12, -1, 2, 20, 30, 10],
            "datamodels": [1, 2, 4, 8, 1, 2, 20, 4], "trak@m1": [6, 30, -1, -1, 9, 40, -1, 20],
            "trak@m20": [1, 2, 10, 50, 1, 8, 25, 6]}
# method_seconds of the trak stage (the cost contract): each variant's own compute
TRAK_SECONDS = {"trak": 900.0, "trak@m1": 200.0, "trak@m20": 3600.0}


def mislabel_support(s):
    return -1 if s < 0 else s // 2


@functools.cache
def fashion_mnist_or_none():
    """The real splits; None on a developer machine without them (a failure with CI set)."""
    return real_data_or_none(lambda: (load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")),
                             "Fashion-MNIST")


def fixture_ids():
    """(target ids, target labels, {target: same-class pool}, every training id).

    Real Fashion-MNIST ids when the dataset is installed (same-class pools for the
    similarity methods), so the image grid has real images to show; else plain ids."""
    if fashion_mnist_or_none() is not None:
        train, test = fashion_mnist_or_none()
        targets, labels = test.ids[:N_TARGETS], test.labels[:N_TARGETS]
        pools = {int(t): train.ids[train.labels == y][:200] for t, y in zip(targets, labels)}
        everything = train.ids[:2000]
    else:
        targets, labels = np.arange(60000, 60000 + N_TARGETS), np.arange(N_TARGETS) % 10
        pools = {int(t): np.arange(200) + 1000 * i for i, t in enumerate(targets)}
        everything = np.arange(2000)
    train_ids = np.unique(np.concatenate([everything, *pools.values()]))
    return np.asarray(targets, np.int64), np.asarray(labels, np.int64), pools, train_ids


def fixture_scores(method, targets, pools, train_ids, rng):
    """(values (targets x train), candidates or None) of one method, known by construction."""
    from attribution.methods import fill_outside

    values = np.zeros((len(targets), len(train_ids)), np.float32)
    base = method.split("@")[0]
    if base in ("esvm", "l2", "random"):
        candidates = np.stack([np.isin(train_ids, pools[int(t)]) for t in targets])
        values[candidates] = rng.normal(size=int(candidates.sum()))
        if method == "esvm@negative":  # same-class scores as esvm's, others negative and varied
            return values, candidates
        return fill_outside(values, candidates), candidates
    if base == "trak":
        return rng.normal(size=values.shape).astype(np.float32), None
    for row in range(1, len(targets)):  # datamodels: a sparse lasso; target 0 kept no coefficient
        values[row, rng.choice(len(train_ids), DM_NONZERO, replace=False)] = rng.uniform(0.5, 2.0, DM_NONZERO)
    return values, None


def make_experiment(root, *, support=True, trainings=True, dataset="fashion-mnist", data_root="", lds=False,
                    variants=True):
    """Score blocks, rankings derived from them, supports, trainings, manifest (and
    optionally LDS masks + margins) with fixed, known contents. Returns the experiment;
    ``exp.fixture`` holds what the tests compute by hand from: {method: (values,
    candidates)}, the ids, and the LDS masks / margins."""
    from attribution.methods.base import ScoreBlock
    from attribution.scores import ScoreStore, write_ranking

    rng = np.random.default_rng(0)
    exp = Experiment(root).create()
    targets, labels, pools, train_ids = fixture_ids()
    store = ScoreStore(exp.scores)
    ranked = METHODS + (VARIANTS if variants else [])
    everything = ranked + (SCORE_ONLY if variants else [])
    scores = {}
    for method in everything:
        values, candidates = fixture_scores(method, targets, pools, train_ids, rng)
        if method == "esvm@negative":
            esvm_values, esvm_candidates = scores["esvm"]
            values = np.where(esvm_candidates, esvm_values, -np.abs(values) - 1 - rng.random(values.shape)
                              ).astype(np.float32)
            candidates = esvm_candidates
        scores[method] = (values, candidates)
        block = ScoreBlock(method, targets, labels, train_ids, values, candidates)
        # the variant's parameters, as the rank stage stores them: the report builds the method from them
        settings = {"negative_influence": True, "same_class": True} if method == "esvm@negative" else {}
        store.write(block, "class000", settings={"fixture": True, **settings})
        if method in ranked:
            write_ranking(block, TOP, exp.rankings / f"{method}-class000.parquet", settings={"fixture": True})
    lds_data = None
    if lds:
        # held-out subset models of exactly half the images each; margins follow trak's
        # scores (the planted truth) plus noise, so trak's LDS is high and positive
        masks = np.zeros((N_MODELS, len(train_ids)), bool)
        for m in range(N_MODELS):
            masks[m, rng.choice(len(train_ids), len(train_ids) // 2, replace=False)] = True
        margins = masks.astype(np.float64) @ scores["trak"][0].astype(np.float64).T
        margins += rng.normal(scale=25.0, size=margins.shape)
        model, item = np.nonzero(masks)
        (exp.root / "lds").mkdir()
        pd.DataFrame({"model_id": model, "train_id": train_ids[item]}).to_parquet(exp.root / "lds" / "masks.parquet")
        mm, tt = np.meshgrid(np.arange(N_MODELS), np.arange(len(targets)), indexing="ij")
        pd.DataFrame({"model_id": mm.ravel(), "target_id": targets[tt.ravel()],
                      "margin": margins.ravel()}).to_parquet(exp.root / "lds" / "margins.parquet")
        lds_data = (masks, margins)
    if support:
        rows = [(int(t), m, mode, (s if mode == "removal" else mislabel_support(s)), 7, 1.5)
                for m, values in SUPPORTS.items() if m in ranked for mode in ("removal", "mislabel")
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
        "timing.trak": {"seconds": 900.0}, "timing.datamodels": {"seconds": 50.0},
        "rank": {"top_k": TOP, "methods": METHODS[:3]}, "support": {"limit": LIMIT, "num_tests": 2},
        "trak": {"settings": {"proj_dim": 64, "seed": 0},
                 **({"method_seconds": TRAK_SECONDS} if variants else {})},
    }
    write_json(exp.manifest_path, manifest)
    exp.fixture = {"scores": scores, "targets": targets, "train_ids": train_ids, "lds": lds_data}
    return exp


def section_of(md, heading):
    """The Markdown between ``heading`` (a whole line) and the next heading of its level or above."""
    lines = md.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
    return "\n".join(lines[start + 1:end])


def md_tables(text):
    """Every Markdown table of ``text`` as a DataFrame of strings (header row = columns)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif current:
            header, body = current[0], [r for r in current[2:]]
            tables.append(pd.DataFrame(body, columns=header))
            current = []
    return tables


def number(cell):
    """The leading number of a cell: "0.734 [0.61, 0.80]" -> 0.734, "7/8" -> 7; None for "–"."""
    cell = cell.strip()
    if cell in ("–", "-", ""):
        return None
    return float(cell.split()[0].split("/")[0])


def interval(cell):
    """"0.734 [0.610, 0.800]" -> (0.734, 0.61, 0.8)."""
    mean, rest = cell.split(" [")
    low, high = rest.rstrip("]").split(", ")
    return float(mean), float(low), float(high)


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
    for method in METHODS + VARIANTS:
        assert f"| {method} |" in md
    assert "| method | mode | found | median_support | AUC |" in md
    assert "A smaller" in md and "mean Jaccard" in md and "Retraining log" in md
    assert "(limit from manifest support.limit)" in md
    # costs: esvm = pretrain + embed + rank; trak and its variants from the trak stage's method_seconds
    assert "| esvm | 4.7 min | pretrain 240.0 s + embed 30.0 s + rank 12.0 s |" in md
    assert "| trak | 15.0 min | trak 900.0 s |  |" in md  # stage recorded: no ">=" though its files are missing
    assert "| trak@m1 | 3.3 min | trak 200.0 s |" in md and "| trak@m20 | 60.0 min | trak 3600.0 s |" in md
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
                        "### Per-target comparisons", "## Overlap between methods", "## Score vectors and ties",
                        "## Linear datamodeling score (LDS)", "## Cost of producing the attributions",
                        "## Quality against compute (the frontier)",
                        "## Retraining log", "## Top-ranked training images"]
    for name in ("support_curves", "support_scatter", "frontier"):
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


# ----------------------------------------------------------------------------- numbers against hand-made tables


def hand_supports(method, mode):
    values = SUPPORTS[method]
    return np.array(values if mode == "removal" else [mislabel_support(s) for s in values])


def rank_lists(exp):
    """{(method, target): train ids in rank order}, read from the ranking files by hand."""
    table = pd.concat(pd.read_parquet(p) for p in sorted(exp.rankings.glob("*.parquet")))
    return {(m, int(t)): g.sort_values("rank")["train_id"].tolist() for (m, t), g in table.groupby(["method", "target_id"])}


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    exp = make_experiment(tmp_path_factory.mktemp("hand") / "exp", lds=True, trainings=False)
    md = write_report(exp.root, n_boot=500, seed=0, grid_targets=0)[0].read_text()
    return exp, md


def test_support_table_numbers_match_hand_computation(reported):
    exp, md = reported
    table = md_tables(section_of(md, "## Data support"))[0]
    assert len(table) == 2 * len(SUPPORTS)
    for row in table.itertuples():
        s = hand_supports(row.method, row.mode)
        found = s[s >= 0]
        assert row.found == f"{len(found)}/{len(s)}"
        assert number(row.median_support) == pytest.approx(float(np.median(found)), abs=0.05)
        auc = sum(1 - v / LIMIT for v in found) / len(s)  # area under the step curve, by hand
        mean, low, high = interval(row.AUC)
        assert mean == pytest.approx(auc, abs=5e-4) and low <= mean <= high


def test_win_rates_are_a_smaller_not_loss_rates(reported):
    exp, md = reported
    table = md_tables(section_of(md, "### Per-target comparisons"))[0]
    checked = 0
    for row in table.itertuples():
        a, b = hand_supports(row.A, row.mode), hand_supports(row.B, row.mode)
        inf_a, inf_b = np.where(a < 0, np.inf, a), np.where(b < 0, np.inf, b)
        wins, ties, losses = (inf_a < inf_b).mean(), (inf_a == inf_b).mean(), (inf_a > inf_b).mean()
        assert int(row.targets) == N_TARGETS
        assert interval(row._5)[0] == pytest.approx(wins, abs=5e-4)  # "A smaller"
        assert number(row.tie) == pytest.approx(ties, abs=5e-4)
        assert number(row._7) == pytest.approx(losses, abs=5e-4)  # "B smaller"
        checked += wins != losses
    assert checked >= 10  # asymmetric pairs: printing loss rates as win rates would fail


def test_jaccard_tables_are_jaccard_not_distance(reported):
    exp, md = reported
    lists = rank_lists(exp)
    section = section_of(md, "## Overlap between methods")
    topk, supports = md_tables(section)
    targets = [int(t) for t in exp.fixture["targets"]]
    for row in topk.itertuples():
        k = int(row.k)
        values = [len(set(lists[(row.A, t)][:k]) & set(lists[(row.B, t)][:k]))
                  / len(set(lists[(row.A, t)][:k]) | set(lists[(row.B, t)][:k])) for t in targets]
        assert interval(row._5)[0] == pytest.approx(np.mean(values), abs=5e-4)
    row = topk[(topk.A == "esvm") & (topk.B == "l2") & (topk.k == "10")].iloc[0]
    assert interval(row["mean Jaccard"])[0] < 0.5  # two random same-class rankings: small overlap, not 1 - J
    for row in supports.itertuples():
        a, b = hand_supports(row.A, row.mode), hand_supports(row.B, row.mode)
        values = [len(set(lists[(row.A, t)][:sa]) & set(lists[(row.B, t)][:sb]))
                  / max(1, len(set(lists[(row.A, t)][:sa]) | set(lists[(row.B, t)][:sb])))
                  if sa or sb else 1.0 for t, sa, sb in zip(targets, a, b) if sa >= 0 and sb >= 0]
        assert int(row.targets) == len(values)
        assert interval(row._5)[0] == pytest.approx(np.mean(values), abs=5e-4)


def test_lds_from_full_scores_matches_scipy_and_keeps_its_sign(reported):
    from scipy.stats import spearmanr

    exp, md = reported
    masks, margins = exp.fixture["lds"]
    table = md_tables(section_of(md, "## Linear datamodeling score (LDS)"))[0]
    expected = {}
    for method, (values, _) in exp.fixture["scores"].items():
        predicted = masks.astype(np.float64) @ values.astype(np.float64).T
        rho = [0.0 if np.ptp(predicted[:, j]) == 0 else spearmanr(predicted[:, j], margins[:, j]).statistic
               for j in range(N_TARGETS)]
        expected[method] = np.mean(rho)
    assert set(table["method"]) == set(expected)  # every method and variant with score blocks, esvm@negative too
    for row in table.itertuples():
        mean, low, high = interval(row.LDS)
        assert mean == pytest.approx(expected[row.method], abs=5e-4), row.method
        assert int(row.targets) == N_TARGETS and low <= mean <= high
    assert expected["trak"] > 0.5  # the planted truth: a negated LDS would fail
    assert table.set_index("method").loc["datamodels", "constant"] == "1"  # target 0 kept no coefficient
    assert "esvm@negative beside esvm: LDS" in md


def test_ties_and_non_zero_scores_per_method(reported):
    exp, md = reported
    section = section_of(md, "## Score vectors and ties")
    table = md_tables(section)[0].set_index("method")
    ranks = pd.concat(pd.read_parquet(p) for p in sorted(exp.rankings.glob("*.parquet")))
    for method, (values, candidates) in exp.fixture["scores"].items():
        inside = np.ones(values.shape, bool) if candidates is None else candidates
        nonzero = ((values != 0) & inside).sum(axis=1)
        assert number(table.loc[method, "non-zero (median)"]) == pytest.approx(np.median(nonzero), abs=0.5)
        assert number(table.loc[method, "non-zero (min)"]) == nonzero.min()
        if method in SCORE_ONLY:
            assert table.loc[method, "tied (median)"] == "–"
            continue
        tied = [np.mean(g.sort_values("rank")["score"].to_numpy()[:-1] == g.sort_values("rank")["score"].to_numpy()[1:])
                for _, g in ranks[ranks.method == method].groupby("target_id")]
        assert number(table.loc[method, "tied (median)"]) == pytest.approx(np.median(tied), abs=5e-4)
    # datamodels: 3 non-zero coefficients, then 9 zeros in id order: mostly ties, said in words
    assert number(table.loc["datamodels", "tied (median)"]) == pytest.approx(8 / 11, abs=5e-4)
    assert "**warning**: datamodels's rankings are mostly ties: it has a median of 3 non-zero scores" in section
    assert "**warning**: trak's" not in section and "**warning**: esvm's" not in section
    # how each method scores outside its candidates: declared by the class, observed in the blocks
    assert table.loc["esvm", "declared"] == "class-restricted, outside = min"
    assert table.loc["esvm", "outside the candidates (observed)"].startswith("min")
    assert table.loc["trak", "outside the candidates (observed)"].startswith("none outside")
    assert table.loc["esvm@negative", "outside the candidates (observed)"].startswith("own scores")
    assert table.loc["esvm@negative", "declared"] == "class-restricted, outside = negative"
    assert table.loc["trak", "declared"] == "all classes, outside = none"


def test_claims_numbers_and_verdicts_match_hand_computation(reported):
    exp, md = reported
    table = md_tables(section_of(md, "## Claims"))[0]
    compared = table[table.n != "–"]
    assert len(compared) == 10  # esvm vs l2 (all, large), random, trak, datamodels, in two modes
    for row in compared.itertuples():
        a, b = hand_supports(row.A, row.mode), hand_supports(row.B, row.mode)
        d = np.where(b < 0, LIMIT + 1, b) - np.where(a < 0, LIMIT + 1, a)
        if "large supports" in row.claim:
            level = (np.where(a < 0, LIMIT + 1, a) + np.where(b < 0, LIMIT + 1, b)) / 2
            d = d[level >= np.median(level)]
        assert int(row.n) == len(d)
        assert interval(row._6)[0] == pytest.approx(d.mean(), abs=0.0501)  # printed to 0.1
        assert row._7 == f"{(d > 0).sum()}/{(d == 0).sum()}/{(d < 0).sum()}"
        if len(d) < M.MIN_PAIRED_TARGETS:  # too few paired targets for any verdict
            assert row.verdict == "**inconclusive** at 95%"
        elif (d > 0).all():
            assert row.verdict == "**supported** at 95%"
        elif (d < 0).all():
            assert row.verdict == "**contradicted** at 95%"
    verdicts = dict(zip(zip(compared.B, compared["mode"], compared.claim.str.contains("large")), compared.verdict))
    assert verdicts[("random", "removal", False)] == "**supported** at 95%"
    assert verdicts[("datamodels", "removal", False)] == "**contradicted** at 95%"


def test_frontier_table_and_plot_with_variants(reported):
    exp, md = reported
    section = section_of(md, "## Quality against compute (the frontier)")
    table = md_tables(section)[0].set_index("method")
    support = md_tables(section_of(md, "## Data support"))[0]
    lds = md_tables(section_of(md, "## Linear datamodeling score (LDS)"))[0].set_index("method")
    assert list(table.index) == ["esvm", "esvm@negative", "l2", "random", "trak", "trak@m1", "trak@m20",
                                 "datamodels"]
    assert table.loc["trak@m1", "compute"] == "3.3 min" and table.loc["trak@m20", "compute"] == "60.0 min"
    assert table.loc["trak", "compute"] == "15.0 min" and table.loc["esvm", "compute"] == "4.7 min"
    for method in SUPPORTS:
        for mode, column in (("removal", "removal support AUC"), ("mislabel", "mislabel support AUC")):
            hit = support[(support.method == method) & (support["mode"] == mode)].iloc[0]
            assert table.loc[method, column] == hit.AUC
        assert table.loc[method, "LDS"] == lds.loc[method, "LDS"]
    # the score-only variant has an LDS but no support: listed, not dropped
    assert table.loc["esvm@negative", "removal support AUC"] == "–"
    assert table.loc["esvm@negative", "missing"] == "removal, mislabel"
    assert "without removal support AUC (not on that panel): esvm@negative" in section
    assert "report_files/frontier.png" in md
    png = exp.root / "report_files" / "frontier.png"
    assert_png_has_content(png)
    with Image.open(png) as image:
        assert image.width > 2.5 * image.height  # three panels side by side


def test_frontier_lists_methods_without_compute(tmp_path):
    exp = make_experiment(tmp_path / "exp", trainings=False)
    manifest = json.loads(exp.manifest_path.read_text())
    del manifest["timing.datamodels"]
    write_json(exp.manifest_path, manifest)
    md = write_report(exp.root, n_boot=50, grid_targets=0)[0].read_text()
    section = section_of(md, "## Quality against compute (the frontier)")
    table = md_tables(section)[0].set_index("method")
    assert table.loc["datamodels", "compute"] == "missing" and "compute" in table.loc["datamodels", "missing"]
    assert "without compute seconds (not on any panel): datamodels" in section
    assert "without LDS (not on that panel): esvm, esvm@negative, l2, random, trak, trak@m1, trak@m20, datamodels" \
        in section  # no LDS models in this experiment


def test_report_without_score_blocks_says_so(tmp_path):
    import shutil

    exp = make_experiment(tmp_path / "exp", trainings=False, lds=True)
    shutil.rmtree(exp.scores)
    md = write_report(exp.root, n_boot=50, grid_targets=0)[0].read_text()
    assert "scores/ (full score vectors: LDS, non-zero scores, outside policies): `attribution rank --exp EXP`" in md
    lds = section_of(md, "## Linear datamodeling score (LDS)")
    assert lds.startswith("\nNot available: needs the full score vectors") and "| method |" not in lds


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
    with pytest.raises(SettingsError, match=r"unknown \[report\] setting\(s\) \['lds_fill'\]"):
        parse_settings({"report": {"lds_fill": "min"}})  # LDS reads the full score vectors: no fill to choose
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
    assert ("| esvm | removal | 8/8 |" in md) == (keep == "support.parquet")
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
