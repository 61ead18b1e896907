"""The job-state contract beside the Backend contract: StateStore, its Watch and CancelListener, and capabilities.

A state store keeps one record per job (:class:`~mindtrace.jobs.lifecycle.JobInfo`), wakes the waiters of a
job when its record changes (never by polling), and carries cancel requests to the consumers of a queue.
The orchestrator writes the QUEUED record with each publish and the terminal record with each settle; the
consumer writes RUNNING and progress. A store that ``settles_with`` a backend has those writes done by the
backend itself, inside the same atomic step as the publish or settle (memory, and Redis with its own store),
so the queue and the records can never disagree after a crash; any other store is written just before the
broker is told (a crash in between re-runs the job, and the first terminal record wins: see ``JobInfo.apply``).

Like a backend, a store is bound to the first event loop that uses it.
"""

from __future__ import annotations

import abc
import asyncio
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mindtrace.jobs.errors import ResultTimeoutError
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, StateUpdate

if TYPE_CHECKING:
    from mindtrace.jobs.backends.base import Backend

#: Called by a store with (job_id, reason) when a cancel of a job of the listened queue arrives.
CancelCallback = Callable[[str, "str | None"], None]

#: How a store keeps unique jobs' keys (see ``StateStore.record_unique``): ``"exact"``, one atomic
#: insert-if-absent, so concurrent publishes of one key queue one job; ``"best_effort"``, a read then a write,
#: so publishes racing within that gap may each queue a job (sequential ones never do).
DedupGuarantee = Literal["exact", "best_effort"]


@dataclass(frozen=True)
class StateCapabilities:
    """What one state store guarantees beyond the common contract; the conformance suite reads it.

    - ``exact_cancel``: a queued or retrying job that is cancelled never starts (True), or a cancel that
      races its delivery by less than ``cancel_race`` seconds may let it start, then it is cancelled at once
      and still ends CANCELLED with no result (False).
    - ``cancel_race``: that bound, in seconds (0 when ``exact_cancel``).
    - ``direct_lookup``: ``info()`` of any job costs one round trip (True), or the first lookup on a queue
      replays the queue's event log of the retention period (False; later lookups are local).
    - ``atomic_settles``: records are written inside the broker's publish and settle steps (a store that
      ``settles_with`` its backend), so they never disagree with the queue after a crash.
    - ``survives_restart``: records survive a restart of the store's server (where it persists at all).
    - ``dedup``: how unique jobs' keys are kept (see :data:`DedupGuarantee`).
    """

    exact_cancel: bool
    cancel_race: float
    direct_lookup: bool
    atomic_settles: bool
    survives_restart: bool
    dedup: DedupGuarantee = "exact"


async def changed(event: asyncio.Event, deadline: float | None) -> bool:
    """Sleep until ``event`` is set (then clear it: True) or ``deadline`` (event loop time; None: no limit)
    passes (False): how a store's watch waits for the next change of its record."""
    loop = asyncio.get_running_loop()
    timeout = None if deadline is None else max(0.0, deadline - loop.time())
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    event.clear()
    return True


class Watch(abc.ABC):
    """One job's record, followed: ``async with store.watch(queue, job_id) as w: info = await w.next(deadline)``.

    The first ``next`` returns the record as read after the subscription was in place (so a change between
    the read and the subscription cannot be missed); every later ``next`` sleeps until the store signals a
    change of the record (or a reconnect, after which the record is read again) and returns it, or returns
    None once ``deadline`` (event loop time; None: no limit) passes. Waiting sends nothing to the broker.
    """

    @abc.abstractmethod
    async def next(self, deadline: float | None) -> JobInfo | None:
        """The record now (first call) or after its next change; None at the deadline."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop following; idempotent."""

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()


class CancelListener(abc.ABC):
    """Cancel requests of one queue, delivered to a callback until closed (see ``StateStore.listen_cancels``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop listening; idempotent."""


