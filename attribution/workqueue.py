"""One work queue for every pool of workers, and the runtime that makes queues.

Stages never start processes themselves. They describe a pool (:class:`PoolRequest`:
which kind of work, so the resources module can size it, and the worker class with its
constructor arguments) and ask the stage's :class:`Runtime` for a :class:`WorkQueue`.
They then ``submit`` items and take :class:`Completed` results as they finish, in any
order; a stage whose later work depends on earlier results (the support search) keeps
submitting while it consumes.

A worker is a plain callable class (Ray's "callable class" actor pattern), subclassing
:class:`QueueWorker`: its constructor receives the shared arguments once (training
set, embeddings, ...), ``__call__(item)`` does one unit of work and returns a result.
Workers never write to the experiment: results come back to the driver, which writes.

Two runtimes exist: :class:`InProcessRuntime` (here; no Ray; one worker in this
process, used by unit tests and for debugging) and ``cluster.runtime.RayRuntime``
(actors over fault-tolerant slots: a lost actor or node puts its items back in the
queue and the slot gets a replacement; a failing item is retried ``max_retries``
times, then the queue raises :class:`WorkFailed` naming it). Both queues fail an item
at once, without retries, when its worker raised a :class:`NotRetried`.
"""

from __future__ import annotations

import abc
import collections
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Iterator, Sequence


@dataclass(frozen=True)
class PoolRequest:
    """What a stage asks of a pool; ``cluster.resources`` turns it into actors and options.

    kind : "embed" | "rank" | "retrain" | "regression" | "trak" (the resources module sizes each)
    actors : requested pool size; None / 0 = as many as the cluster can place
    max_items : never start more workers than there are items
    model : retraining model (its GPU share on GPU clusters)
    gpus_per_actor : explicit GPU share (None: the resources module's default for ``kind``)
    threads : torch threads (and CPUs) per worker
    """

    kind: str
    actors: int | None = None
    max_items: int | None = None
    model: str | None = None
    gpus_per_actor: float | None = None
    threads: int = 1


@dataclass
class Completed:
    """A finished item: its result, the attempt that succeeded and the worker's name."""

    item: Any
    result: Any
    attempt: int
    worker: str


class WorkFailed(RuntimeError):
    """An item failed on every allowed attempt (the message names it and the last error)."""


class NotRetried(Exception):
    """Base of a worker's deterministic errors: the same item would fail the same way on
    every attempt (bad input, not a lost process), so the queue fails it at once with
    :class:`WorkFailed` instead of retrying it ``max_retries`` times."""


def worker_name() -> str:
    """``host:pid`` of this process (the Ray runtime's workers add ``@node``: cluster.workers)."""
    return f"{os.uname().nodename}:{os.getpid()}"


def node_of(worker: str) -> str:
    """The node part of a worker's name (``host:pid@node``; the host name when there is none)."""
    return worker.rpartition("@")[2] if "@" in worker else worker.split(":")[0]


