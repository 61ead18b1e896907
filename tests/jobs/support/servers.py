"""Finding and starting brokers for tests: environment URL, then testcontainers, then a local server."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_available() -> bool:
    """Whether a Docker daemon answers (testcontainers needs one). Leaves no socket open, whatever the answer.

    An unclosed socket is a ResourceWarning, which filterwarnings = error turns into the failure of whichever
    test runs when it is collected. docker-py leaks two: its unix-socket connection does not close a socket
    whose connect() failed (no daemon behind the path), and ``docker.from_env()`` raising on an absent daemon
    never closes its client. So a unix socket is first tried here with a socket of our own; the client is built
    with a fixed API version (building it sends nothing), asks the unversioned ``/version`` endpoint (what
    ``from_env()`` does to pick a version), and is closed whatever happens.
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if host.startswith("unix://"):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(host[len("unix://") :])
        except OSError:
            return False
    elif shutil.which("docker") is None:
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.APIClient(
            version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=2, **docker.utils.kwargs_from_env()
        )
    except Exception:
        return False
    try:
        client.version(api_version=False)
        return True
    except Exception:
        return False
    finally:
        client.close()


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway certificate authority and a server certificate it signed for 127.0.0.1 and localhost."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a CA and a server certificate for 127.0.0.1/localhost into ``directory``, with the openssl CLI.

    EC P-256 keys (fast to make), valid two days, with the extensions strict verifiers ask for (key usage,
    subject and authority key identifiers), so a client trusting only ``ca`` verifies the server fully.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is not on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")
    ca_key, request, extensions = directory / "ca.key", directory / "server.csr", directory / "server.ext"
    extensions.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyAgreement\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [openssl, "req", "-x509", *new_key, "-keyout", ca_key, "-out", files.ca, "-days", "2",
         "-subj", "/CN=mindtrace-jobs test CA",
         "-addext", "basicConstraints = critical, CA:TRUE",
         "-addext", "keyUsage = critical, keyCertSign, cRLSign",
         "-addext", "subjectKeyIdentifier = hash"],
        [openssl, "req", *new_key, "-keyout", files.key, "-out", request, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", request, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", files.cert, "-days", "2", "-extfile", extensions],
    ]  # fmt: skip
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=30)
    return files


