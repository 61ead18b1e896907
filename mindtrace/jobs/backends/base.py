"""The backend contract: the abstract Backend every driver implements, and the Delivery it hands out.

Public methods validate and keep the books once, here; each then calls a ``_``-prefixed primitive that a
backend implements and that only does I/O. The orchestrator and consumer know nothing else of a backend.

Delivery model: ``open_receiver(queue)`` claims messages as :class:`Delivery` objects. A claimed message is
held (leased, or unacked) until exactly one of ``ack``, ``release``, ``retry`` or ``dead_letter`` settles it;
if its holder dies, the broker makes it ready again (after ``capabilities.lease_timeout`` on brokers with leases).
What a backend can do beyond the common contract is one frozen value, :class:`Capabilities`.
"""

from __future__ import annotations

import abc
import asyncio
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from mindtrace.jobs.clock import SYSTEM_CLOCK, Clock
from mindtrace.jobs.constants import (
    DLQ_SUFFIX,
    MAX_DELAY,
    MAX_PAYLOAD_BYTES,
    MAX_PRIORITY,
    MAX_QUEUE_NAME_LENGTH,
    MIN_PRIORITY,
    QUEUE_NAME_PATTERN,
    RESERVED_QUEUE_PREFIX,
)
from mindtrace.jobs.errors import (
    ClosedError,
    ConfigurationError,
    InvalidQueueNameError,
    PayloadTooLargeError,
    QueueNotFoundError,
    UsageError,
    WrongEventLoopError,
)
from mindtrace.jobs.lifecycle import StateUpdate

if TYPE_CHECKING:
    from mindtrace.jobs.schedules import ScheduleStore
    from mindtrace.jobs.state.base import StateStore

#: How a backend's schedule store makes each fire happen once (``Capabilities.schedules``): "atomic" (a
#: compare-and-set of the cursor with the publish, in one step, in any number of processes), "leader" (one
#: process at a time fires, holding a lease the broker ends with its connection) or "none".
ScheduleMode = Literal["atomic", "leader", "none"]


