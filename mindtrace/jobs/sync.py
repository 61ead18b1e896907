"""Orchestrator and Consumer: the blocking API, delegating every call to the async core on the loop thread."""

from __future__ import annotations

import abc
import contextvars
import functools
import types
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast, overload

from mindtrace.jobs._loop_thread import DaemonPool, LoopThread, get_loop_thread
from mindtrace.jobs.backends.base import Backend, QueueStats
from mindtrace.jobs.constants import CLOSE_GRACE, MAX_RESULT_BYTES, RESULT_TTL, SHUTDOWN_TIMEOUT
from mindtrace.jobs.consumer import AsyncConsumer
from mindtrace.jobs.context import JobContext
from mindtrace.jobs.errors import UsageError
from mindtrace.jobs.handle import AsyncJobHandle, ModelT
from mindtrace.jobs.hooks import Hook
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus
from mindtrace.jobs.orchestrator import AsyncOrchestrator
from mindtrace.jobs.policy import RetryPolicy
from mindtrace.jobs.schedules import SCHEDULE_REFRESH, MisfirePolicy, ScheduleInfo
from mindtrace.jobs.state.base import StateStore
from mindtrace.jobs.types import Job, JobOutput, JobSchema
from mindtrace.jobs.wire import SchemaTypes
from mindtrace.jobs.worker import ShutdownRequest, blocking_signals, run_until_signalled


class JobHandle(str):
    """The blocking twin of :class:`AsyncJobHandle`: a ``str`` equal to the job id, whose methods block.

    ``Orchestrator.publish`` returns one; ``Orchestrator.job(id, queue)`` makes one. The async handle is ``.aio``.
    A handle pickles (and JSON-encodes) as its plain id.
    """

    aio: AsyncJobHandle
    _thread: LoopThread

    def __new__(cls, handle: AsyncJobHandle, thread: LoopThread) -> JobHandle:
        self = super().__new__(cls, str(handle))
        self.aio = handle
        self._thread = thread
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))

    def __repr__(self) -> str:
        return f"<JobHandle {str(self)!r} on {self.queue!r}>"

    @property
    def id(self) -> str:
        """The job id (a plain ``str``)."""
        return str(self)

    @property
    def queue(self) -> str:
        """The queue the job was published on."""
        return self.aio.queue

    def info(self) -> JobInfo:
        """See :meth:`AsyncJobHandle.info`."""
        return self._thread.run(self.aio.info(), "JobHandle")

    def status(self) -> JobStatus:
        """See :meth:`AsyncJobHandle.status`."""
        return self._thread.run(self.aio.status(), "JobHandle")

    def wait(self, timeout: float | None = None) -> JobInfo:
        """See :meth:`AsyncJobHandle.wait`; Ctrl-C ends the wait (the job goes on)."""
        return self._thread.run(self.aio.wait(timeout), "JobHandle")

    def result(self, timeout: float | None = None) -> JobOutput | None:
        """See :meth:`AsyncJobHandle.result`."""
        return self._thread.run(self.aio.result(timeout), "JobHandle")

    def result_as(self, model: type[ModelT], timeout: float | None = None) -> ModelT:
        """See :meth:`AsyncJobHandle.result_as`."""
        return self._thread.run(self.aio.result_as(model, timeout), "JobHandle")

    def cancel(self, reason: str | None = None) -> CancelOutcome:
        """See :meth:`AsyncJobHandle.cancel`."""
        return self._thread.run(self.aio.cancel(reason), "JobHandle")


