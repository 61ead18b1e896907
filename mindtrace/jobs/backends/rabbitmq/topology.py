"""RabbitMQ topology: the exchange, queue and stream arguments, and the priority mapping (delays: ``delays``)."""

from __future__ import annotations

from typing import Any, Final

from mindtrace.jobs.constants import AMQP_EXCHANGE, AMQP_RECORDS_SEGMENT_BYTES, MAX_PRIORITY

#: The durable direct exchange every job is published to; each queue is bound to it under its own name.
EXCHANGE: Final = AMQP_EXCHANGE

#: Broker priorities: job priority p is published as 2p, or 2p + 1 when the message resumes a cut-short run
#: (a job given back, a lost run recorded), so it goes ahead of the jobs waiting at its priority and behind
#: every job of a higher one, as on Redis. Queues are declared with this ``x-max-priority``.
BROKER_MAX_PRIORITY: Final = 2 * MAX_PRIORITY + 1


def broker_priority(priority: int, *, resumes: bool = False) -> int:
    """The AMQP priority a job of ``priority`` is published with (see BROKER_MAX_PRIORITY)."""
    return 2 * priority + (1 if resumes else 0)


def job_priority(broker: int | None) -> int:
    """The job priority of a message the broker delivered with AMQP priority ``broker`` (foreign: clamped)."""
    return min(MAX_PRIORITY, max(0, (broker or 0) // 2))


def queue_arguments() -> dict[str, Any]:
    """The arguments every job queue is declared with (its ``x-max-priority``)."""
    return {"x-max-priority": BROKER_MAX_PRIORITY}


#: The durable classic queue holding one message per declared queue name: RabbitMQ's registry of queues (AMQP
#: cannot list queues). Its ``:`` keeps it apart from every user queue.
REGISTRY_QUEUE: Final = f"{EXCHANGE}:queues"

#: An exclusive queue a reader of the registry declares while it holds the registry's messages, so that two
#: readers never see half of it each; being exclusive, the broker drops it with its connection.
REGISTRY_LOCK: Final = f"{EXCHANGE}:queues.lock"


def records_stream_name(queue: str) -> str:
    """The stream queue that holds the job-record events of ``queue`` (RabbitMQStateStore); its ``:`` keeps
    it apart from every user queue."""
    return f"{queue}:records"


def records_stream_arguments(max_age: float) -> dict[str, Any]:
    """The arguments of a job-record stream: a stream queue that drops segments older than ``max_age`` seconds."""
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, int(max_age))}s",
        "x-stream-max-segment-size-bytes": AMQP_RECORDS_SEGMENT_BYTES,
    }
