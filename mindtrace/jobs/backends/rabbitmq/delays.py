"""The delay chain of a RabbitMQ vhost: fixed-TTL level queues a delayed message passes through, exact to a ms.

A delay of ``d`` ms is ``rounds * 2**31 + r`` (``r < 2**31``). The message is published (confirmed) to the topic
exchange ENTRY_EXCHANGE with the routing key ``<rounds>.<b30>. ... .<b0>.<destination key>``: the rounds, the
31 bits of ``r``, highest first, and a digest of the destination queue's name. It first waits ``rounds`` times
in a round queue of 2**31 ms (24.8 days; brokers take TTLs only up to 2**32 - 1 ms), then, for each set bit k
of ``r``, highest first, in the level queue of 2**k ms. Every queue of the chain has one ``x-message-ttl`` for
all its messages, so its head always expires first (no message waits behind a longer one) and each wait is
exactly its TTL; the waits add up to ``d``. An expired message is dead-lettered to the next exchange of the
chain, which routes it by the bits of its routing key; after level 0 it reaches DELIVER_EXCHANGE, where each
queue that takes delayed messages is bound under its destination key. A message for a queue that was deleted
meanwhile matches no binding and goes to the alternate exchange, into the durable queue UNROUTABLE_QUEUE.

One chain per vhost serves every queue; its queues are durable and its messages persistent, so a delayed job
survives a broker restart (time spent down counts towards its delay). ``chain()`` lists the whole topology,
which ``_DelayChain`` declares and the tests walk.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from aiormq.exceptions import ChannelNotFoundEntity

from mindtrace.jobs.backends.base import OutgoingMessage
from mindtrace.jobs.constants import AMQP_EXCHANGE, MAX_DELAY
from mindtrace.jobs.errors import QueueNotFoundError

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.connection import _Channels
    from mindtrace.jobs.backends.rabbitmq.publisher import _Publisher

logger = logging.getLogger("mindtrace.jobs")

#: Binary levels: level k holds a message 2**k ms, k = 0 .. LEVELS - 1.
LEVELS: Final = 31
#: The TTL of a round queue (2**31 ms, 24.8 days): the largest power of two under the broker's TTL limit.
ROUND_MS: Final = 1 << LEVELS
#: Round queues: enough for MAX_DELAY (730 days: 29 rounds).
ROUNDS: Final = math.ceil(MAX_DELAY * 1000) // ROUND_MS
#: The longest delay the chain holds, in ms (every round and every level once: 745 days).
MAX_DELAY_MS: Final = (ROUNDS + 1) * ROUND_MS - 1

#: Where delayed messages are published (declared last: when it exists, the whole chain does).
ENTRY_EXCHANGE: Final = f"{AMQP_EXCHANGE}.delay"
#: Where a message leaves the chain: each queue taking delayed messages is bound here under its destination key.
DELIVER_EXCHANGE: Final = f"{AMQP_EXCHANGE}.delay.deliver"
#: The alternate exchange of DELIVER_EXCHANGE (fanout), and the durable queue it fills: delayed messages whose
#: queue was deleted before they were due. The ``:`` keeps the queue apart from every user queue.
UNROUTABLE_EXCHANGE: Final = f"{AMQP_EXCHANGE}.unroutable"
UNROUTABLE_QUEUE: Final = f"{AMQP_EXCHANGE}:unroutable"
#: Headers of a delayed message: when it is due (ms since the epoch, the publisher's clock) and its queue.
DUE_HEADER: Final = "x-mindtrace-due"
QUEUE_HEADER: Final = "x-mindtrace-queue"

# Words of a routing key before the destination key: the rounds, then one per level.
_WORDS: Final = 1 + LEVELS


def level_exchange(k: int) -> str:
    """The topic exchange of level ``k``: routes a message to the level's queue if bit k is set, else down."""
    return f"{AMQP_EXCHANGE}.delay.{k}"


def level_queue(k: int) -> str:
    """The queue of level ``k``, where every message waits 2**k ms."""
    return f"{AMQP_EXCHANGE}:delay.{k}"


def round_exchange(n: int) -> str:
    """The fanout exchange in front of round queue ``n``."""
    return f"{AMQP_EXCHANGE}.delay.round.{n}"


