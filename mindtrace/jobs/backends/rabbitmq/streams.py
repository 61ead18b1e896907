"""StreamFollower: one RabbitMQ stream followed by one consumer, its events folded in stream order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity, ChannelPreconditionFailed

from mindtrace.jobs.backends.rabbitmq.compat import _on_consumer_cancel
from mindtrace.jobs.errors import BackendError, BackendUnavailableError, ClosedError

if TYPE_CHECKING:
    from mindtrace.jobs.backends.rabbitmq.connection import _Channels

logger = logging.getLogger("mindtrace.jobs")

_T = TypeVar("_T")

#: Stream messages the broker may push to a consumer before it acks (stream credit).
PREFETCH: Final = 1000

#: Acks are sent for several messages at once (``multiple``): at the end of a burst, or after this many.
ACK_EVERY: Final = 250

# AMQP reply code of a mandatory message that no queue was bound to receive (the stream was deleted).
_NO_ROUTE: Final = 312

#: First pause of a resubscription after a lost consumer (doubled after each failure, up to ``retry_cap``).
RETRY_BASE: Final = 0.1


class StreamGone(Exception):
    """The stream was deleted under a publish (a mandatory message came back NO_ROUTE)."""


class NotReady(Exception):
    """The broker refused the stream for now: just declared ("does not have a replica on the local node" until its
    member has started), or its home node is down or inaccessible (NOT_FOUND, but not "no queue")."""


class StreamFollower:
    """One stream's consumer: declares the stream (``arguments``), subscribes from its first event or after the
    last one folded, skips offsets already folded on a resume, calls ``fold`` with each event's body in stream
    order, acks in batches, and subscribes again, patiently, after a lost channel or a consumer cancel. It
    publishes events (confirmed, mandatory, persistent) and offers ``sync``: a barrier event serving every caller
    that arrived before it was sent, returning once ``fold`` read it (the fold resolves it with ``resolve``).

    Policies where its owners differ are parameters: ``passive_resume`` resubscribes without declaring (a stream
    gone meanwhile calls ``on_gone`` instead), ``replay`` waits after the first subscription until the fold
    reached a barrier of its own, ``on_resumed`` runs after every resubscription, ``publish_barrier`` publishes
    a barrier's body (default ``publish``), and ``barrier`` makes a barrier event from its key.
    """

    def __init__(
        self,
        channels: _Channels,
        stream: str,
        *,
        fold: Callable[[bytes], None],
        arguments: Callable[[], dict[str, Any]],
        barrier: Callable[[str], dict[str, Any]],
        label: str,
        owner: str,
        tag_prefix: str,
        reading: str,
        passive_resume: bool = False,
        replay: bool = False,
        on_gone: Callable[[], None] | None = None,
        on_resumed: Callable[[], None] | None = None,
        publish_barrier: Callable[[bytes], Awaitable[Any]] | None = None,
        first_backoff: float = RETRY_BASE,
        retry_cap: float = 2.0,
    ) -> None:
        self._channels = channels
        #: The stream queue followed.
        self.stream = stream
        self._fold = fold
        self._arguments = arguments
        self._barrier = barrier
        self._label = label  # what the stream is, in messages ("record stream")
        self._owner = owner  # what follows it, in messages ("the state store")
        self._tag_prefix = tag_prefix
        self._reading = reading  # what a barrier's wait is, in messages
        self._passive_resume = passive_resume
        self._replay = replay
        self._on_gone = on_gone
        self._on_resumed = on_resumed
        self._publish_barrier = publish_barrier if publish_barrier is not None else self.publish
        self._first_backoff = first_backoff
        self._retry_cap = retry_cap
        #: The consumer's channel and its aiormq channel (None while not subscribed).
        self.channel: AbstractChannel | None = None
        self.underlay: Any = None
        #: The current consumer's tag; None while not subscribed.
        self.tag: str | None = None
        #: Offset of the last event folded.
        self.offset: int | None = None
        #: Events delivered so far (how a wait tells a slow replay from a dead consumer).
        self.received = 0
        #: The first subscription or a resubscription under way (or done).
        self.attaching: asyncio.Future[None] | None = None
        #: What callers wait on until the next barrier is sent (None: none is waiting).
        self.next_sync: asyncio.Future[None] | None = None
        #: Held while a barrier is sent and read back: one at a time.
        self.sync_lock = asyncio.Lock()
        self._subscribing = asyncio.Lock()  # one consumer at a time, never two
        self._unacked = 0
        self._last_tag: int | None = None
        self._ack_scheduled = False
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._name = uuid.uuid4().hex[:12]
        self._serial = itertools.count()
        self.closed = False

    def describe(self) -> str:
        """The broker, as ``amqp://host:port/vhost`` (no credentials)."""
        return self._channels.backend

    @property
    def operation_timeout(self) -> float:
        """Seconds an operation waits for the broker (a wait: for the consumer to make progress)."""
        return self._channels.operation_timeout

    def closed_error(self) -> ClosedError:
        """The error of an operation of an owner that is closed."""
        return ClosedError(f"{self._owner} {self.describe()} is closed")

    # -- tasks and waits ----------------------------------------------------------------------------------

    def spawn(self, coroutine: Awaitable[_T]) -> asyncio.Future[_T]:
        """Run ``coroutine`` as a task that ``close`` cancels (its exception is retrieved, never logged)."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def progressing(self, waited: asyncio.Future[_T], what: str) -> _T:
        """``waited``'s result, failing only when the consumer received nothing for ``operation_timeout`` (a
        replay of a long stream takes as long as it takes)."""
        while True:
            received = self.received
            try:
                return await asyncio.wait_for(asyncio.shield(waited), self.operation_timeout)
            except asyncio.TimeoutError:
                if self.received == received:
                    raise self._channels.endpoint.unavailable(
                        f"{what} on {self.describe()}: nothing arrived within {self.operation_timeout:g}s"
                    ) from None

    def expect(self) -> tuple[str, asyncio.Future[Any]]:
        """A new event key and the future ``resolve`` sets once the fold read the event carrying it."""
        key = f"{self._name}-{next(self._serial)}"
        future = self._pending[key] = asyncio.get_running_loop().create_future()
        return key, future

    def forget(self, key: str) -> None:
        """Stop waiting for the event carrying ``key``."""
        self._pending.pop(key, None)

    def resolve(self, key: str, result: Any = None) -> None:
        """Called by the fold for an event carrying ``key``: what ``expect``'s future returns."""
        future = self._pending.get(key)
        if future is not None and not future.done():
            future.set_result(result)

    def close(self) -> None:
        """Stop following: fail the waits for events with ClosedError and cancel the tasks (see ``wait_closed``)."""
        self.closed = True
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(self.closed_error())
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait for the tasks ``close`` cancelled, then forget the consumer."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.channel = self.underlay = self.tag = None

    def reset(self) -> None:
        """Forget the consumer and the offset (the stream is gone): the next use follows it anew from its start."""
        self.channel = self.underlay = self.tag = None
        self.attaching = None
        self.offset = None

    # -- subscribing --------------------------------------------------------------------------------------

    async def following(self, *, passive: bool, what: str) -> bool:
        """Have the consumer subscribed (the first time, or after a failed attempt); whether it is. ``passive``:
        a stream that does not exist is not declared (False). Waits as ``progressing`` does."""
        attaching = self.attaching
        if attaching is None or (attaching.done() and (self.tag is None or not _succeeded(attaching))):
            attaching = self.attaching = self.spawn(self._attach(passive=passive))
        await self.progressing(attaching, what)
        return self.tag is not None

    async def _attach(self, *, passive: bool) -> None:
        """Subscribe, retried while the stream refuses consumers, until ``operation_timeout``; then, with
        ``replay``, wait until the fold reached a barrier."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        backoff = self._first_backoff
        while self.tag is None and not self.closed:
            try:
                if not await self.subscribe(passive=passive):
                    return  # no stream, and only a look-up asked
            except (NotReady, BackendUnavailableError) as exc:
                # A stream just declared (here or by another process) refuses consumers until its writer has
                # started; RabbitMQ 3.10 may even close the whole connection then (INTERNAL_ERROR), which
                # reconnects by itself.
                if loop.time() >= deadline:
                    if isinstance(exc, BackendUnavailableError):
                        raise
                    raise self._channels.endpoint.unavailable(
                        f"cannot follow the {self._label} {self.stream} on {self.describe()}: {exc}"
                    ) from None
                logger.debug("following the %s %s failed, retrying: %s", self._label, self.stream, exc)
            if self.tag is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_cap)
        if self.closed:
            raise self.closed_error()
        if self._replay:
            await self.barrier()

    async def _resume(self) -> None:
        """After a lost channel or consumer: subscribe again after the last event folded until it works (or the
        stream is found gone: ``on_gone``), then call ``on_resumed``."""
        backoff = RETRY_BASE
        while not self.closed:
            try:
                if not await self.subscribe(passive=self._passive_resume):
                    if self._on_gone is not None:
                        self._on_gone()  # deleted while we were away
                    return
                break
            except (BackendError, ClosedError, ChannelInvalidStateError, NotReady) as exc:
                logger.debug("following the %s %s again failed, retrying: %s", self._label, self.stream, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._retry_cap)
        if self._on_resumed is not None:
            self._on_resumed()

    async def declare(self, *, passive: bool) -> bool:
        """Declare the stream (passive: only see whether it exists); False when there is no such stream."""
        with self._channels.boundary():
            async with self._channels.ops_channel() as channel:
                try:
                    await channel.declare_queue(
                        self.stream,
                        durable=True,
                        passive=passive,
                        arguments=None if passive else self._arguments(),
                        timeout=self.operation_timeout,
                    )
                except ChannelNotFoundEntity as exc:
                    # NOT_FOUND also says "home node ... of durable queue ... is down or inaccessible" while a
                    # restarted node brings its streams back: only "no queue" means it is gone.
                    if "no queue" not in str(exc):
                        raise NotReady(str(exc)) from exc
                    return False
                except ChannelPreconditionFailed as exc:  # declared with other arguments elsewhere: use it as is
                    logger.debug("the %s %s exists with other arguments: %s", self._label, self.stream, exc)
        return True

    async def subscribe(self, *, passive: bool) -> bool:
        """Consume the stream from its start (or after the last event folded); False if passive and it is gone."""
        async with self._subscribing:
            if self.tag is not None:
                return True  # subscribed meanwhile (a resume and a first use at once)
            return await self._consume(passive=passive)

    async def _consume(self, *, passive: bool) -> bool:
        if not await self.declare(passive=passive):
            return False
        with self._channels.boundary():
            channel = await self._channels.open_channel(prefetch=PREFETCH)
            try:
                underlay = await channel.get_underlay_channel()
                tag = f"{self._tag_prefix}{uuid.uuid4().hex}"
                # The tag is held before basic.consume goes out, so a basic.cancel read right behind the
                # consume-ok (the stream deleted meanwhile) is not ignored.
                self.channel, self.underlay, self.tag = channel, underlay, tag
                channel.close_callbacks.add(self._on_channel_closed)
                _on_consumer_cancel(underlay, self._on_consumer_cancelled)
                offset: int | str = "first" if self.offset is None else self.offset + 1
                try:
                    await underlay.basic_consume(
                        self.stream,
                        functools.partial(self._deliver, tag),
                        no_ack=False,
                        consumer_tag=tag,
                        arguments={"x-stream-offset": offset},
                        timeout=self.operation_timeout,
                    )
                except ChannelPreconditionFailed as exc:
                    raise NotReady(str(exc)) from exc
            except BaseException:
                if self.channel is channel:
                    self.channel = self.underlay = self.tag = None
                await self._channels.discard(channel)
                raise
        return True

    def _on_channel_closed(self, channel: Any, exc: BaseException | None = None) -> None:
        if channel is not self.channel:
            return
        self.channel = self.underlay = self.tag = None
        if not self.closed:
            logger.info("the %s %s consumer was lost (%s), following it again", self._label, self.stream, exc)
            self.attaching = self.spawn(self._resume())

    def _on_consumer_cancelled(self, frame: spec.Basic.Cancel) -> None:
        if frame.consumer_tag is None or frame.consumer_tag != self.tag:
            return
        # The broker cancels stream consumers when the stream is deleted, and also when its node goes down:
        # follow it again after the last event folded.
        channel = self.channel
        self.channel = self.underlay = self.tag = None
        if channel is not None:
            self.spawn(self._channels.discard(channel))
        if not self.closed:
            self.attaching = self.spawn(self._resume())

    async def _deliver(self, tag: str, message: DeliveredMessage) -> None:
        # Each delivery runs as a task of its own, in order: all that must happen in stream order is done before
        # the first await (there is none).
        if tag != self.tag:
            return  # a delivery of a consumer given up
        self.received += 1
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int) and not isinstance(offset, bool):
            if self.offset is not None and offset <= self.offset:
                return  # already folded (a resumed consumer starts at a chunk boundary)
            self.offset = offset
        self._fold(message.body)
        self._last_tag = getattr(message.delivery, "delivery_tag", None)  # a basic.deliver's (aiormq 6 and 7)
        self._unacked += 1
        if self._unacked >= ACK_EVERY:
            self._ack()
        elif not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._ack)

    def _ack(self) -> None:
        """Ack what the consumer was given so far (one ack for many): a stream consumer's credit."""
        self._ack_scheduled = False
        if self._unacked and self._last_tag is not None and self.underlay is not None:
            self._unacked = 0
            self.spawn(_send_ack(self.underlay, self._last_tag))

    # -- publishing -----------------------------------------------------------------------------------------

    async def send(self, body: bytes, *, message_id: str | None = None, content_type: str | None = None) -> Any:
        """One persistent, mandatory, confirmed publish, sent once more on a fresh channel if nothing was sent;
        the broker's confirmation. StreamGone if no queue took it (the stream was deleted)."""
        properties = spec.Basic.Properties(message_id=message_id, delivery_mode=2, content_type=content_type)
        for attempt in (1, 2):
            with self._channels.boundary():
                channel = await self._channels.confirm_channel()
                underlay = await channel.get_underlay_channel()
                try:
                    return await underlay.basic_publish(
                        body,
                        exchange="",
                        routing_key=self.stream,
                        properties=properties,
                        mandatory=True,
                        timeout=self.operation_timeout,
                    )
                except aiormq.exceptions.PublishError as exc:
                    if getattr(exc.frame, "reply_code", None) == _NO_ROUTE:
                        raise StreamGone(self.stream) from exc
                    raise
                except ChannelInvalidStateError:
                    # Raised before anything was written: the channel (or its connection) had closed.
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def publish(self, body: bytes, *, content_type: str | None = None) -> None:
        """``send``, with the stream declared again and the event sent once more if it was deleted; a nack or a
        second NO_ROUTE raises BackendUnavailableError."""
        try:
            confirmation = await self.send(body, content_type=content_type)
        except StreamGone:
            await self.declare(passive=False)
            try:
                confirmation = await self.send(body, content_type=content_type)
            except StreamGone:
                raise self._channels.endpoint.unavailable(
                    f"the {self._label} {self.stream} on {self.describe()} takes no events"
                ) from None
        if isinstance(confirmation, spec.Basic.Nack):
            raise self._channels.endpoint.unavailable(f"{self.describe()} refused (nacked) an event for {self.stream}")

    # -- barriers -------------------------------------------------------------------------------------------

    async def sync(self, what: str | None = None) -> None:
        """Return once the fold read every event confirmed before the call (one barrier event serves every caller
        that arrived before it was sent). ``what``: fail as ``progressing`` does, naming it; None: wait as long
        as the barrier's own publish and read-back do."""
        waiter = self.next_sync
        if waiter is None:
            waiter = self.next_sync = asyncio.get_running_loop().create_future()
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.spawn(self._send_barrier(waiter))
        if what is None:
            await asyncio.shield(waiter)
        else:
            await self.progressing(waiter, what)

    async def barrier(self) -> None:
        """Publish one barrier event of its own (``publish_barrier``) and return once the fold read it (waiting as
        ``progressing`` does). ``sync`` shares one among its callers."""
        key, folded = self.expect()
        try:
            await self._publish_barrier(json.dumps(self._barrier(key), separators=(",", ":")).encode())
            await self.progressing(folded, self._reading)
        finally:
            self.forget(key)

    async def _send_barrier(self, waiter: asyncio.Future[None]) -> None:
        async with self.sync_lock:
            if self.next_sync is waiter:
                self.next_sync = None  # callers from now on wait for the next barrier
            try:
                await self.barrier()
            except BaseException as exc:
                if not waiter.done():
                    if self.closed:
                        waiter.set_exception(self.closed_error())
                    elif isinstance(exc, asyncio.CancelledError):
                        waiter.cancel()
                    else:
                        waiter.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if not waiter.done():
                waiter.set_result(None)


async def _send_ack(underlay: Any, delivery_tag: int) -> None:
    with contextlib.suppress(Exception):  # a channel gone took its deliveries with it
        await underlay.basic_ack(delivery_tag, multiple=True)


def _succeeded(future: asyncio.Future[Any]) -> bool:
    return not future.cancelled() and future.exception() is None
