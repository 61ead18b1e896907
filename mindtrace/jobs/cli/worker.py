"""``mindtrace-jobs worker``: run consumer classes until SIGTERM or SIGINT, in one process or several (spawn)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mindtrace.jobs.cli.exit_codes import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_REFUSED
from mindtrace.jobs.constants import SHUTDOWN_TIMEOUT, URL_ENV
from mindtrace.jobs.consumer import AsyncConsumer
from mindtrace.jobs.errors import BackendError, BackendRefusedError, ConfigurationError
from mindtrace.jobs.hooks import Hook, default_hooks
from mindtrace.jobs.logs import LOG_FORMATS, configure_logging
from mindtrace.jobs.orchestrator import AsyncOrchestrator
from mindtrace.jobs.sync import Consumer
from mindtrace.jobs.types import JobSchema
from mindtrace.jobs.worker import (
    SHUTDOWN_SIGNALS,
    ShutdownRequest,
    loop_signals,
    retry_until_ready,
    run_until_signalled,
)

logger = logging.getLogger("mindtrace.jobs.worker")

#: Environment variables read when the matching flag is not given: flag > environment > default.
ENVIRONMENT = {
    "url": URL_ENV,
    "concurrency": "MINDTRACE_JOBS_CONCURRENCY",
    "processes": "MINDTRACE_JOBS_PROCESSES",
    "shutdown_timeout": "MINDTRACE_JOBS_SHUTDOWN_TIMEOUT",
    "log_level": "MINDTRACE_JOBS_LOG_LEVEL",
    "log_format": "MINDTRACE_JOBS_LOG_FORMAT",
    "metrics_port": "MINDTRACE_JOBS_METRICS_PORT",
    "metrics_host": "MINDTRACE_JOBS_METRICS_HOST",
    "no_schedules": "MINDTRACE_JOBS_NO_SCHEDULES",
}

# Seconds a parent gives its children beyond the shutdown timeout before it kills them; between health probes.
_KILL_AFTER, _PROBE_INTERVAL = 5.0, 5.0


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """A worker's settings once flags, environment and defaults are resolved (picklable: sent to children)."""

    targets: tuple[str, ...]
    url: str
    concurrency: int = 1
    processes: int = 1
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    #: A child of a ``--processes`` parent that serves the metrics: record them (multiprocess mode), serve none.
    metrics_child: bool = False
    #: A child's parent process id: the child shuts down when its parent is gone.
    parent_pid: int | None = None
    #: Fire the broker's schedules in this worker (any number of workers may: each fire happens once).
    schedules: bool = True