@dataclass(frozen=True)
class QueueOptions:
    """Options of a queue, fixed when it is first declared; declaring it again with others is an error.

    ``durable``: the queue and its messages survive a broker restart (where the broker persists at all).
    """

    durable: bool = True

    @classmethod
    def from_kwargs(cls, queue: str, options: dict[str, Any]) -> QueueOptions:
        """Build options from ``declare_queue(**options)``, naming any unknown option and the queue."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) {', '.join(unknown)} for queue {queue!r}; known: {', '.join(sorted(known))}"
            )
        if "durable" in options and not isinstance(options["durable"], bool):
            raise ConfigurationError(f"option durable for queue {queue!r} must be a bool")
        return cls(**options)


#: Distinct job priorities, ``MIN_PRIORITY`` to ``MAX_PRIORITY``.
PRIORITY_LEVELS = MAX_PRIORITY - MIN_PRIORITY + 1

#: How a backend can take one queued job out of its queue: ``"remove"`` deletes it where it waits,
#: ``"tombstone"`` can only mark it so the consumer drops it when it comes up, ``"none"``: neither.
QueuedJobRemoval = Literal["remove", "tombstone", "none"]

#: The counts :class:`QueueStats` holds; ``Capabilities.queue_counts`` says which a backend knows.
QueueCount = Literal["ready", "running", "delayed", "dead_lettered", "consumers"]
QUEUE_COUNTS: tuple[QueueCount, ...] = ("ready", "running", "delayed", "dead_lettered", "consumers")


@dataclass(frozen=True)
class Capabilities:
    """What one backend can do beyond the common contract; the consumer and the conformance suite read it.

    - ``lease_timeout``: seconds a claim stays valid without ``extend`` (the consumer renews it), or None
      when the broker tracks its consumers' liveness itself and holds a claim for as long as they live.
    - ``counted_deliveries``: ``Delivery.delivery_count`` counts every hand-out (True), or only flags a
      redelivery with 2 (False), in which case the consumer records each redelivery on the job.
    - ``exact_delays``: a delayed message (a delayed publish, a retry) becomes ready when its delay ends (True),
      or up to a bounded time later.
    - ``max_delay``: the longest delay honoured, in seconds (None: up to ``MAX_DELAY``, which every publish is
      checked against); longer ones are capped.
    - ``priority_levels``: distinct priorities kept in order (``MIN_PRIORITY`` .. ``MAX_PRIORITY``: 10).
    - ``queued_job_removal``: how one queued job can be taken out (see :data:`QueuedJobRemoval`).
    - ``can_list_queues``: whether ``list_queues`` works: the backend enumerates its queues (from the broker,
      or from a registry that ``declare_queue`` writes and ``delete_queue`` clears).
    - ``queue_counts``: which counts of :class:`QueueStats` the backend knows (a subset of
      :data:`QUEUE_COUNTS`); ``queue_stats`` gives None for the others. ``ready`` is always known.
    - ``shared_queues``: queues live in a broker that other clients and processes share, and outlive this
      client's ``close()`` (False for the in-process memory backend).
    - ``unique_job_ids``: a publish of a job id the queue already holds (ready, claimed, or waiting for a retry
      delay) is a no-op, so a publish sent twice queues the job once; once the job is acked, dead-lettered or
      purged, its id may be published again. False: every publish queues another copy.
    - ``job_records``: the backend has a job-state store of its own (``state_store()``), so an orchestrator over
      it keeps job records (status, results, cancel) by default. False: handles cannot be followed (their
      methods raise UsageError saying so) unless the orchestrator is given another store.
    - ``schedules``: how the backend's schedule store makes each fire of a schedule happen once, whatever the
      number of processes running schedules (see :data:`mindtrace.jobs.schedules.ScheduleMode`): "atomic"
      (a compare-and-set of the schedule's cursor and the publish in one step), "leader" (only the holder of
      a broker-held lease fires) or "none" (no schedules: ``schedule()`` raises UsageError).
    """

    lease_timeout: float | None
    counted_deliveries: bool
    exact_delays: bool
    max_delay: float | None
    priority_levels: int
    queued_job_removal: QueuedJobRemoval
    can_list_queues: bool
    shared_queues: bool
    unique_job_ids: bool
    job_records: bool
    queue_counts: frozenset[QueueCount] = frozenset({"ready"})
    schedules: ScheduleMode = "none"


@dataclass(frozen=True)
class QueueStats:
    """What one queue holds at one moment, counted by the broker (None: this backend cannot know it).

    - ``ready``: jobs waiting to be claimed (as ``count``);
    - ``running``: jobs claimed and not yet settled;
    - ``delayed``: jobs waiting for a delay (a delayed publish, a retry) to end before they are ready;
    - ``dead_lettered``: jobs in the queue's dead-letter queue (0 for a dead-letter queue itself);
    - ``consumers``: receivers subscribed to the queue, where the broker tracks them.

    The counts are read one after another, not in one snapshot on every broker: a job moving meanwhile may be
    counted twice or not at all.
    """

    queue: str
    ready: int
    running: int | None = None
    delayed: int | None = None
    dead_lettered: int | None = None
    consumers: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stats as a plain dict (for JSON), unknown counts as None."""
        return {"queue": self.queue, **{name: getattr(self, name) for name in QUEUE_COUNTS}}