class Orchestrator:
    """The blocking twin of :class:`AsyncOrchestrator`; each method runs the async one on a background loop.

    Safe from several threads at once and from inside a running event loop. Ctrl-C during any call cancels
    that call on the loop and waits (briefly) for its clean-up, so an interrupted ``receive_message`` takes
    no job after it returned. Close it with ``close()`` or
    ``with``; one left open is closed at interpreter exit. The async orchestrator is ``.aio``.
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
        self._thread = get_loop_thread()
        self.aio = AsyncOrchestrator(
            backend, state=state, result_ttl=result_ttl, max_result_bytes=max_result_bytes, hooks=hooks
        )
        self._thread.track(self.aio)

    def __repr__(self) -> str:
        return f"<Orchestrator {self.aio.backend.describe()}>"

    @property
    def backend(self) -> Backend:
        """The backend this orchestrator runs on."""
        return self.aio.backend

    @property
    def schemas(self) -> Mapping[str, SchemaTypes]:
        """The schemas registered with this orchestrator, by name."""
        return self.aio.schemas

    def register(self, schema: JobSchema) -> str:
        """See :meth:`AsyncOrchestrator.register`."""
        return self._thread.run(self.aio.register(schema), "Orchestrator")

    def declare_queue(self, queue_name: str, *, result_ttl: float | None = None, **options: Any) -> None:
        """See :meth:`AsyncOrchestrator.declare_queue`."""
        return self._thread.run(self.aio.declare_queue(queue_name, result_ttl=result_ttl, **options), "Orchestrator")

    @overload
    def publish(
        self,
        queue_name: str,
        job: Job,
        /,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> JobHandle: ...

    @overload
    def publish(
        self,
        job: Job,
        /,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> JobHandle: ...

    def publish(
        self,
        queue_or_job: str | Job,
        job: Job | None = None,
        /,
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_key: str | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> JobHandle:
        """See :meth:`AsyncOrchestrator.publish`; returns a :class:`JobHandle` (a ``str``: the job id)."""
        if isinstance(queue_or_job, Job) and job is None:
            publish = self.aio.publish(
                queue_or_job, delay=delay, run_at=run_at, dedup_key=dedup_key, dedup_ttl=dedup_ttl
            )
        else:  # the async core checks both arguments
            publish = self.aio.publish(
                cast(str, queue_or_job),
                cast(Job, job),
                delay=delay,
                run_at=run_at,
                dedup_key=dedup_key,
                dedup_ttl=dedup_ttl,
            )
        return JobHandle(self._thread.run(publish, "Orchestrator"), self._thread)

    def publish_many(
        self,
        queue_name: str,
        jobs: Sequence[Job],
        *,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        dedup_keys: Sequence[str | None] | None = None,
        dedup_ttl: float | timedelta | None = None,
    ) -> list[JobHandle]:
        """See :meth:`AsyncOrchestrator.publish_many`."""
        publish = self.aio.publish_many(
            queue_name, jobs, delay=delay, run_at=run_at, dedup_keys=dedup_keys, dedup_ttl=dedup_ttl
        )
        handles = self._thread.run(publish, "Orchestrator")
        return [JobHandle(handle, self._thread) for handle in handles]

    def job(self, job_id: str, queue: str) -> JobHandle:
        """See :meth:`AsyncOrchestrator.job`."""
        return JobHandle(self.aio.job(job_id, queue), self._thread)

    def job_info(self, job_id: str, queue: str) -> JobInfo:
        """See :meth:`AsyncOrchestrator.job_info`."""
        return self._thread.run(self.aio.job_info(job_id, queue), "Orchestrator")

    def cancel(self, job_id: str, queue: str, *, reason: str | None = None) -> CancelOutcome:
        """See :meth:`AsyncOrchestrator.cancel`."""
        return self._thread.run(self.aio.cancel(job_id, queue, reason=reason), "Orchestrator")

    def receive_message(self, queue_name: str, timeout: float | None = None) -> Job | None:
        """See :meth:`AsyncOrchestrator.receive_message`."""
        return self._thread.run(self.aio.receive_message(queue_name, timeout), "Orchestrator")

    def list_queues(self) -> list[str]:
        """See :meth:`AsyncOrchestrator.list_queues`."""
        return self._thread.run(self.aio.list_queues(), "Orchestrator")

    def queue_stats(self, queue_name: str) -> QueueStats:
        """See :meth:`AsyncOrchestrator.queue_stats`."""
        return self._thread.run(self.aio.queue_stats(queue_name), "Orchestrator")

    def peek_dead_letters(self, queue_name: str, limit: int = 10) -> list[Job]:
        """See :meth:`AsyncOrchestrator.peek_dead_letters`."""
        return self._thread.run(self.aio.peek_dead_letters(queue_name, limit), "Orchestrator")

    def count_queue_messages(self, queue_name: str) -> int:
        """See :meth:`AsyncOrchestrator.count_queue_messages`."""
        return self._thread.run(self.aio.count_queue_messages(queue_name), "Orchestrator")

    def clean_queue(self, queue_name: str) -> int:
        """See :meth:`AsyncOrchestrator.clean_queue`."""
        return self._thread.run(self.aio.clean_queue(queue_name), "Orchestrator")

    def delete_queue(self, queue_name: str) -> None:
        """See :meth:`AsyncOrchestrator.delete_queue`."""
        return self._thread.run(self.aio.delete_queue(queue_name), "Orchestrator")

    def requeue_dead_letters(self, queue_name: str, limit: int | None = None) -> int:
        """See :meth:`AsyncOrchestrator.requeue_dead_letters`."""
        return self._thread.run(self.aio.requeue_dead_letters(queue_name, limit), "Orchestrator")

    def schedule(
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
        """See :meth:`AsyncOrchestrator.schedule`."""
        upsert = self.aio.schedule(name, queue_name, job, cron=cron, tz=tz, every=every, misfire=misfire, grace=grace)
        return self._thread.run(upsert, "Orchestrator")

    def unschedule(self, name: str) -> bool:
        """See :meth:`AsyncOrchestrator.unschedule`."""
        return self._thread.run(self.aio.unschedule(name), "Orchestrator")

    def schedules(self) -> list[ScheduleInfo]:
        """See :meth:`AsyncOrchestrator.schedules`."""
        return self._thread.run(self.aio.schedules(), "Orchestrator")

    def run_schedules(self, *, refresh: float = SCHEDULE_REFRESH) -> None:
        """See :meth:`AsyncOrchestrator.run_schedules`: blocks, firing schedules, until Ctrl-C."""
        return self._thread.run(self.aio.run_schedules(refresh=refresh), "Orchestrator")

    def stop_schedules(self) -> None:
        """See :meth:`AsyncOrchestrator.stop_schedules` (a blocked ``run_schedules`` in another thread then
        raises CancelledError)."""
        return self._thread.run(self.aio.stop_schedules(), "Orchestrator")

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """See :meth:`AsyncOrchestrator.close`."""
        return self._thread.run(self.aio.close(grace), "Orchestrator")

    def __enter__(self) -> Orchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()


#: The thread pool of the consume() call whose worker tasks see it (each call has its own; tasks copy it).
_CALL_POOL: contextvars.ContextVar[DaemonPool | None] = contextvars.ContextVar("mindtrace_jobs_pool", default=None)


class _ThreadedRun(AsyncConsumer):
    """The async consumer behind a sync Consumer: runs the user's blocking ``run`` in a bounded thread pool.

    Each ``consume()`` call has a pool of its own, found by its worker tasks through a context variable, so
    calls running at once (from two threads) never share or end each other's pool. The pool runs each call in
    a copy of the worker's context, so the job's context is current in its thread.
    """

    _blocking_run = True

    def __init__(self, owner: Consumer, job_type_name: str, **options: Any) -> None:
        super().__init__(job_type_name, **options)
        self._owner = owner

    async def run(self, job: Job) -> Any:
        pool = _CALL_POOL.get()
        if pool is None:
            raise UsageError("consume() is not running")
        return await pool.submit(functools.partial(self._owner.run, job))

    async def _consume(self, num_messages: int | None, concurrency: int) -> int:
        pool = DaemonPool(concurrency, "mindtrace-jobs-run")
        token = _CALL_POOL.set(pool)  # this call's task and the worker tasks it creates see it
        try:
            return await super()._consume(num_messages, concurrency)
        finally:
            _CALL_POOL.reset(token)
            pool.shutdown()


class Consumer(abc.ABC):
    """Base class of a blocking worker: subclass it, implement ``run(job)``, ``connect()``, ``consume()``.

    ``run`` is a plain function and runs in a thread pool of ``concurrency`` threads, off the event loop, so
    blocking code is fine. Delivery guarantees, retries (``retry_policy`` and the keyword options) and
    dead-lettering are those of :class:`AsyncConsumer`, which does the work. Ctrl-C during ``consume()``
    gives unfinished jobs back to the queue before KeyboardInterrupt propagates.

    Inside ``run``, ``self.context`` is the running job's :class:`JobContext` (one per job, in its thread). A
    thread cannot be interrupted: a cancel of a running job sets ``context.cancelled`` (check it and return;
    the job then ends CANCELLED whatever ``run`` returns), and a run over its ``timeout`` is recorded as
    failed and abandoned in its thread (its result dropped, its slot given to a new thread): for code that
    may hang in native calls, run the work in a child process you can kill.
    """

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
        self._thread = get_loop_thread()
        self.aio = _ThreadedRun(
            self,
            job_type_name,
            timeout=timeout,
            retry_policy=retry_policy,
            max_retries=max_retries,
            retry_delay=retry_delay,
            retry_backoff=retry_backoff,
            max_retry_delay=max_retry_delay,
        )

    @property
    def queue_name(self) -> str:
        """The queue this consumer takes jobs from."""
        return self.aio.queue_name

    @property
    def timeout(self) -> float | None:
        """Seconds each run may take (None: no limit); a job's own ``timeout`` replaces it."""
        return self.aio.timeout

    @property
    def context(self) -> JobContext:
        """The context of the job running in the calling thread (see :attr:`AsyncConsumer.context`);
        UsageError outside ``run``."""
        return self.aio.context

    @abc.abstractmethod
    def run(self, job: Job) -> Any:
        """Process one job (blocking code is fine). Return None or an output; raise to retry."""

    def connect(self, orchestrator: Orchestrator) -> None:
        """Consume through ``orchestrator`` (a sync Orchestrator)."""
        if not isinstance(orchestrator, Orchestrator):
            raise UsageError(f"connect() takes an Orchestrator, not {type(orchestrator).__name__}")
        self.aio.connect(orchestrator.aio)

    def consume(
        self,
        num_messages: int | None = None,
        concurrency: int = 1,
        *,
        handle_signals: bool = False,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> int:
        """See :meth:`AsyncConsumer.consume`; blocks until done. Returns how many messages were handled.

        ``handle_signals`` (main thread only, UsageError otherwise): while it runs, SIGTERM and SIGINT shut the
        consumer down gracefully and ``consume`` returns normally: running jobs get ``shutdown_timeout``
        seconds to finish, the rest are given back uncharged; a second signal skips the wait. The previous
        signal handlers are put back when it returns.
        """
        if not handle_signals:
            return self._thread.run(self.aio.consume(num_messages, concurrency), "Consumer")
        request = ShutdownRequest()
        with blocking_signals(request, self._thread.call_soon):
            run = run_until_signalled(
                [self.aio],
                num_messages=num_messages,
                concurrency=concurrency,
                shutdown_timeout=shutdown_timeout,
                request=request,
            )
            return self._thread.run(run, "Consumer")

    def stop(self) -> None:
        """Ask a running ``consume()`` to return after the jobs it runs now (their ``context.shutting_down``
        becomes True); callable from any thread."""
        self._thread.call_soon(self.aio.stop)
