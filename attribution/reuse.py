"""An ablation reuses its base experiment's work wherever its change does not reach.

``attribution run PRESET --ablation NAME`` writes runs/PRESET-NAME and takes runs/PRESET
(or ``--base EXP``) as its *base*, recorded in the ablation's manifest under ``base``.
Two levels of reuse, both read-only on the base (files are hard-linked or copied with
:func:`attribution.artifacts.link_or_copy`; every writer replaces files atomically, so
the ablation rewriting one never touches the base's bytes):

- Whole stages (:class:`BaseReuse`, driven by :class:`attribution.pipeline.Pipeline`):
  before a stage runs, the base's files of that stage are linked in when (1) the base
  ran the stage with the same section settings (its manifest's ``settings``), (2) the
  [data] selection is the same, and (3) every input is unchanged: the files of all the
  earlier stages of the pipeline (:func:`stage_files`) are, path for path, the same
  bytes in both experiments (a fingerprint: same inode, or same size and SHA-256).
  Earlier stages' files, not only the declared ``reads``, because some stages read
  more than they declare (embed reads the pretrained checkpoint). The stage then runs
  as usual and its own stored-settings checks confirm the reuse; when they refuse a
  linked file (:class:`attribution.artifacts.SettingsChanged` before its plan passed:
  a setting of another section it depends on changed, e.g. TRAK on the [support]
  recipe), the links are removed and the stage computes from scratch.
- Single trainings (:func:`adopt_base_trainings`, a hook of the support stage): the
  searches of an ablation whose rankings changed still share trainings with the base
  (the same recipe fingerprint, the same change digest of the removed / relabelled
  ids, the same seed: e.g. the first test at k = a whole class); those rows are copied
  from the base's trainings log instead of being trained again. The full-data ensemble
  (support_targets.parquet) is taken over when its stored settings match
  (:func:`adopt_base_artifact`).

What was reused is recorded in the ablation's manifest (``base.stages``: per stage
reused or run, and why; the support summary's ``trainings_from_base`` next to
``trained_this_run``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from attribution.artifacts import (SettingsChanged, differences, link_or_copy, same_file_content,
                                   stored_settings)
from attribution.experiment import ARTIFACTS, Experiment

# artifacts several stages write: each method's files belong to the stage that fits it
# a method's files and its variants' (``trak@m20``: attribution.methods.variant_name)
PER_METHOD = {"scores": ("scores/{method}/**/*", "scores/{method}@*/**/*"),
              "rankings": ("rankings/{method}-*.parquet", "rankings/{method}@*-*.parquet")}


def base_of(exp: Experiment) -> Experiment | None:
    """The base experiment ``exp`` records (manifest ``base.root``), None when it has none
    or it no longer exists (the ablation then computes what it would have reused)."""
    root = (exp.manifest().get("base") or {}).get("root")
    if not root or not Path(root).is_dir() or Path(root).resolve() == exp.root.resolve():
        return None
    return Experiment(root)


# ----------------------------------------------------------------------------- stage files


def stage_files(root: str | os.PathLike, stage: str) -> list[str]:
    """The files (paths relative to ``root``, hidden ones left out) the stage ``stage``
    has written in the experiment at ``root``: its declared artifacts; for the shared
    score and ranking folders only the files of the methods whose ``stage`` it is
    (files of unknown methods count as the first writer's)."""
    from attribution.methods import available_methods, method_class
    from attribution.stages import available_stages, producer_of, stage_class

    root = Path(root)
    out: set[str] = set()
    for artifact in stage_class(stage).writes:
        if artifact in PER_METHOD:
            mine = [m for m in available_methods() if method_class(m).stage == stage]
            for method in mine:
                for pattern in PER_METHOD[artifact]:
                    out |= _visible(root, pattern.format(method=method))
            if producer_of(artifact) == stage:  # unknown methods' files (another version's)
                others = [m for m in available_methods() if method_class(m).stage in available_stages()]
                claimed = set().union(*(_visible(root, pattern.format(method=m))
                                        for m in others for pattern in PER_METHOD[artifact]))
                out |= _visible(root, f"{ARTIFACTS[artifact]}/**/*") - claimed
        else:
            path = root / ARTIFACTS[artifact]
            if path.is_file():
                out.add(ARTIFACTS[artifact])
            else:
                out |= _visible(root, f"{ARTIFACTS[artifact]}/**/*")
    return sorted(out)


def _visible(root: Path, pattern: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.glob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def input_files(root: str | os.PathLike, stage: str) -> list[str]:
    """Every file the stages before ``stage`` (pipeline order) have written: what the
    stage may read, whatever it declares."""
    from attribution.stages import available_stages

    earlier = available_stages()[:available_stages().index(stage)]
    return sorted(set().union(*(stage_files(root, s) for s in earlier))) if earlier else []


def first_difference(a: Path, b: Path, paths_a: list[str], paths_b: list[str]) -> str | None:
    """The first path whose file differs between experiments ``a`` and ``b`` (present in
    one only, or other bytes); None when they hold the same files."""
    only = sorted(set(paths_a) ^ set(paths_b))
    if only:
        return f"{only[0]} (only in {'the base' if only[0] in paths_b else 'this experiment'})"
    pending = []
    for rel in paths_a:  # cheap tests first: one inode, or another size
        fa, fb = a / rel, b / rel
        if os.path.samefile(fa, fb):
            continue
        if fa.stat().st_size != fb.stat().st_size:
            return f"{rel} (other content)"
        pending.append(rel)
    for rel in pending:
        if not same_file_content(a / rel, b / rel):
            return f"{rel} (other content)"
    return None


# ----------------------------------------------------------------------------- whole stages


def comparable_settings(config, recorded: dict) -> dict:
    """``config.to_dict()`` without the keys the ``recorded`` settings lack that are at
    their default: a setting added after the base ran, left at its default (which keeps
    the behaviour from before it existed), is no change."""
    defaults = config.defaults()
    return {k: v for k, v in config.to_dict().items()
            if k in recorded or k not in defaults or v != defaults[k]}


class BaseReuse:
    """The base experiment of one pipeline run and what each stage took from it."""

    def __init__(self, exp: Experiment, base: Experiment):
        self.exp, self.base = exp, base
        self.base_manifest = base.manifest()
        self.stages: dict[str, dict] = {}

    @classmethod
    def open(cls, exp: Experiment, base: str | os.PathLike, data_settings, required: bool = True) -> "BaseReuse | None":
        """Check the base before any work: it exists (else refused when ``required``, or
        None with a note), it is not ``exp`` itself, and it was made on the same images."""
        from attribution.pipeline import DATA_COMPARED
        from attribution.settings import DataSettings, SettingsError

        root = Path(base)
        if not (root / "manifest.json").is_file():
            if required:
                raise SettingsError(f"--base {base}: no experiment there (no manifest.json); run the base preset "
                                    "first ('attribution run PRESET'), or give its directory with --base EXP")
            print(f"note: no base experiment at {base}: everything is computed (run the preset without "
                  "--ablation first to let its ablations reuse its work)", file=sys.stderr, flush=True)
            return None
        if root.resolve() == exp.root.resolve():
            raise SettingsError(f"--base {base} is the experiment being written: give the preset's own "
                                "experiment (e.g. runs/quickstart) as the base of an ablation")
        base_exp = Experiment(root)
        recorded = (base_exp.manifest().get("preset") or {}).get("preset") or {}
        try:
            theirs = DataSettings.from_preset(recorded).to_dict()
        except ValueError:
            theirs = None
        ours = data_settings.to_dict()
        if theirs is None or any(theirs.get(k) != ours.get(k) for k in DATA_COMPARED):
            print(f"note: base experiment {base} was made on other images ([data] differs): nothing is reused",
                  file=sys.stderr, flush=True)
            return None
        return cls(exp, base_exp)

    def record(self) -> None:
        """The base in the manifest (once the experiment exists)."""
        preset = (self.base_manifest.get("preset") or {}).get("preset") or {}
        self.exp.record_stage("base", root=str(self.base.root.resolve()), location=self.base.location,
                              preset=preset.get("name"), ablation=preset.get("ablation"), stages=self.stages)

    def decide(self, stage) -> tuple[list[str], str]:
        """The base files ``stage`` may take over, and why (an empty list: why not)."""
        name = stage.name
        section = self.base_manifest.get(name)
        if not isinstance(section, dict) or not isinstance(section.get("settings"), dict):
            return [], "the base has not run this stage"
        changes = differences(section["settings"], comparable_settings(stage.config, section["settings"]),
                              prefix=f"{name}.")
        if changes:
            return [], "settings differ: " + "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "")
        different = first_difference(self.exp.root, self.base.root, input_files(self.exp.root, name),
                                     input_files(self.base.root, name))
        if different:
            return [], f"an input differs: {different}"
        files = stage_files(self.base.root, name)
        if not files:
            return [], "the base holds no files of this stage"
        return files, "same settings and inputs as the base"

    def link(self, files: list[str]) -> list[str]:
        """Link the base's ``files`` where this experiment has none; returns those linked."""
        linked = []
        for rel in files:
            target = self.exp.root / rel
            if target.exists():  # the stage's own checks decide about a file it already has
                continue
            link_or_copy(self.base.root / rel, target)
            linked.append(rel)
        return linked

    def unlink(self, linked: list[str]) -> None:
        for rel in linked:
            (self.exp.root / rel).unlink(missing_ok=True)

    def run_stage(self, stage, on_planned: Callable) -> dict:
        """Run ``stage``, with the base's files of it linked in when nothing it depends on changed."""
        files, reason = self.decide(stage)
        linked = self.link(files) if files else []
        planned = False

        def mark_planned(s, plan) -> None:
            nonlocal planned
            planned = True
            on_planned(s, plan)

        try:
            summary = stage(on_planned=mark_planned)
        except SettingsChanged as error:
            self.unlink(linked)
            if planned or not linked:
                raise
            reason = f"the stage refused the base's files ({'; '.join(error.changes[:2])}): computed"
            linked = []
            summary = stage(on_planned=on_planned)
        except BaseException:
            if not planned:  # a run refused before its plan passed leaves nothing behind
                self.unlink(linked)
            raise
        self.stages[stage.name] = {"reused": bool(linked) or bool(files and reason.startswith("same")),
                                   "linked_files": len(linked), "reason": reason}
        if stage.name == "support":
            self.stages["support"].update(trainings_from_base=int(summary.get("trainings_from_base", 0)),
                                          trained_this_run=int(summary.get("trained_this_run", 0)))
        self.record()
        print(f"base {self.base.location}: {stage.name} "
              + (f"reused ({len(linked)} files linked)" if self.stages[stage.name]["reused"] else f"run ({reason})"),
              flush=True)
        return summary


# ----------------------------------------------------------------------------- support hooks


def adopt_base_artifact(exp: Experiment, artifact: str, wanted: dict) -> bool:
    """Link the base's ``artifact`` (a Parquet file with stored settings) into ``exp``
    when ``exp`` has none and the base's was made with exactly ``wanted``."""
    base = base_of(exp)
    path = exp.path(artifact)
    if base is None or path.exists() or not base.path(artifact).is_file():
        return False
    stored = stored_settings(base.path(artifact))
    if stored is None or differences(stored, wanted):
        return False
    link_or_copy(base.path(artifact), path)
    return True


def adopt_base_trainings(exp: Experiment, scheduler, known) -> int:
    """Feed ``scheduler`` (a :class:`attribution.stages.support.SearchScheduler` whose own
    log rows ``known`` are already recorded) the base's logged trainings that are the
    same trainings (same recipe fingerprint, search, k, seed, change digest and relabel
    class), and append them to ``exp``'s log so the ablation's log is complete. Returns
    how many were taken."""
    import pandas as pd

    from attribution.retraining import PartLog
    from attribution.stages.support import TRAINING_KEY, TRAININGS_SCHEMA, read_trainings

    base = base_of(exp)
    if base is None:
        return 0
    rows = read_trainings(base.trainings, scheduler.recipe)
    if rows.empty:
        return 0
    if len(known):  # already in this experiment's log (an earlier run of it adopted or trained them)
        seen = pd.MultiIndex.from_frame(known[TRAINING_KEY].astype(object))
        rows = rows[~pd.MultiIndex.from_frame(rows[TRAINING_KEY].astype(object)).isin(seen)]
    keep = []
    for row in rows.itertuples(index=False):
        task = scheduler.by_key.get((int(row.target_id), row.method, row.mode))
        keep.append(task is not None and task.answers(int(row.k), row.change, row.relabel_to))
    rows = rows[keep]
    if rows.empty:
        return 0
    log = PartLog(exp.trainings, TRAININGS_SCHEMA, flush_every=len(rows) + 1)
    for row in rows.to_dict("records"):
        log.add({k: (None if _missing(v) else v) for k, v in row.items()})
    log.flush()
    return scheduler.resume(rows)


def _missing(value) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