@dataclass(frozen=True)
class OutgoingMessage:
    """One encoded job ready to publish: its bytes, priority and id (for errors and bookkeeping).

    ``resumes``: the message stands for a run that was cut short (a job given back, a lost run recorded), so a
    broker that re-publishes it should put it ahead of the jobs waiting at its priority, back where it was.
    ``state``: the job's record to write with it, for a backend whose own state store ``settles_with`` it
    (None otherwise, and on backends without one).
    ``headers``: the job's own ``headers`` (trace context), for a broker with message headers of its own to
    carry them there too (RabbitMQ); they are in ``body`` already, so every other backend ignores them. Empty
    costs nothing.
    ``delay``: seconds after the broker takes the message before it is ready to claim (0: at once); until then it
    is not counted as ready, not handed out, and counted in ``QueueStats.delayed`` where the backend counts it.
    """

    body: bytes
    priority: int
    job_id: str
    resumes: bool = False
    state: StateUpdate | None = None
    headers: Mapping[str, str] | None = None
    delay: float = 0.0


@dataclass(eq=False)
class Delivery:
    """A message claimed from a queue and held until it is settled.

    ``delivery_count`` is how many times the broker has handed this message out since it was last published
    or retried, this time included, as far as the broker can tell (1 when it cannot; 2 for any redelivery on
    a broker that only flags redeliveries). A released message does not count the claim it was released
    from. ``handle`` is the backend's own token (lease, delivery tag).

    ``started`` is True when the claim itself recorded the job's start (a backend whose own state store
    ``settles_with`` it, given the worker by ``open_receiver``): its record reads RUNNING, or, when
    ``cancel_reason`` is not None, the job was cancelled and is not to run (the reason, "" without one).
    ``claimed_at`` is when the claim was sent (event loop time; 0 when not stamped).
    """

    queue: str
    body: bytes
    priority: int
    handle: Any = field(repr=False)
    delivery_count: int = 1
    settled: bool = field(default=False, repr=False)
    started: bool = field(default=False, repr=False)
    cancel_reason: str | None = field(default=None, repr=False)
    claimed_at: float = field(default=0.0, repr=False)


class Receiver(abc.ABC):
    """Claims messages from one queue. Use as ``async with backend.open_receiver(q) as r``.

    Closing a receiver returns every message it claimed but did not hand out (prefetched ones) to the queue.

    ``get`` is a template, as the Backend's public methods are: it checks that the receiver and its backend
    are open and turns the timeout into a deadline once, then calls the ``_get`` primitive a backend
    implements, which only does I/O. A receiver's ``close`` sets ``_closed``.
    """

    def __init__(self, backend: Backend, queue: str) -> None:
        self._backend = backend
        self._queue = queue
        self._closed = False

    def _check_open(self) -> None:
        """ClosedError (or WrongEventLoopError) unless the backend is usable and this receiver is open."""
        self._backend._check_usable()
        if self._closed:
            raise ClosedError(f"receiver on queue {self._queue!r} is closed")

    async def get(self, timeout: float | None = None) -> Delivery | None:
        """Claim the next message, waiting up to ``timeout`` seconds (None: until one comes; 0: no wait).

        Waiting never polls: the call sleeps until the broker signals a message or the timeout passes.
        Returns None on timeout.
        """
        self._check_open()
        deadline = None if timeout is None else asyncio.get_running_loop().time() + max(0.0, timeout)
        return await self._get(deadline)

    @abc.abstractmethod
    async def _get(self, deadline: float | None) -> Delivery | None:
        """Primitive, I/O only: the next message, waiting until ``deadline`` (event loop time; None: no limit).

        A deadline already past means "no wait": take what is ready now. Returns None once the deadline passes.
        Called only on an open receiver; a primitive that waits checks ``_check_open()`` again after waiting.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop claiming and give back messages claimed but not handed out."""

    async def __aenter__(self) -> Receiver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()


