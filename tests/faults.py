"""The test seam for failure injection: runtimes that make workers fail or drivers crash.

Production code has no test hooks. A stage takes its pools from a Runtime; these wrap
one (an InProcessRuntime or a real RayRuntime):

- ``FaultyRuntime(inner, fail_first=keys, key=fn)``: the pools' workers raise on the
  first attempt of every item whose ``key(item)`` is in ``keys`` (through the worker's
  ``call`` seam, so the failure travels as a real task error through Ray);
- ``FaultyRuntime(inner, crash_after=n)``: the queue raises :class:`SimulatedCrash` (a
  BaseException, as a kill would end the driver) once ``n`` items have completed.
"""

from __future__ import annotations

import sys

from attribution.workqueue import DelegatingQueue, Runtime, WorkQueue


def pickle_by_value(module_name: str) -> None:
    """Ray workers cannot import test modules: ship their classes by value."""
    try:
        from ray import cloudpickle
    except ImportError:  # no Ray: in-process runtimes need no pickling
        return
    cloudpickle.register_pickle_by_value(sys.modules[module_name])


pickle_by_value(__name__)


class SimulatedCrash(BaseException):
    """The driver stops here as if killed (tests then rerun the stage to resume)."""


def failing_worker(worker: type, keys, key) -> type:
    """A subclass of ``worker`` whose first attempt at an item with ``key(item)`` in ``keys`` raises."""
    keys = {tuple(k) if isinstance(k, (list, tuple)) else k for k in keys}

    def call(self, item, attempt):
        if attempt == 0 and key(item) in keys:
            raise RuntimeError(f"injected failure for {key(item)} (test seam)")
        return worker.call(self, item, attempt)

    return type(f"Failing{worker.__name__}", (worker,), {"call": call, "__module__": __name__})


class CrashingQueue(DelegatingQueue):
    def __init__(self, inner: WorkQueue, crash_after: int):
        super().__init__(inner)
        self.crash_after, self.completed = int(crash_after), 0

    def next(self, timeout=None):
        if self.completed >= self.crash_after:
            raise SimulatedCrash(f"driver stopped after {self.completed} items (test seam)")
        done = self.inner.next(timeout)
        if done is not None:
            self.completed += 1
        return done


class FaultyRuntime(Runtime):
    def __init__(self, inner: Runtime, fail_first=(), key=None, crash_after: int | None = None):
        self.inner, self.fail_first, self.key, self.crash_after = inner, list(fail_first), key, crash_after

    def device(self, request):
        return self.inner.device(request)

    def resources(self):
        return self.inner.resources()

    def queue(self, request, worker, *args, **kwargs):
        if self.fail_first:
            worker = failing_worker(worker, self.fail_first, self.key or (lambda item: item))
        queue = self.inner.queue(request, worker, *args, **kwargs)
        return CrashingQueue(queue, self.crash_after) if self.crash_after is not None else queue
