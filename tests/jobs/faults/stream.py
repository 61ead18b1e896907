"""Publishers that keep publishing through broker faults, and the ledger waits and figures fault scenarios share."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections import Counter

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, BackendUnavailableError, Job, JobSchema, PublishError
from mindtrace.jobs.constants import DLQ_SUFFIX
from tests.jobs.conformance.models import make_job
from tests.jobs.faults.conftest import Workers
from tests.jobs.support.ledger import Accounts, Ledger

#: The errors a publish may raise while its broker is cut off, restarting or stalled: the job may or may not
#: be queued. Anything else escaping a publish is not a clear error, and fails the scenario.
FAULT_ERRORS = (BackendUnavailableError, PublishError)


class RunCounter(AsyncConsumer):
    """An in-process consumer that counts the runs of each job id in ``runs``."""

    def __init__(self, queue: str, runs: Counter[str], *, max_retries: int = 3) -> None:
        super().__init__(queue, max_retries=max_retries, retry_delay=0.05, retry_backoff=1.0)
        self.runs = runs

    async def run(self, job: Job) -> None:
        self.runs[job.id] += 1


async def wait_until_run(runs: Counter[str], jobs: set[str], timeout: float) -> None:
    """Wait until every job in ``jobs`` has run at least once (by a RunCounter counting into ``runs``)."""
    deadline = time.monotonic() + timeout
    while not jobs <= set(runs):
        assert time.monotonic() < deadline, f"{len(jobs - set(runs))} of {len(jobs)} jobs not run in {timeout:g}s"
        await asyncio.sleep(0.02)


class Publishers:
    """``count`` tasks publishing jobs one at a time until ``total`` publishes have returned, through faults.

    A publish that returns is recorded in the ledger as ``published`` (that job must then run). One that
    raises a FAULT_ERRORS error is counted in ``errors`` and its job id kept in ``failed`` (it may still run:
    "may or may not be queued"); the publisher waits a little and goes on with a new job. If no publish
    returns for ``give_up_after`` seconds, the run fails: the publishers did not reconnect by themselves.
    With ``hold=True`` they go on past ``total`` until ``release()``, so that faults can be timed freely.
    """

    def __init__(
        self,
        orchestrator: AsyncOrchestrator,
        schema: JobSchema,
        ledger: Ledger,
        total: int,
        *,
        count: int = 3,
        pause: float = 0.005,
        give_up_after: float = 40.0,
        hold: bool = False,
    ) -> None:
        self.orchestrator = orchestrator
        self.schema = schema
        self.ledger = ledger
        self.total = total
        self.count = count
        self.pause = pause
        self.give_up_after = give_up_after
        self.held = hold
        self.published = 0
        self.failed: set[str] = set()
        self.errors: Counter[str] = Counter()
        self._indexes = itertools.count()
        self._last_success = time.monotonic()

    async def run(self) -> None:
        """Publish until ``total`` publishes returned; raises what a publisher could not handle."""
        self._last_success = time.monotonic()
        await asyncio.gather(*(self._publish_until_done() for _ in range(self.count)))

    def release(self) -> None:
        """Let the publishers stop once ``total`` publishes have returned."""
        self.held = False

    async def _publish_until_done(self) -> None:
        while self.held or self.published < self.total:
            job = make_job(self.schema, next(self._indexes))
            try:
                await self.orchestrator.publish(self.schema.name, job)
            except FAULT_ERRORS as exc:
                self.failed.add(job.id)
                self.errors[type(exc).__name__] += 1
                silent = time.monotonic() - self._last_success
                assert silent < self.give_up_after, f"no publish returned for {silent:.0f}s; last error: {exc!r}"
                await asyncio.sleep(0.05)
                continue
            self.ledger.record("published", job.id)
            self.published += 1
            self._last_success = time.monotonic()
            if self.pause:
                await asyncio.sleep(self.pause)

    async def wait_published(self, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` publishes have returned."""
        deadline = time.monotonic() + timeout
        while self.published < count:
            assert time.monotonic() < deadline, f"only {self.published} of {count} publishes returned in {timeout}s"
            await asyncio.sleep(0.005)


