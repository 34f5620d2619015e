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


def lds(masks: np.ndarray, margins: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000,
        confidence: float = 0.95, seed: int = 0) -> LDSResult:
    """Linear datamodeling score (Park et al. 2023, TRAK).

    masks (n_models, n_train) bool: which training images each subset model saw;
    margins (n_models, n_targets): each model's measured margin on each target;
    scores (n_targets, n_train): the attribution scores. The predicted group effect of
    subset S_m on target t is g(m, t) = sum_{i in S_m} scores[t, i]; LDS(t) is the
    Spearman correlation over models between g(., t) and margins(., t); the reported
    LDS is the mean over targets. Targets whose predictions or margins are constant
    over models have no correlation (nan) and are left out of the mean.
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
    predicted = masks.astype(np.float64) @ scores.T  # (n_models, n_targets)
    rp, rm = _rank_columns(predicted), _rank_columns(margins)
    rp -= rp.mean(axis=0)
    rm -= rm.mean(axis=0)
    denom = np.sqrt((rp ** 2).sum(axis=0) * (rm ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (rp * rm).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)
    ci = _mean_with_ci(rho, n_boot, confidence, seed)
    return LDSResult(rho, ci["mean"], ci["low"], ci["high"], int(np.sum(~np.isnan(rho))))


def scores_matrix(rankings_df: pd.DataFrame, method: str, target_ids, train_ids, *,
                  fill: float | str = "min") -> np.ndarray:
    """Dense (n_targets, n_train) scores of one method from its (top-k) rankings.

    Training images a ranking does not list get ``fill``: a number, or "min" (each
    target's lowest stored score). "min" is the default because a ranking claims the
    unlisted images are no more influential than its last entry, and ESVM decision
    values are mostly negative, so filling 0 would put the unlisted images above the
    listed ones. Targets without a ranking get all-``fill`` rows (0 for "min").
    Raises ValueError when the rankings name training ids outside ``train_ids`` (the
    LDS models were then trained on another training set).
    """
    target_ids = np.asarray(target_ids, dtype=np.int64)
    train_ids = np.asarray(train_ids, dtype=np.int64)
    part = rankings_df[(rankings_df["method"] == method) & rankings_df["target_id"].isin(target_ids)]
    t_pos = pd.Index(target_ids).get_indexer(part["target_id"].to_numpy())
    i_pos = pd.Index(train_ids).get_indexer(part["train_id"].to_numpy())
    if (i_pos < 0).any():
        missing = part["train_id"].to_numpy()[i_pos < 0][:5].tolist()
        raise ValueError(f"{method} rankings name training ids {missing}... that the LDS masks do not cover; "
                         "the subset models must be trained on the same training set as the rankings")
    out = np.zeros((len(target_ids), len(train_ids)), dtype=np.float64)
    values = part["score"].to_numpy(dtype=np.float64)
    if fill == "min":
        lows = pd.Series(values).groupby(t_pos).min()
        out[:] = 0.0
        out[lows.index.to_numpy()] = lows.to_numpy()[:, None]
    elif isinstance(fill, (int, float)):
        out[:] = float(fill)
    else:
        raise ValueError(f"fill must be a number or 'min', got {fill!r}")
    out[t_pos, i_pos] = values
    return out


@dataclass
class LDSData:
    """Subset-model masks and target margins, aligned to ``train_ids`` and ``target_ids``."""

    masks: np.ndarray
    margins: np.ndarray
    train_ids: np.ndarray
    target_ids: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)


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


def lds_table(rankings_df: pd.DataFrame, data: LDSData, *, methods: Sequence[str] | None = None,
              fill: float | str = "min", n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """LDS per method on the targets that have both margins and that method's rankings."""
    rows = []
    for method in order_methods(methods or rankings_df["method"].unique()):
        ranked = set(rankings_df.loc[rankings_df["method"] == method, "target_id"].astype(np.int64))
        cols = np.array([i for i, t in enumerate(data.target_ids) if int(t) in ranked], dtype=np.int64)
        if len(cols) == 0:
            continue
        scores = scores_matrix(rankings_df, method, data.target_ids[cols], data.train_ids, fill=fill)
        result = lds(data.masks, data.margins[:, cols], scores, n_boot=n_boot, confidence=confidence, seed=seed)
        rows.append({"method": method, "n_targets": len(cols), "n_valid": result.n_valid,
                     "n_models": int(data.masks.shape[0]), "lds": result.mean, "lds_low": result.low,
                     "lds_high": result.high})
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
        if spec is None:
            rows.append({"method": method, "seconds": None, "stages": "", "missing_stages": "no cost spec",
                         "storage_bytes": None, "missing_paths": "no cost spec", "complete": False,
                         "note": (f"{method} declares no cost" if method in available_methods() else
                                  f"{method} is not a registered method") + ": add a cost_specs entry to the manifest"})
            continue
        seconds, parts, missing = 0.0, [], []
        for stage in spec.stages:
            value, source = stage_seconds(manifest, stage)
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
    "ranked_lists", "topk_jaccard", "support_set_jaccard", "LDSResult", "lds", "scores_matrix", "LDSData",
    "masks_from_long", "load_lds_data", "lds_table", "CostSpec", "declared_cost_specs", "reuse_state",
    "stage_seconds", "path_bytes", "cost_specs", "cost_table",
]
