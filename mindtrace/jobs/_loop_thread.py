"""The process-wide background event loop that the blocking API runs on: the only module that touches threads."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import functools
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from mindtrace.jobs.constants import EXIT_CLOSE_TIMEOUT, INTERRUPT_GRACE
from mindtrace.jobs.errors import ClosedError, ForkError, LoopThreadError

T = TypeVar("T")


class _Closable(Protocol):
    async def close(self, grace: float = ...) -> None: ...


class LoopThread:
    """One daemon thread running one asyncio loop; blocking callers submit coroutines to it.

    Submitting is one ``call_soon_threadsafe`` there and one lock release back (see :class:`_Call`), safe
    from any number of threads and from inside another running event loop. Calling from the loop thread
    itself, after ``stop()`` or in a forked child raises a clear error instead of hanging.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._stopped = False
        self._closables: weakref.WeakSet[Any] = weakref.WeakSet()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), name="mindtrace-jobs-loop", daemon=True)
        self.thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def _check(self, what: str) -> None:
        if os.getpid() != self.pid:
            raise ForkError(
                f"{what} was created in process {self.pid} and used in forked process {os.getpid()}; "
                "create a new one after fork()"
            )
        if self._stopped:
            raise ClosedError(f"{what} cannot be used: the background event loop has stopped (interpreter exit)")
        if threading.get_ident() == self.thread.ident:
            raise LoopThreadError(
                f"the blocking {what} API was called from its own event loop thread, which would deadlock; "
                "use the async API (AsyncOrchestrator, AsyncConsumer) there"
            )

    def _submit(self, coro: Coroutine[Any, Any, T], what: str) -> _Call[T]:
        try:
            self._check(what)
        except BaseException:
            coro.close()
            raise
        call = _Call(coro)
        try:
            self.loop.call_soon_threadsafe(call.start, self.loop)
        except BaseException:  # the loop is closed
            coro.close()
            raise
        return call

    def run(self, coro: Coroutine[Any, Any, T], what: str, grace: float = INTERRUPT_GRACE) -> T:
        """Run ``coro`` on the loop and block until it returns its result or raises.

        The one path of every blocking call. On KeyboardInterrupt (Ctrl-C lands in the waiting thread, not in
        the loop's), the coroutine is cancelled on the loop, given up to ``grace`` s to clean up (give claimed
        jobs back, close its receiver), then the interrupt is re-raised: nothing keeps running on the loop
        thread for a caller that is gone.
        """
        call = self._submit(coro, what)
        try:
            return call.result()
        except KeyboardInterrupt:
            self.loop.call_soon_threadsafe(call.cancel)
            call.wait(grace)
            raise

    def call_soon(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` on the loop thread soon; never blocks."""
        if not self._stopped:
            self.loop.call_soon_threadsafe(callback)

    def track(self, closable: _Closable) -> None:
        """Close ``closable`` (best effort, bounded in time) if it is still open at interpreter exit."""
        self._closables.add(closable)

    def stop(self) -> None:
        """Close what is tracked (at most EXIT_CLOSE_TIMEOUT seconds), then stop the loop and its thread."""
        if self._stopped or os.getpid() != self.pid:
            return
        closables = list(self._closables)
        if closables and self.thread.is_alive():

            async def close_all() -> None:
                # No grace at exit: running jobs are given back uncharged at once, within the exit bound.
                await asyncio.gather(*(c.close(grace=0.0) for c in closables), return_exceptions=True)

            future = asyncio.run_coroutine_threadsafe(close_all(), self.loop)
            try:
                future.result(EXIT_CLOSE_TIMEOUT)
            except (concurrent.futures.TimeoutError, Exception):
                future.cancel()
        self._stopped = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(EXIT_CLOSE_TIMEOUT)


class _Call(Generic[T]):
    """One coroutine submitted from another thread: a task on the loop, and a lock its caller waits on.

    Lighter than ``run_coroutine_threadsafe``, which chains the task to a ``concurrent.futures.Future`` (a
    Condition, callbacks on both sides): here the task's done-callback releases a plain lock and the caller
    reads the outcome from the finished task. On Python 3.12+ the task starts eagerly, so a coroutine that
    never waits finishes within the loop's first callback.
    """

    __slots__ = ("_coro", "_done", "_error", "_task")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._task: asyncio.Task[T] | None = None
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop thread: start the task."""
        try:
            task = _start_task(loop, self._coro)
        except BaseException as exc:
            self._error = exc
            self._done.release()
            return
        self._task = task
        if task.done():
            self._done.release()
        else:
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[T]) -> None:
        self._done.release()

    def cancel(self) -> None:
        """On the loop thread: cancel the task (it then cleans up, and the caller's wait ends)."""
        if self._task is not None:
            self._task.cancel()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the task to end; whether it did."""
        if self._done.acquire(timeout=timeout):
            self._done.release()
            return True
        return False

    def result(self) -> T:
        """Block until the task ends; its result, or its exception raised here."""
        self._done.acquire()
        self._done.release()  # the outcome stays readable, e.g. for wait() after an interrupted result()
        if self._error is not None:
            raise self._error
        assert self._task is not None
        return self._task.result()


def _start_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)


# States of one call submitted to a DaemonPool.
_QUEUED, _RUNNING, _RETURNED, _DROPPED = range(4)


class _Work:
    """One call submitted to a DaemonPool, and where it stands (guarded by the pool's lock)."""

    __slots__ = ("call", "future", "state")

    def __init__(self, call: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        self.call = call
        self.future = future
        self.state = _QUEUED


class DaemonPool:
    """A bounded pool of daemon threads for users' blocking ``run``: never joined at exit, never the loop.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit, so one job stuck in user
    code would hang a script after Ctrl-C; these threads die with the process instead.

    The bound is on threads free to take work: when the caller stops waiting for a call (cancels its future)
    while a thread runs it, that thread is abandoned (a thread cannot be interrupted: it ends once the call
    returns, its result dropped) and a new one takes its place, so a stuck call never leaves the pool short.
    """

    def __init__(self, size: int, name: str) -> None:
        self._name = name
        self._size = size
        self._started = 0
        self._closed = False
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        for _ in range(size):
            self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._main, name=f"{self._name}-{self._started}", daemon=True)
        self._started += 1
        thread.start()

    def _main(self) -> None:
        while (work := self._work.get()) is not None:
            with self._lock:
                if work.state != _QUEUED:  # its caller stopped waiting before it started
                    continue
                work.state = _RUNNING
            ok = True
            try:
                outcome = work.call()
            except BaseException as exc:
                ok, outcome = False, exc
            with self._lock:
                abandoned = work.state == _DROPPED
                work.state = _RETURNED
            if abandoned:
                return  # another thread took this one's place when the caller stopped waiting
            setter = _set_result if ok else _set_exception
            work.future.get_loop().call_soon_threadsafe(setter, work.future, outcome)

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``call`` on a pool thread, in a copy of the caller's context (its context variables, as
        ``asyncio.to_thread`` does); the returned future (of the running loop) gets its outcome. Cancelling
        the future abandons the call if it is running (see the class docstring)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        work = _Work(functools.partial(contextvars.copy_context().run, call), future)
        future.add_done_callback(functools.partial(self._done, work))
        self._work.put(work)
        return future

    def _done(self, work: _Work, future: asyncio.Future[Any]) -> None:
        """On the loop: a cancelled future drops its call; if a thread runs it, a new thread replaces it."""
        if not future.cancelled():
            return
        with self._lock:
            running = work.state == _RUNNING
            if work.state in (_QUEUED, _RUNNING):
                work.state = _DROPPED
            replace = running and not self._closed
        if replace:
            self._start_thread()

    def shutdown(self) -> None:
        """Let the threads finish their current call and end; does not wait for them."""
        with self._lock:
            self._closed = True
        for _ in range(self._size):
            self._work.put(None)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_lock = threading.Lock()
_current: LoopThread | None = None


def get_loop_thread() -> LoopThread:
    """The loop thread of this process, started on first use (and anew in a forked child)."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = LoopThread()
        return _current


@atexit.register
def _stop_at_exit() -> None:
    if _current is not None:
        _current.stop()
