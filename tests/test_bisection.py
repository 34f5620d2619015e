"""The support search state machine against synthetic oracles with known answers."""

import itertools

import numpy as np
import pytest

from attribution.bisection import NOT_FOUND, BisectionSearch, Trial, flip_vote, run_search


def reference_support(correct, limit, budget, seeds, first_seeds=1):
    """The reference procedure written out directly (fixed schedule), for comparison."""
    def flipped(k, n):
        return np.mean([correct(k, s) for s in range(n)]) <= 0.5

    if not flipped(limit, first_seeds):
        return NOT_FOUND
    lo, hi = 0, limit
    for _ in range(budget):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if flipped(mid, seeds):
            hi = mid
        else:
            lo = mid
    return hi


def threshold_oracle(threshold, offsets=(0,)):
    """Seed s keeps the target correct while k < threshold + offsets[s] (monotone in k)."""
    return lambda k, seed: k < threshold + offsets[seed % len(offsets)]


def test_flip_vote_majority_rule():
    assert flip_vote(3, 0, 5) is False and flip_vote(0, 3, 5) is True
    assert flip_vote(2, 2, 5) is None and flip_vote(2, 3, 5) is True
    # mean correctness <= 0.5 counts as flipped: 2 of 4 correct is flipped
    assert flip_vote(2, 2, 4) is True and flip_vote(3, 0, 4) is False and flip_vote(2, 1, 4) is None
    assert flip_vote(0, 1, 1) is True and flip_vote(1, 0, 1) is False
    with pytest.raises(ValueError):
        flip_vote(4, 2, 5)


@pytest.mark.parametrize("mode", ["removal", "mislabel"])
def test_exact_threshold_found_with_enough_budget(mode):
    for threshold in (1, 2, 37, 499, 500):
        search = run_search(BisectionSearch(limit=500, budget=9, seeds=5, mode=mode), threshold_oracle(threshold))
        assert search.support == threshold, (threshold, search.summary())
        assert search.mode == mode


@pytest.mark.parametrize("mode", ["removal", "mislabel"])
def test_early_decision_matches_fixed_schedule_and_saves(mode):
    rng = np.random.default_rng(0)
    total_early = total_fixed = 0
    for case in range(60):
        limit = int(rng.integers(2, 1300))
        budget = int(rng.integers(1, 9))
        threshold = int(rng.integers(1, limit + 200))  # some beyond the limit: not found
        offsets = rng.integers(-40, 40, size=5)  # seed noise; the vote is the median threshold
        oracle = threshold_oracle(threshold, offsets)
        expected = reference_support(oracle, limit, budget, 5)
        fixed = run_search(BisectionSearch(limit, budget, 5, early_decision=False, mode=mode), oracle)
        early = run_search(BisectionSearch(limit, budget, 5, early_decision=True, mode=mode), oracle)
        spec = run_search(BisectionSearch(limit, budget, 5, mode=mode), oracle, parallel=4, speculative=True)
        assert fixed.support == early.support == spec.support == expected, (case, limit, budget, threshold)
        assert fixed.trainings == fixed.reference_trainings()  # fixed schedule = reference cost
        assert early.trainings <= fixed.trainings
        assert early.reference_trainings() == fixed.trainings
        total_early += early.trainings
        total_fixed += fixed.trainings
    # 3 of 5 suffice whenever the seeds agree; here most steps are unanimous
    assert total_early <= 0.75 * total_fixed, (total_early, total_fixed)


def test_not_found_costs_first_test_only():
    search = run_search(BisectionSearch(limit=100, budget=7), threshold_oracle(1000))
    assert search.support == NOT_FOUND and search.trainings == 1 and search.requested == [Trial(100, 0)]
    # first test with 5 seeds uses the same majority rule (and early decision)
    search = run_search(BisectionSearch(limit=100, budget=7, first_seeds=5), threshold_oracle(1000))
    assert search.support == NOT_FOUND and search.trainings == 3


def test_every_request_is_kept_and_never_repeated():
    search = BisectionSearch(limit=1280, budget=8, seeds=5, early_decision=False)
    run_search(search, threshold_oracle(300, (0, 5, -5, 20, -20)), parallel=3)
    assert len(search.requested) == len(set(search.requested)) == search.trainings == 41
    assert set(search.requested) == set(search.results)


def test_results_known_in_advance_are_not_proposed_again():
    oracle = threshold_oracle(123, (0, 3, -3, 10, -10))
    clean = run_search(BisectionSearch(1280, 8, 5), oracle)
    # a restarted driver reads part of the log back, then continues
    resumed = BisectionSearch(1280, 8, 5)
    known = clean.requested[: len(clean.requested) // 2]
    for trial in known:
        resumed.record(trial, oracle(trial.k, trial.seed))
    run_search(resumed, oracle)
    assert resumed.support == clean.support
    assert not set(resumed.requested) & set(known)
    assert resumed.trainings == clean.trainings


def test_in_flight_trials_count_and_release_allows_retry():
    search = BisectionSearch(limit=64, budget=3, seeds=5)
    first = search.propose()
    assert first == [Trial(64, 0)] and search.propose() == []  # in flight: nothing more needed
    search.record(first[0], False)  # flipped at the limit -> bisection at 32
    batch = search.propose()
    assert batch == [Trial(32, s) for s in range(3)]  # early decision: 3 of 5 first
    search.release(batch[1])  # that training failed: it is needed again
    assert search.propose() == [Trial(32, 1)]
    search.record(Trial(32, 0), True)
    search.record(Trial(32, 1), False)
    search.record(Trial(32, 2), True)  # 2-1: one more seed could decide
    assert search.propose() == [Trial(32, 3)]
    search.record(Trial(32, 3), True)  # 3 correct: not flipped, lo = 32
    assert search.lo == 32 and search.current.k == 48


def test_speculation_proposes_both_children_and_keeps_outcome():
    search = BisectionSearch(limit=128, budget=4, seeds=5)
    search.record(Trial(128, 0), False)
    needed = search.propose()
    extra = search.propose(6, speculative=True)
    assert {t.k for t in extra} == {32, 96}  # the two possible next steps
    assert not set(needed) & set(extra)


def test_conflicting_duplicate_outcome_is_an_error():
    search = BisectionSearch(limit=10, budget=2)
    search.record(Trial(10, 0), False)
    with pytest.raises(ValueError, match="deterministic"):
        search.record(Trial(10, 0), True)


def test_bad_parameters_are_rejected():
    for kwargs in ({"limit": 0}, {"limit": 5, "budget": -1}, {"limit": 5, "seeds": 0}):
        with pytest.raises(ValueError):
            BisectionSearch(**kwargs)


def test_even_seed_count_uses_mean_rule():
    # 4 seeds, 2 correct -> mean 0.5 -> flipped (the reference's <= 0.5)
    for pattern in itertools.product([0, 1], repeat=4):
        oracle = lambda k, s, p=pattern: bool(p[s]) if k == 32 else k < 32
        fixed = run_search(BisectionSearch(64, 1, 4, early_decision=False), oracle)
        early = run_search(BisectionSearch(64, 1, 4), oracle)
        assert fixed.support == early.support == (32 if sum(pattern) <= 2 else 64)

