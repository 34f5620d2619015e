"""The experiment report: EXP/report.md and EXP/report.html from the stored tables alone.

``write_report(EXP)`` reads whatever the stages have written so far (rankings only,
rankings + support, ...), computes the metrics of :mod:`attribution.metrics`, draws
PNGs into EXP/report_files/ and writes the two documents. Sections whose inputs are
missing say so and name the command that produces them, so a half-finished experiment
still gets a useful report. Nothing is recomputed and Ray is never started.

The HTML is self-contained (PNGs embedded as base64) so it can be mailed or attached
to a ticket; the Markdown references the PNG files next to it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from attribution import metrics as M
from attribution.experiment import Experiment, read_dataset

# Which command writes each artifact; shown when the artifact is missing.
PRODUCERS = {
    "manifest": "attribution run PRESET --exp EXP",
    "rankings": "attribution rank --exp EXP",
    "support": "attribution support --exp EXP",
    "trainings": "attribution support --exp EXP",
    "lds": "the datamodels / LDS stage (EXP/lds/ or EXP/datamodels/: masks.parquet + margins.parquet)",
}
FILES_DIR = "report_files"


class ReportError(FileNotFoundError):
    """The experiment directory has nothing to report on."""


# ----------------------------------------------------------------------------- loading


def load_tables(exp_dir: str | os.PathLike) -> dict:
    """The stored tables of an experiment as pandas frames (None where missing)."""
    exp = Experiment(exp_dir)
    if not exp.root.is_dir():
        raise ReportError(f"experiment directory {exp.root} does not exist; run "
                          f"'{PRODUCERS['manifest']}' first (or check the path)")
    try:
        manifest = exp.manifest()
    except json.JSONDecodeError as error:
        raise ReportError(f"{exp.manifest_path} is not valid JSON ({error}); restore it or rerun a stage") from error
    out = {"manifest": manifest, "rankings": None, "support": None, "trainings": None, "problems": []}
    readers = {
        "rankings": lambda: read_dataset(exp.rankings).to_pandas(),
        "trainings": lambda: read_dataset(exp.trainings).to_pandas(),
        "support": lambda: pd.read_parquet(exp.support),
    }
    present = {
        "rankings": exp.rankings.is_dir() and any(not p.name.startswith(".") for p in exp.rankings.glob("*.parquet")),
        "trainings": exp.trainings.is_dir() and any(not p.name.startswith(".") for p in exp.trainings.glob("*.parquet")),
        "support": exp.support.exists(),
    }
    for name, reader in readers.items():
        if not present[name]:
            continue
        try:
            out[name] = reader()
        except Exception as error:  # e.g. files of two schema versions: report the rest, name the culprit
            out["problems"].append(f"{name} could not be read ({type(error).__name__}: {error}); rerun "
                                   f"`{PRODUCERS[name]}` to rewrite it")
    if all(out[k] is None for k in ("rankings", "support", "trainings")):
        if out["problems"]:
            raise ReportError(f"{exp.root}: no table could be read: " + "; ".join(out["problems"]))
        raise ReportError(
            f"{exp.root} has no tables to report on (no rankings/*.parquet, support.parquet or "
            f"trainings/*.parquet). Produce them with '{PRODUCERS['rankings']}' and "
            f"'{PRODUCERS['support']}', or run a whole preset: '{PRODUCERS['manifest']}'.")
    return out


# ----------------------------------------------------------------------------- document model


class _Doc:
    """A list of blocks rendered both as Markdown and as HTML, so the two never disagree."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def para(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]):
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, df: pd.DataFrame):
        self.blocks.append(("table", df))

    def image(self, path: Path, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self, base: Path) -> str:
        lines = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                lines += [block[1], ""]
            elif kind == "ul":
                lines += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                lines += _md_table(block[1]) + [""]
            elif kind == "img":
                lines += [f"![{block[2]}]({block[1].relative_to(base).as_posix()})", ""]
        return "\n".join(lines)

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                df = block[1]
                head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
                rows = "".join("<tr>" + "".join(f"<td>{_inline(str(v))}</td>" for v in row) + "</tr>"
                               for row in df.astype(str).itertuples(index=False))
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:right}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape HTML, then render the only Markdown we use inline: `code` and **bold**."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{part}</code>")
        else:
            bits = part.split("**")
            out.append("".join(f"<b>{b}</b>" if j % 2 else b for j, b in enumerate(bits)))
    return "".join(out)


