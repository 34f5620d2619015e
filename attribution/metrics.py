"""Metrics of attribution rankings, computed from the stored tables alone.

Nothing here retrains or re-ranks: every function takes the tables the stages wrote
(EXP/rankings, EXP/support.parquet, EXP/manifest.json, the LDS masks and margins) as
pandas frames or numpy arrays and returns numbers. Conventions:

- A support of ``NOT_FOUND`` (-1) means "the target did not flip even with the whole
  top-k changed": it counts as larger than every found support (as infinity).
- Smaller supports are better (fewer training images explain the prediction), so a
  *higher* support curve and a *higher* AUC are better.
- Figures that are means over targets come with a seeded percentile bootstrap
  interval over targets (:func:`bootstrap_ci`): the targets are a random sample of the
  test set, and that sampling is the main source of uncertainty in these tables.
- Methods appear in the method registry's order (:func:`attribution.methods.order_methods`);
  what a method costs is what its class declares (``cost``, a :class:`CostSpec`).

Adding a metric: one function here (tables in, a DataFrame out) and one section
function in :mod:`attribution.report` that renders it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from attribution.methods import CostSpec, available_methods, method_class, order_methods

NOT_FOUND = -1
MODES = ("removal", "mislabel")


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0, statistic: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of per-target values.

    Resamples the targets with replacement ``n_boot`` times (seeded) and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the statistic.
    ``statistic`` maps an (n_boot, n) array to n_boot values (default: the mean over
    axis 1). NaN values are dropped first; with no values the interval is (nan, nan),
    with one value it is that value (a bootstrap cannot show spread it never saw).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    statistic = statistic or (lambda sample: sample.mean(axis=1))
    rng = np.random.default_rng(seed)
    stats = []
    # Chunks bound the memory of the (n_boot, n) index array for large target sets.
    chunk = max(1, min(n_boot, 2_000_000 // len(values)))
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, len(values), size=(min(chunk, n_boot - start), len(values)))
        stats.append(np.asarray(statistic(values[idx]), dtype=np.float64))
    stats = np.concatenate(stats)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


def _mean_with_ci(values, n_boot, confidence, seed) -> dict:
    values = np.asarray(values, dtype=np.float64)
    valid = values[~np.isnan(values)]
    mean = float(valid.mean()) if len(valid) else float("nan")
    low, high = bootstrap_ci(valid, n_boot=n_boot, confidence=confidence, seed=seed)
    return {"mean": mean, "low": low, "high": high}


# ----------------------------------------------------------------------------- support curves


def _supports(supports) -> np.ndarray:
    s = np.asarray(supports)
    if s.size and not np.issubdtype(s.dtype, np.integer):
        if not np.all(np.equal(np.mod(s, 1), 0)):
            raise ValueError("supports must be integers (training-set sizes), with -1 for not found")
    s = s.astype(np.int64)
    if s.size and s.min() < NOT_FOUND:
        raise ValueError(f"supports must be >= 0 or {NOT_FOUND} (not found); got {int(s.min())}")
    return s


def support_curve(supports, ks) -> np.ndarray:
    """Fraction of targets whose support is <= k, for each k in ``ks``.

    F(k) = (1/n) * #{i : 0 <= s_i <= k}. Not-found targets (-1) never count, so the
    curve tops out at the fraction found. Higher is better.
    """
    s = _supports(supports)
    ks = np.asarray(ks, dtype=np.float64)
    if len(s) == 0:
        return np.full(ks.shape, np.nan)
    found = np.sort(s[s >= 0])
    return np.searchsorted(found, ks, side="right") / len(s)


def support_curves(support_df: pd.DataFrame, ks) -> pd.DataFrame:
    """Long table of :func:`support_curve` per (method, mode): method, mode, k, fraction."""
    _require(support_df, ("method", "mode", "support"), "support table")
    ks = np.asarray(ks)
    parts = []
    for method in order_methods(support_df["method"].unique()):
        for mode in modes_of(support_df):
            s = support_df.loc[(support_df["method"] == method) & (support_df["mode"] == mode), "support"]
            if len(s):
                parts.append(pd.DataFrame({"method": method, "mode": mode, "k": ks,
                                           "fraction": support_curve(s.to_numpy(), ks)}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["method", "mode", "k", "fraction"])


def per_target_auc(supports, limit: int) -> np.ndarray:
    """Each target's contribution to the normalised support AUC.

    The support curve F is a step function, so its area has a closed form:
    (1/L) * integral_0^L F(k) dk = (1/n) * sum_i a_i with a_i = 1 - s_i / L for a found
    support s_i and a_i = 0 for not found. The AUC is the mean of these a_i, which is
    what makes it bootstrappable over targets.
    """
    if limit is None or limit <= 0:
        raise ValueError(f"limit (the largest k the support stage tried) must be positive, got {limit}")
    s = _supports(supports)
    if len(s) and s.max() > limit:
        raise ValueError(
            f"a support ({int(s.max())}) exceeds the limit {limit}; pass the top-k limit the support "
            "stage used (manifest 'support' section)")
    return np.where(s >= 0, 1.0 - s / float(limit), 0.0)


def support_auc(supports, limit: int) -> float:
    """Normalised area under the support curve over k in [0, limit]; in [0, 1], higher is better.

    1 means every target flips with 0 images changed, 0 means none flips within the limit.
    """
    a = per_target_auc(supports, limit)
    return float(a.mean()) if len(a) else float("nan")


def support_limit(manifest: dict, support_df: pd.DataFrame | None = None) -> tuple[int | None, str]:
    """The largest k the support stage tried, and where that number came from.

    In order: the support table's ``limit`` column (the support stage writes each
    search's limit, top_k capped by the ranking's length; the largest is the range
    every search could cover), the manifest's support section (``limit``, ``max_k``,
    ``top_k``, also under its ``settings``), the rank section's ``top_k`` (rankings are
    only that long), then the largest found support (a lower bound, said so).
    """
    if support_df is not None and "limit" in support_df.columns and len(support_df):
        value = pd.to_numeric(support_df["limit"], errors="coerce").max()
        if _number(value) and value > 0:
            return int(value), "the support table's limit column"
    support = manifest.get("support") or {}
    candidates = [("support", support), ("support.settings", support.get("settings") or {}),
                  ("rank", manifest.get("rank") or {})]
    for name, entry in candidates:
        for key in (("top_k",) if name == "rank" else ("limit", "max_k", "top_k", "k_max")):
            if _number(entry.get(key)) and entry[key] > 0:
                return int(entry[key]), f"manifest {name}.{key}"
    if support_df is not None and len(support_df) and (support_df["support"] >= 0).any():
        return int(support_df["support"].max()), "largest found support (no limit recorded in the manifest)"
    return None, "unknown"


def support_summary(support_df: pd.DataFrame, limit: int, *, n_boot: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """One row per (method, mode): targets, found, median found support, AUC with CI, cost.

    Columns: method, mode, n_targets, n_found, found_rate, median_support (found
    targets only), auc, auc_low, auc_high, trainings, seconds (the retraining cost of
    the evaluation itself, summed from the support table when it has those columns).
    """
    _require(support_df, ("target_id", "method", "mode", "support"), "support table")
    rows = []
    for method in order_methods(support_df["method"].unique()):
        for mode in modes_of(support_df):
            part = support_df[(support_df["method"] == method) & (support_df["mode"] == mode)]
            if part.empty:
                continue
            s = part["support"].to_numpy()
            found = s[s >= 0]
            ci = _mean_with_ci(per_target_auc(s, limit), n_boot, confidence, seed)
            rows.append({
                "method": method, "mode": mode, "n_targets": int(len(s)), "n_found": int(len(found)),
                "found_rate": len(found) / len(s),
                "median_support": float(np.median(found)) if len(found) else float("nan"),
                "auc": ci["mean"], "auc_low": ci["low"], "auc_high": ci["high"],
                "trainings": int(part["trainings"].sum()) if "trainings" in part else None,
                "seconds": float(part["seconds"].sum()) if "seconds" in part else None,
            })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- win rates


def pairwise_outcomes(supports_a, supports_b) -> np.ndarray:
    """Per target: +1 where A's support is smaller than B's, -1 where larger, 0 on ties.

    Not found (-1) is infinity, so two not-founds tie and a found beats a not-found.
    """
    a, b = _supports(supports_a), _supports(supports_b)
    if a.shape != b.shape:
        raise ValueError(f"supports of A and B must be paired per target; got {a.shape} and {b.shape}")
    a_inf, b_inf = a < 0, b < 0
    out = np.sign(b - a)
    out = np.where(a_inf & b_inf, 0, out)
    out = np.where(a_inf & ~b_inf, -1, out)
    out = np.where(~a_inf & b_inf, 1, out)
    return out.astype(np.int64)


def win_rates(support_df: pd.DataFrame, *, methods: Sequence[str] | None = None, n_boot: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per-target comparisons of each pair of methods, per mode, on their common targets.

    For a pair (A, B): win_rate = #{t: s_A(t) < s_B(t)} / n, loss_rate = #{s_A > s_B} / n,
    tie_rate = #{s_A = s_B} / n (two not-founds tie), with n the targets both have a
    support for. win_low/win_high bound the win rate (bootstrap over those targets).
    """
    _require(support_df, ("target_id", "method", "mode", "support"), "support table")
    methods = order_methods(methods or support_df["method"].unique())
    rows = []
    for mode in modes_of(support_df):
        table = (support_df[support_df["mode"] == mode]
                 .pivot_table(index="target_id", columns="method", values="support", aggfunc="first"))
        for a, b in combinations([m for m in methods if m in table.columns], 2):
            pair = table[[a, b]].dropna()
            if pair.empty:
                continue
            outcome = pairwise_outcomes(pair[a].to_numpy(), pair[b].to_numpy())
            n = len(outcome)
            low, high = bootstrap_ci((outcome > 0).astype(float), n_boot=n_boot, confidence=confidence, seed=seed)
            rows.append({"mode": mode, "method_a": a, "method_b": b, "n_targets": n,
                         "wins": int((outcome > 0).sum()), "ties": int((outcome == 0).sum()),
                         "losses": int((outcome < 0).sum()), "win_rate": float((outcome > 0).mean()),
                         "tie_rate": float((outcome == 0).mean()), "loss_rate": float((outcome < 0).mean()),
                         "win_low": low, "win_high": high})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- claims