@dataclass
class RedisServer:
    """A redis-server process of our own on a loopback port, in a temporary directory.

    With ``tls``, the server listens for TLS only (``rediss://``) on ``port``, without asking for client
    certificates.
    """

    port: int = field(default_factory=free_port)
    appendonly: bool = False
    appendfsync: str = "everysec"
    extra: tuple[str, ...] = ()
    tls: TlsFiles | None = None
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mindtrace-redis-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        if self.tls is None:
            listen = ["--port", str(self.port)]
        else:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert),
                "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            binary,
            "--bind", "127.0.0.1",
            *listen,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--protected-mode", "no",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop(kill=True)  # not left running for the garbage collector (a ResourceWarning)
                raise RuntimeError("redis-server did not start in time")
            time.sleep(0.05)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(10)
        self.process = None

    def restart(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``) and start it again on the same port and data."""
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)


def rabbitmq_server_command() -> str | None:
    """The ``rabbitmq-server`` script that runs a node as the calling user, or None if RabbitMQ is not installed.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the ``rabbitmq`` user (or refuses to
    run): use the script it wraps instead.
    """
    found = shutil.which("rabbitmq-server") or shutil.which("rabbitmq-server", path="/usr/sbin:/usr/local/sbin")
    candidates = [Path("/usr/lib/rabbitmq/bin/rabbitmq-server")]
    if found is not None:
        resolved = Path(found).resolve()
        wrapped = resolved.parent / "rabbitmq-server" if resolved.name == "rabbitmq-script-wrapper" else resolved
        candidates.insert(0, wrapped)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@dataclass
class RabbitMQNode:
    """A RabbitMQ node of our own: its own node name, loopback ports, data directory and Erlang cookie.

    Everything lives under a temporary directory: data (mnesia), logs, config, an empty enabled-plugins list
    (no management plugin) and a HOME holding the node's own Erlang cookie, so neither the machine's node nor
    the user's ``~/.erlang.cookie`` is touched. The node registers with the machine's epmd (starting one, bound
    to 127.0.0.1, if none runs). ``stop()`` stops it gracefully (SIGTERM: the broker closes connections and
    flushes) or kills it (SIGKILL); ``start()`` again recovers its durable queues and persistent messages.
    With ``tls``, the node also listens for AMQPS on ``tls_port`` (no client certificate asked for). Starting
    takes about 5 s (measured: 4.4-4.6 s on a 2-core machine, first start or restart alike). ``config`` adds
    lines to its rabbitmq.conf (``consumer_timeout = 3000``, say), ``erl_args`` to its Erlang VM's arguments
    (``-rabbit channel_tick_interval 500``); ``ctl(...)`` runs rabbitmqctl against it.
    """

    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    config: tuple[str, ...] = ()
    erl_args: tuple[str, ...] = ()
    tls_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"mtj-{secrets.token_hex(4)}@localhost")
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mindtrace-rabbitmq-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``amqp://`` URL of the node (guest may log in: the port is on loopback)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        """``amqps://`` URL of the node's TLS listener (only with ``tls``)."""
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/"

    def _write_files(self) -> dict[str, str]:
        """Config, plugin list, cookie and environment of the node; returns the environment to start it with."""
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        config = [f"listeners.tcp.1 = 127.0.0.1:{self.port}"]
        if self.tls is not None:
            config += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.tls.ca}",
                f"ssl_options.certfile = {self.tls.cert}",
                f"ssl_options.keyfile = {self.tls.key}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        config += list(self.config)
        (self.directory / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one
        return {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.directory / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_PID_FILE": str(self.directory / "node.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": " ".join(
                ("-kernel inet_dist_use_interface {127,0,0,1}", *self.erl_args)
            ),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 60.0) -> RabbitMQNode:
        """Start the node and wait until it accepts AMQP (and AMQPS) connections."""
        command = rabbitmq_server_command()
        if command is None:
            raise RuntimeError("rabbitmq-server is not installed")
        env = self._write_files()
        (self.directory / "node.pid").unlink(missing_ok=True)
        with open(self.directory / "node.out", "ab") as output:
            # A session of its own: a Ctrl-C meant for pytest does not reach the node, and stop() reaches it all.
            self.process = subprocess.Popen(
                [command],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        ports = [self.port] + ([self.tls_port] if self.tls is not None else [])
        while not all(port_open("127.0.0.1", port, 0.2) for port in ports):
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"RabbitMQ node {self.name} exited while starting:\n{self.output_tail()}")
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"RabbitMQ node {self.name} did not start in {timeout:g}s:\n{self.output_tail()}")
            time.sleep(0.05)
        return self

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> args...`` as this node's owner (its cookie); returns its output."""
        command = Path(rabbitmq_server_command() or "rabbitmq-server").with_name("rabbitmqctl")
        env = {**os.environ, "HOME": str(self.directory / "home"), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        done = subprocess.run(
            [str(command), "-n", self.name, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def _beam_pid(self) -> int | None:
        try:
            return int((self.directory / "node.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the node: gracefully (SIGTERM), or SIGKILL with ``kill`` (a crash: only what is on disk stays)."""
        process, self.process = self.process, None
        if process is None:
            return
        if not kill:
            # The start script passes SIGTERM on to the Erlang VM, which stops the broker cleanly.
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            # The VM first, so that the start script (its parent) reaps it; then anything left in the session.
            beam = self._beam_pid()
            if beam is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(beam, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while port_open("127.0.0.1", self.port, 0.2) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, kill: bool = False) -> None:
        """Stop the node (gracefully, or SIGKILL with ``kill``) and start it again with the same data."""
        self.stop(kill=kill)
        self.start()

    def output_tail(self, lines: int = 30) -> str:
        """The last lines the node printed, for error messages."""
        try:
            return "\n".join((self.directory / "node.out").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def cleanup(self) -> None:
        """Kill the node and remove its directory."""
        self.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def _redis_container() -> Iterator[str]:
    from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

    with RedisContainer("redis:7") as container:
        yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


@contextlib.contextmanager
def _rabbitmq_container() -> Iterator[str]:
    from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]

    with RabbitMqContainer("rabbitmq:3.13") as container:
        port = container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{container.get_container_host_ip()}:{port}/"


@contextlib.contextmanager
def redis_url() -> Iterator[str | None]:
    """Redis for the test session: $MINDTRACE_JOBS_REDIS_URL, else Docker, else a spawned redis-server."""
    url = os.environ.get("MINDTRACE_JOBS_REDIS_URL")
    if url:
        yield url
        return
    if docker_available():
        with _redis_container() as container_url:
            yield container_url
        return
    if shutil.which("redis-server"):
        server = RedisServer()
        try:
            yield server.start().url
        finally:
            server.cleanup()
        return
    yield None


@contextlib.contextmanager
def rabbitmq_url() -> Iterator[str | None]:
    """RabbitMQ for the test session: $MINDTRACE_JOBS_AMQP_URL, else Docker, else the local server."""
    url = os.environ.get("MINDTRACE_JOBS_AMQP_URL")
    if url:
        yield url
        return
    if docker_available():
        with _rabbitmq_container() as container_url:
            yield container_url
        return
    if port_open("127.0.0.1", 5672):
        yield "amqp://guest:guest@127.0.0.1:5672/"
        return
    yield None


def namespaced(amqp_url: str, namespace: str) -> str:
    """``amqp_url`` with the query option ``schedules_namespace=namespace`` (schedules of a test's own)."""
    return f"{amqp_url}{'&' if '?' in amqp_url else '?'}schedules_namespace={namespace}"


async def delete_schedules_stream(amqp_url: str, namespace: str) -> None:
    """Delete the schedules stream of ``namespace`` on the broker at ``amqp_url`` (a test's own, when it ends)."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        with contextlib.suppress(Exception):
            await channel.queue_delete(f"{namespace}:schedules")
