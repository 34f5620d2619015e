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