MIN_PAIRED_TARGETS = 5  # fewer paired targets: no verdict (a bootstrap of 1-4 values shows no real spread)
VERDICTS = ("supported", "contradicted", "inconclusive")


@dataclass(frozen=True)
class ClaimSpec:
    """One row of the claims table: side A (the side the paper says is better) against
    side B, in one mode, on the targets both searched.

    ``run_a`` / ``run_b``: "base" (the experiment the report is about) or the name of an
    ablation whose run holds that side (``attribution run PRESET --ablation NAME``).
    ``large``: only the targets whose support (the mean of both sides') is in the upper
    half (see :func:`paired_support_difference`)."""

    claim: str
    mode: str
    method_a: str
    method_b: str
    run_a: str = "base"
    run_b: str = "base"
    large: bool = False

    @property
    def ablation(self) -> str | None:
        """The ablation run this row needs (None: the base run alone)."""
        return next((run for run in (self.run_a, self.run_b) if run != "base"), None)

    def side(self, which: str) -> str:
        run, method = (self.run_a, self.method_a) if which == "a" else (self.run_b, self.method_b)
        return method if run == "base" else f"{method} [{run}]"


def _both_modes(claim: str, method_a: str, method_b: str, **kwargs) -> tuple[ClaimSpec, ...]:
    return tuple(ClaimSpec(claim, mode, method_a, method_b, **kwargs) for mode in MODES)


# The paper's claims (arXiv 2311.03386), each checked in both support modes.
CLAIMS: tuple[ClaimSpec, ...] = (
    *_both_modes("ESVM finds smaller supports than l2", "esvm", "l2"),
    *_both_modes("ESVM beats l2 at large supports (targets whose mean support is in the upper half)", "esvm", "l2",
                 large=True),
    *_both_modes("ESVM finds smaller supports than a random ranking", "esvm", "random"),
    *_both_modes("ESVM finds smaller supports than TRAK (the paper: rivals it)", "esvm", "trak"),
    *_both_modes("ESVM finds smaller supports than Datamodels (the paper: rivals it)", "esvm", "datamodels"),
    *_both_modes("self-supervised features beat supervised features (ESVM)", "esvm", "esvm",
                 run_b="supervised-features"),
    *_both_modes("self-supervised features beat random-init features (ESVM)", "esvm", "esvm",
                 run_b="random-features"),
    *_both_modes("same-class candidates beat all-class candidates (ESVM)", "esvm", "esvm", run_b="all-class"),
)


def censored_supports(support_df: pd.DataFrame, method: str, mode: str, limit: int | None = None) -> pd.Series:
    """Per target (index target_id): the support of ``method`` in ``mode``, a not-found
    support counted as its search's limit + 1 (the ``limit`` column; else ``limit``)."""
    _require(support_df, ("target_id", "method", "mode", "support"), "support table")
    part = support_df[(support_df["method"] == method) & (support_df["mode"] == mode)]
    s = _supports(part["support"].to_numpy())
    if "limit" in part.columns:
        limits = pd.to_numeric(part["limit"], errors="coerce").to_numpy(np.float64)
    else:
        limits = np.full(len(part), np.nan)
    if limit is not None:
        limits = np.where(np.isnan(limits), float(limit), limits)
    if ((s < 0) & np.isnan(limits)).any():
        raise ValueError(f"{method} {mode}: a not-found support without a limit; pass the support limit")
    values = np.where(s >= 0, s, limits + 1).astype(np.float64)
    return pd.Series(values, index=part["target_id"].to_numpy(np.int64), name=method).groupby(level=0).first()


