"""RedisClient: queues as hash-tagged Redis keys, changed only by the atomic Lua scripts in ``redis_lua/``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import importlib.resources
import json
import logging
import math
import secrets
import ssl as _ssl
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, AuthorizationError, NoScriptError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mindtrace.jobs.backends.base import (
    PRIORITY_LEVELS,
    Backend,
    Capabilities,
    Delivery,
    OutgoingMessage,
    QueueOptions,
    Receiver,
)
from mindtrace.jobs.constants import (
    DLQ_SUFFIX,
    MAX_PAYLOAD_BYTES,
    MAX_PRIORITY,
    MIN_PRIORITY,
    OPERATION_TIMEOUT,
    REDIS_CONNECTION_RETRIES,
    REDIS_KEY_PREFIX,
    REDIS_MAX_BLOCK,
    VISIBILITY_TIMEOUT,
)
from mindtrace.jobs.errors import (
    BackendError,
    ClosedError,
    ConfigurationError,
    JobsError,
    LeaseLostError,
    QueueConflictError,
    QueueNotFoundError,
    translate_driver_errors,
)

logger = logging.getLogger("mindtrace.jobs")

_T = TypeVar("_T")

#: Ranks are (MAX_PRIORITY - priority) * _PRIORITY_BAND + sequence, as in redis_lua/lib.lua.
_PRIORITY_BAND = 2**44

#: Longest an idle receiver blocks between two claims. Wake-ups and deadlines returned by the claim make
#: receivers react at once; this only bounds how late one notices what nobody told it about (a lease taken
#: and lost by another process, a deleted queue).
_MAX_BLOCK = REDIS_MAX_BLOCK

#: Messages per publish script call; bigger batches go as several calls in one MULTI/EXEC transaction.
_PUBLISH_CHUNK = 500

#: Retry backoff for commands while the server is unreachable: first wait and cap, in seconds.
_RETRY_BASE, _RETRY_CAP = 0.1, 2.0

_SCRIPTS = ("declare", "publish", "claim", "ack", "release", "retry", "dead_letter", "extend", "count", "purge", "wake")


_REFUSED = (AuthenticationError, AuthorizationError)

#: TLS options ``from_url`` takes from a ``rediss://`` URL's query, and the values of ``ssl_cert_reqs``.
_URL_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs")
_CERT_REQS = ("required", "optional", "none")


def _untrusted_certificate(error: BaseException) -> bool:
    """Whether ``error`` (as redis-py wraps it) is the server's TLS certificate failing verification."""
    return isinstance(error.__cause__, _ssl.SSLCertVerificationError) or isinstance(
        error.__context__, _ssl.SSLCertVerificationError
    )


