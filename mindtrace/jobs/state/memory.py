"""MemoryStateStore: job records in the process, written by LocalClient inside its publish and settle steps."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, StateUpdate
from mindtrace.jobs.state.base import CancelCallback, CancelListener, StateCapabilities, StateStore, Watch, changed

if TYPE_CHECKING:
    from mindtrace.jobs.backends.base import Backend
    from mindtrace.jobs.backends.local import LocalClient

_Key = tuple[str, str]


class _MemoryWatch(Watch):
    def __init__(self, store: MemoryStateStore, key: _Key) -> None:
        self._store = store
        self._key = key
        self._changed = asyncio.Event()
        self._first = True
        store._watches.setdefault(key, set()).add(self._changed)

    async def next(self, deadline: float | None) -> JobInfo | None:
        if self._first:
            self._first = False
            return self._store._read(self._key)
        if not await changed(self._changed, deadline):
            return None
        return self._store._read(self._key)

    async def close(self) -> None:
        events = self._store._watches.get(self._key)
        if events is not None:
            events.discard(self._changed)
            if not events:
                del self._store._watches[self._key]


class _MemoryListener(CancelListener):
    def __init__(self, store: MemoryStateStore, queue: str, callback: CancelCallback) -> None:
        self._store = store
        self._queue = queue
        self._callback = callback
        store._listeners.setdefault(queue, set()).add(callback)

    async def close(self) -> None:
        callbacks = self._store._listeners.get(self._queue)
        if callbacks is not None:
            callbacks.discard(self._callback)


class MemoryStateStore(StateStore):
    """Records in a dict, watchers woken by asyncio events, retention by an expiry heap; the LocalClient
    writes them inside its own steps, so they are exact (a cancelled queued job is taken out of its queue).
    Nothing survives the process."""

    capabilities = StateCapabilities(
        exact_cancel=True,
        cancel_race=0.0,
        direct_lookup=True,
        atomic_settles=True,
        survives_restart=False,
        dedup="exact",  # checked and taken within one step of the loop
    )

    def __init__(self, client: LocalClient, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._clock = clock
        self._records: dict[_Key, JobInfo] = {}
        self._expiry: list[tuple[float, str, str]] = []
        self._watches: dict[_Key, set[asyncio.Event]] = {}
        self._listeners: dict[str, set[CancelCallback]] = {}
        #: Unique jobs' keys, by (queue, key): the job holding it and until when (the client's clock; None: until
        #: it ends). An entry whose job no longer lives is stale, and taken over by the next publish of the key.
        self._keys: dict[_Key, tuple[str, float | None]] = {}

    def describe(self) -> str:
        return "memory://"

    def settles_with(self, backend: Backend) -> bool:
        return backend is self._client

    # -- used by LocalClient ------------------------------------------------------------------------

    def holder(self, queue: str, update: StateUpdate) -> str | None:
        """The id of the job of ``queue`` that holds ``update``'s dedup key, other than ``update``'s own, or None
        (then the publish goes ahead, and ``apply`` gives the key to its job)."""
        if update.dedup_key is None:
            return None
        held = self._keys.get((queue, update.dedup_key))
        if held is None or held[0] == update.job_id:
            return None
        job_id, until = held
        if until is not None and self._client.clock.time() >= until:
            return None
        info = self._read((queue, job_id))
        if info.status is JobStatus.UNKNOWN or info.terminal:
            return None
        return job_id

    def apply(self, queue: str, update: StateUpdate) -> JobInfo:
        """Apply ``update`` now and wake the job's watchers; returns the record after it."""
        key = (queue, update.job_id)
        self._expire()
        current = self._read(key)
        after = current.apply(update)
        if after is not current:
            self._records[key] = after
            if update.kind == "published" and update.dedup_key is not None:
                ttl = update.dedup_ttl
                until = None if ttl is None else self._client.clock.time() + ttl
                self._keys[(queue, update.dedup_key)] = (update.job_id, until)
            elif after.terminal and after.dedup_key is not None:
                self._release(queue, after)
            if after.expires_at is not None:
                heapq.heappush(self._expiry, (after.expires_at.timestamp(), queue, update.job_id))
            for event in self._watches.get(key, ()):
                event.set()
        return after

    def forget(self, queue: str, job_ids: list[str]) -> None:
        """The jobs left the queue unrun (purged): their records read UNKNOWN."""
        for job_id in job_ids:
            key = (queue, job_id)
            if self._records.pop(key, None) is not None:
                for event in self._watches.get(key, ()):
                    event.set()

    def _release(self, queue: str, info: JobInfo) -> None:
        """``info``'s job ended: its key is free, unless another job holds it by now."""
        key = (queue, cast(str, info.dedup_key))
        held = self._keys.get(key)
        if held is not None and held[0] == info.job_id:
            del self._keys[key]

    def _read(self, key: _Key) -> JobInfo:
        info = self._records.get(key)
        if info is None or info.expired(self._clock()):
            return JobInfo(job_id=key[1], queue=key[0])
        return info

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, queue, job_id = heapq.heappop(self._expiry)
            info = self._records.get((queue, job_id))
            if info is not None and info.expired(now):
                del self._records[(queue, job_id)]

    # -- the contract -------------------------------------------------------------------------------

    async def record(self, queue: str, update: StateUpdate) -> None:
        self.apply(queue, update)

    async def record_unique(self, queue: str, update: StateUpdate) -> str:
        holder = self.holder(queue, update)
        if holder is not None:
            return holder
        self.apply(queue, update)
        return update.job_id

    async def forget_queue(self, queue: str) -> None:
        self.forget(queue, [job_id for (q, job_id) in list(self._records) if q == queue])
        for key in [key for key in self._keys if key[0] == queue]:
            del self._keys[key]

    async def info(self, queue: str, job_id: str) -> JobInfo:
        return self._read((queue, job_id))

    def watch(self, queue: str, job_id: str) -> Watch:
        return _MemoryWatch(self, (queue, job_id))

    async def cancel(self, queue: str, job_id: str, reason: str | None = None) -> CancelOutcome:
        info = self._read((queue, job_id))
        if info.status is JobStatus.UNKNOWN:
            return CancelOutcome.NOT_FOUND
        if info.terminal:
            return CancelOutcome.ALREADY_FINISHED
        if info.status is JobStatus.RUNNING:
            self.apply(queue, StateUpdate(job_id, JobStatus.RUNNING, self._clock(), reason=reason, kind="cancel"))
            for callback in list(self._listeners.get(queue, ())):
                callback(job_id, reason)
            return CancelOutcome.CANCELLING
        # Queued, scheduled or waiting for a retry: out of the queue, so it never starts.
        self._client._take_out(queue, job_id)
        update = StateUpdate(job_id, JobStatus.CANCELLED, self._clock(), info.attempts, reason=reason)
        self.apply(queue, update)
        return CancelOutcome.CANCELLED

    async def cancel_requested(self, queue: str, job_id: str) -> str | None:
        info = self._read((queue, job_id))
        if info.cancel_requested or info.status is JobStatus.CANCELLED:
            return info.reason or ""
        return None

    async def listen_cancels(self, queue: str, callback: CancelCallback) -> CancelListener:
        return _MemoryListener(self, queue, callback)
