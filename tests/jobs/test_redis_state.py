"""What only the Redis job-state store can show: its scripts agree with the merge rule, idle waiters cost
nothing, many waiters share few connections, and records and cancels survive cuts, expiry and restarts.

The conformance suite runs the store's contract through the orchestrator; these tests look at the store itself
(RedisStateStore) on a real server: the shared one for what needs no server of its own, else a private
redis-server (tests.jobs.support.servers), behind a TcpProxy where a connection must be cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindtrace.jobs import LocalClient, RedisClient
from mindtrace.jobs.lifecycle import JobInfo, JobStatus, Progress, StateUpdate
from mindtrace.jobs.state.memory import MemoryStateStore
from mindtrace.jobs.state.redis import RedisStateStore
from tests.jobs.faults.conftest import FUZZ_EXAMPLES
from tests.jobs.support import servers
from tests.jobs.support.proxy import TcpProxy

#: Records written here are kept an hour unless a test asks for less (every test deletes its keys).
KEEP = 3600.0


def _private_server(**options: Any) -> servers.RedisServer:
    if shutil.which("redis-server") is None:
        if servers.IN_CI:
            pytest.fail("CI=true: redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH")
    return servers.RedisServer(**options).start()


@pytest.fixture
def redis_server() -> Iterator[servers.RedisServer]:
    """A redis-server of this test's own (nothing else talks to it, so its counters are this test's)."""
    server = _private_server()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def proxied(redis_server: servers.RedisServer) -> Iterator[TcpProxy]:
    """A proxy in front of the private server, to cut the connections of the clients that go through it."""
    with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def _store(url: str, **options: Any) -> AsyncIterator[RedisStateStore]:
    """A connected store on ``url`` with a key prefix of its own; closed on exit."""
    options.setdefault("key_prefix", f"mtj-state-{uuid.uuid4().hex[:8]}:")
    store = RedisClient.from_url(url, **options).state_store()
    await store.connect()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _raw(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, as another program would use the server."""
    raw = aioredis.Redis.from_url(url)
    try:
        yield raw
    finally:
        await raw.aclose()


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _subscribed(raw: aioredis.Redis, channels: Sequence[str]) -> bool:
    """Whether every one of ``channels`` has a subscriber on the server."""
    counts = await raw.pubsub_numsub(*channels)
    return all(int(count) >= 1 for _, count in counts)


def _published(job_id: str, at: float) -> StateUpdate:
    return StateUpdate(job_id, JobStatus.QUEUED, at, schema="s", kind="published")


def _running(job_id: str, at: float, attempts: int = 1) -> StateUpdate:
    return StateUpdate(job_id, JobStatus.RUNNING, at, attempts=attempts, worker="w")


def _succeeded(job_id: str, at: float, value: int = 1, ttl: float | None = KEEP) -> StateUpdate:
    return StateUpdate(job_id, JobStatus.SUCCEEDED, at, attempts=1, output=json.dumps({"value": value}), ttl=ttl)


# -- the merge rule ---------------------------------------------------------------------------------

_BASE = time.time()
_ENDS = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED]
_texts = st.none() | st.sampled_from(["", "boom", "why", "é ✓"])
_times = st.integers(0, 60_000).map(lambda ms: _BASE + ms / 1000)
_progress = st.builds(
    Progress,
    st.none() | st.floats(0, 1, allow_nan=False),
    st.dictionaries(
        st.sampled_from(["loss", "step", "phase"]),
        st.integers(-5, 5) | st.floats(-1, 1) | _texts.filter(bool),
        max_size=2,
    ),
)


def _update(kind: str) -> st.SearchStrategy[StateUpdate]:
    common: dict[str, Any] = {"job_id": st.just("j"), "at": _times, "attempts": st.integers(0, 3)}
    if kind in ("published", "progress", "cancel", "withdrawn"):
        common["kind"] = st.just(kind)
    if kind == "published":
        return st.builds(
            StateUpdate,
            status=st.sampled_from([JobStatus.QUEUED, JobStatus.SCHEDULED]),
            schema=st.none() | st.just("s"),
            **common,
        )
    if kind == "progress":
        return st.builds(StateUpdate, status=st.just(JobStatus.RUNNING), progress=_progress, **common)
    if kind == "cancel":
        return st.builds(StateUpdate, status=st.just(JobStatus.RUNNING), reason=_texts, **common)
    if kind == "withdrawn":
        return st.builds(StateUpdate, status=st.just(JobStatus.UNKNOWN), **common)
    if kind == "running":
        return st.builds(
            StateUpdate, status=st.just(JobStatus.RUNNING), worker=st.none() | st.just("w1"),
            progress=st.none() | _progress, **common,
        )  # fmt: skip
    return st.builds(
        StateUpdate,
        status=st.sampled_from([JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.RETRYING, *_ENDS]),
        error=_texts,
        output=st.none() | st.integers(0, 9).map(lambda v: json.dumps({"v": v})),
        schema=st.none() | st.just("s2"),
        worker=st.none() | st.sampled_from(["w1", "w2"]),
        reason=_texts,
        ttl=st.none() | st.just(KEEP),
        **common,
    )


