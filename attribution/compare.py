"""Comparison of several experiments (a preset and its ablations) from their stored tables.

An ablation runs in its own experiment directory (``attribution run PRESET --ablation
NAME`` writes runs/PRESET-NAME), so its supports are not in the baseline's report. This
module puts the support summaries of several experiments side by side: one row per
(experiment, method, mode) with the AUC of the support curve and its bootstrap interval
over targets, computed exactly as the per-experiment report does
(:func:`attribution.metrics.support_summary`), plus one figure (drawn with the report's
figure helpers, :mod:`attribution.plots`; written through :mod:`attribution.artifacts`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from attribution import metrics as M
from attribution.artifacts import atomic_path, write_text
from attribution.experiment import Experiment
from attribution.methods import order_methods
from attribution.plots import markdown_table, method_colors, new_figure, save_figure


def experiment_label(exp_dir: str | os.PathLike) -> str:
    """The preset name and ablation the experiment recorded, else its folder name."""
    manifest = Experiment(exp_dir).manifest()
    preset = (manifest.get("preset") or {}).get("preset") or {}
    name = preset.get("name") or Path(exp_dir).name
    return f"{name} [{preset['ablation']}]" if preset.get("ablation") else name


def compare_experiments(exp_dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None = None, *,
                        n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Support summaries of every experiment, with ``experiment`` and ``limit`` columns."""
    if not exp_dirs:
        raise ValueError("give at least one experiment directory to compare")
    if labels is not None and len(labels) != len(exp_dirs):
        raise ValueError(f"{len(labels)} labels for {len(exp_dirs)} experiments: give one label per experiment")
    if labels is not None and len(set(labels)) != len(labels):
        raise ValueError(f"the labels {list(labels)} repeat a name: give each experiment its own label")
    if labels is None:  # two runs of one preset: tell them apart by folder (one table row / bar each)
        names = [experiment_label(exp_dir) for exp_dir in exp_dirs]
        labels = [f"{name} ({Path(exp_dir).name})" if names.count(name) > 1 else name
                  for name, exp_dir in zip(names, exp_dirs)]
        labels = [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    frames = []
    for position, exp_dir in enumerate(exp_dirs):
        exp = Experiment(exp_dir)
        if not exp.support.exists():
            raise FileNotFoundError(f"{exp.support} does not exist: run the support stage of that experiment first "
                                    f"('attribution support --exp {exp.root}')")
        support = pd.read_parquet(exp.support)
        limit, _ = M.support_limit(exp.manifest(), support)
        if limit is None:
            raise ValueError(f"{exp.root}: cannot tell the largest k its support stage tried")
        summary = M.support_summary(support, limit, n_boot=n_boot, confidence=confidence, seed=seed)
        summary.insert(0, "experiment", labels[position])
        summary.insert(1, "limit", limit)
        frames.append(summary)
    return pd.concat(frames, ignore_index=True)


def plot_comparison(table: pd.DataFrame, path: Path) -> Path:
    """AUC with its interval per (experiment, method), one panel per mode."""
    modes = M.modes_of(table)
    methods = order_methods(table["method"].unique())
    experiments = list(dict.fromkeys(table["experiment"]))
    colors = method_colors(methods)
    fig = new_figure(max(5.0, 1.2 * len(experiments) * len(modes) + 2), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(modes), sharey=True))
    width = 0.8 / max(1, len(methods))
    for ax, mode in zip(axes, modes):
        for j, method in enumerate(methods):
            part = table[(table["mode"] == mode) & (table["method"] == method)].set_index("experiment")
            xs = [i + (j - (len(methods) - 1) / 2) * width for i, e in enumerate(experiments) if e in part.index]
            rows = [part.loc[e] for e in experiments if e in part.index]
            if not rows:
                continue
            auc = np.array([r["auc"] for r in rows])
            err = np.array([[r["auc"] - r["auc_low"] for r in rows], [r["auc_high"] - r["auc"] for r in rows]])
            ax.bar(xs, auc, width, yerr=err, color=colors[method], label=method, capsize=2)
        ax.set_xticks(range(len(experiments)), experiments, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{mode} support: AUC (higher = smaller supports)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("normalised AUC of the support curve")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def claims_lines(exp_dirs: Sequence[str | os.PathLike], *, n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> list[str]:
    """The claims table (:func:`attribution.metrics.claims_table`) with the first
    experiment as the base and the others as its ablations (by the ablation each
    records); no lines when none of the others is an ablation."""
    runs = {}
    for exp_dir in exp_dirs[1:]:
        preset = (Experiment(exp_dir).manifest().get("preset") or {}).get("preset") or {}
        if preset.get("ablation"):
            runs[preset["ablation"]] = pd.read_parquet(Experiment(exp_dir).support)
    if not runs:
        return []
    base = Experiment(exp_dirs[0])
    support = pd.read_parquet(base.support)
    preset = (base.manifest().get("preset") or {}).get("preset") or {}
    table = M.claims_table(support, runs, preset=preset.get("name", "PRESET"),
                           limit=M.support_limit(base.manifest(), support)[0], n_boot=n_boot,
                           confidence=confidence, seed=seed)
    compared = table["status"] == "compared"
    shown = pd.DataFrame({
        "claim": table["claim"], "mode": table["mode"], "A": table["a"], "B": table["b"],
        "n": [str(int(n)) if c else "-" for n, c in zip(table["n"], compared)],
        "B - A (images)": [f"{r.mean:.1f} [{r.low:.1f}, {r.high:.1f}]" if c else "-"
                           for r, c in zip(table.itertuples(), compared)],
        "verdict": [r.verdict if c and r.verdict else r.status for r, c in zip(table.itertuples(), compared)],
        "note": table["note"]})
    return ["## Claims (the first experiment as the base)", "",
            f"Paired per-target support differences (not found = limit + 1) with {confidence:.0%} bootstrap "
            "intervals; the same table as the base's report (attribution/report.py).", "",
            *markdown_table(shown), ""]


def write_comparison(exp_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                     labels: Sequence[str] | None = None, **kwargs) -> tuple[Path, Path]:
    """``out_dir``/comparison.md (+ comparison.csv, comparison.png); returns (md, csv)."""
    table = compare_experiments(exp_dirs, labels, **kwargs)
    out = Path(out_dir)  # created only now: a comparison that fails leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "comparison.csv"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    png = plot_comparison(table, out / "comparison.png")
    shown = table[["experiment", "method", "mode", "n_targets", "n_found", "median_support", "auc",
                   "auc_low", "auc_high", "limit"]].copy()
    for column in ("median_support", "auc", "auc_low", "auc_high"):
        shown[column] = shown[column].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
    lines = ["# Comparison of experiments", "",
             "AUC of the fraction-of-targets-with-support-<=-k curve (higher: smaller supports), with a "
             f"{int(kwargs.get('confidence', 0.95) * 100)}% bootstrap interval over targets. Experiments: "
             + ", ".join(f"`{os.fspath(e)}`" for e in exp_dirs) + "."]
    if table["limit"].nunique() > 1:
        lines += ["", "Note: the experiments tried different largest k (`limit`), so their AUCs are on "
                      "different scales."]
    lines += ["", *markdown_table(shown), "", f"![AUC per experiment]({png.name})", ""]
    lines += claims_lines(exp_dirs, **{k: v for k, v in kwargs.items() if k in ("n_boot", "confidence", "seed")})
    md_path = out / "comparison.md"
    write_text(md_path, "\n".join(lines))
    return md_path, csv_path
