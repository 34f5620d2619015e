"""The stage interface: declared settings, declared artifacts, plan / run / finish.

A stage is a small object built from the experiment, the parsed preset
(:class:`attribution.settings.Settings`) and a :class:`attribution.workqueue.Runtime`.
It declares

- ``settings_class``: its preset section (one typed dataclass, validated once, before
  any stage of a run starts);
- ``reads`` / ``writes``: the named artifacts (keys of
  :data:`attribution.experiment.ARTIFACTS`) it needs and produces; a missing input is
  refused by :meth:`Stage.check_inputs` with the stage that writes it;
- ``flags``: its own command-line flags (the CLI builds one subcommand per stage).

Calling a stage takes the experiment's lock (:meth:`attribution.experiment.Experiment.lock`:
one writer at a time) and runs :meth:`preflight` (cheap checks: inputs, data files),
:meth:`plan` (read inputs, decide what is already done, refuse changed settings; writes
nothing), :meth:`run` (compute what the plan lists, writing each artifact atomically as
it completes, so an interrupted run resumes) and :meth:`finish` (record the stage in the
manifest, return a summary).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Collection

from attribution.experiment import ARTIFACTS, Experiment
from attribution.settings import Section, Settings


@dataclass(frozen=True)
class Flag:
    """A stage's own command-line flag.

    ``option``: passed to the stage's constructor as ``options[option]`` (e.g. force);
    ``setting``: written into the preset as ``section.key`` (e.g. report.n_boot)."""

    name: str
    help: str
    option: str | None = None
    setting: str | None = None
    type: Any = None          # None: a boolean switch (store_true)


class StageInputMissing(FileNotFoundError):
    """A stage's input artifact does not exist; the message names the stage that writes it."""


@dataclass
class Plan:
    """What a stage will do: ``todo`` (units to compute), ``reused`` (units already done
    with the same settings), and whatever else the stage's :meth:`Stage.run` needs."""

    todo: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class Stage(abc.ABC):
    name: ClassVar[str] = ""
    settings_class: ClassVar[type[Section]] = Section
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    flags: ClassVar[tuple[Flag, ...]] = ()
    help: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_data: ClassVar[bool] = True  # reads the [data] images (preflight checks their files exist)

    def __init__(self, exp: Experiment, settings: Settings, runtime=None, *, progress: bool = True, **options):
        self.exp = exp if isinstance(exp, Experiment) else Experiment(exp)
        self.settings = settings
        self.config = settings[self.settings_class.section]
        self.runtime = runtime
        self.progress = progress
        self.options = options

    # ------------------------------------------------------------------ the shape
    def check_inputs(self) -> None:
        """Refuse to start when an input artifact is missing, naming its producer."""
        self.require(self.reads)

    def require(self, artifacts, produced: Collection[str] = ()) -> None:
        """:class:`StageInputMissing` for the first of ``artifacts`` that is neither in EXP
        nor in ``produced`` (what earlier stages of the same run will write)."""
        from attribution.stages import producer_of

        for artifact in artifacts:
            if artifact not in produced and not self.exp.has(artifact):
                producer = producer_of(artifact)
                raise StageInputMissing(
                    f"the {self.name} stage needs {self.exp.path(artifact)} ({artifact}), which the {producer} "
                    f"stage writes: run 'attribution {producer} --exp {self.exp.location}' first "
                    f"(or 'attribution run PRESET --exp {self.exp.location}')")

    def preflight(self, produced: Collection[str] = ()) -> None:
        """Cheap checks before anything is computed or written (no data loaded, no model
        built): every input exists or is in ``produced`` (written by a stage selected to
        run before this one), and the [data] files exist. The pipeline runs this for every
        selected stage before it records the preset; a stage's own call runs it too."""
        self.require(self.reads, produced)
        if self.uses_data:
            self.settings.data.check_available()

    @abc.abstractmethod
    def plan(self) -> Plan:
        """Read the inputs, decide what is done and what to compute; write nothing."""

    @abc.abstractmethod
    def run(self, plan: Plan) -> Any:
        """Compute what ``plan`` lists, writing each artifact atomically as it completes."""

    def finish(self, plan: Plan, result: Any) -> dict:
        """Record the stage in the manifest and return its summary (override to add fields)."""
        summary = dict(result or {})
        self.exp.record_stage(self.name, settings=self.config.to_dict(), **summary)
        return summary

    def __call__(self, on_planned: Callable[["Stage", Plan], None] | None = None) -> dict:
        """Run the stage under the experiment's lock. ``on_planned(stage, plan)`` is called
        once the stage's checks passed (its plan is made), before it writes anything: the
        pipeline records the preset there."""
        start = time.perf_counter()
        with self.exp.lock():
            self.preflight()
            self.check_inputs()
            plan = self.plan()
            if on_planned is not None:
                on_planned(self, plan)
            self.exp.record_location()
            result = self.run(plan)
            summary = self.finish(plan, result)
        summary.setdefault("seconds", round(time.perf_counter() - start, 1))
        return summary

    # ------------------------------------------------------------------ helpers
    def ranked_data(self, target_ids=None) -> tuple:
        """(target ids, training ImageSet, test ImageSet, the targets' arrays) of the
        stages that score the rank stage's targets (trak, gradient, further): the
        ranked targets (or ``target_ids``, a sample of them), refused with the fix when
        they are not test images of the preset's dataset."""
        from attribution.ranking import ranked_targets
        from attribution.retraining import target_arrays

        if target_ids is None:
            target_ids = ranked_targets(self.exp, self.name)
        data = self.settings.data
        train_set, test_set = data.load("train"), data.load("test", subset=False)
        try:
            targets = target_arrays(test_set, target_ids)
        except KeyError as error:
            raise ValueError(f"{error.args[0]}: the targets in {self.exp.rankings} are not test images of "
                             f"{data.dataset}; rerun the rank stage or fix [data]") from error
        return target_ids, train_set, test_set, targets

    def require_runtime(self):
        if self.runtime is None:
            raise RuntimeError(f"the {self.name} stage runs work on a pool: construct it with a runtime "
                               "(attribution.workqueue.InProcessRuntime, or cluster.runtime.RayRuntime)")
        return self.runtime

    @classmethod
    def artifact_paths(cls, artifacts) -> list[str]:
        return [ARTIFACTS[a] for a in artifacts]
