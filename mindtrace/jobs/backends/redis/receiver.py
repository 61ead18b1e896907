"""_RedisReceiver, which claims from one queue, and _Wakes, its blocking waits on the queue's wake list."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from mindtrace.jobs.backends.base import Backend, Delivery, Receiver
from mindtrace.jobs.backends.redis.connection import RedisConnection
from mindtrace.jobs.backends.redis.keys import _Keys
from mindtrace.jobs.constants import REDIS_MAX_BLOCK
from mindtrace.jobs.errors import ClosedError, JobsError

logger = logging.getLogger("mindtrace.jobs")

#: Longest an idle receiver blocks between two claims. Wake-ups and deadlines returned by the claim make
#: receivers react at once; this only bounds how late one notices what nobody told it about (a lease taken
#: and lost by another process, a deleted queue).
_MAX_BLOCK = REDIS_MAX_BLOCK

#: Claim up to ``count`` messages of a queue into a buffer; seconds until the queue's next deadline, or None.
ClaimInto = Callable[[str, _Keys, int, collections.deque[Delivery]], Awaitable[float | None]]


class _Wakes:
    """The blocking reads of a RedisClient's receivers on wake lists, and the wake-ups they pass on.

    A wake-up token taken by a read whose receiver no longer wants it (cancelled, timed out, closing) is
    pushed back, so that another receiver blocked on the queue sees it.
    """

    def __init__(self, connection: RedisConnection, operation_timeout: float) -> None:
        self._connection = connection
        self._operation_timeout = operation_timeout
        self._reads: dict[asyncio.Task[Any], _Keys] = {}  # blocking reads in progress -> their queue's keys
        self._pushes: set[asyncio.Task[None]] = set()  # wake-ups being passed on
        self._stopped = False

    async def wait(self, keys: _Keys, seconds: float) -> None:
        """Block until a wake-up token arrives on the queue's wake list or ``seconds`` pass."""
        blocking = self._connection.blocking
        read = asyncio.ensure_future(blocking.blpop([keys.wake], timeout=math.ceil(seconds * 1000) / 1000))
        self._reads[read] = keys
        read.add_done_callback(self._read_done)
        try:
            done, _ = await asyncio.wait({read}, timeout=seconds)
        except BaseException:
            # Cancelled: the reply to the read may carry a wake-up that nobody will see; pass one on.
            read.cancel()
            self.pass_on(keys)
            raise
        if not done:
            # The server ends a blocking read up to 1/hz s late (100 ms by default): stop waiting on time
            # and let the read end by itself, its connection intact; a token it takes is passed on.
            read.add_done_callback(functools.partial(self._pass_on_taken_wake, keys))
            return
        if read.cancelled():
            raise ClosedError(f"{self._connection.backend} was closed while waiting for messages")
        with self._connection.io():
            read.result()

    def _read_done(self, read: asyncio.Task[Any]) -> None:
        self._reads.pop(read, None)
        if not read.cancelled():
            read.exception()  # retrieved: a read left to end by itself has no other reader

    def _pass_on_taken_wake(self, keys: _Keys, read: asyncio.Task[Any]) -> None:
        if not read.cancelled() and read.exception() is None and read.result() is not None:
            self.pass_on(keys)

    def pass_on(self, keys: _Keys) -> None:
        """Leave a wake-up token for the queue in the background (a spare one only costs a claim)."""
        if not self._connection.connected or self._stopped:
            return
        push = asyncio.ensure_future(self.push(keys))
        self._pushes.add(push)
        push.add_done_callback(self._pushes.discard)

    async def push(self, keys: _Keys) -> None:
        """Leave a wake-up token for the queue now (best effort: a failure is only logged)."""
        if not self._connection.connected:
            return
        try:
            await asyncio.wait_for(self._connection.run("wake", [keys.meta, keys.wake], []), self._operation_timeout)
        except (JobsError, asyncio.TimeoutError) as exc:
            logger.debug("could not pass on a wake-up on %s: %s", keys.wake, exc)

    def stop(self) -> dict[asyncio.Task[Any], _Keys]:
        """Cancel the reads in progress and pass on no more wake-ups; the cancelled reads and their keys."""
        self._stopped = True
        reads = dict(self._reads)
        for read in reads:
            read.cancel()
        return reads

    def tasks(self) -> list[asyncio.Task[None]]:
        """The wake-ups being passed on."""
        return list(self._pushes)


class _RedisReceiver(Receiver):
    """Claims from one queue; one get() at a time claims or blocks for this receiver, the others wait.

    A claim takes as many messages as there are get() calls waiting (at most ``prefetch``), so no message
    sits leased in the buffer without a taker. Nothing ready: block on the queue's wake list (BLPOP, on a
    connection of the blocking pool) until a wake-up, the next deadline the claim reported, or the timeout.

    What it needs of its RedisClient comes in by name: ``claim`` and ``give_back`` (the client's own, which
    keep its books of held messages), the client's ``wakes`` and ``visibility_timeout``.
    """

    def __init__(
        self,
        backend: Backend,
        queue: str,
        prefetch: int,
        *,
        keys: _Keys,
        claim: ClaimInto,
        give_back: Callable[[Sequence[Delivery]], Awaitable[None]],
        wakes: _Wakes,
        visibility_timeout: float,
    ) -> None:
        super().__init__(backend, queue)
        self._keys = keys
        self._prefetch = prefetch
        self._claim_into = claim
        self._give_back = give_back
        self._wakes = wakes
        self._visibility_timeout = visibility_timeout
        self._buffer: collections.deque[Delivery] = collections.deque()
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._claims: set[asyncio.Task[float | None]] = set()

    async def _get(self, deadline: float | None) -> Delivery | None:
        loop = asyncio.get_running_loop()
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
                    block = min(_MAX_BLOCK, self._visibility_timeout)
                    if deadline is not None:
                        block = min(block, deadline - loop.time())
                    if next_deadline is not None:
                        block = min(block, next_deadline + 0.002)
                    if block >= 0.001:
                        await self._wakes.wait(self._keys, block)
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
        task = asyncio.ensure_future(self._claim_into(self._queue, self._keys, count, self._buffer))
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
        if unclaimed and not self._backend.closed:
            await self._give_back(unclaimed)
