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

from mindtrace.jobs import AsyncConsumer, AsyncOrchestrator, Job, LocalClient, RedisClient
from mindtrace.jobs.backends.base import Backend
from mindtrace.jobs.lifecycle import CancelOutcome, JobInfo, JobStatus, Progress, StateUpdate
from mindtrace.jobs.state.memory import MemoryStateStore
from mindtrace.jobs.state.redis import RedisStateStore
from tests.jobs.conformance.flows import detect
from tests.jobs.conformance.models import image_schema, make_job
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


# -- waiting costs nothing, and shares the connections -----------------------------------------------


async def _calls(raw: aioredis.Redis) -> dict[str, int]:
    """Calls of each command the server ran so far, by INFO commandstats."""
    stats = await raw.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


async def _connections(raw: aioredis.Redis) -> int:
    """Client connections open on the server, this client's own left out."""
    own = await raw.client_id()
    return sum(1 for client in await raw.client_list() if int(client["id"]) != own)


async def test_idle_waiters_send_no_commands(redis_server: servers.RedisServer, queue: str) -> None:
    """Waiters of jobs that do not finish send nothing at all: no command of any kind runs on the server while
    they wait (a waiter that polled, pinged or re-read on a timer would show); a finish still wakes them."""
    async with _store(redis_server.url) as store, _raw(redis_server.url) as raw:
        ids = [f"idle-{i}" for i in range(20)]
        await store.record_many(queue, [_published(job_id, time.time()) for job_id in ids])
        waiting = [asyncio.ensure_future(store.wait(queue, job_id, timeout=30)) for job_id in ids]
        channels = [store._event_channel(queue, job_id) for job_id in ids]
        await _until(lambda: _subscribed(raw, channels), 5, "the waiters' subscriptions")
        await asyncio.sleep(0.3)  # their first reads
        before = await _calls(raw)
        await asyncio.sleep(1.0)
        after = await _calls(raw)
        sent = {name: calls - before.get(name, 0) for name, calls in after.items() if name != "info"}
        assert sent and all(calls == 0 for calls in sent.values()), sent
        assert not any(task.done() for task in waiting)
        await store.record_many(queue, [_succeeded(job_id, time.time()) for job_id in ids])
        infos = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert [info.status for info in infos] == [JobStatus.SUCCEEDED] * len(ids)


async def test_a_thousand_waiters_share_three_connections_and_all_wake(
    redis_server: servers.RedisServer, queue: str
) -> None:
    """1,000 concurrent waiters in one process hold at most 3 connections to the server (commands, pub/sub),
    waiting and while they all wake and read at once; each wakes with its own job's result."""
    async with _store(redis_server.url) as store, _raw(redis_server.url) as raw:
        ids = [f"many-{i}" for i in range(1000)]
        await store.record_many(queue, [_published(job_id, time.time()) for job_id in ids])
        waiting = [asyncio.ensure_future(store.wait(queue, job_id, timeout=30)) for job_id in ids]
        channels = [store._event_channel(queue, job_id) for job_id in ids]
        await _until(lambda: _subscribed(raw, channels), 10, "1,000 subscriptions")
        waiting_on = await _connections(raw)
        await store.record_many(queue, [_succeeded(job_id, time.time(), value=i) for i, job_id in enumerate(ids)])
        infos = await asyncio.wait_for(asyncio.gather(*waiting), 20)
        woken_with = await _connections(raw)  # the pool keeps what the wake-up opened
        assert 1 <= waiting_on <= 3, waiting_on
        assert woken_with <= 3, woken_with
        assert [info.output for info in infos] == [{"value": i} for i in range(len(ids))]


# -- connections cut ----------------------------------------------------------------------------------


async def test_a_waiter_cut_off_while_its_job_finishes_still_wakes(
    redis_server: servers.RedisServer, proxied: TcpProxy, queue: str
) -> None:
    """A waiter whose connections are down while its job finishes (the finish's message lost with them) wakes
    once it is back: it subscribes again, then reads the record again."""
    async with (
        _store(proxied.via(redis_server.url)) as away,
        _store(redis_server.url, key_prefix=away.key_prefix) as store,
        _raw(redis_server.url) as raw,
    ):
        await store.record(queue, _published("j", time.time()))
        await store.record(queue, _running("j", time.time()))
        waiting = asyncio.ensure_future(away.wait(queue, "j", timeout=20))
        await _until(lambda: _subscribed(raw, [store._event_channel(queue, "j")]), 5, "the subscription")
        await asyncio.sleep(0.2)  # its first read
        proxied.blackhole()
        await store.record(queue, _succeeded("j", time.time(), value=7))  # its message dies in the proxy
        await asyncio.sleep(0.3)
        assert not waiting.done()
        accepted = proxied.accepted
        proxied.blackhole(False)
        assert proxied.cut() >= 1
        info = await asyncio.wait_for(waiting, 10)
        assert (info.status, info.output) == (JobStatus.SUCCEEDED, {"value": 7})
        assert proxied.accepted > accepted  # it came back through new connections


