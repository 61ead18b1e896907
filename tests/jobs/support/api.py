"""One face for the conformance suite over the async API and the sync facade, so each test is written once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Consumer, Job, Orchestrator
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.context import JobContext
from mindtrace.jobs.handle import AsyncJobHandle
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus
from mindtrace.jobs.state.base import StateStore
from mindtrace.jobs.sync import JobHandle

#: A test's job handler: an async function, run on the test's event loop for both APIs.
Handler = Callable[[Job], Awaitable[Any]]


class ConsumerHandle:
    """A consumer of either API, driven from the test's event loop."""

    def __init__(
        self,
        consume: Callable[[int | None, int], Awaitable[int]],
        stop: Callable[[], None],
        context: Callable[[], JobContext],
        worker_id: str,
    ):
        self._consume = consume
        self._context = context
        self.stop = stop
        #: The worker id the consumer records in the jobs it runs (``JobInfo.worker``).
        self.worker_id = worker_id

    async def consume(self, num_messages: int | None = None, concurrency: int = 1) -> int:
        return await self._consume(num_messages, concurrency)

    @property
    def context(self) -> JobContext:
        """The consumer's ``self.context``, as its ``run`` sees it (read it from inside a handler)."""
        return self._context()


class Api:
    """The orchestrator operations under test, as coroutines, whichever API is underneath.

    Every AsyncOrchestrator method is available under its own name (``await api.publish(q, job)``), except
    the handle operations, which take the handle ``publish`` (or ``job``) returned and call its own method:
    ``await api.status(handle)``, ``info``, ``wait``, ``result``, ``result_as``, ``cancel`` (the async
    handle's coroutine, or the blocking JobHandle's method in a thread of its own, as a script calls it).
    ``options`` are the orchestrator's keyword options (``state=`` for a store other than the backend's).
    """

    kind: str
    orchestrator: Any
    #: The handle type ``publish`` returns through this API.
    handle_type: type[str]

    def __init__(self, backend: Backend, **options: Any) -> None:
        self.options = options

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    def consumer(self, queue: str, handler: Handler, **options: Any) -> ConsumerHandle:
        raise NotImplementedError

    def sibling(self, backend: Backend, **options: Any) -> Api:
        """Another orchestrator of the same API over ``backend`` (a second client, as another process has),
        with this one's options (the same state store URL) unless ``options`` say otherwise."""
        return type(self)(backend, **{**self.options, **options})

    async def run_on_loop(self, coro: Awaitable[Any]) -> Any:
        """Await ``coro`` where this API's backend lives (the loop thread for the sync API)."""
        return await coro

    @property
    def store(self) -> StateStore:
        """The state store of this API's orchestrator (for its capabilities, and to follow a record)."""
        raise NotImplementedError

    @property
    def aio(self) -> AsyncOrchestrator:
        """The async orchestrator underneath (itself for the async API)."""
        return getattr(self.orchestrator, "aio", self.orchestrator)  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def scheduler(self, refresh: float = 0.5) -> AsyncIterator[None]:
        """Run this orchestrator's ``run_schedules`` (where its backend lives) while the block runs."""
        task = asyncio.ensure_future(self.run_on_loop(self.aio.run_schedules(refresh=refresh)))
        try:
            yield
        finally:
            await self.aio.stop_schedules()
            task.cancel()  # not started yet: never registered
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def job(self, job_id: str, queue: str) -> Any:
        """The orchestrator's handle on ``job_id`` of ``queue`` (no I/O)."""
        return self.orchestrator.job(job_id, queue)

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The orchestrator method ``name`` (for those the handle operations shadow, e.g. ``cancel``)."""
        raise NotImplementedError

    async def _on_handle(self, handle: str, name: str, *args: Any) -> Any:
        raise NotImplementedError

    async def status(self, handle: str) -> JobStatus:
        """``handle.status()``."""
        return await self._on_handle(handle, "status")  # type: ignore[no-any-return]

    async def info(self, handle: str) -> JobInfo:
        """``handle.info()``."""
        return await self._on_handle(handle, "info")  # type: ignore[no-any-return]

    async def wait(self, handle: str, timeout: float | None = None) -> JobInfo:
        """``handle.wait(timeout)``."""
        return await self._on_handle(handle, "wait", timeout)  # type: ignore[no-any-return]

    async def result(self, handle: str, timeout: float | None = None) -> Any:
        """``handle.result(timeout)``."""
        return await self._on_handle(handle, "result", timeout)

    async def result_as(self, handle: str, model: type[Any], timeout: float | None = None) -> Any:
        """``handle.result_as(model, timeout)``."""
        return await self._on_handle(handle, "result_as", model, timeout)

    async def cancel(self, handle: str, reason: str | None = None) -> CancelOutcome:
        """``handle.cancel(reason)``."""
        return await self._on_handle(handle, "cancel", reason)  # type: ignore[no-any-return]

    async def history(
        self, handle: str, until: Callable[[JobInfo], bool], timeout: float = 10.0, queue: str | None = None
    ) -> list[JobInfo]:
        """Follow the job's record through the store's watch (woken by the store, never polled) until
        ``until(record)`` holds: every record seen on the way, the last one satisfying ``until``.
        AssertionError after ``timeout`` s, naming what was seen."""
        store, job_queue = self.store, queue or handle.queue  # type: ignore[attr-defined]
        seen: list[JobInfo] = []

        async def follow() -> list[JobInfo]:
            deadline = asyncio.get_running_loop().time() + timeout
            async with store.watch(job_queue, str(handle)) as watch:
                while True:
                    info = await watch.next(deadline)
                    if info is None:
                        raise AssertionError(f"the record never got there in {timeout}s; seen: {_statuses(seen)}")
                    seen.append(info)
                    if until(info):
                        return seen

        return await self.run_on_loop(follow())  # type: ignore[no-any-return]

    async def wait_until(self, handle: str, until: Callable[[JobInfo], bool], timeout: float = 10.0) -> JobInfo:
        """The job's record once ``until(record)`` holds (see :meth:`history`)."""
        return (await self.history(handle, until, timeout))[-1]


