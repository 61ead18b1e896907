"""Clocks: the wall clock delays and schedules are measured on, and the fake one tests drive by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Timer(Protocol):
    """A callback planned on a clock; ``cancel()`` keeps it from running (a no-op once it ran)."""

    def cancel(self) -> None:
        """Do not run the callback."""


class Clock:
    """The system's wall clock (``time.time()``), with timers on the running event loop.

    Delays (``publish(delay=...)``, ``run_at=``) and schedules read the time here. A backend runs its own timers
    on its clock: only the in-memory backend takes another one (``LocalClient(clock=FakeClock())``).
    """

    def time(self) -> float:
        """Seconds since the epoch, now."""
        return time.time()

    def now(self) -> datetime:
        """Now, as a timezone-aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), timezone.utc)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the running event loop once the clock reads ``when`` (epoch seconds)."""
        return asyncio.get_running_loop().call_later(max(0.0, when - self.time()), callback)

    async def sleep_until(self, when: float) -> None:
        """Return once the clock reads ``when`` (epoch seconds), or at once if it is past."""
        delay = when - self.time()
        if delay > 0:
            await asyncio.sleep(delay)


#: The clock of every backend that is not given another.
SYSTEM_CLOCK = Clock()


class _FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock(Clock):
    """A clock that moves only when told: ``advance(seconds)`` (or ``advance(timedelta)``) and ``set(datetime)``.

    Timers and sleeps due by the new time run in due order during the call (callbacks run inline, sleepers are
    woken on their loop), so a one-day delay or a nightly schedule is tested in well under a second. It starts
    at ``start`` (an aware datetime; default: the real time when made). Give it to ``LocalClient(clock=...)``,
    or use the ``jobs_clock`` fixture of ``mindtrace.jobs.testing``.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.utcoffset() is None:
            raise ValueError("FakeClock start must be a timezone-aware datetime")
        self._now = time.time() if start is None else start.timestamp()
        self._timers: list[tuple[float, int, Callable[[], None], _FakeTimer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        """The fake time, in epoch seconds."""
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` when the clock is advanced to ``when`` or past it (soon if it is past now).

        The callback runs on the event loop that planned it: inline when ``advance`` is called on that loop,
        else handed to it (``advance`` from a script's thread while the blocking API's loop thread runs).
        """
        timer = _FakeTimer()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        planned = _on_loop(loop, callback)
        if when <= self._now:
            asyncio.get_running_loop().call_soon(planned)
            return timer
        heapq.heappush(self._timers, (when, next(self._order), planned, timer))
        return timer

    async def sleep_until(self, when: float) -> None:
        """Return once the clock is advanced to ``when`` (at once if it is past)."""
        if when <= self._now:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            _resolve(woken)

        timer = self.call_at(when, wake)
        try:
            await woken
        finally:
            timer.cancel()

    def advance(self, by: float | timedelta) -> None:
        """Move the clock forward by ``by`` (seconds or a timedelta), running what falls due, in due order."""
        seconds = by.total_seconds() if isinstance(by, timedelta) else float(by)
        if seconds < 0:
            raise ValueError(f"a FakeClock only moves forward, not by {seconds}s")
        self._move_to(self._now + seconds)

    def set(self, when: datetime) -> None:
        """Move the clock forward to ``when`` (an aware datetime), running what falls due."""
        if when.utcoffset() is None:
            raise ValueError("FakeClock.set takes a timezone-aware datetime")
        target = when.timestamp()
        if target < self._now:
            raise ValueError(f"a FakeClock only moves forward, not back to {when.isoformat()}")
        self._move_to(target)

    def _move_to(self, target: float) -> None:
        while self._timers and self._timers[0][0] <= target:
            when, _, callback, timer = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            if not timer.cancelled:
                callback()
        self._now = target


def _on_loop(loop: asyncio.AbstractEventLoop | None, callback: Callable[[], None]) -> Callable[[], None]:
    """``callback``, run inline when called on ``loop`` (or without one), else handed to ``loop``."""
    if loop is None:
        return callback

    def planned() -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            callback()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    return planned


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def seconds_of(value: object, field: str, context: str = "") -> float:
    """``value`` (seconds as an int or float, or a timedelta) in seconds; JobValidationError naming ``field``
    (after ``context``, e.g. "schedule 'x': ") for anything else (a bool, a str, None)."""
    from mindtrace.jobs.errors import JobValidationError

    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise JobValidationError(
        f"{context}{field} must be seconds (a number) or a timedelta, not {type(value).__name__}", field=field
    )


def delay_of(delay: float | timedelta | None, run_at: datetime | None, clock: Clock, *, limit: float) -> float:
    """Seconds until a job published now is due, from ``publish``'s ``delay`` or ``run_at`` (0: at once).

    ``delay``: seconds (int or float) or a timedelta, >= 0; ``run_at``: a timezone-aware datetime (one in the
    past means at once). At most one of them; nothing over ``limit`` seconds. JobValidationError naming the
    field otherwise.
    """
    from mindtrace.jobs.errors import JobValidationError

    if delay is not None and run_at is not None:
        raise JobValidationError("give either delay or run_at, not both", field="delay")
    if run_at is not None:
        if not isinstance(run_at, datetime):
            raise JobValidationError(
                f"run_at must be a timezone-aware datetime, not {type(run_at).__name__}", field="run_at"
            )
        if run_at.utcoffset() is None:
            raise JobValidationError(
                "run_at must be a timezone-aware datetime (e.g. datetime(..., tzinfo=timezone.utc)); a naive one "
                "is ambiguous",
                field="run_at",
            )
        seconds = max(0.0, run_at.timestamp() - clock.time())
        name = "run_at"
    elif delay is None:
        return 0.0
    else:
        seconds = seconds_of(delay, "delay")
        if seconds != seconds or seconds < 0:  # NaN, negative
            raise JobValidationError(f"delay must be >= 0 seconds, not {delay!r}", field="delay")
        name = "delay"
    if seconds > limit:
        raise JobValidationError(
            f"{name} is {seconds:.0f}s away, over the longest delay of {limit:.0f}s ({limit / 86400:.0f} days)",
            field=name,
        )
    return seconds
