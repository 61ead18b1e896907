"""Worker lifecycle: run consumers until SIGTERM or SIGINT, then shut them down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from mindtrace.jobs.constants import RECONNECT_DELAY, RECONNECT_MAX_DELAY, SHUTDOWN_TIMEOUT
from mindtrace.jobs.errors import BackendError, BackendRefusedError, ConfigurationError, UsageError

if TYPE_CHECKING:
    from mindtrace.jobs.consumer import AsyncConsumer

logger = logging.getLogger("mindtrace.jobs")

_T = TypeVar("_T")

#: The signals a worker shuts down on: the first asks for a graceful shutdown, the second cuts it short.
SHUTDOWN_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


class ShutdownRequest:
    """What the shutdown signals asked for: the first a graceful shutdown, a second one to cut it short.

    :meth:`request` is the one place a signal lands, whoever installed the handler (:func:`loop_signals` on an
    event loop in the main thread, :func:`blocking_signals` for the blocking API); call it on the event loop.
    A program may also call it itself (from the loop) to stop a :func:`run_until_signalled` call.
    """

    def __init__(self) -> None:
        #: How many times a shutdown was requested.
        self.count = 0
        self._graceful = asyncio.Event()
        self._cut_short = asyncio.Event()

    @property
    def requested(self) -> bool:
        """Whether a shutdown was requested."""
        return self.count > 0

    @property
    def cut_short(self) -> bool:
        """Whether a second request asked to skip the wait for running jobs."""
        return self.count > 1

    def request(self, signum: int | None = None) -> None:
        """Ask for a shutdown (``signum``: the signal that asked, for the log); a second call cuts it short."""
        self.count += 1
        by = signal.Signals(signum).name if signum is not None else "a shutdown request"
        if self.count == 1:
            logger.warning("received %s: no new job is claimed; a second signal cuts running jobs short", by)
            self._graceful.set()
        else:
            logger.warning("received %s again: cutting running jobs short, giving them back uncharged", by)
            self._cut_short.set()

    async def wait(self) -> None:
        """Return once a shutdown was requested."""
        await self._graceful.wait()

    async def wait_cut_short(self) -> None:
        """Return once a second request asked to cut the shutdown short."""
        await self._cut_short.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if a shutdown is requested meanwhile; whether one was."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._graceful.wait(), seconds)
        return self.requested


def _check_main_thread(what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise UsageError(
            f"{what} needs the main thread (Python delivers signals only there): call stop() or shutdown() "
            "yourself when consuming from another thread"
        )


@contextlib.contextmanager
def loop_signals(request: ShutdownRequest) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``request`` while the block runs, through the running loop's
    ``add_signal_handler`` (the loop must run in the main thread: UsageError otherwise). On exit the handlers
    are removed (SIGINT raises KeyboardInterrupt again, SIGTERM ends the process again)."""
    _check_main_thread("handling signals")
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        loop.add_signal_handler(sig, request.request, sig)
    try:
        yield
    finally:
        for sig in SHUTDOWN_SIGNALS:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def blocking_signals(request: ShutdownRequest, call_soon: Callable[[Callable[[], object]], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``request`` while the block runs, for a loop in another thread:
    ``signal.signal`` handlers (main thread only: UsageError otherwise) hand each signal to the loop through
    ``call_soon`` (thread-safe). The previous handlers are put back on exit."""
    _check_main_thread("consume(handle_signals=True)")

    def handler(signum: int, frame: FrameType | None) -> None:
        call_soon(functools.partial(request.request, signum))

    previous = {sig: signal.signal(sig, handler) for sig in SHUTDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


async def retry_until_ready(
    operation: Callable[[], Awaitable[_T]],
    what: str,
    request: ShutdownRequest | None = None,
    *,
    interruptible: bool = False,
) -> _T | None:
    """Await ``operation()`` until the broker answers: an unreachable or failing broker (any BackendError but
    a refusal) is retried with a logged, doubling backoff (0.1 s up to 5 s). A refusal (bad credentials, an
    unknown vhost) is raised at once. Returns None, without trying again, once ``request`` asks for a shutdown;
    with ``interruptible``, an attempt under way then is cancelled too (a connect waiting for its timeout).
    """
    delay = RECONNECT_DELAY
    while request is None or not request.requested:
        try:
            if interruptible and request is not None:
                return await _unless_requested(operation(), request)
            return await operation()
        except BackendRefusedError:
            raise
        except BackendError as exc:
            logger.warning("%s: the broker did not answer, retrying in %.1fs: %s", what, delay, exc)
        if request is not None:
            if await request.sleep(delay):
                break
        else:
            await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX_DELAY)
    return None


async def _unless_requested(awaitable: Awaitable[_T], request: ShutdownRequest) -> _T | None:
    """``awaitable``'s result, or None once ``request`` asks for a shutdown first (``awaitable`` cancelled)."""
    task = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(request.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def run_until_signalled(
    consumers: Sequence[AsyncConsumer],
    *,
    num_messages: int | None = None,
    concurrency: int = 1,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    request: ShutdownRequest | None = None,
) -> int:
    """Run every consumer's ``consume(num_messages, concurrency)`` side by side until a shutdown is requested
    (SIGTERM or SIGINT), then shut them down gracefully; returns how many jobs they handled in all.

    With ``request`` None, SIGTERM and SIGINT are handled on the running loop, which must run in the main
    thread (see :func:`loop_signals`); otherwise the caller routes them to ``request``. On the first one no
    consumer claims a new job, running jobs get ``shutdown_timeout`` seconds to finish and be settled (their
    leases still renewed, their ``context.shutting_down`` set), then the rest are cancelled and given back to
    their queue uncharged (attempts unchanged), ahead of the jobs waiting at their priority. A second signal
    skips the wait. A consumer whose broker is unreachable when it starts keeps trying (logged backoff); one
    that fails (a refusal) stops the others and its error is raised.
    """
    if not shutdown_timeout >= 0:
        raise ConfigurationError(f"shutdown_timeout must be a number of seconds >= 0, not {shutdown_timeout}")
    if request is None:
        request = ShutdownRequest()
        with loop_signals(request):
            return await _run(consumers, num_messages, concurrency, shutdown_timeout, request)
    return await _run(consumers, num_messages, concurrency, shutdown_timeout, request)


async def _run(
    consumers: Sequence[AsyncConsumer],
    num_messages: int | None,
    concurrency: int,
    grace: float,
    request: ShutdownRequest,
) -> int:
    async def consume(consumer: AsyncConsumer) -> int:
        handled = await retry_until_ready(
            lambda: consumer.consume(num_messages, concurrency), f"consumer of {consumer.queue_name!r}", request
        )
        return handled or 0

    tasks = [asyncio.create_task(consume(consumer)) for consumer in consumers]
    stop = asyncio.create_task(request.wait())
    try:
        pending: set[asyncio.Task[int]] = set(tasks)
        while pending and not stop.done():
            done, _ = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
            if any(not task.cancelled() and task.exception() is not None for task in done if task is not stop):
                break  # one failed: stop the others, then raise its error
        if pending:
            await _drain(consumers, grace, request)
        return sum(await asyncio.gather(*tasks))
    finally:
        stop.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(stop, *tasks, return_exceptions=True)


async def _drain(consumers: Sequence[AsyncConsumer], grace: float, request: ShutdownRequest) -> None:
    """Shut every consumer down with ``grace``, or with none from a second signal on."""
    logger.info("stopping %d consumer(s): running jobs get up to %.1fs to finish", len(consumers), grace)
    graceful: asyncio.Future[list[tuple[int, int]]] = asyncio.ensure_future(
        asyncio.gather(*(consumer.shutdown(grace) for consumer in consumers))
    )
    cut = asyncio.ensure_future(request.wait_cut_short())
    try:
        await asyncio.wait([graceful, cut], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        results = await graceful if graceful.done() else None
        if results is None:
            results = await asyncio.gather(*(consumer.shutdown(0.0) for consumer in consumers))
            await graceful
    finally:
        cut.cancel()
    settled, given_back = sum(r[0] for r in results), sum(r[1] for r in results)
    (logger.warning if given_back else logger.info)(
        "stopped: %d running job(s) finished, %d given back to their queue uncharged", settled, given_back
    )
