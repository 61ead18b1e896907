"""Confirmed publishing for a RabbitMQClient, and giving held messages back by publishing them again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any, Final

import aiormq
from aio_pika.abc import AbstractIncomingMessage
from aiormq import spec
from aiormq.exceptions import ChannelInvalidStateError

from mindtrace.jobs.backends.base import OutgoingMessage
from mindtrace.jobs.backends.rabbitmq import conditions
from mindtrace.jobs.backends.rabbitmq.connection import _Channels, _on_open_channel
from mindtrace.jobs.backends.rabbitmq.topology import EXCHANGE, broker_priority, job_priority
from mindtrace.jobs.errors import PublishError, QueueNotFoundError

# AMQP reply code of a mandatory message that no queue was bound to receive.
_NO_ROUTE: Final = 312


class _Publisher:
    """Publishes persistent, mandatory messages on the confirm channel of ``channels`` (on its publishing
    connection) and waits for confirms."""

    def __init__(self, channels: _Channels) -> None:
        self._channels = channels

    async def send(
        self,
        exchange: str,
        routing_key: str,
        queue: str,
        message: OutgoingMessage,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish one persistent message (mandatory) and wait for the broker's confirm.

        A message that ``resumes`` a cut-short run goes ahead of the jobs waiting at its priority, as it
        would on Redis (see :func:`broker_priority`).

        ``headers`` are added to the job's own (the delay chain's due time and queue, say). ``queue`` is the
        queue the caller means, for errors. A message nothing was sent of is sent again
        once on a fresh channel (after a reconnect); one that was sent is never sent twice.
        """
        properties = spec.Basic.Properties(
            message_id=message.job_id or None,  # names the job in errors about this delivery (see receiver._job_id)
            delivery_mode=2,
            priority=broker_priority(message.priority, resumes=message.resumes),
            # The job's headers (trace context) are in the body; mirrored here for AMQP tools that read them.
            headers={**(message.headers or {}), **(headers or {})} or None,
        )
        for attempt in (1, 2):
            with self._channels.boundary():
                channel = await self._channels.confirm_channel()
                underlay = await channel.get_underlay_channel()
            try:
                await underlay.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    timeout=self._channels.operation_timeout,
                )
                return
            except aiormq.exceptions.PublishError as exc:
                if getattr(exc.frame, "reply_code", None) == _NO_ROUTE:
                    raise QueueNotFoundError(queue) from exc
                raise self._publish_error(queue, message, exc) from exc
            except ChannelInvalidStateError:
                # Raised before anything was written: the channel (or its connection) had closed.
                if attempt == 2:
                    with self._channels.boundary():
                        raise
            except Exception as exc:
                raise self._publish_error(queue, message, exc) from exc

    def _publish_error(self, queue: str, message: OutgoingMessage, exc: BaseException) -> PublishError:
        reason = "no confirm in time" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
        blocked = conditions.blocked_detail(self._channels.publish_blocked)
        return PublishError(
            f"{self._channels.backend} did not confirm job {message.job_id!r} for queue {queue!r} ({reason}); "
            + (blocked or "it may or may not be queued"),
            queue=queue,
            job_id=message.job_id,
            backend=self._channels.backend,
        )

    async def return_message(self, message: AbstractIncomingMessage, queue: str) -> None:
        """Give a held message back to ``queue`` without it counting as a lost run.

        A nack would set the redelivered flag, which the consumer must read as a lost run. Giving a job back
        (a stop, a cancelled task, a prefetched message never handed out) is not one: publish the same bytes
        again, confirmed, and ack the original. The job goes ahead of the jobs waiting at its priority. If the
        publish fails, nack instead: the redelivery is then charged one attempt, but the job is never lost.
        """
        if not _on_open_channel(message):
            return  # its channel closed: the broker has it back already (a copy would be a duplicate)
        # The job's mirrored headers (trace context) go with the copy; the broker's own ``x-`` ones do not.
        headers = {k: v for k, v in (message.headers or {}).items() if isinstance(v, str) and not k.startswith("x-")}
        copy = OutgoingMessage(
            message.body, job_priority(message.priority), message.message_id or "", resumes=True, headers=headers
        )
        try:
            await self.send(EXCHANGE, queue, queue, copy)
        except Exception:
            with self._channels.boundary():
                await self._channels.timed(message.nack(requeue=True))
            return
        with contextlib.suppress(Exception):
            await self._channels.timed(message.ack())
