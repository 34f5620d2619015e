"""Figures and tables shared by the report (:mod:`attribution.report`) and the
comparison of experiments (:mod:`attribution.compare`).

Figures are bare matplotlib ``Figure`` objects rendered through Agg (no pyplot: no
global backend switch, no display, nothing leaks between reports) and saved through
:func:`attribution.artifacts.atomic_path`, so a reader never sees half a PNG. Colours
follow the method registry's order (:func:`attribution.methods.available_methods`),
so a method keeps its colour in every figure of every report.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from attribution import metrics as M
from attribution.artifacts import atomic_path
from attribution.methods import available_methods, order_methods

# matplotlib's tab10, then five more: one colour per registered method (11 today)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


# ----------------------------------------------------------------------------- primitives


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A bare Agg-rendered Figure of ``width`` x ``height`` inches at 100 dpi."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """``fig`` as a PNG at ``path``, written atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def method_colors(methods: Sequence[str]) -> dict:
    """A colour per method: registered methods by their registry position, others
    (e.g. from an old experiment) take the remaining colours in turn."""
    known = available_methods()
    fixed = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(known)}
    extra = itertools.cycle(PALETTE[len(known):] + PALETTE)
    return {m: fixed.get(m) or next(extra) for m in methods}


def markdown_table(df: pd.DataFrame) -> list[str]:
    """The lines of a Markdown table of ``df`` (cells as ``str``, ``|`` escaped)."""
    cells = df.astype(str).to_numpy().tolist()
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return lines


# ----------------------------------------------------------------------------- the report's figures


def plot_support_curves(support_df: pd.DataFrame, summary: pd.DataFrame, limit: int, path: Path) -> Path:
    """Fraction of targets with support <= k against k, one panel per mode."""
    modes = M.modes_of(support_df)
    methods = order_methods(support_df["method"].unique())
    colors = method_colors(methods)
    fig = new_figure(5.2 * len(modes), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(modes), sharey=True))
    ks = np.unique(np.round(np.geomspace(1, max(limit, 2), 400)).astype(int))
    for ax, mode in zip(axes, modes):
        for method in methods:
            part = support_df[(support_df["method"] == method) & (support_df["mode"] == mode)]
            if part.empty:
                continue
            row = summary[(summary["method"] == method) & (summary["mode"] == mode)].iloc[0]
            ax.step(ks, M.support_curve(part["support"], ks), where="post", color=colors[method], lw=2,
                    label=f"{method} (AUC {row['auc']:.3f}, n={row['n_targets']})")
        ax.set_xscale("log")
        ax.set_xlim(1, limit)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"k (training images {'removed' if mode == 'removal' else 'relabelled'})")
        ax.set_title(f"{mode} support")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("fraction of targets with support <= k")
    return save_figure(fig, path)


