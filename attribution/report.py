"""The experiment report: EXP/report.md and EXP/report.html from the stored tables alone.

``write_report(EXP)`` reads whatever the stages have written so far (rankings only,
rankings + support, ...), computes the metrics of :mod:`attribution.metrics`, draws
PNGs into EXP/report_files/ (figures: :mod:`attribution.plots`) and writes the two
documents. Sections whose inputs are missing say so and name the command of the stage
that produces them (:func:`attribution.stages.producer_of`), so a half-finished
experiment still gets a useful report. Nothing is recomputed and Ray is never started;
the pipeline runs this as the ``report`` stage (:mod:`attribution.stages.report`).

The report is one :class:`Document` (a list of blocks rendered both as Markdown and as
HTML, so the two never disagree) filled by the section functions of :data:`SECTIONS`
in order. Each section is ``section(doc, inputs)``: it reads the stored tables and
options from :class:`ReportInputs` and appends headings, paragraphs, tables and images.
Adding a metric is one function in :mod:`attribution.metrics` (tables in, a DataFrame
out) and one section function here, listed in :data:`SECTIONS`.

The HTML is self-contained (PNGs embedded as base64) so it can be mailed or attached
to a ticket; the Markdown references the PNG files next to it. Both are written
through :mod:`attribution.artifacts` (atomically).
"""

from __future__ import annotations

import base64
import functools
import html
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from attribution import metrics as M
from attribution import plots
from attribution.artifacts import read_dataset, visible_files, write_text
from attribution.experiment import Experiment
from attribution.methods import order_methods
from attribution.plots import markdown_table
from attribution.scores import TRAIN_IDS_FILE, ScoreStore

FILES_DIR = "report_files"
LDS_FILES = "EXP/lds/ or EXP/datamodels/: masks.parquet + margins.parquet"


class ReportError(FileNotFoundError):
    """The experiment directory has nothing to report on."""


def command_for(artifact: str) -> str:
    """The command that writes ``artifact``: its producing stage's (the stage registry
    knows which); the whole preset for what no single stage writes (the manifest)."""
    from attribution.stages import producer_of  # here: attribution.stages imports this module's stage

    stage = producer_of(artifact)
    if stage not in _stage_names():
        return "attribution run PRESET --exp EXP"
    return f"attribution {stage} --exp EXP"


def _stage_names() -> list[str]:
    from attribution.stages import available_stages

    return available_stages()


# ----------------------------------------------------------------------------- loading


def load_tables(exp_dir: str | os.PathLike) -> dict:
    """The stored tables of an experiment as pandas frames (None where missing)."""
    exp = Experiment(exp_dir)
    if not exp.root.is_dir():
        raise ReportError(f"experiment directory {exp.root} does not exist; run "
                          f"'{command_for('manifest')}' first (or check the path)")
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
        "rankings": bool(visible_files(exp.rankings)),
        "trainings": bool(visible_files(exp.trainings)),
        "support": exp.support.exists(),
    }
    for name, reader in readers.items():
        if not present[name]:
            continue
        try:
            out[name] = reader()
        except Exception as error:  # e.g. files of two schema versions: report the rest, name the culprit
            out["problems"].append(f"{name} could not be read ({type(error).__name__}: {error}); rerun "
                                   f"`{command_for(name)}` to rewrite it")
    if all(out[k] is None for k in ("rankings", "support", "trainings")):
        if out["problems"]:
            raise ReportError(f"{exp.root}: no table could be read: " + "; ".join(out["problems"]))
        raise ReportError(
            f"{exp.root} has no tables to report on (no rankings/*.parquet, support.parquet or "
            f"trainings/*.parquet). Produce them with '{command_for('rankings')}' and "
            f"'{command_for('support')}', or run a whole preset: '{command_for('manifest')}'.")
    return out


def default_image_loader(manifest: dict) -> Callable[[str], object]:
    """Load a split of the preset's dataset (whole split: ids are stable under subsetting,
    so positions_of finds every ranked id without redoing the per-class subset)."""
    from attribution.settings import DataSettings

    preset = (manifest.get("preset") or {}).get("preset") or {}
    data = preset.get("data") or {}
    if not data.get("dataset"):
        raise ValueError("the manifest has no preset data section (dataset, root), so the images cannot be found")
    settings = DataSettings.from_dict(data, preset_seed=preset.get("seed", 0))

    def load(split: str):
        return settings.load(split, subset=False)

    return load


