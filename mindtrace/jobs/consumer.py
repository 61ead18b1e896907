"""AsyncConsumer: claim jobs, run them, ack, retry with backoff, dead-letter, and keep leases alive."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from mindtrace.jobs.backends.base import Delivery, Receiver
from mindtrace.jobs.constants import MAX_RETRIES, MAX_RETRY_DELAY, RETRY_BACKOFF, RETRY_DELAY
from mindtrace.jobs.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    JobValidationError,
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
    validate against the schema's output type.
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
        self.queue_name = job_type_name
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.retry_backoff = retry_backoff
        self.max_retry_delay = max_retry_delay
        self._orchestrator: AsyncOrchestrator | None = None
        self._stopping = False
        self._idle: set[asyncio.Task[Any]] = set()
        self._orphans: set[asyncio.Future[None]] = set()
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
        async with await orchestrator.open_receiver(self.queue_name, prefetch=concurrency) as receiver:
            workers = [asyncio.create_task(self._work(receiver, budget, handled)) for _ in range(concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
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
        # Fast path: a ready message is taken without a task or a wait.
        delivery = await receiver.get(0)
        if delivery is not None or self._stopping:
            return delivery
        # The blocking claim runs as its own task so that stop() can cancel it without cancelling this worker.
        task = asyncio.ensure_future(receiver.get(None))
        self._idle.add(task)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(self._release_orphan)
            raise
        finally:
            self._idle.discard(task)
        return None if task.cancelled() else task.result()

    def _release_orphan(self, task: asyncio.Task[Delivery | None]) -> None:
        # A claim that completed as its worker was cancelled: give the message back rather than drop it.
        if task.cancelled() or task.exception() is not None:
            return
        delivery = task.result()
        if delivery is not None and not delivery.settled:
            release = asyncio.ensure_future(self.orchestrator.backend.release(delivery))
            self._orphans.add(release)
            release.add_done_callback(self._orphans.discard)

    async def _handle(self, delivery: Delivery) -> None:
        backend = self.orchestrator.backend
        try:
            job = self.orchestrator.decode(delivery.body, delivery.queue)
        except DecodeError as exc:
            logger.warning("dead-lettering an undecodable message from %r: %s", delivery.queue, exc.reason)
            await self._settle(backend.dead_letter(delivery, outgoing(undecodable_job(exc))), delivery)
            return
        if delivery.delivery_count > 1 and not backend.counts_deliveries:
            # The broker only flags redeliveries: record the lost run on the job itself before running it
            # again, so a job that kills its consumer is still dead-lettered after max_retries + 1 runs.
            job.attempts += 1
            job.error = "redelivered: the consumer running it died, lost its connection or gave it back"
            if job.attempts > self.max_retries:
                logger.warning("dead-lettering job %s after %d lost runs", job.id, job.attempts)
                await self._settle(backend.dead_letter(delivery, outgoing(job)), delivery)
            else:
                await self._settle(backend.retry(delivery, outgoing(job), 0.0), delivery)
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
            if backend.lease_timeout is None:
                result = await self.run(job)
            else:
                async with self._lease(delivery, backend.lease_timeout):
                    result = await self.run(job)
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
        if job.attempts <= self.max_retries:
            delay = min(self.retry_delay * self.retry_backoff ** (job.attempts - 1), self.max_retry_delay)
            logger.info("job %s failed (attempt %d), retrying in %.2fs: %s", job.id, job.attempts, delay, job.error)
            await self._settle(backend.retry(delivery, outgoing(job), delay), delivery)
        else:
            logger.warning("job %s failed %d times, dead-lettering: %s", job.id, job.attempts, job.error)
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

    @contextlib.asynccontextmanager
    async def _lease(self, delivery: Delivery, lease: float) -> AsyncIterator[None]:
        renewer = asyncio.create_task(self._renew(delivery, lease))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew(self, delivery: Delivery, lease: float) -> None:
        backend = self.orchestrator.backend
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await backend.extend(delivery, lease)
            except BackendError as exc:
                logger.warning("could not extend the lease of a job from %r: %s", delivery.queue, exc)
