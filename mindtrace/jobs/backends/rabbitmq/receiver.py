"""_RabbitMQReceiver, which claims from one queue on a channel of its own, and _Claim, the Delivery it hands out."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq import spec
from aiormq.exceptions import ChannelNotFoundEntity

from mindtrace.jobs.backends.base import Backend, Delivery, Receiver
from mindtrace.jobs.backends.rabbitmq.connection import _Channels, _on_open_channel
from mindtrace.jobs.backends.rabbitmq.publisher import _Publisher
from mindtrace.jobs.backends.rabbitmq.topology import job_priority
from mindtrace.jobs.errors import QueueNotFoundError


@dataclass(eq=False)
class _Claim(Delivery):
    """A Delivery whose ``handle`` is the aio-pika message, remembering the receiver that holds it."""

    receiver: _RabbitMQReceiver | None = field(default=None, repr=False)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    # Quorum queues count earlier deliveries in x-delivery-count; classic queues only flag a redelivery.
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count + 1
    return 2 if message.redelivered else 1


class _RabbitMQReceiver(Receiver):
    """Claims from one queue on a channel of its own, with QoS ``prefetch``.

    A receiver with ``prefetch`` 1 answers ``get`` with basic.get (a true "take one now", in queue order)
    until a ``get`` finds the queue empty and waits: that starts push delivery (basic.consume). With a larger
    ``prefetch`` (a consumer running jobs concurrently) push delivery starts at the first ``get``. In push
    mode, ``get`` takes what the broker pushed, so ``get(0)`` returns None until the first messages arrive.
    When the channel or the consumer is lost (connection drop, queue deleted), the next ``get`` subscribes
    again; messages pushed on the lost channel are dropped, since the broker gives them to someone else.
    Messages pushed but never handed out are given back at ``close()`` by re-publishing (see
    ``_Publisher.return_message``).

    Its RabbitMQClient talks to it through ``watch``, ``settled`` and ``abandon``.
    """

    def __init__(
        self,
        backend: Backend,
        queue: str,
        prefetch: int,
        channel: AbstractChannel,
        *,
        channels: _Channels,
        publisher: _Publisher,
        forget: Callable[[_RabbitMQReceiver], None],
    ) -> None:
        super().__init__(backend, queue)
        self._channels = channels
        self._publisher = publisher
        self._forget = forget
        self._prefetch = prefetch
        self._channel = channel
        self._channel_lock = asyncio.Lock()
        self._consumer_tag: str | None = None
        self._push = False
        self._buffer: deque[AbstractIncomingMessage] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._subscribing: asyncio.Task[None] | None = None
        self._held: set[Delivery] = set()
        self._returning = 0  # late arrivals being given back after close()

    async def watch(self, channel: AbstractChannel) -> None:
        """Follow ``channel``: its closing, and the broker cancelling the consumer on it."""
        channel.close_callbacks.add(self._on_channel_closed)
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake(self) -> None:
        """Wake every waiting get(): the receiver's state changed (subscribed, lost its channel, closed)."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_channel_closed(self, channel: Any, exc: BaseException | None = None) -> None:
        if channel is not self._channel:
            return
        # Everything pushed or held on this channel went back to the queue with it.
        self._consumer_tag = None
        self._buffer.clear()
        self._held.clear()
        self._wake()

    def _on_consumer_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag is not None and frame.consumer_tag == self._consumer_tag:
            self._consumer_tag = None
            self._wake()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._closed:
            # Arrived after close() began: give it back, holding the channel open until that is done.
            self._returning += 1
            try:
                with contextlib.suppress(Exception):
                    await self._publisher.return_message(message, self._queue)
            finally:
                self._returning -= 1
                await self._discard_if_idle()
        elif _on_open_channel(message):  # else it arrived as its channel died: the broker has it back
            self._buffer.append(message)
            self._wake_one()

    async def _get(self, deadline: float | None) -> Delivery | None:
        loop = asyncio.get_running_loop()
        no_wait = deadline is not None and deadline <= loop.time()
        while True:
            while self._buffer:
                message = self._buffer.popleft()
                if _on_open_channel(message):
                    return self._hand_out(message)
            if not self._push:
                if self._prefetch == 1:
                    # Take what is ready with basic.get first: push delivery would prefetch the next message,
                    # which a receiver that takes one job (receive_message) would have to give back.
                    pulled = await self._pull()
                    if pulled is not None or no_wait:
                        return pulled
                self._push = True
            if self._consumer_tag is None and self._subscribing is None:
                self._subscribing = asyncio.ensure_future(self._subscribe())
                self._subscribing.add_done_callback(self._subscribed)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            subscribing = self._subscribing
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if remaining is None and subscribing is None:
                    # The common wait (subscribed, no deadline): the waiter alone, with no asyncio.wait around it.
                    await waiter
                else:
                    waits: set[asyncio.Future[Any]] = {waiter} if subscribing is None else {waiter, subscribing}
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                if waiter.done() and not waiter.cancelled() and self._buffer:
                    # Woken for a message this call will not take (it is cancelled): pass the wake-up on.
                    self._wake_one()
                raise
            finally:
                if not waiter.done() or waiter.cancelled():
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
            if subscribing is not None and subscribing.done() and not subscribing.cancelled():
                error = subscribing.exception()
                if error is not None:
                    raise error
            self._check_open()

    def _subscribed(self, task: asyncio.Task[None]) -> None:
        if self._subscribing is task:
            self._subscribing = None
        if not task.cancelled():
            task.exception()  # retrieved here; every waiting get() raises it
        self._wake()

    async def _ensure_channel(self) -> AbstractChannel:
        async with self._channel_lock:
            if self._channel.is_closed:
                channel = await self._channels.open_channel(prefetch=self._prefetch)
                self._channel = channel
                await self.watch(channel)
            return self._channel

    async def _subscribe(self) -> None:
        with self._channels.boundary():
            channel = await self._ensure_channel()
            queue = await channel.get_queue(self._queue, ensure=False)
            try:  # on a deleted queue this closes the channel, whose messages went with the queue anyway
                tag = await queue.consume(self._on_message, timeout=self._channels.operation_timeout)
            except ChannelNotFoundEntity as exc:
                raise QueueNotFoundError(self._queue) from exc
            if channel is self._channel and not channel.is_closed:
                self._consumer_tag = tag

    async def _pull(self) -> Delivery | None:
        with self._channels.boundary():
            channel = await self._ensure_channel()
            queue = await channel.get_queue(self._queue, ensure=False)
            try:
                message = await queue.get(no_ack=False, fail=False, timeout=self._channels.operation_timeout)
            except ChannelNotFoundEntity as exc:
                raise QueueNotFoundError(self._queue) from exc
        return None if message is None else self._hand_out(message)

    def _hand_out(self, message: AbstractIncomingMessage) -> Delivery:
        delivery = _Claim(
            self._queue,
            message.body,
            job_priority(message.priority),
            handle=message,
            delivery_count=_delivery_count(message),
            receiver=self,
        )
        self._held.add(delivery)
        return delivery

    async def settled(self, delivery: Delivery) -> None:
        """Forget ``delivery``, which was settled; a closed receiver lets its channel go once nothing is held."""
        self._held.discard(delivery)
        if self._closed:  # only a closed receiver has anything to do (see _discard_if_idle)
            await self._discard_if_idle()

    async def _discard_if_idle(self) -> None:
        # A closed receiver keeps its channel while it holds messages: acks must go out on that channel.
        if self._closed and not self._held and not self._returning:
            await self._channels.discard(self._channel)

    def abandon(self) -> None:
        """Stop at once, without I/O (the backend is closing its connection, which returns every message)."""
        self._closed = True
        if self._subscribing is not None:
            self._subscribing.cancel()
        self._buffer.clear()
        self._wake()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Until the buffered messages are given back, the channel must stay open even if the held ones settle.
        self._returning += 1
        try:
            self._forget(self)
            if self._subscribing is not None:
                self._subscribing.cancel()
                await asyncio.gather(self._subscribing, return_exceptions=True)
            channel, tag, self._consumer_tag = self._channel, self._consumer_tag, None
            timeout = self._channels.operation_timeout
            if tag is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    underlay = await channel.get_underlay_channel()
                    await underlay.basic_cancel(tag, timeout=timeout)
            # Messages pushed but not handed out go back (re-published, see _Publisher.return_message); so do
            # late arrivals.
            buffered, self._buffer = list(self._buffer), deque()
            for message in buffered:
                with contextlib.suppress(Exception):
                    await self._publisher.return_message(message, self._queue)
        finally:
            self._returning -= 1
        self._wake()
        if not self._held and not self._returning:
            await self._channels.discard(channel)
        elif buffered and not channel.is_closed:
            # The channel stays open for the held ones: one round trip, so the broker has the others back
            # by the time close() returns.
            with contextlib.suppress(Exception):
                await channel.set_qos(prefetch_count=self._prefetch, timeout=timeout)