class ReportInputs:
    """What the sections read: the stored tables, the report's options, and the figures
    derived from them once (the support limit, the support summary, ranked lists)."""

    def __init__(self, root: Path, tables: dict, *, n_boot: int, confidence: float, seed: int,
                 jaccard_ks: Sequence[int], grid_targets: int, grid_top: int,
                 image_loader: Callable[[str], object] | None):
        self.root, self.files = root, root / FILES_DIR
        self.manifest = tables["manifest"]
        self.rankings, self.support, self.trainings = tables["rankings"], tables["support"], tables["trainings"]
        self.problems = list(tables["problems"])   # tables that could not be read
        self.n_boot, self.confidence, self.seed = n_boot, confidence, seed
        self.jaccard_ks, self.grid_targets, self.grid_top = jaccard_ks, grid_targets, grid_top
        self.image_loader = image_loader
        self.lds_data, self.lds_problem = None, None
        try:
            self.lds_data = M.load_lds_data(root)
        except (ValueError, OSError) as error:
            self.lds_problem = f"LDS masks/margins are unreadable: {error}"
        # the full score vectors (EXP/scores): LDS, non-zeros and outside policies read them
        self.store = ScoreStore(root / "scores") if (root / "scores" / TRAIN_IDS_FILE).exists() else None
        if self.store is not None and not self.store.methods():
            self.store = None

    @property
    def boot(self) -> dict:
        """The bootstrap keyword arguments of every metric that has an interval."""
        return {"n_boot": self.n_boot, "confidence": self.confidence, "seed": self.seed}

    @property
    def ci_text(self) -> str:
        return (f"Brackets: {self.confidence:.0%} percentile bootstrap intervals over targets "
                f"({self.n_boot} resamples, seed {self.seed}).")

    @property
    def preset(self) -> dict:
        return (self.manifest.get("preset") or {}).get("preset") or {}

    @functools.cached_property
    def limit(self) -> tuple[int | None, str]:
        """The largest k of the support curves, and where that number came from."""
        limit, source = M.support_limit(self.manifest, self.support)
        support = self.support
        if limit is not None and support is not None and len(support) and int(support["support"].max()) > limit:
            # e.g. the support stage searched further than the rank stage's top_k: the AUC must
            # cover every found support, so widen the range and say why
            limit = int(support["support"].max())
            source = f"the largest found support, which exceeds the recorded limit ({source})"
        return limit, source

    @functools.cached_property
    def summary(self) -> pd.DataFrame | None:
        """The support summary per (method, mode); None without supports or a limit."""
        limit = self.limit[0]
        if self.support is None or limit is None or len(self.support) == 0:
            return None
        return M.support_summary(self.support, limit, **self.boot)

    @functools.cached_property
    def lists(self) -> dict | None:
        return M.ranked_lists(self.rankings) if self.rankings is not None else None

    @functools.cached_property
    def methods(self) -> list[str]:
        """Every method (and variant) any table names: rankings, supports, trainings, score blocks."""
        names = set(self.store.methods()) if self.store is not None else set()
        for df in (self.rankings, self.support, self.trainings):
            if df is not None and "method" in df.columns:
                names |= set(df["method"].unique())
        return order_methods(names)

    @functools.cached_property
    def lds(self) -> tuple[pd.DataFrame | None, str | None]:
        """(the LDS table from the full score vectors, or None; why not, or None)."""
        if self.lds_data is None or self.store is None:
            return None, None
        try:
            return M.lds_table(self.store, self.lds_data, **self.boot), None
        except (ValueError, OSError, KeyError) as error:
            return None, f"LDS could not be computed: {error}"

    @functools.cached_property
    def score_stats(self) -> pd.DataFrame:
        """Non-zero scores, candidates and outside policy per method of the score store."""
        return M.score_summary(self.store) if self.store is not None else pd.DataFrame()

    @functools.cached_property
    def costs(self) -> pd.DataFrame:
        return M.cost_table(self.root, self.methods, manifest=self.manifest)


# ----------------------------------------------------------------------------- document model


class Document:
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
                lines += markdown_table(block[1]) + [""]
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


# ----------------------------------------------------------------------------- sections


def title_section(doc: Document, r: ReportInputs) -> None:
    """The title and where the report comes from."""
    doc.heading(1, f"Attribution report: {r.preset.get('name') or r.root.name}")
    doc.para(f"Experiment `{(r.manifest.get('storage') or {}).get('location') or r.root}`; written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')} from the stored tables only.")


def find_ablation_runs(root: Path, names: Sequence[str]) -> dict[str, Path | None]:
    """{ablation name: the experiment directory of that ablation of ``root``, or None}.

    An ablation run records its base (manifest ``base.root``); among the experiments
    beside ``root`` the one whose base is ``root`` is taken, else the default directory
    ``<root>-<name>`` (``attribution run PRESET --ablation NAME`` writes runs/PRESET-NAME)
    when it records that ablation."""
    root = Path(root).resolve()
    found: dict[str, Path | None] = {name: None for name in names}
    siblings = sorted(p for p in root.parent.iterdir() if p.is_dir() and (p / "manifest.json").is_file()) \
        if root.parent.is_dir() else []
    for folder in siblings:
        if folder.resolve() == root:
            continue
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        ablation = ((manifest.get("preset") or {}).get("preset") or {}).get("ablation")
        if ablation not in found:
            continue
        based_here = Path((manifest.get("base") or {}).get("root") or "/nonexistent").resolve() == root
        if based_here or (found[ablation] is None and folder.name == f"{root.name}-{ablation}"):
            if based_here or found[ablation] is None:
                found[ablation] = folder
    return found


def pretrain_warning(manifest: dict, label: str) -> str | None:
    """A warning line when the run's pretraining was ended by its time cap, not its step count."""
    section = manifest.get("pretrain") or {}
    if section.get("stopped_by") != "time_budget":
        return None
    settings = section.get("settings") if isinstance(section.get("settings"), dict) else {}
    cap = section.get("time_budget_s", settings.get("time_budget_s"))
    wanted = section.get("planned_steps") or section.get("max_steps") or settings.get("max_steps") or None
    steps = section.get("steps")
    reach = f" of the {wanted} steps asked for" if wanted else ""
    return (f"**warning**: the pretraining of {label} was stopped by its time cap (pretrain.time_budget_s = {cap}) "
            f"after {steps if steps is not None else '?'} steps{reach}: its features depend on the machine's "
            "speed and may be under-trained; set pretrain.max_steps (and time_budget_s = 0) for a fixed, "
            "reproducible run")


