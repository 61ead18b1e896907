"""How RedisClient meets a server that refuses, stalls, cannot be reached, evicts or is too big to purge at once.

Self-contained helpers that RedisClient and its RedisConnection call at a few points: the typed refusal of
the driver's "no" errors, a connect bounded in total time, the eviction-policy check at connect, claims that
are never sent twice (and recover what a claim whose reply was lost took), and purges in bounded chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mindtrace.jobs.backends._endpoint import Endpoint
from mindtrace.jobs.errors import BackendRefusedError, BackendUnavailableError, ConfigurationError

logger = logging.getLogger("mindtrace.jobs")

#: Driver errors that are the server answering "no": retrying with the same settings is refused again.
REFUSED: tuple[type[RedisError], ...] = (AuthenticationError, AuthorizationError, NoPermissionError)

#: Successful claims that pass a doubtful token before it is forgotten. Two, because after a stall the
#: server may run a lost claim just after the claim that came after it (both were waiting in its buffers
#: when it resumed): the claim after that one, sent once the first answer came back, is run later still.
DOUBT_PASSES = 2

#: Ready jobs one purge script call removes at most: about 2-3 us each, so a call holds the server for
#: some 20-30 ms, far below the 5 s after which Redis answers every other client BUSY.
PURGE_CHUNK = 10_000


def untrusted_certificate(error: BaseException) -> bool:
    """Whether ``error`` (as redis-py wraps it) is the server's TLS certificate failing verification."""
    return isinstance(error.__cause__, _ssl.SSLCertVerificationError) or isinstance(
        error.__context__, _ssl.SSLCertVerificationError
    )


def refusal(error: BaseException, endpoint: Endpoint) -> BackendRefusedError | None:
    """The typed refusal for a driver error that is the server saying no, else None (a boundary translator).

    Credentials (wrong password, unknown or disabled ACL user), permissions (an ACL rule: NOPERM) and the
    database number (``SELECT`` of a db the server does not have). The driver's text never holds the password.
    """
    if isinstance(error, (AuthenticationError, AuthorizationError)):
        refused, what = "credentials", "the credentials"
    elif isinstance(error, NoPermissionError):
        refused, what = "permissions", "a command the ACL user may not run"
    elif isinstance(error, ResponseError) and "DB index is out of range" in str(error):
        refused, what = "database", "the database number"
    else:
        return None
    return endpoint.refused(f"{endpoint.describe()} refused {what}: {error}", refused=refused, reason=str(error))


# -- commands sent at most once ------------------------------------------------------------------------

_RESEND = contextvars.ContextVar("mindtrace_jobs_redis_resend", default=True)


@contextlib.contextmanager
def sent_once() -> Iterator[None]:
    """Within this block the driver never sends a command again after a failure (its Retry stands aside).

    redis-py re-sends a command whose answer timed out or whose connection broke, although the server may
    have run it: harmless for settling scripts (each checks its lease token, so a second run changes nothing)
    and for publish (a job id already queued is a no-op), not for a claim, whose second run would take more
    jobs under a lease nobody holds. The caller of a command sent once recovers by itself.
    """
    token = _RESEND.set(False)
    try:
        yield
    finally:
        _RESEND.reset(token)


def may_resend() -> bool:
    """Whether the driver may send the current command again (False inside :func:`sent_once`)."""
    return _RESEND.get()


def _lost_answer(error: BaseException) -> bool:
    """A failure after which the server may or may not have run the command, and trying again may help."""
    if isinstance(error, REFUSED) or untrusted_certificate(error):
        return False
    return isinstance(error, (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError))


async def claim_sent_once(
    run: Callable[[str, list[str]], Awaitable[Any]],
    doubtful: dict[str, int],
    *,
    retries: int,
    backoff_base: float,
    backoff_cap: float,
) -> tuple[str, Any]:
    """Run a claim so that no job is ever left leased under a token nobody holds; returns (token, reply).

    ``run(token, doubtful_tokens)`` sends the claim script once (inside :func:`sent_once`). Each attempt
    takes a fresh lease token. An attempt whose answer was lost (timeout, broken connection) may still have
    run on the server: its token goes into ``doubtful`` (kept by the caller, per queue, across calls), and
    every later claim on the queue passes the doubtful tokens, so the script hands the jobs they hold to
    this claim (adopted, not delivered again) instead of leaving them to expire and count a delivery that
    never ran. A token is passed by ``DOUBT_PASSES`` successful claims, then forgotten. Lost answers are
    tried again ``retries`` times with jittered exponential backoff, then the
    last error is raised; other errors are raised at once.
    """
    backoff = ExponentialWithJitterBackoff(base=backoff_base, cap=backoff_cap)
    failures = 0
    while True:
        token = secrets.token_hex(8)
        passed = list(doubtful)
        try:
            with sent_once():
                reply = await run(token, passed)
        except BaseException as exc:
            # Whatever ended the wait (a timeout, a cut, a cancellation), the server may have run the claim.
            doubtful[token] = DOUBT_PASSES
            if not isinstance(exc, Exception) or not _lost_answer(exc):
                raise
            failures += 1
            if failures > retries:
                raise
            await asyncio.sleep(backoff.compute(failures))
            continue
        for passed_token in passed:
            left = doubtful.pop(passed_token, 0) - 1
            if left > 0:
                doubtful[passed_token] = left
        return token, reply