def round_queue(n: int) -> str:
    """The queue a message with ``n`` rounds (of ROUND_MS) left waits one round in, then goes to round ``n - 1``."""
    return f"{AMQP_EXCHANGE}:delay.round.{n}"


def destination_key(queue: str) -> str:
    """The last word of a delayed message's routing key: a digest of its queue's name (a routing key holds at
    most 255 bytes; queue names run to 200)."""
    return hashlib.blake2b(queue.encode(), digest_size=10).hexdigest()


def delay_ms(delay: float) -> int:
    """A delay in seconds as whole ms, rounded up (never early), at least 1, capped (logged) at MAX_DELAY_MS."""
    ms = max(1, math.ceil(delay * 1000 - 1e-6))
    if ms > MAX_DELAY_MS:
        logger.warning("delay of %.0fs capped to %.0fs", delay, MAX_DELAY_MS / 1000)
        ms = MAX_DELAY_MS
    return ms


def routing_key(ms: int, queue: str) -> str:
    """The routing key of a message delayed ``ms`` (1 .. MAX_DELAY_MS) for ``queue``, at ENTRY_EXCHANGE."""
    rounds, rest = divmod(ms, ROUND_MS)
    bits = (str(rest >> k & 1) for k in reversed(range(LEVELS)))
    return ".".join((str(rounds), *bits, destination_key(queue)))


def first_exchange(ms: int) -> str:
    """Where a message delayed ``ms`` starts: the round exchange of its rounds, or the level exchange of its highest
    bit. ENTRY_EXCHANGE routes it there too; publishing there skips the topic exchanges of its zero high bits."""
    rounds, rest = divmod(ms, ROUND_MS)
    return round_exchange(rounds) if rounds else level_exchange(rest.bit_length() - 1)


def _bit_pattern(k: int, bit: int) -> str:
    # The word of bit k is word 1 + (LEVELS - 1 - k): after the rounds and the bits above it.
    return ".".join(("*",) * (_WORDS - 1 - k) + (str(bit), "#"))


def delivery_pattern(queue: str) -> str:
    """The binding key of ``queue`` on DELIVER_EXCHANGE."""
    return ".".join(("*",) * _WORDS + (destination_key(queue),))


@dataclass(frozen=True)
class Exchange:
    """A durable exchange of the chain."""

    name: str
    kind: Literal["topic", "fanout"]
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Queue:
    """A durable classic queue of the chain: a fixed TTL and the exchange its expired messages go to."""

    name: str
    ttl_ms: int | None = None
    dead_letter_exchange: str | None = None

    def arguments(self) -> dict[str, Any]:
        """Its declare arguments."""
        arguments: dict[str, Any] = {}
        if self.ttl_ms is not None:
            arguments["x-message-ttl"] = self.ttl_ms
        if self.dead_letter_exchange is not None:
            arguments["x-dead-letter-exchange"] = self.dead_letter_exchange
        return arguments


@dataclass(frozen=True)
class Binding:
    """A binding from exchange ``source`` to the queue or exchange ``destination`` under ``pattern``."""

    source: str
    destination: str
    pattern: str
    to_exchange: bool


def chain() -> Iterator[Exchange | Queue | Binding]:
    """The whole delay chain, in an order it can be declared in (each thing after what it refers to), the
    entry exchange and its bindings last."""
    yield Exchange(UNROUTABLE_EXCHANGE, "fanout")
    yield Queue(UNROUTABLE_QUEUE)
    yield Binding(UNROUTABLE_EXCHANGE, UNROUTABLE_QUEUE, "", to_exchange=False)
    yield Exchange(DELIVER_EXCHANGE, "topic", {"alternate-exchange": UNROUTABLE_EXCHANGE})
    below = DELIVER_EXCHANGE
    for k in range(LEVELS):
        yield Exchange(level_exchange(k), "topic")
        yield Queue(level_queue(k), 1 << k, below)
        yield Binding(level_exchange(k), level_queue(k), _bit_pattern(k, 1), to_exchange=False)
        yield Binding(level_exchange(k), below, _bit_pattern(k, 0), to_exchange=True)
        below = level_exchange(k)
    top = below  # the highest level: where a message goes once its rounds are done
    for n in range(1, ROUNDS + 1):
        yield Exchange(round_exchange(n), "fanout")
        yield Queue(round_queue(n), ROUND_MS, below)
        yield Binding(round_exchange(n), round_queue(n), "", to_exchange=False)
        below = round_exchange(n)
    yield Exchange(ENTRY_EXCHANGE, "topic")
    yield Binding(ENTRY_EXCHANGE, top, "0.#", to_exchange=True)
    for n in range(1, ROUNDS + 1):
        yield Binding(ENTRY_EXCHANGE, round_exchange(n), f"{n}.#", to_exchange=True)