def claims_section(doc: Document, r: ReportInputs) -> None:
    """The paper's claims, each a paired comparison on the same targets with a verdict."""
    doc.heading(2, "Claims")
    preset = r.preset
    if preset.get("ablation"):
        base = (r.manifest.get("base") or {}).get("location") or "the preset's own experiment"
        doc.para(f"This experiment is the `{preset['ablation']}` ablation of `{base}`: the claims table is in "
                 f"that experiment's report (`attribution report --exp {base}` finds this run).")
        return
    name = preset.get("name") or "PRESET"
    needed = sorted({spec.ablation for spec in M.CLAIMS if spec.ablation})
    folders = find_ablation_runs(r.root, needed)
    runs, warnings, sources = {}, [], []
    own = pretrain_warning(r.manifest, "this experiment")
    if own:
        warnings.append(own)
    for ablation in needed:
        folder = folders[ablation]
        if folder is None or not (folder / "support.parquet").exists():
            runs[ablation] = None
            continue
        runs[ablation] = pd.read_parquet(folder / "support.parquet")
        sources.append(f"`{ablation}`: `{folder}`")
        try:
            warning = pretrain_warning(json.loads((folder / "manifest.json").read_text()), f"the {ablation} run")
        except (OSError, json.JSONDecodeError):
            warning = None
        if warning:
            warnings.append(warning)
    limit = r.limit[0]
    table = M.claims_table(r.support, runs, preset=name, limit=limit, **r.boot)
    level = f"{r.confidence:.0%}"
    doc.para(f"Each row compares side A (the side the paper says is better) with side B on the targets both "
             f"searched (n; paired by target id). Difference: mean over those targets of B's support minus A's, "
             f"in training images (positive: A needs fewer), with a {level} paired bootstrap interval "
             f"({r.n_boot} resamples of the targets, seed {r.seed}). Verdict at {level}: **supported** when the "
             f"interval lies above 0, **contradicted** when below 0, else inconclusive (also with fewer than "
             f"{M.MIN_PAIRED_TARGETS} paired targets).")
    shown = pd.DataFrame({
        "claim": table["claim"], "mode": table["mode"], "A": table["a"], "B": table["b"],
        "n": [_fmt(v) if s == "compared" else "–" for v, s in zip(table["n"], table["status"])],
        "B − A (images)": [_ci(row.mean, row.low, row.high, 1) if row.status == "compared" else "–"
                           for row in table.itertuples()],
        "A smaller / tie / B smaller": [f"{int(row.a_smaller)}/{int(row.ties)}/{int(row.b_smaller)}" if row.status == "compared"
                                        else "–" for row in table.itertuples()],
        "verdict": [f"**{row.verdict}** at {level}" if row.status == "compared" and row.verdict else row.status
                    for row in table.itertuples()],
        "note": table["note"]})
    doc.table(shown)
    doc.bullets(warnings)
    doc.para("Footnote: a support not found within a search's limit counts as limit + 1, the smallest value "
             "consistent with not found, so a difference involving one is never overstated and two not-founds "
             "tie. \"Large supports\": the paired targets whose mean support of the two sides is at least its "
             "median (the threshold is in the note; the interval is conditional on that subset; selecting on "
             "one side's supports alone would favour the other by regression to the mean). Feature and candidate rows compare this experiment's ESVM with the ESVM of the ablation "
             "run on the same target ids"
             + (f" (runs: {', '.join(sources)})" if sources else "")
             + f". A row whose run is missing names the command that makes it; then rerun "
               f"`attribution report --exp {(r.manifest.get('storage') or {}).get('location') or r.root}`.")


def header_section(doc: Document, r: ReportInputs) -> None:
    """What the experiment holds, the stages' settings and wall times."""
    preset, manifest, rankings, support = r.preset, r.manifest, r.rankings, r.support
    data = preset.get("data") or {}
    doc.heading(2, "Experiment")
    facts = [f"dataset: **{data.get('dataset', 'unknown')}**"
             + (f" (root `{data['root']}`)" if data.get("root") else ""),
             f"training images per class: {data.get('train_per_class', 'all')}, "
             f"test images per class: {data.get('test_per_class', 'all')}, data seed {data.get('seed', preset.get('seed', '–'))}"]
    if rankings is not None:
        top_len = rankings.groupby(["method", "target_id"]).size()
        facts.append(f"rankings: {rankings['target_id'].nunique()} targets, methods "
                     f"{', '.join(order_methods(rankings['method'].unique()))}, "
                     f"{int(top_len.min())}–{int(top_len.max())} ranked training images per target")
    if support is not None:
        facts.append(f"support: {len(support)} (target, method, mode) rows, "
                     f"{support['target_id'].nunique()} targets, modes {', '.join(M.modes_of(support))}")
    for stage in _stage_names():
        if stage == "report":  # its settings are this report's options, stated where they apply
            continue
        section = manifest.get(stage) or {}
        # scalars of the section and of its nested "settings" (stages record their settings there)
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


def availability_section(doc: Document, r: ReportInputs) -> None:
    """What the report cannot show yet, up front, each with the command that produces it."""
    missing = list(r.problems)
    if not r.manifest:
        missing.append(f"manifest.json (settings, timings): `{command_for('manifest')}`")
    if r.rankings is None:
        missing.append(f"rankings/ (overlap tables, ties, image grid): `{command_for('rankings')}`")
    if r.store is None:
        missing.append(f"scores/ (full score vectors: LDS, non-zero scores, outside policies): "
                       f"`{command_for('scores')}`")
    if r.support is None:
        missing.append(f"support.parquet (support curves, AUC, win rates, cost plot): `{command_for('support')}`")
    if r.trainings is None:
        missing.append(f"trainings/ (retraining log): `{command_for('trainings')}`")
    if r.lds_problem:
        missing.append(r.lds_problem)
    if r.lds_data is None:
        missing.append(f"LDS masks and margins ({LDS_FILES}): `{command_for('lds')}`")
    if missing:
        doc.heading(2, "Not yet available")
        doc.bullets(missing)


