"""AsyncConsumer: claim jobs, run each with its context, time limit and cancels, settle, keep leases alive."""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mindtrace.jobs.backends.base import Delivery, Receiver, dead_letter_queue_name, validate_queue_name
from mindtrace.jobs.constants import (
    ABANDON_GRACE,
    CLOSE_GRACE,
    PROGRESS_INTERVAL,
    RECONNECT_DELAY,
    RECONNECT_MAX_DELAY,
    SHUTDOWN_TIMEOUT,
)
from mindtrace.jobs.context import JobContext, current_job, reset_current, set_current
from mindtrace.jobs.errors import (
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    DecodeError,
    JobTimeoutError,
    JobValidationError,
    QueueError,
    QueueNotFoundError,
    ResultTooLargeError,
    UsageError,
)
from mindtrace.jobs.hooks import Hook, RunEvent, around, awake, broker_name
from mindtrace.jobs.lifecycle import JobStatus, Progress
from mindtrace.jobs.orchestrator import AsyncOrchestrator
from mindtrace.jobs.policy import (
    Action,
    Outcome,
    RetryPolicy,
    after_run,
    before_run,
    cancelled,
    check_time_limit,
    duplicate,
    release,
    undecodable,
)
from mindtrace.jobs.types import Job, JobOutput, validate_as
from mindtrace.jobs.wire import UntypedOutput
from mindtrace.jobs.worker import run_until_signalled

logger = logging.getLogger("mindtrace.jobs")

#: Seconds between stop()'s cancels of a worker still waiting for a message (see _cancel_idle).
_RECANCEL_INTERVAL = 0.25
#: Cancels heard of jobs not running here that a consumer keeps (for jobs its claim started but not yet run).
_EARLY_CANCELS = 1024


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


@dataclass(eq=False)
class _Run:
    """One job this consumer decided to run, from then until it is settled."""

    delivery: Delivery
    job: Job
    context: JobContext
    worker: asyncio.Task[None]
    limit: float | None
    #: What a cancellation cancels while run() is under way: the worker itself (run() awaited in it) or the
    #: run's own task (an async run with a time limit, which can be abandoned); None outside run().
    task: asyncio.Task[Any] | None = None
    #: Done when the run's own task ends or is abandoned (runs with a task of their own only).
    finished: asyncio.Future[None] | None = None
    sent: int = 0  # cancellations sent to ``task``
    evicted: bool = False  # shutdown() cut it short after its grace
    abandoned: bool = False
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def why(self) -> str:
        """Why this consumer cancelled the run, for the log."""
        if self.context.cancelled:
            return "cancelled"
        if self.context.timed_out:
            return f"over its time limit of {self.limit}s"
        return "shutting down" if self.evicted else "consume() cancelled"


