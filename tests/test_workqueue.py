"""The one work queue: in process and on a real local Ray (lost workers, retries, failures)."""

import os
from pathlib import Path

import pytest

from attribution.workqueue import InProcessRuntime, PoolRequest, QueueWorker, WorkFailed
from faults import pickle_by_value

pickle_by_value(__name__)  # the workers below run in Ray actors


class Doubler(QueueWorker):
    def __init__(self, offset: int = 0, marker: str | None = None):
        self.offset, self.marker = offset, marker

    def __call__(self, item):
        if item == "fail":
            raise ValueError("this item always fails")
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
