"""Submitting presets to a Ray cluster through the Ray Jobs API.

The job's entrypoint is ``python -m cluster.cli run PRESET --address auto --exp EXP``.
A preset given by name is looked up on the cluster (attribution/presets of the uploaded
or installed project); a preset given as a local .toml file is shipped by value (its
text in the job's environment, run by ``python -m cluster.submit``), since the file is
not on the cluster's disks. With ``ship_project=True`` (default) this project's source
is uploaded as the job's ``working_dir`` (Ray puts it first on the job's sys.path, so
the cluster only needs the dependencies, as the images in docker/ have); with
``ship_project=False`` the cluster's image must have the project installed.

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
WORKING_DIR_EXCLUDES = [".git", "runs", "experiments", "data", "**/__pycache__", "*.egg-info",
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


# A preset shipped by value: its TOML text travels in this variable of the job's runtime_env.
SHIPPED_PRESET_ENV = "ATTRIBUTION_SHIPPED_PRESET"


def local_preset_file(preset: str) -> Path | None:
    """The preset's file when ``preset`` is a path to a local .toml (not a preset name)."""
    path = Path(preset).expanduser()
    return path.resolve() if path.suffix == ".toml" and path.is_file() else None


def entrypoint_command(preset: str, exp: str, overrides: list[str] | None = None,
                       stages: list[str] | None = None, shipped: bool = False, ablation: str | None = None) -> str:
    """``shipped``: ``preset`` is the name of a preset whose text is in SHIPPED_PRESET_ENV."""
    runner = ["python", "-m", "cluster.submit"] if shipped else ["python", "-m", "cluster.cli", "run"]
    parts = runner + [preset, "--address", "auto", "--exp", exp]
    for override in overrides or []:
        parts += ["--set", override]
    if stages:
        parts += ["--stages", ",".join(stages)]
    if ablation:
        parts += ["--ablation", ablation]
    return " ".join(shlex.quote(p) for p in parts)


def runtime_env(ship_project: bool = True, env_vars: dict | None = None) -> dict:
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})}}
    if ship_project:
        env["working_dir"] = str(PROJECT_ROOT)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return env


def submit(address: str, preset: str, exp: str, overrides: list[str] | None = None,
           stages: list[str] | None = None, ship_project: bool = True, job_id: str | None = None,
           entrypoint_num_cpus: float = 1.0, agent_wait_s: float = 60.0, ablation: str | None = None,
           entrypoint_num_gpus: float = 0.0) -> str:
    """Submit a preset (a name, or a local .toml shipped by value) as a Ray job; returns
    the submission id. ``entrypoint_num_gpus``: GPUs the driver reserves (Ray places it
    on a node that has them)."""
    if entrypoint_num_gpus < 0:
        raise SubmissionError(f"--driver-gpus must be >= 0, got {entrypoint_num_gpus}")
    if not ship_project and not exp:
        raise SubmissionError("--exp is required")
    env_vars, name, shipped = {}, preset, False
    path = local_preset_file(preset)
    if path is not None:  # the cluster cannot read the client's file: send its text
        env_vars[SHIPPED_PRESET_ENV] = path.read_text()
        name, shipped = path.stem, True
    client = job_client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint_command(name, exp, overrides, stages, shipped=shipped, ablation=ablation),
                runtime_env=runtime_env(ship_project, env_vars),
                submission_id=job_id,
                metadata={"preset": name, "experiment": exp},
                # The driver itself is light; reserving a CPU keeps it from being starved.
                entrypoint_num_cpus=entrypoint_num_cpus,
                **({"entrypoint_num_gpus": entrypoint_num_gpus} if entrypoint_num_gpus else {}),
            )
        except RuntimeError as error:
            # A head node that has just started answers before its job agent is up.
            if "No available agent" not in str(error):
                raise
            if time.monotonic() > deadline:
                raise SubmissionError(
                    f"the Ray cluster at {dashboard_address(address)} has no job agent after {agent_wait_s:.0f} s: "
                    "its dashboard agent did not start (see dashboard_agent.log in the head node's Ray logs, "
                    "e.g. a port already in use) or the head is overloaded") from error
            time.sleep(2.0)


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


def run_shipped_preset(argv: list[str]) -> int:
    """Job side of a shipped preset: ``argv`` = [NAME, run options...]; the preset's text
    is written to a temporary NAME.toml (the name becomes the preset's default name)
    and run with ``attribution run``."""
    import sys
    import tempfile

    from cluster.cli import main

    text = os.environ.get(SHIPPED_PRESET_ENV)
    if not argv or text is None:
        print(f"usage: python -m cluster.submit NAME [run options]; with the preset's TOML in ${SHIPPED_PRESET_ENV} "
              "(set by 'attribution submit PATH.toml')", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    with tempfile.TemporaryDirectory(prefix="attribution-preset-") as folder:
        path = Path(folder) / f"{name}.toml"
        path.write_text(text)
        return main(["run", str(path), *rest])


if __name__ == "__main__":
    import sys

    sys.exit(run_shipped_preset(sys.argv[1:]))