class QueueWorker:
    """Base of every pool's worker: ``__call__(item)`` does one unit of work.

    :meth:`call` is what the queue invokes (it adds the worker's name to the result);
    tests inject failures by overriding it in a subclass (see ``tests/faults.py``), never
    through production parameters."""

    def ready(self) -> str:
        if not hasattr(self, "_name"):
            self._name = worker_name()
        return self._name

    def call(self, item: Any, attempt: int) -> tuple[Any, str]:
        if isinstance(item, Group):
            return self.run_group(item.items), self.ready()
        return self(item), self.ready()

    def __call__(self, item: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_group(self, items: Sequence[Any]) -> list:
        """One result per item of a :class:`Group` (:class:`BatchingQueue`), or an
        :class:`ItemFailed` for an item whose :class:`NotRetried` error fails only it.
        Here one item at a time; workers that do a group's work together override it.
        Any other error fails the whole group, which the queue then retries."""
        results = []
        for item in items:
            try:
                results.append(self(item))
            except NotRetried as error:
                results.append(ItemFailed(error))
        return results


class WorkQueue(abc.ABC):
    """Items in, :class:`Completed` out, on ``size`` workers, at most ``depth`` in flight each."""

    size: int
    depth: int
    retried: int = 0     # failed attempts that were retried
    requeued: int = 0    # items put back after their worker (or node) was lost
    replaced: int = 0    # workers replaced after a loss

    @abc.abstractmethod
    def submit(self, item: Any) -> None:
        """Queue an item; it runs when a worker has room."""

    @abc.abstractmethod
    def next(self, timeout: float | None = None) -> Completed | None:
        """The next finished item (None when ``timeout`` seconds passed without one).
        Raises :class:`WorkFailed` when an item exhausted its retries."""

    @property
    @abc.abstractmethod
    def pending(self) -> int:
        """Items submitted and not yet returned by :meth:`next`."""

    @abc.abstractmethod
    def free(self) -> int:
        """How many more items can start now without waiting behind others."""

    @abc.abstractmethod
    def idle(self) -> int:
        """Workers with nothing to do."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the workers (frees their CPUs / GPUs for the next pool)."""

    def map(self, items: Sequence[Any]) -> Iterator[Completed]:
        """Submit every item and yield them as they complete (any order)."""
        for item in items:
            self.submit(item)
        while self.pending:
            done = self.next()
            if done is not None:
                yield done

    def __enter__(self) -> "WorkQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DelegatingQueue(WorkQueue):
    """A queue that forwards everything to ``inner``: subclass it to watch or alter one
    verb (tests/faults.py crashes the driver in ``next``; benchmarks time the items)."""

    def __init__(self, inner: WorkQueue):
        self.inner = inner
        self.size, self.depth = inner.size, inner.depth

    def submit(self, item: Any) -> None:
        self.inner.submit(item)

    def next(self, timeout: float | None = None) -> Completed | None:
        return self.inner.next(timeout)

    @property
    def pending(self) -> int:
        return self.inner.pending

    def free(self) -> int:
        return self.inner.free()

    def idle(self) -> int:
        return self.inner.idle()

    def close(self) -> None:
        self.inner.close()

    @property
    def retried(self) -> int:
        return self.inner.retried

    @property
    def requeued(self) -> int:
        return self.inner.requeued

    @property
    def replaced(self) -> int:
        return self.inner.replaced


@dataclass(frozen=True)
class Group:
    """Several items sent to one worker as one item (:class:`BatchingQueue`)."""

    items: tuple


@dataclass(frozen=True)
class ItemFailed:
    """The result of a group's item that failed with a :class:`NotRetried` error."""

    error: BaseException


class BatchingQueue(DelegatingQueue):
    """Sends items to the workers of ``inner`` in groups of up to ``group_size``
    (:class:`Group`; the worker's :meth:`QueueWorker.run_group` does them together, e.g.
    trains that many models at once) and returns one :class:`Completed` per item.

    Counts are in items: ``free()`` / ``idle()`` are the inner queue's free slots / idle
    workers times ``group_size``, minus the items buffered; ``pending`` counts buffered,
    in-flight and unreturned items. Items are grouped by ``kind(item)`` (a group holds
    one kind). A full group is sent at once; a partial one when :meth:`next` is called
    and a worker has room (or nothing is in flight), so no item waits for company.
    A lost worker or a failing group is requeued / retried by the inner queue as any
    item; an item whose result is :class:`ItemFailed` fails alone (:class:`WorkFailed`
    from :meth:`next`, after the group's other items were returned)."""

    def __init__(self, inner: WorkQueue, group_size: int, key: Callable[[Any], Hashable] | None = None,
                 kind: Callable[[Any], Hashable] | None = None):
        super().__init__(inner)
        if int(group_size) < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = int(group_size)
        self.key = key or (lambda item: item)
        self.kind = kind or (lambda item: item.get("kind") if isinstance(item, dict) else None)
        self._buffers: dict = {}            # kind -> items waiting for a group
        self._in_flight = 0                 # items in groups the inner queue holds
        self._ready: collections.deque = collections.deque()  # Completed / (item, error) to return

    @classmethod
    def open(cls, runtime: "Runtime", group_size: int, request: PoolRequest, worker: type[QueueWorker], *args,
             key: Callable[[Any], Hashable] | None = None, **kwargs) -> WorkQueue:
        """A queue of ``runtime`` over ``worker`` that sends groups of ``group_size``
        items (1: the plain queue, one item per call). Workers are capped at the number
        of groups ``request.max_items`` makes."""
        if int(group_size) <= 1:
            return runtime.queue(request, worker, *args, key=key, **kwargs)
        name = key or (lambda item: item)
        if request.max_items:
            request = replace(request, max_items=-(-int(request.max_items) // int(group_size)))
        inner = runtime.queue(request, worker, *args, key=lambda group: group_name(group, name), **kwargs)
        return cls(inner, group_size, key=name)

    @property
    def buffered(self) -> int:
        return sum(len(items) for items in self._buffers.values())

    def submit(self, item: Any) -> None:
        items = self._buffers.setdefault(self.kind(item), [])
        items.append(item)
        if len(items) >= self.group_size:
            self._send(self.kind(item))

    def next(self, timeout: float | None = None) -> Completed | None:
        if not self._ready:
            self._flush()
            done = self.inner.next(timeout)
            if done is None:
                self._flush()  # the caller may have nothing more to add
                return None
            self._unpack(done)
        entry = self._ready.popleft()
        if isinstance(entry, Completed):
            return entry
        item, error = entry
        raise WorkFailed(f"{self.key(item)} failed (a deterministic error, not retried): "
                         f"{type(error).__name__}: {error}") from error

    @property
    def pending(self) -> int:
        return self.buffered + self._in_flight + len(self._ready)

    def free(self) -> int:
        return max(0, self.inner.free() * self.group_size - self.buffered)

    def idle(self) -> int:
        return max(0, self.inner.idle() * self.group_size - self.buffered)

    def close(self) -> None:
        self._buffers.clear()
        self._ready.clear()
        self._in_flight = 0
        self.inner.close()

    # ------------------------------------------------------------------ internals
    def _send(self, kind) -> None:
        items = self._buffers.pop(kind)
        self._in_flight += len(items)
        self.inner.submit(Group(tuple(items)))

    def _flush(self) -> None:
        """Send partial groups when a worker has room, or when nothing is in flight."""
        for kind in list(self._buffers):
            if self.inner.free() > 0 or not self.inner.pending:
                self._send(kind)

    def _unpack(self, done: Completed) -> None:
        items, results = done.item.items, done.result
        if len(results) != len(items):
            raise WorkFailed(f"{group_name(done.item, self.key)}: the worker returned {len(results)} results for "
                             f"{len(items)} items")
        self._in_flight -= len(items)
        failed = []
        for item, result in zip(items, results):
            if isinstance(result, ItemFailed):
                failed.append((item, result.error))
            else:
                self._ready.append(Completed(item, result, done.attempt, done.worker))
        self._ready.extend(failed)  # the group's good items first: they are kept before the failure ends the run


def group_name(group: Group, key: Callable[[Any], Hashable]) -> str:
    """How errors name a group: its size and its items' names."""
    names = [str(key(item)) for item in group.items]
    shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
    return f"group of {len(names)} ({shown})"


class Runtime(abc.ABC):
    """Makes work queues; the stage's only handle on processes, devices and clusters."""

    @abc.abstractmethod
    def queue(self, request: PoolRequest, worker: type[QueueWorker], *args, depth: int = 2,
              max_retries: int = 2, key: Callable[[Any], Hashable] | None = None, **kwargs) -> WorkQueue:
        """A queue over workers ``worker(*args, **kwargs)`` (arguments shared once, not
        copied per worker where the runtime can share them). ``key(item)`` names an item
        in error messages."""

    @abc.abstractmethod
    def device(self, request: PoolRequest) -> str:
        """"cuda" or "cpu": the device the pool's workers get."""

    def resources(self) -> dict:
        """The resources the runtime has (CPU, GPU, ...)."""
        return {"CPU": os.cpu_count() or 1}


class InProcessRuntime(Runtime):
    """One worker in this process, items run one at a time as :meth:`WorkQueue.next` is
    called: no Ray, deterministic, for unit tests and debugging."""

    def __init__(self, device: str = "cpu"):
        self._device = device

    def device(self, request: PoolRequest) -> str:
        return self._device

    def queue(self, request, worker, *args, depth=2, max_retries=2, key=None, **kwargs):
        return InProcessQueue(worker(*args, **kwargs), max_retries=max_retries, key=key)


class InProcessQueue(WorkQueue):
    def __init__(self, worker: QueueWorker, max_retries: int = 2, key=None):
        self.worker, self.max_retries, self.key = worker, int(max_retries), key or (lambda item: item)
        self.size, self.depth = 1, 1
        self._items: collections.deque = collections.deque()
        self.retried = self.requeued = self.replaced = 0

    def submit(self, item):
        self._items.append(item)

    @property
    def pending(self) -> int:
        return len(self._items)

    def free(self) -> int:
        return 1 if not self._items else 0

    def idle(self) -> int:
        return 1 if not self._items else 0

    def next(self, timeout=None):
        if not self._items:
            if timeout:
                time.sleep(0)
            return None
        item = self._items.popleft()
        for attempt in range(self.max_retries + 1):
            try:
                result, name = self.worker.call(item, attempt)
                return Completed(item, result, attempt, name)
            except Exception as error:  # noqa: BLE001 - retried, then reported with the item
                if isinstance(error, NotRetried):  # deterministic: another attempt fails the same way
                    raise WorkFailed(f"{self.key(item)} failed (a deterministic error, not retried): "
                                     f"{type(error).__name__}: {error}") from error
                if attempt >= self.max_retries:
                    raise WorkFailed(f"{self.key(item)} failed {attempt + 1} times; last error: "
                                     f"{type(error).__name__}: {error}") from error
                self.retried += 1
        raise AssertionError("unreachable")

    def close(self):
        self._items.clear()