async def publish_until_returned(
    orchestrator: AsyncOrchestrator, schema: JobSchema, index: int, failed: set[str], timeout: float = 20.0
) -> str:
    """Publish new jobs (from ``index`` up) until one publish returns; its job id.

    Jobs whose publish raised a FAULT_ERRORS error (they may or may not be queued) are added to ``failed``.
    """
    deadline = time.monotonic() + timeout
    for i in itertools.count(index):
        job = make_job(schema, i)
        try:
            return await orchestrator.publish(schema.name, job)
        except FAULT_ERRORS:
            failed.add(job.id)
            assert time.monotonic() < deadline, f"no publish returned in {timeout:g}s"
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def wait_until_done(ledger: Ledger, timeout: float) -> Accounts:
    """Wait until every published job is done; the accounts then, or AssertionError naming what is missing."""
    deadline = time.monotonic() + timeout
    while True:
        accounts = ledger.read()
        if not accounts.lost:
            return accounts
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs still not done after {timeout:g}s: {accounts.summary()}")
        await asyncio.sleep(0.1)


async def wait_for_event(ledger: Ledger, event: str, *, after: float, timeout: float, pid: int | None = None) -> float:
    """Wait until ``event`` (published, started, done) happens after ``after`` (time.time()), on process ``pid``
    if given; returns when it did."""
    deadline = time.monotonic() + timeout
    while (moment := first_after(ledger.read(), event, after, pid)) is None:
        if time.monotonic() > deadline:
            where = "" if pid is None else f" by process {pid}"
            raise AssertionError(f"no job was {event}{where} within {timeout:g}s: {ledger.read().summary()}")
        await asyncio.sleep(0.05)
    return moment


async def dead_letters(orchestrator: AsyncOrchestrator, queue: str) -> list[str]:
    """Take every job off ``queue``'s dead-letter queue: one line each (id, attempts, error), for messages."""
    found = []
    while (job := await orchestrator.receive_message(queue + DLQ_SUFFIX)) is not None:
        found.append(f"{job.id} attempts={job.attempts} error={job.error}")
    return found


async def drain_and_check(
    orchestrator: AsyncOrchestrator, queue: str, ledger: Ledger, workers: Workers, jobs: int
) -> tuple[Accounts, list[bool]]:
    """After a scenario's faults: wait for every published job to be done, stop the consumers, assert that
    nothing was dead-lettered and delete the queue. Returns the accounts and which consumers were alive."""
    accounts = await wait_until_done(ledger, timeout=max(20.0, jobs / 50))
    alive = [proc.poll() is None for proc in workers.processes]
    workers.stop_all()
    dead = await dead_letters(orchestrator, queue)
    assert not dead, f"{len(dead)} job(s) dead-lettered: {dead[:5]}"
    await orchestrator.delete_queue(queue)
    return accounts, alive


def pending_at(accounts: Accounts, moment: float) -> set[str]:
    """Jobs published before ``moment`` (time.time()) and not done by then: what the broker had to keep."""
    published = {j for e, j, _, t in accounts.events if e == "published" and t < moment}
    done = {j for e, j, _, t in accounts.events if e == "done" and t < moment}
    return published - done


def first_after(accounts: Accounts, event: str, moment: float, pid: int | None = None) -> float | None:
    """When ``event`` (published, started, done) first happened after ``moment`` (on process ``pid``), or None."""
    times = [t for e, _, p, t in accounts.events if e == event and t > moment and pid in (None, p)]
    return min(times) if times else None


def duplicates_by_fault(accounts: Accounts, faults: list[float]) -> list[int]:
    """Duplicated jobs counted by the last fault (time.time(), ascending) before their second start.

    Index 0 counts jobs started twice before any fault: no fault explains those. Index ``k`` counts those a
    fault ``k`` (1-based) may explain: in flight at it (ack lost), or published twice across it (a command
    the server ran whose reply was lost, then retried).
    """
    starts: dict[str, list[float]] = {}
    for event, job_id, _, moment in accounts.events:
        if event == "started" and job_id in accounts.duplicated:
            starts.setdefault(job_id, []).append(moment)
    counts = [0] * (len(faults) + 1)
    for times in starts.values():
        counts[bisect.bisect_right(faults, sorted(times)[1])] += 1
    return counts
