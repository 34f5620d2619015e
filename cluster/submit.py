"""Submitting presets to a Ray cluster through the Ray Jobs API.

The job's entrypoint is ``python -m cluster.cli run PRESET --address auto --exp EXP``:
with ``ship_project=True`` (default) this project's source is uploaded as the job's
``working_dir`` (Ray puts it first on the job's sys.path, so the cluster only needs the
dependencies, as the images in docker/ have); with ``ship_project=False`` the
cluster's image must have the project installed.

Authentication: Ray >= 2.52 can run clusters with token authentication
(``RAY_AUTH_MODE=token``; Ray 2.59+ does so by default for local clusters). The Jobs
client then needs the same mode and the cluster's token (``~/.ray/auth_token``,
``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``). :func:`job_client` turns token mode on
when a token is available and turns Ray's terse error into one that names the fix.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Never uploaded with the job: outputs, data, caches, VCS.
WORKING_DIR_EXCLUDES = ["runs", "experiments", "data", "**/__pycache__", "*.egg-info",
                        ".pytest_cache", "*.parquet", "*.pt", "*.pth"]

AUTH_HELP = (
    "the Ray cluster at {address} requires token authentication. Run with RAY_AUTH_MODE=token and "
    "the cluster's token in ~/.ray/auth_token (written by 'ray start' on the head node; copy it, or "
    "point RAY_AUTH_TOKEN_PATH at a copy, or set RAY_AUTH_TOKEN). See docs/cluster.md."
)


class SubmissionError(RuntimeError):
    pass


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def dashboard_address(address: str) -> str:
    """Jobs API address: ``http://host:8265`` (a bare ``host`` or ``host:port`` gets http://)."""
    if address.startswith(("http://", "https://")):
        return address
    if address.startswith("ray://"):
        raise SubmissionError(
            f"{address} is a Ray Client address; the Jobs API needs the dashboard address, "
            "e.g. http://HEAD:8265"
        )
    return f"http://{address}" if ":" in address else f"http://{address}:8265"


def job_client(address: str):
    """A JobSubmissionClient for ``address``, with token auth selected when a token exists."""
    # Ray reads RAY_AUTH_MODE when it is first imported: set it before.
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as error:
        text = str(error)
        if "uthenticat" in text or "Unauthorized" in text:
            raise SubmissionError(AUTH_HELP.format(address=url) + f"\n(Ray said: {text.splitlines()[0]})") from error
        if isinstance(error, ConnectionError) or "Failed to connect" in text:
            raise SubmissionError(
                f"no Ray dashboard answers at {url}. Start a cluster ('ray start --head' prints the "
                "address; the Jobs API listens on port 8265) or pass --address http://HEAD:8265."
            ) from error
        raise


def entrypoint_command(preset: str, exp: str, overrides: list[str] | None = None,
                       stages: list[str] | None = None) -> str:
    parts = ["python", "-m", "cluster.cli", "run", preset, "--address", "auto", "--exp", exp]
    for override in overrides or []:
        parts += ["--set", override]
    if stages:
        parts += ["--stages", ",".join(stages)]
    return " ".join(shlex.quote(p) for p in parts)


def runtime_env(ship_project: bool = True, env_vars: dict | None = None) -> dict:
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})}}
    if ship_project:
        env["working_dir"] = str(PROJECT_ROOT)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return env


def submit(address: str, preset: str, exp: str, overrides: list[str] | None = None,
           stages: list[str] | None = None, ship_project: bool = True, job_id: str | None = None,
           entrypoint_num_cpus: float = 1.0) -> str:
    """Submit a preset as a Ray job; returns the submission id."""
    if not ship_project and not exp:
        raise SubmissionError("--exp is required")
    client = job_client(address)
    return client.submit_job(
        entrypoint=entrypoint_command(preset, exp, overrides, stages),
        runtime_env=runtime_env(ship_project),
        submission_id=job_id,
        metadata={"preset": preset, "experiment": exp},
        # The driver itself is light; reserving a CPU keeps it from being starved.
        entrypoint_num_cpus=entrypoint_num_cpus,
    )


def follow(address: str, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None, out=None) -> str:
    """Stream the job's logs until it ends; returns the final status name."""
    import sys

    from ray.job_submission import JobStatus

    out = out or sys.stdout
    client = job_client(address)
    start, printed = time.monotonic(), 0
    while True:
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            out.write(logs[printed:])
            out.flush()
            printed = len(logs)
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            out.write(logs[printed:])
            return status.value
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s} s")
        time.sleep(poll_s)