def _md_table(df: pd.DataFrame) -> list[str]:
    cells = df.astype(str).to_numpy().tolist()
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return lines


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def _ci(mean, low, high, digits: int = 3) -> str:
    if mean is None or np.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _bytes(n) -> str:
    if n is None or (isinstance(n, float) and np.isnan(n)):
        return "missing"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _seconds(s) -> str:
    if s is None or (isinstance(s, float) and np.isnan(s)):
        return "missing"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


# ----------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float, layout: str | None = "constrained"):
    # A bare Figure renders through Agg without pyplot: no global backend switch, no
    # display needed, and nothing leaks between reports.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)  # a reader never sees half a PNG
    return path


def _colors(methods: Sequence[str]) -> dict:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    fixed = {m: palette[i] for i, m in enumerate(M.METHOD_ORDER)}
    extra = iter(palette[len(M.METHOD_ORDER):] + palette)
    return {m: fixed.get(m) or next(extra) for m in methods}


def plot_support_curves(support_df: pd.DataFrame, summary: pd.DataFrame, limit: int, path: Path) -> Path:
    """Fraction of targets with support <= k against k, one panel per mode."""
    modes = M._modes(support_df)
    methods = M.order_methods(support_df["method"].unique())
    colors = _colors(methods)
    fig = _new_figure(5.2 * len(modes), 4.0)
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
    return _save(fig, path)