def claim_verdict(low: float, high: float, n: int) -> str:
    """supported: the interval of (B - A) lies above 0; contradicted: below 0; else inconclusive."""
    if n < MIN_PAIRED_TARGETS or np.isnan(low) or np.isnan(high):
        return "inconclusive"
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def paired_support_difference(a: pd.Series, b: pd.Series, *, large: bool = False, n_boot: int = 1000,
                              confidence: float = 0.95, seed: int = 0) -> dict:
    """The paired comparison of one claims row: side A's and side B's per-target
    supports (:func:`censored_supports`), paired on the target ids both have.

    The metric is d(t) = s_B(t) - s_A(t) in training images, with a not-found support
    counted as its limit + 1: positive when A needs fewer images to flip the target,
    the direction every claim is written in. Why limit + 1: "not found" says only that
    the support exceeds the limit, and limit + 1 is the smallest value consistent with
    that, so a difference involving a not-found is never overstated (it understates
    the advantage of the side that found one) and two not-founds tie at 0. The unit
    stays training images, which reads directly ("ESVM needs 40 fewer images").

    ``large``: only the paired targets whose mean support (s_A(t) + s_B(t)) / 2 is at
    least its median over the paired targets (the threshold is returned); the interval
    is then conditional on that subset. The mean of both sides, not s_B alone: selecting
    on one side's large values would bias d towards that side by regression to the mean
    even when the two methods are exchangeable.

    Returns n (paired targets), n_a, n_b (targets each side has), mean (of d), low,
    high (a seeded percentile bootstrap over the paired targets), verdict (see
    :func:`claim_verdict`), a_smaller, ties, b_smaller (counts of the sign of d) and
    threshold (the median used by ``large``, else None)."""
    common = np.intersect1d(a.index.to_numpy(np.int64), b.index.to_numpy(np.int64))
    da, db = a.loc[common].to_numpy(np.float64), b.loc[common].to_numpy(np.float64)
    threshold = None
    if large and len(common):
        level = (da + db) / 2
        threshold = float(np.median(level))
        keep = level >= threshold
        da, db = da[keep], db[keep]
    d = db - da
    n = int(len(d))
    mean = float(d.mean()) if n else float("nan")
    low, high = bootstrap_ci(d, n_boot=n_boot, confidence=confidence, seed=seed)
    return {"n": n, "n_a": int(len(a)), "n_b": int(len(b)), "mean": mean, "low": low, "high": high,
            "verdict": claim_verdict(low, high, n), "a_smaller": int((d > 0).sum()), "ties": int((d == 0).sum()),
            "b_smaller": int((d < 0).sum()), "threshold": threshold}


