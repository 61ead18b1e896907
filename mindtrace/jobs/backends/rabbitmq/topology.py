"""RabbitMQ topology: the exchange, queue and retry-queue arguments, priority mapping and retry buckets."""

from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Final

from mindtrace.jobs.constants import AMQP_EXCHANGE, AMQP_RECORDS_SEGMENT_BYTES, MAX_PRIORITY

logger = logging.getLogger("mindtrace.jobs")

#: The durable direct exchange every job is published to; each queue is bound to it under its own name.
EXCHANGE: Final = AMQP_EXCHANGE

#: Upper bounds (ms) of the retry-delay queues of a queue: half-octave steps from 1 ms to 2**31 ms (24.8 days).
#: A retry waiting ``d`` ms goes to the first bucket >= d with a per-message expiration of exactly ``d``.
RETRY_BUCKETS_MS: Final = tuple(sorted({math.ceil(2 ** (k / 2)) for k in range(63)}))

# An idle retry queue is deleted by the broker this long after its last message could have left it.
_RETRY_QUEUE_GRACE_MS: Final = 60_000


def retry_queue_name(queue: str, bucket_ms: int) -> str:
    """The retry-delay queue of ``queue`` for delays up to ``bucket_ms``.

    The ``:`` cannot occur in a queue name (see ``validate_queue_name``), so no user queue can collide with it.
    """
    return f"{queue}:retry:{bucket_ms}"


def retry_bucket(delay: float) -> tuple[int, int]:
    """``(bucket_ms, delay_ms)`` for a retry delay in seconds; delays over the last bucket are capped to it."""
    delay_ms = max(1, math.ceil(delay * 1000 - 1e-6))
    if delay_ms > RETRY_BUCKETS_MS[-1]:
        logger.warning("retry delay of %.0fs capped to %.0fs", delay, RETRY_BUCKETS_MS[-1] / 1000)
        delay_ms = RETRY_BUCKETS_MS[-1]
    return RETRY_BUCKETS_MS[bisect.bisect_left(RETRY_BUCKETS_MS, delay_ms)], delay_ms


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


def retry_queue_arguments(queue: str, bucket_ms: int) -> dict[str, Any]:
    """The arguments of the retry queue of ``queue`` for ``bucket_ms``: expired messages go back to ``queue``,
    and the broker deletes the retry queue once idle past its last possible message."""
    return {
        "x-dead-letter-exchange": EXCHANGE,
        "x-dead-letter-routing-key": queue,
        "x-expires": bucket_ms + _RETRY_QUEUE_GRACE_MS,
    }


def records_stream_name(queue: str) -> str:
    """The stream queue that holds the job-record events of ``queue`` (RabbitMQStateStore); like the retry
    queues, its ``:`` keeps it apart from every user queue."""
    return f"{queue}:records"


def records_stream_arguments(max_age: float) -> dict[str, Any]:
    """The arguments of a job-record stream: a stream queue that drops segments older than ``max_age`` seconds."""
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, int(max_age))}s",
        "x-stream-max-segment-size-bytes": AMQP_RECORDS_SEGMENT_BYTES,
    }