async def test_a_cancel_sent_while_the_listener_is_cut_off_is_delivered_after_it_reconnects(
    redis_server: servers.RedisServer, proxied: TcpProxy, queue: str
) -> None:
    """A cancel listener that misses a cancel (its pub/sub connection down) catches up from the queue's cancel
    stream once it is back, and delivers each cancel once: not the ones it had heard, nor the caught-up one
    again when the next live one comes."""
    async with (
        _store(proxied.via(redis_server.url)) as away,
        _store(redis_server.url, key_prefix=away.key_prefix) as store,
    ):
        for job_id in ("a", "b", "c"):
            await store.record(queue, _published(job_id, time.time()))
            await store.record(queue, _running(job_id, time.time()))
        heard: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        listener = await away.listen_cancels(queue, lambda job_id, reason: heard.put_nowait((job_id, reason)))
        try:
            assert await store.cancel(queue, "a", reason="live") is CancelOutcome.CANCELLING
            assert await asyncio.wait_for(heard.get(), 5) == ("a", "live")
            proxied.blackhole()
            assert await store.cancel(queue, "b", reason="missed") is CancelOutcome.CANCELLING
            await asyncio.sleep(0.3)
            assert heard.empty()
            proxied.blackhole(False)
            assert proxied.cut() >= 1
            assert await asyncio.wait_for(heard.get(), 10) == ("b", "missed")
            assert await store.cancel(queue, "c") is CancelOutcome.CANCELLING
            assert await asyncio.wait_for(heard.get(), 5) == ("c", None)
            await asyncio.sleep(0.2)
            assert heard.empty()
        finally:
            await listener.close()


# -- retention and restarts ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["redis", "rabbitmq+redis"])
async def test_a_finished_record_expires_by_the_server_after_result_ttl(
    backend_factory: Callable[[], Backend],
    orchestrator_options: dict[str, Any],
    redis_url: str,
    queue: str,
) -> None:
    """With ``result_ttl=1`` a finished job's record is kept a second, by the Redis server itself (the key
    expires), then reads UNKNOWN: with the Redis broker and with RabbitMQ beside a Redis store."""
    schema = image_schema(queue)
    async with AsyncOrchestrator(backend_factory(), result_ttl=1, **orchestrator_options) as orchestrator:
        try:
            await orchestrator.register(schema)
            handle = await orchestrator.publish(queue, make_job(schema, 1))

            class _Detect(AsyncConsumer):
                async def run(self, job: Job) -> Any:
                    return await detect(job)

            consumer = _Detect(queue, max_retries=0)
            consumer.connect(orchestrator)
            assert await asyncio.wait_for(consumer.consume(num_messages=1), 20) == 1
            store = orchestrator.state
            assert isinstance(store, RedisStateStore)
            key = store.record_key(queue, handle.id)
            kept = await handle.info()
            assert kept.status is JobStatus.SUCCEEDED
            assert kept.expires_at is not None and kept.finished_at is not None
            assert abs((kept.expires_at - kept.finished_at).total_seconds() - 1.0) < 0.01
            async with _raw(redis_url) as raw:
                assert 0 < await raw.pttl(key) <= 1000

                async def forgotten() -> bool:
                    return await handle.status() is JobStatus.UNKNOWN

                await _until(forgotten, 3, "the record's expiry")
                assert await raw.exists(key) == 0
        finally:
            await orchestrator.delete_queue(queue)


async def test_a_finished_record_survives_a_crash_and_restart_of_a_persisting_server(queue: str) -> None:
    """On a server with ``appendonly yes`` and ``appendfsync always`` in its own directory, a finished record
    (status, output, retention, and its being final) is all there after the server is killed and started."""
    server = _private_server(appendonly=True, appendfsync="always")
    try:
        prefix = f"mtj-state-{uuid.uuid4().hex[:8]}:"
        async with _store(server.url, key_prefix=prefix) as store:
            for update in (_published("j", time.time()), _running("j", time.time()), _succeeded("j", time.time(), 42)):
                await store.record(queue, update)
            before = await store.info(queue, "j")
            key = store.record_key(queue, "j")
        pid = server.process.pid if server.process else None
        server.restart(kill=True)  # SIGKILL: only what reached the disk comes back
        assert server.process is not None and server.process.pid != pid
        async with _store(server.url, key_prefix=prefix) as store, _raw(server.url) as raw:
            after = await store.info(queue, "j")
            assert after == before
            assert (after.status, after.output, after.attempts) == (JobStatus.SUCCEEDED, {"value": 42}, 1)
            assert 0 < await raw.pttl(key) <= KEEP * 1000  # its retention goes on
            await store.record(queue, _running("j", time.time(), attempts=2))  # a stale re-run changes nothing
            assert await store.info(queue, "j") == before
    finally:
        server.cleanup()
