"""AsyncConsumer: claim jobs, run them, ack, retry with backoff, dead-letter, and keep leases alive."""

from __future__ import annotations

import abc
import asyncio
import logging
import sys
from typing import Any

from pydantic import ValidationError

from mindtrace.jobs.backends.base import Delivery, Receiver, dead_letter_queue_name, validate_queue_name
from mindtrace.jobs.constants import MAX_RETRIES, MAX_RETRY_DELAY, RETRY_BACKOFF, RETRY_DELAY
from mindtrace.jobs.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    JobValidationError,
    PayloadTooLargeError,
    QueueError,
    UsageError,
)
from mindtrace.jobs.orchestrator import AsyncOrchestrator, outgoing
from mindtrace.jobs.types import Job, JobOutput
from mindtrace.jobs.wire import undecodable_job

logger = logging.getLogger("mindtrace.jobs")

# Backoff while the broker is unreachable during consume: first wait and cap, in seconds.
_RECONNECT_DELAY, _RECONNECT_MAX_DELAY = 0.1, 5.0


class _Budget:
    """How many more messages this consume() call may take; None is unlimited."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def give_back(self) -> None:
        if self.left is not None:
            self.left += 1


class AsyncConsumer(abc.ABC):
    """Base class of an asyncio worker: subclass it, implement ``async run(job)``, then ``consume()``.

    Delivery is at least once: a job is acknowledged only after ``run`` returns, so a job may run more than
    once (after a crash, a lost lease or a lost connection): make ``run`` idempotent. When ``run`` raises,
    the job is retried up to ``max_retries`` times, the n-th retry waiting
    ``retry_delay * retry_backoff ** (n - 1)`` seconds (at most ``max_retry_delay``), then moved to the
    queue's dead-letter queue (``<queue>.dlq``) with ``job.error`` and ``job.attempts`` recorded. A message
    that is not a job goes to the dead-letter queue at once. ``run``'s return value, when not None, must
    validate against the schema's output type. A dead-letter queue cannot be consumed (QueueError): its
    failed jobs would be dead-lettered back into it.
    """

    def __init__(
        self,
        job_type_name: str,
        *,
        max_retries: int = MAX_RETRIES,
        retry_delay: float = RETRY_DELAY,
        retry_backoff: float = RETRY_BACKOFF,
        max_retry_delay: float = MAX_RETRY_DELAY,
    ) -> None:
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, not {max_retries}")
        if retry_delay < 0 or retry_backoff < 1 or max_retry_delay < 0:
            raise ConfigurationError("retry_delay and max_retry_delay must be >= 0 and retry_backoff >= 1")
        if dead_letter_queue_name(validate_queue_name(job_type_name)) == job_type_name:
            raise QueueError(
                f"{job_type_name!r} is a dead-letter queue: a consumer of it would dead-letter failed jobs back "
                "into it; take them with receive_message() or move them back with requeue_dead_letters()",
                queue=job_type_name,
            )
        self.queue_name = job_type_name
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.retry_backoff = retry_backoff
        self.max_retry_delay = max_retry_delay
        self._orchestrator: AsyncOrchestrator | None = None
        self._stopping = False
        self._idle: set[asyncio.Task[Any]] = set()  # workers waiting for a message, which stop() cancels
        self._leased: set[Delivery] = set()  # running jobs whose leases the keeper renews
        self._loop: asyncio.AbstractEventLoop | None = None

    @abc.abstractmethod
    async def run(self, job: Job) -> Any:
        """Process one job. Return None or an output matching the schema's output type; raise to retry."""

    def connect(self, orchestrator: AsyncOrchestrator) -> None:
        """Consume through ``orchestrator``: its backend and its registered schemas."""
        if not isinstance(orchestrator, AsyncOrchestrator):
            raise UsageError(f"connect() takes an AsyncOrchestrator, not {type(orchestrator).__name__}")
        self._orchestrator = orchestrator

    @property
    def orchestrator(self) -> AsyncOrchestrator:
        """The orchestrator given to ``connect()``; UsageError before that."""
        if self._orchestrator is None:
            raise UsageError(f"consumer of {self.queue_name!r} is not connected: call connect(orchestrator)")
        return self._orchestrator

    def stop(self) -> None:
        """Ask ``consume()`` to return: no new job is claimed, jobs already running finish and are settled.

        Call it on the consumer's event loop (from ``run`` or another task).
        """
        self._stopping = True
        for task in list(self._idle):
            task.cancel()

    async def consume(self, num_messages: int | None = None, concurrency: int = 1) -> int:
        """Process jobs from the queue until ``num_messages`` were handled (None: until ``stop()``).

        ``concurrency`` jobs run at once. Returns how many messages were handled. Cancelling this call
        gives every claimed, unfinished job back to its queue.
        """
        if num_messages is not None and num_messages < 0:
            raise ConfigurationError(f"num_messages must be >= 0 or None, not {num_messages}")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
        orchestrator = self.orchestrator
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        budget = _Budget(num_messages)
        handled = [0]
        lease = orchestrator.backend.capabilities.lease_timeout
        async with await orchestrator.open_receiver(self.queue_name, prefetch=concurrency) as receiver:
            workers = [asyncio.create_task(self._work(receiver, budget, handled)) for _ in range(concurrency)]
            # One task renews every running job's lease, rather than one task per job.
            keeper = None if lease is None else asyncio.create_task(self._keep_leases(lease))
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if keeper is not None:
                    keeper.cancel()
                    await asyncio.gather(keeper, return_exceptions=True)
        return handled[0]

    async def _work(self, receiver: Receiver, budget: _Budget, handled: list[int]) -> None:
        delay = _RECONNECT_DELAY
        while not self._stopping and budget.take():
            try:
                delivery = await self._claim(receiver)
            except BackendUnavailableError as exc:
                budget.give_back()
                logger.warning("consumer of %r lost the broker, retrying in %.1fs: %s", self.queue_name, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)
                continue
            if delivery is None:
                budget.give_back()
                continue
            delay = _RECONNECT_DELAY
            await self._handle(delivery)
            handled[0] += 1

    async def _claim(self, receiver: Receiver) -> Delivery | None:
        # The worker waits in the receiver itself: no task per claim. stop() cancels the workers waiting here
        # (and only here); a receiver's get() keeps a message it was cancelled on for the next get(), or gives
        # it back at close, so ending the worker this way loses nothing.
        worker = asyncio.current_task()
        assert worker is not None
        self._idle.add(worker)
        try:
            return await receiver.get(None)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            if sys.version_info >= (3, 11) and worker.uncancel() > 0:
                raise  # cancelled from outside too
            return None
        finally:
            self._idle.discard(worker)

    async def _handle(self, delivery: Delivery) -> None:
        backend = self.orchestrator.backend
        try:
            job = self.orchestrator.decode(delivery.body, delivery.queue)
        except DecodeError as exc:
            logger.warning("dead-lettering an undecodable message from %r: %s", delivery.queue, exc.reason)
            await self._settle(backend.dead_letter(delivery, outgoing(undecodable_job(exc))), delivery)
            return
        if delivery.delivery_count > 1 and not backend.capabilities.counted_deliveries:
            # The broker only flags redeliveries: record the lost run on the job itself before running it
            # again, so a job that kills its consumer is still dead-lettered after max_retries + 1 runs.
            job.attempts += 1
            job.error = "redelivered: the consumer running it died, lost its connection or gave it back"
            if job.attempts > self.max_retries:
                logger.warning("dead-lettering job %s after %d lost runs", job.id, job.attempts)
                await self._settle(backend.dead_letter(delivery, outgoing(job)), delivery)
            else:
                await self._retry(delivery, job, 0.0, resumes=True)
            return
        if job.attempts + delivery.delivery_count - 1 > self.max_retries:
            # Failed runs plus runs that never settled are over the budget: its runs kill or stall the
            # consumer (a poison job).
            job.attempts += delivery.delivery_count - 1
            job.error = (
                f"delivered {delivery.delivery_count} times without being settled: "
                "the consumer died or lost its lease while running it"
            )
            logger.warning("dead-lettering job %s: %s", job.id, job.error)
            await self._settle(backend.dead_letter(delivery, outgoing(job)), delivery)
            return
        try:
            if backend.capabilities.lease_timeout is None:
                result = await self.run(job)
            else:
                self._leased.add(delivery)
                try:
                    result = await self.run(job)
                finally:
                    self._leased.discard(delivery)
            self._check_output(job, result)
        except Exception as exc:
            await self._fail(delivery, job, exc)
        except BaseException:
            # Cancelled (or interrupted) mid-job: the job goes back to its queue, whatever happens next.
            await asyncio.shield(self._settle(backend.release(delivery), delivery))
            raise
        else:
            await self._settle(backend.ack(delivery), delivery)

    async def _fail(self, delivery: Delivery, job: Job, exc: Exception) -> None:
        backend = self.orchestrator.backend
        job.attempts += 1
        job.error = f"{type(exc).__name__}: {exc}"
        # The text may hold lone surrogates (an undecodable file name): keep them as escapes JSON can carry.
        job.error = job.error.encode("utf-8", "backslashreplace").decode("utf-8")
        if job.attempts <= self.max_retries:
            delay = min(self.retry_delay * self.retry_backoff ** (job.attempts - 1), self.max_retry_delay)
            logger.info("job %s failed (attempt %d), retrying in %.2fs: %s", job.id, job.attempts, delay, job.error)
            await self._retry(delivery, job, delay)
        else:
            logger.warning("job %s failed %d times, dead-lettering: %s", job.id, job.attempts, job.error)
            await self._settle(backend.dead_letter(delivery, outgoing(job)), delivery)

    async def _retry(self, delivery: Delivery, job: Job, delay: float, *, resumes: bool = False) -> None:
        """Retry ``job`` after ``delay`` s, or dead-letter it when its recorded error took it over the size limit."""
        backend = self.orchestrator.backend
        try:
            await self._settle(backend.retry(delivery, outgoing(job, resumes=resumes), delay), delivery)
        except PayloadTooLargeError as exc:
            # Refused before anything was settled; the dead-letter queue takes it whatever its size.
            job.error = f"{job.error} (not retried: {exc})"
            logger.warning("dead-lettering job %s: %s", job.id, exc)
            await self._settle(backend.dead_letter(delivery, outgoing(job)), delivery)

    async def _settle(self, operation: Any, delivery: Delivery) -> None:
        try:
            await operation
        except BackendError as exc:
            # The broker keeps the message (lease expiry or redelivery); at-least-once still holds.
            logger.warning("could not settle a message from %r (it will be redelivered): %s", delivery.queue, exc)

    @staticmethod
    def _check_output(job: Job, result: Any) -> None:
        output_type = job.payload.output_type
        if result is None or output_type is None or isinstance(result, output_type):
            return
        if isinstance(result, (JobOutput, dict)):
            try:
                output_type.model_validate(result.model_dump() if isinstance(result, JobOutput) else result)
                return
            except ValidationError as exc:
                raise JobValidationError(
                    f"run() result does not validate as {output_type.__name__}: {exc}",
                    schema=job.payload.name,
                    job_id=job.id,
                ) from exc
        raise JobValidationError(
            f"run() returned {type(result).__name__}, expected {output_type.__name__}, a dict or None",
            schema=job.payload.name,
            job_id=job.id,
        )

    async def _keep_leases(self, lease: float) -> None:
        """Every ``lease / 3`` s, extend the lease of every job running: a job that started since the last
        round is extended within ``lease / 3`` s of its start, the same bound a timer per job would give."""
        while True:
            await asyncio.sleep(lease / 3)
            await asyncio.gather(*(self._renew(delivery, lease) for delivery in list(self._leased)))

    async def _renew(self, delivery: Delivery, lease: float) -> None:
        backend = self.orchestrator.backend
        if delivery in self._leased:
            try:
                await backend.extend(delivery, lease)
            except BackendError as exc:
                logger.warning("could not extend the lease of a job from %r: %s", delivery.queue, exc)
