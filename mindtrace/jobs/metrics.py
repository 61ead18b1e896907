"""Prometheus metrics (extra ``prometheus``): PrometheusHook, serve (``/metrics``, ``/healthz``), multiprocess."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mindtrace.jobs.constants import DLQ_SUFFIX, UNDECODABLE_SCHEMA
from mindtrace.jobs.errors import ConfigurationError, LeaseLostError, MissingDependencyError, UsageError
from mindtrace.jobs.hooks import Hook, PublishEvent, RunEvent, SettleEvent
from mindtrace.jobs.lifecycle import JobStatus

if importlib.util.find_spec("prometheus_client") is None:
    raise MissingDependencyError("mindtrace.jobs.metrics", "prometheus", "prometheus-client")

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from mindtrace.jobs.orchestrator import AsyncOrchestrator

# prometheus_client itself is imported only when a hook or a server is made, never by importing this module:
# prepare_multiprocess() must set PROMETHEUS_MULTIPROC_DIR before that import, which picks the value storage.

logger = logging.getLogger("mindtrace.jobs")

#: The environment variable prometheus_client reads (at its import) to keep metrics in files, per process.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Histogram buckets (seconds) of run duration and queue wait: 5 ms to 6 h (the client default stops at 10 s,
#: useless for training jobs).
BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
)

#: The ``reason`` label of ``mindtrace_jobs_dead_lettered_total``: a fixed set, never the free-text reason.
DEAD_LETTER_REASONS = ("failed", "timed_out", "lost_runs", "undecodable", "refused")

#: Longest sleep of the sampler between two event-loop lag measurements (seconds).
LAG_TICK = 1.0

# At most this many runs ended and not settled yet are remembered (for their duration's outcome label).
_MAX_PENDING_DURATIONS = 10_000


class _Metrics:
    """Every metric of one registry (made once per registry: prometheus_client refuses a second one)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"mindtrace_jobs_{name}", doc, ("queue", "schema", *labels), registry=registry)

        self.published = counter("published", "Jobs published (the broker holds them).")
        self.started = counter("started", "Runs started.")
        self.succeeded = counter("succeeded", "Runs that succeeded (acked as SUCCEEDED).")
        self.failed = counter("failed", "Runs that failed: raised, timed out or returned an invalid output.")
        self.retried = counter("retried", "Failed runs sent back for a retry.")
        self.dead_lettered = counter("dead_lettered", "Jobs dead-lettered, by reason.", "reason")
        self.cancelled = counter("cancelled", "Jobs settled as CANCELLED (before or during a run).")
        self.expired = counter("expired", "Jobs settled as EXPIRED (taken after their expires_at), unrun.")
        self.timed_out = counter("timed_out", "Runs over their time limit.")
        self.lease_lost = counter("lease_lost", "Settles refused because the consumer no longer held the job.")
        self.run_duration = Histogram(
            "mindtrace_jobs_run_duration_seconds",
            "Duration of runs, by how they were settled.",
            ("queue", "schema", "outcome"),
            buckets=BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "mindtrace_jobs_queue_wait_seconds",
            "Time from publish (created_at) to the start of a job's first run.",
            ("queue", "schema"),
            buckets=BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "mindtrace_jobs_in_progress",
            "Runs in progress.",
            ("queue", "schema"),
            multiprocess_mode="livesum",
            registry=registry,
        )

        def depth(name: str, doc: str) -> Gauge:
            # Every worker samples the same queue: the latest sample of a live process is the depth.
            return Gauge(name, doc, ("queue",), multiprocess_mode="livemostrecent", registry=registry)

        self.ready = depth("mindtrace_jobs_queue_ready", "Jobs ready to run (sampled; use max by (queue)).")
        self.delayed = depth("mindtrace_jobs_queue_delayed", "Jobs waiting for a retry delay (sampled).")
        self.dead_letter_ready = depth("mindtrace_jobs_dead_letter_ready", "Jobs on the dead-letter queue (sampled).")
        self.loop_lag = Gauge(
            "mindtrace_jobs_event_loop_lag_seconds",
            "How late the event loop woke the metrics sampler from a sleep.",
            multiprocess_mode="livemax",
            registry=registry,
        )


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_BY_REGISTRY_LOCK = threading.Lock()


def _metrics_of(registry: CollectorRegistry | None) -> _Metrics:
    from prometheus_client import REGISTRY

    chosen = REGISTRY if registry is None else registry
    with _BY_REGISTRY_LOCK:
        metrics = _BY_REGISTRY.get(chosen)
        if metrics is None:
            metrics = _BY_REGISTRY[chosen] = _Metrics(chosen)
        return metrics


