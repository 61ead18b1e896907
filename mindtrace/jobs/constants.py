"""Every default of mindtrace.jobs, in one place."""

from __future__ import annotations

import re
from typing import Final

#: Suffix of a queue's dead-letter queue: jobs that spent their retries in ``q`` land in ``q.dlq``.
DLQ_SUFFIX: Final = ".dlq"

#: Largest encoded job accepted by ``publish`` (16 MiB); larger ones raise PayloadTooLargeError.
MAX_PAYLOAD_BYTES: Final = 16 * 1024 * 1024

#: Longest queue name; RabbitMQ allows 255 bytes and we keep room for suffixes.
MAX_QUEUE_NAME_LENGTH: Final = 200

#: Queue names: letters, digits, ``_``, ``-``, ``.``; no key separators (``:``), hash-tag braces or globs.
QUEUE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

#: Queue name prefix RabbitMQ reserves for itself; refused on every backend, so a name works on all of them.
RESERVED_QUEUE_PREFIX: Final = "amq."

#: Job priorities run from MIN_PRIORITY to MAX_PRIORITY; higher runs first.
MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 9

#: Consumer defaults: retries after the first failed run, first retry delay (seconds), its growth and cap.
MAX_RETRIES: Final = 3
RETRY_DELAY: Final = 1.0
RETRY_BACKOFF: Final = 2.0
MAX_RETRY_DELAY: Final = 300.0

#: Longest delay of a delayed job (``publish(delay=...)``, ``run_at=``) and of a retry, on every backend: two
#: years (RabbitMQ's delay levels reach 2**36 ms, about 795 days).
MAX_DELAY: Final = 2 * 365 * 86400.0

#: Seconds a claimed job stays leased on a broker with leases (Redis) before another consumer may take it.
VISIBILITY_TIMEOUT: Final = 30.0

#: Redis keys live under this prefix.
REDIS_KEY_PREFIX: Final = "mindtrace:jobs:"

#: Times a Redis command is retried, with jittered exponential backoff, before BackendUnavailableError.
REDIS_CONNECTION_RETRIES: Final = 6

#: Longest single blocking wait on Redis (seconds); waits are re-issued, so this only bounds one round trip.
REDIS_MAX_BLOCK: Final = 5.0

#: The durable direct exchange every job is published through on RabbitMQ (routing key = queue name).
AMQP_EXCHANGE: Final = "mindtrace.jobs"

#: AMQP heartbeat (seconds): a silent peer is declared dead after about twice this.
AMQP_HEARTBEAT: Final = 30

#: Seconds the job-record stream of a RabbitMQ queue keeps its events (its ``x-max-age``): a process that starts
#: later replays this much of it on its first look-up of the queue, so records older than this (a job queued,
#: or a result kept, for longer) read UNKNOWN there; processes that were following the stream keep them.
AMQP_RECORDS_MAX_AGE: Final = 24 * 3600.0

#: Bytes per segment file of a job-record stream: age retention drops whole segments only (RabbitMQ's default
#: segment is 500 MB, which a queue's records would take long to fill).
AMQP_RECORDS_SEGMENT_BYTES: Final = 8_000_000

#: Seconds between reconnect attempts of the robust RabbitMQ connection.
AMQP_RECONNECT_INTERVAL: Final = 1.0

#: Seconds within which "the broker cannot be reached" is decided on every backend: a connect that has not
#: succeeded by then (unreachable host, blackholed SYNs, a server that accepts TCP and never answers) raises
#: BackendUnavailableError saying what was tried and for how long.
CONNECT_TIMEOUT: Final = 10.0

#: Seconds to wait for a broker's answer to one operation (connect, confirm, RPC).
OPERATION_TIMEOUT: Final = 10.0

#: Seconds an orchestrator's ``close()`` lets the jobs running on its consumers finish before giving them back.
CLOSE_GRACE: Final = 10.0

#: Seconds a worker told to stop (SIGTERM, SIGINT) lets its running jobs finish before it gives the rest back
#: uncharged: under Kubernetes' default ``terminationGracePeriodSeconds`` of 30 s.
SHUTDOWN_TIMEOUT: Final = 25.0

#: Seconds the blocking API waits at interpreter exit for open orchestrators to close.
EXIT_CLOSE_TIMEOUT: Final = 1.0

#: Seconds a blocking call interrupted by Ctrl-C waits for its cancelled task to clean up (give jobs back).
INTERRUPT_GRACE: Final = 5.0

#: Name of the schema under which undecodable messages are dead-lettered.
UNDECODABLE_SCHEMA: Final = "mindtrace.undecodable"

#: Seconds a finished job's record (status, output, error) is kept; after that the job reads as UNKNOWN.
RESULT_TTL: Final = 3600.0

#: Largest encoded output of one run kept as its result (1 MiB); larger raise ResultTooLargeError.
MAX_RESULT_BYTES: Final = 1024 * 1024

#: Seconds a run that a cancel, its time limit or a shutdown cancelled gets to end before it is abandoned (its
#: job settled, its slot given to the next job, the run left to finish unwatched), and logged.
ABANDON_GRACE: Final = 1.0

#: Seconds between two writes of one running job's progress to its record (reports in between are coalesced).
PROGRESS_INTERVAL: Final = 1.0

#: Back-off while a broker is unreachable (a consumer's claims, a worker's start-up): first wait and cap, seconds.
RECONNECT_DELAY: Final = 0.1
RECONNECT_MAX_DELAY: Final = 5.0

#: The environment variable naming the broker URL of the ``mindtrace-jobs`` command and the pytest plugin.
URL_ENV: Final = "MINDTRACE_JOBS_URL"

#: Longest ``dedup_key`` of a unique job's publish, in characters.
MAX_DEDUP_KEY_LENGTH: Final = 512
