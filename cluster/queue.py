"""The one Ray work queue: items on fault-tolerant actor slots (cluster.workers.ActorSlots).

Every pool (embed, rank, support and its ensemble, datamodels, LDS models, the
regressions) is a :class:`RayWorkQueue`. It keeps each usable actor at most ``depth``
calls deep (so a worker never waits for the driver), and handles the two ways a call
fails:

- the actor or its node was lost (``RayActorError``, ``ObjectLostError``): the item goes
  back to the front of the queue (not counted as an attempt; at most ``max_losses``
  times per item) and the slot gets a replacement actor, which takes work once it has
  answered ``ready()``;
- the item raised (``RayTaskError``): it is retried up to ``max_retries`` times, then
  :class:`attribution.workqueue.WorkFailed` names it and its last error.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

from attribution.workqueue import Completed, WorkFailed, WorkQueue
from cluster.workers import ActorSlots


class RayWorkQueue(WorkQueue):
    """Parameters: ``make_actor`` (a new actor handle), ``size`` slots, ``depth`` calls per
    actor, ``max_retries`` per item, ``key(item)`` for messages, ``max_losses`` per item."""

    def __init__(self, make_actor, size: int, depth: int = 2, max_retries: int = 2, key=None,
                 max_losses: int = 3):
        self.size, self.depth, self.max_retries = int(size), max(1, int(depth)), int(max_retries)
        self.max_losses = int(max_losses)
        self.key = key or (lambda item: item)
        self.slots = ActorSlots(make_actor, self.size, max_failed_starts=max(1, self.max_retries))
        self._queued: collections.deque = collections.deque()  # (item, attempt, losses)
        self._in_flight: dict = {}  # ref -> (item, attempt, losses, slot)
        self._load = [0] * self.size
        self.retried = self.requeued = 0
        # No waiting for every actor here: work starts on the first that is up, and a node
        # lost while the pool starts (its actors' replacements may never be placed) cannot
        # hold the run. A constructor that raises surfaces at the next poll.

    @property
    def replaced(self) -> int:
        return self.slots.replaced

    # ------------------------------------------------------------------ WorkQueue
    def submit(self, item: Any) -> None:
        self._queued.append((item, 0, 0))
        self._dispatch()

    @property
    def pending(self) -> int:
        return len(self._queued) + len(self._in_flight)

    def free(self) -> int:
        room = sum(max(0, self.depth - self._load[i]) for i in self.slots.usable())
        return max(0, room - len(self._queued))

    def idle(self) -> int:
        return max(0, sum(1 for i in self.slots.usable() if self._load[i] == 0) - len(self._queued))

    def next(self, timeout: float | None = None) -> Completed | None:
        import ray

        while True:
            self.slots.poll()  # replacements of lost workers that are up take work again
            self._dispatch()
            if not self._in_flight:
                if not self._queued:
                    return None
                # every worker is (re)starting: wait for one
                self.slots.poll(timeout=timeout)
                if timeout is not None and not self.slots.usable():
                    return None
                continue
            ready, _ = ray.wait(list(self._in_flight) + self.slots.starting_refs(), num_returns=1,
                                timeout=timeout)
            if not ready:
                return None
            ref = ready[0]
            if ref not in self._in_flight:
                continue  # a replacement worker answered: poll() puts it in service
            item, attempt, losses, slot = self._in_flight.pop(ref)
            self._load[slot] -= 1
            try:
                result, worker = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
                self._lost(item, attempt, losses, slot, error)
                continue
            except ray.exceptions.RayTaskError as error:
                self._failed(item, attempt, losses, error)
                continue
            self._dispatch()
            return Completed(item, result, attempt, worker)

    def close(self) -> None:
        self.slots.kill()
        self._queued.clear()
        self._in_flight.clear()

    # ------------------------------------------------------------------ internals
    def _dispatch(self) -> None:
        while self._queued:
            usable = [i for i in self.slots.usable() if self._load[i] < self.depth]
            if not usable:
                return
            slot = min(usable, key=self._load.__getitem__)
            item, attempt, losses = self._queued.popleft()
            ref = self.slots[slot].call.remote(item, attempt)
            self._in_flight[ref] = (item, attempt, losses, slot)
            self._load[slot] += 1

    def _lost(self, item, attempt, losses, slot, error) -> None:
        losses += 1
        if losses > self.max_losses:
            raise WorkFailed(
                f"{self.key(item)} lost its worker {losses} times (last: {str(error).splitlines()[0]}); finished "
                "work is saved: check the nodes' memory and health ('ray status') and rerun the same command "
                "to resume") from error
        self.slots.lost(slot, error)
        self.requeued += 1
        self._queued.appendleft((item, attempt, losses))

    def _failed(self, item, attempt, losses, error) -> None:
        cause = getattr(error, "cause", None) or error  # the worker's own exception
        reason = f"{type(cause).__name__}: {cause}"
        if attempt >= self.max_retries:
            raise WorkFailed(f"{self.key(item)} failed {attempt + 1} times; last error: {reason}") from error
        self.retried += 1
        print(f"{self.key(item)} failed (attempt {attempt + 1}), retrying: {reason}", file=sys.stderr)
        self._queued.appendleft((item, attempt + 1, losses))
