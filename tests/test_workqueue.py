"""The one work queue: in process and on a real local Ray (lost workers, retries, failures)."""

import os
import time
from pathlib import Path

import pytest

from attribution.workqueue import (BatchingQueue, InProcessRuntime, NotRetried, PoolRequest, QueueWorker,
                                  WorkFailed)
from cluster.resources import NodeResources, PoolTooLarge, pool_shape
from faults import pickle_by_value

pickle_by_value(__name__)  # the workers below run in Ray actors


class BadInput(NotRetried, ValueError):
    """A deterministic error of this test's worker."""


class Doubler(QueueWorker):
    def __init__(self, offset: int = 0, marker: str | None = None, attempts: str | None = None):
        self.offset, self.marker, self.attempts = offset, marker, attempts

    def __call__(self, item):
        if self.attempts:  # one line per call: how often the queue tried
            with open(self.attempts, "a") as log:
                log.write(f"{item}\n")
        if item == "fail":
            raise ValueError("this item always fails")
        if item == "bad":
            raise BadInput("item 'bad' is malformed")
        if isinstance(item, float):  # a slow item: seconds
            time.sleep(item)
        if item == "die" and self.marker and not Path(self.marker).exists():
            Path(self.marker).write_text("died once")
            os._exit(1)  # the worker process is lost, as with an OOM kill or a lost node
        return (item * 2 + self.offset) if isinstance(item, int) else item


def test_in_process_queue_runs_retries_and_names_a_failing_item():
    queue = InProcessRuntime().queue(PoolRequest("rank"), Doubler, 1, max_retries=2,
                                     key=lambda item: f"item {item!r}")
    assert sorted(done.result for done in queue.map([1, 2, 3])) == [3, 5, 7]
    queue.submit("fail")
    with pytest.raises(WorkFailed, match="item 'fail' failed 3 times; last error: ValueError: this item always fails"):
        queue.next()
    assert queue.retried == 2


def test_ray_queue_requeues_the_item_of_a_lost_worker_and_replaces_it(ray_runtime, tmp_path):
    queue = ray_runtime.queue(PoolRequest("rank", actors=2), Doubler, 10, str(tmp_path / "marker"), depth=2)
    try:
        results = {done.item: done for done in queue.map([1, 2, "die", 3, 4, 5])}
        assert {k: v.result for k, v in results.items()} == {1: 12, 2: 14, "die": "die", 3: 16, 4: 18, 5: 20}
        assert (tmp_path / "marker").exists()  # the worker did die once
        assert queue.requeued >= 1 and queue.replaced == 1
        assert results["die"].attempt == 0  # a lost worker is not the item's failure
        assert all("@" in done.worker for done in results.values())  # host:pid@node names
    finally:
        queue.close()


def test_ray_queue_retries_then_fails_naming_the_item(ray_runtime):
    queue = ray_runtime.queue(PoolRequest("rank", actors=1), Doubler, max_retries=1, key=lambda i: f"unit {i}")
    try:
        queue.submit("fail")
        with pytest.raises(WorkFailed, match="unit fail failed 2 times; last error: ValueError: this item always fails"):
            while queue.pending:
                queue.next()
        assert queue.retried == 1
    finally:
        queue.close()


# ----------------------------------------------------------------------------- deterministic errors


def test_in_process_queue_fails_a_not_retried_error_at_once(tmp_path):
    attempts = tmp_path / "attempts"
    queue = InProcessRuntime().queue(PoolRequest("rank"), Doubler, 0, None, str(attempts), max_retries=3,
                                     key=lambda item: f"item {item!r}")
    queue.submit("bad")
    with pytest.raises(WorkFailed, match="item 'bad' failed \\(a deterministic error, not retried\\): "
                                         "BadInput: item 'bad' is malformed") as error:
        queue.next()
    assert isinstance(error.value.__cause__, NotRetried)  # callers can tell it from a transient failure
    assert queue.retried == 0 and attempts.read_text().splitlines() == ["bad"]


def test_ray_queue_fails_a_not_retried_error_at_once(ray_runtime, tmp_path):
    attempts = tmp_path / "attempts"
    queue = ray_runtime.queue(PoolRequest("rank", actors=1), Doubler, 0, None, str(attempts), max_retries=3,
                              key=lambda item: f"unit {item}")
    try:
        queue.submit("bad")
        with pytest.raises(WorkFailed, match="unit bad failed \\(a deterministic error, not retried\\): "
                                             "BadInput: item 'bad' is malformed") as error:
            while queue.pending:
                queue.next()
        assert isinstance(error.value.__cause__, NotRetried)  # Ray's task error is also the worker's error
        assert queue.retried == 0 and attempts.read_text().splitlines() == ["bad"]
    finally:
        queue.close()


# ----------------------------------------------------------------------------- batching


class GroupSizes(QueueWorker):
    """Answers each item of a group with (item, size of its group, kinds in its group)."""

    def __call__(self, item):
        return self.run_group([item])[0]

    def run_group(self, items):
        kinds = sorted({item["kind"] for item in items})
        return [(item["n"], len(items), kinds) for item in items]


