"""Counterfactual support search as a pure state machine (no Ray, no torch).

One :class:`BisectionSearch` finds the support of one (target, method, mode): the
smallest k such that models retrained with the top-k ranked training images removed
(or relabelled, the mode is only carried along) misclassify the target.

Reference procedure (Singla et al. 2023, after the datamodels support code):

1. First test: retrain with all top-``limit`` images changed. If the target is still
   classified correctly the support is "not found" (-1).
2. Otherwise bisect between ``lo = 0`` (known not flipped) and ``hi = limit`` (flipped)
   for at most ``budget`` steps: ``mid = (lo + hi) // 2``; retrain ``seeds`` models;
   the target counts as flipped when its mean correctness over them is <= 0.5; then
   ``hi = mid`` if flipped else ``lo = mid``. The support is the final ``hi``.

Reading of the reference first test: the paper's cost bound "1 + 8 x 5 = 41 trainings
per search" counts ONE training for the first test, so ``first_seeds=1`` is the default
(``first_seeds=5`` is available and uses the same majority rule).

Early decision (the default): the flip rule is a majority vote over the seeds of a
step, so once enough seeds agree that the rest cannot change the vote (3 of 5), the
remaining seeds are not trained. Because every training (k, seed) is deterministic, the
vote over any deciding subset equals the vote over all seeds: the supports are
identical to the fixed schedule's by construction, only cheaper.

Speculation (k-ary search, optional): when the caller has idle capacity it may ask for
speculative trainings; the search then proposes the two k the next step could test
(one of them will be needed) and the remaining seeds of the current step. Results are
cached per (k, seed), so a speculative training counts as soon as the search reaches it
and the outcome is still identical.

The search never trains anything itself: the caller asks :meth:`propose` for trials,
runs them anywhere, and reports outcomes with :meth:`record` (in any order; results
known in advance, e.g. read back from a log after a restart, can be recorded before the
first proposal and are never proposed again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NOT_FOUND = -1


@dataclass(frozen=True, order=True)
class Trial:
    """One training the search asks for: top-``k`` changed, seed index ``seed``."""

    k: int
    seed: int


@dataclass
class Step:
    """One test of the search: ``k`` with its vote (``flipped`` is None while undecided)."""

    k: int
    seeds: int
    correct: int = 0
    incorrect: int = 0
    flipped: bool | None = None
    is_first_test: bool = False


def flip_vote(correct: int, incorrect: int, seeds: int) -> bool | None:
    """The step's vote from partial results, or None while the rest could still change it.

    Flipped means mean correctness over all ``seeds`` is <= 0.5, i.e. correct <= seeds/2.
    """
    if correct + incorrect > seeds:
        raise ValueError(f"{correct + incorrect} results for a step of {seeds} seeds")
    max_correct_not_flipped = seeds // 2  # correct <= seeds/2  <=>  correct <= floor(seeds/2)
    if correct > max_correct_not_flipped:
        return False  # even if every other seed were wrong, the mean stays above 0.5
    if correct + (seeds - correct - incorrect) <= max_correct_not_flipped:
        return True  # even if every other seed were right, the mean stays <= 0.5
    return None


class BisectionSearch:
    """Support search for one (target, method, mode).

    Parameters
    ----------
    limit : int
        Largest k tested (top-k limit; 1280 in the reference, capped by the ranking length).
    budget : int
        Bisection steps after the first test (7-8 in the reference).
    seeds : int
        Trainings per bisection step (``num_tests`` = 5 in the reference).
    first_seeds : int
        Trainings for the first test at k = ``limit`` (1 in the reference, see module doc).
    early_decision : bool
        Stop training a step's seeds once its vote is settled (default). False is the
        reference fixed schedule.
    mode, key : carried along for the caller (``"removal"`` / ``"mislabel"``; any id).
    """

    def __init__(self, limit: int, budget: int = 8, seeds: int = 5, first_seeds: int = 1,
                 early_decision: bool = True, mode: str = "removal", key=None):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if seeds < 1 or first_seeds < 1:
            raise ValueError(f"seeds and first_seeds must be >= 1, got {seeds}, {first_seeds}")
        self.limit, self.budget, self.seeds, self.first_seeds = int(limit), int(budget), int(seeds), int(first_seeds)
        self.early_decision = bool(early_decision)
        self.mode, self.key = mode, key
        self.results: dict[Trial, tuple[bool, float]] = {}  # every outcome known, incl. speculative ones
        self.requested: list[Trial] = []  # every trial this search proposed, in order
        self.in_flight: set[Trial] = set()
        self.steps: list[Step] = [Step(self.limit, self.first_seeds, is_first_test=True)]
        self.lo, self.hi = 0, self.limit
        self.support: int | None = None  # set when done
        self._advance()

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        return self.support is not None

    @property
    def current(self) -> Step | None:
        return None if self.done else self.steps[-1]

    def _count(self, step: Step) -> None:
        step.correct = step.incorrect = 0
        for seed in range(step.seeds):
            outcome = self.results.get(Trial(step.k, seed))
            if outcome is not None:
                if outcome[0]:
                    step.correct += 1
                else:
                    step.incorrect += 1

    def _vote(self, step: Step) -> bool | None:
        self._count(step)
        if self.early_decision:
            return flip_vote(step.correct, step.incorrect, step.seeds)
        if step.correct + step.incorrect < step.seeds:
            return None  # fixed schedule: every seed of the step is trained
        return step.correct / step.seeds <= 0.5

    def _next_k(self) -> int | None:
        """k of the next bisection step, or None when the search is over."""
        bisection_steps = len(self.steps) - 1
        if bisection_steps >= self.budget or self.hi - self.lo <= 1:
            return None  # budget spent, or no integer k strictly between lo and hi
        return (self.lo + self.hi) // 2

    def _advance(self) -> None:
        """Apply every decided vote (results may arrive before they are asked for)."""
        while not self.done:
            step = self.steps[-1]
            vote = self._vote(step)
            if vote is None:
                return
            step.flipped = vote
            if step.is_first_test:
                if not vote:
                    self.support = NOT_FOUND
                    return
            elif vote:
                self.hi = step.k
            else:
                self.lo = step.k
            k = self._next_k()
            if k is None:
                self.support = self.hi
                return
            self.steps.append(Step(k, self.seeds))

    # ------------------------------------------------------------------ protocol
    def _needed(self, step: Step) -> list[Trial]:
        """Trials of ``step`` that must still be trained (fewest that could decide it)."""
        self._count(step)
        missing = [Trial(step.k, s) for s in range(step.seeds)
                   if Trial(step.k, s) not in self.results]
        free = [t for t in missing if t not in self.in_flight]
        if not self.early_decision:
            return free
        # Smallest number of further results that could settle the vote; trainings
        # already in flight count towards it.
        need_not_flipped = step.seeds // 2 + 1 - step.correct
        need_flipped = (step.seeds - step.seeds // 2) - step.incorrect
        needed = min(need_not_flipped, need_flipped) - (len(missing) - len(free))
        return free[:max(0, needed)]

    def _speculative(self) -> list[Trial]:
        """Trials that may be needed later: both candidate next k, then the step's other seeds."""
        step = self.steps[-1]
        out: list[Trial] = []
        bisection_steps = len(self.steps) - 1
        if bisection_steps < self.budget:  # a further step may follow this one
            if step.is_first_test:
                lo_hi = [(0, self.limit)]
            else:
                lo_hi = [(self.lo, step.k), (step.k, self.hi)]
            children = [(lo + hi) // 2 for lo, hi in lo_hi if hi - lo > 1]
            per_child = self.seeds // 2 + 1 if self.early_decision else self.seeds
            for seed in range(per_child):
                for k in children:
                    out.append(Trial(k, seed))
        out += [Trial(step.k, s) for s in range(step.seeds)]
        return out

    def propose(self, max_trials: int | None = None, speculative: bool = False) -> list[Trial]:
        """Trials to run next (marked in flight); [] when nothing is needed right now.

        ``speculative=True`` adds trials that are not needed yet but may be (use it only
        when workers would otherwise idle: some of them may turn out to be wasted).
        """
        if self.done or (max_trials is not None and max_trials <= 0):
            return []
        candidates = self._needed(self.steps[-1])
        if speculative:
            candidates = candidates + self._speculative()
        out: list[Trial] = []
        for trial in candidates:
            if max_trials is not None and len(out) >= max_trials:
                break
            if trial in self.results or trial in self.in_flight or trial in out:
                continue
            out.append(trial)
        for trial in out:
            self.in_flight.add(trial)
            self.requested.append(trial)
        return out

    def record(self, trial: Trial | tuple[int, int], correct: bool, margin: float = math.nan) -> None:
        """Report the outcome of a training (proposed or not; duplicates must agree)."""
        trial = Trial(*trial) if not isinstance(trial, Trial) else trial
        previous = self.results.get(trial)
        if previous is not None and previous[0] != bool(correct):
            raise ValueError(
                f"conflicting outcomes for {trial} of search {self.key}: trainings must be "
                "deterministic per seed (check the recipe hash and the per-worker thread count)"
            )
        self.in_flight.discard(trial)
        self.results[trial] = (bool(correct), float(margin))
        self._advance()

    def release(self, trial: Trial | tuple[int, int]) -> None:
        """Forget that ``trial`` is in flight (its training failed; it may be proposed again)."""
        trial = Trial(*trial) if not isinstance(trial, Trial) else trial
        self.in_flight.discard(trial)

    # ------------------------------------------------------------------ accounting
    @property
    def trainings(self) -> int:
        """Trainings whose outcome this search knows (what it cost, speculative ones included)."""
        return len(self.results)

    def reference_trainings(self) -> int | None:
        """Trainings the reference fixed schedule spends on the same path (None while running)."""
        if not self.done:
            return None
        return self.first_seeds + self.seeds * (len(self.steps) - 1)

    def used_trainings(self) -> int:
        """Trainings the decisions actually used: those at tested k within each step's seeds."""
        return sum(1 for step in self.steps for s in range(step.seeds) if Trial(step.k, s) in self.results)

    def summary(self) -> dict:
        return {
            "support": self.support,
            "trainings": self.trainings,
            "reference_trainings": self.reference_trainings(),
            "steps": [(s.k, s.correct, s.incorrect, s.flipped) for s in self.steps],
            "lo": self.lo, "hi": self.hi,
        }


def run_search(search: BisectionSearch, outcome, parallel: int = 1, speculative: bool = False) -> BisectionSearch:
    """Drive ``search`` to the end with ``outcome(k, seed) -> correct`` or ``(correct, margin)``
    (tests, simulations, replays of a trainings log).

    ``parallel`` trials are asked for per round, as a pool of that many workers would.
    """
    while not search.done:
        batch = search.propose(parallel)
        if speculative and len(batch) < parallel:
            batch += search.propose(parallel - len(batch), speculative=True)
        if not batch:
            raise RuntimeError(f"search {search.key} proposed nothing but is not done")
        for trial in batch:
            result = outcome(trial.k, trial.seed)
            correct, margin = result if isinstance(result, tuple) else (result, math.nan)
            search.record(trial, bool(correct), float(margin))
    return search
