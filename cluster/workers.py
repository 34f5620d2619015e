"""Actor pools that survive lost nodes, and names that say where a worker ran.

When a node dies (spot reclaim, OOM kill of its raylet, a removed Kubernetes pod), the
calls in flight on its actors fail with ``RayActorError`` (and results stored only in
its object store with ``ObjectLostError``). The stages then put the unit of work back
in their queue and ask :class:`ActorSlots` for a replacement actor.

Why replacements are *gated* and not used at once: a lost node's CPUs/GPUs are gone
until a node joins, so the replacement may wait for resources indefinitely. A call
queued on it would wait with it, and a run whose last unit sat on such an actor would
never end. A slot therefore takes work again only after its new actor has answered
``ready()``; until then the surviving actors do all the work. Ray's own actor restarts
(``max_restarts``) are not used for the same reason: they retry the call on the
restarting actor, however long it waits.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from attribution.workqueue import WorkFailed


def worker_name() -> str:
    """``host:pid@node`` of this process: ``node`` is the first 12 hex digits of the Ray
    node id (several nodes can share a host name: containers, ``ray.cluster_utils``);
    just ``host:pid`` outside Ray."""
    name = f"{os.uname().nodename}:{os.getpid()}"
    try:
        import ray

        if ray.is_initialized():
            name += f"@{ray.get_runtime_context().get_node_id()[:12]}"
    except Exception:  # noqa: BLE001 - a name must never fail a unit of work
        pass
    return name


def placed(actor) -> bool | None:
    """Whether ``actor`` has a worker process (Ray placed it and started the process; its
    constructor may still run): False while it waits for resources, and for the few
    seconds Ray takes to start the process; None when Ray cannot tell.

    ``ready()`` answers only after the constructor, which can take long (a big
    checkpoint); the GCS actor table knows earlier: such an actor has a worker address.
    Read without the dashboard (the embedded Ray has none), hence Ray's internal state
    accessor; any failure answers None."""
    try:
        from ray._private import state

        info = state.actors(actor_id=actor._actor_id.hex())
        if info.get("State") == "ALIVE":
            return True
        return bool((info.get("Address") or {}).get("Port"))
    except Exception:  # noqa: BLE001 - a diagnostic must never fail the run
        return None


def on_ray(worker_cls: type) -> type:
    """``worker_cls`` (an attribution.workqueue.QueueWorker) answering ``ready()`` with its
    :func:`worker_name` (``host:pid@node``): the name every result and log row carries."""

    def ready(self) -> str:
        if not hasattr(self, "_name"):
            self._name = worker_name()
        return self._name

    # the same class name: `ray status` and the state API show the stage's worker class
    return type(worker_cls.__name__, (worker_cls,), {"ready": ready})


class ActorSlots:
    """``size`` actors made by ``make_actor()``; a lost one is replaced in its slot.

    Indexing, ``len`` and iteration give the current actor handles (like a list).
    :meth:`usable` lists the slots whose actor has answered ``ready()`` and is not known
    to be lost. Callers keep their own per-slot bookkeeping (calls in flight).

    Parameters
    ----------
    make_actor : callable returning a new actor handle (options and arguments bound)
    size : number of slots
    max_failed_starts : a slot whose replacements keep dying before they answer is given
        up after this many in a row; the run stops only when every slot is given up
    ready_method : name of the actor method that answers once the actor is up
    """

    def __init__(self, make_actor: Callable[[], Any], size: int, max_failed_starts: int = 3,
                 ready_method: str = "ready"):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.make_actor, self.ready_method = make_actor, ready_method
        self.max_failed_starts = int(max_failed_starts)
        self.actors = [make_actor() for _ in range(size)]
        self.starting = {i: self._ping(i) for i in range(size)}  # slot -> ready() ref
        self.names: list[str | None] = [None] * size  # what ready() answered (worker_name)
        self.failed_starts = [0] * size
        self.given_up: set[int] = set()
        self.replaced = 0  # actors replaced after a loss (reported by the stages)

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, slot: int):
        return self.actors[slot]

    def __iter__(self):
        return iter(self.actors)

    def _ping(self, slot: int):
        return getattr(self.actors[slot], self.ready_method).remote()

    def usable(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.starting and i not in self.given_up]

    def starting_refs(self) -> list:
        """``ready()`` refs of actors still starting: add them to ``ray.wait`` so the loop
        wakes up when one is up."""
        return list(self.starting.values())

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every slot's actor is up (or given up); the initial pool start."""
        while self.starting:
            self.poll(timeout=timeout, wait_all=True)

    def poll(self, timeout: float | None = 0, wait_all: bool = False) -> None:
        """Move started actors into service; replace those that died while starting.

        ``timeout=0`` only looks; ``None`` blocks until one (``wait_all``: every) starting
        actor answered. Raises :class:`attribution.workqueue.WorkFailed` (a RuntimeError)
        when an actor's constructor failed (a configuration error) or when every slot is
        given up."""
        import ray

        if not self.starting:
            return
        refs = list(self.starting.values())
        # every answer already in when only looking; the first (or all) when blocking
        everything = wait_all or timeout is not None
        ready, _ = ray.wait(refs, num_returns=len(refs) if everything else 1, timeout=timeout)
        by_ref = {ref: slot for slot, ref in self.starting.items()}
        for ref in ready:
            slot = by_ref[ref]
            del self.starting[slot]
            try:
                self.names[slot] = ray.get(ref)
                self.failed_starts[slot] = 0
            except ray.exceptions.RayActorError as error:
                if error.actor_init_failed:  # a configuration error: every replacement would fail too
                    raise WorkFailed(f"a worker failed to start: {error}") from error
                self.failed_starts[slot] += 1
                if self.failed_starts[slot] > self.max_failed_starts:
                    self.given_up.add(slot)
                    print(f"worker slot {slot}: {self.failed_starts[slot]} replacements died while starting; "
                          "continuing with the other workers", file=sys.stderr)
                else:
                    self._replace(slot)
        if self.given_up and len(self.given_up) == len(self.actors):
            raise WorkFailed("every worker was lost and none could be restarted: check the cluster's nodes "
                             "('ray status'); finished work is saved, rerun the same command to resume")

    def lost(self, slot: int, error: BaseException | None = None) -> bool:
        """A call on ``slot`` failed because its actor (or node) was lost: replace the actor,
        unless ``error`` names an actor that was already replaced. Returns True when replaced."""
        if slot in self.starting or slot in self.given_up:
            return False  # already being replaced
        failed = getattr(error, "actor_id", None)
        current = self.actors[slot]._actor_id.hex()
        if failed is not None and failed != current:
            return False  # a late error from the actor this slot held before
        self._replace(slot)
        self.replaced += 1
        return True

    def _replace(self, slot: int) -> None:
        import ray

        try:  # an actor only "unavailable" may still be alive: free its resources
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self.actors[slot] = self.make_actor()
        self.names[slot] = None
        self.starting[slot] = self._ping(slot)

    def kill(self) -> None:
        """Kill every actor (free the CPUs/GPUs for the next stage)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        self.starting.clear()