def plot_quality_vs_cost(summary: pd.DataFrame, costs: pd.DataFrame, path: Path) -> Path | None:
    """AUC (with CI) against the compute seconds that produced the attributions."""
    # summary's own "seconds" is the retraining cost of the evaluation: keep it apart
    merged = summary.drop(columns=["seconds"], errors="ignore").merge(
        costs[["method", "seconds", "missing_stages"]], on="method", how="inner")
    merged["timed"] = merged["missing_stages"].fillna("") == ""
    merged = merged[pd.to_numeric(merged["seconds"]).notna() & (pd.to_numeric(merged["seconds"]) > 0)]
    if merged.empty:
        return None
    colors = _colors(M.order_methods(merged["method"].unique()))
    markers = {"removal": "o", "mislabel": "s"}
    fig = _new_figure(6.0, 4.2)
    ax = fig.subplots()
    for _, row in merged.iterrows():
        color = colors[row["method"]]
        ax.errorbar(row["seconds"], row["auc"], yerr=[[row["auc"] - row["auc_low"]], [row["auc_high"] - row["auc"]]],
                    fmt=markers.get(row["mode"], "^"), color=color, ms=8, capsize=3,
                    mfc=color if row["timed"] else "white")
    for method, rows in merged.groupby("method"):  # one label per method, above its highest point
        best = rows.loc[rows["auc"].idxmax()]
        ax.annotate(method + ("" if best["timed"] else " (>=)"), (best["seconds"], best["auc"]),
                    textcoords="offset points", xytext=(7, 6), fontsize=9, color=colors[method])
    for mode, marker in markers.items():
        if (merged["mode"] == mode).any():
            ax.plot([], [], marker, color="k", mfc="none", label=f"{mode} support")
    ax.set_xscale("log")
    # room for the labels right of the points on a log axis
    ax.set_xlim(merged["seconds"].min() / 2, merged["seconds"].max() * 3)
    ax.set_xlabel("compute seconds to produce the attributions (log)")
    ax.set_ylabel("support AUC (higher is better)")
    ax.set_title("quality against cost (hollow: some stage times missing, cost >= x)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_support_scatter(support_df: pd.DataFrame, reference: str, limit: int, path: Path) -> Path | None:
    """Per-target supports, ``reference`` (x) against every other method (y), per mode.

    Not-found supports sit on a separate line beyond the limit; points below the
    diagonal are targets where the other method found the smaller support.
    """
    modes = M._modes(support_df)
    others = [m for m in M.order_methods(support_df["method"].unique()) if m != reference]
    if not others:
        return None
    nf = limit * 2.0  # where "not found" is drawn (log axes: a clear band past the limit)
    fig = _new_figure(3.6 * len(modes), 3.3 * len(others))
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
    return _save(fig, path)


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
    fig = _new_figure(canvas.shape[1] * inch + 2.2, canvas.shape[0] * inch + 0.5, layout=None)
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
    return _save(fig, path)


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


# ----------------------------------------------------------------------------- the report


def default_image_loader(manifest: dict) -> Callable[[str], object]:
    """Load a split of the preset's dataset (whole split: ids are stable under subsetting,
    so positions_of finds every ranked id without redoing the per-class subset)."""
    from attribution.data import load_dataset

    data = ((manifest.get("preset") or {}).get("preset") or {}).get("data") or {}
    if not data.get("dataset"):
        raise ValueError("the manifest has no preset data section (dataset, root), so the images cannot be found")

    def load(split: str):
        return load_dataset(data["dataset"], split, root=data.get("root") or None)

    return load


def write_report(exp_dir: str | os.PathLike, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                 jaccard_ks: Sequence[int] = (10, 100), grid_targets: int = 4, grid_top: int = 8,
                 lds_fill: float | str = "min", image_loader: Callable[[str], object] | None = None,
                 ) -> tuple[Path, Path]:
    """Write EXP/report.md, EXP/report.html and EXP/report_files/*.png; return (md, html).

    n_boot, confidence, seed: bootstrap over targets for every mean over targets.
    jaccard_ks: the k of the top-k overlap tables. grid_targets, grid_top: how many
    targets (seeded choice) and top-ranked images per method the image grid shows.
    lds_fill: score of training images a ranking does not list, for LDS
    (:func:`attribution.metrics.scores_matrix`). image_loader: split -> ImageSet
    (default: the preset's dataset); a loader that fails only drops the image grid.
    """
    root = Path(exp_dir)
    tables = load_tables(root)
    manifest, rankings, support, trainings = (tables[k] for k in ("manifest", "rankings", "support", "trainings"))
    files = root / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    doc, missing = _Doc(), list(tables["problems"])
    boot = {"n_boot": n_boot, "confidence": confidence, "seed": seed}
    ci_text = (f"Brackets: {confidence:.0%} percentile bootstrap intervals over targets "
               f"({n_boot} resamples, seed {seed}).")

    # ---- header
    preset = (manifest.get("preset") or {}).get("preset") or {}
    data = preset.get("data") or {}
    doc.heading(1, f"Attribution report: {preset.get('name') or root.name}")
    doc.para(f"Experiment `{root}`; written {time.strftime('%Y-%m-%d %H:%M:%S')} from the stored tables only.")
    facts = [f"dataset: **{data.get('dataset', 'unknown')}**"
             + (f" (root `{data['root']}`)" if data.get("root") else ""),
             f"training images per class: {data.get('train_per_class', 'all')}, "
             f"test images per class: {data.get('test_per_class', 'all')}, data seed {data.get('seed', preset.get('seed', '–'))}"]
    if rankings is not None:
        top_len = rankings.groupby(["method", "target_id"]).size()
        facts.append(f"rankings: {rankings['target_id'].nunique()} targets, methods "
                     f"{', '.join(M.order_methods(rankings['method'].unique()))}, "
                     f"{int(top_len.min())}–{int(top_len.max())} ranked training images per target")
    if support is not None:
        facts.append(f"support: {len(support)} (target, method, mode) rows, "
                     f"{support['target_id'].nunique()} targets, modes {', '.join(M._modes(support))}")
    for stage in ("pretrain", "embed", "rank", "support"):
        section = manifest.get(stage) or {}
        # scalars of the section and of its nested "settings" (the support stage nests them)
        flat = {**(section.get("settings") if isinstance(section.get("settings"), dict) else {}), **section}
        settings = {k: v for k, v in flat.items()
                    if isinstance(v, (int, float, str, bool)) and k not in ("updated", "checkpoint", "config_hash")}
        if settings:
            facts.append(f"{stage} settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    doc.bullets(facts)
    timing = sorted((k[len("timing."):], v.get("seconds")) for k, v in manifest.items()
                    if k.startswith("timing.") and isinstance(v, dict))
    if timing:
        doc.table(pd.DataFrame({"stage": [s for s, _ in timing], "wall time": [_seconds(v) for _, v in timing]}))
    else:
        doc.para("No stage timings in the manifest (stages run one by one do not record `timing.<stage>`).")

    # ---- missing artifacts, up front so the reader knows what the report cannot show
    if not manifest:
        missing.append(f"manifest.json (settings, timings): `{PRODUCERS['manifest']}`")
    if rankings is None:
        missing.append(f"rankings/ (overlap tables, image grid, LDS): `{PRODUCERS['rankings']}`")
    if support is None:
        missing.append(f"support.parquet (support curves, AUC, win rates, cost plot): `{PRODUCERS['support']}`")
    if trainings is None:
        missing.append(f"trainings/ (retraining log): `{PRODUCERS['trainings']}`")
    lds_data = None
    try:
        lds_data = M.load_lds_data(root)
    except (ValueError, OSError) as error:
        missing.append(f"LDS masks/margins are unreadable: {error}")
    if lds_data is None:
        missing.append(f"LDS masks and margins: {PRODUCERS['lds']}")

    if missing:
        doc.heading(2, "Not yet available")
        doc.bullets(missing)

    limit, limit_source = M.support_limit(manifest, support)
    if limit is not None and support is not None and len(support) and int(support["support"].max()) > limit:
        # e.g. the support stage searched further than the rank stage's top_k: the AUC must
        # cover every found support, so widen the range and say why
        limit = int(support["support"].max())
        limit_source = f"the largest found support, which exceeds the recorded limit ({limit_source})"
    summary = None
    lists = M.ranked_lists(rankings) if rankings is not None else None

    # ---- data support
    doc.heading(2, "Data support")
    if support is None:
        doc.para(f"No support table yet: run `{PRODUCERS['support']}`.")
    elif limit is None:
        doc.para("The support table has no found supports and no limit is recorded; nothing to plot.")
    else:
        summary = M.support_summary(support, limit, **boot)
        doc.para(f"Support of a target: the fewest top-ranked training images whose removal (or relabelling "
                 f"to the flip class) makes a retrained model misclassify it; smaller is better. "
                 f"AUC: area under the fraction of targets with support <= k over k in [0, {limit}] "
                 f"(limit from {limit_source}), normalised to [0, 1]; **higher is better**; not found counts "
                 f"as never. {ci_text}")
        shown = summary.assign(
            found=[f"{r.n_found}/{r.n_targets}" for r in summary.itertuples()],
            median_support=summary["median_support"].map(lambda v: _fmt(v, 1)),
            AUC=[_ci(r.auc, r.auc_low, r.auc_high) for r in summary.itertuples()],
            trainings=summary["trainings"].map(_fmt),
            retrain_time=summary["seconds"].map(_seconds))
        doc.table(shown[["method", "mode", "found", "median_support", "AUC", "trainings", "retrain_time"]])
        if support.groupby(["method", "mode"])["target_id"].apply(frozenset).nunique() > 1:
            doc.para("Methods were evaluated on different target sets: compare AUCs with care; "
                     "the win rates below use common targets only.")
        doc.image(plot_support_curves(support, summary, limit, files / "support_curves.png"),
                  "Support curves per method and mode (log k axis)")

        doc.heading(3, "Per-target comparisons")
        wins = M.win_rates(support, **boot)
        if wins.empty:
            doc.para("No pair of methods shares a target.")
        else:
            doc.para("A beats B on a target when A's support is smaller (not found = infinite; two not-founds tie). "
                     + ci_text)
            doc.table(pd.DataFrame({
                "mode": wins["mode"], "A": wins["method_a"], "B": wins["method_b"], "targets": wins["n_targets"],
                "A smaller": [_ci(r.win_rate, r.win_low, r.win_high) for r in wins.itertuples()],
                "tie": wins["tie_rate"].map(_fmt), "B smaller": wins["loss_rate"].map(_fmt)}))
        methods_s = M.order_methods(support["method"].unique())
        reference = "esvm" if "esvm" in methods_s else methods_s[0]
        scatter = plot_support_scatter(support, reference, limit, files / "support_scatter.png")
        if scatter:
            doc.image(scatter, f"Per-target supports: {reference} against each other method")

    # ---- overlap
    doc.heading(2, "Overlap between methods")
    if rankings is None:
        doc.para(f"No rankings yet: run `{PRODUCERS['rankings']}`.")
    else:
        # k beyond the longest ranking would repeat the last row under another name
        longest = max(len(v) for v in lists.values())
        ks = sorted({k for k in jaccard_ks if k <= longest} or {longest})
        doc.para("Jaccard index |A ∩ B| / |A ∪ B| of two methods' top-k sets per target, mean over common "
                 "targets (a ranking shorter than k contributes what it has). " + ci_text)
        blocks = [M.topk_jaccard(rankings, k, lists=lists, **boot) for k in ks]
        blocks = [b for b in blocks if not b.empty]
        if blocks:
            overlap = pd.concat(blocks)
            doc.table(pd.DataFrame({"A": overlap["method_a"], "B": overlap["method_b"], "k": overlap["k"],
                                    "targets": overlap["n_targets"],
                                    "mean Jaccard": [_ci(r.mean, r.low, r.high) for r in overlap.itertuples()]}))
        else:
            doc.para("Only one method has rankings: no overlap to show.")
        if support is not None:
            sj = M.support_set_jaccard(rankings, support, lists=lists, **boot)
            if not sj.empty:
                doc.para("Jaccard of the supports themselves (A's top-s_A vs B's top-s_B set), on targets where "
                         "both found one:")
                doc.table(pd.DataFrame({"mode": sj["mode"], "A": sj["method_a"], "B": sj["method_b"],
                                        "targets": sj["n_targets"],
                                        "mean Jaccard": [_ci(r.mean, r.low, r.high) for r in sj.itertuples()]}))

    # ---- LDS
    doc.heading(2, "Linear datamodeling score (LDS)")
    if lds_data is None or rankings is None:
        doc.para("Not available: needs rankings and subset-model masks + margins "
                 f"({PRODUCERS['lds']}). Support sizes reward only the top (positive) influencers; LDS also "
                 "rewards calibrated weights and negative influencers, which similarity rankings lack.")
    else:
        try:
            lt = M.lds_table(rankings, lds_data, fill=lds_fill, **boot)
        except ValueError as error:
            lt = None
            doc.para(f"LDS could not be computed: {error}")
        if lt is not None and not lt.empty:
            doc.para(f"Spearman correlation over {int(lds_data.masks.shape[0])} subset models between the "
                     f"summed scores of each model's training subset and its measured margin, mean over targets "
                     f"(source EXP/{lds_data.source}/; unlisted training images scored {lds_fill!r}). "
                     + ci_text + " " + " ".join(lds_data.notes))
            doc.table(pd.DataFrame({"method": lt["method"], "targets": lt["n_valid"],
                                    "LDS": [_ci(r.lds, r.lds_low, r.lds_high) for r in lt.itertuples()]}))
        elif lt is not None:
            doc.para("No method's rankings cover the LDS targets.")

    # ---- costs
    doc.heading(2, "Cost of producing the attributions")
    methods_all = set()
    for df in (rankings, support, trainings):
        if df is not None and "method" in df.columns:
            methods_all |= set(df["method"].unique())
    if not methods_all:
        doc.para("No method named in any table: nothing to cost.")
    else:
        _cost_section(doc, root, sorted(methods_all), manifest, summary, files)

    # ---- retraining log
    if trainings is not None:
        doc.heading(2, "Retraining log")
        group = [c for c in ("method", "mode") if c in trainings.columns]
        agg = trainings.groupby(group).agg(trainings=("seconds", "size"), seconds=("seconds", "sum")).reset_index() \
            if group and "seconds" in trainings else None
        doc.para(f"{len(trainings)} retrainings logged"
                 + (f", {_seconds(float(trainings['seconds'].sum()))} of training in total." if "seconds" in trainings else "."))
        if agg is not None:
            agg["seconds"] = agg["seconds"].map(_seconds)
            doc.table(agg)

    # ---- image grid
    doc.heading(2, "Top-ranked training images")
    if rankings is None:
        doc.para(f"No rankings yet: run `{PRODUCERS['rankings']}`.")
    elif grid_targets < 1 or grid_top < 1:
        doc.para("Image grid disabled (grid_targets or grid_top < 1).")
    else:
        _image_grid(doc, rankings, lists, support, manifest, image_loader, grid_targets, grid_top, seed,
                    files / "top_ranked.png")

    md_path, html_path = root / "report.md", root / "report.html"
    title = f"Attribution report: {preset.get('name') or root.name}"
    _write_text(md_path, doc.markdown(root))
    _write_text(html_path, doc.html(title))
    return md_path, html_path


REPORT_KEYS = ("n_boot", "confidence", "seed", "jaccard_ks", "grid_targets", "grid_top", "lds_fill")


def run_report_stage(exp: Experiment, preset: dict, address: str | None = None) -> dict:
    """Pipeline entry (cluster/pipeline.py STAGES: ("report", "attribution.report:run_report_stage")):
    the preset's [report] section holds write_report's keyword arguments. ``address`` is
    unused: the report never starts Ray."""
    section = dict(preset.get("report") or {})
    unknown = set(section) - set(REPORT_KEYS)
    if unknown:
        raise ValueError(f"unknown [report] keys {sorted(unknown)}; known: {list(REPORT_KEYS)}")
    md_path, html_path = write_report(exp.root, **section)
    return {"markdown": str(md_path), "html": str(html_path)}


def _cost_section(doc, root, methods, manifest, summary, files):
    costs = M.cost_table(root, methods, manifest=manifest)
    doc.para("Compute seconds from the manifest's stage times and bytes on disk of what each method needs; "
             "missing stages are listed, not counted as zero (the cost is then at least the figure shown). "
             "Retraining for the support evaluation is not part of this cost (see the support table).")
    doc.table(pd.DataFrame({
        "method": costs["method"],
        "compute": [(">= " if r.missing_stages and r.seconds is not None and not pd.isna(r.seconds) else "")
                    + _seconds(r.seconds) for r in costs.itertuples()],
        "breakdown": costs["stages"], "missing stages": costs["missing_stages"],
        "storage": costs["storage_bytes"].map(_bytes), "missing paths": costs["missing_paths"]}))
    doc.bullets(sorted(set(n for n in costs["note"] if n)))
    if summary is not None:
        plot = plot_quality_vs_cost(summary, costs, files / "quality_vs_cost.png")
        if plot:
            doc.image(plot, "Support AUC against the compute that produced the attributions")
        else:
            doc.para("No method has recorded compute seconds: no quality-vs-cost plot.")


def _image_grid(doc, rankings, lists, support, manifest, image_loader, grid_targets, grid_top, seed, path):
    try:
        loader = image_loader or default_image_loader(manifest)
        train_set, test_set = loader("train"), loader("test")
        methods = M.order_methods(rankings["method"].unique())
        # targets ranked by the most methods, so every row group is complete
        per_target = rankings.groupby("target_id")["method"].nunique()
        pool = np.sort(per_target[per_target == per_target.max()].index.to_numpy())
        chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(grid_targets, len(pool)), replace=False))
        grid = plot_top_ranked([int(t) for t in chosen], lists, methods, train_set, test_set, grid_top, path,
                               supports=support)
    except Exception as error:  # the grid is decoration: a missing dataset must not cost the report
        doc.para(f"Image grid skipped: the images could not be read ({type(error).__name__}: {error}).")
        return
    doc.para(f"{len(chosen)} targets (seeded choice, seed {seed}); a red frame marks a training image of "
             "another class than the target; row labels give the method and its supports (nf: not found).")
    doc.image(grid, "Targets and their top-ranked training images per method")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["write_report", "run_report_stage", "load_tables", "ReportError", "PRODUCERS", "plot_support_curves",
           "plot_quality_vs_cost", "plot_support_scatter", "plot_top_ranked", "default_image_loader"]
