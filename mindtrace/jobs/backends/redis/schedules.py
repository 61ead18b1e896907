"""RedisScheduleStore: schedules in a registry hash, cursors under each queue's hash tag, fires by fire.lua."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, ClassVar

from mindtrace.jobs.backends.base import OutgoingMessage, ScheduleMode
from mindtrace.jobs.constants import DLQ_SUFFIX
from mindtrace.jobs.errors import QueueNotFoundError
from mindtrace.jobs.schedules import ScheduleSpec, ScheduleState, ScheduleStore

if TYPE_CHECKING:
    from mindtrace.jobs.backends.redis import RedisClient


class RedisScheduleStore(ScheduleStore):
    """A RedisClient's schedules, "atomic": any number of processes fire them, each fire once.

    ``<prefix>schedules`` (a hash: name -> the spec's JSON) lists them; each schedule's cursor (the last fire
    time handled, in ms on the server's clock) is a field of ``<prefix>{<queue>}:schedules``, under its queue's
    hash tag, so that fire.lua moves it from the fire time a scheduler read and queues the fire's job in one
    script on one cluster slot: of the processes that compute the same fire, one queues it. Times are the
    server's (``TIME``), so scheduler hosts' clocks do not matter.
    """

    mode: ClassVar[ScheduleMode] = "atomic"

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.registry = f"{client.key_prefix}schedules"

    def cursors_key(self, queue: str) -> str:
        """The hash of the cursors of the schedules that publish on ``queue``."""
        stem = queue[: -len(DLQ_SUFFIX)] if queue.endswith(DLQ_SUFFIX) else queue
        return f"{self.client.key_prefix}{{{stem}}}{queue[len(stem) :]}:schedules"

    async def now_ms(self) -> int:
        """The Redis server's clock, in ms."""
        await self.client._ensure_connected()
        connection = self.client._connection
        with connection.io():
            seconds, micros = await connection.commands.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def upsert(self, spec: ScheduleSpec, now_ms: int) -> ScheduleSpec:
        """See :meth:`ScheduleStore.upsert`: the cursor is written first, then the registry."""
        await self.client._ensure_connected()
        connection = self.client._connection
        with connection.io():
            raw = await connection.commands.hget(self.registry, spec.name)
        old = None if raw is None else ScheduleSpec.model_validate_json(raw)
        if old is not None and old.same_as(spec):
            return old
        if old is not None and old.queue != spec.queue:
            with connection.io():
                await connection.commands.hdel(self.cursors_key(old.queue), spec.name)
        await connection.run("schedule_cursor", [self.cursors_key(spec.queue)], [spec.name, "at_least", now_ms, ""])
        with connection.io():
            await connection.commands.hset(self.registry, spec.name, spec.model_dump_json())
        self.changed.set()
        return spec

    async def remove(self, name: str) -> bool:
        """See :meth:`ScheduleStore.remove`: the cursor first (no fire follows), then the registry entry."""
        await self.client._ensure_connected()
        connection = self.client._connection
        with connection.io():
            raw = await connection.commands.hget(self.registry, name)
            if raw is None:
                return False
            spec = ScheduleSpec.model_validate_json(raw)
            await connection.commands.hdel(self.cursors_key(spec.queue), name)
            await connection.commands.hdel(self.registry, name)
        self.changed.set()
        return True

    async def load(self) -> list[ScheduleState]:
        """See :meth:`ScheduleStore.load`: the registry, then each queue's cursors."""
        await self.client._ensure_connected()
        connection = self.client._connection
        with connection.io():
            raw = await connection.commands.hgetall(self.registry)
            specs = [ScheduleSpec.model_validate_json(value) for value in raw.values()]
            by_queue: dict[str, list[ScheduleSpec]] = defaultdict(list)
            for spec in specs:
                by_queue[spec.queue].append(spec)
            states = []
            for queue, queued in by_queue.items():
                cursors = await connection.commands.hmget(self.cursors_key(queue), [spec.name for spec in queued])
                states += [
                    ScheduleState(spec, None if cursor is None else int(cursor))
                    for spec, cursor in zip(queued, cursors, strict=True)
                ]
        return states

    async def advance(self, spec: ScheduleSpec, expected_ms: int | None, cursor_ms: int) -> bool:
        """See :meth:`ScheduleStore.advance`: a compare-and-set of the cursor (schedule_cursor.lua)."""
        await self.client._ensure_connected()
        expected = "" if expected_ms is None else str(expected_ms)
        moved = await self.client._connection.run(
            "schedule_cursor", [self.cursors_key(spec.queue)], [spec.name, "cas", cursor_ms, expected]
        )
        return bool(moved)

    async def fire(self, spec: ScheduleSpec, expected_ms: int, cursor_ms: int, message: OutgoingMessage) -> bool:
        """See :meth:`ScheduleStore.fire`: fire.lua, the cursor's compare-and-set in front of publish.lua."""
        await self.client._ensure_connected()
        keys, args = self.client.publish_call(spec.queue, [message])
        answer = await self.client._connection.run(
            "fire", [*keys, self.cursors_key(spec.queue)], [*args, spec.name, str(expected_ms), str(cursor_ms)]
        )
        if answer == -1:
            raise QueueNotFoundError(spec.queue)
        return bool(answer != -2)
