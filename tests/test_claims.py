"""The report's claims table against hand-computed cases: the paired difference, its
direction, pairing by target id, the not-found convention, the verdicts, the "large
supports" subset, and rows whose ablation run is missing."""

import numpy as np
import pandas as pd
import pytest

from attribution import metrics as M
from attribution.artifacts import write_json, write_table
from attribution.experiment import Experiment
from attribution.report import find_ablation_runs, write_report

LIMIT = 100


def support_table(rows, method, mode="removal"):
    """(target_id, support) pairs -> a support table with the support stage's columns."""
    return pd.DataFrame({"target_id": [t for t, _ in rows], "method": method, "mode": mode,
                         "support": np.array([s for _, s in rows], np.int32), "limit": np.int32(LIMIT)})


# esvm needs fewer images than l2 on every target but one; target 9 is l2's only and
# target 10 esvm's only: neither may enter the pairing
ESVM = [(1, 3), (2, 5), (3, 10), (4, 20), (5, 40), (6, -1), (7, 8), (8, 50), (10, 1)]
L2 = [(1, 6), (2, 5), (3, 30), (4, 25), (5, 90), (6, -1), (7, -1), (8, 45), (9, 2)]
# B - A per paired target (not found = LIMIT + 1 = 101): 3, 0, 20, 5, 50, 0, 93, -5
DIFFS = np.array([3, 0, 20, 5, 50, 0, 93, -5], float)


def test_paired_difference_by_hand():
    a = M.censored_supports(support_table(ESVM, "esvm"), "esvm", "removal")
    b = M.censored_supports(support_table(L2, "l2"), "l2", "removal")
    assert a.loc[6] == LIMIT + 1 and b.loc[7] == LIMIT + 1  # not found counts as limit + 1
    result = M.paired_support_difference(a, b, n_boot=2000, seed=3)
    assert (result["n"], result["n_a"], result["n_b"]) == (8, 9, 9)  # targets 9 and 10 are not paired
    assert result["mean"] == pytest.approx(DIFFS.mean())
    assert (result["a_smaller"], result["ties"], result["b_smaller"]) == (5, 2, 1)
    assert result["low"] < result["mean"] < result["high"]
    assert (result["low"], result["high"]) == pytest.approx(M.bootstrap_ci(DIFFS, n_boot=2000, seed=3))
    assert result["low"] > 0 and result["verdict"] == "supported"
    # the same comparison the other way round: the sign and the verdict flip
    back = M.paired_support_difference(b, a, n_boot=2000, seed=3)
    assert back["mean"] == pytest.approx(-DIFFS.mean())
    assert (back["low"], back["high"]) == pytest.approx((-result["high"], -result["low"]), abs=1e-9)
    assert back["verdict"] == "contradicted"
    # same seed, same interval
    assert M.paired_support_difference(a, b, n_boot=2000, seed=3) == result


def test_pairing_is_by_target_id_not_by_position():
    a = M.censored_supports(support_table(ESVM, "esvm"), "esvm", "removal")
    shuffled = support_table(L2[::-1], "l2")  # another row order: the same pairs
    b = M.censored_supports(shuffled, "l2", "removal")
    assert M.paired_support_difference(a, b, n_boot=200)["mean"] == pytest.approx(DIFFS.mean())
    # the same supports on other target ids pair nothing
    moved = support_table([(t + 100, s) for t, s in L2], "l2")
    assert M.paired_support_difference(a, M.censored_supports(moved, "l2", "removal"), n_boot=200)["n"] == 0


def test_verdicts_and_the_large_support_subset():
    assert M.claim_verdict(0.5, 3.0, 10) == "supported"
    assert M.claim_verdict(-3.0, -0.5, 10) == "contradicted"
    assert M.claim_verdict(-1.0, 2.0, 10) == "inconclusive"
    assert M.claim_verdict(0.5, 3.0, M.MIN_PAIRED_TARGETS - 1) == "inconclusive"
    a = M.censored_supports(support_table(ESVM, "esvm"), "esvm", "removal")
    b = M.censored_supports(support_table(L2, "l2"), "l2", "removal")
    large = M.paired_support_difference(a, b, large=True, n_boot=200)
    # mean supports of the pairs 4.5, 5, 20, 22.5, 65, 101, 54.5, 47.5: median 35 -> targets 5, 6, 7, 8
    assert large["threshold"] == pytest.approx(35.0)
    assert large["n"] == 4 and large["mean"] == pytest.approx(np.mean([50, 0, 93, -5]))
    assert large["verdict"] == "inconclusive"  # 4 < MIN_PAIRED_TARGETS