class _Retry(Retry):
    """redis-py's Retry, except that refused credentials and untrusted certificates fail at once: trying
    again cannot help."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[_T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> _T:
        def retryable(error: Exception) -> bool:
            refused = isinstance(error, _REFUSED) or _untrusted_certificate(error)
            return not refused and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


@functools.cache
def _script_sources() -> dict[str, str]:
    """Each transition's Lua source, after the shared definitions of ``lib.lua``."""
    folder = importlib.resources.files("mindtrace.jobs.backends").joinpath("redis_lua")
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    return {name: lib + "\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}


@dataclasses.dataclass(frozen=True)
class _Keys:
    """The keys of one queue: ``<prefix>{<queue without .dlq>}[.dlq]:<name>``.

    A queue and its dead-letter queue share the hash tag, so each script touches a single cluster slot.
    """

    meta: str  # hash: options (JSON); exists exactly while the queue does
    sequence: str  # counter: message ids and FIFO order
    ready: str  # sorted set: message id -> rank
    delayed: str  # sorted set: message id -> time (ms) its retry delay ends
    leases: str  # sorted set: message id -> time (ms) its lease ends
    bodies: str  # hash: message id -> body
    tokens: str  # hash: message id -> token of its current lease
    ranks: str  # hash: message id -> rank to come back to, while claimed or delayed
    deliveries: str  # hash: message id -> times claimed
    wake: str  # list: wake-up tokens for receivers blocked on the queue

    @classmethod
    def of(cls, prefix: str, queue: str) -> _Keys:
        stem = queue[: -len(DLQ_SUFFIX)] if queue.endswith(DLQ_SUFFIX) else queue
        base = f"{prefix}{{{stem}}}{queue[len(stem) :]}:"
        return cls(*(base + field.name for field in dataclasses.fields(cls)))

    def all(self) -> list[str]:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


_keys_of = functools.lru_cache(maxsize=1024)(_Keys.of)


@dataclasses.dataclass(frozen=True)
class _Lease:
    """A Delivery's handle: the message id in its queue and the token of this claim."""

    message_id: bytes
    token: str


def _priority_of(rank: bytes) -> int:
    # A member written by someone else may carry any score: clamp it into the priority range.
    try:
        band = int(float(rank) // _PRIORITY_BAND)
    except (ValueError, OverflowError):
        return MIN_PRIORITY
    return min(MAX_PRIORITY, max(MIN_PRIORITY, MAX_PRIORITY - band))


def _job_id(body: bytes) -> str | None:
    """The job id in an encoded job, for error messages; None for bytes that are not a job."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    job_id = value.get("id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) else None


class _RedisReceiver(Receiver):
    """Claims from one queue; one get() at a time claims or blocks for this receiver, the others wait.

    A claim takes as many messages as there are get() calls waiting (at most ``prefetch``), so no message
    sits leased in the buffer without a taker. Nothing ready: block on the queue's wake list (BLPOP, on a
    connection of the blocking pool) until a wake-up, the next deadline the claim reported, or the timeout.
    """

    def __init__(self, client: RedisClient, queue: str, prefetch: int) -> None:
        self._client = client
        self._queue = queue
        self._keys = client._keys(queue)
        self._prefetch = prefetch
        self._buffer: collections.deque[Delivery] = collections.deque()
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._claims: set[asyncio.Task[float | None]] = set()
        self._closed = False

    def _check_open(self) -> None:
        self._client._check_usable()
        if self._closed:
            raise ClosedError(f"receiver on queue {self._queue!r} is closed")

    async def get(self, timeout: float | None = None) -> Delivery | None:
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        self._waiting += 1
        try:
            while True:
                if self._buffer:
                    return self._buffer.popleft()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    # No time to wait, not even for another get()'s turn: one claim of our own.
                    await self._claim(1)
                    return self._buffer.popleft() if self._buffer else None
                if not await self._take_turn(remaining):
                    return None
                try:
                    self._check_open()
                    if self._buffer:
                        return self._buffer.popleft()
                    next_deadline = await self._claim(max(1, min(self._prefetch, self._waiting)))
                    if self._buffer:
                        return self._buffer.popleft()
                    block = min(_MAX_BLOCK, self._client.visibility_timeout)
                    if deadline is not None:
                        block = min(block, deadline - loop.time())
                    if next_deadline is not None:
                        block = min(block, next_deadline + 0.002)
                    if block >= 0.001:
                        await self._client._wait_for_wake(self._keys, block)
                finally:
                    self._turn.release()
        finally:
            self._waiting -= 1

    async def _take_turn(self, remaining: float | None) -> bool:
        """Wait until no other get() of this receiver claims or blocks; False if ``remaining`` s pass."""
        if remaining is None:
            await self._turn.acquire()
            return True
        try:
            await asyncio.wait_for(self._turn.acquire(), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    async def _claim(self, count: int) -> float | None:
        """Claim up to ``count`` messages into the buffer; seconds until the queue's next deadline, or None.

        The claim runs shielded: if this get() is cancelled, the messages still land in the buffer, for
        the next get() or for close() to give back.
        """
        task = asyncio.ensure_future(self._client._claim(self._queue, self._keys, count, self._buffer))
        self._claims.add(task)
        task.add_done_callback(self._claim_done)
        return await asyncio.shield(task)

    def _claim_done(self, task: asyncio.Task[float | None]) -> None:
        self._claims.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: a cancelled get() may never look at it

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._claims:
            await asyncio.gather(*self._claims, return_exceptions=True)
        unclaimed = list(self._buffer)
        self._buffer.clear()
        if unclaimed and not self._client.closed:
            await self._client._give_back(unclaimed)


class RedisClient(Backend):
    """Redis backend (``redis://`` or ``rediss://``): durable queues with leases, priorities and no polling.

    Each queue is a set of keys under ``key_prefix`` sharing one hash tag (a queue and its dead-letter
    queue too), changed only by atomic Lua scripts, one per transition. Delivery is at least once: a
    claimed job is leased for ``visibility_timeout`` seconds, renewed by the consumer while it runs; if its
    holder dies the job is claimable again once the lease ends, and the old holder can no longer ack it
    (LeaseLostError). Priority order, then FIFO. Idle receivers block on Redis, they do not poll. What
    survives a server restart is what the server persists (use ``appendonly yes``). Commands are retried
    with exponential backoff ``connection_retries`` times before BackendUnavailableError. The password never
    appears in ``repr``, ``describe()`` or errors.

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
        if connection_retries < 0:
            raise ConfigurationError(f"connection_retries must be >= 0, not {connection_retries}")
        if ssl_cert_reqs not in _CERT_REQS:
            raise ConfigurationError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {ssl_cert_reqs!r}")
        if ssl_ca_certs is not None:
            try:  # a missing or broken bundle is a configuration mistake, not an unreachable server
                _ssl.create_default_context(cafile=ssl_ca_certs)
            except (OSError, _ssl.SSLError) as exc:
                raise ConfigurationError(f"cannot load the CA bundle ssl_ca_certs={ssl_ca_certs!r}: {exc}") from exc
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
            queued_job_removal="tombstone",  # a queued message is keyed by its sequence, not by its job id
            can_list_queues=True,
            shared_queues=True,
        )
        self.operation_timeout = float(operation_timeout)
        self.connection_retries = connection_retries
        # Kept apart from the public attributes: only the driver ever sees it.
        self._password = password
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._reads: dict[asyncio.Task[Any], _Keys] = {}  # blocking reads in progress -> their queue's keys
        self._pushes: set[asyncio.Task[None]] = set()  # wake-ups being passed on
        self._claims: set[asyncio.Task[Any]] = set()
        self._held: weakref.WeakSet[Delivery] = weakref.WeakSet()
        # Script calls made while another is in flight, sent together at the next turn of the loop.
        self._pending: list[tuple[AsyncScript, Sequence[str], Sequence[Any], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._batches: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisClient:
        """A client for ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS).

        User and password are percent-decoded. A ``rediss://`` URL takes the TLS options ``ssl_ca_certs``
        (path of a CA bundle) and ``ssl_cert_reqs`` as query parameters, e.g.
        ``rediss://host:6380/0?ssl_ca_certs=/etc/ssl/my-ca.pem``; no other query is accepted. Keyword
        arguments are passed to the constructor and win over the URL. Errors never repeat the URL, which may
        hold a password.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in cls.schemes:
            raise ConfigurationError(f"RedisClient needs a redis:// or rediss:// URL, not {scheme or '(none)'}://")
        if parts.fragment or (parts.query and scheme != "rediss"):
            raise ConfigurationError(
                "RedisClient URLs take no fragment, and query options (TLS ones) only with rediss://; "
                "pass other options as keyword arguments"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - set(_URL_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"unknown option(s) {', '.join(unknown)} in the Redis URL; known: {', '.join(_URL_OPTIONS)}"
            )
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise ConfigurationError(f"the port in the Redis URL for {parts.hostname!r} is invalid") from exc
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ConfigurationError(f"the Redis URL path must be a database number, not {path!r}")
        options: dict[str, Any] = {
            "host": parts.hostname or "localhost",
            "port": port,
            "db": int(path) if path else 0,
            "password": unquote(parts.password) if parts.password else None,
            "username": unquote(parts.username) if parts.username else None,
            "ssl": scheme == "rediss",
            **query,
        }
        options.update(kwargs)
        return cls(**options)

    def describe(self) -> str:
        """``redis://host:port/db`` (``rediss://`` with TLS); never the user or password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.ssl else 'redis'}://{host}:{self.port}/{self.db}"

    # -- plumbing ------------------------------------------------------------------------------------

    def _keys(self, queue: str) -> _Keys:
        return _keys_of(self.key_prefix, queue)

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        """The one boundary where driver errors become JobsError, the driver's exception chained."""
        try:
            with translate_driver_errors(
                host=self.host,
                port=self.port,
                backend=self.describe(),
                connection_errors=(RedisConnectionError, RedisTimeoutError, OSError),
            ):
                try:
                    yield
                except _REFUSED as exc:  # connection errors to redis-py, but the server answered
                    raise BackendError(
                        f"{self.describe()} refused the credentials: {exc}", backend=self.describe()
                    ) from exc
        except RedisError as exc:
            raise BackendError(
                f"{self.describe()} failed: {type(exc).__name__}: {exc}", backend=self.describe()
            ) from exc

    @property
    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise ClosedError(f"{self.describe()} is not connected")
        return self._redis

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script (each is atomic on the server).

        A call made while none is in flight goes out at once. Calls made while others are in flight (the
        acks and claims of concurrent jobs) are sent together at the next turn of the event loop, as one
        pipeline: one round trip and one connection for all of them instead of one each.
        """
        with self._io():
            if not self._in_flight and not self._pending:
                self._in_flight += 1
                try:
                    return await self._evalsha(self._client, self._scripts[script], keys, args)
                finally:
                    self._in_flight -= 1
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            self._pending.append((self._scripts[script], keys, args, future))
            if len(self._pending) == 1:
                loop.call_soon(self._flush)
            return await future

    @staticmethod
    async def _evalsha(client: Any, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # the server lost its scripts (restart, SCRIPT FLUSH): load it again
            return await script(keys=keys, args=args)

    def _flush(self) -> None:
        batch = [call for call in self._pending if not call[3].done()]  # a cancelled caller's call is not sent
        self._pending = []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[tuple[AsyncScript, Sequence[str], Sequence[Any], asyncio.Future[Any]]]) -> None:
        """Send ``batch`` as one pipeline (not a transaction) and hand each caller its own reply."""
        self._in_flight += 1
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                replies: list[Any] = [await self._evalsha(self._client, script, keys, args)]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            for i, (script, keys, args, _) in enumerate(batch):
                if isinstance(replies[i], NoScriptError):  # reloaded by _evalsha, for this call alone
                    try:
                        replies[i] = await self._evalsha(self._client, script, keys, args)
                    except Exception as exc:
                        replies[i] = exc
        except BaseException as exc:
            for *_, future in batch:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._in_flight -= 1
        for (*_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _connect(self) -> None:
        def client(socket_timeout: float) -> aioredis.Redis:
            return aioredis.Redis(
                host=self.host,
                port=self.port,
                db=self.db,
                ssl=self.ssl,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_cert_reqs=self.ssl_cert_reqs,
                socket_timeout=socket_timeout,
                socket_connect_timeout=self.operation_timeout,
                retry=_Retry(ExponentialWithJitterBackoff(base=_RETRY_BASE, cap=_RETRY_CAP), self.connection_retries),
                username=self.username,
                password=self._password,
            )

        commands = client(self.operation_timeout)
        # Blocking reads wait up to _MAX_BLOCK on connections of their own, never shared with commands.
        blocking = client(_MAX_BLOCK + self.operation_timeout)
        try:
            with self._io():
                await commands.ping()
        except BaseException:
            await commands.aclose()
            await blocking.aclose()
            raise
        self._redis, self._blocking = commands, blocking
        self._scripts = {name: commands.register_script(source) for name, source in _script_sources().items()}

    async def _close(self) -> None:
        reads = dict(self._reads)
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, *self._claims, *self._pushes, *self._batches, return_exceptions=True)
        unsettled = [delivery for delivery in self._held if not delivery.settled]
        if unsettled:
            await self._give_back(unsettled)
        # A read cut short may have taken a wake-up meant for a receiver elsewhere: pass it on.
        for keys in set(reads.values()):
            await self._push_wake(keys)
        redis_client, blocking = self._redis, self._blocking
        self._redis = self._blocking = None
        if redis_client is not None:
            await redis_client.aclose()
        if blocking is not None:
            await blocking.aclose()

    async def _wait_for_wake(self, keys: _Keys, seconds: float) -> None:
        """Block until a wake-up token arrives on the queue's wake list or ``seconds`` pass."""
        if self._blocking is None:
            raise ClosedError(f"{self.describe()} is closed")
        read = asyncio.ensure_future(self._blocking.blpop([keys.wake], timeout=math.ceil(seconds * 1000) / 1000))
        self._reads[read] = keys
        read.add_done_callback(self._read_done)
        try:
            done, _ = await asyncio.wait({read}, timeout=seconds)
        except BaseException:
            # Cancelled: the reply to the read may carry a wake-up that nobody will see; pass one on.
            read.cancel()
            self._pass_on_wake(keys)
            raise
        if not done:
            # The server ends a blocking read up to 1/hz s late (100 ms by default): stop waiting on time
            # and let the read end by itself, its connection intact; a token it takes is passed on.
            read.add_done_callback(functools.partial(self._pass_on_taken_wake, keys))
            return
        if read.cancelled():
            raise ClosedError(f"{self.describe()} was closed while waiting for messages")
        with self._io():
            read.result()

    def _read_done(self, read: asyncio.Task[Any]) -> None:
        self._reads.pop(read, None)
        if not read.cancelled():
            read.exception()  # retrieved: a read left to end by itself has no other reader

    def _pass_on_taken_wake(self, keys: _Keys, read: asyncio.Task[Any]) -> None:
        if not read.cancelled() and read.exception() is None and read.result() is not None:
            self._pass_on_wake(keys)

    def _pass_on_wake(self, keys: _Keys) -> None:
        """Leave a wake-up token for the queue in the background (a spare one only costs a claim)."""
        if self._redis is None or self.closed:
            return
        push = asyncio.ensure_future(self._push_wake(keys))
        self._pushes.add(push)
        push.add_done_callback(self._pushes.discard)

    async def _push_wake(self, keys: _Keys) -> None:
        if self._redis is None:
            return
        try:
            await asyncio.wait_for(self._run("wake", [keys.meta, keys.wake], []), self.operation_timeout)
        except (JobsError, asyncio.TimeoutError) as exc:
            logger.debug("could not pass on a wake-up on %s: %s", keys.wake, exc)

    async def _claim(self, queue: str, keys: _Keys, count: int, into: collections.deque[Delivery]) -> float | None:
        """Claim up to ``count`` messages into ``into``; seconds until the next deadline, None if none."""
        task = asyncio.current_task()
        if task is not None:
            self._claims.add(task)
        try:
            token = secrets.token_hex(8)
            lease_ms = math.ceil(self.visibility_timeout * 1000)
            reply = await self._run(
                "claim",
                [
                    *(keys.meta, keys.ready, keys.delayed, keys.leases, keys.bodies),
                    *(keys.tokens, keys.ranks, keys.deliveries, keys.wake),
                ],
                [count, lease_ms, token],
            )
        finally:
            if task is not None:
                self._claims.discard(task)
        if reply[0] == 0:
            raise QueueNotFoundError(queue)
        for i in range(2, len(reply), 4):
            message_id, body, rank, deliveries = reply[i : i + 4]
            delivery = Delivery(
                queue, body, _priority_of(rank), handle=_Lease(message_id, token), delivery_count=int(deliveries)
            )
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

    def _lease_lost(self, delivery: Delivery, job_id: str | None = None) -> LeaseLostError:
        return LeaseLostError(queue=delivery.queue, job_id=job_id or _job_id(delivery.body), backend=self.describe())

    # -- primitives ----------------------------------------------------------------------------------

    async def _declare_queue(self, queue: str, options: QueueOptions) -> None:
        encoded = json.dumps(dataclasses.asdict(options), sort_keys=True, separators=(",", ":"))
        existing = await self._run("declare", [self._keys(queue).meta], [encoded])
        if existing != 1:
            raise QueueConflictError(
                f"queue {queue!r} exists with options {existing.decode(errors='replace')}, not {encoded}", queue=queue
            )

    async def _queue_exists(self, queue: str) -> bool:
        with self._io():
            return bool(await self._client.exists(self._keys(queue).meta))

    async def _publish(self, queue: str, message: OutgoingMessage) -> None:
        await self._publish_many(queue, [message])

    async def _publish_many(self, queue: str, messages: Sequence[OutgoingMessage]) -> None:
        keys = self._keys(queue)
        script_keys = [keys.meta, keys.sequence, keys.ready, keys.bodies, keys.wake]
        chunks = [messages[i : i + _PUBLISH_CHUNK] for i in range(0, len(messages), _PUBLISH_CHUNK)]

        def args(chunk: Sequence[OutgoingMessage]) -> list[Any]:
            return [value for message in chunk for value in (message.priority, message.body)]

        if len(chunks) == 1:
            queued = [await self._run("publish", script_keys, args(chunks[0]))]
        else:
            # One transaction: all chunks are queued, or (undeclared queue) none.
            with self._io():
                async with self._client.pipeline(transaction=True) as pipe:
                    for chunk in chunks:
                        await self._scripts["publish"](keys=script_keys, args=args(chunk), client=pipe)
                    queued = await pipe.execute()
        if queued[0] == 0:
            raise QueueNotFoundError(queue)

    async def _open_receiver(self, queue: str, prefetch: int) -> Receiver:
        return _RedisReceiver(self, queue, prefetch)

    async def _ack(self, delivery: Delivery) -> None:
        self._held.discard(delivery)
        keys, lease = self._keys(delivery.queue), delivery.handle
        done = await self._run(
            "ack",
            [keys.leases, keys.tokens, keys.ranks, keys.bodies, keys.deliveries],
            [lease.message_id, lease.token],
        )
        if done < 0:
            raise self._lease_lost(delivery)

    async def _release(self, delivery: Delivery) -> None:
        # A lost lease needs nothing: the message is already back in the queue or held by someone else.
        self._held.discard(delivery)
        keys, lease = self._keys(delivery.queue), delivery.handle
        await self._run(
            "release",
            [keys.ready, keys.leases, keys.tokens, keys.ranks, keys.deliveries, keys.wake],
            [lease.message_id, lease.token],
        )

    async def _retry(self, delivery: Delivery, message: OutgoingMessage, delay: float) -> None:
        self._held.discard(delivery)
        keys, lease = self._keys(delivery.queue), delivery.handle
        done = await self._run(
            "retry",
            [
                *(keys.sequence, keys.ready, keys.delayed, keys.leases, keys.bodies),
                *(keys.tokens, keys.ranks, keys.deliveries, keys.wake),
            ],
            [lease.message_id, lease.token, message.priority, message.body, math.ceil(delay * 1000)],
        )
        if done < 0:
            raise self._lease_lost(delivery, message.job_id)

    async def _dead_letter(self, delivery: Delivery, dead_letter_queue: str, message: OutgoingMessage) -> None:
        self._held.discard(delivery)
        keys, dead, lease = self._keys(delivery.queue), self._keys(dead_letter_queue), delivery.handle
        done = await self._run(
            "dead_letter",
            [
                *(keys.leases, keys.tokens, keys.ranks, keys.bodies, keys.deliveries, keys.meta),
                *(dead.meta, dead.sequence, dead.ready, dead.bodies, dead.wake),
            ],
            [lease.message_id, lease.token, message.priority, message.body],
        )
        if done < 0:
            raise self._lease_lost(delivery, message.job_id)

    async def _extend(self, delivery: Delivery, seconds: float) -> None:
        keys, lease = self._keys(delivery.queue), delivery.handle
        done = await self._run(
            "extend", [keys.leases, keys.tokens], [lease.message_id, lease.token, math.ceil(seconds * 1000)]
        )
        if done < 0:
            raise self._lease_lost(delivery)

    async def _count(self, queue: str) -> int:
        keys = self._keys(queue)
        count = await self._run(
            "count", [keys.meta, keys.ready, keys.delayed, keys.leases, keys.tokens, keys.ranks, keys.wake], []
        )
        if count < 0:
            raise QueueNotFoundError(queue)
        return int(count)

    async def _purge(self, queue: str) -> int:
        keys = self._keys(queue)
        removed = await self._run(
            "purge",
            [keys.meta, keys.ready, keys.delayed, keys.leases, keys.tokens, keys.ranks, keys.bodies, keys.deliveries],
            [],
        )
        if removed < 0:
            raise QueueNotFoundError(queue)
        return int(removed)

    async def _delete_queue(self, queue: str) -> None:
        # One command, so atomic: every key of the queue goes at once.
        with self._io():
            await self._client.unlink(*self._keys(queue).all())
