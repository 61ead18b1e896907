"""The Redis connection of a RedisClient: redis-py clients, retries, TLS and URL options, the error
boundary, and the script runner that pipelines concurrent script calls."""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mindtrace.jobs.backends._endpoint import (
    Endpoint,
    ErrorMap,
    ErrorTable,
    Option,
    ca_bundle_context,
    failed,
    map_errors,
    split_url,
    unavailable,
)
from mindtrace.jobs.backends.redis.faults import (
    REFUSED,
    check_eviction_policy,
    connect_within,
    may_resend,
    refusal,
    untrusted_certificate,
)
from mindtrace.jobs.constants import CONNECT_TIMEOUT, REDIS_MAX_BLOCK
from mindtrace.jobs.errors import ClosedError, ConfigurationError

_T = TypeVar("_T")

#: Retry backoff for commands while the server is unreachable: first wait and cap, in seconds.
_RETRY_BASE, _RETRY_CAP = 0.1, 2.0

_SCRIPTS = (
    "schedule_cursor",
    "declare",
    "publish",
    "claim",
    "ack",
    "release",
    "retry",
    "dead_letter",
    "extend",
    "count",
    "stats",
    "peek",
    "purge",
    "wake",
    "state_record",
    "state_cancel",
    "state_forget",
    "state_read",
    "state_start",
    "state_unique",
)


#: Options ``from_url`` takes from the query of any Redis URL, and the TLS ones only a ``rediss://`` URL takes.
_URL_OPTIONS: dict[str, Option] = {"connect_timeout": (float, "a number")}
_URL_TLS_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs")
#: The values of ``ssl_cert_reqs``.
_CERT_REQS = ("required", "optional", "none")

#: The boundary: driver exceptions and what they become, most specific first.
_ERRORS: ErrorTable = (
    (REFUSED, refusal),  # connection errors to redis-py, but the server answered
    ((RedisConnectionError, RedisTimeoutError, OSError), unavailable),
    (RedisError, refusal),  # a database number the server does not have; else the next row
    (RedisError, failed),
)

# A script call waiting to be sent: the script, its keys and arguments, and the caller's future.
_Call = tuple[AsyncScript, Sequence[str], Sequence[Any], asyncio.Future[Any]]


