"""benchmarks/gpu_check.py without a GPU: its planning code runs so that it cannot rot.

The whole command runs with the CPU standing in for the GPU at tiny sizes (real
Fashion-MNIST, real local Ray, FAISS, traker): every registered check must run and pass
its parity test, and the table and the JSON must carry every figure. The no-CUDA path
must say so and exit 0; a check that raises or misses its tolerance is reported while
the others still run, and makes the exit code 1.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from conftest import require_fashion_mnist


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "figures.json"
    # no visible device even where one exists: the path every CPU-only machine takes
    done = run_cli("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device here" in done.stdout
    assert "--device cpu --tiny" in done.stdout  # it names what can be done instead
    figures = json.loads(out.read_text())
    assert figures["cuda"] is False and figures["ran"] is False and figures["checks"] == []


def test_tiny_cpu_run_exercises_every_check(tmp_path):
    require_fashion_mnist("train")
    out = tmp_path / "figures.json"
    done = run_cli("--device", "cpu", "--tiny", "--out", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    figures = json.loads(out.read_text())
    assert figures["simulated"] is True and figures["ran"] is True and figures["exit_code"] == 0
    checks = {c["name"]: c for c in figures["checks"]}
    assert list(checks) == [c.name for c in gpu_check.CHECKS]
    for name, check in checks.items():
        assert check["status"] == "pass", (name, check["error"], check["notes"])
        assert check["seconds"] > 0
        assert check["rows"], name
        assert any(row["ok"] is True for row in check["rows"]), f"{name}: no parity test ran"
        for row in check["rows"]:
            assert gpu_check.SIMULATED in row["what"]
            assert row["speed"], (name, row)
    # the parity figures themselves, each computed from both sides
    faiss_rows = checks["faiss"]["rows"]
    assert all(row["figures"]["overlap"] == 1.0 for row in faiss_rows)
    esvm = [row["figures"] for row in checks["esvm"]["rows"]]
    assert {"top_overlap", "spearman", "targets_per_s"} <= set(esvm[0])
    assert all(f["top_overlap"] >= gpu_check.MIN_ESVM_OVERLAP for f in esvm)
    assert {f["form"] for f in esvm if "form" in f} == {"kernel", "primal"}  # both solver forms ran
    embed = checks["embed"]["rows"][0]["figures"]
    assert embed["min_cosine"] >= gpu_check.MIN_FEATURE_COSINE and embed["gpu_images_per_s"] > 0
    for name in ("retrain", "stacked", "precision"):
        for row in checks[name]["rows"]:
            assert row["figures"]["trainings_per_min"] > 0
            if "accuracy" in row["figures"]:
                accuracy = row["figures"]["accuracy"]
                assert 0.1 < accuracy["cpu_mean"] <= 1 and math.isfinite(accuracy["mean_diff"])
    trak = checks["trak"]["rows"][0]["figures"]
    assert trak["projector"] == "BasicProjector" and -1 <= trak["baseline_spearman"] < trak["spearman"]
    # the readable table: every check, its status and time
    table = done.stdout
    assert "SIMULATED: NO GPU" in table and "parity" in table and "speed" in table
    for name in checks:
        assert f"\n{name} " in table


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path):
    from attribution.candidates import CandidateIndex

    def broken(ctx, report):
        report.row("partial figure", "n/a", "1 q/s")
        CandidateIndex("l2", device="tpu")  # the project's own validation raises

    def out_of_tolerance(ctx, report):
        parity = gpu_check.accuracy_parity([0.80, 0.81, 0.79], [0.85, 0.86, 0.84])
        report.row("accuracy", gpu_check.accuracy_text(parity), "1 trainings/min", parity["ok"])

    faiss = next(c for c in gpu_check.CHECKS if c.name == "faiss")
    checks = [gpu_check.Check("broken", "raises", broken), faiss,
              gpu_check.Check("drifted", "misses its tolerance", out_of_tolerance)]
    ctx = gpu_check.Context("cpu", gpu_check.TINY, work=tmp_path)
    results = gpu_check.run_checks(ctx, checks, echo=False)
    assert [r.status for r in results] == ["error", "pass", "fail"]
    assert "unknown device 'tpu'" in results[0].error and results[0].rows[0].what.startswith("partial figure")
    assert gpu_check.exit_code(results) == 1
    assert gpu_check.exit_code(results[1:2]) == 0
    skipped = gpu_check.CheckResult("faiss", "skipped", 0.1, [], [], "no GPU faiss")
    assert gpu_check.exit_code([results[1], skipped]) == 0
    table = gpu_check.format_table(results)
    assert "broken: error: ValueError: unknown device 'tpu'" in table and "NO" in table


def test_accuracy_parity_tells_noise_from_drift():
    same = gpu_check.accuracy_parity([0.831, 0.835, 0.829, 0.834], [0.833, 0.832, 0.830, 0.836])
    assert same["ok"] and abs(same["mean_diff"]) < 0.01
    drift = gpu_check.accuracy_parity([0.801, 0.805, 0.799, 0.804], [0.833, 0.832, 0.830, 0.836])
    assert not drift["ok"] and drift["mean_diff"] < -0.02


def test_unknown_check_names_the_choices():
    with pytest.raises(SystemExit, match=r"unknown check\(s\) \['nope'\] in --checks; choose from \['faiss'"):
        gpu_check.main(["--checks", "faiss,nope"])
