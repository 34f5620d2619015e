"""The one Ray work queue: items on fault-tolerant actor slots (cluster.workers.ActorSlots).

Every pool (embed, rank, support and its ensemble, datamodels, LDS models, the
regressions) is a :class:`RayWorkQueue`. It keeps each usable actor at most ``depth``
calls deep (so a worker never waits for the driver), and handles the ways a call fails:

- the actor or its node was lost (``RayActorError``, ``ObjectLostError``): the item goes
  back to the front of the queue (not counted as an attempt; at most ``max_losses``
  times per item) and the slot gets a replacement actor, which takes work once it has
  answered ``ready()``;
- the item raised (``RayTaskError``): it is retried up to ``max_retries`` times, then
  :class:`attribution.workqueue.WorkFailed` names it and its last error; an error that
  is a :class:`attribution.workqueue.NotRetried` (deterministic: the same item fails
  the same way every time) fails it at once.

Nothing waits forever without saying why: workers Ray has not placed within
``placement_timeout`` seconds are reported once (the resources they ask for, what the
cluster has free) and the pool goes on with the workers it has; when it has none, and
none is even placed, :class:`PlacementTimeout` says so instead of waiting.
"""

from __future__ import annotations

import collections
import sys
import time
from typing import Any

from attribution.workqueue import Completed, NotRetried, WorkFailed, WorkQueue
from cluster.workers import ActorSlots, placed

# How long close() waits for Ray to report the killed actors' resources free again: the
# next pool is sized from the free resources, and Ray frees them ~0.1 s after the kill.
RELEASE_TIMEOUT_S = 10.0


class PlacementTimeout(TimeoutError):
    """No worker of a pool could be placed within its placement timeout."""