def register(subparsers: Any) -> None:
    """Add the ``worker`` subcommand."""
    parser = subparsers.add_parser(
        "worker",
        help="run consumer classes until SIGTERM or SIGINT",
        description=(
            "Run the consumer classes (pkg.module:Class, AsyncConsumer or Consumer subclasses naming their queue "
            "and schema as class attributes) on one orchestrator until SIGTERM or SIGINT, then shut down "
            "gracefully. Each option falls back to its environment variable, then to its default."
        ),
    )
    parser.add_argument("targets", nargs="+", metavar="MODULE:CLASS", help="consumer classes to run")
    parser.add_argument("--url", help="broker URL, options in its query (env MINDTRACE_JOBS_URL; required)")
    parser.add_argument("--concurrency", help="jobs each consumer runs at once (env MINDTRACE_JOBS_CONCURRENCY; 1)")
    parser.add_argument("--processes", help="worker processes, started with spawn (env MINDTRACE_JOBS_PROCESSES; 1)")
    parser.add_argument(
        "--shutdown-timeout",
        help=f"seconds running jobs get after SIGTERM (env MINDTRACE_JOBS_SHUTDOWN_TIMEOUT; {SHUTDOWN_TIMEOUT:g})",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (env MINDTRACE_JOBS_LOG_LEVEL; INFO)")
    parser.add_argument("--log-format", help="text or json (env MINDTRACE_JOBS_LOG_FORMAT; text)")
    parser.add_argument(
        "--metrics-port", help="serve /metrics and /healthz on this port (env MINDTRACE_JOBS_METRICS_PORT)"
    )
    parser.add_argument("--metrics-host", help="address to serve metrics on (env MINDTRACE_JOBS_METRICS_HOST; 0.0.0.0)")
    parser.add_argument(
        "--no-schedules",
        action="store_true",
        default=None,
        help="do not fire the broker's schedules in this worker (env MINDTRACE_JOBS_NO_SCHEDULES=1; they run)",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """The ``worker`` subcommand: its exit code (0 after a clean shutdown; see ``exit_codes``)."""
    try:
        config = resolve_config(args, os.environ)
    except ConfigurationError as exc:
        print(f"mindtrace-jobs worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level, config.log_format)
    if config.processes > 1:
        return supervise(config)
    return run_worker(config)


# -- configuration --------------------------------------------------------------------------------------


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerConfig:
    """The settings from ``args`` (flags), else ``environ``, else defaults; ConfigurationError naming the
    flag or variable of a bad value, or a missing URL."""

    def pick(name: str) -> tuple[str | None, str]:
        value = getattr(args, name, None)
        if value is not None:
            return value, "--" + name.replace("_", "-")
        variable = ENVIRONMENT[name]
        return environ.get(variable) or None, variable

    def number(name: str, kind: Callable[[str], Any], default: Any, minimum: float) -> Any:
        value, source = pick(name)
        if value is None:
            return default
        try:
            parsed = kind(value)
        except ValueError:
            parsed = None
        if parsed is None or not parsed >= minimum:
            raise ConfigurationError(f"{source} must be a number >= {minimum:g}, not {value!r}")
        return parsed

    url, url_source = pick("url")
    if not url:
        raise ConfigurationError(
            "a worker needs a broker URL: give --url or set MINDTRACE_JOBS_URL (redis://host:6379/0, "
            "amqp://user:password@host/vhost); memory:// lives in one process and cannot be shared with producers"
        )
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        raise ConfigurationError(
            f"{url_source} is memory://: a worker's in-memory queues are its own, no producer can reach them; "
            "use redis:// or amqp://"
        )
    log_level, level_source = pick("log_level")
    log_level = (log_level or "INFO").upper()
    if not isinstance(logging.getLevelName(log_level), int):
        raise ConfigurationError(f"{level_source} must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {log_level!r}")
    log_format, format_source = pick("log_format")
    log_format = (log_format or "text").lower()
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"{format_source} must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    metrics_host, _ = pick("metrics_host")
    no_schedules, schedules_source = pick("no_schedules")
    flag = str(no_schedules).lower()  # the flag gives True, the environment a string
    if no_schedules is not None and flag not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigurationError(f"{schedules_source} must be 1 or 0, not {no_schedules!r}")
    schedules = flag not in ("1", "true", "yes")
    port = number("metrics_port", int, None, 0)
    if port is not None and port > 65535:
        raise ConfigurationError(f"metrics port must be 0..65535, not {port}")
    return WorkerConfig(
        targets=tuple(args.targets),
        url=url,
        concurrency=number("concurrency", int, 1, 1),
        processes=number("processes", int, 1, 1),
        shutdown_timeout=number("shutdown_timeout", float, SHUTDOWN_TIMEOUT, 0),
        log_level=log_level,
        log_format=log_format,
        metrics_port=port,
        metrics_host=metrics_host or "0.0.0.0",
        schedules=schedules,
    )


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages: a password is never printed)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


# -- consumer classes -----------------------------------------------------------------------------------


def load_consumer_class(target: str) -> type[AsyncConsumer] | type[Consumer]:
    """The consumer class ``pkg.module:Class`` (or ``pkg.module.Class``) names, imported with the current
    directory on ``sys.path``; ConfigurationError naming ``target`` when it does not resolve to one."""
    module_name, sep, attribute = target.partition(":")
    if not sep:
        module_name, _, attribute = target.rpartition(".")
    if not module_name or not attribute:
        raise ConfigurationError(f"{target!r} is not an import path: write pkg.module:ConsumerClass")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} (from {target!r}): {exc}") from exc
    except Exception as exc:
        raise ConfigurationError(f"importing {module_name!r} (from {target!r}) failed: {exc!r}") from exc
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r} (from {target!r})") from None
    if not (isinstance(obj, type) and issubclass(obj, (AsyncConsumer, Consumer))):
        raise ConfigurationError(f"{target!r} is not a consumer class (an AsyncConsumer or Consumer subclass)")
    if inspect.isabstract(obj):
        raise ConfigurationError(f"{target!r} is abstract: implement run(job)")
    return obj