# -- connect, bounded ----------------------------------------------------------------------------------


async def connect_within(
    attempt: Callable[[], Awaitable[None]],
    *,
    seconds: float,
    attempts: int,
    endpoint: Endpoint,
    backoff_base: float,
    backoff_cap: float,
) -> None:
    """Run ``attempt()`` until it succeeds: at most ``attempts`` times and ``seconds`` in total, backoff
    included, whatever the cause of the failures (refused connections, blackholed SYNs, a silent server).

    ``attempt`` raises BackendUnavailableError (or times out) when the server cannot be reached, which is
    tried again after a backoff while time and attempts are left; an untrusted certificate and any other
    error (a refusal) are raised at once. Then BackendUnavailableError saying how many attempts were made
    in how long, and the last error.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds
    delay = backoff_base
    made = 0
    last: BaseException | None = None
    while True:
        remaining = deadline - loop.time()
        if made and (remaining <= 0 or made >= attempts):
            break
        made += 1
        try:
            await asyncio.wait_for(attempt(), max(remaining, 0.001))
            return
        except BackendUnavailableError as exc:
            if exc.__cause__ is not None and untrusted_certificate(exc.__cause__):
                raise  # trying again cannot help
            last = exc.__cause__ or exc
        except asyncio.TimeoutError:
            last = TimeoutError(f"no answer within {max(remaining, 0.0):.1f} s")
        remaining = deadline - loop.time()
        if remaining <= 0 or made >= attempts:
            break
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, backoff_cap)
    elapsed = loop.time() - started
    detail = f"{type(last).__name__}: {last}" if last is not None else "no answer"
    plural = "s" if made != 1 else ""
    raise endpoint.unavailable(
        f"cannot reach {endpoint.describe()} after {made} attempt{plural} in {elapsed:.1f} s (connect_timeout "
        f"{seconds:g} s): {detail}"
    ) from last


# -- eviction policy -----------------------------------------------------------------------------------


async def check_eviction_policy(config_get: Callable[[str], Awaitable[dict[Any, Any]]], backend: str) -> None:
    """Refuse a server that evicts any key when full (``allkeys-*``): it would silently drop queued jobs.

    ``config_get`` is the driver's ``CONFIG GET``. With ``maxmemory`` 0 (no limit) nothing is evicted yet:
    a warning only. ``volatile-*`` policies evict only keys with a time to live, and this library sets
    none, so they are safe (a full server then refuses writes, as with ``noeviction``). A server that does
    not let us read its configuration (managed Redis often renames or forbids CONFIG) gets a warning that
    the policy could not be checked.
    """
    try:
        config = {_text(key): _text(value) for key, value in (await config_get("maxmemory*")).items()}
    except RedisError as exc:
        logger.warning(
            "could not check the maxmemory-policy of %s (%s: %s): with an allkeys-* policy, Redis evicts "
            "queued jobs when memory runs out; make sure it is noeviction or volatile-*",
            backend,
            type(exc).__name__,
            exc,
        )
        return
    policy = config.get("maxmemory-policy", "")
    if not policy.startswith("allkeys-"):
        return
    if config.get("maxmemory", "0") in ("", "0"):
        logger.warning(
            "%s has maxmemory-policy %s: no maxmemory is set, so nothing is evicted yet, but once a limit is "
            "set Redis evicts queued jobs; use noeviction for queues",
            backend,
            policy,
        )
        return
    raise ConfigurationError(
        f"{backend} has maxmemory-policy {policy} with maxmemory {config.get('maxmemory')}: when memory runs "
        "out Redis evicts any key, queued jobs included, without a word. Use a server (or database server) "
        "with maxmemory-policy noeviction for queues (CONFIG SET maxmemory-policy noeviction); volatile-* "
        "policies are safe too, this library's keys have no time to live"
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# -- purge in chunks -----------------------------------------------------------------------------------


async def purge_in_chunks(run_chunk: Callable[[int], Awaitable[int]], chunk: int = PURGE_CHUNK) -> int:
    """Call ``run_chunk(chunk)`` (one script removing at most ``chunk`` ready jobs, returning how many it
    removed, or -1 for a missing queue) until a call removes fewer; the total removed, or -1.

    Each call holds the server for a bounded time, so a purge of millions of jobs never makes Redis answer
    BUSY to every other client. Not atomic as a whole: a job published during the purge may go too.
    """
    total = 0
    while True:
        removed = await run_chunk(chunk)
        if removed < 0:
            return -1 if total == 0 else total
        total += removed
        if removed < chunk:
            return total
