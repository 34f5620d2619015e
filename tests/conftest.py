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


# ----------------------------------------------------------------------------- real data
#
# The strongest tests run on real data (Fashion-MNIST, foolbox's real CIFAR-10 / ImageNet
# images). On a developer machine without those files they are skipped; in CI (the `CI`
# environment variable set, as .ci/run does) a missing file fails the test instead, so a
# green CI run always means the real-data tests ran.

SETUP_FIX = "bash scripts/setup.sh"


def ci_requires_real_data() -> bool:
    """True when ``CI`` is set to anything but an explicit no (GitHub sets "true", .ci/run "1")."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def fail_in_ci(reason: str) -> None:
    """Fail the test when ``CI`` is set (a missing real-data file is a broken CI machine)."""
    if ci_requires_real_data():
        pytest.fail(f"{reason}. CI must run the real-data tests: run `{SETUP_FIX}` on this machine "
                    "(or unset CI to skip them locally)", pytrace=False)


def missing_real_data(reason: str) -> None:
    """Skip (developer machine) or fail (CI) a test whose real data is missing."""
    fail_in_ci(reason)
    pytest.skip(f"{reason} (run `{SETUP_FIX}`; with CI set this is a failure)")


def require_real_data(load, what: str):
    """``load()``'s result; a :class:`attribution.data.DatasetNotFoundError` from it skips
    or fails the test (``missing_real_data``) with the loader's message."""
    found, missing = _load_real_data(load)
    if missing is not None:  # outside the except block: the report shows one line, not a chain
        missing_real_data(f"{what} not installed: {missing}")
    return found


def real_data_or_none(load, what: str):
    """``load()``'s result, or None on a developer machine without the files (for tests
    that also run, with weaker checks, on stand-in data); with ``CI`` set a missing file
    fails the test instead."""
    found, missing = _load_real_data(load)
    if missing is not None:
        fail_in_ci(f"{what} not installed: {missing}")
    return found


def _load_real_data(load):
    """(``load()``, None), or (None, the DatasetNotFoundError) when the files are missing."""
    from attribution.data import DatasetNotFoundError

    try:
        return load(), None
    except DatasetNotFoundError as error:
        return None, error


def require_fashion_mnist(split: str = "train", **subset):
    """The real Fashion-MNIST ``split`` (``subset``: ``n_per_class``, ``seed``, ``root``), or a
    skip / CI failure naming the fix when its files are missing."""
    from attribution.data import load_dataset

    return require_real_data(lambda: load_dataset("fashion-mnist", split, **subset), "Fashion-MNIST")


def require_foolbox_data():
    """The folder of real CIFAR-10 / ImageNet images the foolbox package (test extra) ships."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        missing_real_data("foolbox (test extra, its real CIFAR-10 / ImageNet images) is not installed")
    return Path(spec.submodule_search_locations[0]) / "data"


def write_rank_rankings(exp, train, test, target_positions):
    """An l2 (pixel distance) same-class ranking per target, as the rank stage writes it."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from attribution.artifacts import write_table
    from attribution.ranking import RANKING_SCHEMA

    x = train.images(np.arange(len(train))).reshape(len(train), -1).astype(np.float32)
    for label in np.unique(test.labels[target_positions]):
        rows = []
        for p in target_positions[test.labels[target_positions] == label]:
            same = np.flatnonzero(train.labels == label)
            score = -np.linalg.norm(x[same] - test.images([p]).reshape(-1).astype(np.float32), axis=1)
            order = np.argsort(-score, kind="stable")
            rows.append(pd.DataFrame({"target_id": np.int64(test.ids[p]), "method": "l2",
                                      "rank": np.arange(len(order), dtype=np.int32),
                                      "train_id": train.ids[same][order].astype(np.int64),
                                      "score": score[order].astype(np.float32)}))
        table = pa.Table.from_pandas(pd.concat(rows), preserve_index=False).cast(RANKING_SCHEMA)
        write_table(table, exp.rankings / f"l2-class{int(label):03d}.parquet")
