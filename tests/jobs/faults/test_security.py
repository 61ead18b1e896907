"""Security: no unsafe deserialisation on any path, no password in logs, reprs or errors, Redis over TLS."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import pickle
import shutil
import ssl
import subprocess
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

import mindtrace.jobs
from mindtrace.jobs import (
    AsyncConsumer,
    AsyncOrchestrator,
    BackendError,
    BackendRefusedError,
    BackendUnavailableError,
    ConfigurationError,
    Job,
    RabbitMQClient,
    RedisClient,
    UndecodableMessage,
)
from mindtrace.jobs.backends.base import Backend, OutgoingMessage
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support import servers
from tests.jobs.support.api import Api
from tests.jobs.support.proxy import TcpProxy, is_loopback

# -- no pickle, marshal, eval, exec or yaml.load anywhere in the package ----------------------------------

PACKAGE = Path(mindtrace.jobs.__file__).parent

#: Modules that turn bytes into arbitrary objects (or run code) when loading.
UNSAFE_MODULES = frozenset({"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"})
#: Builtins that run or import code named by a string.
UNSAFE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__"})
#: yaml functions that can build arbitrary objects.
UNSAFE_YAML = frozenset({"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"})


def unsafe_spots(source: str, filename: str) -> list[str]:
    """Every import of an unsafe module, call of an unsafe builtin and yaml loader call in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            top = node.module.split(".")[0]
            if top in UNSAFE_MODULES:
                found.append(f"{where} from {node.module} import ...")
            elif top == "builtins":
                found += [f"{where} from builtins import {a.name}" for a in node.names if a.name in UNSAFE_BUILTINS]
        elif isinstance(node, ast.Call):
            function = node.func
            if isinstance(function, ast.Name) and function.id in UNSAFE_BUILTINS:
                found.append(f"{where} {function.id}()")
            elif isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
                owner, name = function.value.id, function.attr
                if (owner == "builtins" and name in UNSAFE_BUILTINS) or (owner == "yaml" and name in UNSAFE_YAML):
                    found.append(f"{where} {owner}.{name}()")
    return found


def test_the_package_never_unpickles_evaluates_or_yaml_loads() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    names = {path.relative_to(PACKAGE).as_posix() for path in files}
    assert {
        "wire.py",
        "consumer.py",
        "orchestrator.py",
        "backends/redis/__init__.py",
        "backends/rabbitmq/__init__.py",
    } <= names
    found = [spot for path in files for spot in unsafe_spots(path.read_text(encoding="utf-8"), str(path))]
    assert found == []


def test_the_scan_sees_every_unsafe_form() -> None:
    planted = """
import pickle
import marshal as m
from dill import loads
from builtins import eval as evaluate
import yaml, re
pattern = re.compile("ok")             # re.compile is not the builtin: fine
value = eval("1")
exec("x = 1")
code = compile("1", "<s>", "eval")
module = __import__("os")
other = builtins.exec("1")
data = yaml.load("a: 1")
safe = yaml.safe_load("a: 1")          # fine
"""
    found = unsafe_spots(planted, "planted.py")
    lines = sorted(int(spot.split(":")[1].split()[0]) for spot in found)
    assert lines == [2, 3, 4, 5, 8, 9, 10, 11, 12, 13], found


# -- a pickle on the wire is dead-lettered, never unpickled -------------------------------------------------

UNPICKLED: list[str] = []


def _spring(label: str) -> str:
    """Called only if something unpickles a PickleTrap."""
    UNPICKLED.append(label)
    return label