class StateStore(abc.ABC):
    """Where job records live. Public methods are the contract the orchestrator and consumer use.

    Records of a queue are independent of other queues' (the same id on two queues is two jobs). A store
    that cannot be reached raises BackendUnavailableError naming it; nothing recorded is lost by that.
    """

    capabilities: StateCapabilities

    def describe(self) -> str:
        """Where this store points, for messages (never a password)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def settles_with(self, backend: Backend) -> bool:
        """Whether ``backend`` writes this store's records itself, inside its publish and settle steps.

        Then the orchestrator passes each record to the backend's verb (``publish``, ``ack``, ``retry``,
        ``dead_letter``, ``release`` take ``state=``) instead of calling :meth:`record`.
        """
        return False

    async def connect(self) -> None:
        """Open connections now (otherwise the first operation does)."""
        return None

    async def close(self) -> None:
        """Close connections and end every watch and listener; idempotent."""
        return None

    # -- writes -------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def record(self, queue: str, update: StateUpdate) -> None:
        """Apply ``update`` to the job's record (by ``JobInfo.apply``) and wake its watchers.

        A terminal update starts the record's retention (``update.ttl`` seconds). Returns once the store
        holds it (durably, where the store persists).
        """

    @abc.abstractmethod
    async def record_unique(self, queue: str, update: StateUpdate) -> str:
        """Record the publish ``update`` of a unique job (its ``dedup_key`` set), unless a job of ``queue`` holds
        that key: then record nothing and return that job's id; else return ``update.job_id``, whose job holds
        the key from now on (see ``JobInfo.holds_key``: until it ends, or ``dedup_ttl`` passes, whichever is
        first). Keys are per queue. Exact or best effort as ``capabilities.dedup`` says.

        A store that ``settles_with`` its backend does the same inside the backend's publish (which then
        returns the holder's id); this method serves other brokers' publishes.
        """

    async def record_many(self, queue: str, updates: Sequence[StateUpdate]) -> None:
        """Apply several updates (``publish_many``); a store may send them in one round trip."""
        await asyncio.gather(*(self.record(queue, update) for update in updates))

    async def purged(self, queue: str, at: float) -> None:
        """Every job of ``queue`` that was QUEUED at ``at`` (Unix seconds) was purged: its record reads UNKNOWN.

        A store that ``settles_with`` the backend forgets them in the purge itself and does nothing here.
        """
        return None

    async def forget_queue(self, queue: str) -> None:
        """``queue`` was deleted: every record of it reads UNKNOWN from now on."""
        return None

    # -- reads --------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def info(self, queue: str, job_id: str) -> JobInfo:
        """The job's record; status UNKNOWN when there is none (never published here, or past retention)."""

    @abc.abstractmethod
    def watch(self, queue: str, job_id: str) -> Watch:
        """Follow the job's record (see :class:`Watch`). Many watches share the store's connections."""

    async def wait(self, queue: str, job_id: str, timeout: float | None = None) -> JobInfo:
        """The job's record once it is terminal, or UNKNOWN; ResultTimeoutError after ``timeout`` seconds.

        Built on :meth:`watch`, so it never polls; a timeout leaves the job as it is.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        async with self.watch(queue, job_id) as watch:
            status = JobStatus.UNKNOWN
            while True:
                info = await watch.next(deadline)
                if info is None:
                    raise ResultTimeoutError(job_id=job_id, queue=queue, timeout=timeout, status=status)
                if info.terminal or info.status is JobStatus.UNKNOWN:
                    return info
                status = info.status

    # -- cancellation -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def cancel(self, queue: str, job_id: str, reason: str | None = None) -> CancelOutcome:
        """Cancel the job: a job not started never starts (see ``capabilities.exact_cancel``) and its record
        becomes CANCELLED; a running one gets a cancel request its consumer hears; a finished one is left
        intact. A request holds even while no consumer runs: one that starts later honours it."""

    async def started(self, queue: str, update: StateUpdate) -> str | None:
        """A consumer starts a job: record ``update`` (RUNNING), then answer :meth:`cancel_requested`.

        In this order, so a cancel that comes after the answer finds the job running (and reaches its consumer)
        and one that came before is in the answer. A store may do both in one round trip.
        """
        await self.record(queue, update)
        return await self.cancel_requested(queue, update.job_id)

    @abc.abstractmethod
    async def cancel_requested(self, queue: str, job_id: str) -> str | None:
        """Asked by a consumer before it runs a job: the cancel reason ("" without one) if the job was
        cancelled, else None. Cheap: a store that removes cancelled jobs from the queue answers locally."""

    @abc.abstractmethod
    async def listen_cancels(self, queue: str, callback: CancelCallback) -> CancelListener:
        """Call ``callback(job_id, reason)`` on the loop for every cancel request of ``queue`` from now on,
        until the listener is closed; after a reconnect the store catches up on what it missed."""