def support_section(doc: Document, r: ReportInputs) -> None:
    """Support per (method, mode): found, median, AUC with interval; the support curves."""
    doc.heading(2, "Data support")
    support, (limit, limit_source), summary = r.support, r.limit, r.summary
    if support is None:
        doc.para(f"No support table yet: run `{command_for('support')}`.")
        return
    if len(support) == 0:
        doc.para("The support table has no searches: every selected target was screened out (misclassified "
                 "or unstable across the full-data models; see support_targets.parquet). Raise support.targets.")
        return
    if limit is None:
        doc.para("The support table has no found supports and no limit is recorded; nothing to plot.")
        return
    doc.para(f"Support of a target: the fewest top-ranked training images whose removal (or relabelling "
             f"to the flip class) makes a retrained model misclassify it; smaller is better. "
             f"AUC: area under the fraction of targets with support <= k over k in [0, {limit}] "
             f"(limit from {limit_source}), normalised to [0, 1]; **higher is better**; not found counts "
             f"as never. {r.ci_text}")
    shown = summary.assign(
        found=[f"{row.n_found}/{row.n_targets}" for row in summary.itertuples()],
        median_support=summary["median_support"].map(lambda v: _fmt(v, 1)),
        AUC=[_ci(row.auc, row.auc_low, row.auc_high) for row in summary.itertuples()],
        trainings=summary["trainings"].map(_fmt),
        retrain_time=summary["seconds"].map(_seconds))
    doc.table(shown[["method", "mode", "found", "median_support", "AUC", "trainings", "retrain_time"]])
    if support.groupby(["method", "mode"])["target_id"].apply(frozenset).nunique() > 1:
        doc.para("Methods were evaluated on different target sets: compare AUCs with care; "
                 "the win rates below use common targets only.")
    doc.image(plots.plot_support_curves(support, summary, limit, r.files / "support_curves.png"),
              "Support curves per method and mode (log k axis)")


def win_rate_section(doc: Document, r: ReportInputs) -> None:
    """Per-target comparisons of each pair of methods (win rates) and the support scatter."""
    if r.summary is None:  # no supports to compare (said by the support section)
        return
    support, limit = r.support, r.limit[0]
    doc.heading(3, "Per-target comparisons")
    wins = M.win_rates(support, **r.boot)
    if wins.empty:
        doc.para("No pair of methods shares a target.")
    else:
        doc.para("A beats B on a target when A's support is smaller (not found = infinite; two not-founds tie). "
                 + r.ci_text)
        doc.table(pd.DataFrame({
            "mode": wins["mode"], "A": wins["method_a"], "B": wins["method_b"], "targets": wins["n_targets"],
            "A smaller": [_ci(row.win_rate, row.win_low, row.win_high) for row in wins.itertuples()],
            "tie": wins["tie_rate"].map(_fmt), "B smaller": wins["loss_rate"].map(_fmt)}))
    methods = order_methods(support["method"].unique())
    reference = "esvm" if "esvm" in methods else methods[0]
    scatter = plots.plot_support_scatter(support, reference, limit, r.files / "support_scatter.png")
    if scatter:
        doc.image(scatter, f"Per-target supports: {reference} against each other method")


def overlap_section(doc: Document, r: ReportInputs) -> None:
    """Top-k Jaccard overlaps of the methods' rankings, and of their found supports."""
    doc.heading(2, "Overlap between methods")
    if r.rankings is None:
        doc.para(f"No rankings yet: run `{command_for('rankings')}`.")
        return
    lists = r.lists
    # k beyond the longest ranking would repeat the last row under another name
    longest = max(len(v) for v in lists.values())
    ks = sorted({k for k in r.jaccard_ks if k <= longest} or {longest})
    doc.para("Jaccard index |A ∩ B| / |A ∪ B| of two methods' top-k sets per target, mean over common "
             "targets (a ranking shorter than k contributes what it has). " + r.ci_text)
    blocks = [M.topk_jaccard(r.rankings, k, lists=lists, **r.boot) for k in ks]
    blocks = [b for b in blocks if not b.empty]
    if blocks:
        overlap = pd.concat(blocks)
        doc.table(pd.DataFrame({"A": overlap["method_a"], "B": overlap["method_b"], "k": overlap["k"],
                                "targets": overlap["n_targets"],
                                "mean Jaccard": [_ci(row.mean, row.low, row.high) for row in overlap.itertuples()]}))
    else:
        doc.para("Only one method has rankings: no overlap to show.")
    if r.support is not None:
        sj = M.support_set_jaccard(r.rankings, r.support, lists=lists, **r.boot)
        if not sj.empty:
            doc.para("Jaccard of the supports themselves (A's top-s_A vs B's top-s_B set), on targets where "
                     "both found one:")
            doc.table(pd.DataFrame({"mode": sj["mode"], "A": sj["method_a"], "B": sj["method_b"],
                                    "targets": sj["n_targets"],
                                    "mean Jaccard": [_ci(row.mean, row.low, row.high) for row in sj.itertuples()]}))