def test_claims_table_rows_missing_runs_and_methods():
    base = pd.concat([support_table(ESVM, "esvm"), support_table(L2, "l2"),
                      support_table(ESVM, "esvm", "mislabel"), support_table(L2, "l2", "mislabel")])
    # the all-class run: ESVM supports larger by 7 on targets 1-8 -> same-class supported
    all_class = support_table([(t, min(s + 7, LIMIT) if s >= 0 else -1) for t, s in ESVM if t != 10], "esvm")
    table = M.claims_table(base, {"all-class": all_class, "supervised-features": None}, preset="quickstart",
                           n_boot=500)
    assert len(table) == len(M.CLAIMS)  # nothing dropped
    rows = table.set_index(["claim", "mode"])
    l2_removal = rows.loc[("ESVM finds smaller supports than l2", "removal")]
    assert l2_removal["n"] == 8 and l2_removal["mean"] == pytest.approx(DIFFS.mean())
    assert l2_removal["verdict"] == "supported"
    same_class = rows.loc[("same-class candidates beat all-class candidates (ESVM)", "removal")]
    assert same_class["a"] == "esvm" and same_class["b"] == "esvm [all-class]"
    # targets 1-5, 7, 8: +7 (target 8: 50 -> 57); target 6: both not found, a tie
    assert same_class["n"] == 8 and same_class["mean"] == pytest.approx(7 * 7 / 8)
    assert same_class["verdict"] == "supported"
    assert "different targets" in same_class["note"]  # the base has target 10, the run has not
    missing_mode = rows.loc[("same-class candidates beat all-class candidates (ESVM)", "mislabel")]
    assert missing_mode["status"].startswith("not searched: esvm in mislabel mode is not in the all-class run")
    supervised = rows.loc[("self-supervised features beat supervised features (ESVM)", "removal")]
    assert supervised["status"] == "not run: attribution run quickstart --ablation supervised-features"
    assert rows.loc[("ESVM finds smaller supports than TRAK (the paper: rivals it)", "removal")]["status"] \
        .startswith("not searched: trak")
    assert not rows.loc[("self-supervised features beat random-init features (ESVM)", "removal")]["status"] \
        .startswith("compared")


def test_the_report_opens_with_the_claims_table_and_finds_the_ablation_runs(tmp_path):
    import pyarrow as pa

    def experiment(folder, supports, ablation=None, base=None, stopped_by="max_steps"):
        exp = Experiment(tmp_path / folder).create()
        preset = {"name": "quickstart", "seed": 0, "data": {"dataset": "fashion-mnist"}}
        if ablation:
            preset["ablation"] = ablation
        manifest = {"preset": {"preset": preset},
                    "pretrain": {"stopped_by": stopped_by, "steps": 812, "settings": {"time_budget_s": 240}}}
        if base:
            manifest["base"] = {"root": str(base.root.resolve()), "location": str(base.root)}
        write_json(exp.manifest_path, manifest)
        write_table(pa.Table.from_pandas(supports, preserve_index=False), exp.support)
        return exp

    base = experiment("quickstart", pd.concat([support_table(ESVM, "esvm"), support_table(L2, "l2")]),
                      stopped_by="time_budget")
    # random-init features much worse on every target (a not-found stays not found)
    worse = support_table([(t, s * 2 if s >= 0 else -1) for t, s in ESVM], "esvm")
    run = experiment("elsewhere-named", worse, ablation="random-features", base=base)
    assert find_ablation_runs(base.root, ["random-features", "all-class"]) == \
        {"random-features": run.root, "all-class": None}
    md = write_report(base.root, n_boot=300, grid_targets=0)[0].read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Claims"
    line = next(x for x in md.splitlines() if x.startswith("| self-supervised features beat random-init features")
                and "| removal |" in x)
    assert "| esvm [random-features] | 9 |" in line and "**supported** at 95%" in line
    assert "not run: attribution run quickstart --ablation all-class" in md
    assert "stopped by its time cap (pretrain.time_budget_s = 240) after 812 steps" in md
    # the ablation's own report points to its base instead of a table of its own
    own = write_report(run.root, n_boot=50, grid_targets=0)[0].read_text()
    assert "is the `random-features` ablation of" in own and "| claim |" not in own