def build_consumer(cls: type[AsyncConsumer] | type[Consumer], target: str) -> tuple[AsyncConsumer, JobSchema | None]:
    """An instance of ``cls`` as the async consumer the worker runs (a sync Consumer's ``.aio``), and the
    schema to register. ``cls()`` when its ``__init__`` takes no argument, else ``cls(queue)`` with its
    ``queue`` class attribute, or its ``schema``'s name."""
    schema = getattr(cls, "schema", None)
    if schema is not None and not isinstance(schema, JobSchema):
        raise ConfigurationError(
            f"{target}: the schema class attribute must be a JobSchema, not {type(schema).__name__}"
        )
    queue = getattr(cls, "queue", None)
    if queue is not None and not isinstance(queue, str):
        raise ConfigurationError(f"{target}: the queue class attribute must be a str, not {type(queue).__name__}")
    if queue is None and schema is not None:
        queue = schema.name
    try:
        inspect.signature(cls).bind()
        no_arguments = True
    except TypeError:
        no_arguments = False
    try:
        if no_arguments:
            instance = cls()  # type: ignore[call-arg]
        elif queue is None:
            raise ConfigurationError(
                f"{target}: name the queue as a class attribute (queue = 'name', or schema = a JobSchema), "
                "or give the class an __init__ taking no argument"
            )
        else:
            instance = cls(queue)
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"{target}: constructing the consumer failed: {exc!r}") from exc
    consumer = instance.aio if isinstance(instance, Consumer) else instance
    return consumer, schema


# -- one worker process ---------------------------------------------------------------------------------


def run_worker(config: WorkerConfig) -> int:
    """Run one worker process on this thread's new event loop until a shutdown signal; its exit code."""
    try:
        classes = [(load_consumer_class(target), target) for target in config.targets]
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    try:
        return asyncio.run(_serve(config, classes))
    except ConfigurationError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    except BackendRefusedError as exc:
        logger.error("the broker at %s refused the worker: %s", mask_url(config.url), exc)
        return EXIT_REFUSED
    except Exception:
        logger.exception("worker %d failed", os.getpid())
        return EXIT_FAILED


async def _serve(config: WorkerConfig, classes: Sequence[tuple[type[AsyncConsumer] | type[Consumer], str]]) -> int:
    hooks: list[Hook] = list(default_hooks())  # tracing when OpenTelemetry is installed, as any orchestrator
    metrics: Any = None
    if config.metrics_port is not None or config.metrics_child:
        metrics = _metrics_module()
        hooks.append(metrics.PrometheusHook())
    orchestrator = AsyncOrchestrator(config.url, hooks=hooks)
    try:
        built = [build_consumer(cls, target) for cls, target in classes]
        consumers = [consumer for consumer, _ in built]
        for consumer in consumers:
            consumer.connect(orchestrator)
        request = ShutdownRequest()
        with loop_signals(request):
            return await _consume(config, orchestrator, built, request, metrics)
    finally:
        with contextlib.suppress(BackendError):
            await orchestrator.close(grace=0.0)