def claims_table(base: pd.DataFrame | None, runs: dict[str, pd.DataFrame | None], *,
                 claims: Sequence[ClaimSpec] = CLAIMS, limit: int | None = None, preset: str = "PRESET",
                 n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """One row per claim: the paired comparison, or why there is none.

    ``base``: the support table of the experiment reported on; ``runs``: {ablation name:
    its support table, or None when that run does not exist}. A row whose run is
    missing says so with the command that makes it; a side whose method or mode was
    not searched says that; nothing is dropped. Columns: claim, mode, a, b, n, n_a,
    n_b, mean, low, high, verdict, a_smaller, ties, b_smaller, threshold, status
    ("compared" or why not), note."""
    rows = []
    for spec in claims:
        row = {"claim": spec.claim, "mode": spec.mode, "a": spec.side("a"), "b": spec.side("b"), "n": 0,
               "n_a": None, "n_b": None, "mean": float("nan"), "low": float("nan"), "high": float("nan"),
               "verdict": "", "a_smaller": None, "ties": None, "b_smaller": None, "threshold": None,
               "status": "compared", "note": ""}
        tables = {}
        for which, run in (("a", spec.run_a), ("b", spec.run_b)):
            table = base if run == "base" else runs.get(run)
            if table is None:
                row["status"] = ("not run: the support stage of this experiment" if run == "base" else
                                 f"not run: attribution run {preset} --ablation {run}")
                break
            method = spec.method_a if which == "a" else spec.method_b
            searched = table[(table["method"] == method) & (table["mode"] == spec.mode)]
            if searched.empty:
                where = "this experiment" if run == "base" else f"the {run} run"
                row["status"] = f"not searched: {method} in {spec.mode} mode is not in {where}'s support table"
                break
            tables[which] = censored_supports(table, method, spec.mode, limit)
        if row["status"] == "compared":
            result = paired_support_difference(tables["a"], tables["b"], large=spec.large, n_boot=n_boot,
                                               confidence=confidence, seed=seed)
            row.update(result)
            notes = []
            if result["n"] == 0:
                row["status"] = "no paired targets: the two sides searched no target in common"
                row["verdict"] = ""
            elif result["n"] < MIN_PAIRED_TARGETS:
                notes.append(f"fewer than {MIN_PAIRED_TARGETS} paired targets: no verdict")
            if spec.run_a != spec.run_b and set(tables["a"].index) != set(tables["b"].index):
                notes.append(f"the runs searched different targets ({result['n_a']} and {result['n_b']}); "
                             "paired on the common ones")
            if spec.large and result["threshold"] is not None:
                notes.append(f"targets whose mean support of both sides is >= {result['threshold']:g} (its median)")
            row["note"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- overlap


def jaccard(a, b) -> float:
    """|A & B| / |A | B|; two empty sets are identical (1.0)."""
    a, b = np.unique(np.asarray(a)), np.unique(np.asarray(b))
    union = len(np.union1d(a, b))
    return 1.0 if union == 0 else len(np.intersect1d(a, b, assume_unique=True)) / union


def ranked_lists(rankings_df: pd.DataFrame) -> dict[tuple[str, int], np.ndarray]:
    """(method, target_id) -> train ids in rank order (rank 0 first)."""
    _require(rankings_df, ("target_id", "method", "rank", "train_id"), "rankings table")
    ordered = rankings_df.sort_values(["method", "target_id", "rank"], kind="stable")
    out = {}
    for (method, target), group in ordered.groupby(["method", "target_id"], sort=False):
        out[(method, int(target))] = group["train_id"].to_numpy()
    return out


def topk_jaccard(rankings_df: pd.DataFrame, k: int, *, methods: Sequence[str] | None = None,
                 n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                 lists: dict | None = None) -> pd.DataFrame:
    """Mean over common targets of the Jaccard index of two methods' top-k sets.

    J_t = |top_k^A(t) & top_k^B(t)| / |top_k^A(t) | top_k^B(t)|. A ranking shorter
    than k (a small class) contributes what it has. Columns: method_a, method_b, k,
    n_targets, mean, low, high.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    lists = lists if lists is not None else ranked_lists(rankings_df)
    methods = order_methods(methods or {m for m, _ in lists})
    targets = {m: {t for mm, t in lists if mm == m} for m in methods}
    rows = []
    for a, b in combinations(methods, 2):
        common = sorted(targets[a] & targets[b])
        if not common:
            continue
        values = [jaccard(lists[(a, t)][:k], lists[(b, t)][:k]) for t in common]
        rows.append({"method_a": a, "method_b": b, "k": k, "n_targets": len(common),
                     **_mean_with_ci(values, n_boot, confidence, seed)})
    return pd.DataFrame(rows)


def support_set_jaccard(rankings_df: pd.DataFrame, support_df: pd.DataFrame, *,
                        methods: Sequence[str] | None = None, n_boot: int = 1000, confidence: float = 0.95,
                        seed: int = 0, lists: dict | None = None) -> pd.DataFrame:
    """Jaccard of the found supports themselves: A's top-s_A(t) set vs B's top-s_B(t) set.

    Only targets where both methods found a support in that mode count (a not-found
    support has no set). Columns: mode, method_a, method_b, n_targets, mean, low, high.
    """
    _require(support_df, ("target_id", "method", "mode", "support"), "support table")
    lists = lists if lists is not None else ranked_lists(rankings_df)
    methods = order_methods(methods or support_df["method"].unique())
    rows = []
    for mode in modes_of(support_df):
        table = (support_df[support_df["mode"] == mode]
                 .pivot_table(index="target_id", columns="method", values="support", aggfunc="first"))
        for a, b in combinations([m for m in methods if m in table.columns], 2):
            pair = table[[a, b]].dropna()
            pair = pair[(pair[a] >= 0) & (pair[b] >= 0)]
            values = []
            for target, (sa, sb) in zip(pair.index, pair[[a, b]].to_numpy(dtype=np.int64)):
                la, lb = lists.get((a, int(target))), lists.get((b, int(target)))
                if la is None or lb is None:
                    continue  # the ranking of that target is missing: no set to compare
                values.append(jaccard(la[:sa], lb[:sb]))
            if values:
                rows.append({"mode": mode, "method_a": a, "method_b": b, "n_targets": len(values),
                             **_mean_with_ci(values, n_boot, confidence, seed)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- LDS


@dataclass
class LDSResult:
    """Per-target Spearman correlations (nan where undefined) and their mean with a CI."""

    per_target: np.ndarray
    mean: float
    low: float
    high: float
    n_valid: int


def _rank_columns(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=0)  # average ranks for ties, as Spearman's rho prescribes


def spearman_columns(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``predicted[:, j]`` and ``measured[:, j]`` for every column j
    (the Pearson correlation of their average ranks); nan where either column is constant."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if predicted.shape != measured.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and measured {measured.shape} must be 2-D of one shape "
                         "(models, targets)")
    rp, rm = _rank_columns(predicted), _rank_columns(measured)
    rp -= rp.mean(axis=0)
    rm -= rm.mean(axis=0)
    denom = np.sqrt((rp ** 2).sum(axis=0) * (rm ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rp * rm).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


def lds(masks: np.ndarray, margins: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000,
        confidence: float = 0.95, seed: int = 0) -> LDSResult:
    """Linear datamodeling score (Park et al. 2023, TRAK) of one dense score matrix.

    masks (n_models, n_train) bool: which training images each subset model saw;
    margins (n_models, n_targets): each model's measured margin on each target;
    scores (n_targets, n_train): the attribution scores. The predicted group effect of
    subset S_m on target t is g(m, t) = sum_{i in S_m} scores[t, i]; LDS(t) is the
    Spearman correlation over models between g(., t) and margins(., t); the reported
    LDS is the mean over targets. Targets whose predictions or margins are constant
    over models have no correlation (nan) and are left out of the mean. (The report
    reads the score store block by block instead: :func:`lds_table`.)
    """
    masks = np.asarray(masks)
    margins = np.asarray(margins, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if masks.ndim != 2 or margins.ndim != 2 or scores.ndim != 2:
        raise ValueError("masks (n_models, n_train), margins (n_models, n_targets) and scores "
                         "(n_targets, n_train) must all be 2-D")
    if masks.shape[0] != margins.shape[0]:
        raise ValueError(f"masks have {masks.shape[0]} models but margins {margins.shape[0]}")
    if scores.shape != (margins.shape[1], masks.shape[1]):
        raise ValueError(f"scores must be (n_targets={margins.shape[1]}, n_train={masks.shape[1]}), "
                         f"got {scores.shape}")
    if masks.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subset models to correlate over, got {masks.shape[0]}")
    rho = spearman_columns(masks.astype(np.float64) @ scores.T, margins)
    ci = _mean_with_ci(rho, n_boot, confidence, seed)
    return LDSResult(rho, ci["mean"], ci["low"], ci["high"], int(np.sum(~np.isnan(rho))))


@dataclass
class LDSData:
    """Subset-model masks and target margins, aligned to ``train_ids`` and ``target_ids``."""

    masks: np.ndarray
    margins: np.ndarray
    train_ids: np.ndarray
    target_ids: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)

    def masks_over(self, train_ids) -> np.ndarray:
        """The masks with one column per id of ``train_ids`` (a score store's training ids):
        False for an id no subset model saw. Raises ValueError when the models saw
        images that ``train_ids`` lacks (they were trained on another training set)."""
        train_ids = np.asarray(train_ids, dtype=np.int64)
        columns = pd.Index(train_ids).get_indexer(self.train_ids)
        if (columns < 0).any():
            missing = self.train_ids[columns < 0][:5].tolist()
            raise ValueError(f"the LDS subset models saw training ids {missing}... that the score store does not "
                             f"score ({int((columns < 0).sum())} in all): they were trained on another training "
                             "set; rerun the datamodels stage (which writes EXP/lds/) in this experiment")
        out = np.zeros((self.masks.shape[0], len(train_ids)), dtype=bool)
        out[:, columns] = self.masks
        return out


def masks_from_long(model_ids, train_ids, *, all_train_ids=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Long rows (model_id, train_id), one per image a model saw -> (masks, model_ids, train_ids)."""
    model_ids = np.asarray(model_ids, dtype=np.int64)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    models = np.unique(model_ids)
    universe = np.unique(train_ids) if all_train_ids is None else np.asarray(all_train_ids, dtype=np.int64)
    masks = np.zeros((len(models), len(universe)), dtype=bool)
    cols = pd.Index(universe).get_indexer(train_ids)
    if (cols < 0).any():
        raise ValueError("mask rows name training ids outside all_train_ids")
    masks[np.searchsorted(models, model_ids), cols] = True
    return masks, models, universe


LDS_SOURCES = ("lds", "datamodels")


def load_lds_data(exp_dir: str | os.PathLike) -> LDSData | None:
    """Masks and margins for LDS from EXP/lds/ (held-out subset models) or EXP/datamodels/.

    Each folder holds masks.parquet (model_id int64, train_id int64: one row per training
    image the model saw) and margins.parquet (model_id int64, target_id int64, margin
    float). Returns None when neither folder has both files. The training-id universe is
    every train id in masks.parquet (with alpha = 50 % subsets every image appears).
    """
    root = Path(exp_dir)
    for source in LDS_SOURCES:
        mask_path, margin_path = root / source / "masks.parquet", root / source / "margins.parquet"
        if not (mask_path.exists() and margin_path.exists()):
            continue
        m = pd.read_parquet(mask_path)
        g = pd.read_parquet(margin_path)
        _require(m, ("model_id", "train_id"), str(mask_path))
        _require(g, ("model_id", "target_id", "margin"), str(margin_path))
        masks, models, train_ids = masks_from_long(m["model_id"], m["train_id"])
        wide = g.pivot_table(index="model_id", columns="target_id", values="margin", aggfunc="mean")
        wide = wide.reindex(models)
        keep = ~wide.isna().any(axis=0)  # targets measured on every model
        notes = []
        if (~keep).any():
            notes.append(f"{int((~keep).sum())} targets lack margins on some models and are left out")
        if source == "datamodels":
            notes.append("masks/margins are the Datamodels training models: LDS of datamodels itself is "
                         "in-sample (optimistic); held-out models in EXP/lds/ avoid this")
        return LDSData(masks, wide.loc[:, keep].to_numpy(np.float64), train_ids,
                       wide.columns[keep].to_numpy(np.int64), source, notes)
    return None


def _as_store(scores) -> "ScoreStore":
    from attribution.scores import ScoreStore

    if isinstance(scores, ScoreStore):
        return scores
    if isinstance(scores, (str, os.PathLike)):
        return ScoreStore(scores)
    raise TypeError(f"scores must be a ScoreStore or the path of EXP/scores, got {type(scores).__name__}: LDS is "
                    "computed from the full score vectors, not from (truncated) rankings")


def lds_per_target(scores, data: LDSData, *, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Per (method, LDS target): the Spearman correlation over the subset models between
    the summed full scores of each model's training subset and its measured margin.

    ``scores``: a :class:`attribution.scores.ScoreStore` (or its folder, EXP/scores);
    ``methods``: default every method (and variant) with score blocks. The store is read
    one block at a time and only the rows of LDS targets are kept, so memory is one
    block plus (models x targets) predictions. Columns: method, target_id, lds (nan
    where the prediction or the margins are constant over the models), constant (the
    prediction is constant: e.g. a lasso that kept no coefficient)."""
    store = _as_store(scores)
    methods = order_methods(methods if methods is not None else store.methods())
    if not methods:
        return pd.DataFrame(columns=["method", "target_id", "lds", "constant"])
    if data.masks.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subset models to correlate over, got {data.masks.shape[0]}")
    masks = data.masks_over(store.train_ids()).astype(np.float32)
    wanted = pd.Index(data.target_ids)
    parts = []
    for method in methods:
        for block in store.blocks(method):
            rows = np.flatnonzero(wanted.get_indexer(block.target_ids) >= 0)
            if not len(rows):
                continue
            # float64 sums: subsets of thousands of small scores lose digits in float32
            predicted = masks.astype(np.float64) @ block.values[rows].astype(np.float64).T
            targets = block.target_ids[rows]
            measured = data.margins[:, wanted.get_indexer(targets)]
            parts.append(pd.DataFrame({"method": method, "target_id": targets,
                                       "lds": spearman_columns(predicted, measured),
                                       "constant": np.ptp(predicted, axis=0) == 0}))
    if not parts:
        return pd.DataFrame(columns=["method", "target_id", "lds", "constant"])
    return pd.concat(parts, ignore_index=True).drop_duplicates(["method", "target_id"])


def lds_table(scores, data: LDSData, *, methods: Sequence[str] | None = None, n_boot: int = 1000,
              confidence: float = 0.95, seed: int = 0, per_target: pd.DataFrame | None = None) -> pd.DataFrame:
    """LDS per method from its full score vectors (:func:`lds_per_target`), paired: the
    mean over the LDS targets that EVERY compared method scored, with a seeded bootstrap
    interval (one seed and one target set, so every method sees the same resamples).

    A constant prediction (the method gives every subset the same summed score: it
    predicts nothing) counts as correlation 0, not as missing: dropping it would reward
    a method for the targets it cannot tell apart. Targets whose margins are constant
    over the models have no correlation for any method and are left out.

    Columns: method, n_scored (LDS targets the method has scores for), n_targets (the
    paired targets the mean is over), n_constant (of those, constant predictions),
    n_models, lds, lds_low, lds_high. A method with no score on an LDS target has a row
    with n_scored 0 and nan LDS (listed, not dropped)."""
    table = per_target if per_target is not None else lds_per_target(scores, data, methods=methods)
    methods = order_methods(methods if methods is not None else
                            (_as_store(scores).methods() if scores is not None else table["method"].unique()))
    measured = pd.Series(np.ptp(data.margins, axis=0) > 0, index=data.target_ids)
    scored = {m: table[table["method"] == m] for m in methods}
    common = None
    for method, part in scored.items():
        if len(part):
            ids = set(part["target_id"].astype(np.int64))
            common = ids if common is None else common & ids
    common = sorted(t for t in (common or set()) if measured.get(t, False))
    rows = []
    for method in methods:
        part = scored[method].set_index("target_id")
        row = {"method": method, "n_scored": int(len(part)), "n_targets": 0, "n_constant": 0,
               "n_models": int(data.masks.shape[0]), "lds": float("nan"), "lds_low": float("nan"),
               "lds_high": float("nan")}
        if len(part) and common:
            values = part.loc[common]
            rho = np.where(values["constant"].to_numpy(bool), 0.0, values["lds"].to_numpy(np.float64))
            ci = _mean_with_ci(rho, n_boot, confidence, seed)
            row.update(n_targets=len(common), n_constant=int(values["constant"].sum()), lds=ci["mean"],
                       lds_low=ci["low"], lds_high=ci["high"])
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- further training (final-model-only)


def further_agreement_per_target(scores, gold: pd.DataFrame, *, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Per (method, further-training epoch, gold target): the cosine similarity and the
    Spearman correlation between the method's scores of the left-out training images and
    their gold scores (Wei et al.'s two measures; :func:`attribution.further_training.agreement`).

    ``gold``: EXP/further/gold.parquet (epoch, target_id, train_id, gold). Every method
    with score blocks is measured on the gold targets it scored. Columns: method, epoch,
    target_id, cosine, spearman."""
    from attribution.further_training import agreement

    store = _as_store(scores)
    methods = order_methods(methods if methods is not None else store.methods())
    epochs = sorted(int(e) for e in gold["epoch"].unique())
    target_ids = np.sort(gold["target_id"].unique())
    left_out = np.sort(gold["train_id"].unique())
    # (epochs, targets, left out): the gold frame is complete by construction (the further stage)
    cube = (gold.set_index(["epoch", "target_id", "train_id"])["gold"]
            .reindex(pd.MultiIndex.from_product([epochs, target_ids, left_out])).to_numpy()
            .reshape(len(epochs), len(target_ids), len(left_out)))
    columns = pd.Index(store.train_ids()).get_indexer(left_out)
    if (columns < 0).any():
        raise ValueError("gold.parquet names training images the score store does not have: the further stage "
                         "and the scores come from different training sets")
    parts = []
    for method in methods:
        try:
            block = store.scores_of(method, target_ids)
        except (KeyError, ValueError):
            continue  # the method did not score these targets
        rows = pd.Index(target_ids).get_indexer(block.target_ids)
        values = block.values[:, columns].astype(np.float64)
        for e, epoch in enumerate(epochs):
            measured = agreement(values, cube[e, rows])
            parts.append(pd.DataFrame({"method": method, "epoch": epoch, "target_id": block.target_ids,
                                       "cosine": measured["cosine"], "spearman": measured["spearman"]}))
    if not parts:
        return pd.DataFrame(columns=["method", "epoch", "target_id", "cosine", "spearman"])
    return pd.concat(parts, ignore_index=True)


def further_agreement_table(per_target: pd.DataFrame, *, n_boot: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> pd.DataFrame:
    """Mean cosine and Spearman per (method, epoch) over the gold targets EVERY method
    scored (paired), with seeded bootstrap intervals. A target whose gold or scores are
    constant (NaN agreement) is dropped for every method. Columns: method, epoch,
    n_targets, cosine, cosine_low, cosine_high, spearman, spearman_low, spearman_high."""
    if per_target.empty:
        return pd.DataFrame(columns=["method", "epoch", "n_targets", "cosine", "cosine_low", "cosine_high",
                                     "spearman", "spearman_low", "spearman_high"])
    valid = per_target.dropna(subset=["cosine", "spearman"])
    methods = order_methods(per_target["method"].unique())
    common = set.intersection(*(set(valid[valid["method"] == m]["target_id"]) for m in methods)) if methods else set()
    rows = []
    for (method, epoch), part in per_target.groupby(["method", "epoch"], sort=False):
        part = part[part["target_id"].isin(common)].sort_values("target_id")
        row = {"method": method, "epoch": int(epoch), "n_targets": len(part)}
        for measure in ("cosine", "spearman"):
            ci = _mean_with_ci(part[measure].to_numpy(np.float64), n_boot, confidence, seed)
            row.update({measure: ci["mean"], f"{measure}_low": ci["low"], f"{measure}_high": ci["high"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["order"] = table["method"].map({m: i for i, m in enumerate(methods)})
    return table.sort_values(["order", "epoch"]).drop(columns="order").reset_index(drop=True)


# ----------------------------------------------------------------------------- score vectors: non-zeros, ties


def outside_policy(method: str, settings: dict | None = None) -> dict:
    """What ``method`` declares about the training images outside its candidates:
    ``class_restricted`` (scores only the target's class) and ``outside`` (how the
    others are scored: "min" = the target's lowest candidate score, "none" = the method
    scores every image itself, or the method's own policy, e.g. esvm@negative's
    "negative"), read from the method object built with the parameters its score blocks
    were written with (``settings``: a block's stored settings; a variant differs from
    its base only there), else from the class. ``source`` says which. An unregistered
    method declares nothing (None)."""
    import inspect

    from attribution.methods import is_method

    if not is_method(method):
        return {"class_restricted": None, "outside": None, "source": "unregistered"}
    cls = method_class(method)
    declared, source = cls, "class"
    if settings:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        params = {k: v for k, v in settings.items() if k in accepted and v is not None}
        try:
            declared, source = cls(**params), "the blocks' settings"
        except Exception:  # settings of another version: the class's declaration is what is known
            declared, source = cls, "class"
    return {"class_restricted": bool(declared.class_restricted), "outside": str(declared.outside), "source": source}


def _observed_outside(values: np.ndarray, candidates: np.ndarray | None) -> str:
    """How the block's non-candidate entries are scored, as seen in the numbers."""
    if candidates is None or candidates.all():
        return "none outside (every image is a candidate)"
    low = np.where(candidates, values, np.inf).min(axis=1, keepdims=True)
    outside = ~candidates
    if np.all((values == low) | ~outside):
        return "min (the target's lowest candidate score)"
    spread = np.where(outside, values, np.nan)
    if np.all(np.nanmax(spread, axis=1) == np.nanmin(spread, axis=1)):
        return "constant per target"
    return "own scores (vary outside the candidates)"


def score_summary(scores, *, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Per method (and variant) of the score store, one block at a time: how many of each
    target's candidate scores are non-zero, how many candidates it has, and how the
    images outside the candidates are scored (declared by the class, observed in the
    blocks).

    Columns: method, n_targets, n_train, candidates_median, nonzero_median, nonzero_min,
    nonzero_max, distinct_median (distinct candidate score values per target),
    class_restricted, outside (declared), observed_outside."""
    store = _as_store(scores)
    rows = []
    for method in order_methods(methods if methods is not None else store.methods()):
        counts, nonzero, distinct, observed, n_train = [], [], [], set(), 0
        names = store.block_names(method)
        policy = outside_policy(method, store.settings(method, names[0]) if names else None)
        for block in store.blocks(method):
            n_train = len(block.train_ids)
            cand = block.candidates
            inside = np.ones(block.values.shape, bool) if cand is None else cand
            counts.append(inside.sum(axis=1))
            nonzero.append(((block.values != 0) & inside).sum(axis=1))
            distinct += [len(np.unique(row[mask])) for row, mask in zip(block.values, inside)]
            if len(block.target_ids):
                observed.add(_observed_outside(block.values, cand))
        if not counts:
            continue
        counts, nonzero = np.concatenate(counts), np.concatenate(nonzero)
        rows.append({"method": method, "n_targets": int(len(counts)), "n_train": int(n_train),
                     "candidates_median": float(np.median(counts)), "nonzero_median": float(np.median(nonzero)),
                     "nonzero_min": int(nonzero.min()), "nonzero_max": int(nonzero.max()),
                     "distinct_median": float(np.median(distinct)),
                     "class_restricted": policy["class_restricted"], "outside": policy["outside"],
                     "observed_outside": "; ".join(sorted(observed))})
    return pd.DataFrame(rows)


def tied_fraction(scores) -> float:
    """The fraction of a ranking's positions whose score equals the next position's
    (rank order); nan for a ranking shorter than 2. 0: a strict order; near 1: the
    order is the tie-break's (train id), not the method's."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 2:
        return float("nan")
    return float(np.mean(scores[:-1] == scores[1:]))


MOSTLY_TIED = 0.5  # a ranking whose tied fraction exceeds this is "mostly ties"


def ranking_ties(rankings_df: pd.DataFrame, *, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Per method: how much of its rankings is ties (:func:`tied_fraction` per target).

    Columns: method, n_targets, length (median ranking length), tied_median, tied_max,
    mostly_tied (rankings whose tied fraction exceeds :data:`MOSTLY_TIED`),
    first_tie_median (median position, 0-based, of the first tie: where the method's
    own scores stop ordering the ranking when everything after it ties),
    ties_in_id_order (the fraction of tied neighbours in ascending train-id order: 1 when
    the ties are broken by id, lower when the method orders them by a key of its own)."""
    _require(rankings_df, ("target_id", "method", "rank", "score"), "rankings table")
    ordered = rankings_df.sort_values(["method", "target_id", "rank"], kind="stable")
    rows = []
    for method in order_methods(methods if methods is not None else ordered["method"].unique()):
        part = ordered[ordered["method"] == method]
        if part.empty:
            continue
        tied, lengths, first, ascending, pairs = [], [], [], 0, 0
        for _, group in part.groupby("target_id", sort=False):
            values = group["score"].to_numpy(np.float64)
            ids = group["train_id"].to_numpy(np.int64)
            tied.append(tied_fraction(values))
            lengths.append(len(values))
            equal = np.flatnonzero(values[:-1] == values[1:])
            first.append(int(equal[0]) if len(equal) else len(values))
            ascending += int((ids[equal + 1] > ids[equal]).sum())
            pairs += len(equal)
        tied = np.asarray(tied)
        rows.append({"method": method, "n_targets": len(lengths), "length": float(np.median(lengths)),
                     "tied_median": float(np.nanmedian(tied)) if (~np.isnan(tied)).any() else float("nan"),
                     "tied_max": float(np.nanmax(tied)) if (~np.isnan(tied)).any() else float("nan"),
                     "mostly_tied": int((tied > MOSTLY_TIED).sum()), "first_tie_median": float(np.median(first)),
                     "ties_in_id_order": ascending / pairs if pairs else float("nan")})
    return pd.DataFrame(rows)


def tie_warnings(ties: pd.DataFrame, scores: pd.DataFrame | None = None) -> list[str]:
    """Sentences for the methods whose rankings are mostly ties, or whose score vectors
    have fewer non-zero candidate scores than their rankings are long."""
    scores = scores if scores is not None else pd.DataFrame(columns=["method"])
    by_method = scores.set_index("method") if len(scores) else None
    out = []
    for row in ties.itertuples():
        nonzero = ""
        if by_method is not None and row.method in by_method.index:
            s = by_method.loc[row.method]
            if s["nonzero_median"] < row.length:
                nonzero = (f" it has a median of {s['nonzero_median']:.0f} non-zero scores of "
                           f"{s['candidates_median']:.0f} candidates (min {int(s['nonzero_min'])}), fewer than its "
                           f"{row.length:.0f} ranked positions;")
        if row.tied_median > MOSTLY_TIED or nonzero:
            out.append(f"**warning**: {row.method}'s rankings are mostly ties:{nonzero} a median "
                       f"{row.tied_median:.0%} of its ranked positions tie with the next one "
                       f"({row.mostly_tied} of {row.n_targets} rankings more than {MOSTLY_TIED:.0%} tied; the first "
                       f"tie at a median position {row.first_tie_median:.0f}); "
                       + ("tied images are in train-id order, so beyond its first tie its supports measure that "
                          "order, not the method" if not row.ties_in_id_order < 0.99 else
                          f"only {row.ties_in_id_order:.0%} of tied neighbours are in train-id order: the method "
                          "orders its ties by a key of its own that the stored scores do not show"))
    return out


# ----------------------------------------------------------------------------- the frontier


FRONTIER_METRICS = (("removal", "removal support AUC"), ("mislabel", "mislabel support AUC"), ("lds", "LDS"))


def frontier_table(methods: Sequence[str], costs: pd.DataFrame, summary: pd.DataFrame | None = None,
                   lds: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method (and variant): the compute that produced its attributions
    (:func:`cost_table`) beside its removal and mislabel support AUC
    (:func:`support_summary`) and LDS (:func:`lds_table`), each with its interval.

    Columns: method, base (the registered method a variant belongs to), seconds,
    cost_complete (every stage time recorded; else seconds is a lower bound), removal, removal_low, removal_high, mislabel, ..., lds, lds_low,
    lds_high, missing (the metrics the method lacks, and "compute" when its seconds are
    unknown: such a method cannot be placed on the x-axis)."""
    from attribution.methods import split_variant

    rows = []
    cost = costs.set_index("method") if len(costs) else pd.DataFrame()
    for method in order_methods(methods):
        row = {"method": method, "base": split_variant(method)[0], "seconds": float("nan"), "cost_complete": False}
        if method in cost.index and _number(cost.loc[method, "seconds"]):
            row["seconds"] = float(cost.loc[method, "seconds"])
            row["cost_complete"] = not cost.loc[method, "missing_stages"]  # every stage time recorded
        for key, _ in FRONTIER_METRICS:
            row[key] = row[f"{key}_low"] = row[f"{key}_high"] = float("nan")
        if summary is not None and len(summary):
            for mode in ("removal", "mislabel"):
                hit = summary[(summary["method"] == method) & (summary["mode"] == mode)]
                if len(hit):
                    row[mode], row[f"{mode}_low"], row[f"{mode}_high"] = hit.iloc[0][["auc", "auc_low", "auc_high"]]
        if lds is not None and len(lds):
            hit = lds[lds["method"] == method]
            if len(hit) and not np.isnan(hit.iloc[0]["lds"]):
                row["lds"], row["lds_low"], row["lds_high"] = hit.iloc[0][["lds", "lds_low", "lds_high"]]
        missing = [key for key, _ in FRONTIER_METRICS if np.isnan(row[key])]
        if np.isnan(row["seconds"]):
            missing.append("compute")
        row["missing"] = ", ".join(missing)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- costs


def declared_cost_specs() -> dict[str, CostSpec]:
    """{method: its class's ``cost``} for every registered method that declares one
    (a spec with neither stages nor paths declares nothing), in registry order."""
    specs = {}
    for name in available_methods():
        spec = method_class(name).cost
        if spec is not None and (spec.stages or spec.paths):
            specs[name] = spec
    return specs


def reuse_state(section: dict) -> str:
    """"all", "partial" or "none": whether a stage's last run reused stored artifacts.

    Read from what the stages record: ``reused: true`` (pretrain), ``computed_files`` /
    ``reused_files`` (rank), ``computed_shards`` per split (embed).
    """
    if section.get("reused") is True:
        return "all"
    computed, reused = section.get("computed_files"), section.get("reused_files")
    if isinstance(computed, (list, int)) and isinstance(reused, (list, int)):
        n_computed = len(computed) if isinstance(computed, list) else computed
        n_reused = len(reused) if isinstance(reused, list) else reused
        if n_reused and not n_computed:
            return "all"
        if n_reused and n_computed:
            return "partial"
    shards = section.get("computed_shards")
    if isinstance(shards, dict) and shards and all(v == 0 for v in shards.values()):
        return "all"
    return "none"


def stage_seconds(manifest: dict, stage: str) -> tuple[float | None, str]:
    """Seconds a stage needed, and which manifest entry said so (None when unknown).

    When the stage's last run only reused stored artifacts, its recorded times measure
    the reuse, not the compute: a section that keeps the original time (pretrain's
    ``seconds`` with ``reused: true``) is used, otherwise the time is reported missing.
    Otherwise ``timing.<stage>`` (the pipeline's wall time of the whole stage) comes
    first, then the section's ``seconds`` / ``compute_seconds``; a partly reused run is
    flagged because its time understates the cost.
    """
    section = manifest.get(stage) or {}
    timing = manifest.get(f"timing.{stage}") or {}
    state = reuse_state(section)
    if section.get("reused") is True and _number(section.get("seconds")):
        return float(section["seconds"]), f"{stage}.seconds (reused artifact: original compute time)"
    if state == "all":
        return None, "reused stored artifacts; their original compute time is not recorded"
    flag = " (partly reused: understates the cost)" if state == "partial" else ""
    if _number(timing.get("seconds")):
        return float(timing["seconds"]), f"timing.{stage}{flag}"
    for key in ("seconds", "compute_seconds"):
        if _number(section.get(key)):
            return float(section[key]), f"{stage}.{key}{flag}"
    return None, "not recorded"


def method_stage_seconds(manifest: dict, stage: str, method: str) -> tuple[float | None, str]:
    """Seconds ``stage`` spent on ``method``'s attributions: the stage's own record for
    the method when the stage produces several methods or variants and measures each
    (``<stage>.method_seconds.<method>``: e.g. TRAK at M checkpoints, Datamodels at n
    models: the seconds from scratch, which a stage that reuses files keeps from the run
    that computed them), else the whole stage's seconds (:func:`stage_seconds`)."""
    section = manifest.get(stage) or {}
    per_method = section.get("method_seconds") or {}
    if _number(per_method.get(method)):  # from scratch by contract, so valid after a reusing run too
        return float(per_method[method]), f"{stage}.method_seconds"
    return stage_seconds(manifest, stage)


VARIANT_PATH = "{variant}"  # in a CostSpec path: "" for the method itself, "@<tag>" for a variant


def variant_cost_spec(method: str, specs: dict[str, CostSpec]) -> CostSpec | None:
    """The cost spec of a variant (``trak@m20``): its base method's, with the base's own
    score and ranking paths replaced by the variant's and ``{variant}`` in a path (a
    folder of the stage's own per-variant files, e.g. ``datamodels/regressions{variant}``)
    by ``@<tag>``; None for a base without a spec."""
    from attribution.methods import split_variant

    base, tag = split_variant(method)
    spec = specs.get(base)
    if tag is None or spec is None:
        return None
    paths = tuple(p.replace(f"scores/{base}", f"scores/{method}").replace(f"rankings/{base}-", f"rankings/{method}-")
                  .replace(VARIANT_PATH, f"@{tag}") for p in spec.paths)
    return CostSpec(spec.stages, paths, spec.note)


def path_bytes(exp_dir: str | os.PathLike, pattern: str) -> int | None:
    """Bytes of the files a glob names under EXP (directories recursively); None when
    nothing matches. Hidden and temporary files (leading dot) are left out."""
    root = Path(exp_dir)
    matches = [p for p in root.glob(pattern) if not p.name.startswith(".")]
    if not matches:
        return None
    total = 0
    for path in matches:
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files
                     if not any(part.startswith(".") for part in f.relative_to(root).parts))
    return total


def cost_specs(manifest: dict, overrides: dict[str, CostSpec] | None = None) -> dict[str, CostSpec]:
    """The registered methods' declared specs (:func:`declared_cost_specs`), updated by the
    manifest's ``cost_specs`` section ({method: {stages, paths, note}}: how an experiment
    costs a method the registry does not know, e.g. one written by another version),
    then by ``overrides``."""
    specs = declared_cost_specs()
    for method, entry in (manifest.get("cost_specs") or {}).items():
        if isinstance(entry, dict) and "stages" in entry and "paths" in entry:
            specs[method] = CostSpec(tuple(entry["stages"]), tuple(entry["paths"]), entry.get("note", ""))
    specs.update(overrides or {})
    return specs


def cost_table(exp_dir: str | os.PathLike, methods: Sequence[str], *, manifest: dict | None = None,
               specs: dict[str, CostSpec] | None = None) -> pd.DataFrame:
    """Compute seconds and storage bytes each method needed to produce its attributions.

    Missing stages and paths are listed, never counted as zero: ``seconds`` sums the
    stages that were recorded and ``complete`` is False when any is missing (the true
    cost is then at least ``seconds``). Columns: method, seconds, stages (a breakdown),
    missing_stages, storage_bytes, missing_paths, complete, note.
    """
    root = Path(exp_dir)
    if manifest is None:
        path = root / "manifest.json"
        manifest = json.loads(path.read_text()) if path.exists() else {}
    specs = cost_specs(manifest, specs)
    rows = []
    for method in order_methods(methods):
        spec = specs.get(method)
        if spec is not None:
            spec = CostSpec(spec.stages, tuple(p.replace(VARIANT_PATH, "") for p in spec.paths), spec.note)
        else:
            spec = variant_cost_spec(method, specs)
        if spec is None:
            rows.append({"method": method, "seconds": None, "stages": "", "missing_stages": "no cost spec",
                         "storage_bytes": None, "missing_paths": "no cost spec", "complete": False,
                         "note": (f"{method} declares no cost" if method in available_methods() else
                                  f"{method} is not a registered method") + ": add a cost_specs entry to the manifest"})
            continue
        seconds, parts, missing = 0.0, [], []
        for stage in spec.stages:
            value, source = method_stage_seconds(manifest, stage, method)
            if value is None:
                missing.append(stage if source == "not recorded" else f"{stage} ({source})")
            else:
                seconds += value
                parts.append(f"{stage} {value:.1f} s" + (" (partly reused)" if "partly" in source else ""))
        size, missing_paths = 0, []
        for pattern in spec.paths:
            value = path_bytes(root, pattern)
            if value is None:
                missing_paths.append(pattern)
            else:
                size += value
        known_stages = len(missing) < len(spec.stages)
        rows.append({"method": method, "seconds": seconds if known_stages else None, "stages": " + ".join(parts),
                     "missing_stages": ", ".join(missing), "storage_bytes": size if len(missing_paths) < len(spec.paths) else None,
                     "missing_paths": ", ".join(missing_paths), "complete": not missing and not missing_paths,
                     "note": spec.note})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- helpers


def _number(value) -> bool:
    # numpy scalars count (pandas reductions return them); bools do not
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and bool(np.isfinite(value)))


def modes_of(support_df: pd.DataFrame) -> list[str]:
    """The support modes present in a support table: removal, mislabel, then any other, sorted."""
    present = set(support_df["mode"].unique())
    return [m for m in MODES if m in present] + sorted(present - set(MODES))


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing} (has {list(df.columns)}); was it written by "
                         "this version of the stage that produces it?")


__all__ = [
    "NOT_FOUND", "MODES", "modes_of", "bootstrap_ci", "support_curve", "support_curves", "per_target_auc",
    "support_auc", "support_limit", "support_summary", "pairwise_outcomes", "win_rates", "jaccard",
    "ClaimSpec", "CLAIMS", "MIN_PAIRED_TARGETS", "censored_supports", "claim_verdict", "paired_support_difference",
    "claims_table",
    "ranked_lists", "topk_jaccard", "support_set_jaccard", "LDSResult", "lds", "spearman_columns", "LDSData",
    "masks_from_long", "load_lds_data", "lds_per_target", "lds_table", "outside_policy", "score_summary",
    "tied_fraction", "MOSTLY_TIED", "ranking_ties", "tie_warnings", "FRONTIER_METRICS", "frontier_table", "CostSpec", "declared_cost_specs", "reuse_state",
    "stage_seconds", "method_stage_seconds", "variant_cost_spec", "path_bytes", "cost_specs", "cost_table",
]
