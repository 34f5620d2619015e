"""SIMULATION: a scale model of the pipeline on a simulated GPU cluster (no Ray, no GPU).

What it answers: how long would the ImageNet-sized benchmark take on N GPUs, how busy
would they be, and how many retrainings would the support searches cost, compared with
the reference procedure (one search after another, 1 + budget x seeds trainings each)?
Nothing here is measured on a GPU: the unit costs are inputs (:class:`ScaleInputs`, each
with its source), and every report produced from it says SIMULATION.

Why in ``cluster/``: it models the *scheduler* of :mod:`cluster.support` (one training
per worker slot, several slots per GPU, required trainings before speculative ones,
oldest search first, stages one after another), not the method; ``attribution/`` stays
the method itself. It imports neither Ray nor torch, and it drives the REAL
:class:`attribution.bisection.BisectionSearch` state machine, so early decision,
speculation and the supports behave exactly as in a real run; only the outcome of a
training is simulated (:class:`OutcomeModel`).

The model, stage by stage (stages run one after another, as ``attribution run`` does):

- embed: ``embed_images`` in shards of ``shard_images`` on N GPUs (one actor per GPU);
  a shard takes shard_images / embed_images_per_gpu_s.
- rank: ``rank_targets`` ESVMs in tasks of ``targets_per_task`` on the CPUs of the GPU
  nodes (N x cpus_per_gpu single-threaded actors), each target costing
  ``esvm_seconds_per_target`` (measured here on one CPU thread: benchmarks/unit_costs.py).
- support: the full-data ensemble (``ensemble`` trainings), then every search.
  Slots = N x trainings_per_gpu; a training on a slot takes train_minutes x
  trainings_per_gpu / packing_speedup (k trainings sharing a GPU each run k times slower,
  less what packing gains), times a seeded log-normal jitter. A free slot takes a
  required training of the oldest search that has one, else (``speculate``) a
  speculative one. Dispatch latency and queueing on actors are ignored (the real
  scheduler keeps each actor 2 calls deep to hide them).
- outcomes (the only made-up part): each search draws a true support (log-uniform on
  [1, limit], or beyond the limit with probability ``not_found_fraction``) and each seed
  a persistent threshold around it (log-normal, ``seed_spread``: seed noise with common
  random numbers, as in the real runs); a training (k, seed) is correct iff k is below
  the seed's threshold. Deterministic per (seed, search, k, seed index).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from attribution.bisection import NOT_FOUND, BisectionSearch, Trial
from attribution.published_costs import FFCV_RESNET18_1xA100_MINUTES, FFCV_SOURCE  # noqa: F401 (re-exported)

BANNER = "SIMULATION (projected, not measured)"

SOURCES = {
    "train_minutes": FFCV_SOURCE,
    "embed_images_per_gpu_s": "ResNet-50 v1.5 inference, mixed precision, batch 256, 1 x V100 16GB: 3,382 img/s "
                              "(NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5 README); "
                              "an A100 is faster, JPEG decoding may be slower",
    "esvm_seconds_per_target": "measured here: python -m benchmarks.unit_costs (batched solver, 1 CPU thread, "
                               "1300 x 2048)",
    "cpus_per_gpu": "p4d.24xlarge: 96 vCPUs / 8 A100 (the instance FFCV's figures were taken on)",
    "ensemble": "reference: 4 ResNet-18 full-data models on ImageNet (method.md)",
    "budget": "reference: 7-8 bisection steps of 5 seeds, limit 1280 (method.md)",
    "targets": "reference: 30 ImageNet validation targets (method.md)",
    "outcome model": "assumption: log-uniform supports, not_found_fraction, log-normal seed thresholds",
}


@dataclass
class ScaleInputs:
    """Every number the projection depends on (printed with every output)."""

    gpus: int = 8
    trainings_per_gpu: int = 1          # fractional packing: k trainings share a GPU (k slots)
    packing_speedup: float = 1.0        # a GPU's throughput with k trainings vs one (1: no gain)
    cpus_per_gpu: int = 12              # rank-stage CPU actors per GPU
    # retraining
    epochs: int = 16                    # FFCV ResNet-18 schedule
    train_minutes: float | None = None  # one training on one GPU; None: FFCV's figure for `epochs`
    duration_jitter: float = 0.05       # log-normal sigma of a training's duration
    # embed
    embed_images: int = 1_281_167 + 50_000  # ImageNet train + val
    embed_images_per_gpu_s: float = 3382.0
    shard_images: int = 10_000
    # rank
    rank_targets: int = 50_000
    esvm_seconds_per_target: float = 0.0108  # docs/scale.md: the quieter of two measured runs
    targets_per_task: int = 64
    # support
    targets: int = 30
    methods: int = 4                    # esvm, l2, cosine, random
    modes: int = 2                      # removal, mislabel
    limit: int = 1280
    budget: int = 8
    seeds: int = 5
    first_seeds: int = 1
    ensemble: int = 4
    # outcome model (assumptions)
    not_found_fraction: float = 0.2
    seed_spread: float = 0.3
    # scheduler policy
    early_decision: bool = True
    speculate: bool = True
    sequential_searches: bool = False   # True: one search at a time (the reference procedure)
    seed: int = 0

    def __post_init__(self):
        if self.gpus < 1 or self.trainings_per_gpu < 1 or self.cpus_per_gpu < 1:
            raise ValueError(f"gpus, trainings_per_gpu and cpus_per_gpu must be >= 1, got {self.gpus}, "
                             f"{self.trainings_per_gpu}, {self.cpus_per_gpu}")
        if self.train_minutes is None and self.epochs not in FFCV_RESNET18_1xA100_MINUTES:
            raise ValueError(f"no FFCV figure for {self.epochs} epochs (have {sorted(FFCV_RESNET18_1xA100_MINUTES)}); "
                             "pass train_minutes explicitly")
        if not 0 <= self.not_found_fraction <= 1:
            raise ValueError(f"not_found_fraction must be in [0, 1], got {self.not_found_fraction}")

    @property
    def searches(self) -> int:
        return self.targets * self.methods * self.modes

    @property
    def slots(self) -> int:
        return self.gpus * self.trainings_per_gpu

    def training_seconds(self) -> float:
        """One training on one slot, before jitter."""
        minutes = self.train_minutes if self.train_minutes is not None else FFCV_RESNET18_1xA100_MINUTES[self.epochs]
        return 60.0 * minutes * self.trainings_per_gpu / self.packing_speedup


# ----------------------------------------------------------------------------- outcomes


class OutcomeModel:
    """Simulated training outcomes: persistent per-seed thresholds around a seeded support."""

    def __init__(self, inputs: ScaleInputs):
        self.inputs = inputs
        self._thresholds: dict[int, np.ndarray] = {}

    def thresholds(self, search: int) -> np.ndarray:
        """Per seed index: the smallest k at which that seed's model misclassifies the target."""
        if search not in self._thresholds:
            s = self.inputs
            rng = np.random.default_rng([s.seed, 11, search])
            if rng.random() < s.not_found_fraction:
                base = s.limit * 4.0  # beyond the limit: the first test finds the target still correct
            else:
                base = math.exp(rng.uniform(0.0, math.log(s.limit)))
            seeds = max(s.seeds, s.first_seeds)
            self._thresholds[search] = base * np.exp(s.seed_spread * rng.standard_normal(seeds))
        return self._thresholds[search]

    def __call__(self, search: int, k: int, seed: int) -> tuple[bool, float]:
        """(correct, margin): margin = log(threshold / k), positive while still correct."""
        threshold = float(self.thresholds(search)[seed])
        margin = math.log(threshold / max(k, 0.5))
        return margin > 0, margin

    def duration(self, base: float, *key: int) -> float:
        jitter = self.inputs.duration_jitter
        if jitter <= 0:
            return base
        return base * math.exp(jitter * np.random.default_rng([self.inputs.seed, 13, *key]).standard_normal())


