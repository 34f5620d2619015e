"""Fixtures shared by the test modules."""

import os

import pytest


@pytest.fixture(scope="module")
def ray_runtime():
    """A real local Ray of the module's own (2 CPUs, one torch thread per worker), as the
    quickstart starts it; shut down after the module."""
    import ray

    from cluster.runtime import RayRuntime

    # our own Ray even when other processes on the machine started clusters with
    # `ray start` (a RAY_ADDRESS pointing there would be joined instead)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "local"
    try:
        runtime = RayRuntime(num_cpus=2)
        runtime.connect()
        yield runtime
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