def validate_queue_name(name: object) -> str:
    """Return ``name`` if it is a usable queue name, else raise InvalidQueueNameError saying why.

    Names are 1..200 characters of letters, digits, ``_``, ``-`` and ``.``, not starting with ``.`` or
    ``-``: no key separators, braces, globs or spaces, so that no two names can share broker keys. A name
    ending in ``.dlq`` may be longer by that suffix, so the dead-letter queue of every valid name is valid.
    Names starting with ``amq.`` are reserved by RabbitMQ and refused on every backend.
    """
    if not isinstance(name, str):
        raise InvalidQueueNameError(f"queue name must be a str, not {type(name).__name__}", queue=repr(name))
    if not name:
        raise InvalidQueueNameError("queue name is empty", queue=name)
    limit = MAX_QUEUE_NAME_LENGTH + (len(DLQ_SUFFIX) if name.endswith(DLQ_SUFFIX) else 0)
    if len(name) > limit:
        raise InvalidQueueNameError(
            f"queue name {name[:40]!r}... is {len(name)} characters long, over the limit of {limit}",
            queue=name[:40] + "...",
        )
    if not QUEUE_NAME_PATTERN.fullmatch(name):
        raise InvalidQueueNameError(
            f"queue name {name!r} may hold only letters, digits, '_', '-' and '.', and must not start with '.' or '-'",
            queue=name,
        )
    if name.startswith(RESERVED_QUEUE_PREFIX):
        raise InvalidQueueNameError(
            f"queue name {name!r} starts with {RESERVED_QUEUE_PREFIX!r}, a prefix RabbitMQ reserves", queue=name
        )
    return name


def dead_letter_queue_name(queue: str) -> str:
    """The dead-letter queue of ``queue`` (``queue.dlq``); a dead-letter queue is its own."""
    return queue if queue.endswith(DLQ_SUFFIX) else queue + DLQ_SUFFIX


