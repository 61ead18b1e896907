"""AsyncOrchestrator: the one implementation of queue operations, schema registration and routing."""

from __future__ import annotations

import asyncio
import logging
import math
import types
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, overload

from mindtrace.jobs.backends import from_url
from mindtrace.jobs.backends.base import (
    Backend,
    Delivery,
    OutgoingMessage,
    QueueOptions,
    Receiver,
    dead_letter_queue_name,
    validate_queue_name,
)
from mindtrace.jobs.constants import CLOSE_GRACE, DLQ_SUFFIX
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
from mindtrace.jobs.policy import Action, Outcome, requeued, retry_refused, undecodable
from mindtrace.jobs.types import QUEUE_MAPPING, Job, JobSchema
from mindtrace.jobs.wire import SchemaTypes, check_against, decode, encode

if TYPE_CHECKING:
    from mindtrace.jobs.consumer import AsyncConsumer

logger = logging.getLogger("mindtrace.jobs")


def outgoing(job: Job, *, resumes: bool = False) -> OutgoingMessage:
    """The encoded form of ``job``, ready for a backend (``resumes``: see OutgoingMessage)."""
    return OutgoingMessage(encode(job), job.priority, job.id, resumes)


class AsyncOrchestrator:
    """Declares queues, registers job schemas, publishes and receives jobs over one backend.

    ``backend`` is a Backend instance (``LocalClient()``, ``RedisClient(...)``, ``RabbitMQClient(...)``) or a
    URL (``memory://``, ``redis://host:6379/0``, ``amqp://user:pass@host/vhost``). Use as ``async with``, or
    call ``close()``: closing the orchestrator stops the consumers connected to it, then closes its backend.
    """

    def __init__(self, backend: Backend | str) -> None:
        self.backend: Backend = from_url(backend) if isinstance(backend, str) else backend
        if not isinstance(self.backend, Backend):
            raise JobValidationError(f"backend must be a Backend or a URL, not {type(backend).__name__}")
        self._schemas: dict[str, SchemaTypes] = {}
        # Queues this orchestrator declared or saw, with the options to declare them again if the broker
        # loses them (a Redis restart without persistence); a cache, so checked again on QueueNotFoundError.
        self._known_queues: dict[str, QueueOptions] = {}
        self._consumers: weakref.WeakSet[AsyncConsumer] = weakref.WeakSet()
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncOrchestrator {self.backend.describe()}>"

    @property
    def schemas(self) -> Mapping[str, SchemaTypes]:
        """The schemas registered with this orchestrator, by name."""
        return types.MappingProxyType(self._schemas)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"orchestrator on {self.backend.describe()} is closed")

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

    async def declare_queue(self, queue_name: str, **options: Any) -> None:
        """Create ``queue_name`` (and its ``.dlq``) if missing. Idempotent; other options than the existing
        ones raise QueueConflictError. Options: ``durable`` (default True)."""
        self._check_open()
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
        self._known_queues.setdefault(queue_name, QueueOptions())
        return declared

    @overload
    async def publish(self, queue_name: str, job: Job, /) -> str: ...

    @overload
    async def publish(self, job: Job, /) -> str: ...

    async def publish(self, queue_or_job: str | Job, job: Job | None = None, /) -> str:
        """Queue ``job`` on ``queue_name``, or on ``QUEUE_MAPPING[job.job_type]`` when called as
        ``publish(job)`` (that queue is declared if missing). Returns the job id once the broker holds it.

        QueueNotFoundError when a named queue was never declared, or the broker lost it (``lost``: deleted
        elsewhere, or a broker restart without persistence; an auto-routed queue is declared again instead and
        the publish retried once); PayloadTooLargeError over the size limit;
        JobValidationError, naming the schema and the field, when the job's schema is registered here and its
        input does not validate against it (a receiver would dead-letter it). Nothing is sent on an error.
        """
        self._check_open()
        routed = isinstance(queue_or_job, Job) and job is None
        queue, job = await self._route(queue_or_job, job)
        message = outgoing(job)
        try:
            await self.backend.publish(queue, message)
        except QueueNotFoundError:
            if not routed:
                raise self._lost(queue) from None
            # Auto-routing owns its queue: the broker lost it (a restart without persistence), declare it again.
            if await self.ensure_queue(queue, refresh=True):
                logger.warning("auto-routed queue %r was gone from the broker: declared it again", queue)
            await self.backend.publish(queue, message)
        return job.id

    async def publish_many(self, queue_name: str, jobs: Sequence[Job]) -> list[str]:
        """Queue several jobs on ``queue_name``; all are validated (as in ``publish``) and encoded before any is
        sent."""
        self._check_open()
        validate_queue_name(queue_name)
        messages = [outgoing(self._check_job(job)) for job in jobs]
        try:
            await self.backend.publish_many(queue_name, messages)
        except QueueNotFoundError:
            raise self._lost(queue_name) from None
        return [message.job_id for message in messages]

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
        return queue_or_job, self._check_job(job)

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

    async def open_receiver(self, queue_name: str, *, prefetch: int = 1) -> Receiver:
        """A receiver on ``queue_name``: the consumer's low-level claim API.

        A queue that does not exist is declared, so workers may start before producers, with a warning naming
        it: a consumer of a misspelt queue would otherwise wait forever in silence.
        """
        if await self.ensure_queue(queue_name):
            logger.warning(
                "queue %r did not exist: declared it for its consumer (jobs arrive once producers publish to "
                "it; check the name if none will)",
                queue_name,
            )
        return await self.backend.open_receiver(queue_name, prefetch=prefetch)

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
                await self.settle(delivery, Outcome(Action.ACK, job))
                return job

    async def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Settle a claimed ``delivery`` with the one backend verb ``outcome`` names, and log why.

        A retry the backend refuses as too large (its recorded error grew the job past the size limit) is
        dead-lettered instead. Backend errors propagate; the message then stays with the broker.
        """
        backend, job, queue = self.backend, outcome.job, delivery.queue
        action = outcome.action
        if action is Action.ACK:
            await backend.ack(delivery)
        elif action is Action.RELEASE:
            await backend.release(delivery)
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
                await backend.retry(delivery, outgoing(job, resumes=outcome.resumes), outcome.delay)
            except PayloadTooLargeError as exc:  # refused before anything was settled
                await self.settle(delivery, retry_refused(outcome, exc))
        elif action is Action.DEAD_LETTER:
            logger.warning("dead-lettering job %s from %r: %s", job.id, queue, outcome.reason)
            await backend.dead_letter(delivery, outgoing(job))
        else:
            raise UsageError(f"{action} is not a settle verb")

    async def count_queue_messages(self, queue_name: str) -> int:
        """Number of jobs ready to run on ``queue_name`` (not those running or waiting for a retry)."""
        self._check_open()
        return await self.backend.count(queue_name)

    async def clean_queue(self, queue_name: str) -> int:
        """Remove every ready job from ``queue_name``; returns how many were removed."""
        self._check_open()
        return await self.backend.purge(queue_name)

    async def delete_queue(self, queue_name: str) -> None:
        """Delete ``queue_name`` and its dead-letter queue, with every job in them."""
        self._check_open()
        await self.backend.delete_queue(queue_name)
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