def scores_section(doc: Document, r: ReportInputs) -> None:
    """Per method: the full score vectors (non-zero scores, candidates, how images outside
    the candidates are scored) and how much of each ranking is ties, with warnings."""
    doc.heading(2, "Score vectors and ties")
    if r.store is None and r.rankings is None:
        doc.para(f"No score blocks or rankings yet: run `{command_for('scores')}`.")
        return
    stats = r.score_stats
    ties = M.ranking_ties(r.rankings) if r.rankings is not None else pd.DataFrame()
    methods = order_methods(set(stats.get("method", [])) | set(ties.get("method", [])))
    by_stats = stats.set_index("method") if len(stats) else pd.DataFrame()
    by_ties = ties.set_index("method") if len(ties) else pd.DataFrame()

    def cell(frame, method, column, fmt):
        return fmt(frame.loc[method, column]) if method in frame.index else "–"

    def declared(method):
        if method in by_stats.index:  # built with its blocks' settings (a variant's own policy)
            policy = {k: by_stats.loc[method, k] for k in ("class_restricted", "outside")}
        else:
            policy = M.outside_policy(method)
        if policy["outside"] is None:
            return "unregistered: declares nothing"
        return ("class-restricted" if policy["class_restricted"] else "all classes") + f", outside = {policy['outside']}"

    doc.para("Non-zero: candidate scores different from 0 per target (candidates: the training images the method "
             "scored; all of them for a method without a candidate mask). Tied: the fraction of a ranking's "
             "positions whose score equals the next one's (median over targets); tied images follow in train-id "
             "order. Outside the candidates: what the method's class declares (`class_restricted`, `outside`) "
             "and what the stored blocks show; LDS sums these scores too.")
    doc.table(pd.DataFrame({
        "method": methods,
        "targets": [cell(by_stats, m, "n_targets", _fmt) for m in methods],
        "candidates (median)": [cell(by_stats, m, "candidates_median", lambda v: _fmt(v, 0)) + (
            f" of {int(by_stats.loc[m, 'n_train'])}" if m in by_stats.index else "") for m in methods],
        "non-zero (median)": [cell(by_stats, m, "nonzero_median", lambda v: _fmt(v, 0)) for m in methods],
        "non-zero (min)": [cell(by_stats, m, "nonzero_min", _fmt) for m in methods],
        "ranking length": [cell(by_ties, m, "length", lambda v: _fmt(v, 0)) for m in methods],
        "tied (median)": [cell(by_ties, m, "tied_median", lambda v: _fmt(v, 3)) for m in methods],
        "declared": [declared(m) for m in methods],
        "outside the candidates (observed)": [cell(by_stats, m, "observed_outside", str) for m in methods]}))
    notes = []
    if r.store is not None:
        notes += [f"{m}: score blocks only (no rankings): its ranking is that of {m.split('@')[0]} or it is not "
                  "searched; it enters the LDS" for m in methods if m in by_stats.index and m not in by_ties.index]
    if r.rankings is not None and r.store is not None:
        notes += [f"{m}: rankings without score blocks: no LDS (rerun `{command_for('scores')}` or the stage "
                  "of that method)" for m in methods if m in by_ties.index and m not in by_stats.index]
    doc.bullets(M.tie_warnings(ties, stats) + notes if len(ties) else notes)


def lds_section(doc: Document, r: ReportInputs) -> None:
    """The linear datamodeling score of each method's full score vectors on the subset models."""
    doc.heading(2, "Linear datamodeling score (LDS)")
    lds_data = r.lds_data
    if lds_data is None or r.store is None:
        doc.para(f"Not available: needs the full score vectors (EXP/scores/, written by `{command_for('scores')}` "
                 f"and the trak / datamodels stages) and subset-model masks + margins ({LDS_FILES}, written by "
                 f"`{command_for('lds')}`). Support sizes reward only the top (positive) influencers; LDS also "
                 "rewards calibrated weights and negative influencers, which similarity rankings lack.")
        return
    table, problem = r.lds
    if problem:
        doc.para(problem)
        return
    scored = table[table["n_scored"] > 0]
    if scored.empty:
        doc.para("No method's score blocks cover the LDS targets.")
        return
    n_common = int(scored["n_targets"].max())
    stats = r.score_stats.set_index("method") if len(r.score_stats) else pd.DataFrame()
    policies = [f"{method}: {stats.loc[method, 'outside']}" for method in scored["method"]
                if method in stats.index and stats.loc[method, "class_restricted"]]
    doc.para(f"Spearman correlation over {int(lds_data.masks.shape[0])} subset models between the summed FULL "
             f"scores of each model's training subset and its measured margin, mean over the {n_common} LDS "
             f"targets every method below scored (paired: the same targets and bootstrap resamples for each; "
             f"source EXP/{lds_data.source}/). A constant prediction counts as 0. Class-restricted methods score "
             "the images outside their candidates by their outside policy"
             + (f" ({'; '.join(policies)}; see the score-vector table)" if policies else "") + ". "
             + r.ci_text + " " + " ".join(lds_data.notes))
    doc.table(pd.DataFrame({"method": scored["method"], "targets": scored["n_targets"],
                            "scored": scored["n_scored"], "constant": scored["n_constant"],
                            "LDS": [_ci(row.lds, row.lds_low, row.lds_high) for row in scored.itertuples()]}))
    notes = []
    if (scored["n_scored"] > scored["n_targets"]).any():
        notes.append("some methods scored more LDS targets than the paired set; the paired mean uses only the "
                     "targets every method scored")
    names = set(scored["method"])
    for method in sorted(n for n in names if "@" in n):
        base = method.split("@")[0]
        if base in names:
            a, b = (scored.set_index("method").loc[x, "lds"] for x in (base, method))
            notes.append(f"{method} beside {base}: LDS {b:.3f} against {a:.3f}"
                         + (" (the same ranking, other scores outside the candidates)" if method == "esvm@negative"
                            else ""))
    unscored = table[table["n_scored"] == 0]["method"].tolist()
    if unscored:
        notes.append(f"score blocks without LDS targets (not in the table): {', '.join(unscored)}")
    notes += dattri_ordering(r, scored)
    doc.bullets(notes)


# dattri's benchmark ordering of LDS on an MNIST MLP (../shared/reference/anchors.md):
# TRAK with 10 models 0.33 > IF-CG 0.26 > TracIn 0.15 > Grad-Cos 0.12, Grad-Dot 0.10
DATTRI_MLP_ORDER = (("trak", "if-cg"), ("if-cg", "tracin"), ("tracin", "grad-dot"), ("tracin", "grad-cos"))


