"""AsyncOrchestrator: the one implementation of queue operations, schema registration and routing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import types
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

from mindtrace.jobs.backends import from_url
from mindtrace.jobs.backends.base import (
    Backend,
    Delivery,
    OutgoingMessage,
    QueueOptions,
    QueueStats,
    Receiver,
    dead_letter_queue_name,
    validate_queue_name,
)
from mindtrace.jobs.clock import delay_of
from mindtrace.jobs.constants import CLOSE_GRACE, DLQ_SUFFIX, MAX_DELAY, MAX_RESULT_BYTES, RESULT_TTL
from mindtrace.jobs.errors import (
    ClosedError,
    ConfigurationError,
    DecodeError,
    JobValidationError,
    PayloadTooLargeError,
    QueueError,
    QueueNotFoundError,
    UsageError,
)
from mindtrace.jobs.handle import AsyncJobHandle
from mindtrace.jobs.hooks import (
    Hook,
    PublishEvent,
    around,
    awake,
    broker_name,
    check_hooks,
    notify_settled,
    settle_event,
)
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, Progress, StateUpdate
from mindtrace.jobs.policy import Action, Outcome, requeued, retry_refused, undecodable
from mindtrace.jobs.schedules import (
    SCHEDULE_REFRESH,
    MisfirePolicy,
    ScheduleInfo,
    Scheduler,
    ScheduleSpec,
    ScheduleState,
    ScheduleStore,
    info_of,
    make_spec,
)
from mindtrace.jobs.state import StateStore, state_store_from_url
from mindtrace.jobs.types import QUEUE_MAPPING, Job, JobOutput, JobSchema
from mindtrace.jobs.unique import Unique, unique_of
from mindtrace.jobs.wire import SchemaTypes, check_against, decode, encode

if TYPE_CHECKING:
    from mindtrace.jobs.consumer import AsyncConsumer

logger = logging.getLogger("mindtrace.jobs")


def outgoing(
    job: Job, *, resumes: bool = False, state: StateUpdate | None = None, delay: float = 0.0
) -> OutgoingMessage:
    """The encoded form of ``job``, ready for a backend (``resumes``, ``state``, ``delay``: see OutgoingMessage)."""
    return OutgoingMessage(encode(job), job.priority, job.id, resumes, state, job.headers or None, delay)


def _queued(job: Job, delay: float = 0.0, unique: Unique | None = None) -> StateUpdate:
    """The record a publish starts: QUEUED (SCHEDULED with a delay), with the schema name so readers can type
    the output, and the unique key the job holds, if any."""
    not_after = None if job.expires_at is None else job.expires_at.timestamp()
    return StateUpdate(
        job.id,
        JobStatus.SCHEDULED if delay > 0 else JobStatus.QUEUED,
        attempts=job.attempts,
        schema=job.payload.name,
        kind="published",
        not_after=not_after,
        dedup_key=None if unique is None else unique.key,
        dedup_ttl=None if unique is None else unique.ttl,
    )


class AsyncOrchestrator:
    """Declares queues, registers job schemas, publishes and receives jobs over one backend.

    ``backend`` is a Backend instance (``LocalClient()``, ``RedisClient(...)``, ``RabbitMQClient(...)``) or a
    URL (``memory://``, ``redis://host:6379/0``, ``amqp://user:pass@host/vhost``). Use as ``async with``, or
    call ``close()``: closing the orchestrator stops the consumers connected to it, then closes its backend
    and its state store.

    Job records (status, results, cancel): ``state`` is where they live: None (the default) for the
    backend's own store, a :class:`StateStore`, a URL (``redis://...``: a Redis store for any broker), or
    False for none (then ``publish`` returns handles that cannot be followed). ``result_ttl``: seconds a
    finished job's record is kept (per queue with ``declare_queue(q, result_ttl=...)``); ``max_result_bytes``:
    the largest output kept, over which the run is recorded as failed with ResultTooLargeError.

    ``hooks``: :class:`~mindtrace.jobs.hooks.Hook` instances called around every publish, every run of a consumer
    connected here and every settle (metrics, traces); None for the defaults (``hooks.default_hooks()``: a
    tracing hook when OpenTelemetry is installed, else none).
    """

    def __init__(
        self,
        backend: Backend | str,
        *,
        state: StateStore | str | bool | None = None,
        result_ttl: float = RESULT_TTL,
        max_result_bytes: int = MAX_RESULT_BYTES,
        hooks: Sequence[Hook] | None = None,
    ) -> None:
        self.backend: Backend = from_url(backend) if isinstance(backend, str) else backend
        if not isinstance(self.backend, Backend):
            raise JobValidationError(f"backend must be a Backend or a URL, not {type(backend).__name__}")
        if not (isinstance(result_ttl, (int, float)) and result_ttl > 0) or isinstance(result_ttl, bool):
            raise ConfigurationError(f"result_ttl must be a number of seconds > 0, not {result_ttl!r}")
        if isinstance(max_result_bytes, bool) or not isinstance(max_result_bytes, int) or max_result_bytes <= 0:
            raise ConfigurationError(f"max_result_bytes must be an int > 0, not {max_result_bytes!r}")
        if state is True:
            state = None
        if not (state is None or state is False or isinstance(state, (str, StateStore))):
            raise ConfigurationError(f"state must be a StateStore, a URL, None or False, not {type(state).__name__}")
        self._state_option: StateStore | str | bool | None = state
        self._state: StateStore | None = None
        self.result_ttl = float(result_ttl)
        self.max_result_bytes = max_result_bytes
        self._result_ttls: dict[str, float] = {}
        self._schemas: dict[str, SchemaTypes] = {}
        # Queues this orchestrator declared or saw, with the options to declare them again if the broker
        # loses them (a Redis restart without persistence); a cache, so checked again on QueueNotFoundError.
        self._known_queues: dict[str, QueueOptions] = {}
        self._consumers: weakref.WeakSet[AsyncConsumer] = weakref.WeakSet()
        # The tasks running run_schedules here, with their loops: stop_schedules() (and close()) ends them.
        self._schedulers: dict[asyncio.Task[Any], Scheduler] = {}
        self._closed = False
        #: The hooks called around publishes, runs and settles, here and in the consumers connected here.
        self.hooks: tuple[Hook, ...] = check_hooks(hooks)

    def __repr__(self) -> str:
        return f"<AsyncOrchestrator {self.backend.describe()}>"

    @property
    def schemas(self) -> Mapping[str, SchemaTypes]:
        """The schemas registered with this orchestrator, by name."""
        return types.MappingProxyType(self._schemas)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"orchestrator on {self.backend.describe()} is closed")

    # -- job records --------------------------------------------------------------------------------

    @property
    def records(self) -> bool:
        """Whether this orchestrator keeps job records (``state`` is not False)."""
        option = self._state_option
        if option is False:
            return False
        return option is not None or self.backend.capabilities.job_records

    @property
    def state(self) -> StateStore:
        """The state store of this orchestrator's job records (made on first use); UsageError with
        ``state=False``, or over a backend without a store of its own (``capabilities.job_records``)."""
        if self._state is None:
            option = self._state_option
            if option is False:
                raise UsageError("this orchestrator keeps no job records (state=False): status and results are off")
            if isinstance(option, StateStore):
                self._state = option
            elif isinstance(option, str):
                self._state = state_store_from_url(option)
            else:
                self._state = self.backend.state_store()
        return self._state

    def _fused(self) -> bool:
        """Whether the backend writes the records itself, inside its publish and settle steps."""
        return self.state.settles_with(self.backend)

    def result_ttl_for(self, queue: str) -> float:
        """Seconds a finished job's record of ``queue`` is kept (the queue's own, else the orchestrator's)."""
        return self._result_ttls.get(queue, self.result_ttl)

    def output_type(self, schema: str | None) -> type[JobOutput] | None:
        """The output class registered here for ``schema``, or None."""
        types = None if schema is None else self._schemas.get(schema)
        return None if types is None else types.output_type

    def job(self, job_id: str, queue: str) -> AsyncJobHandle:
        """A handle on the job ``job_id`` of ``queue``, published by any process (no I/O until used)."""
        self._check_open()
        if not isinstance(job_id, str) or not job_id:
            raise JobValidationError(f"job id must be a non-empty str, not {job_id!r}")
        return AsyncJobHandle(job_id, validate_queue_name(queue), self)

    async def job_info(self, job_id: str, queue: str) -> JobInfo:
        """The record of job ``job_id`` on ``queue`` (status UNKNOWN when there is none)."""
        self._check_open()
        return await self.state.info(validate_queue_name(queue), job_id)

    async def wait_for(self, job_id: str, queue: str, timeout: float | None = None) -> JobInfo:
        """The record of job ``job_id`` once it is terminal (or UNKNOWN); ResultTimeoutError after ``timeout``."""
        self._check_open()
        if timeout is not None and not timeout >= 0:
            raise ConfigurationError(f"timeout must be None or a number of seconds >= 0, not {timeout!r}")
        return await self.state.wait(validate_queue_name(queue), job_id, timeout)

    async def cancel(self, job_id: str, queue: str, *, reason: str | None = None) -> CancelOutcome:
        """Cancel job ``job_id`` of ``queue``: CANCELLED (it had not started and never will), CANCELLING (it
        runs; its consumer was signalled: ``wait()`` tells the end), ALREADY_FINISHED (record intact) or
        NOT_FOUND. A cancel holds while no consumer runs. A cancelled job is never retried or dead-lettered."""
        self._check_open()
        return await self.state.cancel(validate_queue_name(queue), job_id, reason)

    async def record_started(self, queue: str, job: Job, worker: str) -> str | None:
        """For the consumer: ``job`` started running on ``worker`` (its record becomes RUNNING); then the
        reason of a cancel of it ("" without one) if it was cancelled, else None (``StateStore.started``)."""
        if not self.records:
            return None
        if queue.endswith(DLQ_SUFFIX):  # a dead-letter queue's jobs keep no records of their own
            return await self.state.cancel_requested(queue, job.id)
        update = StateUpdate(job.id, JobStatus.RUNNING, attempts=job.attempts + 1, worker=worker)
        return await self.state.started(queue, update)

    async def record_progress(self, queue: str, job_id: str, progress: Progress) -> None:
        """For the consumer: the latest progress of a running job."""
        if self.records:
            await self.state.record(queue, StateUpdate(job_id, JobStatus.RUNNING, progress=progress, kind="progress"))

    def _settle_record(self, delivery: Delivery, outcome: Outcome) -> StateUpdate | None:
        """The record a settle writes, or None (no records, a dead-letter queue's own jobs)."""
        queue, job = delivery.queue, outcome.job
        action = outcome.action
        if not outcome.record or not self.records or queue.endswith(DLQ_SUFFIX) or action is Action.RUN:
            return None
        status = outcome.becomes
        if action is Action.ACK:
            if status is JobStatus.UNKNOWN:
                return StateUpdate(job.id, JobStatus.UNKNOWN, kind="withdrawn")
            runs = job.attempts + 1 if status is JobStatus.SUCCEEDED else job.attempts
            return StateUpdate(
                job.id,
                status,
                attempts=runs,
                output=outcome.output,
                schema=job.payload.name,
                reason=outcome.reason if status is JobStatus.CANCELLED else None,
                ttl=self.result_ttl_for(queue),
            )
        if status is JobStatus.QUEUED:  # given back, or a lost run handed back
            return StateUpdate(job.id, status, attempts=job.attempts)
        if status is JobStatus.RETRYING:
            return StateUpdate(job.id, status, attempts=job.attempts, error=job.error)
        if status is JobStatus.FAILED:
            return StateUpdate(job.id, status, attempts=job.attempts, error=job.error, ttl=self.result_ttl_for(queue))
        return None

    async def register(self, schema: JobSchema) -> str:
        """Remember ``schema``'s types and declare a queue named after it; returns the queue name.

        Jobs of this schema received through this orchestrator (or a consumer connected to it) come back
        with ``payload.input`` as the schema's input class. Registering a name again replaces its types.
        """
        self._check_open()
        if not isinstance(schema, JobSchema):
            raise JobValidationError(f"register() takes a JobSchema, not {type(schema).__name__}")
        await self.ensure_queue(schema.name)
        self._schemas[schema.name] = SchemaTypes.of(schema)
        return schema.name

    async def declare_queue(self, queue_name: str, *, result_ttl: float | None = None, **options: Any) -> None:
        """Create ``queue_name`` (and its ``.dlq``) if missing. Idempotent; other options than the existing
        ones raise QueueConflictError. Options: ``durable`` (default True). ``result_ttl``: seconds the
        records of this queue's finished jobs are kept when a consumer through this orchestrator settles
        them (default: the orchestrator's ``result_ttl``)."""
        self._check_open()
        if result_ttl is not None:
            if isinstance(result_ttl, bool) or not isinstance(result_ttl, (int, float)) or not result_ttl > 0:
                raise ConfigurationError(f"result_ttl of queue {queue_name!r} must be seconds > 0, not {result_ttl!r}")
            self._result_ttls[queue_name] = float(result_ttl)
        queue_options = QueueOptions.from_kwargs(queue_name, options)
        await self.backend.declare_queue(queue_name, queue_options)
        self._known_queues[queue_name] = queue_options

    async def ensure_queue(self, queue_name: str, *, refresh: bool = False) -> bool:
        """Declare ``queue_name`` unless it already exists (whatever its options); whether it declared it.

        A queue this orchestrator knows exists is not checked again, unless ``refresh`` (the broker said it
        is gone); one it declared before is declared again with the options it had then, others with defaults.
        """
        self._check_open()
        if queue_name in self._known_queues and not refresh:
            return False
        declared = False
        missing = not await self.backend.queue_exists(queue_name)
        if refresh and not missing:  # lost with its dead-letter queue, or declared again only halfway
            dlq = dead_letter_queue_name(queue_name)
            missing = dlq != queue_name and not await self.backend.queue_exists(dlq)
        if missing:
            options = self._known_queues.get(queue_name, QueueOptions())
            await self.backend.declare_queue(queue_name, options)
            declared = True
        elif queue_name not in self._known_queues:
            await self.backend.register_queue(queue_name)  # once per orchestrator: listed by list_queues
        self._known_queues.setdefault(queue_name, QueueOptions())
        return declared

    @overload
    async def publish(
        self,
        queue_name: str,
        job: Job,
        /,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> AsyncJobHandle: ...

    @overload
    async def publish(
        self,
        job: Job,
        /,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> AsyncJobHandle: ...

    async def publish(
        self,
        queue_or_job: str | Job,
        job: Job | None = None,
        /,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> AsyncJobHandle:
        """Queue ``job`` on ``queue_name``, or on ``QUEUE_MAPPING[job.job_type]`` when called as
        ``publish(job)`` (that queue is declared if missing). Returns the job id once the broker holds it, as
        an :class:`AsyncJobHandle` (a ``str`` equal to the id, with ``status()``, ``result()``, ``cancel()``...);
        the job's record reads QUEUED from then on.

        A delayed job: ``delay`` (seconds, or a timedelta) or ``run_at`` (a timezone-aware datetime) holds it on
        the broker until then, up to ``MAX_DELAY`` (two years): meanwhile it is SCHEDULED, not counted as
        ready and not received, and ``cancel()`` means it never runs. JobValidationError naming the field for a
        naive datetime, a negative or too long delay, or both options at once.

        A unique job: with ``dedup_key``, while a job published with that key on this queue is queued,
        scheduled, running or retrying (and, given ``dedup_ttl`` seconds or a timedelta, for at most that long
        after its publish), the publish queues nothing and returns that job's handle; once the job ends
        (succeeded, failed, cancelled, expired) or the TTL passes, the key is free and the next publish queues
        a new job. Keys are per queue. Exact (one atomic insert-if-absent: of concurrent publishes of a key,
        one queues a job) or best effort as ``state.capabilities.dedup`` says. Needs job records (UsageError
        with ``state=False``); JobValidationError naming ``dedup_key`` or ``dedup_ttl`` for an empty, non-str or
        over-long key (``MAX_DEDUP_KEY_LENGTH``), a TTL that is not a finite number > 0, or a TTL without a key.

        QueueNotFoundError when a named queue was never declared, or the broker lost it (``lost``: deleted
        elsewhere, or a broker restart without persistence; an auto-routed queue is declared again instead and
        the publish retried once); PayloadTooLargeError over the size limit;
        JobValidationError, naming the schema and the field, when the job's schema is registered here and its
        input does not validate against it (a receiver would dead-letter it). Nothing is sent on an error.
        """
        self._check_open()
        seconds = delay_of(delay, run_at, self.backend.clock, limit=MAX_DELAY)
        unique = unique_of(dedup_key, dedup_ttl)
        if unique is not None and not self.records:
            raise UsageError("unique jobs (dedup_key) need job records: this orchestrator keeps none (state=False)")
        routed = isinstance(queue_or_job, Job) and job is None
        queue, job = await self._route(queue_or_job, job)
        hooks = awake(self.hooks) if self.hooks else None
        if hooks:
            event = PublishEvent(queue, job, broker_name(self.backend))
            manager = around([hook.publish(event) for hook in hooks])
            if manager is not None:
                with manager:
                    return await self._publish(queue, job, routed, seconds, unique)
        return await self._publish(queue, job, routed, seconds, unique)

    async def _publish(
        self, queue: str, job: Job, routed: bool, delay: float, unique: Unique | None = None
    ) -> AsyncJobHandle:
        record = _queued(job, delay, unique) if self.records else None
        fused = record is not None and self._fused()
        message = outgoing(job, state=record if fused else None, delay=delay)
        if record is not None and not fused:
            # Before the broker holds it: QUEUED precedes RUNNING. A unique job's key is taken here, with it.
            if unique is None:
                await self.state.record(queue, record)
            else:
                holder = await self.state.record_unique(queue, record)
                if holder != job.id:
                    return AsyncJobHandle(holder, queue, self)
        try:
            try:
                held = await self.backend.publish(queue, message)
            except QueueNotFoundError:
                if not routed:
                    raise self._lost(queue) from None
                # Auto-routing owns its queue: the broker lost it (a restart without persistence), declare it again.
                if await self.ensure_queue(queue, refresh=True):
                    logger.warning("auto-routed queue %r was gone from the broker: declared it again", queue)
                held = await self.backend.publish(queue, message)
        except BaseException:
            if record is not None and not fused:
                await self._withdraw(queue, [job.id])
            raise
        return AsyncJobHandle(held, queue, self)

    async def _withdraw(self, queue: str, job_ids: Sequence[str]) -> None:
        """A publish failed after its QUEUED records were written: forget them (best effort, logged)."""
        try:
            await self.state.record_many(queue, [StateUpdate(i, JobStatus.UNKNOWN, kind="withdrawn") for i in job_ids])
        except Exception as exc:
            logger.warning(
                "could not withdraw the records of %d job(s) whose publish to %r failed: %s", len(job_ids), queue, exc
            )

    async def publish_many(
        self,
        queue_name: str,
        jobs: Sequence[Job],
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_keys: Sequence[str | None] | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> list[AsyncJobHandle]:
        """Queue several jobs on ``queue_name``; all are validated (as in ``publish``) and encoded before any is
        sent. Returns their handles, in order. ``delay`` or ``run_at`` (as in ``publish``) applies to each.

        ``dedup_keys``: one ``dedup_key`` (or None) per job, as in ``publish``, with ``dedup_ttl`` for each keyed
        job: a job whose key is held (by an earlier job, or one earlier in the list) is not queued, and its
        handle is the holder's."""
        self._check_open()
        seconds = delay_of(delay, run_at, self.backend.clock, limit=MAX_DELAY)
        validate_queue_name(queue_name)
        checked = [self._check_job(job) for job in jobs]
        uniques = self._uniques(len(checked), dedup_keys, dedup_ttl)
        hooks = awake(self.hooks) if self.hooks else None
        if hooks:
            broker = broker_name(self.backend)
            events = [PublishEvent(queue_name, job, broker) for job in checked]
            manager = around([hook.publish(event) for event in events for hook in hooks])
            if manager is not None:
                with manager:
                    return await self._publish_many(queue_name, checked, seconds, uniques)
        return await self._publish_many(queue_name, checked, seconds, uniques)

    def _uniques(
        self, count: int, dedup_keys: Sequence[str | None] | None, dedup_ttl: float | timedelta | None
    ) -> list[Unique | None]:
        """The unique keys of ``publish_many``'s jobs, checked (as in ``publish``), one per job."""
        if dedup_keys is None:
            unique_of(None, dedup_ttl)  # a TTL without keys is refused
            return [None] * count
        if isinstance(dedup_keys, str) or not isinstance(dedup_keys, Sequence) or len(dedup_keys) != count:
            raise JobValidationError(
                f"dedup_keys must be a sequence of one key (or None) per job ({count})", field="dedup_keys"
            )
        uniques = [None if key is None else unique_of(key, dedup_ttl) for key in dedup_keys]
        if any(uniques) and not self.records:
            raise UsageError("unique jobs (dedup_keys) need job records: this orchestrator keeps none (state=False)")
        return uniques

    async def _publish_many(
        self, queue_name: str, checked: list[Job], delay: float, uniques: list[Unique | None]
    ) -> list[AsyncJobHandle]:
        records = [_queued(job, delay, uniques[i]) for i, job in enumerate(checked)] if self.records else None
        fused = records is not None and self._fused()
        messages = [
            outgoing(job, state=records[i] if records is not None and fused else None, delay=delay)
            for i, job in enumerate(checked)
        ]
        holders: dict[int, str] = {}  # a unique job kept out by its key's holder (a store not fused with the broker)
        if records and not fused:
            plain = [r for r, u in zip(records, uniques, strict=True) if u is None]
            if plain:
                await self.state.record_many(queue_name, plain)
            for i, record in enumerate(records):
                if uniques[i] is not None:
                    holder = await self.state.record_unique(queue_name, record)
                    if holder != record.job_id:
                        holders[i] = holder
        sent = [m for i, m in enumerate(messages) if i not in holders]
        recorded = [m.job_id for m in sent]
        try:
            held = iter(await self.backend.publish_many(queue_name, sent))
        except QueueNotFoundError:
            if records and not fused:
                await self._withdraw(queue_name, recorded)
            raise self._lost(queue_name) from None
        except BaseException:
            if records and not fused:
                await self._withdraw(queue_name, recorded)
            raise
        return [
            AsyncJobHandle(holders[i] if i in holders else next(held), queue_name, self) for i in range(len(messages))
        ]

    def _lost(self, queue: str) -> QueueNotFoundError:
        """The error for a publish the broker refused as to a missing queue, saying if it was lost."""
        return QueueNotFoundError(queue, lost=self._known_queues.pop(queue, None) is not None)

    async def _route(self, queue_or_job: str | Job, job: Job | None) -> tuple[str, Job]:
        if isinstance(queue_or_job, Job) and job is None:
            queue = QUEUE_MAPPING[queue_or_job.job_type]
            self._check_job(queue_or_job)
            await self.ensure_queue(queue)
            return queue, queue_or_job
        if not isinstance(queue_or_job, str):
            raise JobValidationError(
                f"publish() takes (queue_name, job) or (job), not ({type(queue_or_job).__name__}, ...)"
            )
        return validate_queue_name(queue_or_job), self._check_job(job)

    def _check_job(self, job: object) -> Job:
        if not isinstance(job, Job):
            raise JobValidationError(f"expected a Job, not {type(job).__name__}")
        types = self._schemas.get(job.payload.name)
        if types is not None:
            check_against(job, types)
        return job

    def decode(self, raw: bytes, queue: str | None = None) -> Job:
        """Rebuild a job from bytes with this orchestrator's registered schemas (DecodeError if not a job)."""
        return decode(raw, self._schemas, queue=queue)

    async def open_receiver(self, queue_name: str, *, prefetch: int = 1, worker: str | None = None) -> Receiver:
        """A receiver on ``queue_name``: the consumer's low-level claim API.

        A queue that does not exist is declared, so workers may start before producers, with a warning naming
        it: a consumer of a misspelt queue would otherwise wait forever in silence. ``worker``: the consumer's
        id, for a backend that records a job's start in its claim (records on, written by the backend).
        """
        if await self.ensure_queue(queue_name):
            logger.warning(
                "queue %r did not exist: declared it for its consumer (jobs arrive once producers publish to "
                "it; check the name if none will)",
                queue_name,
            )
        starts = worker if self.records and self._fused() and not queue_name.endswith(DLQ_SUFFIX) else None
        return await self.backend.open_receiver(queue_name, prefetch=prefetch, worker=starts)

    async def receive_message(self, queue_name: str, timeout: float | None = None) -> Job | None:
        """Take the next job off ``queue_name`` and hand it over (it leaves the queue), or None.

        ``timeout``: None or 0 returns at once when nothing is ready; a positive number waits up to that many
        seconds (``math.inf``: until a job comes). A message that is not a job is moved to the dead-letter
        queue and skipped. For at-least-once processing use a Consumer instead.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        wait = 0.0 if timeout is None else timeout
        deadline = loop.time() + wait
        async with await self.backend.open_receiver(queue_name, prefetch=1) as receiver:
            while True:
                remaining = None if math.isinf(wait) else max(0.0, deadline - loop.time())
                delivery = await receiver.get(remaining)
                if delivery is None:
                    return None
                try:
                    job = self.decode(delivery.body, queue_name)
                except DecodeError as exc:
                    await self.settle(delivery, undecodable(exc))
                    continue
                # Handed out of the library's hands: its record is forgotten (the caller owns the outcome).
                await self.settle(delivery, Outcome(Action.ACK, job, status=JobStatus.UNKNOWN))
                return job

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Settle a claimed ``delivery`` with the one backend verb ``outcome`` names, and log why.

        A retry the backend refuses as too large (its recorded error grew the job past the size limit) is
        dead-lettered instead. Backend errors propagate; the message then stays with the broker.
        """
        hooks = awake(self.hooks) if self.hooks else None
        if not hooks:
            await self._settle(delivery, outcome)
            return
        try:
            outcome = await self._settle(delivery, outcome)
        except Exception as exc:
            notify_settled(hooks, settle_event(delivery.queue, outcome, exc))
            raise
        notify_settled(hooks, settle_event(delivery.queue, outcome, None))

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> Outcome:
        """Settle as ``outcome`` says; the outcome settled (a refused retry is dead-lettered instead)."""
        backend, job, queue = self.backend, outcome.job, delivery.queue
        action = outcome.action
        record = self._settle_record(delivery, outcome)
        if record is not None and not self._fused():
            # Before the broker settles: a crash in between runs the job again, and the first terminal record
            # stands (the consumer then settles the redelivery unrun).
            await self.state.record(queue, record)
            record = None
        if action is Action.ACK:
            await backend.ack(delivery, state=record)
        elif action is Action.RELEASE:
            await backend.release(delivery, state=record)
        elif action is Action.RETRY:
            if outcome.resumes:
                logger.info("job %s from %r was redelivered: %s, handed back", job.id, queue, outcome.reason)
            else:
                logger.info(
                    "job %s from %r failed (attempt %d), retrying in %.2fs: %s",
                    job.id,
                    queue,
                    job.attempts,
                    outcome.delay,
                    outcome.reason,
                )
            try:
                await backend.retry(delivery, outgoing(job, resumes=outcome.resumes), outcome.delay, state=record)
            except PayloadTooLargeError as exc:  # refused before anything was settled
                return await self._settle(delivery, retry_refused(outcome, exc))
        elif action is Action.DEAD_LETTER:
            logger.warning("dead-lettering job %s from %r: %s", job.id, queue, outcome.reason)
            await backend.dead_letter(delivery, outgoing(job), state=record)
        else:
            raise UsageError(f"{action} is not a settle verb")
        return outcome

    async def count_queue_messages(self, queue_name: str) -> int:
        """Number of jobs ready to run on ``queue_name`` (not those running or waiting for a retry)."""
        self._check_open()
        return await self.backend.count(queue_name)

    async def list_queues(self) -> list[str]:
        """The queues declared on the broker, sorted, without their own dead-letter queues (see
        ``Backend.list_queues``: on RabbitMQ, from the registry ``declare_queue`` writes)."""
        self._check_open()
        return await self.backend.list_queues()

    async def queue_stats(self, queue_name: str) -> QueueStats:
        """The counts of ``queue_name``: ready, running, delayed, dead-lettered, consumers (None where the
        backend cannot know one: ``backend.capabilities.queue_counts``). QueueNotFoundError if undeclared."""
        self._check_open()
        return await self.backend.queue_stats(queue_name)

    async def peek_dead_letters(self, queue_name: str, limit: int = 10) -> list[Job]:
        """Up to ``limit`` jobs of ``queue_name``'s dead-letter queue, oldest first within a priority, left
        where they are (``Backend.peek``). Messages that are not jobs are skipped (logged)."""
        self._check_open()
        dlq = dead_letter_queue_name(validate_queue_name(queue_name))
        jobs = []
        for body in await self.backend.peek(dlq, limit):
            try:
                jobs.append(self.decode(body, dlq))
            except DecodeError as exc:
                logger.warning("a message on %r is not a job, left out of the peek: %s", dlq, exc)
        return jobs

    async def clean_queue(self, queue_name: str) -> int:
        """Remove every ready job from ``queue_name``; returns how many were removed."""
        self._check_open()
        started = time.time()
        removed = await self.backend.purge(queue_name)
        if self.records and not self._fused():
            await self.state.purged(queue_name, started)
        return removed

    async def delete_queue(self, queue_name: str) -> None:
        """Delete ``queue_name`` and its dead-letter queue, with every job in them."""
        self._check_open()
        await self.backend.delete_queue(queue_name)
        if self.records and not self._fused():
            await self.state.forget_queue(queue_name)
            dlq = dead_letter_queue_name(queue_name)
            if dlq != queue_name:  # deleted with it, its records too
                await self.state.forget_queue(dlq)
        self._known_queues.pop(queue_name, None)

    async def requeue_dead_letters(self, queue_name: str, limit: int | None = None) -> int:
        """Move jobs from ``queue_name``'s dead-letter queue back to it, attempts and error reset.

        Each job is published to ``queue_name`` before it leaves the dead-letter queue, so a failure midway
        duplicates at most one job and loses none. Undecodable messages stay where they are. Returns the
        number moved. ``queue_name`` is the queue the jobs go back to, never a dead-letter queue itself
        (QueueError: its jobs would come straight back to it).
        """
        self._check_open()
        dlq = dead_letter_queue_name(validate_queue_name(queue_name))
        if dlq == queue_name:
            raise QueueError(
                f"{queue_name!r} is a dead-letter queue: requeue_dead_letters() takes the queue its jobs go back "
                f"to ({queue_name[: -len(DLQ_SUFFIX)]!r})",
                queue=queue_name,
            )
        moved = 0
        skipped = []
        async with await self.backend.open_receiver(dlq, prefetch=1) as receiver:
            try:
                while limit is None or moved < limit:
                    delivery = await receiver.get(0)
                    if delivery is None:
                        break
                    try:
                        job = requeued(self.decode(delivery.body, dlq))
                    except DecodeError:
                        job = None
                    if job is None:
                        skipped.append(delivery)
                        continue
                    await self.publish(queue_name, job)
                    await self.settle(delivery, Outcome(Action.ACK, job))
                    moved += 1
            finally:
                for delivery in skipped:
                    await self.backend.release(delivery)
        return moved

    # -- schedules -------------------------------------------------------------------------------------

    @property
    def schedule_store(self) -> ScheduleStore:
        """Where this orchestrator's schedules live: its backend's schedule store (UsageError when its
        ``capabilities.schedules`` is "none")."""
        return self.backend.schedule_store()

    async def schedule(
        self,
        name: str,
        queue_name: str,
        job: Job,
        *,
        cron: str | None = None,
        tz: str | None = None,
        every: float | timedelta | None = None,
        misfire: MisfirePolicy = "coalesce",
        grace: float | timedelta | None = None,
    ) -> ScheduleInfo:
        """Create or replace the schedule ``name``: a copy of ``job`` is published on ``queue_name`` at each fire
        time, by whichever process runs schedules (``run_schedules``, ``consume(run_schedules=True)``, the worker
        CLI), once per fire time however many do.

        Fire times: ``cron`` (five fields, e.g. ``"0 3 * * *"``) in the IANA time zone ``tz`` (default UTC;
        daylight saving time as cron keeps it: a time skipped in spring runs at the next valid minute, a time
        repeated in autumn runs once), or ``every`` (seconds or a timedelta) aligned to the Unix epoch in UTC
        (``every=timedelta(minutes=5)`` fires at :00, :05, ...). The first fire is the first fire time after the
        schedule was stored. Each fire's job id is ``<name>@<UTC fire time>`` (``nightly@2026-12-04T02:00:00Z``).

        Misfires (no scheduler ran at a fire time): the fires missed become one, at the latest missed time,
        which runs if it is at most ``grace`` (seconds or a timedelta) late: by default however late with
        ``misfire="coalesce"``, and ``SKIP_GRACE`` (60 s) with ``misfire="skip"``; it is skipped (logged)
        otherwise.

        Idempotent: the same schedule again changes nothing (its next fire stays); a changed one replaces it
        and owes no fire from before the change. The queue must exist (QueueNotFoundError). JobValidationError
        naming the field for an empty name, both or neither of ``cron``/``every``, an invalid cron expression or
        time zone, an interval or grace that is not > 0, or a job that does not validate against its registered
        schema; nothing is stored then.
        """
        self._check_open()
        store = self.schedule_store
        checked = self._check_job(job)
        now = await store.now_ms()
        spec = make_spec(
            name, queue_name, checked, cron=cron, tz=tz, every=every, misfire=misfire, grace=grace, anchor_ms=0
        )
        if not await self.backend.queue_exists(spec.queue):
            raise QueueNotFoundError(spec.queue)
        stored = await store.upsert(spec, now)
        template = self.decode(stored.job.encode(), stored.queue)
        cursor = next((state.cursor_ms for state in await store.load() if state.spec.name == stored.name), None)
        return info_of(ScheduleState(stored, cursor), template, now)

    async def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name``: no fire of it follows (a job it already published stays). Whether it
        existed."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise JobValidationError(f"schedule name must be a non-empty str, not {name!r}", field="name")
        return await self.schedule_store.remove(name)

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule stored on the backend, by name, with its last and next fire times."""
        self._check_open()
        store = self.schedule_store
        now = await store.now_ms()
        states = sorted(await store.load(), key=lambda state: state.spec.name)
        return [info_of(state, self.decode(state.spec.job.encode(), state.spec.queue), now) for state in states]

    async def run_schedules(self, *, refresh: float = SCHEDULE_REFRESH) -> None:
        """Fire this backend's schedules until cancelled or ``close()`` (any number of processes may run this at
        once; each fire happens once). Schedules stored or removed elsewhere are seen within ``refresh`` seconds;
        a broker outage is logged and ridden out (see :meth:`mindtrace.jobs.schedules.Scheduler.run`)."""
        self._check_open()
        if not refresh > 0:
            raise ConfigurationError(f"refresh must be a number of seconds > 0, not {refresh!r}")
        task = asyncio.current_task()
        scheduler = Scheduler(self, self.schedule_store, refresh)
        if task is not None:
            self._schedulers[task] = scheduler
        try:
            await scheduler.run()
        finally:
            if task is not None:
                self._schedulers.pop(task, None)

    async def stop_schedules(self) -> None:
        """End this orchestrator's running ``run_schedules`` calls (each raises CancelledError in its task) and
        wait for them. ``close()`` does this first."""
        running = list(self._schedulers.items())
        for task, scheduler in running:
            scheduler.stop()  # ends the loop even if a driver swallows the cancel (asyncio.wait_for before 3.12)
            task.cancel()
        await asyncio.gather(*(task for task, _ in running), return_exceptions=True)

    async def fire(self, store: ScheduleStore, spec: ScheduleSpec, expected_ms: int, cursor_ms: int, job: Job) -> bool:
        """Publish one fire of a schedule: ``job`` on ``spec.queue`` if the schedule's cursor moves from
        ``expected_ms`` to ``cursor_ms`` (else nothing: another process fired it); whether it was published.
        In one atomic step where the store can, else the cursor first, then the publish."""
        record = _queued(job) if self.records else None
        fused = record is not None and self._fused()
        hooks = awake(self.hooks) if self.hooks else None
        manager = (
            around([hook.publish(PublishEvent(spec.queue, job, broker_name(self.backend))) for hook in hooks])
            if hooks
            else None
        )
        with manager if manager is not None else contextlib.nullcontext():
            done = await store.fire(spec, expected_ms, cursor_ms, outgoing(job, state=record if fused else None))
            if done is None:
                if not await store.advance(spec, expected_ms, cursor_ms):
                    return False
                await self._publish(spec.queue, job, False, 0.0)
                return True
            if done and record is not None and not fused:
                await self.state.record(spec.queue, record)
            return done

    def attach(self, consumer: AsyncConsumer) -> None:
        """Remember (weakly) a consumer connected to this orchestrator, for ``close()`` to stop first."""
        self._consumers.add(consumer)

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop the consumers connected to this orchestrator, then close the backend. Idempotent.

        Each running ``consume()`` claims no new job; its running jobs get ``grace`` seconds to finish and
        be settled, then the rest are given back to their queue uncharged (see ``AsyncConsumer.shutdown``);
        what was done is logged. Further calls raise ClosedError.
        """
        if not grace >= 0:
            raise ConfigurationError(f"grace must be a number of seconds >= 0, not {grace}")
        if self._closed:
            return
        self._closed = True
        await self.stop_schedules()
        consumers = [consumer for consumer in self._consumers if consumer.consuming]
        if consumers:
            results = await asyncio.gather(*(consumer.shutdown(grace) for consumer in consumers))
            settled, given_back = sum(r[0] for r in results), sum(r[1] for r in results)
            log = logger.warning if given_back else logger.info
            log(
                "closing %s: stopped %d consumer(s); %d running job(s) finished, %d given back after the %.1fs grace",
                self.backend.describe(),
                len(consumers),
                settled,
                given_back,
                grace,
            )
        if self._state is not None:
            await self._state.close()
        await self.backend.close()

    async def __aenter__(self) -> AsyncOrchestrator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()
