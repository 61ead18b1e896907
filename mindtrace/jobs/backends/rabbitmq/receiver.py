"""_RabbitMQReceiver, which claims from one queue on channels of its own (lanes), and _Claim, what it hands out."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq import spec
from aiormq.exceptions import ChannelNotFoundEntity

from mindtrace.jobs.backends.base import Backend, Delivery, Receiver
from mindtrace.jobs.backends.rabbitmq import conditions
from mindtrace.jobs.backends.rabbitmq.compat import _on_consumer_cancel
from mindtrace.jobs.backends.rabbitmq.connection import _Channels, _on_open_channel
from mindtrace.jobs.backends.rabbitmq.publisher import _Publisher
from mindtrace.jobs.backends.rabbitmq.topology import job_priority
from mindtrace.jobs.errors import QueueNotFoundError


@dataclass(eq=False)
class _Lane:
    """One channel of a receiver, with QoS 1: the broker closing it (``consumer_timeout``) takes back one job."""

    channel: AbstractChannel | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    consumer_tag: str | None = None


@dataclass(eq=False)
class _Claim(Delivery):
    """A Delivery whose ``handle`` is the aio-pika message, remembering the receiver (and lane) that holds it."""

    receiver: _RabbitMQReceiver | None = field(default=None, repr=False)
    lane: _Lane | None = field(default=None, repr=False)


def _job_id(message: AbstractIncomingMessage) -> str | None:
    """The id of the job a delivered message carries, for errors and logs."""
    return conditions.message_job_id(message.message_id, message.body)


def _delivery_count(message: AbstractIncomingMessage) -> int:
    # Quorum queues count earlier deliveries in x-delivery-count; classic queues only flag a redelivery.
    count = (message.headers or {}).get("x-delivery-count")
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count + 1
    return 2 if message.redelivered else 1


class _RabbitMQReceiver(Receiver):
    """Claims from one queue on channels of its own ("lanes"), each with QoS ``per_lane`` (default 1).

    ``prefetch / per_lane`` lanes, by default one per job that may run at once: when a delivery stays unacked longer
    than the broker's ``consumer_timeout``, the broker closes its channel and requeues what that channel held, which
    is then that one job only, never the jobs running next to it (logged as an error naming consumer_timeout, the
    queue and the job; its late ack raises LeaseLostError). A receiver with ``prefetch`` 1 answers ``get`` with
    basic.get (a true "take one now", in queue order) until a ``get`` finds the queue empty and waits: that starts
    push delivery (basic.consume on every lane). With a larger ``prefetch`` (a consumer running jobs concurrently)
    push delivery starts at the first ``get``. In push mode, ``get`` takes what the broker pushed, so ``get(0)``
    returns None until the first messages arrive. When a lane's channel or consumer is lost (connection drop, queue
    deleted, consumer_timeout), the next ``get`` subscribes it again; messages pushed on the lost channel are
    dropped, since the broker gives them to someone else. Messages pushed but never handed out are given back at
    ``close()`` by re-publishing (see ``_Publisher.return_message``).

    Its RabbitMQClient talks to it through ``watch``, ``settled`` and ``abandon``, and at its own close through
    ``take_unsettled`` and ``has_pushed``.
    """

    def __init__(
        self,
        backend: Backend,
        queue: str,
        prefetch: int,
        channel: AbstractChannel,
        *,
        per_lane: int = 1,
        channels: _Channels,
        publisher: _Publisher,
        forget: Callable[[_RabbitMQReceiver], None],
        late_returns: set[asyncio.Task[Any]],
    ) -> None:
        super().__init__(backend, queue)
        self._channels = channels
        self._publisher = publisher
        self._forget = forget
        self._prefetch = prefetch
        # Lane 0's channel is open from the start (basic.get uses it); the others open when push delivery starts.
        self._per_lane = per_lane
        self._lanes = [_Lane(channel)] + [_Lane(None) for _ in range(-(-prefetch // per_lane) - 1)]
        self._push = False
        self._buffer: deque[tuple[_Lane, AbstractIncomingMessage]] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._subscribing: asyncio.Task[None] | None = None
        self._held: set[Delivery] = set()
        self._returning = 0  # late arrivals being given back after close()
        # Their tasks, in the client's set: its close waits for them even after this receiver closed and was
        # forgotten, or the connections would close under their re-publish and ack (a duplicate, or a give-back
        # charged as a lost run).
        self._late_returns = late_returns

    async def watch(self, channel: AbstractChannel) -> None:
        """Follow ``channel``: its closing, and the broker cancelling the consumer on it."""
        channel.close_callbacks.add(self._on_channel_closed)
        underlay = await channel.get_underlay_channel()
        _on_consumer_cancel(underlay, self._on_consumer_cancelled)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake(self) -> None:
        """Wake every waiting get(): the receiver's state changed (subscribed, lost a channel, closed)."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_channel_closed(self, channel: Any, exc: BaseException | None = None) -> None:
        lane = next((lane for lane in self._lanes if lane.channel is channel), None)
        if lane is None:
            return
        lost = [delivery for delivery in self._held if isinstance(delivery, _Claim) and delivery.lane is lane]
        if conditions.is_consumer_timeout(exc):
            assert exc is not None
            conditions.log_consumer_timeout(self._queue, [_job_id(delivery.handle) for delivery in lost], exc)
        # Everything pushed or held on this channel went back to the queue with it.
        lane.consumer_tag = None
        self._buffer = deque(entry for entry in self._buffer if entry[0] is not lane)
        self._held.difference_update(lost)
        self._wake()

    def _on_consumer_cancelled(self, frame: spec.Basic.Cancel) -> None:
        for lane in self._lanes:
            if frame.consumer_tag is not None and frame.consumer_tag == lane.consumer_tag:
                lane.consumer_tag = None
                self._wake()

    async def _on_message(self, lane: _Lane, message: AbstractIncomingMessage) -> None:
        if self._closed:
            # Arrived after close() began: give it back, holding the channel open until that is done.
            self._returning += 1
            task = asyncio.current_task()
            if task is not None:
                self._late_returns.add(task)
            try:
                with contextlib.suppress(Exception):
                    await self._publisher.return_message(message, self._queue)
            finally:
                self._returning -= 1
                await self._discard_if_idle()
                if task is not None:
                    self._late_returns.discard(task)
        elif _on_open_channel(message):  # else it arrived as its channel died: the broker has it back
            self._buffer.append((lane, message))
            self._wake_one()

    def _unsubscribed(self) -> bool:
        return any(lane.consumer_tag is None for lane in self._lanes)

    async def _get(self, deadline: float | None) -> Delivery | None:
        loop = asyncio.get_running_loop()
        no_wait = deadline is not None and deadline <= loop.time()
        while True:
            while self._buffer:
                lane, message = self._buffer.popleft()
                if _on_open_channel(message):
                    return self._hand_out(message, lane)
            if not self._push:
                if self._prefetch == 1:
                    # Take what is ready with basic.get first: push delivery would prefetch the next message,
                    # which a receiver that takes one job (receive_message) would have to give back.
                    pulled = await self._pull()
                    if pulled is not None or no_wait:
                        return pulled
                self._push = True
            if self._subscribing is None and self._unsubscribed():
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

    async def _ensure_channel(self, lane: _Lane) -> AbstractChannel:
        async with lane.lock:
            if lane.channel is None or lane.channel.is_closed:
                channel = await self._channels.open_channel(prefetch=self._per_lane)
                lane.channel = channel
                await self.watch(channel)
            return lane.channel

    async def _subscribe(self) -> None:
        lanes = [lane for lane in self._lanes if lane.consumer_tag is None]
        results = await asyncio.gather(*(self._subscribe_lane(lane) for lane in lanes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _subscribe_lane(self, lane: _Lane) -> None:
        async def deliver(message: AbstractIncomingMessage) -> None:
            await self._on_message(lane, message)

        with self._channels.boundary():
            channel = await self._ensure_channel(lane)
            queue = await channel.get_queue(self._queue, ensure=False)
            # The tag is ours and the lane holds it before basic.consume goes out: the broker's basic.cancel (the
            # queue deleted) can be read right behind consume-ok, before this coroutine resumes, and a cancel of
            # a tag the lane did not hold yet would be ignored, leaving the lane waiting on a consumer that is gone.
            tag = f"mindtrace.{uuid.uuid4().hex}"
            lane.consumer_tag = tag
            try:  # on a deleted queue this closes the channel, whose messages went with the queue anyway
                await queue.consume(deliver, consumer_tag=tag, timeout=self._channels.operation_timeout)
            except Exception as exc:
                if lane.consumer_tag == tag:
                    lane.consumer_tag = None
                if isinstance(exc, ChannelNotFoundEntity):
                    raise QueueNotFoundError(self._queue) from exc
                raise
            # Already None if the broker cancelled it, or the channel closed, meanwhile.
            if lane.consumer_tag == tag and (channel is not lane.channel or channel.is_closed):
                lane.consumer_tag = None

    async def _pull(self) -> Delivery | None:
        lane = self._lanes[0]
        with self._channels.boundary():
            channel = await self._ensure_channel(lane)
            queue = await channel.get_queue(self._queue, ensure=False)
            try:
                message = await queue.get(no_ack=False, fail=False, timeout=self._channels.operation_timeout)
            except ChannelNotFoundEntity as exc:
                raise QueueNotFoundError(self._queue) from exc
        return None if message is None else self._hand_out(message, lane)

    def _hand_out(self, message: AbstractIncomingMessage, lane: _Lane) -> Delivery:
        delivery = _Claim(
            self._queue,
            message.body,
            job_priority(message.priority),
            handle=message,
            delivery_count=_delivery_count(message),
            receiver=self,
            lane=lane,
        )
        self._held.add(delivery)
        return delivery

    def _buffered(self) -> list[AbstractIncomingMessage]:
        """Take the messages pushed but not handed out, for close() to give back."""
        buffered, self._buffer = [message for _, message in self._buffer], deque()
        return buffered

    def _lane_channels(self) -> list[AbstractChannel]:
        return [lane.channel for lane in self._lanes if lane.channel is not None]

    def has_pushed(self) -> bool:
        """Whether the broker pushed messages that were not handed out yet (``close()`` gives them back)."""
        return bool(self._buffer)

    def take_unsettled(self) -> list[Delivery]:
        """Mark every held, unsettled delivery settled and return them, for the client's close() to give back.

        Their late settle then raises ClosedError instead of acking what was already given back.
        """
        taken = [delivery for delivery in self._held if not delivery.settled]
        for delivery in taken:
            delivery.settled = True
        return taken

    async def settled(self, delivery: Delivery) -> None:
        """Forget ``delivery``, which was settled; a closed receiver lets its channel go once nothing is held."""
        self._held.discard(delivery)
        if self._closed:  # only a closed receiver has anything to do (see _discard_if_idle)
            await self._discard_if_idle()

    async def _discard_if_idle(self) -> None:
        # A closed receiver keeps its channels while it holds messages: acks must go out on those channels.
        if self._closed and not self._held and not self._returning:
            for channel in self._lane_channels():
                await self._channels.discard(channel)

    def abandon(self) -> None:
        """Stop at once, without I/O (the backend is closing its connection, which returns every message)."""
        self._closed = True
        if self._subscribing is not None:
            self._subscribing.cancel()
        self._buffer.clear()
        self._wake()

    async def _cancel_consumer(self, lane: _Lane) -> None:
        channel, tag, lane.consumer_tag = lane.channel, lane.consumer_tag, None
        if tag is not None and channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                underlay = await channel.get_underlay_channel()
                await underlay.basic_cancel(tag, timeout=self._channels.operation_timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Until the buffered messages are given back, the channels must stay open even if the held ones settle.
        self._returning += 1
        try:
            self._forget(self)
            if self._subscribing is not None:
                self._subscribing.cancel()
                await asyncio.gather(self._subscribing, return_exceptions=True)
            await asyncio.gather(*(self._cancel_consumer(lane) for lane in self._lanes))
            # Messages pushed but not handed out go back (re-published, see _Publisher.return_message); so do
            # late arrivals.
            buffered = self._buffered()
            for message in buffered:
                with contextlib.suppress(Exception):
                    await self._publisher.return_message(message, self._queue)
        finally:
            self._returning -= 1
        self._wake()
        if not self._held and not self._returning:
            for channel in self._lane_channels():
                await self._channels.discard(channel)
        elif buffered:
            # The channels stay open for the held ones: one round trip on each, so the broker has the others
            # back by the time close() returns.
            open_channels = [channel for channel in self._lane_channels() if not channel.is_closed]
            await asyncio.gather(
                *(
                    channel.set_qos(prefetch_count=1, timeout=self._channels.operation_timeout)
                    for channel in open_channels
                ),
                return_exceptions=True,
            )