def dattri_ordering(r: ReportInputs, scored: pd.DataFrame) -> list[str]:
    """dattri's LDS ordering on an MNIST MLP, checked pair by pair on these targets with
    the paired difference (per-target LDS of the first minus the second, a constant
    prediction counting 0, over the targets both scored; bootstrap interval):
    "confirmed" when the interval lies above 0, "reversed" below, else "not resolved";
    not stated when the methods are not all here."""
    names = sorted({m for pair in DATTRI_MLP_ORDER for m in pair})
    if not set(names) <= set(scored["method"]):
        return []
    per = M.lds_per_target(r.store, r.lds_data, methods=names)
    per = per.assign(rho=np.where(per["constant"].to_numpy(bool), 0.0, per["lds"].to_numpy(np.float64)))
    wide = per.pivot_table(index="target_id", columns="method", values="rho")
    parts = []
    for a, b in DATTRI_MLP_ORDER:
        diff = (wide[a] - wide[b]).dropna().to_numpy()
        low, high = M.bootstrap_ci(diff, **r.boot)
        verdict = "confirmed" if low > 0 else "reversed" if high < 0 else "not resolved"
        parts.append(f"{a} - {b} {diff.mean():+.3f} [{low:+.3f}, {high:+.3f}] ({len(diff)} targets): {verdict}")
    return ["dattri's LDS ordering on an MNIST MLP (TRAK with 10 models > IF-CG > TracIn > Grad-Dot, Grad-Cos; "
            "here trak has the [trak] checkpoints), as paired differences: " + "; ".join(parts)]


def cost_section(doc: Document, r: ReportInputs) -> None:
    """Compute seconds and storage each method's attributions took (its class's ``cost``;
    a variant's own ``method_seconds`` where its stage records them)."""
    doc.heading(2, "Cost of producing the attributions")
    if not r.methods:
        doc.para("No method named in any table: nothing to cost.")
        return
    costs = r.costs
    doc.para("Compute seconds from the manifest's stage times (a stage that produces several methods or variants "
             "records each one's own seconds, `method_seconds`) and bytes on disk of what each method needs; "
             "missing stages are listed, not counted as zero (the cost is then at least the figure shown). "
             "Retraining for the support evaluation is not part of this cost (see the support table).")
    doc.table(pd.DataFrame({
        "method": costs["method"],
        "compute": [(">= " if row.missing_stages and row.seconds is not None and not pd.isna(row.seconds) else "")
                    + _seconds(row.seconds) for row in costs.itertuples()],
        "breakdown": costs["stages"], "missing stages": costs["missing_stages"],
        "storage": costs["storage_bytes"].map(_bytes), "missing paths": costs["missing_paths"]}))
    doc.bullets(sorted(set(n for n in costs["note"] if n)))


FRONTIER_ABLATION = "frontier"  # ablations.toml: searches the budget variants this run only scores


def frontier_summary(r: ReportInputs) -> tuple[pd.DataFrame | None, str | None]:
    """This run's support summary, with the rows of the methods it did not search taken
    from its ``frontier`` ablation run when one exists (the same targets and limit:
    the ablation reuses this run's ensemble and rankings), and a sentence naming that run."""
    summary, limit = r.summary, r.limit[0]
    folder = find_ablation_runs(r.root, [FRONTIER_ABLATION])[FRONTIER_ABLATION]
    if folder is None or limit is None or not (folder / "support.parquet").exists():
        return summary, None
    other = pd.read_parquet(folder / "support.parquet")
    searched = set(summary["method"]) if summary is not None else set()
    other = other[~other["method"].isin(searched)]
    if not len(other):
        return summary, None
    if int(other["support"].max()) > limit:
        limit = int(other["support"].max())
    extra = M.support_summary(other, limit, **r.boot)
    names = ", ".join(order_methods(extra["method"].unique()))
    return (pd.concat([summary, extra], ignore_index=True) if summary is not None else extra,
            f"Support AUC of {names}: from the `{FRONTIER_ABLATION}` ablation run `{folder}` (same targets, "
            "ensemble and rankings; `attribution run PRESET --ablation frontier`).")


def frontier_section(doc: Document, r: ReportInputs) -> None:
    """Quality against compute: removal and mislabel support AUC and LDS of every method
    and variant against the seconds that produced its attributions (one figure, one table)."""
    doc.heading(2, "Quality against compute (the frontier)")
    if not r.methods:
        doc.para("No method named in any table: no frontier.")
        return
    summary, source = frontier_summary(r)
    frontier = M.frontier_table(r.methods, r.costs, summary, r.lds[0])
    if source:
        doc.para(source)
    doc.para("Each method and variant at the compute that produced its attributions (the cost table's seconds; "
             "log axis); variants of one method are joined by a line; bars: the intervals of the support and "
             "LDS tables. **Higher is better** on every panel. A hollow marker: some stage times are missing, so "
             "the cost is at least x. " + r.ci_text)
    doc.table(pd.DataFrame({
        "method": frontier["method"],
        "compute": [(">= " if not row.cost_complete and not np.isnan(row.seconds) else "") + _seconds(row.seconds)
                    for row in frontier.itertuples()],
        **{label: [_ci(getattr(row, key), getattr(row, f"{key}_low"), getattr(row, f"{key}_high"))
                   for row in frontier.itertuples()] for key, label in M.FRONTIER_METRICS},
        "missing": frontier["missing"]}))
    lacking = []
    for key, label in (*M.FRONTIER_METRICS, ("compute", "compute seconds")):
        names = [row.method for row in frontier.itertuples() if key in row.missing.split(", ")]
        if names:
            lacking.append(f"without {label}" + (" (not on any panel)" if key == "compute" else
                                                 " (not on that panel)") + f": {', '.join(names)}")
    doc.bullets(lacking)
    plot = plots.plot_frontier(frontier, r.files / "frontier.png")
    if plot:
        doc.image(plot, "Removal support AUC, mislabel support AUC and LDS against compute seconds")
    else:
        doc.para("No method has both compute seconds and a metric: no frontier plot.")


