"""Connecting to Ray: a local cluster started by the program, or an existing one."""

from __future__ import annotations

import os
from pathlib import Path

from attribution.workqueue import Runtime

# A pool whose workers Ray has not placed after this long says so (cluster.queue).
PLACEMENT_TIMEOUT_S = 60.0


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


def node_resources() -> tuple:
    """The alive nodes' CPUs and GPUs (:class:`cluster.resources.NodeResources`): what each
    has, and what nothing holds right now (the job driver's reservation, other pools'
    and other jobs' actors already subtracted), for :func:`cluster.resources.pool_shape`."""
    import ray

    from cluster.resources import NodeResources

    def cpu_gpu(resources: dict) -> dict:
        return {key: float(resources.get(key, 0)) for key in ("CPU", "GPU")}

    totals = {node["NodeID"]: cpu_gpu(node.get("Resources") or {}) for node in ray.nodes() if node.get("Alive")}
    try:
        # Free resources per node: Ray has no public call for them without the dashboard's
        # state API (the embedded Ray runs without a dashboard); this reads the GCS directly.
        from ray._private import state

        free = {node: cpu_gpu(resources) for node, resources in state.available_resources_per_node().items()}
    except Exception:  # noqa: BLE001 - another Ray version: one aggregate node instead
        largest = {key: max((total[key] for total in totals.values()), default=0.0) for key in ("CPU", "GPU")}
        return (NodeResources(largest, cpu_gpu(ray.available_resources())),)
    return tuple(NodeResources(total, free.get(node, {"CPU": 0.0, "GPU": 0.0})) for node, total in totals.items())


class RayRuntime(Runtime):
    """The Ray implementation of :class:`attribution.workqueue.Runtime`.

    Connects on first use (``address=None``: a local Ray owned by this process, see
    :func:`ensure_ray`), so stages that need no pool never start Ray. Pools are sized by
    :func:`cluster.resources.pool_shape` from what the cluster can place when the pool
    is created (:func:`node_resources`); shared constructor arguments go to the object
    store once and every actor maps the same copy. ``placement_timeout``: seconds a
    pool waits for workers Ray cannot place before it says so (:class:`cluster.queue.RayWorkQueue`).
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 placement_timeout: float = PLACEMENT_TIMEOUT_S):
        self.address, self.num_cpus = address, num_cpus
        self.placement_timeout = float(placement_timeout)

    def connect(self):
        return ensure_ray(self.address, num_cpus=self.num_cpus)

    def resources(self) -> dict:
        return dict(self.connect().cluster_resources())

    def shape(self, request) -> tuple[int, dict]:
        from cluster.resources import pool_shape

        self.connect()
        return pool_shape(request, node_resources())

    def device(self, request) -> str:
        _, options = self.shape(request)
        return "cuda" if options.get("num_gpus") else "cpu"

    def queue(self, request, worker, *args, depth: int = 2, max_retries: int = 2, key=None, **kwargs):
        from cluster.queue import RayWorkQueue
        from cluster.workers import on_ray

        ray = self.connect()
        n, options = self.shape(request)
        # the actor is replaced by the queue when lost, never restarted by Ray (cluster.workers)
        remote_cls = ray.remote(max_restarts=0, max_task_retries=0, **options)(on_ray(worker))
        shared_args = [ray.put(a) for a in args]
        shared_kwargs = {k: ray.put(v) for k, v in kwargs.items()}
        return RayWorkQueue(lambda: remote_cls.remote(*shared_args, **shared_kwargs), n, depth=depth,
                            max_retries=max_retries, key=key, name=f"{request.kind} pool", options=options,
                            placement_timeout=self.placement_timeout)
