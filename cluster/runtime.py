"""Connecting to Ray: a local cluster started by the program, or an existing one."""

from __future__ import annotations

import os
from pathlib import Path


def ensure_ray(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Connect to Ray once per process.

    ``address=None`` starts a local Ray owned by this process (the embedded default);
    ``"auto"`` or ``"ray://..."``/``host:port`` joins a running cluster. Ray >= 2.60
    starts clusters with token authentication; when ``~/.ray/auth_token`` exists and
    ``RAY_AUTH_MODE`` is unset, token mode is selected so clients can connect.
    """
    # Ray reads RAY_AUTH_MODE when it is first imported: set it before.
    if address is not None and "RAY_AUTH_MODE" not in os.environ:
        if (Path.home() / ".ray" / "auth_token").exists():
            os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():
        return ray
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("log_to_driver", True)
    init_kwargs.setdefault("configure_logging", False)
    if address is None and os.environ.get("RAY_ADDRESS", "local") != "local":
        address = os.environ["RAY_ADDRESS"]  # a Ray job's driver: join the job's cluster
    if address is None:
        # Workers are one thread each; the driver keeps the default for its own torch.
        runtime_env = init_kwargs.pop("runtime_env", None) or {}
        env_vars = dict(runtime_env.get("env_vars", {}))
        env_vars.setdefault("OMP_NUM_THREADS", "1")
        runtime_env["env_vars"] = env_vars
        # "local": always a new cluster; a bare ray.init() would join the newest cluster
        # another process on this machine started (and die with it).
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, **init_kwargs)
    else:
        ray.init(address=address, **init_kwargs)
    return ray


def cluster_resources() -> dict:
    import ray

    return dict(ray.cluster_resources())