def further_section(doc: Document, r: ReportInputs) -> None:
    """Agreement of every method's scores with the further-training gold standard
    (Wei et al., arXiv 2412.03906), against the further-training length."""
    gold_path = r.root / "further" / "gold.parquet"
    if not gold_path.exists():
        return  # the preset has no [further] section: nothing to say
    doc.heading(2, "Agreement with further training (final-model-only gold standard)")
    if r.store is None:
        doc.para("Not available: no score vectors (EXP/scores/).")
        return
    gold = pd.read_parquet(gold_path)
    table = M.further_agreement_table(M.further_agreement_per_target(r.store, gold), **r.boot)
    further = r.manifest.get("further") or {}
    if table.empty:
        doc.para("No method's score blocks cover the gold targets.")
        return
    doc.para(f"From the gradient stage's final model, further training at SGD lr {further.get('lr')} "
             f"(batch {further.get('batch_size')}, {further.get('dtype')}) on the full training set and without each "
             f"of {further.get('left_out')} seeded training images, same seed and sample order, "
             f"{further.get('seeds')} seeds; the gold score of a left-out image for a target is the mean change of "
             f"the target's loss (source EXP/further/gold.parquet; mean standard error over seeds at the last "
             f"epoch {float(further.get('mean_gold_se') or 'nan'):.2e} against a mean |gold| of "
             f"{float(further.get('mean_abs_gold') or 'nan'):.2e}). Per target: the cosine similarity and Spearman "
             f"correlation between a method's scores of the left-out images and their gold scores; means over the "
             f"{int(table['n_targets'].max())} gold targets every method scored (paired). " + r.ci_text)
    last = table[table["epoch"] == table["epoch"].max()]
    first = table[table["epoch"] == table["epoch"].min()]
    doc.table(pd.DataFrame({
        "method": last["method"],
        f"cosine @ {int(first['epoch'].iloc[0])} ep": [_ci(row.cosine, row.cosine_low, row.cosine_high)
                                                     for row in first.itertuples()],
        f"cosine @ {int(last['epoch'].iloc[0])} ep": [_ci(row.cosine, row.cosine_low, row.cosine_high)
                                                    for row in last.itertuples()],
        f"Spearman @ {int(first['epoch'].iloc[0])} ep": [_ci(row.spearman, row.spearman_low, row.spearman_high)
                                                       for row in first.itertuples()],
        f"Spearman @ {int(last['epoch'].iloc[0])} ep": [_ci(row.spearman, row.spearman_low, row.spearman_high)
                                                      for row in last.itertuples()]}))
    stats = r.score_stats.set_index("method") if len(r.score_stats) else pd.DataFrame()
    restricted = [m for m in last["method"] if m in stats.index and bool(stats.loc[m, "class_restricted"])]
    notes = further_findings(table)
    if restricted:
        notes.append(f"Class-restricted methods ({', '.join(restricted)}) score the left-out images of other classes "
                     "by their outside policy (one value per target): their agreement partly measures only whether "
                     "an image is of the target's class (random scores reach ESVM's Spearman this way).")
    doc.bullets(notes)
    plot = plots.plot_further_agreement(table, r.files / "further_agreement.png")
    if plot:
        doc.image(plot, "Agreement with the further-training gold scores against further-training length")
    loo_path = r.root / "further" / "loo.parquet"
    if loo_path.exists():
        loo = pd.read_parquet(loo_path).rename(columns={"loo": "gold"}).assign(epoch=0)
        loo_table = M.further_agreement_table(M.further_agreement_per_target(r.store, loo), **r.boot)
        doc.para(f"Leave-one-out retraining from scratch (dattri's `loo_corr`): the [support] recipe trained on "
                 f"everything and without each left-out image, {further.get('loo_seeds')} seeds each; per target "
                 "the Spearman correlation (and cosine) between a method's scores of the left-out images and the "
                 "mean change of the target's loss (source EXP/further/loo.parquet). Same targets and pairing as "
                 "above.")
        doc.table(pd.DataFrame({
            "method": loo_table["method"], "targets": loo_table["n_targets"],
            "LOO Spearman (loo_corr)": [_ci(row.spearman, row.spearman_low, row.spearman_high)
                                        for row in loo_table.itertuples()],
            "LOO cosine": [_ci(row.cosine, row.cosine_low, row.cosine_high) for row in loo_table.itertuples()]}))


