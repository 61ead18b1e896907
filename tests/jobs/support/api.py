"""One face for the conformance suite over the async API and the sync facade, so each test is written once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Consumer, Job, Orchestrator
from mindtrace.jobs.backends.base import Backend

#: A test's job handler: an async function, run on the test's event loop for both APIs.
Handler = Callable[[Job], Awaitable[Any]]


class ConsumerHandle:
    """A consumer of either API, driven from the test's event loop."""

    def __init__(self, consume: Callable[[int | None, int], Awaitable[int]], stop: Callable[[], None]):
        self._consume = consume
        self.stop = stop

    async def consume(self, num_messages: int | None = None, concurrency: int = 1) -> int:
        return await self._consume(num_messages, concurrency)


class Api:
    """The orchestrator operations under test, as coroutines, whichever API is underneath.

    Every AsyncOrchestrator method is available under its own name (``await api.publish(q, job)``).
    """

    kind: str
    orchestrator: Any

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

    def consumer(self, queue: str, handler: Handler, **options: Any) -> ConsumerHandle:
        raise NotImplementedError

    def sibling(self, backend: Backend) -> Api:
        """Another orchestrator of the same API over ``backend`` (a second client, as another process has)."""
        return type(self)(backend)  # type: ignore[call-arg]

    async def run_on_loop(self, coro: Awaitable[Any]) -> Any:
        """Await ``coro`` where this API's backend lives (the loop thread for the sync API)."""
        return await coro


class AsyncApi(Api):
    kind = "async"

    def __init__(self, backend: Backend) -> None:
        self.orchestrator = AsyncOrchestrator(backend)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.orchestrator, name)

    def consumer(self, queue: str, handler: Handler, **options: Any) -> ConsumerHandle:
        class _Consumer(AsyncConsumer):
            async def run(self, job: Job) -> Any:
                return await handler(job)

        consumer = _Consumer(queue, **options)
        consumer.connect(self.orchestrator)
        return ConsumerHandle(consumer.consume, consumer.stop)


class SyncApi(Api):
    """Each call runs the blocking method in a worker thread, as a script's thread would call it."""

    kind = "sync"

    def __init__(self, backend: Backend) -> None:
        self.orchestrator = Orchestrator(backend)

    async def run_on_loop(self, coro: Awaitable[Any]) -> Any:
        from mindtrace.jobs._loop_thread import get_loop_thread

        return await asyncio.to_thread(get_loop_thread().run, coro, "test")  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.orchestrator, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call

    def consumer(self, queue: str, handler: Handler, **options: Any) -> ConsumerHandle:
        test_loop = asyncio.get_running_loop()

        class _Consumer(Consumer):
            def run(self, job: Job) -> Any:
                # Blocking code in a pool thread, as users write it; the handler itself runs on the test loop.
                return asyncio.run_coroutine_threadsafe(handler(job), test_loop).result()

        consumer = _Consumer(queue, **options)
        consumer.connect(self.orchestrator)

        async def consume(num_messages: int | None, concurrency: int) -> int:
            return await asyncio.to_thread(consumer.consume, num_messages, concurrency)

        return ConsumerHandle(consume, consumer.stop)