def test_batching_queue_sends_groups_of_one_kind_and_returns_one_result_per_item():
    queue = BatchingQueue.open(InProcessRuntime(), 3, PoolRequest("rank"), GroupSizes)
    assert isinstance(queue, BatchingQueue) and queue.free() == 3 and queue.idle() == 3
    queue.submit({"kind": "a", "n": 0})
    queue.submit({"kind": "b", "n": 1})
    assert queue.pending == 2 and queue.free() == 1  # buffered items take room
    queue.submit({"kind": "a", "n": 2})
    queue.submit({"kind": "a", "n": 3})  # a full group of kind a goes to the worker
    assert queue.pending == 4 and queue.buffered == 1
    results = {}
    while queue.pending:
        done = queue.next()
        results[done.result[0]] = done.result[1:]
    assert results == {0: (3, ["a"]), 2: (3, ["a"]), 3: (3, ["a"]), 1: (1, ["b"])}  # the partial group flushed
    assert queue.next() is None and queue.pending == 0
    # a group size of 1 is the plain queue (today's behaviour)
    assert not isinstance(BatchingQueue.open(InProcessRuntime(), 1, PoolRequest("rank"), GroupSizes), BatchingQueue)


def test_batching_queue_fails_only_the_item_with_a_not_retried_error():
    queue = BatchingQueue.open(InProcessRuntime(), 4, PoolRequest("rank"), Doubler, 1, max_retries=3,
                               key=lambda item: f"item {item!r}")
    for item in (1, "bad", 2, 3):
        queue.submit(item)
    returned = [queue.next().result for _ in range(3)]  # the group's good items come first
    assert sorted(returned) == [3, 5, 7]
    with pytest.raises(WorkFailed, match="item 'bad' failed \\(a deterministic error, not retried\\): "
                                         "BadInput: item 'bad' is malformed") as error:
        queue.next()
    assert isinstance(error.value.__cause__, NotRetried) and queue.retried == 0 and queue.pending == 0


def test_batching_queue_on_ray_requeues_the_group_of_a_lost_worker(ray_runtime, tmp_path):
    queue = BatchingQueue.open(ray_runtime, 3, PoolRequest("rank", actors=2, max_items=7), Doubler, 10,
                               str(tmp_path / "marker"), depth=1)
    try:
        assert queue.size == 2  # 7 items in groups of 3: at most 3 workers asked for, 2 requested
        results = {done.item: done for done in queue.map([1, 2, "die", 3, 4, 5, 6])}
        assert {k: v.result for k, v in results.items()} == {1: 12, 2: 14, "die": "die", 3: 16, 4: 18, 5: 20,
                                                              6: 22}
        assert (tmp_path / "marker").exists() and queue.requeued >= 1 and queue.replaced == 1
        assert results["die"].attempt == 0
    finally:
        queue.close()


# ----------------------------------------------------------------------------- pool sizes


def node(total: dict, free: dict | None = None) -> NodeResources:
    return NodeResources(total, total if free is None else free)


def test_pool_shape_counts_what_the_nodes_can_place_now():
    head = node({"CPU": 2.0}, {"CPU": 1.0})  # a job's driver holds one of the head's 2 CPUs
    for kind in ("rank", "retrain", "regression", "embed"):
        assert pool_shape(PoolRequest(kind, model="mlp"), [head])[0] == 1, kind
    # per node: 3 + 3 free CPUs host three 2-CPU embedding workers (two per node would need 4)
    assert pool_shape(PoolRequest("embed", threads=2), [node({"CPU": 4.0}, {"CPU": 3.0})] * 2)[0] == 2
    # never more workers than items; an explicit count is the user's (the queue reports what it cannot place)
    assert pool_shape(PoolRequest("rank", max_items=3), [node({"CPU": 16.0})])[0] == 3
    assert pool_shape(PoolRequest("rank", actors=4), [head]) == (4, {"num_cpus": 1, "num_gpus": 0.0})
    # nothing free right now (another job): one worker, which the queue reports if it stays unplaced
    assert pool_shape(PoolRequest("rank"), [node({"CPU": 2.0}, {"CPU": 0.0})])[0] == 1