async def _consume(
    config: WorkerConfig,
    orchestrator: AsyncOrchestrator,
    built: Sequence[tuple[AsyncConsumer, JobSchema | None]],
    request: ShutdownRequest,
    metrics: Any,
) -> int:
    consumers = [consumer for consumer, _ in built]
    where = orchestrator.backend.describe()

    async def start() -> bool:
        for consumer, schema in built:
            if schema is not None:
                await orchestrator.register(schema)
            await orchestrator.ensure_queue(consumer.queue_name)
        return True

    if await retry_until_ready(start, f"worker starting on {where}", request, interruptible=True) is None:
        logger.info("worker stopped before it started consuming")
        return EXIT_OK
    helpers: list[asyncio.Task[None]] = []
    schedules = config.schedules and orchestrator.backend.capabilities.schedules != "none"
    if schedules:
        helpers.append(asyncio.create_task(orchestrator.run_schedules()))
    if config.parent_pid is not None:
        helpers.append(asyncio.create_task(_watch_parent(config.parent_pid, request)))
    server = None
    if config.metrics_port is not None and metrics is not None:
        broker_ok = [True]
        helpers.append(asyncio.create_task(_probe_broker(orchestrator, consumers[0].queue_name, broker_ok)))
        server = metrics.serve(
            config.metrics_port,
            host=config.metrics_host,
            health=lambda: broker_ok[0] and all(consumer.consuming for consumer in consumers),
        )
    logger.info(
        "worker %d consuming %s on %s (concurrency %d, shutdown timeout %gs, schedules %s)",
        os.getpid(),
        ", ".join(repr(consumer.queue_name) for consumer in consumers),
        where,
        config.concurrency,
        config.shutdown_timeout,
        "on" if config.schedules else "off",
    )
    try:
        await run_until_signalled(
            consumers, concurrency=config.concurrency, shutdown_timeout=config.shutdown_timeout, request=request
        )
    finally:
        if schedules:
            await orchestrator.stop_schedules()
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if server is not None:
            server.close()
    logger.info("worker %d stopped", os.getpid())
    return EXIT_OK


def _metrics_module() -> Any:
    """``mindtrace.jobs.metrics``, imported only for ``--metrics-port``; ConfigurationError when it cannot be."""
    try:
        return importlib.import_module("mindtrace.jobs.metrics")
    except ImportError as exc:
        raise ConfigurationError(f"--metrics-port needs mindtrace.jobs.metrics, which does not import: {exc}") from exc


async def _watch_parent(parent: int, request: ShutdownRequest) -> None:
    """A child of ``--processes``: shut down when the parent is gone (killed without forwarding a signal)."""
    while not request.requested:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            logger.warning("worker %d: its parent process %d is gone, shutting down", os.getpid(), parent)
            request.request()


async def _probe_broker(orchestrator: AsyncOrchestrator, queue: str, ok: list[bool]) -> None:
    """For ``/healthz``: whether the broker answered a cheap question within the probe interval."""
    while True:
        try:
            await asyncio.wait_for(orchestrator.backend.queue_exists(queue), _PROBE_INTERVAL)
            ok[0] = True
        except (BackendError, asyncio.TimeoutError):
            ok[0] = False
        await asyncio.sleep(_PROBE_INTERVAL)


# -- several worker processes ---------------------------------------------------------------------------


def _child_main(config: WorkerConfig) -> None:
    """A ``--processes`` child (started with spawn): a worker of its own, in its own process group, so a
    terminal's Ctrl-C reaches it once, forwarded by the parent, not twice."""
    os.setpgid(0, 0)
    configure_logging(config.log_level, config.log_format)
    sys.exit(run_worker(config))