class Backend(abc.ABC):
    """A queue broker driver. Every backend implements the ``_`` primitives; this class keeps the books.

    Guarantees every backend gives (and the conformance suite checks):
    - priority order: higher priority first, FIFO among equal priorities;
    - a claimed message is not handed to anyone else until settled, or its holder dies;
    - ``declare_queue`` is idempotent and also declares the queue's dead-letter queue;
    - ``count`` counts ready messages only (not claimed, not waiting for a retry delay).
    Where backends differ, ``capabilities`` says how.

    A backend is bound to the first event loop that uses it; use from another loop raises
    WrongEventLoopError.
    """

    #: URL schemes this backend answers to in ``from_url``.
    schemes: ClassVar[tuple[str, ...]] = ()

    #: What this backend can do; every backend declares it (a class attribute, or set in ``__init__`` when it
    #: depends on the configuration).
    capabilities: Capabilities

    #: The clock delays are measured on (see :mod:`mindtrace.jobs.clock`); brokers measure on their own server's
    #: clock, the in-memory backend on this one, which a test may replace with a FakeClock.
    clock: Clock = SYSTEM_CLOCK

    def __init__(self, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        if max_payload_bytes <= 0:
            raise ConfigurationError(f"max_payload_bytes must be positive, not {max_payload_bytes}")
        self.max_payload_bytes = max_payload_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._connect_lock: asyncio.Lock | None = None
        self._connected = False

    def state_store(self) -> StateStore:
        """This backend's own job-state store, the default of an orchestrator over it (made once)."""
        raise UsageError(
            f"{type(self).__name__} keeps no job records yet (capabilities.job_records is False): job status, "
            'results and cancellation need a state store: give the orchestrator one, e.g. state="redis://host:6379/0"'
        )

    def schedule_store(self) -> ScheduleStore:
        """This backend's schedule store (made once; see :mod:`mindtrace.jobs.schedules`)."""
        raise UsageError(f"{type(self).__name__} cannot run schedules (capabilities.schedules is 'none')")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Backend:
        """A backend configured from ``url``; each backend documents the URL form it takes."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a URL")

    # -- bookkeeping ---------------------------------------------------------------------------------

    def describe(self) -> str:
        """Where this backend points, for messages: ``scheme://host:port``, never a password."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"{self.describe()} is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise WrongEventLoopError(
                f"{self.describe()} is bound to the event loop it was first used on and was now used from "
                "another; create one backend per event loop (the blocking API runs all on one loop thread)"
            )

    async def _ensure_connected(self) -> None:
        self._check_usable()
        if self._connected:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if not self._connected:
                await self._connect()
                self._connected = True

    def _check_message(self, queue: str, message: OutgoingMessage) -> None:
        if len(message.body) > self.max_payload_bytes:
            raise PayloadTooLargeError(
                queue=queue, job_id=message.job_id, size=len(message.body), limit=self.max_payload_bytes
            )
        if not MIN_PRIORITY <= message.priority <= MAX_PRIORITY:
            raise ConfigurationError(
                f"priority {message.priority} of job {message.job_id!r} is outside {MIN_PRIORITY}..{MAX_PRIORITY}"
            )
        if not 0 <= message.delay <= MAX_DELAY:
            raise ConfigurationError(
                f"delay {message.delay!r}s of job {message.job_id!r} is outside 0..{MAX_DELAY:.0f}"
            )

    # -- public operations ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open connections now (otherwise the first operation does). Raises BackendUnavailableError."""
        await self._ensure_connected()

    async def close(self) -> None:
        """Close connections. Messages claimed and not settled return to their queues. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._connected:
            self._connected = False
            await self._close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    async def declare_queue(self, queue: str, options: QueueOptions | None = None) -> None:
        """Create ``queue`` and its dead-letter queue if missing, and note ``queue`` in the backend's registry of
        queues where it keeps one (see ``list_queues``). QueueConflictError if options differ."""
        validate_queue_name(queue)
        await self._ensure_connected()
        await self._declare_queue(queue, options or QueueOptions())
        dlq = dead_letter_queue_name(queue)
        if dlq != queue:
            await self._declare_queue(dlq, options or QueueOptions())
        await self._register_queue(queue)

    async def register_queue(self, queue: str) -> None:
        """Note ``queue``, found already declared, in the backend's registry of queues (see ``list_queues``):
        a queue declared by an earlier version, or by a process that kept no registry, is listed from then on."""
        validate_queue_name(queue)
        await self._ensure_connected()
        await self._register_queue(queue)

    async def queue_exists(self, queue: str) -> bool:
        """Whether ``queue`` has been declared (and not deleted)."""
        validate_queue_name(queue)
        await self._ensure_connected()
        return await self._queue_exists(queue)

    async def list_queues(self) -> list[str]:
        """The names of the queues declared on this backend, sorted; a queue's own dead-letter queue is left out
        (its jobs are counted in ``QueueStats.dead_lettered``). UsageError unless ``capabilities.can_list_queues``.

        On brokers that cannot enumerate queues, the names come from a registry that ``declare_queue`` writes
        (see each backend), so a queue created by other means, or by a version without the registry, is absent
        until it is declared again.
        """
        if not self.capabilities.can_list_queues:
            raise UsageError(f"{self.describe()} cannot list its queues (capabilities.can_list_queues is False)")
        await self._ensure_connected()
        names = set(await self._list_queues())
        return sorted(name for name in names if not (name.endswith(DLQ_SUFFIX) and name[: -len(DLQ_SUFFIX)] in names))

    async def queue_stats(self, queue: str) -> QueueStats:
        """The counts of ``queue`` (see QueueStats; unknown ones None, per ``capabilities.queue_counts``).
        QueueNotFoundError if undeclared. No job is claimed or changed; a backend may first do the upkeep its
        claims do (Redis moves retries that are due and jobs whose lease expired back to ready), so the counts
        are those a claim would see."""
        validate_queue_name(queue)
        await self._ensure_connected()
        return await self._queue_stats(queue)

    async def peek(self, queue: str, limit: int) -> list[bytes]:
        """The bodies of up to ``limit`` ready messages of ``queue``, in the order they would be claimed, without
        claiming or removing them. QueueNotFoundError if undeclared. How each broker reads without taking is
        documented on its ``_peek``; no message is lost, and none changes place among its priority. On RabbitMQ
        the peeked messages come back flagged redelivered, which a consumer charges as a lost run: the library
        peeks only dead-letter queues (``peek_dead_letters``), whose jobs are requeued with their attempts reset."""
        validate_queue_name(queue)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(f"limit must be an int >= 0, not {limit!r}")
        await self._ensure_connected()
        if limit == 0:
            if not await self._queue_exists(queue):
                raise QueueNotFoundError(queue)
            return []
        return await self._peek(queue, limit)

    async def publish(self, queue: str, message: OutgoingMessage) -> str:
        """Put one message on ``queue``. Returns once the broker holds it. QueueNotFoundError if undeclared.

        Returns the id the queue holds the job under: ``message.job_id``, or, for a unique job (its ``state``
        has a ``dedup_key``, given only to a backend whose own store ``settles_with`` it) whose key another
        live job of ``queue`` holds, that job's id; then nothing was queued or recorded (see
        ``StateStore.record_unique``).
        """
        validate_queue_name(queue)
        self._check_message(queue, message)
        await self._ensure_connected()
        held = await self._publish(queue, message)
        return message.job_id if held is None else held

    async def publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str]:
        """Put several messages on ``queue``; every one is checked before any is sent. Returns the ids the queue
        holds them under, in order (as ``publish``)."""
        validate_queue_name(queue)
        for message in messages:
            self._check_message(queue, message)
        if not messages:
            return []
        await self._ensure_connected()
        held = await self._publish_many(queue, messages)
        return [message.job_id for message in messages] if held is None else list(held)

    async def open_receiver(self, queue: str, *, prefetch: int = 1, worker: str | None = None) -> Receiver:
        """A receiver claiming from ``queue``, holding at most ``prefetch`` unsettled messages ahead.

        ``worker``: the consumer the claims are for, given by an orchestrator whose state store this backend
        writes itself (``settles_with``): a backend that can records each job's start in its claim (see
        ``Delivery.started``); others ignore it.
        """
        validate_queue_name(queue)
        if prefetch < 1:
            raise ConfigurationError(f"prefetch must be at least 1, not {prefetch}")
        await self._ensure_connected()
        return await self._open_receiver(queue, prefetch, worker)

    async def ack(self, delivery: Delivery, *, state: StateUpdate | None = None) -> None:
        """Settle: the job is done and leaves the broker. LeaseLostError if the lease went elsewhere.

        ``state`` (every settle verb takes it): the job's record to write in the same step, for a backend whose
        own state store ``settles_with`` it; others are never given one.
        """
        self._settle(delivery)
        await self._ack(delivery, state)

    async def release(self, delivery: Delivery, *, state: StateUpdate | None = None) -> None:
        """Settle: give the message back to its queue unchanged, at its place, ready at once."""
        self._settle(delivery)
        await self._release(delivery, state)

    async def retry(
        self, delivery: Delivery, message: OutgoingMessage, delay: float, *, state: StateUpdate | None = None
    ) -> None:
        """Settle: replace the message with ``message`` (attempts updated), ready again after ``delay`` s."""
        self._check_message(delivery.queue, message)
        self._settle(delivery)
        await self._retry(delivery, message, max(0.0, delay), state)

    async def dead_letter(
        self, delivery: Delivery, message: OutgoingMessage, *, state: StateUpdate | None = None
    ) -> None:
        """Settle: put ``message`` (error recorded) on the dead-letter queue, then drop the original."""
        self._settle(delivery)
        await self._dead_letter(delivery, dead_letter_queue_name(delivery.queue), message, state)

    async def extend(self, delivery: Delivery, seconds: float) -> bool:
        """Keep the claim for ``seconds`` more (a no-op on brokers without leases). Returns whether the
        backend's own state store holds a cancel request for the job (a fallback for a missed cancel signal)."""
        if not delivery.settled:
            return await self._extend(delivery, seconds)
        return False

    async def count(self, queue: str) -> int:
        """Number of messages ready to be claimed. QueueNotFoundError if undeclared."""
        validate_queue_name(queue)
        await self._ensure_connected()
        return await self._count(queue)

    async def purge(self, queue: str) -> int:
        """Remove every ready message; returns how many. Claimed messages are not touched."""
        validate_queue_name(queue)
        await self._ensure_connected()
        return await self._purge(queue)

    async def delete_queue(self, queue: str) -> None:
        """Remove ``queue``, its dead-letter queue and every message in them. Missing queues are fine."""
        validate_queue_name(queue)
        await self._ensure_connected()
        await self._delete_queue(queue)
        dlq = dead_letter_queue_name(queue)
        if dlq != queue:
            await self._delete_queue(dlq)
        await self._unregister_queue(queue)

    def _settle(self, delivery: Delivery) -> None:
        self._check_usable()
        if delivery.settled:
            raise UsageError(f"a message from queue {delivery.queue!r} was settled twice")
        delivery.settled = True

    # -- primitives: I/O only ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _connect(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    @abc.abstractmethod
    async def _declare_queue(self, queue: str, options: QueueOptions) -> None: ...

    @abc.abstractmethod
    async def _queue_exists(self, queue: str) -> bool: ...

    @abc.abstractmethod
    async def _publish(self, queue: str, message: OutgoingMessage) -> str | None:
        """Queue one message; the id it is held under when that is not its own (see ``publish``), else None."""

    async def _publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> Sequence[str] | None:
        """Queue several; the ids they are held under, in order (None: each under its own)."""
        held = [await self._publish(queue, message) for message in messages]
        return [m.job_id if h is None else h for m, h in zip(messages, held, strict=True)]

    @abc.abstractmethod
    async def _open_receiver(self, queue: str, prefetch: int, worker: str | None = None) -> Receiver: ...

    @abc.abstractmethod
    async def _ack(self, delivery: Delivery, state: StateUpdate | None = None) -> None: ...

    @abc.abstractmethod
    async def _release(self, delivery: Delivery, state: StateUpdate | None = None) -> None: ...

    @abc.abstractmethod
    async def _retry(
        self, delivery: Delivery, message: OutgoingMessage, delay: float, state: StateUpdate | None = None
    ) -> None: ...

    @abc.abstractmethod
    async def _dead_letter(
        self, delivery: Delivery, dead_letter_queue: str, message: OutgoingMessage, state: StateUpdate | None = None
    ) -> None: ...

    async def _extend(self, delivery: Delivery, seconds: float) -> bool:
        return False

    @abc.abstractmethod
    async def _count(self, queue: str) -> int: ...

    @abc.abstractmethod
    async def _purge(self, queue: str) -> int: ...

    @abc.abstractmethod
    async def _delete_queue(self, queue: str) -> None: ...

    async def _register_queue(self, queue: str) -> None:
        """Primitive: note ``queue`` in the backend's registry of queues (a no-op where the broker lists them)."""
        return None

    async def _unregister_queue(self, queue: str) -> None:
        """Primitive: drop ``queue`` from the backend's registry of queues (a no-op where there is none)."""
        return None

    @abc.abstractmethod
    async def _list_queues(self) -> list[str]:
        """Primitive: every declared queue name, dead-letter queues included (the public method filters)."""

    @abc.abstractmethod
    async def _queue_stats(self, queue: str) -> QueueStats:
        """Primitive: the counts of ``queue``; QueueNotFoundError if it does not exist."""

    @abc.abstractmethod
    async def _peek(self, queue: str, limit: int) -> list[bytes]:
        """Primitive: up to ``limit`` (>= 1) ready bodies in claim order, none claimed or moved."""