def _statuses(seen: list[JobInfo]) -> list[str]:
    return [info.status.value for info in seen]


class AsyncApi(Api):
    kind = "async"
    handle_type = AsyncJobHandle

    def __init__(self, backend: Backend, **options: Any) -> None:
        super().__init__(backend, **options)
        self.orchestrator = AsyncOrchestrator(backend, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.orchestrator, name)

    @property
    def store(self) -> StateStore:
        return self.orchestrator.state  # type: ignore[no-any-return]

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self.orchestrator, name)(*args, **kwargs)

    async def _on_handle(self, handle: str, name: str, *args: Any) -> Any:
        assert isinstance(handle, AsyncJobHandle), f"the async API gave {type(handle).__name__}, not AsyncJobHandle"
        return await getattr(handle, name)(*args)

    def consumer(self, queue: str, handler: Handler, **options: Any) -> ConsumerHandle:
        class _Consumer(AsyncConsumer):
            async def run(self, job: Job) -> Any:
                return await handler(job)

        consumer = _Consumer(queue, **options)
        consumer.connect(self.orchestrator)
        return ConsumerHandle(consumer.consume, consumer.stop, lambda: consumer.context, consumer.worker_id)  # type: ignore[attr-defined]


class SyncApi(Api):
    """Each call runs the blocking method in a worker thread, as a script's thread would call it."""

    kind = "sync"
    handle_type = JobHandle

    def __init__(self, backend: Backend, **options: Any) -> None:
        super().__init__(backend, **options)
        self.orchestrator = Orchestrator(backend, **options)

    async def run_on_loop(self, coro: Awaitable[Any]) -> Any:
        from mindtrace.jobs._loop_thread import get_loop_thread

        return await asyncio.to_thread(get_loop_thread().run, coro, "test")  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.orchestrator, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    @property
    def store(self) -> StateStore:
        return self.orchestrator.aio.state  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def scheduler(self, refresh: float = 0.5) -> AsyncIterator[None]:
        from mindtrace.jobs._loop_thread import get_loop_thread

        running = asyncio.run_coroutine_threadsafe(self.aio.run_schedules(refresh=refresh), get_loop_thread().loop)
        try:
            yield
        finally:
            await asyncio.to_thread(self.orchestrator.stop_schedules)
            running.cancel()  # not started yet: never registered
            with contextlib.suppress(asyncio.CancelledError, concurrent.futures.CancelledError):
                await asyncio.wrap_future(running)

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.orchestrator, name), *args, **kwargs)

    async def _on_handle(self, handle: str, name: str, *args: Any) -> Any:
        assert isinstance(handle, JobHandle), f"the sync API gave {type(handle).__name__}, not JobHandle"
        # A thread per call, not the loop's default executor: a test may block 200 handles at once, which
        # would starve that small pool (and the consume() calls queued behind them).
        return await in_thread(getattr(handle, name), *args)

    def consumer(self, queue: str, handler: Handler, **options: Any) -> ConsumerHandle:
        test_loop = asyncio.get_running_loop()

        class _Consumer(Consumer):
            def run(self, job: Job) -> Any:
                # Blocking code in a pool thread, as users write it; the handler itself runs on the test loop
                # (in a task that copies this thread's context, so current_job() works there too).
                return asyncio.run_coroutine_threadsafe(handler(job), test_loop).result()

        consumer = _Consumer(queue, **options)
        consumer.connect(self.orchestrator)

        async def consume(num_messages: int | None, concurrency: int) -> int:
            return await asyncio.to_thread(consumer.consume, num_messages, concurrency)

        return ConsumerHandle(consume, consumer.stop, lambda: consumer.context, consumer.aio.worker_id)  # type: ignore[attr-defined]


async def in_thread(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` in a new daemon thread, awaited from the running loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def main() -> None:
        result, error = None, None
        try:
            result = call(*args)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the test's loop is gone (it failed or timed out first)
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=main, name="test-blocking-call", daemon=True).start()
    return await future
