"""Job submission against a real 'ray start --head' with token authentication."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import submit as jobs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A head node started with RAY_AUTH_MODE=token, its token in a private HOME."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    dashboard = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
         f"--port={free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         # Ports that default to fixed numbers: another Ray on the machine must not collide
         # (the job agent then cannot bind and every submission fails with "No available agent").
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
        except Exception as error:  # 401 once up (token mode), connection refused before
            if getattr(error, "code", None) == 401:
                break
        else:
            break
        if head.poll() is not None or time.monotonic() > deadline:
            head.kill()
            pytest.fail(f"ray start --head did not come up: {head.stdout.read()[-2000:]}")
        time.sleep(1)
    yield {"address": address, "home": home}
    head.terminate()  # --block: ray start tears its processes down on SIGTERM
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


def run_cli(args, home, timeout=300):
    """The user's view: the attribution command in a fresh process (Ray caches auth state)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)


def test_submit_without_token_names_the_fix(token_cluster, tmp_path):
    # a user whose HOME has no copy of the cluster's token
    result = run_cli(["submit", "quickstart", "--address", token_cluster["address"],
                      "--exp", str(tmp_path / "exp")], home=tmp_path)
    assert result.returncode == 2
    assert "RAY_AUTH_MODE=token" in result.stderr and "auth_token" in result.stderr


def test_unreachable_address_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(jobs.SubmissionError, match="ray start --head"):
        jobs.job_client(f"127.0.0.1:{free_port()}")


def test_unknown_preset_is_refused_before_connecting(tmp_path):
    # nothing listens at this address: the preset is checked before any connection or upload
    result = run_cli(["submit", "no-such-preset", "--address", f"http://127.0.0.1:{free_port()}"], home=tmp_path,
                     timeout=120)
    assert result.returncode == 2
    assert "no-such-preset" in result.stderr and "quickstart" in result.stderr  # names the available ones


