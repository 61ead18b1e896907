"""AsyncConsumer: claim jobs, run them, ack, retry with backoff, dead-letter, and keep leases alive."""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
import sys
from typing import Any

from mindtrace.jobs.backends.base import Delivery, Receiver, dead_letter_queue_name, validate_queue_name
from mindtrace.jobs.constants import CLOSE_GRACE
from mindtrace.jobs.errors import (
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    JobValidationError,
    QueueError,
    QueueNotFoundError,
    ResultTooLargeError,
    UsageError,
)
from mindtrace.jobs.orchestrator import AsyncOrchestrator
from mindtrace.jobs.policy import Action, Outcome, RetryPolicy, after_run, before_run, release, undecodable
from mindtrace.jobs.types import Job, JobOutput, validate_as
from mindtrace.jobs.wire import UntypedOutput

logger = logging.getLogger("mindtrace.jobs")

# Backoff while the broker is unreachable during consume: first wait and cap, in seconds.
_RECONNECT_DELAY, _RECONNECT_MAX_DELAY = 0.1, 5.0


class _Budget:
    """How many more jobs this consume() call may settle (None: unlimited), and how many it did."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit
        self.handled = 0

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
    the job is retried as its :class:`RetryPolicy` says (``retry_policy``, or the defaults; the keyword
    options ``max_retries`` (3), ``retry_delay`` (1.0 s), ``retry_backoff`` (2.0) and ``max_retry_delay``
    (300 s) replace its fields): up to ``max_retries`` times, the n-th retry waiting
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
        retry_policy: RetryPolicy | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        retry_backoff: float | None = None,
        max_retry_delay: float | None = None,
    ) -> None:
        self.retry_policy = RetryPolicy.of(
            retry_policy,
            max_retries=max_retries,
            retry_delay=retry_delay,
            retry_backoff=retry_backoff,
            max_retry_delay=max_retry_delay,
        )
        if dead_letter_queue_name(validate_queue_name(job_type_name)) == job_type_name:
            raise QueueError(
                f"{job_type_name!r} is a dead-letter queue: a consumer of it would dead-letter failed jobs back "
                "into it; take them with receive_message() or move them back with requeue_dead_letters()",
                queue=job_type_name,
            )
        self.queue_name = job_type_name
        self._orchestrator: AsyncOrchestrator | None = None
        self._stopping = False
        self._idle: set[asyncio.Task[Any]] = set()  # workers waiting for a message, which stop() cancels
        self._workers: set[asyncio.Task[None]] = set()  # the workers of every consume() call running
        self._consuming: set[asyncio.Future[None]] = set()  # one per consume() call running, done when it ends
        self._running: dict[Delivery, asyncio.Task[None]] = {}  # jobs inside run(), by the worker running them
        self._evicted: set[asyncio.Task[None]] = set()  # workers shutdown() cancelled: they end quietly
        #: Who runs the jobs, as recorded in their records: host, process id and this consumer.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"

    @abc.abstractmethod
    async def run(self, job: Job) -> Any:
        """Process one job. Return None or an output matching the schema's output type; raise to retry."""

    def connect(self, orchestrator: AsyncOrchestrator) -> None:
        """Consume through ``orchestrator``: its backend and its registered schemas.

        The orchestrator's ``close()`` then stops this consumer first (see :meth:`shutdown`).
        """
        if not isinstance(orchestrator, AsyncOrchestrator):
            raise UsageError(f"connect() takes an AsyncOrchestrator, not {type(orchestrator).__name__}")
        self._orchestrator = orchestrator
        orchestrator.attach(self)

    @property
    def orchestrator(self) -> AsyncOrchestrator:
        """The orchestrator given to ``connect()``; UsageError before that."""
        if self._orchestrator is None:
            raise UsageError(f"consumer of {self.queue_name!r} is not connected: call connect(orchestrator)")
        return self._orchestrator

    @property
    def consuming(self) -> bool:
        """Whether a ``consume()`` call of this consumer is running."""
        return bool(self._consuming)

    def stop(self) -> None:
        """Ask ``consume()`` to return: no new job is claimed, jobs already running finish and are settled.

        Call it on the consumer's event loop (from ``run`` or another task).
        """
        self._stopping = True
        for task in list(self._idle):
            task.cancel()

    async def shutdown(self, grace: float = CLOSE_GRACE) -> tuple[int, int]:
        """Stop every running ``consume()`` and wait until each has returned.

        No new job is claimed; jobs running get ``grace`` seconds to finish and be settled; those still
        running then are cancelled and given back to their queue uncharged (their ``run`` is cancelled; a
        blocking ``run`` of the sync Consumer finishes in its thread, unheard). Returns
        ``(settled, given_back)``: how many running jobs finished within the grace period, and how many
        were given back. The orchestrator's ``close()`` calls it for every consumer connected to it.
        """
        if not grace >= 0:
            raise ConfigurationError(f"grace must be a number of seconds >= 0, not {grace}")
        me = asyncio.current_task()
        was_running = sum(task is not me for task in self._running.values())
        self.stop()
        given_back = 0
        try:
            workers = self._workers - {me}  # a run that closes its own orchestrator is not waited for
            if workers:
                await asyncio.wait(workers, timeout=grace)
        finally:
            for task in set(self._running.values()) - {me}:
                self._evicted.add(task)
                task.cancel()
                given_back += 1
            if self._consuming:
                await asyncio.wait(set(self._consuming))
        return was_running - given_back, given_back

    async def consume(self, num_messages: int | None = None, concurrency: int = 1) -> int:
        """Process jobs from the queue until ``num_messages`` jobs were handled (None: until ``stop()``).

        A job is handled when a run of it ended (acked, retried or dead-lettered) or a rule dead-lettered it
        unrun (undecodable, over its budget of lost runs); a message handed back to the queue unrun (a
        recorded redelivery) is not. ``concurrency`` jobs run at once. Returns how many jobs were handled.
        Cancelling this call gives every claimed, unfinished job back to its queue.
        """
        if num_messages is not None and num_messages < 0:
            raise ConfigurationError(f"num_messages must be >= 0 or None, not {num_messages}")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
        orchestrator = self.orchestrator
        self._stopping = False
        budget = _Budget(num_messages)
        lease = orchestrator.backend.capabilities.lease_timeout
        finished = asyncio.get_running_loop().create_future()
        self._consuming.add(finished)
        try:
            async with await orchestrator.open_receiver(self.queue_name, prefetch=concurrency) as receiver:
                workers = [asyncio.create_task(self._work(receiver, budget)) for _ in range(concurrency)]
                self._workers.update(workers)
                # One task renews every running job's lease, rather than one task per job.
                keeper = None if lease is None else asyncio.create_task(self._keep_leases(lease))
                try:
                    await asyncio.gather(*workers)
                finally:
                    for worker in workers:
                        worker.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
                    self._workers.difference_update(workers)
                    self._evicted.difference_update(workers)
                    if keeper is not None:
                        keeper.cancel()
                        await asyncio.gather(keeper, return_exceptions=True)
        finally:
            self._consuming.discard(finished)
            finished.set_result(None)
        return budget.handled

    async def _work(self, receiver: Receiver, budget: _Budget) -> None:
        worker = asyncio.current_task()
        assert worker is not None
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
            except QueueNotFoundError:
                budget.give_back()
                await self._declare_lost_queue(delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)
                continue
            except BackendError as exc:
                # The broker answered with an error that may pass (Redis full, BUSY with another client's
                # script, MISCONF after a failed save): wait and claim again. A refusal cannot pass.
                if isinstance(exc, BackendRefusedError):
                    raise
                budget.give_back()
                logger.warning("consumer of %r got a broker error, retrying in %.1fs: %s", self.queue_name, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)
                continue
            if delivery is None:
                budget.give_back()
                continue
            delay = _RECONNECT_DELAY
            try:
                handled = await self._handle(delivery, worker)
            except asyncio.CancelledError:
                if not self._was_evicted():
                    raise
                return
            if handled:
                budget.handled += 1
            else:
                budget.give_back()

    def _was_evicted(self) -> bool:
        """In a worker that caught CancelledError: whether only shutdown() cancelled it (it then ends quietly)."""
        worker = asyncio.current_task()
        if worker not in self._evicted:
            return False
        return not (sys.version_info >= (3, 11) and worker is not None and worker.uncancel() > 0)

    async def _declare_lost_queue(self, delay: float) -> None:
        """The broker lost the queue under this consumer (deleted elsewhere, or a broker restart without
        persistence): declare it again, saying so, and go on after ``delay`` s (no busy loop if it stays gone)."""
        try:
            if await self.orchestrator.ensure_queue(self.queue_name, refresh=True):
                logger.warning("queue %r was gone from the broker: declared it again, consuming on", self.queue_name)
        except BackendError as exc:  # the broker is still coming back, or full: the claim loop retries
            if isinstance(exc, BackendRefusedError):
                raise
            logger.warning("consumer of %r could not declare its lost queue yet: %s", self.queue_name, exc)
        await asyncio.sleep(delay)

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

    async def _handle(self, delivery: Delivery, worker: asyncio.Task[None]) -> bool:
        """Decode, decide before the run, run, decide after it, settle once; whether the job counts as handled."""
        orchestrator = self.orchestrator
        try:
            job = orchestrator.decode(delivery.body, delivery.queue)
        except DecodeError as exc:
            outcome = undecodable(exc)
        else:
            counted = orchestrator.backend.capabilities.counted_deliveries
            outcome = before_run(job, delivery.delivery_count, self.retry_policy, counted_deliveries=counted)
            if outcome.action is Action.RUN:
                self._running[delivery] = worker  # its lease is renewed; shutdown() may cut it short
                try:
                    await orchestrator.record_started(delivery.queue, job, self.worker_id)
                    result = await self.run(job)
                    output = self._check_output(job, result, orchestrator.max_result_bytes, delivery.queue)
                except Exception as exc:
                    outcome = after_run(job, exc, self.retry_policy)
                except BaseException:
                    # Cancelled (or interrupted) mid-job: the job goes back to its queue, whatever happens next.
                    await asyncio.shield(self._settle(delivery, release(job)))
                    raise
                else:
                    outcome = after_run(job, None, self.retry_policy)._replace(output=output)
                finally:
                    self._running.pop(delivery, None)
        await self._settle(delivery, outcome)
        return outcome.counts

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        try:
            await self.orchestrator.settle(delivery, outcome)
        except BackendError as exc:
            # The broker keeps the message (lease expiry or redelivery); at-least-once still holds.
            logger.warning("could not settle a message from %r (it will be redelivered): %s", delivery.queue, exc)

    @staticmethod
    def _check_output(job: Job, result: Any, limit: int, queue: str) -> str | None:
        """``run``'s result validated against the schema's output type, as the JSON text recorded (None for
        None); JobValidationError when it does not validate, ResultTooLargeError over ``limit`` bytes."""
        if result is None:
            return None
        output_type = job.payload.output_type
        if isinstance(result, JobOutput):
            if output_type is not None and not isinstance(result, output_type):
                what = f"run() result does not validate as {output_type.__name__}"
                result = validate_as(output_type, result.model_dump(), what, schema=job.payload.name, job_id=job.id)
        elif isinstance(result, dict):
            what = f"run() result does not validate as {(output_type or JobOutput).__name__}"
            result = validate_as(output_type or UntypedOutput, result, what, schema=job.payload.name, job_id=job.id)
        else:
            expected = output_type.__name__ if output_type is not None else "JobOutput"
            raise JobValidationError(
                f"run() returned {type(result).__name__}, expected {expected}, a dict or None",
                schema=job.payload.name,
                job_id=job.id,
            )
        text: str = result.model_dump_json()
        size = len(text.encode())
        if size > limit:
            raise ResultTooLargeError(queue=queue, job_id=job.id, size=size, limit=limit)
        return text

    async def _keep_leases(self, lease: float) -> None:
        """Every ``lease / 3`` s, extend the lease of every job running: a job that started since the last
        round is extended within ``lease / 3`` s of its start, the same bound a timer per job would give."""
        while True:
            await asyncio.sleep(lease / 3)
            await asyncio.gather(*(self._renew(delivery, lease) for delivery in list(self._running)))

    async def _renew(self, delivery: Delivery, lease: float) -> None:
        backend = self.orchestrator.backend
        if delivery in self._running:
            try:
                await backend.extend(delivery, lease)
            except BackendError as exc:
                logger.warning("could not extend the lease of a job from %r: %s", delivery.queue, exc)