class _Series:
    """The children of one (queue, schema): ``labels()`` is slow, so each is looked up once."""

    def __init__(self, metrics: _Metrics, queue: str, schema: str) -> None:
        self._metrics, self._labels = metrics, (queue, schema)
        self.published = metrics.published.labels(queue, schema)
        self.started = metrics.started.labels(queue, schema)
        self.succeeded = metrics.succeeded.labels(queue, schema)
        self.failed = metrics.failed.labels(queue, schema)
        self.retried = metrics.retried.labels(queue, schema)
        self.cancelled = metrics.cancelled.labels(queue, schema)
        self.expired = metrics.expired.labels(queue, schema)
        self.timed_out = metrics.timed_out.labels(queue, schema)
        self.lease_lost = metrics.lease_lost.labels(queue, schema)
        self.queue_wait = metrics.queue_wait.labels(queue, schema)
        self.in_progress = metrics.in_progress.labels(queue, schema)
        self._durations: dict[str, Histogram] = {}
        self._dead_lettered: dict[str, Counter] = {}
        self.publish_cm = _Published(self.published)

    def duration(self, outcome: str) -> Histogram:
        child = self._durations.get(outcome)
        if child is None:
            child = self._durations[outcome] = self._metrics.run_duration.labels(*self._labels, outcome)
        return child

    def dead_lettered(self, reason: str) -> Counter:
        child = self._dead_lettered.get(reason)
        if child is None:
            child = self._dead_lettered[reason] = self._metrics.dead_lettered.labels(*self._labels, reason)
        return child


class _Published:
    """Counts a publish when it exits without an error (one instance per series: it keeps no state)."""

    __slots__ = ("_counter",)

    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._counter.inc()


class _Running:
    """Around one run: started and in-progress on entry; on exit the duration, kept until the settle labels it."""

    __slots__ = ("_hook", "_key", "_series", "_start")

    def __init__(self, hook: PrometheusHook, series: _Series, key: tuple[str, str]) -> None:
        self._hook, self._series, self._key = hook, series, key
        self._start = 0.0

    def __enter__(self) -> None:
        self._series.started.inc()
        self._series.in_progress.inc()
        self._start = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        duration = time.perf_counter() - self._start
        self._series.in_progress.dec()
        pending = self._hook._pending
        if len(pending) >= _MAX_PENDING_DURATIONS:  # runs never settled through this hook: forget them
            pending.clear()
        pending[self._key] = (self._series, duration)


@dataclass(frozen=True)
class QueueDepth:
    """One sample of a queue: jobs ready, waiting for a retry delay (None: the backend cannot tell), and on
    its dead-letter queue."""

    ready: int
    delayed: int | None
    dead_letter: int


async def sample_depth(orchestrator: AsyncOrchestrator, queue: str) -> QueueDepth:
    """The depth of ``queue`` as the metrics report it (the one place that reads it from the backend)."""
    if "running" in orchestrator.backend.capabilities.queue_counts:
        # A backend that counts claimed jobs keeps every count of a queue in one place (one script on Redis).
        stats = await orchestrator.queue_stats(queue)
        dead_letter = stats.dead_lettered
        if dead_letter is None:
            dead_letter = await orchestrator.count_queue_messages(queue + DLQ_SUFFIX)
        return QueueDepth(stats.ready, stats.delayed, dead_letter)
    # RabbitMQ: delayed jobs wait in the delay chain every queue shares, so they are not counted per queue.
    ready = await orchestrator.count_queue_messages(queue)
    return QueueDepth(ready, None, await orchestrator.count_queue_messages(queue + DLQ_SUFFIX))


@dataclass
class _Watch:
    loop: asyncio.AbstractEventLoop
    queues: set[str] = field(default_factory=set)


def _dead_letter_reason(event: SettleEvent) -> str:
    if event.job.payload.name == UNDECODABLE_SCHEMA:
        return "undecodable"
    if event.reason.startswith("not retried"):
        return "refused"  # a retry the backend refused (too large): see policy.retry_refused
    if event.timed_out:
        return "timed_out"
    if event.ran:
        return "failed"
    return "lost_runs"  # delivered over the budget without being settled: see policy.before_run