def test_pool_shape_on_gpus_follows_the_gpus_the_cluster_has():
    gpu_node, cpu_node = node({"CPU": 8.0, "GPU": 2.0}), node({"CPU": 32.0, "GPU": 0.0})
    # a mixed cluster: CPU-only nodes host no worker that asks for a GPU share
    assert pool_shape(PoolRequest("rank"), [gpu_node, cpu_node]) == (2, {"num_cpus": 1, "num_gpus": 1.0})
    small = pool_shape(PoolRequest("retrain", model="mlp"), [gpu_node, cpu_node])
    assert small == (8, {"num_cpus": 1, "num_gpus": 0.25})  # 4 per GPU, each with its CPU
    assert pool_shape(PoolRequest("retrain", model="resnet9"), [gpu_node]) == (2, {"num_cpus": 1, "num_gpus": 1.0})
    # the GPUs held by another pool: fewer workers, the same device (the shape never depends on load)
    busy = node({"CPU": 8.0, "GPU": 2.0}, {"CPU": 7.0, "GPU": 1.0})
    assert pool_shape(PoolRequest("embed"), [busy]) == (1, {"num_gpus": 1, "num_cpus": 1})
    assert pool_shape(PoolRequest("embed"), [node({"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 0.0})]) == (
        1, {"num_gpus": 1, "num_cpus": 1})
    # a GPU embedding worker decoding files on 3 CPUs: 8 CPUs host two of them beside the GPUs
    assert pool_shape(PoolRequest("embed", threads=3), [gpu_node, cpu_node]) == (2, {"num_gpus": 1, "num_cpus": 3})
    assert pool_shape(PoolRequest("regression"), [gpu_node, cpu_node]) == (40, {"num_cpus": 1, "num_gpus": 0})


def test_pool_shape_refuses_a_worker_no_node_can_host():
    with pytest.raises(PoolTooLarge, match="the embed pool's workers each ask for 4 CPU, more than any node of this "
                                           "cluster has \\(largest: 2 CPU\\): lower embed.threads_per_actor"):
        pool_shape(PoolRequest("embed", threads=4), [node({"CPU": 2.0})] * 3)
    with pytest.raises(PoolTooLarge, match="1 CPU, 0.5 GPU.*largest: 8 CPU\\).*gpus_per_actor"):
        pool_shape(PoolRequest("retrain", model="mlp", gpus_per_actor=0.5), {"CPU": 8.0})


@pytest.fixture
def holder(ray_runtime):
    """Holds one of the 2 CPUs, as a job's entrypoint reserves one for its driver."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    actor = Holder.remote()
    ray.get(actor.ready.remote(), timeout=120)
    yield actor
    ray.kill(actor)
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 2)


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_ray_pool_sizes_itself_to_the_cpus_left_for_it(ray_runtime, holder):
    """With one of the 2 CPUs held, a pool has 1 worker, not 2 (the second would wait for
    a CPU that never comes); once it is freed, the next pool has 2 again."""
    import ray

    with ray_runtime.queue(PoolRequest("rank"), Doubler) as queue:
        assert queue.size == 1
        assert sorted(done.result for done in queue.map([1, 2, 3])) == [2, 4, 6]
    ray.kill(holder)
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 2)
    first = ray_runtime.queue(PoolRequest("rank"), Doubler)
    try:
        assert first.size == 2 and sorted(d.result for d in first.map([1, 2])) == [2, 4]
    finally:
        first.close()  # waits until Ray reports its CPUs free again ...
    with ray_runtime.queue(PoolRequest("regression"), Doubler) as second:
        assert second.size == 2  # ... so the next pool, sized right after, gets both


def test_ray_pool_refuses_a_worker_no_node_can_host_before_starting_any(ray_runtime):
    import ray

    with pytest.raises(PoolTooLarge, match="ask for 3 CPU.*largest: 2 CPU"):
        ray_runtime.queue(PoolRequest("embed", threads=3), Doubler)
    assert ray.available_resources().get("CPU", 0) == 2  # no actor was requested


# ----------------------------------------------------------------------------- placement timeout


def test_unplaceable_workers_are_reported_once_and_the_pool_goes_on(ray_runtime, capsys):
    """3 workers asked for on 2 CPUs: after the timeout the queue says that one is
    pending and what it asks for, and every item is done by the two that were placed."""
    import re

    from cluster.runtime import RayRuntime

    runtime = RayRuntime(placement_timeout=6.0)  # joins the fixture's Ray; the 2 placed start well within it
    with runtime.queue(PoolRequest("rank", actors=3), Doubler, key=str) as queue:
        assert queue.size == 3
        results = [done for done in queue.map([0.4] * 30)]  # ~6 s of work on 2 workers
    assert [done.result for done in results] == [0.4] * 30
    assert len({done.worker for done in results}) == 2  # the two placed workers did it all
    err = capsys.readouterr().err
    assert err.count("still pending") == 1, err  # once, not at every poll
    # (1 of 3; 2 only if a placed worker took over 6 s to start on a loaded machine)
    assert re.search(r"rank pool: [12] of 3 workers still pending after 6 s, not placed or not started \(each asks "
                     r"for 1 CPU; the cluster has 0 CPU free of 2 CPU\); continuing with the other [12]", err), err
    assert "'ray status' shows the pending demand" in err


def test_a_pool_that_can_place_no_worker_says_so_instead_of_waiting(ray_runtime, holder):
    """A 2-CPU worker fits the node but not the CPU left beside the held one: after the
    timeout the queue raises, naming what the worker asks for and what the cluster has."""
    from cluster.queue import PlacementTimeout
    from cluster.runtime import RayRuntime

    runtime = RayRuntime(placement_timeout=2.0)
    start = time.monotonic()
    with runtime.queue(PoolRequest("embed", threads=2), Doubler, key=str) as queue:
        queue.submit(1)
        with pytest.raises(PlacementTimeout, match="embed pool: none of its 1 workers could be placed in 2 s "
                                                   "\\(each asks for 2 CPU; the cluster has 1 CPU free of 2 CPU"):
            queue.next()
    assert time.monotonic() - start < 30