# ----------------------------------------------------------------------------- simulators


def list_schedule(durations, workers: int) -> tuple[float, float]:
    """(makespan, busy time) of tasks taken in order by ``workers`` identical workers."""
    if not len(durations):
        return 0.0, 0.0
    finish = [0.0] * min(workers, len(durations))
    heapq.heapify(finish)
    for duration in durations:
        heapq.heappush(finish, heapq.heappop(finish) + duration)
    return max(finish), float(sum(durations))


@dataclass
class SupportRun:
    """What the simulated support stage did."""

    makespan: float = 0.0
    busy: float = 0.0            # slot-seconds spent training
    trainings: int = 0           # every training started (ensemble excluded), speculative ones included
    speculative: int = 0
    ensemble_seconds: float = 0.0
    critical_path: float = 0.0   # lower bound: ensemble + the longest search's chain of steps
    supports: list = field(default_factory=list)
    search_trainings: list = field(default_factory=list)
    reference_trainings: int = 0  # what the fixed schedule spends on the same paths


def simulate_support(inputs: ScaleInputs, progress: bool = False) -> SupportRun:
    """Discrete-event simulation of the support stage (ensemble, then every search)."""
    s = inputs
    outcomes = OutcomeModel(s)
    base = s.training_seconds()
    slots = s.slots
    run = SupportRun()
    # 1) the full-data ensemble: all members at once (as many as there are slots)
    ensemble = [outcomes.duration(base, 0, i) for i in range(s.ensemble)]
    run.ensemble_seconds, busy = list_schedule(ensemble, slots)
    run.busy += busy
    shortest = min(ensemble, default=base)
    # 2) the searches
    searches = [BisectionSearch(s.limit, s.budget, s.seeds, s.first_seeds, s.early_decision, key=i)
                for i in range(s.searches)]
    active = list(range(len(searches)))
    stalled_required: set[int] = set()     # proposed nothing: nothing to do until a result arrives
    stalled_speculative: set[int] = set()
    events: list = []  # (finish time, sequence, search, trial, speculative)
    sequence = 0
    now, free = 0.0, slots

    def start(index: int, trial: Trial, speculative: bool) -> None:
        nonlocal sequence, free, shortest
        duration = outcomes.duration(base, 1, index, trial.k, trial.seed)
        heapq.heappush(events, (now + duration, sequence, index, trial, speculative))
        sequence += 1
        free -= 1
        run.trainings += 1
        run.speculative += speculative
        run.busy += duration
        shortest = min(shortest, duration)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(searches), desc=f"simulate {s.gpus} GPUs", unit="search", disable=not progress,
               leave=False)
    while active or events:
        candidates = active[:1] if s.sequential_searches else active
        for index in candidates:  # required trainings, oldest search first
            if not free:
                break
            if index in stalled_required:
                continue
            proposed = searches[index].propose(free)
            for trial in proposed:
                start(index, trial, False)
            if not proposed:
                stalled_required.add(index)
        if s.speculate and free:
            for index in candidates:
                if not free:
                    break
                if index in stalled_speculative:
                    continue
                proposed = searches[index].propose(free, speculative=True)
                for trial in proposed:
                    start(index, trial, True)
                if not proposed:
                    stalled_speculative.add(index)
        if not events:
            raise RuntimeError(f"simulation stalled with searches {active[:5]} unfinished (a bug)")
        finish, _, index, trial, speculative = heapq.heappop(events)
        now = finish
        free += 1
        search = searches[index]
        correct, margin = outcomes(index, trial.k, trial.seed)
        search.record(trial, correct, margin)
        stalled_required.discard(index)
        stalled_speculative.discard(index)
        if search.done and index in active:
            active.remove(index)
            bar.update()
    bar.close()
    run.makespan = run.ensemble_seconds + now
    lookahead = 2 if s.speculate else 1  # speculation starts the next step's trainings one step early
    longest_chain = max((math.ceil(len(search.steps) / lookahead) for search in searches), default=0)
    run.critical_path = max(ensemble, default=0.0) + longest_chain * shortest
    run.supports = [int(search.support) for search in searches]
    run.search_trainings = [search.trainings for search in searches]
    run.reference_trainings = sum(search.reference_trainings() for search in searches)
    return run