class PickleTrap:
    """Unpickling this runs ``_spring``: a stand-in for a payload that would run an attacker's code."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _spring, ("unpickled",)


async def _publish_raw(api: Api, queue: str, bodies: Sequence[bytes]) -> None:
    """Put foreign bytes on a queue through the backend contract, as another client would."""
    backend: Backend = api.orchestrator.backend
    messages = [OutgoingMessage(body, 0, f"raw-{i}") for i, body in enumerate(bodies)]
    if api.kind == "sync":
        from mindtrace.jobs._loop_thread import get_loop_thread

        await asyncio.to_thread(get_loop_thread().run, backend.publish_many(queue, messages), "test")
    else:
        await backend.publish_many(queue, messages)


async def test_a_pickle_payload_is_dead_lettered_raw_and_never_unpickled(api: Api, queue: str) -> None:
    schema = image_schema(queue)
    await api.register(schema)
    bodies = [pickle.dumps(PickleTrap(), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    bodies.append(pickle.dumps(make_job(schema, 0)))  # what a pickle-based queue would send for a job
    await _publish_raw(api, queue, bodies)
    valid = make_job(schema, 1)
    await api.publish(queue, valid)
    ran: list[str] = []

    async def handler(job: Job) -> None:
        ran.append(job.id)

    assert await api.consumer(queue, handler).consume(num_messages=len(bodies) + 1) == len(bodies) + 1
    assert ran == [valid.id]
    assert UNPICKLED == []
    dead = []
    while (job := await api.receive_message(queue + ".dlq")) is not None:
        dead.append(job)
    assert UNPICKLED == []
    raws = [job.payload.input.raw for job in dead if isinstance(job.payload.input, UndecodableMessage)]
    assert sorted(raws) == sorted(bodies)
    # The trap is live: had anything unpickled a message, the check above would have seen it.
    pickle.loads(bodies[0])
    assert UNPICKLED == ["unpickled"]
    UNPICKLED.clear()


# -- passwords never show ------------------------------------------------------------------------------

#: A password no message would hold by chance, with characters that URLs must percent-encode.
PASSWORD = "Zq9:leak@canary/7731%x"

#: Loggers of the package and of the drivers, captured at DEBUG.
LOGGERS = ("", "mindtrace.jobs", "redis", "aio_pika", "aiormq", "asyncio")


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every record of the package and its drivers, from DEBUG up."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    return caplog


def _need(program: str) -> str:
    """The path of ``program``; a failure under CI=true, a skip elsewhere, when it is missing."""
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        message = f"{program} is not on PATH"
        if servers.IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return path


def assert_no_password(
    logs: pytest.LogCaptureFixture,
    errors: Sequence[BaseException],
    objects: Sequence[object],
    *,
    logged: bool = False,
) -> None:
    """The password, raw or percent-encoded, is in no log record (message, exception, stack), no error
    (message, repr, formatted chain) and no repr, str or describe() of ``objects``. ``logged``: the scenario
    must have logged something (so the capture is known to work)."""
    texts: dict[str, str] = {}
    formatter = logging.Formatter()
    for i, record in enumerate(logs.records):
        texts[f"log {i} ({record.name})"] = formatter.format(record)
    for i, error in enumerate(errors):
        texts[f"error {i}"] = "\n".join([str(error), repr(error), *traceback.format_exception(error)])
    for i, thing in enumerate(objects):
        describe = getattr(thing, "describe", None)
        texts[f"object {i}"] = "\n".join([repr(thing), str(thing), describe() if callable(describe) else ""])
    forms = {PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD)}
    leaks = [place for place, text in texts.items() if any(form in text for form in forms)]
    assert leaks == [], f"the password shows in {leaks}: {[texts[place][:300] for place in leaks]}"
    assert logs.records or not logged, "nothing was logged: the capture is not working"


async def _fail(backend: Backend) -> list[BaseException]:
    """The errors of connecting, and of publishing through an orchestrator, on a backend that must fail."""
    errors: list[BaseException] = []
    queue = f"t-secret-{uuid.uuid4().hex[:8]}"
    try:
        await backend.connect()
    except BackendError as exc:
        errors.append(exc)
    orchestrator = AsyncOrchestrator(backend)
    try:
        await orchestrator.publish(queue, make_job(image_schema(queue)))
    except BackendError as exc:
        errors.append(exc)
    await orchestrator.close()
    assert len(errors) == 2, "the broker accepted what it must refuse"
    return errors


class _Flaky(AsyncConsumer):
    """Fails every job's first run (a retry), and every run of jobs tagged ``dead`` (a dead-letter)."""

    def __init__(self, queue: str) -> None:
        super().__init__(queue, max_retries=1, retry_delay=0.01)
        self.done: list[str] = []

    async def run(self, job: Job) -> None:
        if job.attempts == 0 or "dead" in job.metadata:
            raise RuntimeError(f"job {job.id} fails")
        self.done.append(job.id)