class PrometheusHook(Hook):
    """A :class:`~mindtrace.jobs.hooks.Hook` that exports Prometheus metrics named ``mindtrace_jobs_*``.

    Install it on the orchestrator: ``AsyncOrchestrator(url, hooks=[PrometheusHook()])``; its consumers inherit
    it. Metrics go to ``registry`` (default: prometheus_client's global ``REGISTRY``); hooks sharing a registry
    share its metrics. Labels are ``queue``, ``schema`` and ``outcome`` / ``reason`` (small fixed sets), never a
    job id, so the number of series does not grow with the number of jobs. Counters are counted on the outcome
    a settle reports (a settle that failed counts only as a lost lease).

    Depth (``queue_ready``, ``dead_letter_ready``; ``queue_delayed`` where the backend counts it) is sampled every
    ``sample_interval`` seconds by a task started on the consumer's event loop at the first run of a queue's
    job; the hook learns the orchestrator from that run (and holds it weakly), or from :meth:`attach`. The same
    task measures the event loop's lag. It ends at its first sample after its orchestrators are closed or
    gone, or at :meth:`close`.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, sample_interval: float = 15.0) -> None:
        if not sample_interval > 0:
            raise ConfigurationError(f"sample_interval must be a number of seconds > 0, not {sample_interval!r}")
        self.sample_interval = float(sample_interval)
        self._metrics = _metrics_of(registry)
        self._series: dict[tuple[str, str], _Series] = {}
        # (queue, job id) of a run ended -> its series and duration, until its settle says the outcome.
        self._pending: dict[tuple[str, str], tuple[_Series, float]] = {}
        self._last_attached: tuple[weakref.ref[AsyncOrchestrator], str] | None = None
        self._watched: weakref.WeakKeyDictionary[AsyncOrchestrator, _Watch] = weakref.WeakKeyDictionary()
        self._samplers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"PrometheusHook(sample_interval={self.sample_interval:g})"

    def _of(self, queue: str, schema: str) -> _Series:
        series = self._series.get((queue, schema))
        if series is None:
            series = self._series[(queue, schema)] = _Series(self._metrics, queue, schema)
        return series

    def publish(self, event: PublishEvent) -> AbstractContextManager[object] | None:
        """Counts the publish once the broker holds the job."""
        return self._of(event.queue, event.job.payload.name).publish_cm

    def run(self, event: RunEvent) -> AbstractContextManager[object] | None:
        """Counts the start, the run in progress and its duration; the queue wait of a job's first run."""
        job = event.job
        series = self._of(event.queue, job.payload.name)
        if job.attempts == 0 and event.delivery_count == 1:
            # A retry's created_at counts its earlier runs and backoff delays: only first runs are observed.
            series.queue_wait.observe(max(0.0, time.time() - job.created_at.timestamp()))
        orchestrator = event.orchestrator
        last = self._last_attached
        if orchestrator is not None and (last is None or last[0]() is not orchestrator or last[1] != event.queue):
            watch = self._watched.get(orchestrator)
            if watch is None or event.queue not in watch.queues:
                self.attach(orchestrator, event.queue)
            self._last_attached = (weakref.ref(orchestrator), event.queue)
        return _Running(self, series, (event.queue, job.id))

    def settled(self, event: SettleEvent) -> None:
        """Counts the outcome; labels the duration of the run it settles with it."""
        job = event.job
        ended = self._pending.pop((event.queue, job.id), None) if event.ran else None
        if ended is None:
            series, duration = self._of(event.queue, job.payload.name), None
        else:
            series, duration = ended
        if event.failure is not None:
            outcome = "settle_failed"
            if isinstance(event.failure, LeaseLostError):
                series.lease_lost.inc()
                outcome = "lease_lost"
        elif event.action == "ack":
            status = event.status
            if status is JobStatus.SUCCEEDED:
                outcome = "succeeded"
                if event.ran:  # not a redelivered duplicate of a run that succeeded
                    series.succeeded.inc()
            elif status is JobStatus.CANCELLED:
                outcome = "cancelled"
                series.cancelled.inc()
            elif status is JobStatus.EXPIRED:
                outcome = "expired"
                series.expired.inc()
            else:
                return  # handed out by receive_message: not a run
        elif event.action == "retry":
            outcome = "timed_out" if event.timed_out else "failed"
            if event.status is JobStatus.RETRYING:
                series.retried.inc()
        elif event.action == "dead_letter":
            outcome = "timed_out" if event.timed_out else "failed"
            series.dead_lettered(_dead_letter_reason(event)).inc()
        else:
            outcome = "released"
        if event.ran and event.failure is None and outcome in ("failed", "timed_out"):
            series.failed.inc()
        if event.timed_out and event.failure is None:
            series.timed_out.inc()
        if duration is not None:
            series.duration(outcome).observe(duration)

    def attach(self, orchestrator: AsyncOrchestrator, *queues: str) -> None:
        """Sample the depth of ``queues`` through ``orchestrator`` from now on (held weakly).

        Call it on the orchestrator's event loop (a publisher-only process exporting depth does); a consumer's
        queues are attached at their first run without it. The sampler task starts on this loop if needed.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise UsageError("PrometheusHook.attach() must be called on the orchestrator's event loop") from None
        watch = self._watched.get(orchestrator)
        if watch is None or watch.loop is not loop:
            watch = self._watched[orchestrator] = _Watch(loop)
        watch.queues.update(queues)
        task = self._samplers.get(loop)
        if task is None or task.done():
            self._samplers[loop] = loop.create_task(self._sample_forever(), name="mindtrace-jobs-metrics-sampler")

    async def sample(self) -> None:
        """Sample the depth of every queue attached on this event loop now (the sampler does every
        ``sample_interval`` seconds). A queue whose sample fails keeps its last value; the failure is logged."""
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        for orchestrator, watch in list(self._watched.items()):
            if watch.loop is not loop:
                continue
            for queue in sorted(watch.queues):
                try:
                    depth = await sample_depth(orchestrator, queue)
                except UsageError:  # closed: nothing more to sample there
                    self._watched.pop(orchestrator, None)
                    break
                except Exception as exc:
                    logger.debug("could not sample the depth of %r: %s", queue, exc)
                    continue
                metrics.ready.labels(queue).set(depth.ready)
                metrics.dead_letter_ready.labels(queue).set(depth.dead_letter)
                if depth.delayed is not None:
                    metrics.delayed.labels(queue).set(depth.delayed)

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        tick = min(LAG_TICK, self.sample_interval)
        due = loop.time()
        while any(watch.loop is loop for watch in list(self._watched.values())):
            if loop.time() >= due:
                await self.sample()
                due = loop.time() + self.sample_interval
            before = loop.time()
            await asyncio.sleep(tick)
            self._metrics.loop_lag.set(max(0.0, loop.time() - before - tick))

    def close(self) -> None:
        """Stop the sampler tasks (from any thread); they start again at the next attach."""
        for loop, task in list(self._samplers.items()):
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(task.cancel)
        self._samplers.clear()
        self._watched.clear()
        self._last_attached = None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """The HTTP server :func:`serve` started, in a daemon thread: ``port`` it listens on; ``close()`` it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread
        #: The port it listens on (the one picked, when asked for port 0).
        self.port: int = server.server_port
        #: The address it listens on.
        self.host: str = str(server.server_address[0])

    def __repr__(self) -> str:
        return f"MetricsServer(host={self.host!r}, port={self.port})"

    def close(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    port: int,
    *,
    host: str = "0.0.0.0",
    health: Callable[[], bool] | None = None,
    registry: CollectorRegistry | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` (Prometheus text format) and ``/healthz`` on ``host:port`` (0: a free port) from a
    daemon thread.

    ``/metrics`` exposes ``registry`` (default: the global one; with ``PROMETHEUS_MULTIPROC_DIR`` set, every
    process's metrics in that directory). ``/healthz`` answers 200 ``ok`` when ``health`` is None or
    ``health()`` is true, 503 otherwise (or when it raises); it is called in the server's thread.
    """
    from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

    if registry is None:
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            try:
                healthy = health is None or bool(health())
            except Exception:
                logger.exception("the /healthz check raised")
                healthy = False
            status, body = ("200 OK", b"ok\n") if healthy else ("503 Service Unavailable", b"unhealthy\n")
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        if path == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics or /healthz\n"]

    server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="mindtrace-jobs-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


def prepare_multiprocess() -> str:
    """Set up prometheus_client's multiprocess mode for this process and the workers it starts; the directory.

    Makes a fresh temporary directory (or takes the one ``PROMETHEUS_MULTIPROC_DIR`` already names), wipes
    its metric files and sets ``PROMETHEUS_MULTIPROC_DIR`` in ``os.environ``, so children inherit it. Call it
    in the parent before prometheus_client is imported (importing this module does not import it; a
    :class:`PrometheusHook` or :func:`serve` does) and before starting the workers; then :func:`serve` in the
    parent exposes the sum over them (gauges as their ``multiprocess_mode`` says: in-progress summed over live
    processes, depth the latest sample of one, loop lag the worst). Call :func:`mark_process_dead` when a worker
    exits.
    """
    path = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="mindtrace-jobs-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    if "prometheus_client.values" in sys.modules:
        logger.warning(
            "prepare_multiprocess() was called after prometheus_client was imported: this process's own metrics "
            "stay in memory (its workers' still go to %s)",
            path,
        )
    return path


def mark_process_dead(pid: int) -> None:
    """Tell the multiprocess collector that worker ``pid`` exited: its live gauges (in progress, depth, lag)
    are dropped; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


__all__ = [
    "BUCKETS",
    "DEAD_LETTER_REASONS",
    "MetricsServer",
    "PrometheusHook",
    "QueueDepth",
    "mark_process_dead",
    "prepare_multiprocess",
    "sample_depth",
    "serve",
]