class _Retry(Retry):
    """redis-py's Retry, except that refusals and untrusted certificates fail at once (trying again cannot
    help), and that a command sent once (``faults.sent_once``) is never sent again."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[_T]],
        fail: Callable[[Exception], Any] | Callable[[Exception, int], Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> _T:
        def retryable(error: Exception) -> bool:
            refused = isinstance(error, REFUSED) or untrusted_certificate(error)
            return not refused and may_resend() and (is_retryable is None or is_retryable(error))

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


@functools.cache
def _script_sources() -> dict[str, str]:
    """Each transition's Lua source, after the shared definitions of ``lib.lua``."""
    folder = importlib.resources.files("mindtrace.jobs.backends.redis").joinpath("lua")
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    sources = {name: lib + "\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}
    # A schedule's fire is a publish behind a compare-and-set of its cursor: fire.lua's header, then publish.lua.
    header, publish = (folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in ("fire", "publish"))
    sources["fire"] = "\n".join([lib, header, publish])
    return sources


def check_tls_options(ssl_ca_certs: str | None, ssl_cert_reqs: str) -> None:
    """ConfigurationError unless ``ssl_cert_reqs`` is known and the CA bundle ``ssl_ca_certs`` (if any) loads."""
    if ssl_cert_reqs not in _CERT_REQS:
        raise ConfigurationError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {ssl_cert_reqs!r}")
    if ssl_ca_certs is not None:
        ca_bundle_context(ssl_ca_certs)


def parse_url(url: str, schemes: tuple[str, str]) -> dict[str, Any]:
    """The RedisClient constructor options in ``url`` (see ``RedisClient.from_url``); never repeats the URL."""
    parts = split_url(url, kind="Redis", schemes=schemes, options=_URL_OPTIONS, tls_options=_URL_TLS_OPTIONS)
    if parts.fragment:
        raise ConfigurationError("RedisClient URLs take no fragment; pass other options as keyword arguments")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ConfigurationError(f"the Redis URL path must be a database number, not {path!r}")
    return {
        "host": parts.host or "localhost",
        "port": parts.port or 6379,
        "db": int(path) if path else 0,
        "password": parts.password or None,
        "username": parts.username or None,
        "ssl": parts.tls,
        **parts.options,
    }


class RedisConnection:
    """The redis-py clients of one RedisClient, the boundary where their errors become ours, and the
    script runner.

    Commands and scripts go on one client; blocking reads (of wake lists) wait up to REDIS_MAX_BLOCK on
    connections of another, never shared with commands. ``endpoint`` is where the server is (its
    ``describe()``, ``backend``, is for messages). ``connect()`` gives up after ``connect_timeout`` seconds
    in total, and refuses a server whose eviction policy would drop queued jobs.
    """

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        password: str | None,
        ssl_ca_certs: str | None,
        ssl_cert_reqs: str,
        operation_timeout: float,
        connection_retries: int,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self.backend = endpoint.describe()
        self._options: dict[str, Any] = {
            "host": endpoint.host,
            "port": endpoint.port,
            "db": int(endpoint.path),
            "ssl": endpoint.tls,
            "ssl_ca_certs": ssl_ca_certs,
            "ssl_cert_reqs": ssl_cert_reqs,
            "username": endpoint.username,
        }
        self._password = password  # only the driver ever sees it
        self._operation_timeout = operation_timeout
        self._connection_retries = connection_retries
        self._connect_timeout = connect_timeout
        self._errors = map_errors(_ERRORS, endpoint)
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # Script calls made while another is in flight, sent together at the next turn of the loop.
        self._pending: list[_Call] = []
        self._in_flight = 0
        self._batches: set[asyncio.Task[None]] = set()

    def io(self) -> ErrorMap:
        """The one boundary where driver errors become JobsError (by the table ``_ERRORS``), the driver's
        exception chained."""
        return self._errors

    @property
    def connected(self) -> bool:
        """Whether the clients are open (between ``connect()`` and ``close()``)."""
        return self._redis is not None

    @property
    def commands(self) -> aioredis.Redis:
        """The client for commands and scripts; ClosedError when not connected."""
        if self._redis is None:
            raise ClosedError(f"{self.backend} is not connected")
        return self._redis

    @property
    def blocking(self) -> aioredis.Redis:
        """The client for blocking reads; ClosedError when not connected."""
        if self._blocking is None:
            raise ClosedError(f"{self.backend} is closed")
        return self._blocking

    def script(self, name: str) -> AsyncScript:
        """The registered script ``name`` (for use in a pipeline of the caller's)."""
        return self._scripts[name]

    def tasks(self) -> list[asyncio.Task[None]]:
        """The pipelined batches of script calls in flight."""
        return list(self._batches)

    async def connect(self) -> None:
        """Open both clients and check the server answers (bounded by ``connect_timeout`` in total) and does not
        evict queued jobs; register the scripts."""

        def client(socket_timeout: float) -> aioredis.Redis:
            return aioredis.Redis(
                **self._options,
                socket_timeout=socket_timeout,
                socket_connect_timeout=min(self._operation_timeout, self._connect_timeout),
                retry=_Retry(ExponentialWithJitterBackoff(base=_RETRY_BASE, cap=_RETRY_CAP), self._connection_retries),
                password=self._password,
            )

        commands = client(self._operation_timeout)
        # Blocking reads wait up to REDIS_MAX_BLOCK on connections of their own, never shared with commands.
        blocking = client(REDIS_MAX_BLOCK + self._operation_timeout)

        async def attempt() -> None:
            with self.io():
                try:
                    await commands.ping()
                except ResponseError as exc:
                    # After a failed save (stop-writes-on-bgsave-error) Redis refuses PING with the writes: it
                    # answers, so this is connected; the writes wait it out as anywhere else.
                    if not str(exc).startswith("MISCONF"):
                        raise

        try:
            await connect_within(
                attempt,
                seconds=self._connect_timeout,
                attempts=self._connection_retries + 1,
                endpoint=self.endpoint,
                backoff_base=_RETRY_BASE,
                backoff_cap=_RETRY_CAP,
            )
            with self.io():
                await check_eviction_policy(commands.config_get, self.backend)
        except BaseException:
            await commands.aclose()
            await blocking.aclose()
            raise
        self._redis, self._blocking = commands, blocking
        self._scripts = {name: commands.register_script(source) for name, source in _script_sources().items()}

    def subscriber(self) -> aioredis.Redis:
        """A new client for one pub/sub connection: reads without a timeout (an idle subscriber sends nothing)
        and no retries (its owner reconnects, so it knows to read again what it follows)."""
        return aioredis.Redis(
            **self._options,
            socket_timeout=None,
            socket_connect_timeout=min(self._operation_timeout, self._connect_timeout),
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
            password=self._password,
        )

    async def close(self) -> None:
        """Close both clients."""
        redis_client, blocking = self._redis, self._blocking
        self._redis = self._blocking = None
        if redis_client is not None:
            await redis_client.aclose()
        if blocking is not None:
            await blocking.aclose()

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script (each is atomic on the server).

        A call made while none is in flight goes out at once. Calls made while others are in flight (the
        acks and claims of concurrent jobs) are sent together at the next turn of the event loop, as one
        pipeline: one round trip and one connection for all of them instead of one each. While a pipeline
        is in flight, the calls made meanwhile wait for it and go out as the next one, so that concurrent
        callers (a thousand waiters reading at once) hold two command connections at most, not one more per
        turn of the loop.
        """
        with self.io():
            if not self._in_flight and not self._pending:
                self._in_flight += 1
                try:
                    return await self._evalsha(self.commands, self._scripts[script], keys, args)
                finally:
                    self._in_flight -= 1
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            self._pending.append((self._scripts[script], keys, args, future))
            if len(self._pending) == 1:
                loop.call_soon(self._flush)
            return await future

    async def run_once(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script on its own, never in a pipeline the driver might send again (for a claim, inside
        ``faults.sent_once``). Driver errors come out as they are: call it within :meth:`io`."""
        self._in_flight += 1
        try:
            return await self._evalsha(self.commands, self._scripts[script], keys, args)
        finally:
            self._in_flight -= 1

    @staticmethod
    async def _evalsha(client: Any, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # the server lost its scripts (restart, SCRIPT FLUSH): load it again
            return await script(keys=keys, args=args)

    def _flush(self) -> None:
        if self._batches:
            return  # sent when the pipeline in flight is done (see _batch_done)
        batch = [call for call in self._pending if not call[3].done()]  # a cancelled caller's call is not sent
        self._pending = []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._batches.add(task)
            task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._pending:
            self._flush()

    async def _send(self, batch: list[_Call]) -> None:
        """Send ``batch`` as one pipeline (not a transaction) and hand each caller its own reply."""
        self._in_flight += 1
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                replies: list[Any] = [await self._evalsha(self.commands, script, keys, args)]
            else:
                async with self.commands.pipeline(transaction=False) as pipe:
                    for script, keys, args, _ in batch:
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    replies = await pipe.execute(raise_on_error=False)
            for i, (script, keys, args, _) in enumerate(batch):
                if isinstance(replies[i], NoScriptError):  # reloaded by _evalsha, for this call alone
                    try:
                        replies[i] = await self._evalsha(self.commands, script, keys, args)
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
