"""The scale model (cluster/simulate.py): a discrete-event SIMULATION driving the real
BisectionSearch. Fast: small search counts, plain Python."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cluster.simulate import (
    FFCV_RESNET18_1xA100_MINUTES,
    NOT_FOUND,
    POLICIES,
    OutcomeModel,
    ScaleInputs,
    project,
    simulate,
    simulate_support,
)

# 24 searches; everything else at ImageNet values (1280 limit, budget 8, 5 seeds, 35 min trainings)
SMALL = ScaleInputs(targets=6, methods=2, modes=2, seed=3)


def test_makespan_shrinks_as_gpus_grow_and_never_beats_the_critical_path():
    gpus = [1, 4, 16, 64]
    for policy in ("parallel", "early", "early+spec"):
        runs = project(SMALL, gpus, [policy])
        spans = [p.makespan for p in runs]
        assert all(a > b for a, b in zip(spans, spans[1:])), (policy, spans)
        for p in runs:
            assert p.makespan >= p.critical_path > 0, (policy, p.inputs.gpus)
            assert 0.0 < p.gpu_utilisation <= 1.0 + 1e-12
    # the reference runs one search at a time: more GPUs than a step's seeds do not help
    reference = [p.support.makespan for p in project(SMALL, [5, 64], ["reference"])]
    assert reference[0] == pytest.approx(reference[1])


def test_imagenet_sizes_at_8_64_512_gpus():
    runs = {(p.inputs.gpus, p.row()["policy"]): p for p in project(ScaleInputs(), [8, 64, 512],
                                                                   ["reference", "early+spec"])}
    for gpus in (8, 64, 512):
        ours, reference = runs[(gpus, "early+spec")], runs[(gpus, "reference")]
        assert reference.makespan > ours.makespan >= ours.critical_path
        assert 0 < ours.gpu_utilisation <= 1 and 0 < reference.gpu_utilisation <= 1
        assert ours.support.supports == reference.support.supports
        assert ours.support.reference_trainings == reference.support.trainings
    assert runs[(8, "early+spec")].makespan > runs[(64, "early+spec")].makespan > runs[(512, "early+spec")].makespan
    # embedding 1.33M images and ranking 50k targets are minutes next to the retrainings
    p = runs[(8, "early+spec")]
    assert p.embed_seconds + p.rank_seconds < 0.01 * p.makespan


def test_one_gpu_fixed_durations_equals_the_closed_form():
    inputs = replace(SMALL, gpus=1, duration_jitter=0.0, cpus_per_gpu=1, **POLICIES["parallel"])
    d = inputs.training_seconds()
    assert d == 60 * FFCV_RESNET18_1xA100_MINUTES[16]
    p = simulate(inputs)
    found = sum(s != NOT_FOUND for s in p.support.supports)
    assert 0 < found < inputs.searches  # both kinds occur with this seed
    # fixed schedule, limit / 2^budget > 1: a found search costs 1 + budget x seeds, a not-found one 1
    trainings = found * (inputs.first_seeds + inputs.budget * inputs.seeds) + (inputs.searches - found)
    assert p.support.trainings == trainings
    closed_form = (inputs.embed_images / inputs.embed_images_per_gpu_s
                   + inputs.rank_targets * inputs.esvm_seconds_per_target
                   + (inputs.ensemble + trainings) * d)
    assert p.makespan == pytest.approx(closed_form, rel=1e-12)
    assert p.gpu_utilisation == pytest.approx(1.0)
    # one search after another is the same thing on one GPU
    assert simulate(replace(inputs, **POLICIES["reference"])).makespan == pytest.approx(p.makespan, rel=1e-12)
    # early decision on one GPU: still back to back, fewer trainings
    early = simulate(replace(inputs, **POLICIES["early"]))
    assert early.support.makespan == pytest.approx((inputs.ensemble + early.support.trainings) * d, rel=1e-12)
    assert early.support.trainings < trainings


def reference_support(outcomes: OutcomeModel, search: int, s: ScaleInputs) -> int:
    """The reference procedure written out independently: first test (one model) at the
    limit, then `budget` bisection steps voting over `seeds` models."""
    correct = lambda k, seed: outcomes(search, k, seed)[0]  # noqa: E731
    if correct(s.limit, 0):
        return NOT_FOUND
    lo, hi = 0, s.limit
    for _ in range(s.budget):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if sum(correct(mid, seed) for seed in range(s.seeds)) / s.seeds <= 0.5:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_early_decision_costs_at_most_the_reference_with_identical_supports(gpus):
    inputs = replace(SMALL, gpus=gpus, seed_spread=0.5)  # wide seed noise: many split votes
    reference = simulate_support(replace(inputs, **POLICIES["reference"]))
    outcomes = OutcomeModel(inputs)
    expected = [reference_support(outcomes, i, inputs) for i in range(inputs.searches)]
    assert reference.supports == expected
    assert reference.trainings == reference.reference_trainings
    for policy in ("early", "early+spec"):
        run = simulate_support(replace(inputs, **POLICIES[policy]))
        assert run.supports == expected, policy
        if policy == "early":  # nothing speculative: every search is cheaper or equal
            assert all(a <= b for a, b in zip(run.search_trainings, reference.search_trainings))
            assert run.trainings < reference.trainings
        assert run.reference_trainings == reference.trainings


def test_packing_and_jitter_are_seeded():
    packed = replace(SMALL, gpus=4, trainings_per_gpu=4, packing_speedup=1.5)
    assert packed.slots == 16
    assert packed.training_seconds() == pytest.approx(60 * 35.0 * 4 / 1.5)
    a, b = simulate(packed), simulate(packed)
    assert a.makespan == b.makespan and a.support.supports == b.support.supports
    other = simulate(replace(packed, seed=4))
    assert other.support.supports != a.support.supports


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="gpus"):
        ScaleInputs(gpus=0)
    with pytest.raises(ValueError, match="train_minutes"):
        ScaleInputs(epochs=17)
    assert ScaleInputs(epochs=17, train_minutes=40.0).training_seconds() == 2400.0
    with pytest.raises(ValueError, match="not_found_fraction"):
        ScaleInputs(not_found_fraction=1.5)


def test_cli_labels_every_output_as_a_simulation(tmp_path, capsys):
    from benchmarks.scale_model import main

    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    assert main(["--gpus", "2", "8", "--targets", "2", "--methods", "1", "--no-progress", "--out", str(out),
                 "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("SIMULATION")
    for name in ("train_minutes = 35.0", "embed_images_per_gpu_s", "esvm_seconds_per_target", "not_found_fraction",
                 "FFCV"):
        assert name in printed
    record = json.loads(out.read_text())
    assert record["label"].startswith("SIMULATION") and record["inputs"]["targets"] == 2
    assert len(record["rows"]) == 2 * len(POLICIES)
    assert png.stat().st_size > 1000


def test_datamodels_projection_scales_with_models_and_images():
    """The ImageNet Datamodels projection: models x alpha x FFCV's 16-epoch time, and the
    CLI prints it per GPU count, labelled a simulation."""
    from attribution.published_costs import datamodels_gpu_hours, resnet18_imagenet_minutes
    from benchmarks.scale_model import datamodels_projection

    assert resnet18_imagenet_minutes(16) == FFCV_RESNET18_1xA100_MINUTES[16]
    assert resnet18_imagenet_minutes(20) == pytest.approx(35.0 / 16 * 20)  # nearest published rate: 16 epochs
    assert datamodels_gpu_hours(1000, 0.5, 16) == pytest.approx(1000 * 17.5 / 60, rel=1e-5)
    projection = datamodels_projection([1000, 10_000], 16, [8, 64])
    assert [r["models"] for r in projection["rows"]] == [1000, 10_000]
    assert projection["rows"][1]["gpu_days"] == pytest.approx(10 * projection["rows"][0]["gpu_days"])
    assert projection["lines"][0].startswith("# SIMULATION") and "| 1,000 | 12.2 | 1.52 | 0.19 |" in projection["lines"]