#: Kinds of update, weighted towards the runs and progress reports whose interplay the scripts must keep.
_KINDS = ["published", "running", "running", "progress", "progress", "status", "status", "cancel", "withdrawn"]
_any_update = st.sampled_from(_KINDS).flatmap(_update)


def _replayed(steps: list[list[StateUpdate] | int]) -> list[StateUpdate]:
    """The updates of ``steps``, an int standing for a repeat of an earlier update (a stream replayed)."""
    updates: list[StateUpdate] = []
    for step in steps:
        if isinstance(step, int):
            if updates:
                updates.append(updates[step % len(updates)])
        else:
            updates.extend(step)
    return updates


#: One run as a consumer reports it: RUNNING, a few progress reports, then how the run ended.
_run = st.tuples(_update("running"), st.lists(_update("progress"), max_size=2), _update("status")).map(
    lambda run: [run[0], *run[1], run[2]]
)
_steps = st.lists(_run | _any_update.map(lambda update: [update]) | st.integers(0, 20), min_size=1, max_size=8)
#: Runs and stray updates (times and attempts drawn apart from their order), some repeated, some shuffled.
_histories = st.tuples(
    st.booleans(),
    _steps.map(_replayed).filter(bool).flatmap(lambda updates: st.just(updates) | st.permutations(updates)),
)


def test_the_record_read_back_is_the_merge_rule_folded_over_the_updates(redis_url: str) -> None:
    """For any sequence of updates (kinds, statuses and attempts mixed, out of order, repeated), the record the
    store reads back equals ``JobInfo.apply`` folded over the same sequence: the scripts keep the rule."""
    loop = asyncio.new_event_loop()
    prefix = f"mtj-state-{uuid.uuid4().hex[:8]}:"
    store = RedisClient.from_url(redis_url, key_prefix=prefix).state_store()
    raw = aioredis.Redis.from_url(redis_url)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(history=_histories)
    def check(history: tuple[bool, list[StateUpdate]]) -> None:
        publish_first, updates = history
        if publish_first:
            updates = [_published("j", _BASE), *updates]
        queue = f"prop-{uuid.uuid4().hex[:12]}"

        async def example() -> None:
            expected = JobInfo(job_id="j", queue=queue)
            try:
                for update in updates:
                    await store.record(queue, update)
                    expected = expected.apply(update)
                    assert await store.info(queue, "j") == expected, update
            finally:
                await store.forget_queue(queue)
            assert (await store.info(queue, "j")).status is JobStatus.UNKNOWN
            assert [key async for key in raw.scan_iter(match=f"{prefix}{{{queue}}}*")] == []

        loop.run_until_complete(example())

    try:
        check()
    finally:
        loop.run_until_complete(store.close())
        loop.run_until_complete(raw.aclose())
        loop.close()


@pytest.mark.parametrize(
    "ending",
    [
        StateUpdate("j", JobStatus.RETRYING, _BASE + 3, attempts=1, error="boom"),
        StateUpdate("j", JobStatus.QUEUED, _BASE + 3, attempts=1),  # released, or a resumable retry
        _succeeded("j", _BASE + 3),
        StateUpdate("j", JobStatus.FAILED, _BASE + 3, attempts=1, error="boom", ttl=KEEP),
    ],
    ids=lambda update: update.status.value,
)
async def test_the_last_progress_report_stays_on_the_record_after_the_run_ends(
    redis_url: str, queue: str, ending: StateUpdate
) -> None:
    """The merge rule keeps a run's last progress once the run ended (retrying, given back, or finished) until
    the next run starts; the Redis record keeps it too, as the memory store's does."""
    updates = [
        _published("j", _BASE),
        _running("j", _BASE + 1),
        StateUpdate("j", JobStatus.RUNNING, _BASE + 2, progress=Progress(0.5, {"step": 5}), kind="progress"),
        ending,
    ]
    memory = MemoryStateStore(LocalClient())
    async with _store(redis_url) as store:
        try:
            for update in updates:
                await store.record(queue, update)
                await memory.record(queue, update)
            kept = await store.info(queue, "j")
            assert kept.status is ending.status
            assert kept.progress == Progress(0.5, {"step": 5})
            assert kept == await memory.info(queue, "j")
            assert await store.info(queue, "j") == kept  # a re-read folds the same record
            if not ending.status.terminal:  # the next run reports its own progress
                await store.record(queue, _running("j", _BASE + 4, attempts=2))
                assert (await store.info(queue, "j")).progress is None
        finally:
            await store.forget_queue(queue)
