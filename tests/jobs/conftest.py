"""Fixtures: brokers (env URL -> testcontainers -> local server; fail in CI, skip elsewhere) and the APIs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from mindtrace.jobs import LocalClient
from mindtrace.jobs.backends.base import Backend
from tests.jobs.support import servers
from tests.jobs.support.api import Api, AsyncApi, SyncApi

#: Backends the conformance suite runs on; narrow with MINDTRACE_JOBS_BACKENDS=memory,redis. A name
#: ``<broker>+<store>`` pairs a broker with another state store (RabbitMQ with Redis records).
ALL_BACKENDS = ("memory", "redis", "rabbitmq", "rabbitmq+redis")
BACKENDS = tuple(name for name in os.environ.get("MINDTRACE_JOBS_BACKENDS", ",".join(ALL_BACKENDS)).split(",") if name)
APIS = ("async", "sync")


def pytest_configure(config: pytest.Config) -> None:
    """On aiormq 6 (aio-pika 9, all Python 3.10 installs), tolerate the driver's own leaks; see below."""
    if int(importlib.metadata.version("aiormq").split(".")[0]) < 7:
        # aiormq 6 never closes the socket of a connection the broker or the network closed (aiormq 7 does):
        # garbage collection closes it later with a ResourceWarning, which filterwarnings=error would pin on
        # whichever test runs then (and a writer coroutine it never awaits, the same way). Only these unraisable
        # warnings are let through, and only on aiormq 6.
        # (As an ini line for the tests, and in the session's filters for what is collected at the end.)
        # And our connect coroutine (with the close it awaits) that its connect never let end (the strict xfail of
        # a broker that never answers, in test_rabbitmq_conditions.py, times out with it pending): collected
        # during a later test.
        for leaked in (
            "<socket.socket",
            "<function _SelectorTransport.__del__",
            "<coroutine object Connection.__writer",
            "<coroutine object _Channels._open_connection",
            "<coroutine object RobustConnection.close",
        ):
            message = f"Exception ignored in. {re.escape(leaked)}"
            config.addinivalue_line("filterwarnings", f"ignore:{message}:pytest.PytestUnraisableExceptionWarning")
            warnings.filterwarnings("ignore", message, pytest.PytestUnraisableExceptionWarning)


def _require(url: str | None, what: str) -> str:
    if url is None:
        message = f"no {what} available (set the URL variable, run Docker, or install the server)"
        if servers.IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the Redis the tests use."""
    with servers.redis_url() as url:
        yield _require(url, "Redis server (MINDTRACE_JOBS_REDIS_URL)")


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """URL of the RabbitMQ the tests use."""
    with servers.rabbitmq_url() as url:
        yield _require(url, "RabbitMQ server (MINDTRACE_JOBS_AMQP_URL)")


def _broker_url(broker: str, request: pytest.FixtureRequest) -> str:
    if broker == "memory":
        return "memory://"
    if broker == "redis":
        return str(request.getfixturevalue("redis_url"))
    if broker == "rabbitmq":
        return str(request.getfixturevalue("amqp_url"))
    raise ValueError(f"unknown backend {broker!r}")


def _factory(name: str, request: pytest.FixtureRequest) -> Callable[[], Backend]:
    broker = name.split("+", 1)[0]
    if broker == "memory":
        return LocalClient
    url = _broker_url(broker, request)
    if broker == "redis":
        from mindtrace.jobs import RedisClient

        return lambda: RedisClient.from_url(url)
    from mindtrace.jobs import RabbitMQClient

    return lambda: RabbitMQClient.from_url(url)


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Name of the backend configuration under test (a broker, or ``<broker>+<store>``)."""
    return str(request.param)


@pytest.fixture
def backend_factory(backend_name: str, request: pytest.FixtureRequest) -> Callable[[], Backend]:
    """Makes a fresh, unconnected backend of the kind under test (the broker of a ``+`` pairing)."""
    return _factory(backend_name, request)


@pytest.fixture
def backend_url(backend_name: str, request: pytest.FixtureRequest) -> str:
    """URL of the broker under test (``memory://`` in memory), for a process of its own."""
    return _broker_url(backend_name.split("+", 1)[0], request)


@pytest.fixture
def orchestrator_options(backend_name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Keyword options of the orchestrators under test: ``state=<url>`` for a ``<broker>+<store>`` pairing,
    none (the backend's own store) otherwise."""
    if "+" not in backend_name:
        return {}
    store = backend_name.split("+", 1)[1]
    if store != "redis":
        raise ValueError(f"unknown state store {store!r} in {backend_name!r}")
    return {"state": str(request.getfixturevalue("redis_url"))}


@pytest.fixture
def queue_names() -> Iterator[list[str]]:
    """Queue names this test made (see ``queue``); the api fixture deletes them afterwards."""
    yield []


@pytest.fixture
def new_queue(queue_names: list[str]) -> Callable[[str], str]:
    """Makes a queue name no other test or run uses."""

    def make(label: str = "q") -> str:
        name = f"t-{label}-{uuid.uuid4().hex[:12]}"
        queue_names.append(name)
        return name

    return make


@pytest.fixture
def queue(new_queue: Callable[[str], str]) -> str:
    """A queue name of this test's own (not declared yet)."""
    return new_queue("q")


async def _open_api(kind: str, backend: Backend, options: dict[str, Any]) -> Api:
    return AsyncApi(backend, **options) if kind == "async" else SyncApi(backend, **options)


@contextlib.asynccontextmanager
async def _api_session(
    kind: str, factory: Callable[[], Backend], queue_names: list[str], options: dict[str, Any]
) -> AsyncIterator[Api]:
    api = await _open_api(kind, factory(), options)
    try:
        yield api
    finally:
        for name in queue_names:
            with contextlib.suppress(Exception):
                await api.delete_queue(name)
        await api.close()


@pytest.fixture(params=APIS)
async def api(
    request: pytest.FixtureRequest,
    backend_factory: Callable[[], Backend],
    queue_names: list[str],
    orchestrator_options: dict[str, Any],
) -> AsyncIterator[Api]:
    """The orchestrator under test, through the async API or the sync facade, on each backend."""
    async with _api_session(str(request.param), backend_factory, queue_names, orchestrator_options) as opened:
        yield opened


@pytest.fixture
async def async_api(
    backend_factory: Callable[[], Backend], queue_names: list[str], orchestrator_options: dict[str, Any]
) -> AsyncIterator[Api]:
    """The async API only, for behaviour that exists only there (task cancellation)."""
    async with _api_session("async", backend_factory, queue_names, orchestrator_options) as opened:
        yield opened


@pytest.fixture
def job_records(backend_factory: Callable[[], Backend], orchestrator_options: dict[str, Any]) -> None:
    """For the lifecycle tests: the configuration under test keeps job records, as its capabilities say.

    A backend whose ``capabilities.job_records`` is False (and no other store given) cannot run them: what it
    does instead (a UsageError naming it) is checked by test_capabilities.py.
    """
    backend = backend_factory()
    if not backend.capabilities.job_records and "state" not in orchestrator_options:
        pytest.skip(f"{type(backend).__name__}: capabilities.job_records is False (no state store of its own yet)")