def further_findings(table: pd.DataFrame) -> list[str]:
    """Wei et al.'s finding, checked here, not assumed: first-order methods (grad-dot,
    grad-cos, tracin) agree well after short further training and decay with longer;
    influence functions (if-cg, ekfac) are more stable but lower."""
    first_order = [m for m in ("grad-dot", "grad-cos", "tracin") if m in set(table["method"])]
    influence = [m for m in ("if-cg", "ekfac") if m in set(table["method"])]
    if not first_order or not influence or table["epoch"].nunique() < 2:
        return ["Wei et al.'s finding needs first-order and influence-function methods at two lengths or more: "
                "not checked."]
    lo, hi = table["epoch"].min(), table["epoch"].max()
    at = table.set_index(["method", "epoch"])
    lines = []
    for m in first_order + influence:
        a, b = at.loc[(m, lo)], at.loc[(m, hi)]
        change = "decays" if b.cosine_high < a.cosine_low else "rises" if b.cosine_low > a.cosine_high else \
            "does not change beyond the intervals"
        lines.append(f"{m}: cosine {a.cosine:.3f} [{a.cosine_low:.3f}, {a.cosine_high:.3f}] after {lo} epoch(s), "
                     f"{b.cosine:.3f} [{b.cosine_low:.3f}, {b.cosine_high:.3f}] after {hi}: {change}")
    for measure in ("cosine", "spearman"):
        def value(m, e, part=""):
            return float(at.loc[(m, e), f"{measure}{part}"])

        best_first = max(first_order, key=lambda m: value(m, lo))
        best_if = max(influence, key=lambda m: value(m, lo))
        short = value(best_first, lo, "_low") > value(best_if, lo, "_high")
        decays = all(value(m, hi, "_high") < value(m, lo, "_low") for m in first_order)
        stable = all(abs(value(m, hi) - value(m, lo)) < min(abs(value(f, hi) - value(f, lo)) for f in first_order)
                     for m in influence)
        verdict = "reproduced" if short and decays and stable else "not reproduced"
        lines.append(f"Wei et al.'s finding by {measure} (first-order methods agree best after short further "
                     f"training and decay with longer; influence functions lower but more stable): **{verdict}** "
                     f"here (first-order above influence after {lo} epoch(s) beyond the intervals: "
                     f"{'yes' if short else 'no'}; every first-order method decays: {'yes' if decays else 'no'}; "
                     f"influence functions change less: {'yes' if stable else 'no'}).")
    return lines


def retraining_section(doc: Document, r: ReportInputs) -> None:
    """How many retrainings the support evaluation logged, and their time."""
    trainings = r.trainings
    if trainings is None:
        return
    doc.heading(2, "Retraining log")
    group = [c for c in ("method", "mode") if c in trainings.columns]
    agg = trainings.groupby(group).agg(trainings=("seconds", "size"), seconds=("seconds", "sum")).reset_index() \
        if group and "seconds" in trainings else None
    doc.para(f"{len(trainings)} retrainings logged"
             + (f", {_seconds(float(trainings['seconds'].sum()))} of training in total." if "seconds" in trainings else "."))
    if agg is not None:
        agg["seconds"] = agg["seconds"].map(_seconds)
        doc.table(agg)


def image_grid_section(doc: Document, r: ReportInputs) -> None:
    """Seeded targets and their top-ranked training images per method."""
    doc.heading(2, "Top-ranked training images")
    rankings = r.rankings
    if rankings is None:
        doc.para(f"No rankings yet: run `{command_for('rankings')}`.")
        return
    if r.grid_targets < 1 or r.grid_top < 1:
        doc.para("Image grid disabled (grid_targets or grid_top < 1).")
        return
    try:
        loader = r.image_loader or default_image_loader(r.manifest)
        train_set, test_set = loader("train"), loader("test")
        methods = order_methods(rankings["method"].unique())
        # targets ranked by the most methods, so every row group is complete
        per_target = rankings.groupby("target_id")["method"].nunique()
        pool = np.sort(per_target[per_target == per_target.max()].index.to_numpy())
        chosen = np.sort(np.random.default_rng(r.seed).choice(pool, size=min(r.grid_targets, len(pool)),
                                                              replace=False))
        grid = plots.plot_top_ranked([int(t) for t in chosen], r.lists, methods, train_set, test_set, r.grid_top,
                                     r.files / "top_ranked.png", supports=r.support)
    except Exception as error:  # the grid is decoration: a missing dataset must not cost the report
        doc.para(f"Image grid skipped: the images could not be read ({type(error).__name__}: {error}).")
        return
    doc.para(f"{len(chosen)} targets (seeded choice, seed {r.seed}); a red frame marks a training image of "
             "another class than the target; row labels give the method and its supports (nf: not found).")
    doc.image(grid, "Targets and their top-ranked training images per method")


# The report's sections, in document order: each is section(doc, inputs).
SECTIONS: tuple[Callable[[Document, ReportInputs], None], ...] = (
    title_section, claims_section, header_section, availability_section, support_section, win_rate_section,
    overlap_section, scores_section, lds_section, further_section, cost_section, frontier_section,
    retraining_section,
    image_grid_section,
)


# ----------------------------------------------------------------------------- the report


def write_report(exp_dir: str | os.PathLike, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                 jaccard_ks: Sequence[int] = (10, 100), grid_targets: int = 4, grid_top: int = 8,
                 image_loader: Callable[[str], object] | None = None) -> tuple[Path, Path]:
    """Write EXP/report.md, EXP/report.html and EXP/report_files/*.png; return (md, html).

    n_boot, confidence, seed: bootstrap over targets for every mean over targets.
    jaccard_ks: the k of the top-k overlap tables. grid_targets, grid_top: how many
    targets (seeded choice) and top-ranked images per method the image grid shows.
    image_loader: split -> ImageSet
    (default: the preset's dataset); a loader that fails only drops the image grid.
    """
    root = Path(exp_dir)
    inputs = ReportInputs(root, load_tables(root), n_boot=n_boot, confidence=confidence, seed=seed,
                          jaccard_ks=jaccard_ks, grid_targets=grid_targets, grid_top=grid_top,
                          image_loader=image_loader)
    inputs.files.mkdir(parents=True, exist_ok=True)
    doc = Document()
    for section in SECTIONS:
        section(doc, inputs)
    md_path, html_path = root / "report.md", root / "report.html"
    title = f"Attribution report: {inputs.preset.get('name') or root.name}"
    write_text(md_path, doc.markdown(root))
    write_text(html_path, doc.html(title))
    return md_path, html_path


__all__ = ["write_report", "load_tables", "ReportError", "ReportInputs", "Document", "SECTIONS", "command_for",
           "find_ablation_runs", "pretrain_warning",
           "default_image_loader", "FILES_DIR"]