async def _round_trip(backend: Backend) -> list[object]:
    """Every operation once on a working backend (publish, consume with a retry and a dead-letter, receive,
    requeue, delete); returns the objects whose reprs must not show the password."""
    queue = f"t-secret-{uuid.uuid4().hex[:8]}"
    async with AsyncOrchestrator(backend) as orchestrator:
        schema = image_schema(queue)
        await orchestrator.register(schema)
        try:
            jobs = [make_job(schema, i) for i in range(3)]
            await orchestrator.publish_many(queue, jobs)
            await orchestrator.publish(queue, make_job(schema, 3, metadata={"dead": True}))
            consumer = _Flaky(queue)
            consumer.connect(orchestrator)
            await asyncio.wait_for(consumer.consume(num_messages=8), 30)
            assert sorted(consumer.done) == sorted(job.id for job in jobs)
            assert await orchestrator.requeue_dead_letters(queue) == 1
            assert await orchestrator.receive_message(queue, timeout=5) is not None
            assert await orchestrator.count_queue_messages(queue) == 0
        finally:
            await orchestrator.delete_queue(queue)
        return [backend, orchestrator, consumer]


@pytest.fixture
def redis_with_password() -> Iterator[servers.RedisServer]:
    """A redis-server of this test's own that requires PASSWORD."""
    _need("redis-server")
    server = servers.RedisServer(extra=("--requirepass", PASSWORD)).start()
    try:
        yield server
    finally:
        server.cleanup()


async def test_redis_never_shows_the_password_unreachable(debug_logs: pytest.LogCaptureFixture) -> None:
    port = servers.free_port()
    clients = [
        RedisClient.from_url(f"redis://worker:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0", connection_retries=1),
        RedisClient(host="127.0.0.1", port=port, password=PASSWORD, connection_retries=1),
    ]
    errors = [error for client in clients for error in await _fail(client)]
    assert all(isinstance(error, BackendUnavailableError) for error in errors)
    assert_no_password(debug_logs, errors, clients)