@dataclass
class Projection:
    """One simulated pipeline run: per-stage makespans (seconds), utilisation, trainings."""

    inputs: ScaleInputs
    embed_seconds: float
    rank_seconds: float
    support: SupportRun

    @property
    def makespan(self) -> float:
        return self.embed_seconds + self.rank_seconds + self.support.makespan

    @property
    def critical_path(self) -> float:
        s = self.inputs
        longest_shard = min(s.shard_images, s.embed_images) / s.embed_images_per_gpu_s
        longest_task = min(s.targets_per_task, s.rank_targets) * s.esvm_seconds_per_target
        return longest_shard + longest_task + self.support.critical_path

    @property
    def gpu_utilisation(self) -> float:
        """Busy slot-time / available slot-time over the support stage (where the GPUs are)."""
        capacity = self.inputs.slots * self.support.makespan
        return self.support.busy / capacity if capacity else 0.0

    def row(self) -> dict:
        return {"gpus": self.inputs.gpus, "policy": policy_name(self.inputs),
                "trainings": self.support.trainings, "speculative": self.support.speculative,
                "embed_h": self.embed_seconds / 3600, "rank_h": self.rank_seconds / 3600,
                "support_h": self.support.makespan / 3600, "makespan_h": self.makespan / 3600,
                "critical_path_h": self.critical_path / 3600, "gpu_utilisation": self.gpu_utilisation,
                "found": sum(v != NOT_FOUND for v in self.support.supports), "searches": len(self.support.supports)}