def supervise(config: WorkerConfig) -> int:
    """Start ``config.processes`` worker processes with spawn, forward SIGTERM and SIGINT to them and wait.

    Exit code: 0 when every child exited 0, else the first non-zero one (128 + n for a child killed by signal
    n; 1 for a child that exited 0 unasked). A child that exits before any signal is logged and the others are
    stopped (no restart: the supervisor,
    systemd or Kubernetes, restarts the whole worker). Children still running ``shutdown_timeout + 5`` s
    after the signal are killed.
    """
    for target in config.targets:  # fail here, once, rather than in every child
        try:
            load_consumer_class(target)
        except ConfigurationError as exc:
            logger.error("%s", exc)
            return EXIT_CONFIG
    if config.metrics_port is not None:
        try:
            metrics: Any = _metrics_module()
        except ConfigurationError as exc:
            logger.error("%s", exc)
            return EXIT_CONFIG
        directory = metrics.prepare_multiprocess()
        logger.info("metrics of %d processes collected in %s", config.processes, directory)
    child = dataclasses.replace(
        config, processes=1, metrics_port=None, metrics_child=config.metrics_port is not None, parent_pid=os.getpid()
    )
    context = multiprocessing.get_context("spawn")  # never fork: CUDA, threads and open sockets do not survive it
    children = [
        context.Process(target=_child_main, args=(child,), name=f"mindtrace-jobs-worker-{n}")
        for n in range(config.processes)
    ]
    signalled_at: list[float] = []
    told: set[int] = set()  # pids of the children a signal was forwarded to

    def forward(signum: int, frame: FrameType | None) -> None:
        signalled_at.append(time.monotonic())
        told.update(_signal_children(children, signum))

    previous = {sig: signal.signal(sig, forward) for sig in SHUTDOWN_SIGNALS}
    server = None
    try:
        for process in children:
            process.start()
        if signalled_at:  # a signal came while children were starting: those started after it did not get it
            _signal_children([process for process in children if process.pid not in told], signal.SIGTERM)
        logger.info("started %d worker processes: %s", len(children), ", ".join(str(p.pid) for p in children))
        if config.metrics_port is not None:
            server = metrics.serve(
                config.metrics_port, host=config.metrics_host, health=lambda: all(p.is_alive() for p in children)
            )
        return _wait_for(children, config.shutdown_timeout, signalled_at)
    finally:
        if server is not None:
            server.close()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_children(children: Sequence[multiprocessing.process.BaseProcess], signum: int) -> list[int]:
    """Send ``signum`` to every child alive; the pids it went to."""
    alive = [process.pid for process in children if process.is_alive() and process.pid is not None]
    logger.warning("sending %s to %d worker process(es)", signal.Signals(signum).name, len(alive))
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return alive


def _wait_for(children: Sequence[multiprocessing.process.BaseProcess], grace: float, signalled_at: list[float]) -> int:
    running = {process.sentinel: process for process in children}
    first_failure = EXIT_OK
    killed = False
    while running:
        for sentinel in multiprocessing.connection.wait(list(running), timeout=0.5):
            process = running.pop(sentinel)  # type: ignore[arg-type]
            process.join()
            code = process.exitcode or 0
            if code < 0:
                code = 128 - code
            if code != EXIT_OK and first_failure == EXIT_OK:
                first_failure = code
            if not signalled_at:
                logger.error(
                    "worker process %s exited unexpectedly with code %d: stopping the others", process.pid, code
                )
                if first_failure == EXIT_OK:  # even a clean exit, unasked, is a failure of the whole worker
                    first_failure = code or EXIT_FAILED
                signalled_at.append(time.monotonic())
                _signal_children(children, signal.SIGTERM)
            else:
                logger.info("worker process %s exited with code %d", process.pid, code)
        if running and signalled_at and not killed and time.monotonic() - signalled_at[0] > grace + _KILL_AFTER:
            logger.error(
                "%d worker process(es) still running %.0fs after the signal: killing them",
                len(running),
                grace + _KILL_AFTER,
            )
            for process in running.values():
                process.kill()
            killed = True
    return first_failure