async def test_redis_never_shows_a_refused_password(debug_logs: pytest.LogCaptureFixture) -> None:
    _need("redis-server")
    server = servers.RedisServer(extra=("--requirepass", "another-password")).start()
    try:
        clients = [
            RedisClient.from_url(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"),
            RedisClient(host="127.0.0.1", port=server.port, password=PASSWORD),
        ]
        started = time.monotonic()
        errors = [error for client in clients for error in await _fail(client)]
        assert time.monotonic() - started < 5, "refused credentials are not retried"
    finally:
        server.cleanup()
    assert all(isinstance(error, BackendRefusedError) and error.refused == "credentials" for error in errors)
    assert all("refused the credentials" in str(error) for error in errors)
    assert_no_password(debug_logs, errors, clients)


async def test_redis_never_shows_the_password_in_normal_use(
    redis_with_password: servers.RedisServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    port = redis_with_password.port
    objects = await _round_trip(RedisClient.from_url(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"))
    objects += await _round_trip(RedisClient(host="127.0.0.1", port=port, password=PASSWORD))
    assert_no_password(debug_logs, [], objects, logged=True)


async def test_rabbitmq_never_shows_the_password_unreachable(debug_logs: pytest.LogCaptureFixture) -> None:
    port = servers.free_port()
    clients = [
        RabbitMQClient.from_url(f"amqp://guest:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/", operation_timeout=3),
        RabbitMQClient(host="127.0.0.1", port=port, password=PASSWORD, operation_timeout=3),
    ]
    errors = [error for client in clients for error in await _fail(client)]
    assert all(isinstance(error, BackendUnavailableError) for error in errors)
    assert_no_password(debug_logs, errors, clients)


async def test_rabbitmq_refuses_a_wrong_password_as_such_and_never_shows_it(
    amqp_url: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    # A refused login is a BackendError, not BackendUnavailableError: a consumer must not wait forever for a
    # broker that answers "no" (before the fix, it retried the login every few seconds, for ever).
    parts = urlsplit(amqp_url)
    host, port, user = parts.hostname or "localhost", parts.port or 5672, parts.username or "guest"
    vhost = parts.path[1:] or "/"
    clients = [
        RabbitMQClient.from_url(f"amqp://{user}:{quote(PASSWORD, safe='')}@{host}:{port}/{quote(vhost, safe='')}"),
        RabbitMQClient(host=host, port=port, username=user, password=PASSWORD, virtual_host=vhost),
    ]
    started = time.monotonic()
    errors = [error for client in clients for error in await _fail(client)]
    assert time.monotonic() - started < 10
    assert all(not isinstance(error, BackendUnavailableError) for error in errors)
    assert all("refused the credentials" in str(error) for error in errors)
    assert_no_password(debug_logs, errors, clients)


@pytest.fixture
def rabbitmq_user(amqp_url: str) -> Iterator[tuple[str, str, int, str]]:
    """A user with PASSWORD on the test broker, made with rabbitmqctl and deleted afterwards:
    ``(user, host, port, vhost)``."""
    parts = urlsplit(amqp_url)
    host, port, vhost = parts.hostname or "localhost", parts.port or 5672, parts.path[1:] or "/"
    if not is_loopback(host):
        message = "the AMQP broker is not local: rabbitmqctl cannot add a user to it"
        if servers.IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    ctl = _need("rabbitmqctl")
    user = f"mindtrace-test-{uuid.uuid4().hex[:8]}"

    def ctl_run(*args: str) -> None:
        subprocess.run([ctl, *args], check=True, capture_output=True, timeout=60)

    ctl_run("add_user", user, PASSWORD)
    try:
        ctl_run("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield user, host, port, vhost
    finally:
        ctl_run("delete_user", user)


async def test_rabbitmq_never_shows_the_password_in_normal_use_or_reconnects(
    rabbitmq_user: tuple[str, str, int, str], debug_logs: pytest.LogCaptureFixture
) -> None:
    user, host, port, vhost = rabbitmq_user
    url = f"amqp://{user}:{quote(PASSWORD, safe='')}@{host}:{port}/{quote(vhost, safe='')}"
    objects = await _round_trip(RabbitMQClient.from_url(url))
    objects += await _round_trip(
        RabbitMQClient(host=host, port=port, username=user, password=PASSWORD, virtual_host=vhost)
    )
    # A cut connection makes the driver log its reconnect attempts, with the URL it reconnects to.
    with TcpProxy(host, port) as proxy:
        backend = RabbitMQClient(
            host="127.0.0.1", port=proxy.port, username=user, password=PASSWORD, virtual_host=vhost,
            reconnect_interval=0.1,
        )  # fmt: skip
        async with AsyncOrchestrator(backend) as orchestrator:
            queue = f"t-secret-{uuid.uuid4().hex[:8]}"
            await orchestrator.declare_queue(queue)
            errors: list[BaseException] = []
            try:
                assert proxy.cut() >= 1
                deadline = time.monotonic() + 15
                while True:  # a publish may fail while the connection is down; it works once reconnected
                    try:
                        await orchestrator.publish(queue, make_job(image_schema(queue), 1))
                        break
                    except BackendUnavailableError as exc:
                        errors.append(exc)
                        assert time.monotonic() < deadline, "no reconnect"
                        await asyncio.sleep(0.1)
                assert await orchestrator.count_queue_messages(queue) == 1
            finally:
                await orchestrator.delete_queue(queue)
        assert proxy.accepted >= 2
    assert_no_password(debug_logs, errors, [*objects, backend], logged=True)


# -- rediss:// with a certificate from the test's own CA -----------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> servers.TlsFiles:
    """A fresh CA and a server certificate it signed for 127.0.0.1 and localhost."""
    _need("openssl")
    return servers.make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: servers.TlsFiles) -> Iterator[tuple[servers.RedisServer, servers.TlsFiles]]:
    """A redis-server of this module's own, speaking TLS only, with a certificate signed by a fresh CA."""
    _need("redis-server")
    files = tls_files
    server = servers.RedisServer(tls=files).start()
    try:
        yield server, files
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def _orchestrator(backend: Backend) -> AsyncIterator[tuple[AsyncOrchestrator, str]]:
    """An orchestrator on ``backend`` with a queue of its own, deleted on exit."""
    queue = f"t-tls-{uuid.uuid4().hex[:8]}"
    async with AsyncOrchestrator(backend) as orchestrator:
        await orchestrator.register(image_schema(queue))
        try:
            yield orchestrator, queue
        finally:
            await orchestrator.delete_queue(queue)


class _Collect(AsyncConsumer):
    def __init__(self, queue: str) -> None:
        super().__init__(queue)
        self.done: list[str] = []

    async def run(self, job: Job) -> None:
        self.done.append(job.id)


async def test_rediss_with_the_ca_publishes_and_consumes(
    tls_redis: tuple[servers.RedisServer, servers.TlsFiles],
) -> None:
    server, files = tls_redis
    ca = str(files.ca)
    clients = [
        RedisClient.from_url(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={quote(ca, safe='')}"),
        RedisClient(host="localhost", port=server.port, ssl_ca_certs=ca),  # the name is checked too
    ]
    for client in clients:
        assert client.ssl and client.describe().startswith("rediss://")
        async with _orchestrator(client) as (orchestrator, queue):
            jobs = [make_job(image_schema(queue), i) for i in range(3)]
            await orchestrator.publish_many(queue, jobs)
            consumer = _Collect(queue)
            consumer.connect(orchestrator)
            assert await asyncio.wait_for(consumer.consume(num_messages=3), 30) == 3
            assert consumer.done == [job.id for job in jobs]
            assert await orchestrator.count_queue_messages(queue) == 0


async def test_rediss_without_the_ca_fails_at_once_as_untrusted(
    tls_redis: tuple[servers.RedisServer, servers.TlsFiles],
) -> None:
    server, _ = tls_redis
    with TcpProxy("127.0.0.1", server.port) as proxy:  # counts the connection attempts
        untrusting = RedisClient.from_url(f"rediss://127.0.0.1:{proxy.port}/0", connection_retries=5)  # system CAs
        with pytest.raises(BackendUnavailableError) as info:
            await untrusting.connect()
        await untrusting.close()
        assert proxy.accepted == 1, "an untrusted certificate is not retried: trying again cannot help"
    error = info.value
    assert (error.host, error.port) == ("127.0.0.1", proxy.port)
    assert "certificate verify failed" in str(error)
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(isinstance(link, ssl.SSLCertVerificationError) for link in chain)
    # Plain text against the TLS port is no silent success either.
    plain = RedisClient.from_url(f"redis://127.0.0.1:{server.port}/0", connection_retries=0, operation_timeout=3)
    with pytest.raises(BackendUnavailableError):
        await plain.connect()
    await plain.close()
    # Verification turned off on purpose connects (an explicit, documented choice).
    unverified = RedisClient.from_url(f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=none")
    await unverified.connect()
    await unverified.close()


def test_rediss_urls_take_the_tls_options(tls_files: servers.TlsFiles) -> None:
    ca = str(tls_files.ca)
    cases = {
        f"rediss://h/0?ssl_ca_certs={quote(ca, safe='')}": (True, ca, "required"),
        "rediss://h/0?ssl_cert_reqs=optional": (True, None, "optional"),
        "rediss://h/0": (True, None, "required"),
        "redis://h/0": (False, None, "required"),
    }
    for url, expected in cases.items():
        client = RedisClient.from_url(url)
        assert (client.ssl, client.ssl_ca_certs, client.ssl_cert_reqs) == expected, url
    assert RedisClient(host="h", ssl_ca_certs=ca).ssl  # a CA bundle means TLS


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PASSWORD}@h/0?ssl_ca_certs=/ca.pem",  # TLS options on a plain-text URL
        f"rediss://:{PASSWORD}@h/0?ssl_cert_reqs=maybe",
        f"rediss://:{PASSWORD}@h/0?ssl_keyfile=/k.pem",
        f"rediss://:{PASSWORD}@h/0#fragment",
        f"rediss://:{PASSWORD}@h/0?ssl_ca_certs=/no/such/ca.pem",  # a missing bundle fails now, not at connect
    ],
)
def test_bad_tls_options_are_configuration_errors_without_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RedisClient.from_url(url)
    assert PASSWORD not in str(info.value) and quote(PASSWORD, safe="") not in str(info.value)
