"""RedisClient: queues as hash-tagged Redis keys, changed only by the atomic Lua scripts in ``lua/``.

The package by noun: ``connection`` (redis-py clients, error boundary, script runner), ``keys`` (key layout,
leases, priority ranks), ``receiver`` (claiming and waiting on wake lists), ``faults`` (refusals, the bounded
connect, the eviction-policy check, claims sent once, chunked purges), ``lua/`` (one script per transition).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from mindtrace.jobs.backends._endpoint import Endpoint
from mindtrace.jobs.backends.base import (
    PRIORITY_LEVELS,
    Backend,
    Capabilities,
    Delivery,
    OutgoingMessage,
    QueueOptions,
    QueueStats,
    Receiver,
    dead_letter_queue_name,
)
from mindtrace.jobs.backends.redis.connection import (
    _RETRY_BASE,
    _RETRY_CAP,
    RedisConnection,
    check_tls_options,
    parse_url,
)
from mindtrace.jobs.backends.redis.faults import claim_sent_once, purge_in_chunks
from mindtrace.jobs.backends.redis.keys import _Keys, _keys_of, _Lease, _priority_of
from mindtrace.jobs.backends.redis.receiver import _RedisReceiver, _Wakes
from mindtrace.jobs.constants import (
    CONNECT_TIMEOUT,
    DLQ_SUFFIX,
    MAX_PAYLOAD_BYTES,
    OPERATION_TIMEOUT,
    REDIS_CONNECTION_RETRIES,
    REDIS_KEY_PREFIX,
    VISIBILITY_TIMEOUT,
)
from mindtrace.jobs.errors import (
    ConfigurationError,
    JobsError,
    LeaseLostError,
    QueueConflictError,
    QueueNotFoundError,
)
from mindtrace.jobs.lifecycle import StateUpdate
from mindtrace.jobs.wire import peek_job_id

if TYPE_CHECKING:
    from mindtrace.jobs.backends.redis.schedules import RedisScheduleStore
    from mindtrace.jobs.state.redis import RedisStateStore

logger = logging.getLogger("mindtrace.jobs")

#: Messages per publish script call; bigger batches go as several calls in one MULTI/EXEC transaction.
_PUBLISH_CHUNK = 500


class RedisClient(Backend):
    """Redis backend (``redis://`` or ``rediss://``): durable queues with leases, priorities and no polling.

    Each queue is a set of keys under ``key_prefix`` sharing one hash tag (a queue and its dead-letter
    queue too), changed only by atomic Lua scripts, one per transition. Delivery is at least once: a
    claimed job is leased for ``visibility_timeout`` seconds, renewed by the consumer while it runs; if its
    holder dies the job is claimable again once the lease ends, and the old holder can no longer ack it
    (LeaseLostError). Priority order, then FIFO. Idle receivers block on Redis, they do not poll. What
    survives a server restart is what the server persists (use ``appendonly yes``). Commands are retried
    with exponential backoff ``connection_retries`` times before BackendUnavailableError. Connecting gives
    up after ``connect_timeout`` seconds in total (CONNECT_TIMEOUT, 10 s, by default: attempts and backoff
    together) with a BackendUnavailableError saying what was tried for how long; a server that answers and
    refuses (credentials, ACL permissions, database number) raises BackendRefusedError at once. A server
    whose ``maxmemory-policy`` is ``allkeys-*`` (it would evict queued jobs) is refused with a
    ConfigurationError at connect. The password never appears in ``repr``, ``describe()`` or errors.

    TLS (``ssl=True``, or a ``rediss://`` URL) verifies the server's certificate and host name against the
    system's trusted CAs, or against the CA bundle file ``ssl_ca_certs`` (which implies TLS).
    ``ssl_cert_reqs`` is ``"required"`` (the default), ``"optional"`` or ``"none"`` (no verification).
    A certificate that fails verification is a BackendUnavailableError at once, without retries.
    """

    schemes = ("redis", "rediss")

    def __init__(
        self,
        host: str = "localhost",
        port: int = 6379,
        db: int = 0,
        password: str | None = None,
        *,
        username: str | None = None,
        ssl: bool = False,
        ssl_ca_certs: str | None = None,
        ssl_cert_reqs: str = "required",
        key_prefix: str = REDIS_KEY_PREFIX,
        visibility_timeout: float = VISIBILITY_TIMEOUT,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        operation_timeout: float = OPERATION_TIMEOUT,
        connection_retries: int = REDIS_CONNECTION_RETRIES,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigurationError(f"port must be an int in 1..65535, not {port!r}")
        if not isinstance(db, int) or db < 0:
            raise ConfigurationError(f"db must be an int >= 0, not {db!r}")
        if "{" in key_prefix or "}" in key_prefix:
            raise ConfigurationError(f"key_prefix {key_prefix!r} must not hold braces: they mark cluster hash tags")
        if not visibility_timeout > 0 or math.isinf(visibility_timeout):
            raise ConfigurationError(
                f"visibility_timeout must be a positive number of seconds, not {visibility_timeout}"
            )
        if not operation_timeout > 0:
            raise ConfigurationError(f"operation_timeout must be positive, not {operation_timeout}")
        if not connect_timeout > 0 or math.isinf(connect_timeout):
            raise ConfigurationError(f"connect_timeout must be a positive number of seconds, not {connect_timeout}")
        if connection_retries < 0:
            raise ConfigurationError(f"connection_retries must be >= 0, not {connection_retries}")
        check_tls_options(ssl_ca_certs, ssl_cert_reqs)
        self.host = host
        self.port = port
        self.db = db
        self.username = username
        self.ssl = ssl or ssl_ca_certs is not None
        self.ssl_ca_certs = ssl_ca_certs
        self.ssl_cert_reqs = ssl_cert_reqs
        self.key_prefix = key_prefix
        self.visibility_timeout = float(visibility_timeout)
        self.capabilities = Capabilities(
            lease_timeout=self.visibility_timeout,
            counted_deliveries=True,
            exact_delays=True,
            max_delay=None,
            priority_levels=PRIORITY_LEVELS,
            queued_job_removal="remove",  # a queued message is keyed by its job id
            can_list_queues=True,
            shared_queues=True,
            unique_job_ids=True,  # publish.lua queues a job id only if the queue holds no body under it
            schedules="atomic",  # fire.lua: the cursor's compare-and-set and the publish in one script
            job_records=True,  # RedisStateStore, on the same server
            queue_counts=frozenset({"ready", "running", "delayed", "dead_lettered"}),  # consumers: not tracked
        )
        self.operation_timeout = float(operation_timeout)
        self.connection_retries = connection_retries
        self.connect_timeout = float(connect_timeout)
        # Kept apart from the public attributes: only the driver ever sees it.
        self._password = password
        self.endpoint = Endpoint("redis", host, port, username, str(db), self.ssl)
        self._connection = RedisConnection(
            endpoint=self.endpoint,
            password=password,
            ssl_ca_certs=ssl_ca_certs,
            ssl_cert_reqs=ssl_cert_reqs,
            operation_timeout=self.operation_timeout,
            connection_retries=connection_retries,
            connect_timeout=self.connect_timeout,
        )
        self._wakes = _Wakes(self._connection, self.operation_timeout)
        self._claims: set[asyncio.Task[Any]] = set()
        self._held: weakref.WeakSet[Delivery] = weakref.WeakSet()
        # Per queue: tokens of claims whose answer was lost; the next claim adopts what they hold.
        self._doubtful: dict[str, dict[str, int]] = {}
        self._state: RedisStateStore | None = None
        self._schedules: RedisScheduleStore | None = None

    def state_store(self) -> RedisStateStore:
        """This client's job records: a RedisStateStore on the same server, with its own connections, written by
        this client's publish and settle scripts in the same step (made once)."""
        if self._state is None:
            from mindtrace.jobs.state.redis import RedisStateStore

            self._state = RedisStateStore(self.new_connection(), key_prefix=self.key_prefix, owner=self)
        return self._state

    def schedule_store(self) -> RedisScheduleStore:
        """This client's schedules: a RedisScheduleStore on the same server and connection (made once)."""
        if self._schedules is None:
            from mindtrace.jobs.backends.redis.schedules import RedisScheduleStore

            self._schedules = RedisScheduleStore(self)
        return self._schedules

    def new_connection(self) -> RedisConnection:
        """A new, unopened RedisConnection to this client's server, with its options (for a state store)."""
        return RedisConnection(
            endpoint=self.endpoint,
            password=self._password,
            ssl_ca_certs=self.ssl_ca_certs,
            ssl_cert_reqs=self.ssl_cert_reqs,
            operation_timeout=self.operation_timeout,
            connection_retries=self.connection_retries,
            connect_timeout=self.connect_timeout,
        )

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisClient:
        """A client for ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

        User and password are percent-decoded. Any Redis URL takes ``connect_timeout`` (seconds) as a query
        parameter, e.g. ``redis://host:6379/0?connect_timeout=3``. A ``rediss://`` URL also takes the TLS
        options ``ssl_ca_certs`` (path of a CA bundle) and ``ssl_cert_reqs``, e.g.
        ``rediss://host:6380/0?ssl_ca_certs=/etc/ssl/my-ca.pem``; no other query is accepted. Keyword
        arguments are passed to the constructor and win over the URL. Errors never repeat the URL, which may
        hold a password.
        """
        options = parse_url(url, cls.schemes)
        options.update(kwargs)
        return cls(**options)

    def describe(self) -> str:
        """``redis://host:port/db`` (``rediss://`` with TLS); never the user or password."""
        return self.endpoint.describe()

    # -- plumbing ------------------------------------------------------------------------------------

    def _keys(self, queue: str) -> _Keys:
        return _keys_of(self.key_prefix, queue)

    async def _connect(self) -> None:
        await self._connection.connect()

    async def _close(self) -> None:
        reads = self._wakes.stop()
        await asyncio.gather(
            *reads, *self._claims, *self._wakes.tasks(), *self._connection.tasks(), return_exceptions=True
        )
        unsettled = [delivery for delivery in self._held if not delivery.settled]
        if unsettled:
            await self._give_back(unsettled)
        # A read cut short may have taken a wake-up meant for a receiver elsewhere: pass it on.
        for keys in set(reads.values()):
            await self._wakes.push(keys)
        await self._connection.close()

    async def _claim(
        self, queue: str, keys: _Keys, count: int, into: collections.deque[Delivery], worker: str | None = None
    ) -> float | None:
        """Claim up to ``count`` messages into ``into``; seconds until the next deadline, None if none.

        With a ``worker`` and this client's own store, the claim records each first delivery's start
        (``Delivery.started``), except on a dead-letter queue (its jobs keep no records of their own).
        """
        task = asyncio.current_task()
        if task is not None:
            self._claims.add(task)
        try:
            lease_ms = math.ceil(self.visibility_timeout * 1000)
            script_keys = [
                *(keys.meta, keys.ready, keys.delayed, keys.leases, keys.bodies),
                *(keys.tokens, keys.ranks, keys.deliveries, keys.wake),
            ]
            records = ["", "", ""]
            if worker is not None and self._state is not None and not queue.endswith(DLQ_SUFFIX):
                script_keys.append(self._state.index_key(queue))
                records = [*self._state.forget_prefixes(queue), worker]

            async def run(token: str, doubtful: list[str]) -> Any:
                return await self._connection.run_once(
                    "claim", script_keys, [count, lease_ms, token, *records, *doubtful]
                )

            sent_at = asyncio.get_running_loop().time()
            with self._connection.io():
                token, reply = await claim_sent_once(
                    run,
                    self._doubtful.setdefault(queue, {}),
                    retries=self.connection_retries,
                    backoff_base=_RETRY_BASE,
                    backoff_cap=_RETRY_CAP,
                )
        finally:
            if task is not None:
                self._claims.discard(task)
        if reply[0] == 0:
            raise QueueNotFoundError(queue)
        for i in range(2, len(reply), 5):
            message_id, body, rank, deliveries, start = reply[i : i + 5]
            delivery = Delivery(
                queue,
                body,
                _priority_of(rank),
                handle=_Lease(message_id, token),
                delivery_count=int(deliveries),
                claimed_at=sent_at,
            )
            if start:
                delivery.started = True
                if start[:1] == b"c":
                    delivery.cancel_reason = start[1:].decode()
            self._held.add(delivery)
            into.append(delivery)
        wait_ms = int(reply[1])
        return None if wait_ms < 0 else wait_ms / 1000

    async def _give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Release claimed messages that were never handed out (best effort: leases expire anyway)."""
        for delivery in deliveries:
            delivery.settled = True
        try:
            await asyncio.wait_for(self._release_all(deliveries), self.operation_timeout)
        except (JobsError, asyncio.TimeoutError) as exc:
            logger.warning(
                "could not give back %d claimed message(s) to %s; they return when their leases end: %s",
                len(deliveries),
                self.describe(),
                exc,
            )

    async def _release_all(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await self._release(delivery)

    def _with_record(
        self, queue: str, state: StateUpdate | None, keys: list[Any], args: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        """A script's keys and arguments, followed by the record's when ``state`` is given (own store only)."""
        if state is None or self._state is None:
            return keys, args
        return [*keys, *self._state.record_keys(queue, state)], [*args, *self._state.record_args(queue, state)]

    def _lease_lost(self, delivery: Delivery, job_id: str | None = None) -> LeaseLostError:
        return LeaseLostError(
            queue=delivery.queue, job_id=job_id or peek_job_id(delivery.body), backend=self.describe()
        )

    # -- primitives ----------------------------------------------------------------------------------

    async def _declare_queue(self, queue: str, options: QueueOptions) -> None:
        encoded = json.dumps(dataclasses.asdict(options), sort_keys=True, separators=(",", ":"))
        existing = await self._connection.run("declare", [self._keys(queue).meta], [encoded])
        if existing != 1:
            raise QueueConflictError(
                f"queue {queue!r} exists with options {existing.decode(errors='replace')}, not {encoded}", queue=queue
            )

    async def _queue_exists(self, queue: str) -> bool:
        with self._connection.io():
            return bool(await self._connection.commands.exists(self._keys(queue).meta))

    async def _publish(self, queue: str, message: OutgoingMessage) -> str | None:
        held = await self._publish_many(queue, [message])
        return None if held is None else held[0]

    def publish_call(self, queue: str, chunk: Sequence[OutgoingMessage]) -> tuple[list[Any], list[Any]]:
        """publish.lua's keys and arguments for ``chunk``: with this client's records when every message carries
        its QUEUED record (the orchestrator gives all of them one, or none)."""
        keys = self._keys(queue)
        base_keys = [keys.meta, keys.sequence, keys.ready, keys.bodies, keys.wake, keys.delayed, keys.ranks]
        store = self._state if all(message.state is not None for message in chunk) else None
        if store is None:
            return base_keys, [value for m in chunk for value in (m.priority, m.job_id, m.body, _ms(m.delay))]
        script_keys = [*base_keys, store.index_key(queue), *(store.record_key(queue, m.job_id) for m in chunk)]
        args = [
            value
            for m in chunk
            for value in (
                *(m.priority, m.job_id, m.body, _ms(m.delay)),
                *store.record_args(queue, cast(StateUpdate, m.state)),
                *store.unique_args(queue, cast(StateUpdate, m.state)),
            )
        ]
        return script_keys, args

    async def _publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> list[str] | None:
        chunks = [messages[i : i + _PUBLISH_CHUNK] for i in range(0, len(messages), _PUBLISH_CHUNK)]
        store = self._state if all(message.state is not None for message in messages) else None

        def call(chunk: Sequence[OutgoingMessage]) -> tuple[list[Any], list[Any]]:
            return self.publish_call(queue, chunk)

        if len(chunks) == 1:
            queued = [await self._connection.run("publish", *call(chunks[0]))]
        else:
            # One transaction: all chunks are queued, or (undeclared queue) none.
            with self._connection.io():
                async with self._connection.commands.pipeline(transaction=True) as pipe:
                    for chunk in chunks:
                        script_keys, args = call(chunk)
                        await self._connection.script("publish")(keys=script_keys, args=args, client=pipe)
                    queued = await pipe.execute()
        if any(not isinstance(answer, list) and answer < 0 for answer in queued):
            raise QueueNotFoundError(queue)
        if store is None:
            return None
        # With records, each call answers [queued, holder per message]: a holder is the job whose unique key
        # kept the message out ("": queued under its own id, or held under it already).
        holders = [h.decode() if isinstance(h, bytes) else str(h) for answer in queued for h in answer[1:]]
        return [holder or message.job_id for holder, message in zip(holders, messages, strict=True)]

    async def _open_receiver(self, queue: str, prefetch: int, worker: str | None = None) -> Receiver:
        async def claim(queue: str, keys: _Keys, count: int, into: collections.deque[Delivery]) -> float | None:
            return await self._claim(queue, keys, count, into, worker)

        return _RedisReceiver(
            self,
            queue,
            prefetch,
            keys=self._keys(queue),
            claim=claim,
            give_back=self._give_back,
            wakes=self._wakes,
            visibility_timeout=self.visibility_timeout,
        )

    async def _ack(self, delivery: Delivery, state: StateUpdate | None = None) -> None:
        self._held.discard(delivery)
        keys, lease = self._keys(delivery.queue), delivery.handle
        done = await self._connection.run(
            "ack",
            *self._with_record(
                delivery.queue,
                state,
                [keys.leases, keys.tokens, keys.ranks, keys.bodies, keys.deliveries],
                [lease.message_id, lease.token],
            ),
        )
        if done < 0:
            raise self._lease_lost(delivery)

    async def _release(self, delivery: Delivery, state: StateUpdate | None = None) -> None:
        # A lost lease needs nothing: the message is already back in the queue or held by someone else.
        self._held.discard(delivery)
        keys, lease = self._keys(delivery.queue), delivery.handle
        script_keys, args = self._with_record(
            delivery.queue,
            state,
            [keys.ready, keys.leases, keys.tokens, keys.ranks, keys.deliveries, keys.wake],
            [lease.message_id, lease.token],
        )
        store = self._state
        if state is None and store is not None and delivery.started and delivery.cancel_reason is None:
            # Given back unrun (a receiver's buffer): the start its claim recorded is undone in the same step.
            job_id = lease.message_id.decode() if isinstance(lease.message_id, bytes) else str(lease.message_id)
            script_keys += [store.record_key(delivery.queue, job_id), store.index_key(delivery.queue)]
            args += ["", store.forget_prefixes(delivery.queue)[1] + job_id]
        await self._connection.run("release", script_keys, args)

    async def _retry(
        self, delivery: Delivery, message: OutgoingMessage, delay: float, state: StateUpdate | None = None
    ) -> None:
        self._held.discard(delivery)
        keys, lease = self._keys(delivery.queue), delivery.handle
        done = await self._connection.run(
            "retry",
            *self._with_record(
                delivery.queue,
                state,
                [
                    *(keys.sequence, keys.ready, keys.delayed, keys.leases, keys.bodies),
                    *(keys.tokens, keys.ranks, keys.deliveries, keys.wake),
                ],
                [lease.message_id, lease.token, message.priority, message.body, _ms(delay)],
            ),
        )
        if done < 0:
            raise self._lease_lost(delivery, message.job_id)

    async def _dead_letter(
        self, delivery: Delivery, dead_letter_queue: str, message: OutgoingMessage, state: StateUpdate | None = None
    ) -> None:
        self._held.discard(delivery)
        keys, dead, lease = self._keys(delivery.queue), self._keys(dead_letter_queue), delivery.handle
        done = await self._connection.run(
            "dead_letter",
            *self._with_record(
                delivery.queue,
                state,
                [
                    *(keys.leases, keys.tokens, keys.ranks, keys.bodies, keys.deliveries, keys.meta),
                    *(dead.meta, dead.sequence, dead.ready, dead.bodies, dead.wake),
                ],
                [lease.message_id, lease.token, message.priority, message.body],
            ),
        )
        if done < 0:
            raise self._lease_lost(delivery, message.job_id)

    async def _extend(self, delivery: Delivery, seconds: float) -> bool:
        keys, lease = self._keys(delivery.queue), delivery.handle
        done = await self._connection.run(
            "extend", [keys.leases, keys.tokens], [lease.message_id, lease.token, math.ceil(seconds * 1000)]
        )
        if done < 0:
            raise self._lease_lost(delivery)
        return False

    async def _count(self, queue: str) -> int:
        keys = self._keys(queue)
        count = await self._connection.run(
            "count", [keys.meta, keys.ready, keys.delayed, keys.leases, keys.tokens, keys.ranks, keys.wake], []
        )
        if count < 0:
            raise QueueNotFoundError(queue)
        return int(count)

    @property
    def registry_key(self) -> str:
        """The set of every declared queue name (``<prefix>queues``): no brace, so no queue's key can be it."""
        return f"{self.key_prefix}queues"

    async def _register_queue(self, queue: str) -> None:
        # A key apart from the queue's hash tag (a cluster slot of its own), so not in declare.lua's step: a crash
        # in between leaves a queue unlisted until an orchestrator's ensure_queue finds it (register_queue) or it is
        # declared again.
        with self._connection.io():
            await self._connection.commands.sadd(self.registry_key, queue)

    async def _unregister_queue(self, queue: str) -> None:
        with self._connection.io():
            await self._connection.commands.srem(self.registry_key, queue)

    async def _list_queues(self) -> list[str]:
        with self._connection.io():
            members = await self._connection.commands.smembers(self.registry_key)
            names = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
            if not names:
                return []
            # A queue whose keys are gone (a restart without persistence) is not listed.
            async with self._connection.commands.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(self._keys(name).meta)
                exists = await pipe.execute()
        return [name for name, alive in zip(names, exists, strict=True) if alive]

    async def _queue_stats(self, queue: str) -> QueueStats:
        keys = self._keys(queue)
        dlq_name = dead_letter_queue_name(queue)
        if dlq_name == queue:
            dead_keys = ["", "", "", ""]
        else:
            dead = self._keys(dlq_name)
            dead_keys = [dead.meta, dead.ready, dead.delayed, dead.leases]
        reply = await self._connection.run(
            "stats",
            [keys.meta, keys.ready, keys.delayed, keys.leases, keys.tokens, keys.ranks, keys.wake, *dead_keys],
            [],
        )
        if reply == -1:
            raise QueueNotFoundError(queue)
        ready, running, delayed, dead_lettered = (int(value) for value in reply)
        return QueueStats(queue, ready, running=running, delayed=delayed, dead_lettered=dead_lettered)

    async def _peek(self, queue: str, limit: int) -> list[bytes]:
        keys = self._keys(queue)
        reply = await self._connection.run("peek", [keys.meta, keys.ready, keys.bodies], [limit])
        if reply == -1:
            raise QueueNotFoundError(queue)
        return [bytes(body) for body in reply]

    async def _purge(self, queue: str) -> int:
        keys = self._keys(queue)
        script_keys = [
            *(keys.meta, keys.ready, keys.delayed, keys.leases, keys.tokens, keys.ranks, keys.bodies, keys.deliveries)
        ]

        extra: list[Any] = []
        if self._state is not None:  # its own store: the records of purged jobs go in the same step
            script_keys.append(self._state.index_key(queue))
            extra = list(self._state.forget_prefixes(queue))

        async def run_chunk(chunk: int) -> int:
            return int(await self._connection.run("purge", script_keys, [chunk, *extra]))

        removed = await purge_in_chunks(run_chunk)
        if removed < 0:
            raise QueueNotFoundError(queue)
        return int(removed)

    async def _delete_queue(self, queue: str) -> None:
        # One command, so atomic: every key of the queue goes at once.
        with self._connection.io():
            await self._connection.commands.unlink(*self._keys(queue).all())
        if self._state is not None:  # its own store: the queue's records go too
            await self._state.forget_queue(queue)


def _ms(seconds: float) -> int:
    """A delay in whole milliseconds, rounded up (a job is never ready before its delay ends)."""
    return math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0