def _resolve(future: asyncio.Future[None], _: object) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback of an abandoned run: its outcome is read (nobody else will) and dropped."""
    if not task.cancelled():
        task.exception()


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

    Inside ``run``, ``self.context`` (or :func:`current_job`) is the running job's :class:`JobContext`, one
    per running job. ``timeout`` (seconds; a job's own ``timeout`` replaces it) limits each run: a run over it
    is recorded as failed with JobTimeoutError (retried, then dead-lettered) and its slot goes to the next job
    at once: an async ``run`` is cancelled, and abandoned (logged) if it does not end within a second; a
    blocking ``run`` of the sync Consumer cannot be interrupted and is abandoned in its thread. A cancel of a
    running job cancels an async ``run`` (a blocking one sees ``context.cancelled``); a job cancelled before or
    while it runs ends CANCELLED, never retried or dead-lettered. A job past its ``expires_at`` is settled as
    EXPIRED without running. A redelivered job whose record already says SUCCEEDED is acked without running.
    """

    #: Whether ``run`` blocks a thread (the sync Consumer): a cancel then only sets ``context.cancelled`` (a
    #: thread cannot be interrupted), and a run over its time limit is abandoned in its thread.
    _blocking_run: ClassVar[bool] = False

    def __init__(
        self,
        job_type_name: str,
        *,
        timeout: float | None = None,
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
        #: Seconds each run may take (None: no limit); a job's own ``timeout`` replaces it.
        self.timeout = check_time_limit(timeout, "timeout")
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
        self._idle_cancels: dict[asyncio.Task[Any], int] = {}  # cancels stop() sent to each, taken back in _claim
        self._workers: set[asyncio.Task[None]] = set()  # the workers of every consume() call running
        self._consuming: set[asyncio.Future[None]] = set()  # one per consume() call running, done when it ends
        self._running: dict[Delivery, _Run] = {}  # jobs decided to run, until settled: leases, cancels, shutdown
        # Cancels heard of jobs not running here: job id -> (event loop time heard, reason); see _heard_cancel.
        self._early_cancels: dict[str, tuple[float, str | None]] = {}
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

    @property
    def context(self) -> JobContext:
        """The context of the job running in the calling task (an async ``run``) or thread (a blocking
        ``run``): job id, attempt, deadline, cancelled, timed out, shutting down, ``report_progress``. One per
        running job: with ``concurrency`` > 1, each run sees its own. UsageError outside ``run``."""
        try:
            return current_job()
        except UsageError:
            raise UsageError(f"{type(self).__name__}.context is only available inside run()") from None

    def stop(self) -> None:
        """Ask ``consume()`` to return: no new job is claimed, jobs already running finish and are settled.

        Every running job's ``context.shutting_down`` becomes True. Call it on the consumer's event loop (from
        ``run`` or another task).
        """
        self._stopping = True
        for run in self._running.values():
            run.context.mark_shutting_down()
        self._cancel_idle()

    def _cancel_idle(self) -> None:
        """Cancel the workers waiting for a message, and again every _RECANCEL_INTERVAL s while one still waits
        after a stop(): a driver can swallow a cancellation that lands as its own wait ends (``asyncio.wait_for``
        before Python 3.12 returns the result instead), and the worker would then wait for a message forever."""
        if not self._stopping or not self._idle:
            return
        for task in list(self._idle):
            self._idle_cancels[task] = self._idle_cancels.get(task, 0) + 1
            task.cancel()
        asyncio.get_running_loop().call_later(_RECANCEL_INTERVAL, self._cancel_idle)

    async def shutdown(self, grace: float = CLOSE_GRACE) -> tuple[int, int]:
        """Stop every running ``consume()`` and wait until each has returned.

        No new job is claimed and every running job's ``context.shutting_down`` is set; jobs running get
        ``grace`` seconds to finish and be settled; those still running then are cancelled and given back to
        their queue uncharged (an async ``run`` is cancelled, and abandoned if it does not end within a
        second; a blocking ``run`` of the sync Consumer finishes in its thread, unheard). Returns
        ``(settled, given_back)``: how many running jobs finished within the grace period, and how many
        were cut short. The orchestrator's ``close()`` calls it for every consumer connected to it.
        """
        if not grace >= 0:
            raise ConfigurationError(f"grace must be a number of seconds >= 0, not {grace}")
        me = asyncio.current_task()
        # A run that closes its own orchestrator is neither waited for nor cut short.
        own = {run.worker for run in self._running.values() if me is run.worker or me is run.task}
        was_running = sum(run.worker not in own for run in self._running.values())
        self.stop()
        given_back = 0
        try:
            workers = self._workers - own - {me}
            if workers:
                await asyncio.wait(workers, timeout=grace)
        finally:
            for run in list(self._running.values()):
                if run.worker not in own:
                    run.evicted = True
                    self._interrupt(run)
                    given_back += 1
            if self._consuming:
                await asyncio.wait(set(self._consuming))
        return max(0, was_running - given_back), given_back

    async def consume(
        self,
        num_messages: int | None = None,
        concurrency: int = 1,
        *,
        handle_signals: bool = False,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> int:
        """Process jobs from the queue until ``num_messages`` jobs were handled (None: until ``stop()``).

        A job is handled when a run of it ended (acked, retried or dead-lettered), or it was settled unrun
        by a rule: dead-lettered (undecodable, over its budget of lost runs), cancelled, expired, or a
        redelivery of a job that had succeeded; a message handed back to the queue unrun (a recorded
        redelivery) is not. ``concurrency`` jobs run at once. Returns how many jobs were handled. Cancelling
        this call gives every claimed, unfinished job back to its queue. While it runs, cancels of the queue's
        jobs are heard and running jobs' progress is written to their records (about once a second).

        ``handle_signals``: SIGTERM and SIGINT shut this consumer down gracefully and ``consume`` then returns
        normally: running jobs get ``shutdown_timeout`` seconds (default 25) to finish, the rest are given back
        uncharged; a second signal skips the wait (see :func:`mindtrace.jobs.worker.run_until_signalled`; the
        loop must run in the main thread, UsageError otherwise).
        """
        if handle_signals:
            return await run_until_signalled(
                [self], num_messages=num_messages, concurrency=concurrency, shutdown_timeout=shutdown_timeout
            )
        return await self._consume(num_messages, concurrency)

    async def _consume(self, num_messages: int | None, concurrency: int) -> int:
        if num_messages is not None and num_messages < 0:
            raise ConfigurationError(f"num_messages must be >= 0 or None, not {num_messages}")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, not {concurrency}")
        orchestrator = self.orchestrator
        self._stopping = False
        budget = _Budget(num_messages)
        lease = orchestrator.backend.capabilities.lease_timeout
        records = orchestrator.records
        finished = asyncio.get_running_loop().create_future()
        self._consuming.add(finished)
        try:
            listener = await orchestrator.state.listen_cancels(self.queue_name, self._heard_cancel) if records else None
            try:
                receiver_cm = await orchestrator.open_receiver(
                    self.queue_name, prefetch=concurrency, worker=self.worker_id
                )
                async with receiver_cm as receiver:
                    workers = [asyncio.create_task(self._work(receiver, budget)) for _ in range(concurrency)]
                    self._workers.update(workers)
                    # One task renews every running job's lease, one writes their progress: not one per job.
                    helpers = [] if lease is None else [asyncio.create_task(self._keep_leases(lease))]
                    if records:
                        helpers.append(asyncio.create_task(self._flush_progress()))
                    try:
                        await asyncio.gather(*workers)
                    finally:
                        for worker in workers:
                            worker.cancel()
                        await asyncio.gather(*workers, return_exceptions=True)
                        self._workers.difference_update(workers)
                        for helper in helpers:
                            helper.cancel()
                        await asyncio.gather(*helpers, return_exceptions=True)
            finally:
                if listener is not None:
                    await listener.close()
        finally:
            self._consuming.discard(finished)
            finished.set_result(None)
        return budget.handled

    async def _work(self, receiver: Receiver, budget: _Budget) -> None:
        worker = asyncio.current_task()
        assert worker is not None
        delay = RECONNECT_DELAY
        while not self._stopping and budget.take():
            try:
                delivery = await self._claim(receiver)
            except BackendUnavailableError as exc:
                budget.give_back()
                logger.warning("consumer of %r lost the broker, retrying in %.1fs: %s", self.queue_name, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            except QueueNotFoundError:
                budget.give_back()
                delay = await self._declare_lost_queue(delay)
                continue
            except BackendError as exc:
                # The broker answered with an error that may pass (Redis full, BUSY with another client's
                # script, MISCONF after a failed save): wait and claim again. A refusal cannot pass.
                if isinstance(exc, BackendRefusedError):
                    raise
                budget.give_back()
                logger.warning("consumer of %r got a broker error, retrying in %.1fs: %s", self.queue_name, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            if delivery is None:
                budget.give_back()
                continue
            delay = RECONNECT_DELAY
            if await self._handle(delivery, worker):
                budget.handled += 1
            else:
                budget.give_back()

    async def _declare_lost_queue(self, delay: float) -> float:
        """The broker lost the queue under this consumer (deleted elsewhere, or a broker restart without
        persistence): declare it again with its dead-letter queue, saying so, and go on after ``delay`` s (no
        busy loop if it stays gone). Returns the delay to wait after the next failure.

        A declare that fails is tried again (with the same back-off) until it succeeds or the consumer stops,
        not left to the next claim: a declare that failed halfway (the queue made, its dead-letter queue not,
        as when that is deleted meanwhile) lets the claim succeed, and the consumer would go on without its
        dead-letter queue and without saying it declared the queue again.
        """
        while True:
            try:
                if await self.orchestrator.ensure_queue(self.queue_name, refresh=True):
                    logger.warning(
                        "queue %r was gone from the broker: declared it again, consuming on", self.queue_name
                    )
                break
            except BackendError as exc:  # the broker is still coming back, or full: try again
                if isinstance(exc, BackendRefusedError):
                    raise
                logger.warning(
                    "consumer of %r could not declare its lost queue yet, retrying in %.1fs: %s",
                    self.queue_name,
                    delay,
                    exc,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            if self._stopping:
                return delay
        await asyncio.sleep(delay)
        return min(delay * 2, RECONNECT_MAX_DELAY)

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
            sent = self._idle_cancels.pop(worker, 0)
            if sys.version_info >= (3, 11):
                for _ in range(sent):  # take back stop()'s own cancellations; any other one is consume()'s
                    worker.uncancel()
                if worker.cancelling() > 0:
                    raise  # cancelled from outside too
            if not sent:
                raise
            return None
        finally:
            self._idle.discard(worker)
            # Cancels a driver swallowed (get() returned anyway): taken back too, or the run would see them.
            swallowed = self._idle_cancels.pop(worker, 0)
            if sys.version_info >= (3, 11):
                for _ in range(swallowed):
                    worker.uncancel()

    async def _handle(self, delivery: Delivery, worker: asyncio.Task[None]) -> bool:
        """Decode, decide before the run, run, decide after it, settle once; whether the job counts as handled."""
        orchestrator = self.orchestrator
        try:
            job = orchestrator.decode(delivery.body, delivery.queue)
        except DecodeError as exc:
            outcome = undecodable(exc)
        else:
            outcome = await self._before_run(delivery, job)
            if outcome.action is Action.RUN:
                outcome = await self._execute(delivery, job, worker)
        await self._settle(delivery, outcome)
        return outcome.counts

    async def _before_run(self, delivery: Delivery, job: Job) -> Outcome:
        """RUN, or settle unrun: a duplicate of a job that succeeded, an expired job, a lost run recorded."""
        orchestrator = self.orchestrator
        # Only a redelivery can be a duplicate (an ack lost after a store not written with the settle recorded
        # the success): the normal path pays no lookup.
        if delivery.delivery_count > 1 and orchestrator.records and await self._succeeded_before(delivery, job):
            logger.info(
                "job %s from %r was redelivered after it succeeded (its ack was lost): acked unrun",
                job.id,
                delivery.queue,
            )
            return duplicate(job)
        counted = orchestrator.backend.capabilities.counted_deliveries
        outcome = before_run(job, delivery.delivery_count, self.retry_policy, counted_deliveries=counted)
        if outcome.status is JobStatus.EXPIRED:
            logger.info("job %s from %r %s: settled as expired", job.id, delivery.queue, outcome.reason)
        return outcome

    async def _succeeded_before(self, delivery: Delivery, job: Job) -> bool:
        try:
            info = await self.orchestrator.state.info(delivery.queue, job.id)
        except BackendError as exc:
            logger.warning(
                "could not read the record of redelivered job %s from %r (running it): %s", job.id, delivery.queue, exc
            )
            return False
        return info.status is JobStatus.SUCCEEDED

    async def _execute(self, delivery: Delivery, job: Job, worker: asyncio.Task[None]) -> Outcome:
        """Run ``job`` with its context, unless a cancel of it is already known; the outcome to settle."""
        limit = job.timeout if job.timeout is not None else self.timeout
        context = JobContext(
            job.id, delivery.queue, job.attempts + 1, self.worker_id, None if limit is None else time.time() + limit
        )
        if self._stopping:
            context.mark_shutting_down()
        run = _Run(delivery, job, context, worker, limit)
        began = False  # whether run() was called (for the settle's hooks)
        # From here its lease is renewed, a cancel of it is heard, and shutdown() may cut it short.
        self._running[delivery] = run
        try:
            # RUNNING is recorded before the cancel check: a cancel that comes after the check then finds the
            # job running and reaches this consumer (one that came before is in the record the check reads).
            await self._record_started(run)
            if context.cancelled:
                logger.info("job %s from %r was cancelled before it started: settled unrun", job.id, delivery.queue)
                return cancelled(job, context.cancel_reason)
            if run.evicted:
                return release(job)
            hooks = awake(self.orchestrator.hooks) if self.orchestrator.hooks else None
            began = True
            if hooks:
                error, result, returned = await self._run_hooked(run, hooks)
            else:
                error, result, returned = await self._run(run)
        except BaseException:
            # Cancelled (or interrupted) mid-job: the job goes back to its queue (or ends CANCELLED when a cancel
            # of it arrived), whatever happens next.
            outcome = cancelled(job, context.cancel_reason) if context.cancelled else release(job)
            await asyncio.shield(self._settle(delivery, outcome._replace(ran=began)))
            raise
        finally:
            self._running.pop(delivery, None)
        outcome = self._after_run(run, error, result, returned)
        progress = context.take_progress()
        if progress is not None:  # the last report, while the record still says RUNNING
            await self._write_progress(run, progress)
        return outcome

    async def _record_started(self, run: _Run) -> None:
        """Record RUNNING and check for a cancel of the job, in that order (one step on stores that can; none
        when the claim did both: ``Delivery.started``)."""
        delivery = run.delivery
        if delivery.started:
            # A cancel heard since the claim, before the job was registered as running here, is honoured now.
            heard = self._early_cancels.pop(run.job.id, None)
            reason = delivery.cancel_reason
            if reason is None and heard is not None and heard[0] >= delivery.claimed_at:
                reason = heard[1] or ""
            if reason is not None and not run.context.cancelled:
                self._cancel(run, reason or None)
            return
        try:
            reason = await self.orchestrator.record_started(run.delivery.queue, run.job, self.worker_id)
        except BackendError as exc:
            logger.warning(
                "could not record job %s from %r as running, nor check for a cancel of it (running it anyway): %s",
                run.job.id,
                run.delivery.queue,
                exc,
            )
            return
        if reason is not None and not run.context.cancelled:
            self._cancel(run, reason or None)

    async def _run_hooked(self, run: _Run, hooks: Sequence[Hook]) -> tuple[BaseException | None, Any, bool]:
        """``_run`` inside every hook's ``run`` context manager, which sees the run's error as its exit's. A hook
        that raises before the run fails the run with its error; one that raises on its way out is logged and
        the run's own ending stands."""
        delivery, orchestrator = run.delivery, self.orchestrator
        event = RunEvent(
            delivery.queue,
            run.job,
            run.context,
            delivery.delivery_count,
            broker_name(orchestrator.backend),
            orchestrator,
        )
        error: BaseException | None = None
        outcome: tuple[BaseException | None, Any, bool] | None = None  # set once run() ended
        interrupted: BaseException | None = None  # a cancellation of the worker passing through the hooks
        try:
            manager = around([hook.run(event) for hook in hooks])
            if manager is None:  # every hook passed on this run (a tracing hook with no provider configured)
                return await self._run(run)
            with manager:
                try:
                    outcome = await self._run(run)
                except BaseException as exc:
                    interrupted = exc
                    raise
                error = outcome[0]
                if isinstance(error, Exception):
                    raise error
        except Exception as exc:
            if exc is error:
                return error, None, False
            if interrupted is not None or outcome is not None:
                # A hook failed on its way out: the run's own ending stands (a cancellation goes on, a result
                # is kept), and the hook's error is logged, not charged to the job.
                logger.exception("a hook failed after the run of job %s from %r", run.job.id, delivery.queue)
                if interrupted is not None:
                    raise interrupted from None
                assert outcome is not None
                return outcome
            return exc, None, False  # a hook failed before the run: the run fails with its error
        assert outcome is not None
        return outcome

    async def _run(self, run: _Run) -> tuple[BaseException | None, Any, bool]:
        """Call ``run`` with the job's context current, under its time limit: (error, result, returned)."""
        token = set_current(run.context)
        try:
            if run.limit is not None:
                run.timers.append(asyncio.get_running_loop().call_later(run.limit, self._time_out, run))
            # Awaited in the worker itself (no task per job) unless an async run has a time limit: only a task of
            # its own can be abandoned when it does not end once cancelled. A blocking run's wait always ends.
            if run.limit is None or self._blocking_run:
                return await self._run_inline(run)
            return await self._run_in_task(run)
        finally:
            reset_current(token)
            for timer in run.timers:
                timer.cancel()

    async def _run_inline(self, run: _Run) -> tuple[BaseException | None, Any, bool]:
        worker = run.worker
        error: BaseException | None = None
        result: Any = None
        run.task = worker  # a cancellation from here lands inside run()
        try:
            result = await self.run(run.job)
        except asyncio.CancelledError as exc:
            error = exc
        except Exception as exc:
            error = exc
        finally:
            run.task = None
        sent, run.sent = run.sent, 0
        if sys.version_info >= (3, 11):
            for _ in range(sent):  # take back this consumer's own cancellations; any other one is consume()'s
                worker.uncancel()
            external = worker.cancelling() > 0
        else:
            external = False
        if external or (isinstance(error, asyncio.CancelledError) and not sent):
            raise error if isinstance(error, asyncio.CancelledError) else asyncio.CancelledError()
        return error, result, error is None

    async def _run_in_task(self, run: _Run) -> tuple[BaseException | None, Any, bool]:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.run(run.job))  # copies this context: the job's context is current there
        finished: asyncio.Future[None] = loop.create_future()
        run.task, run.finished = task, finished
        task.add_done_callback(functools.partial(_resolve, finished))
        try:
            await finished
        except asyncio.CancelledError:
            # consume() is cancelled: the run is too, and waited for (abandoned after the grace).
            self._interrupt(run)
            await asyncio.shield(finished)
            raise
        if run.abandoned:
            return None, None, False
        if task.cancelled():
            return asyncio.CancelledError(), None, False
        error = task.exception()
        return error, None if error is not None else task.result(), error is None

    def _after_run(self, run: _Run, error: BaseException | None, result: Any, returned: bool) -> Outcome:
        """The outcome of a run that ended (or was abandoned): a cancel wins, then the time limit."""
        job, context, policy = run.job, run.context, self.retry_policy
        if context.cancelled:
            return cancelled(job, context.cancel_reason)._replace(ran=True)
        if context.timed_out:
            limit = run.limit or 0.0
            error = JobTimeoutError(job_id=job.id, queue=run.delivery.queue, limit=limit)
            return after_run(job, error, policy)._replace(timed_out=True)
        if not returned:
            if run.evicted:
                return release(job)._replace(ran=True)
            if not isinstance(error, Exception):  # its own task was cancelled, by nothing this consumer did
                error = RuntimeError("run() was cancelled, not by a cancel, a time limit or a shutdown")
            return after_run(job, error, policy)
        try:
            output = self._check_output(job, result, self.orchestrator.max_result_bytes, run.delivery.queue)
        except Exception as exc:
            return after_run(job, exc, policy)
        return after_run(job, None, policy)._replace(output=output)

    # -- cancels, time limits, abandonment (callbacks on the loop) -----------------------------------------

    def _heard_cancel(self, job_id: str, reason: str | None) -> None:
        """The state store's callback: a cancel of a job of this queue arrived.

        One of no job running here is kept a while (the last ``_EARLY_CANCELS``): it may be for a job this
        consumer's claim already recorded as RUNNING but that has not started yet.
        """
        found = False
        for run in list(self._running.values()):
            if run.job.id == job_id:
                found = True
                self._cancel(run, reason)
        if not found:
            self._early_cancels[job_id] = (asyncio.get_running_loop().time(), reason)
            while len(self._early_cancels) > _EARLY_CANCELS:
                del self._early_cancels[next(iter(self._early_cancels))]

    def _cancel(self, run: _Run, reason: str | None) -> None:
        if not run.context.mark_cancelled(reason):
            return
        if run.task is not None:
            logger.info(
                "job %s from %r was cancelled while running%s",
                run.job.id,
                run.delivery.queue,
                f": {reason}" if reason else "",
            )
        if not self._blocking_run:
            self._interrupt(run)

    def _time_out(self, run: _Run) -> None:
        run.context.mark_timed_out()
        if self._blocking_run:
            logger.warning(
                "job %s from %r ran over its time limit of %ss: recorded as failed; its blocking run() cannot be "
                "interrupted and is abandoned in its thread (its lease is no longer renewed; a new thread takes "
                "its slot). Run such jobs in a child process to be able to stop them",
                run.job.id,
                run.delivery.queue,
                run.limit,
            )
        else:
            logger.warning(
                "job %s from %r ran over its time limit of %ss: run() cancelled, recorded as failed",
                run.job.id,
                run.delivery.queue,
                run.limit,
            )
        self._interrupt(run)

    def _interrupt(self, run: _Run) -> None:
        """Cancel ``run``'s run() if it is under way (one not started yet is checked before it starts); a run
        with a task of its own that does not end within ABANDON_GRACE seconds is then abandoned."""
        task = run.task
        if task is None or task.done():
            return
        run.sent += 1
        task.cancel()
        if run.finished is not None and run.sent == 1:
            run.timers.append(asyncio.get_running_loop().call_later(ABANDON_GRACE, self._abandon, run))

    def _abandon(self, run: _Run) -> None:
        task, finished = run.task, run.finished
        if task is None or finished is None or task.done() or finished.done():
            return
        run.abandoned = True
        logger.warning(
            "run() of job %s from %r did not end within %.1fs of being cancelled (%s): abandoned, it goes on "
            "unwatched and its job is settled",
            run.job.id,
            run.delivery.queue,
            ABANDON_GRACE,
            run.why(),
        )
        task.add_done_callback(_retrieve)
        finished.set_result(None)

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
                cancel = await backend.extend(delivery, lease)
            except BackendError as exc:
                logger.warning("could not extend the lease of a job from %r: %s", delivery.queue, exc)
                return
            run = self._running.get(delivery)
            if cancel and run is not None:  # the fallback for a cancel signal this consumer missed
                self._cancel(run, None)

    async def _flush_progress(self) -> None:
        """Every PROGRESS_INTERVAL s, write the progress each running job reported since the last round (the
        latest report only): at most about one write a second per job, however often ``run`` reports."""
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            reports = [(run, run.context.take_progress()) for run in list(self._running.values())]
            writes = [self._write_progress(run, progress) for run, progress in reports if progress is not None]
            if writes:
                await asyncio.gather(*writes)

    async def _write_progress(self, run: _Run, progress: Progress) -> None:
        try:
            await self.orchestrator.record_progress(run.delivery.queue, run.job.id, progress)
        except BackendError as exc:
            logger.warning("could not record the progress of job %s from %r: %s", run.job.id, run.delivery.queue, exc)