def test_submit_preset_file_runs_as_a_job(token_cluster, tmp_path):
    """A preset given as a local file is sent with the job: the cluster never reads the path."""
    folder = tmp_path / "client"
    folder.mkdir()
    preset = folder / "tiny.toml"
    preset.write_text('seed = 0\n[data]\ndataset = "fashion-mnist"\ntrain_per_class = 2\ntest_per_class = 1\n')
    exp_uri = f"file://{tmp_path / 'stored'}"  # a pyarrow.fs URI, as s3:// or gs:// would be
    # the token is in ~/.ray/auth_token: token mode is selected without RAY_AUTH_MODE
    result = run_cli(["submit", str(preset), "--address", token_cluster["address"], "--exp", exp_uri, "--no-follow"],
                     home=token_cluster["home"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    preset.unlink()  # a real cluster has no copy of the client's file either
    job_id = result.stdout.split("submitted job ")[1].split()[0]
    listed = run_cli(["job", "list", "--address", token_cluster["address"]], home=token_cluster["home"])
    entrypoint = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert str(folder) not in entrypoint, entrypoint
    logs = run_cli(["job", "logs", job_id, "--follow", "--address", token_cluster["address"]],
                   home=token_cluster["home"])
    assert f"job {job_id}: SUCCEEDED" in logs.stdout, logs.stdout[-3000:] + logs.stderr[-3000:]
    manifest = json.loads((tmp_path / "stored" / "manifest.json").read_text())
    assert manifest["preset"]["preset"]["name"] == "tiny"  # the file's stem, as for a local run
    status = run_cli(["job", "status", job_id, "--address", token_cluster["address"]], home=token_cluster["home"])
    assert status.stdout.strip() == "SUCCEEDED"


def test_submit_named_preset_stores_a_stage_at_the_uri(token_cluster, tmp_path):
    """A preset name is resolved on the cluster; the stage's checkpoint reaches the URI."""
    exp_uri = f"file://{tmp_path / 'stored'}"
    tiny = ["pretrain.max_steps=1", "pretrain.batch_size=4", 'pretrain.images="subset"', "data.train_per_class=1",
            "pretrain.queue_size=8"]
    args = ["submit", "quickstart", "--address", token_cluster["address"], "--exp", exp_uri, "--stages", "pretrain"]
    for override in tiny:
        args += ["--set", override]
    result = run_cli(args, home=token_cluster["home"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((tmp_path / "stored" / "manifest.json").read_text())
    assert manifest["preset"]["preset"]["name"] == "quickstart"
    assert manifest["pretrain"]["steps"] == 1
    assert (tmp_path / "stored" / "checkpoints" / "moco.pt").stat().st_size > 1_000_000


# Every stage of the quickstart preset at sizes a 2-CPU head finishes in about a minute:
# 200 training / 40 test images, 2 MoCo steps, 4 ranked targets (top 20), 2 TRAK models,
# 8 datamodels, 4 support targets with 2-step searches of 2 seeds. embed.actors=0:
# the preset's explicit 2 embedding workers would be honoured (and one reported pending);
# here every pool is sized by the program.
TINY_QUICKSTART = [
    "data.train_per_class=20", "data.test_per_class=4",
    "pretrain.max_steps=2", "pretrain.time_budget_s=0", "pretrain.batch_size=8", 'pretrain.images="subset"',
    "pretrain.queue_size=16", "pretrain.warmup_steps=1",
    "embed.shard_size=100", "embed.batch_size=100", "embed.actors=0",
    "rank.top_k=20", "rank.targets=4",
    "trak.checkpoints=2", "trak.proj_dim=32",
    "datamodels.models=8", "datamodels.budgets=[]", "datamodels.lds_models=0",
    "support.targets=4", "support.budget=2", "support.seeds=2", "support.ensemble=2",
    "support.top_k=20",
    "report.n_boot=20",
]
WORKER_CLASSES = {"Embedder", "RankWorker", "RetrainWorker", "RegressionWorker"}

JOB_ACTORS = """
import json, sys
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors
address, submission_id = sys.argv[1:]
job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
actors = list_actors(address=address, filters=[("job_id", "=", job_id)], detail=True, limit=10000,
                     raise_on_missing_output=False)
print(json.dumps([{"class_name": a.class_name, "pid": a.pid, "node_id": a.node_id, "state": a.state} for a in actors]))
"""


def job_actors(cluster, submission_id: str) -> list[dict]:
    """The actors a job created (Ray's state API on the head, token auth)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(cluster["home"]), RAY_AUTH_MODE="token")
    result = subprocess.run([sys.executable, "-c", JOB_ACTORS, cluster["address"], submission_id], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_quickstart_job_finishes_on_a_two_cpu_head(token_cluster, tmp_path):
    """The head has 2 CPUs and the job's driver holds one: every pool sizes itself to the
    CPU left, so no worker is ever requested that Ray cannot place (before, each pool
    asked for 2, and the second waited for a CPU that never came)."""
    args = ["submit", "quickstart", "--address", token_cluster["address"], "--exp", str(tmp_path / "exp")]
    for override in TINY_QUICKSTART:
        args += ["--set", override]
    start = time.monotonic()
    result = run_cli(args, home=token_cluster["home"], timeout=240)
    seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout.splitlines()[-1], result.stdout[-3000:]
    assert "still pending" not in result.stdout, result.stdout[-3000:]  # no pool waited for a worker
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    for stage in ("pretrain", "embed", "rank", "trak", "datamodels", "support"):
        assert stage in manifest, f"the job did not record its {stage} stage"
    assert (tmp_path / "exp" / "support.parquet").is_file() and (tmp_path / "exp" / "report.md").is_file()
    job_id = result.stdout.split("submitted job ")[1].split()[0]
    workers = [a for a in job_actors(token_cluster, job_id) if a["class_name"] in WORKER_CLASSES]
    assert {a["class_name"] for a in workers} == WORKER_CLASSES, workers  # every kind of pool ran
    never_placed = [a for a in workers if not a["pid"]]
    assert not never_placed, f"workers asked for that Ray could not place: {never_placed}"
    print(f"quickstart job on a 2-CPU head: {seconds:.0f} s")