class _DelayChain:
    """Declares the delay chain once per client (if the broker lacks it), binds queues to it, and publishes
    delayed messages into it through ``publisher`` (confirmed: ``send`` returns once the broker has it)."""

    def __init__(self, channels: _Channels, publisher: _Publisher) -> None:
        self._channels = channels
        self._publisher = publisher
        self._declared = False
        self._bound: set[str] = set()
        self._lock: asyncio.Lock | None = None

    async def ensure(self) -> None:
        """Make sure the chain exists: one passive declare of ENTRY_EXCHANGE, the whole chain if it is missing."""
        if self._declared:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._declared:
                return
            with self._channels.boundary():
                async with self._channels.ops_channel() as channel:
                    underlay = await channel.get_underlay_channel()
                    try:
                        await underlay.exchange_declare(
                            ENTRY_EXCHANGE, passive=True, timeout=self._channels.operation_timeout
                        )
                        self._declared = True
                        return
                    except ChannelNotFoundEntity:
                        pass
            await self.declare()

    async def declare(self) -> None:
        """Declare every exchange, queue and binding of the chain (idempotent: each is declared as it is)."""
        timeout = self._channels.operation_timeout
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                for part in chain():
                    if isinstance(part, Exchange):
                        await underlay.exchange_declare(
                            part.name,
                            exchange_type=part.kind,
                            durable=True,
                            arguments=dict(part.arguments) or None,
                            timeout=timeout,
                        )
                    elif isinstance(part, Queue):
                        await underlay.queue_declare(
                            part.name, durable=True, arguments=part.arguments() or None, timeout=timeout
                        )
                    elif part.to_exchange:
                        await underlay.exchange_bind(
                            destination=part.destination, source=part.source, routing_key=part.pattern, timeout=timeout
                        )
                    else:
                        await underlay.queue_bind(
                            part.destination, part.source, routing_key=part.pattern, timeout=timeout
                        )
        self._declared = True

    async def bind(self, queue: str) -> None:
        """Bind ``queue`` to DELIVER_EXCHANGE (declaring the chain first if need be); QueueNotFoundError if it
        does not exist."""
        await self.ensure()
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                underlay = await channel.get_underlay_channel()
                try:
                    await underlay.queue_bind(
                        queue,
                        DELIVER_EXCHANGE,
                        routing_key=delivery_pattern(queue),
                        timeout=self._channels.operation_timeout,
                    )
                except ChannelNotFoundEntity as exc:
                    raise QueueNotFoundError(queue) from exc
        self._bound.add(queue)

    def forget(self, queue: str) -> None:
        """``queue`` was deleted: bind it again before its next delayed publish."""
        self._bound.discard(queue)

    async def send(self, queue: str, message: OutgoingMessage, delay: float) -> None:
        """Publish ``message`` to reach ``queue`` after ``delay`` seconds (exact to a ms, on the broker's clock)."""
        if queue not in self._bound:
            await self.bind(queue)
        ms = delay_ms(delay)
        headers = {DUE_HEADER: int(time.time() * 1000) + ms, QUEUE_HEADER: queue}
        key, exchange = routing_key(ms, queue), first_exchange(ms)
        try:
            await self._publisher.send(exchange, key, queue, message, headers=headers)
        except QueueNotFoundError:
            # No route (a mandatory message comes back unqueued): part of the chain is missing (deleted, or a
            # declare cut short). Declare it again and send once more.
            await self.declare()
            await self._publisher.send(exchange, key, queue, message, headers=headers)
