"""Job submission against a real 'ray start --head' with token authentication."""

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


def test_submit_preset_runs_as_a_job(token_cluster, tmp_path):
    preset = tmp_path / "tiny.toml"
    preset.write_text('name = "tiny"\nseed = 0\n[data]\ndataset = "fashion-mnist"\n'
                      'train_per_class = 2\ntest_per_class = 1\n')
    exp_uri = f"file://{tmp_path / 'stored'}"  # a pyarrow.fs URI, as s3:// or gs:// would be
    # the token is in ~/.ray/auth_token: token mode is selected without RAY_AUTH_MODE
    result = run_cli(["submit", str(preset), "--address", token_cluster["address"], "--exp", exp_uri],
                     home=token_cluster["home"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    manifest = (tmp_path / "stored" / "manifest.json").read_text()
    assert '"tiny"' in manifest
    job_id = result.stdout.split("submitted job ")[1].split()[0]
    status = run_cli(["job", "status", job_id, "--address", token_cluster["address"]], home=token_cluster["home"])
    assert status.stdout.strip() == "SUCCEEDED"