class RayWorkQueue(WorkQueue):
    """Parameters: ``make_actor`` (a new actor handle), ``size`` slots, ``depth`` calls per
    actor, ``max_retries`` per item, ``key(item)`` for messages, ``max_losses`` per item,
    ``name`` of the pool and ``options`` (each actor's Ray options) for messages,
    ``placement_timeout`` seconds (None: wait without a limit), ``release_timeout``."""

    def __init__(self, make_actor, size: int, depth: int = 2, max_retries: int = 2, key=None,
                 max_losses: int = 3, name: str = "pool", options: dict | None = None,
                 placement_timeout: float | None = 60.0, release_timeout: float = RELEASE_TIMEOUT_S):
        self.size, self.depth, self.max_retries = int(size), max(1, int(depth)), int(max_retries)
        self.max_losses = int(max_losses)
        self.key = key or (lambda item: item)
        self.name, self.options = name, dict(options or {})
        self.placement_timeout = None if placement_timeout is None else float(placement_timeout)
        self.release_timeout = float(release_timeout)
        self._free_at_start = _free_resources()  # what close() waits to see free again
        self.slots = ActorSlots(make_actor, self.size, max_failed_starts=max(1, self.max_retries))
        self._queued: collections.deque = collections.deque()  # (item, attempt, losses)
        self._in_flight: dict = {}  # ref -> (item, attempt, losses, slot)
        self._load = [0] * self.size
        self.retried = self.requeued = 0
        # No waiting for every actor here: work starts on the first that is up, and a node
        # lost while the pool starts (its actors' replacements may never be placed) cannot
        # hold the run. A constructor that raises surfaces at the next poll.
        self._created = time.monotonic()
        self._reported = False       # the once-only "workers not placed" message
        self._starved_since = None   # since when no worker is usable (all starting)

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

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.slots.poll()  # replacements of lost workers that are up take work again
            self._watch_placement()
            self._dispatch()
            if not self._in_flight and not self._queued:
                return None
            # every worker may be (re)starting: then only their ready() answers can come
            refs = list(self._in_flight) + self.slots.starting_refs()
            if not refs:  # not reachable: ActorSlots raises once every slot is given up
                raise WorkFailed(f"{self.name}: no worker left to run {len(self._queued)} queued items")
            ready, _ = ray.wait(refs, num_returns=1, timeout=self._wait_seconds(deadline))
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue  # a placement deadline: _watch_placement looks again
            ref = ready[0]
            if ref not in self._in_flight:
                continue  # a worker answered ready(): poll() puts it in service
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
        free_before = _free_resources()
        self.slots.kill()
        self._queued.clear()
        self._in_flight.clear()
        if free_before is not None and self._free_at_start is not None:
            self._await_release(free_before)

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
        if isinstance(cause, NotRetried):  # deterministic: another attempt fails the same way
            raise WorkFailed(f"{self.key(item)} failed (a deterministic error, not retried): {reason}") from error
        if attempt >= self.max_retries:
            raise WorkFailed(f"{self.key(item)} failed {attempt + 1} times; last error: {reason}") from error
        self.retried += 1
        print(f"{self.key(item)} failed (attempt {attempt + 1}), retrying: {reason}", file=sys.stderr)
        self._queued.appendleft((item, attempt + 1, losses))

    # ------------------------------------------------------------------ placement
    def _wait_seconds(self, deadline: float | None) -> float | None:
        """How long ``next`` may block: until the caller's deadline, or the next placement
        check while workers are still starting."""
        now = time.monotonic()
        waits = [] if deadline is None else [deadline - now]
        if self.placement_timeout is not None and self.slots.starting:
            if not self._reported:
                waits.append(self._created + self.placement_timeout - now)
            if self._starved_since is not None:
                waits.append(self._starved_since + self.placement_timeout - now)
        return max(0.05, min(waits)) if waits else None

    def _watch_placement(self) -> None:
        """Say once which workers are not placed after ``placement_timeout``; raise
        :class:`PlacementTimeout` when no worker has been usable for that long, none is
        even placed, and work is waiting."""
        if self.placement_timeout is None:
            return
        now = time.monotonic()
        usable = self.slots.usable()
        if usable or not self.slots.starting:
            self._starved_since = None
        elif self._starved_since is None:
            self._starved_since = now
        if not self._reported and self.slots.starting and now - self._created >= self.placement_timeout:
            self._reported = True
            waiting = [slot for slot, up in self._placement().items() if not up]
            if waiting:
                print(f"{self.name}: {len(waiting)} of {self.size} workers still pending after "
                      f"{self.placement_timeout:g} s, not placed or not started ({self._demand()}); continuing with "
                      f"the other {self.size - len(waiting)}, the pending join if resources free up ('ray status' "
                      "shows the pending demand)", file=sys.stderr, flush=True)
        starved = self._starved_since is not None and now - self._starved_since >= self.placement_timeout
        if starved and (self._queued or self._in_flight):
            if all(up is False for up in self._placement().values()):
                raise PlacementTimeout(
                    f"{self.name}: none of its {len(self.slots.starting)} workers could be placed in "
                    f"{self.placement_timeout:g} s ({self._demand()}; 'ray status' shows what holds the rest): "
                    "free resources or add a node, or ask for less per worker; finished work is saved, rerun the "
                    "same command to resume")
            self._starved_since = now  # placed and still constructing: look again after another timeout

    def _placement(self) -> dict:
        """Starting slot -> whether its actor has a process (None: cannot tell). False also
        while Ray starts the process of a placed actor (a few seconds), hence "not placed
        or not started" in messages and a timeout far above that."""
        return {slot: placed(self.slots[slot]) for slot in self.slots.starting}

    def _demand(self) -> str:
        """What each worker asks for and what the cluster has, for messages."""
        import ray

        from cluster.resources import describe

        free, total = ray.available_resources(), ray.cluster_resources()
        return (f"each asks for {describe(self.options, options=True)}; the cluster has "
                f"{describe(free)} free of {describe(total)}")

    def _await_release(self, free_before: dict) -> None:
        """Wait (at most ``release_timeout``) until Ray reports this pool's resources free
        again: as free as when the pool was created, bounded by what killing all its
        actors can free and by the cluster's size now (a node may have been lost)."""
        import ray

        total = ray.cluster_resources()
        wanted = {name: min(float(self._free_at_start.get(name, 0)),
                            float(free_before.get(name, 0)) + self.size * float(self.options.get(option) or 0),
                            float(total.get(name, 0)))
                  for option, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"))}
        deadline = time.monotonic() + self.release_timeout
        while time.monotonic() < deadline:
            free = ray.available_resources()
            if all(float(free.get(name, 0)) >= amount - 1e-6 for name, amount in wanted.items()):
                return
            time.sleep(0.02)


def _free_resources() -> dict | None:
    """Ray's free resources (None when Ray is not running)."""
    import ray

    return dict(ray.available_resources()) if ray.is_initialized() else None
