"""Schedules: cron and interval specs, their fire times, the stores that keep them, and the loop that fires them.

A schedule publishes a copy of its job template on its queue at each fire time. Fire times come from the
schedule alone (its cron expression in its time zone, or its interval from its anchor) and from the last fire
time handled, never from "now", so every process computes the same next fire and the same job id for it
(``<name>@<UTC time>``). Any number of processes may run :func:`run_schedules`; a store makes each fire happen
once: by an atomic compare-and-set of the schedule's cursor (the last fire time handled) together with the
publish (Redis: one script; memory: one process), or by firing only while holding a lease the broker ties to a
connection (RabbitMQ: an exclusive queue), with a record of fires that the next holder catches up from.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict

from mindtrace.jobs.backends.base import ScheduleMode, validate_queue_name
from mindtrace.jobs.clock import Clock, seconds_of
from mindtrace.jobs.constants import MAX_DELAY
from mindtrace.jobs.errors import BackendError, JobsError, JobValidationError, QueueNotFoundError
from mindtrace.jobs.lifecycle import JobStatus
from mindtrace.jobs.types import Job

if TYPE_CHECKING:
    from mindtrace.jobs.backends.base import OutgoingMessage
    from mindtrace.jobs.orchestrator import AsyncOrchestrator

logger = logging.getLogger("mindtrace.jobs")

#: What a missed fire does: "coalesce" (the fires missed while no scheduler ran become one, run late) or "skip".
MisfirePolicy = Literal["coalesce", "skip"]

#: Seconds a running scheduler waits at most before it reads the schedules again (an upsert or unschedule made
#: in another process is seen within this; one made through the same orchestrator at once).
SCHEDULE_REFRESH = 5.0

#: A "skip" schedule's default grace: a fire handled more than this many seconds after its time is skipped.
SKIP_GRACE = 60.0

#: The longest schedule name.
MAX_SCHEDULE_NAME = 200

#: A scheduler's backoff after a broker error: the first wait and the longest (seconds).
_BACKOFF_FIRST, _BACKOFF_CAP = 0.5, 10.0

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class ScheduleSpec(BaseModel):
    """A schedule as stored: what to publish where, and when (the cron expression, or the interval).

    ``job`` is the template's JSON (its id and creation time blanked, so equal templates compare equal);
    ``anchor_ms`` the time (ms since the epoch) an interval counts from, set when the schedule was created or
    changed. Two specs with the same fields apart from ``anchor_ms`` are the same schedule (an upsert of it is a
    no-op).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    queue: str
    job: str
    cron: str | None = None
    tz: str = "UTC"
    every_ms: int | None = None
    misfire: MisfirePolicy = "coalesce"
    grace_ms: int | None = None
    anchor_ms: int = 0

    def same_as(self, other: ScheduleSpec) -> bool:
        """Whether ``other`` is this schedule, whatever their anchors."""
        return self.model_copy(update={"anchor_ms": 0}) == other.model_copy(update={"anchor_ms": 0})

    def next_after(self, after_ms: int) -> int:
        """The first fire time (ms) strictly after ``after_ms``."""
        if self.every_ms is not None:
            steps = (after_ms - self.anchor_ms) // self.every_ms + 1
            return self.anchor_ms + max(1, steps) * self.every_ms
        return _ms(next(CronSim(str(self.cron), _at(after_ms, self.tz))))

    def latest_until(self, until_ms: int) -> int:
        """The last fire time (ms) at or before ``until_ms`` (of an interval: the anchor at the earliest)."""
        if self.every_ms is not None:
            steps = max(0, (until_ms - self.anchor_ms) // self.every_ms)
            return self.anchor_ms + steps * self.every_ms
        return _ms(next(CronSim(str(self.cron), _at(until_ms + 1, self.tz), reverse=True)))

    def grace(self) -> float | None:
        """Seconds a fire may be late and still run (None: however late)."""
        if self.grace_ms is not None:
            return self.grace_ms / 1000
        return SKIP_GRACE if self.misfire == "skip" else None


@dataclass(frozen=True)
class Due:
    """What a scheduler does for one schedule now: fire ``fire_ms`` (None: nothing to publish), move the cursor
    to ``cursor_ms`` (equal to the old one: nothing is due), then wake again at ``next_ms``."""

    fire_ms: int | None
    cursor_ms: int
    next_ms: int


def due(spec: ScheduleSpec, cursor_ms: int, now_ms: int) -> Due:
    """The step a scheduler takes at ``now_ms`` for ``spec`` whose last handled fire time is ``cursor_ms``.

    Every fire time after the cursor and at or before now is owed. They become one fire at the latest of them
    (coalesced: a scheduler that was down owes one run, not a backlog), which runs if it is at most the
    schedule's grace late, and is skipped (the cursor still moves past it) otherwise.
    """
    first = spec.next_after(cursor_ms)
    if first > now_ms:
        return Due(None, cursor_ms, first)
    latest = max(first, spec.latest_until(now_ms))
    grace = spec.grace()
    late = (now_ms - latest) / 1000
    fire = latest if grace is None or late <= grace else None
    return Due(fire, latest, spec.next_after(latest))


def fire_id(name: str, fire_ms: int) -> str:
    """The job id of a schedule's fire at ``fire_ms``: ``<name>@<UTC ISO time>``, the same in every process."""
    at = datetime.fromtimestamp(fire_ms / 1000, timezone.utc)
    millis = f".{fire_ms % 1000:03d}" if fire_ms % 1000 else ""
    return f"{name}@{at.strftime('%Y-%m-%dT%H:%M:%S')}{millis}Z"


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as ``schedules()`` lists it.

    ``job`` is its template (each fire publishes a copy with the id ``<name>@<fire time>``); exactly one of
    ``cron`` (in ``tz``) and ``every`` is set. ``last_fire``: the last fire time handled (fired, or skipped as
    too late; None before the first); ``next_fire``: the next one.
    """

    name: str
    queue: str
    job: Job
    cron: str | None
    tz: str
    every: timedelta | None
    misfire: MisfirePolicy
    grace: float | None
    last_fire: datetime | None
    next_fire: datetime


@dataclass(frozen=True)
class ScheduleState:
    """A stored schedule and its cursor: the last fire time handled (ms), or None when none is kept (a new
    schedule's cursor not yet written, or lost)."""

    spec: ScheduleSpec
    cursor_ms: int | None


class ScheduleStore(abc.ABC):
    """Where a backend keeps schedules and their cursors, and how it makes each fire happen once.

    ``mode`` is "atomic" (``fire`` compares and sets the cursor and publishes in one step) or "leader"
    (``leadership`` is held by one process at a time, which alone fires: ``advance`` then only orders that
    process's own steps, and ``publish_first`` says the job goes out before its cursor moves, so a leader that
    dies between the two leaves the fire to be found again by the next, under the same job id).
    """

    mode: ClassVar[ScheduleMode]
    #: The job is published before the cursor moves (a leader's store), not after (a store whose cursor
    #: compare-and-set decides which process publishes).
    publish_first: ClassVar[bool] = False

    @abc.abstractmethod
    async def now_ms(self) -> int:
        """The time (ms since the epoch) fire times are compared with: the broker's clock where it has one."""

    @abc.abstractmethod
    async def upsert(self, spec: ScheduleSpec, now_ms: int) -> ScheduleSpec:
        """Store ``spec`` under its name, and return the stored spec: the one already stored when it is the same
        schedule (nothing changes), else ``spec``, with its cursor at least ``now_ms`` (no fire before the
        upsert is owed)."""

    @abc.abstractmethod
    async def remove(self, name: str) -> bool:
        """Forget the schedule ``name`` (its cursor first, so no fire of it follows); whether it existed."""

    @abc.abstractmethod
    async def load(self) -> list[ScheduleState]:
        """Every stored schedule with its cursor."""

    @abc.abstractmethod
    async def advance(self, spec: ScheduleSpec, expected_ms: int | None, cursor_ms: int) -> bool:
        """Move ``spec``'s cursor from ``expected_ms`` (None: it has none) to ``cursor_ms``; False, changing
        nothing, when the cursor is not ``expected_ms`` (another process moved it) or the schedule is gone."""

    async def fire(self, spec: ScheduleSpec, expected_ms: int, cursor_ms: int, message: OutgoingMessage) -> bool | None:
        """Move the cursor as ``advance`` does and publish ``message`` on ``spec.queue`` in the same atomic step:
        True (both done), False (the cursor had moved: neither), or None when this store cannot (the scheduler
        then advances and publishes as two steps). QueueNotFoundError when the queue does not exist (neither)."""
        return None

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[asyncio.Event]:
        """Hold the right to fire: yields at once on an "atomic" store; on a "leader" store, once this process
        holds the lease, yielding an event set when it is lost (the connection that held it closed)."""
        yield asyncio.Event()

    @property
    def changed(self) -> asyncio.Event:
        """Set when a schedule was stored or removed through this store (a scheduler clears it and reads again)."""
        event = getattr(self, "_changed", None)
        if event is None:
            event = self._changed = asyncio.Event()
        return event

    async def close(self) -> None:  # noqa: B027 (most stores hold nothing of their own)
        """Release what the store holds (connections, the leadership)."""


class MemoryScheduleStore(ScheduleStore):
    """Schedules of the in-memory backend: a dict in this process, on the backend's clock (a FakeClock in tests)."""

    mode: ClassVar[ScheduleMode] = "atomic"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._specs: dict[str, ScheduleSpec] = {}
        self._cursors: dict[str, int] = {}

    async def now_ms(self) -> int:
        """This process's clock (the backend's: a FakeClock moves it in tests)."""
        return math.floor(self.clock.time() * 1000)

    async def upsert(self, spec: ScheduleSpec, now_ms: int) -> ScheduleSpec:
        """See :meth:`ScheduleStore.upsert`."""
        old = self._specs.get(spec.name)
        if old is not None and old.same_as(spec):
            return old
        self._specs[spec.name] = spec
        self._cursors[spec.name] = max(self._cursors.get(spec.name, now_ms), now_ms)
        self.changed.set()
        return spec

    async def remove(self, name: str) -> bool:
        """See :meth:`ScheduleStore.remove`."""
        self._cursors.pop(name, None)
        found = self._specs.pop(name, None) is not None
        self.changed.set()
        return found

    async def load(self) -> list[ScheduleState]:
        """See :meth:`ScheduleStore.load`."""
        return [ScheduleState(spec, self._cursors.get(name)) for name, spec in self._specs.items()]

    async def advance(self, spec: ScheduleSpec, expected_ms: int | None, cursor_ms: int) -> bool:
        """See :meth:`ScheduleStore.advance`."""
        if spec.name not in self._specs or self._cursors.get(spec.name) != expected_ms:
            return False
        self._cursors[spec.name] = cursor_ms
        return True


def make_spec(
    name: object,
    queue: object,
    job: Job,
    *,
    cron: object = None,
    tz: object = None,
    every: object = None,
    misfire: object = "coalesce",
    grace: object = None,
    anchor_ms: int,
) -> ScheduleSpec:
    """A checked :class:`ScheduleSpec` from ``schedule()``'s arguments; JobValidationError naming the field."""
    from mindtrace.jobs.wire import encode

    if not isinstance(name, str) or not name or len(name) > MAX_SCHEDULE_NAME or not name.isprintable():
        raise JobValidationError(
            f"schedule name must be a non-empty printable str of at most {MAX_SCHEDULE_NAME} characters, not {name!r}",
            field="name",
        )
    queue_name = validate_queue_name(queue)
    if (cron is None) == (every is None):
        raise JobValidationError(f"schedule {name!r}: give exactly one of cron and every", field="cron")
    zone = "UTC"
    every_ms = None
    if cron is not None:
        if not isinstance(cron, str):
            raise JobValidationError(f"schedule {name!r}: cron must be a str, not {type(cron).__name__}", field="cron")
        zone = _check_tz(name, "UTC" if tz is None else tz)
        try:
            CronSim(cron, datetime.now(ZoneInfo(zone)))
        except CronSimError as exc:
            raise JobValidationError(
                f"schedule {name!r}: invalid cron expression {cron!r}: {exc}", field="cron"
            ) from exc
    else:
        if tz is not None:
            raise JobValidationError(f"schedule {name!r}: tz applies to a cron schedule, not to every=", field="tz")
        every_ms = _positive_ms(name, "every", every)
    if misfire not in ("coalesce", "skip"):
        raise JobValidationError(
            f"schedule {name!r}: misfire must be 'coalesce' or 'skip', not {misfire!r}", field="misfire"
        )
    grace_ms = None if grace is None else _positive_ms(name, "grace", grace)
    template = job.model_copy(update={"id": "schedule-template", "created_at": _EPOCH})
    return ScheduleSpec(
        name=name,
        queue=queue_name,
        job=encode(template).decode(),
        cron=cron,
        tz=zone,
        every_ms=every_ms,
        misfire=misfire,
        grace_ms=grace_ms,
        anchor_ms=anchor_ms,
    )


def _check_tz(name: str, tz: object) -> str:
    if not isinstance(tz, str) or not tz:
        raise JobValidationError(f"schedule {name!r}: tz must be an IANA time zone name, not {tz!r}", field="tz")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise JobValidationError(
            f"schedule {name!r}: unknown time zone {tz!r} (an IANA name such as 'Europe/Berlin')", field="tz"
        ) from exc
    return tz


def _positive_ms(name: str, field: str, value: object) -> int:
    seconds = seconds_of(value, field, f"schedule {name!r}: ")
    if not math.isfinite(seconds) or seconds < 0.001 or seconds > MAX_DELAY:
        raise JobValidationError(
            f"schedule {name!r}: {field} must be between 1 ms and {MAX_DELAY / 86400:.0f} days, not {seconds!r} s",
            field=field,
        )
    return round(seconds * 1000)


def _raise_if_cancelling() -> None:
    """CancelledError if this task was cancelled and the cancel was swallowed on its way (``asyncio.wait_for``
    before Python 3.12 loses a cancel that lands as its inner call completes, and redis-py awaits through it)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _at(ms: int, tz: str) -> datetime:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(tz))


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def info_of(state: ScheduleState, template: Job, now_ms: int) -> ScheduleInfo:
    """The :class:`ScheduleInfo` of a stored schedule, its template decoded as ``template``."""
    spec = state.spec
    cursor = state.cursor_ms
    # A new schedule's cursor is the time it was stored, not a fire time: no fire was handled yet.
    last = cursor if cursor is not None and spec.latest_until(cursor) == cursor else None
    return ScheduleInfo(
        name=spec.name,
        queue=spec.queue,
        job=template,
        cron=spec.cron,
        tz=spec.tz,
        every=None if spec.every_ms is None else timedelta(milliseconds=spec.every_ms),
        misfire=spec.misfire,
        grace=None if spec.grace_ms is None else spec.grace_ms / 1000,
        last_fire=None if last is None else _datetime(last),
        next_fire=_datetime(spec.next_after(cursor if cursor is not None else now_ms)),
    )


class Scheduler:
    """The loop that fires an orchestrator's schedules (see :func:`run_schedules`)."""

    def __init__(self, orchestrator: AsyncOrchestrator, store: ScheduleStore, refresh: float) -> None:
        self.orchestrator = orchestrator
        self.store = store
        self.refresh = refresh
        self.fired = 0
        #: Set by ``stop()``: the loop ends at its next step even if the cancel that came with it was lost.
        self.stopped = False
        self._missing: set[str] = set()

    def stop(self) -> None:
        """Ask the loop to end (its task is cancelled too, by whoever calls this)."""
        self.stopped = True

    def _check_stop(self) -> None:
        if self.stopped:
            raise asyncio.CancelledError
        _raise_if_cancelling()

    async def run(self) -> None:
        """Fire due schedules until cancelled, holding the store's leadership while firing. A broker error (the
        broker down, a lost connection) is logged and the loop starts again after a backoff (0.5 s doubling up
        to 10 s), taking the leadership again where the store has one."""
        backoff = _BACKOFF_FIRST
        while True:
            try:
                async with self.store.leadership() as lost:
                    if self.store.mode == "leader":
                        logger.info("schedules: process %d leads the schedules (it alone fires them)", os.getpid())
                    while not lost.is_set():
                        self._check_stop()
                        wake_ms = await self.step()
                        backoff = _BACKOFF_FIRST
                        self._check_stop()
                        await self._sleep(wake_ms, lost)
            except BackendError as exc:
                self._check_stop()
                logger.warning("schedules: %s; trying again in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_CAP)

    async def step(self) -> int:
        """Fire or skip what is due now; the time (ms) of the next fire, or of the next refresh if sooner."""
        store = self.store
        store.changed.clear()
        now = await store.now_ms()
        wake = now + round(self.refresh * 1000)
        for state in await store.load():
            spec = state.spec
            try:
                if state.cursor_ms is None:
                    await store.advance(spec, None, now)
                    wake = min(wake, spec.next_after(now))
                    continue
                step = due(spec, state.cursor_ms, now)
                if step.cursor_ms != state.cursor_ms:
                    await self._handle(spec, state.cursor_ms, step)
                wake = min(wake, step.next_ms)
            except (asyncio.CancelledError, BackendError):
                raise
            except JobsError as exc:
                logger.error("schedule %r on queue %r: fire failed: %s", spec.name, spec.queue, exc)
        return wake

    async def _handle(self, spec: ScheduleSpec, cursor: int, step: Due) -> None:
        store = self.store
        if step.fire_ms is None:
            if await store.advance(spec, cursor, step.cursor_ms):
                logger.warning(
                    "schedule %r: skipped its fire of %s (over its grace of %s s late)",
                    spec.name,
                    _datetime(step.cursor_ms).isoformat(),
                    spec.grace(),
                )
            return
        orchestrator = self.orchestrator
        job = self._job(spec, step.fire_ms)
        try:
            if store.publish_first:
                if not await self._fired_before(spec, job):
                    await orchestrator.publish(spec.queue, job)
                    self.fired += 1
                await store.advance(spec, cursor, step.cursor_ms)
            else:
                done = await orchestrator.fire(store, spec, cursor, step.cursor_ms, job)
                if done:
                    self.fired += 1
        except QueueNotFoundError:
            if spec.name not in self._missing:
                self._missing.add(spec.name)
                logger.error(
                    "schedule %r: its queue %r does not exist; its fires are skipped until it is declared",
                    spec.name,
                    spec.queue,
                )
            await store.advance(spec, cursor, step.cursor_ms)
            return
        self._missing.discard(spec.name)

    async def _fired_before(self, spec: ScheduleSpec, job: Job) -> bool:
        """Whether a fire's job was published already (a leader that died before moving the cursor): its record
        exists. False without records."""
        orchestrator = self.orchestrator
        if not orchestrator.records:
            return False
        info = await orchestrator.job_info(job.id, spec.queue)
        return info.status is not JobStatus.UNKNOWN

    def _job(self, spec: ScheduleSpec, fire_ms: int) -> Job:
        template = self.orchestrator.decode(spec.job.encode(), spec.queue)
        return template.model_copy(update={"id": fire_id(spec.name, fire_ms), "created_at": _datetime(fire_ms)})

    async def _sleep(self, wake_ms: int, lost: asyncio.Event) -> None:
        now = await self.store.now_ms()
        seconds = max(0.0, (wake_ms - now) / 1000)
        clock = self.orchestrator.backend.clock
        waits = [
            asyncio.ensure_future(clock.sleep_until(clock.time() + seconds)),
            asyncio.ensure_future(self.store.changed.wait()),
            asyncio.ensure_future(lost.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