def simulate(inputs: ScaleInputs, progress: bool = False) -> Projection:
    """The whole pipeline (embed, rank, support) on ``inputs.gpus`` simulated GPUs."""
    s = inputs
    shards = [min(s.shard_images, s.embed_images - start) / s.embed_images_per_gpu_s
              for start in range(0, s.embed_images, s.shard_images)]
    embed_seconds, _ = list_schedule(shards, s.gpus)
    tasks = [min(s.targets_per_task, s.rank_targets - start) * s.esvm_seconds_per_target
             for start in range(0, s.rank_targets, s.targets_per_task)]
    rank_seconds, _ = list_schedule(tasks, s.gpus * s.cpus_per_gpu)
    return Projection(s, embed_seconds, rank_seconds, simulate_support(s, progress))


# ----------------------------------------------------------------------------- policies

POLICIES = {
    "reference": dict(sequential_searches=True, early_decision=False, speculate=False),
    "parallel": dict(sequential_searches=False, early_decision=False, speculate=False),
    "early": dict(sequential_searches=False, early_decision=True, speculate=False),
    "early+spec": dict(sequential_searches=False, early_decision=True, speculate=True),
}
POLICY_NAMES = {
    "reference": "reference: one search after another, fixed schedule",
    "parallel": "all searches at once, fixed schedule",
    "early": "all at once, early decision",
    "early+spec": "all at once, early decision + speculation",
}


def policy_name(inputs: ScaleInputs) -> str:
    for name, flags in POLICIES.items():
        if all(getattr(inputs, key) == value for key, value in flags.items()):
            return name
    return "custom"


def project(base: ScaleInputs, gpus, policies=tuple(POLICIES), progress: bool = False) -> list[Projection]:
    """Every (GPU count, policy) combination with the same outcome model and unit costs."""
    return [simulate(replace(base, gpus=int(n), **POLICIES[p]), progress) for n in gpus for p in policies]


def describe_inputs(inputs: ScaleInputs) -> list[str]:
    """The inputs as printable lines, with their sources."""
    s = inputs
    lines = [f"{BANNER}: the support scheduler and stages on simulated GPUs; inputs:"]
    values = asdict(s)
    for key in ("gpus", "sequential_searches", "early_decision", "speculate"):
        values.pop(key)
    values["train_minutes"] = s.training_seconds() / 60 * s.packing_speedup / s.trainings_per_gpu
    for key, value in values.items():
        source = SOURCES.get(key, "")
        lines.append(f"  {key} = {value}" + (f"    [{source}]" if source else ""))
    lines.append(f"  searches = {s.searches} (targets x methods x modes); reference cost per search "
                 f"<= {s.first_seeds} + {s.budget} x {s.seeds} trainings    [{SOURCES['outcome model']}]")
    return lines