def plot_frontier(frontier: pd.DataFrame, path: Path) -> Path | None:
    """Removal support AUC, mislabel support AUC and LDS (one panel each) against the
    compute seconds that produced each method's attributions (log x-axis).

    ``frontier``: :func:`attribution.metrics.frontier_table`. Every method and variant
    with seconds is a point, with its interval as a bar; the points of one base method
    (``trak``, ``trak@m1``, ``trak@m20``) are joined in order of seconds and labelled by
    their tag; hollow markers: the cost is a lower bound (some stage times missing).
    None when no method has both seconds and a metric."""
    placed = frontier[pd.to_numeric(frontier["seconds"]).notna() & (pd.to_numeric(frontier["seconds"]) > 0)]
    if placed.empty or all(placed[key].isna().all() for key, _ in M.FRONTIER_METRICS):
        return None
    bases = list(dict.fromkeys(placed["base"]))
    colors = method_colors(bases)
    fig = new_figure(5.0 * len(M.FRONTIER_METRICS), 4.3)
    axes = np.atleast_1d(fig.subplots(1, len(M.FRONTIER_METRICS)))
    low_x, high_x = placed["seconds"].min(), placed["seconds"].max()
    for ax, (key, label) in zip(axes, M.FRONTIER_METRICS):
        shown = placed[placed[key].notna()]
        for base in bases:
            part = shown[shown["base"] == base].sort_values("seconds")
            if part.empty:
                continue
            color = colors[base]
            if len(part) > 1:
                ax.plot(part["seconds"], part[key], "-", color=color, lw=1.2, alpha=0.7)
            for row in part.itertuples():
                value, low, high = getattr(row, key), getattr(row, f"{key}_low"), getattr(row, f"{key}_high")
                yerr = None if np.isnan(low) or np.isnan(high) else [[value - low], [high - value]]
                ax.errorbar(row.seconds, value, yerr=yerr, fmt="o", color=color, ms=7, capsize=3,
                            mfc=color if row.cost_complete else "white")
                tag = row.method.split("@", 1)[1] if "@" in row.method else row.method
                ax.annotate(tag, (row.seconds, value), textcoords="offset points", xytext=(6, 4), fontsize=8,
                            color=color)
            ax.plot([], [], "o-", color=color, label=base)
        ax.set_xscale("log")
        ax.set_xlim(low_x / 2, high_x * 3)  # room for the labels right of the points on a log axis
        ax.set_xlabel("compute seconds to produce the attributions (log)")
        ax.set_ylabel(f"{label} (higher is better)")
        ax.set_title(label if len(shown) else f"{label}: no method has it", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if len(shown):
            ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_further_agreement(table: pd.DataFrame, path: Path) -> Path | None:
    """Wei et al.'s main figure: each method's mean cosine similarity and Spearman
    correlation with the further-training gold scores against the further-training
    length (epochs), intervals as bands. ``table``: :func:`attribution.metrics.further_agreement_table`."""
    if table.empty:
        return None
    methods = list(dict.fromkeys(table["method"]))
    colors = method_colors(methods)
    fig = new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2)
    for ax, (measure, label) in zip(axes, (("cosine", "cosine similarity"), ("spearman", "Spearman correlation"))):
        for method in methods:
            part = table[table["method"] == method].sort_values("epoch")
            ax.plot(part["epoch"], part[measure], "o-", color=colors[method], label=method, ms=4)
            ax.fill_between(part["epoch"], part[f"{measure}_low"], part[f"{measure}_high"], color=colors[method],
                            alpha=0.15)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("epochs of further training")
        ax.set_ylabel(f"{label} with the gold scores")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_support_scatter(support_df: pd.DataFrame, reference: str, limit: int, path: Path) -> Path | None:
    """Per-target supports, ``reference`` (x) against every other method (y), per mode.

    Not-found supports sit on a separate line beyond the limit; points below the
    diagonal are targets where the other method found the smaller support.
    """
    modes = M.modes_of(support_df)
    others = [m for m in order_methods(support_df["method"].unique()) if m != reference]
    if not others:
        return None
    nf = limit * 2.0  # where "not found" is drawn (log axes: a clear band past the limit)
    fig = new_figure(3.6 * len(modes), 3.3 * len(others))
    axes = np.atleast_2d(fig.subplots(len(others), len(modes), squeeze=False))
    rng = np.random.default_rng(0)  # jitter only, so tied points stay visible
    for i, other in enumerate(others):
        for j, mode in enumerate(modes):
            ax = axes[i, j]
            table = (support_df[support_df["mode"] == mode]
                     .pivot_table(index="target_id", columns="method", values="support", aggfunc="first"))
            if reference not in table or other not in table or table[[reference, other]].dropna().empty:
                ax.text(0.5, 0.5, "no common targets", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            pair = table[[reference, other]].dropna().to_numpy(dtype=float)
            x = np.where(pair[:, 0] < 0, nf, np.maximum(pair[:, 0], 0.8))
            y = np.where(pair[:, 1] < 0, nf, np.maximum(pair[:, 1], 0.8))
            jitter = np.exp(rng.normal(0, 0.04, size=(2, len(x))))
            ax.scatter(x * jitter[0], y * jitter[1], s=18, alpha=0.6, color="#1f77b4")
            ax.plot([0.8, nf * 1.3], [0.8, nf * 1.3], color="k", lw=0.8)
            for line in (ax.axvline, ax.axhline):
                line(limit * 1.4, color="grey", ls="--", lw=0.8)
            ax.text(nf, 0.75, "not\nfound", ha="center", va="bottom", fontsize=7, color="grey")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(0.7, nf * 1.4)
            ax.set_ylim(0.7, nf * 1.4)
            outcome = M.pairwise_outcomes(pair[:, 0].astype(int), pair[:, 1].astype(int))
            ax.set_title(f"{mode}: {reference} smaller {int((outcome > 0).sum())}, "
                         f"tie {int((outcome == 0).sum())}, {other} smaller {int((outcome < 0).sum())}", fontsize=8)
            ax.set_xlabel(f"{reference} support (past dashes: not found)", fontsize=8)
            ax.set_ylabel(f"{other} support (past dashes: not found)", fontsize=8)
    return save_figure(fig, path)


def plot_top_ranked(target_ids, lists: dict, methods: Sequence[str], train_set, test_set, top: int,
                    path: Path, supports: pd.DataFrame | None = None) -> Path:
    """One row per (target, method): the target image, then its top-ranked training images.

    A red frame marks a training image whose label differs from the target's (the
    same-class methods never show one; TRAK and Datamodels may). The tiles are pasted
    into one pixel canvas drawn by a single imshow: a grid of hundreds of axes takes
    seconds to lay out, a canvas milliseconds.
    """
    rows = [(t, m) for t in target_ids for m in methods if (m, t) in lists]
    uniq = sorted(set(target_ids))
    test_pos = test_set.positions_of(np.asarray(uniq, dtype=np.int64))
    target_image = dict(zip(uniq, test_set.images(test_pos)))
    target_label = dict(zip(uniq, test_set.labels[test_pos]))
    h, w = test_set.image_shape[:2]
    pad, gap, frame = max(2, h // 10), max(12, h // 2), max(1, h // 16)
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    group_starts = [i for i, (t, _) in enumerate(rows) if i == 0 or rows[i - 1][0] != t]
    y0, y = [], 0
    for i in range(len(rows)):
        y += gap if i in group_starts and i else 0
        y0.append(y)
        y += cell_h
    canvas = np.full((y, (top + 1) * cell_w + gap, 3), 255, dtype=np.uint8)

    def paste(image, top_y, left_x, red=False):
        image = _rgb(image)
        if red:
            canvas[top_y + pad - frame:top_y + pad + h + frame, left_x + pad - frame:left_x + pad + w + frame] = (220, 30, 30)
        canvas[top_y + pad:top_y + pad + h, left_x + pad:left_x + pad + w] = image

    labels_text = []
    for i, (target, method) in enumerate(rows):
        if i in group_starts:
            paste(target_image[target], y0[i], 0)
        ids = lists[(method, target)][:top]
        pos = train_set.positions_of(ids)
        images, labels = train_set.images(pos), train_set.labels[pos]
        for c in range(len(ids)):
            paste(_resize(images[c], h, w), y0[i], cell_w + gap + c * cell_w, red=labels[c] != target_label[target])
        text = method
        if supports is not None:
            s = supports[(supports["target_id"] == target) & (supports["method"] == method)]
            text += "  " + ", ".join(f"{r.mode[:3]} {r.support if r.support >= 0 else 'nf'}" for r in s.itertuples())
        labels_text.append((y0[i] + cell_h / 2, text))

    inch = 0.75 / cell_h  # one tile row is 0.75 inch tall
    fig = new_figure(canvas.shape[1] * inch + 2.2, canvas.shape[0] * inch + 0.5, layout=None)
    ax = fig.add_axes([2.0 / (canvas.shape[1] * inch + 2.2), 0.0, 1 - 2.05 / (canvas.shape[1] * inch + 2.2),
                       canvas.shape[0] * inch / (canvas.shape[0] * inch + 0.5)])
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for y_mid, text in labels_text:
        ax.text(-gap / 2, y_mid, text, ha="right", va="center", fontsize=8)
    for i in group_starts:
        target = rows[i][0]
        label = target_label[target]
        name = test_set.classes[label] if label < len(test_set.classes) else str(label)
        ax.text(cell_w / 2, y0[i] - 2, f"target {target}\n{name}", ha="center", va="bottom", fontsize=7)
    for c in range(top):
        ax.text(cell_w + gap + c * cell_w + cell_w / 2, -2, f"#{c + 1}", ha="center", va="bottom", fontsize=7)
    return save_figure(fig, path)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Training and test images share a shape in every loader; this only guards the canvas."""
    if image.shape[:2] == (h, w):
        return image
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(pil.resize((w, h)))
    return out[..., None] if out.ndim == 2 else out
