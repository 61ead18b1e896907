"""RabbitMQ conditions that need their own words: refusals, an unreachable broker, resource alarms, consumer_timeout.

Each function turns what the driver saw into the error (or log line) a user can act on, without any I/O:
the RabbitMQ client calls them at its boundary. Kept apart from the client so that each condition is one
small, testable piece.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from aiormq import spec
from aiormq.exceptions import (
    AuthenticationError,
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ConnectionNotAllowed,
    InvalidFrameError,
    ProbableAuthenticationError,
)

from mindtrace.jobs.backends._endpoint import Endpoint
from mindtrace.jobs.errors import BackendRefusedError, BackendUnavailableError
from mindtrace.jobs.wire import peek_job_id

logger = logging.getLogger("mindtrace.jobs")


# -- refusals ----------------------------------------------------------------------------------------


#: Connection.Close reply codes that answer "no" rather than "gone": NOT_ALLOWED (vhost missing or refused),
#: ACCESS_REFUSED, INVALID_PATH.
_REFUSAL_CODES = frozenset({530, 403, 402})


def _close_frame(error: BaseException) -> spec.Connection.Close | None:
    """The Connection.Close frame the broker answered a handshake step with, if the driver saw one.

    aiormq reports a Close frame received instead of Connection.OpenOk as an InvalidFrameError whose text
    only shows the frame's repr; aiormq 6 passes the frame as an argument, aiormq 7 leaves it (reply code and
    text) a local of the driver's function that raised.
    """
    for argument in error.args:  # aiormq 6 passes the frame along
        if isinstance(argument, spec.Connection.Close):
            return argument
    for frame, _ in traceback.walk_tb(error.__traceback__):
        candidate = frame.f_locals.get("frame")
        if isinstance(candidate, spec.Connection.Close):
            return candidate
    return None


def refusal(error: BaseException, endpoint: Endpoint) -> BackendRefusedError | None:
    """The BackendRefusedError for a broker that answered and refused, or None when ``error`` is not one
    (a boundary translator).

    Refused are: the login (``credentials``: wrong user name or password; the password is never named), the
    vhost (``vhost``: it does not exist), access to the vhost or to a resource in it (``permissions``).
    """
    backend, username, virtual_host = endpoint.describe(), endpoint.username, endpoint.path
    if isinstance(error, (AuthenticationError, ProbableAuthenticationError)):
        return endpoint.refused(
            f"{backend} refused the credentials of user {username!r} (wrong user name or password, or the user may "
            f"not log in from here): {error}",
            refused="credentials",
            reason=str(error),
        )
    if isinstance(error, ChannelAccessRefused):
        return endpoint.refused(
            f"{backend} refused user {username!r} an operation in vhost {virtual_host!r} (missing configure, "
            f"write or read permission): {error}",
            refused="permissions",
            reason=str(error),
        )
    reason: str | None = None
    if isinstance(error, ConnectionNotAllowed):
        reason = str(error)
    elif isinstance(error, InvalidFrameError):
        frame = _close_frame(error)
        if frame is not None:
            reason = str(frame.reply_text or f"reply code {frame.reply_code}")
        elif "Connection.Close" in str(error):
            reason = "the broker closed the connection when asked to open the vhost"
    else:  # aiormq 6.8-6.9 raise pamqp's AMQPInternalError with the Close frame as an argument
        frame = _close_frame(error)
        if frame is not None and frame.reply_code in _REFUSAL_CODES:
            reason = str(frame.reply_text or f"reply code {frame.reply_code}")
    if reason is None:
        return None
    if "not found" in reason:
        refused, what = "vhost", f"vhost {virtual_host!r} does not exist"
    elif "refused for user" in reason or "access to vhost" in reason:
        refused, what = "permissions", f"user {username!r} has no permissions on vhost {virtual_host!r}"
    else:
        refused, what = "vhost", f"vhost {virtual_host!r} cannot be opened by user {username!r}"
    return endpoint.refused(f"{backend} refused: {what} ({reason})", refused=refused, reason=reason)


# -- an unreachable broker ---------------------------------------------------------------------------


def unreachable(error: BaseException | None, endpoint: Endpoint, *, timeout: float) -> BackendUnavailableError:
    """The BackendUnavailableError for a connect that failed or did not finish within ``timeout`` s."""
    tried = f"TCP connect, AMQP handshake, login as {endpoint.username!r} and open of vhost {endpoint.path!r}"
    if error is None or isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        what = f"no answer within connect_timeout={timeout:g}s"
    else:
        detail = str(error) or "(no detail)"
        what = f"{type(error).__name__}: {detail}"
    return endpoint.unavailable(f"cannot reach {endpoint.describe()} ({tried}): {what}")


# -- resource alarms ---------------------------------------------------------------------------------


class BlockedState:
    """Whether the broker has blocked a connection (a memory or disk alarm), and the reason it gave.

    RabbitMQ sends ``connection.blocked`` (with a reason such as "low on memory") to a connection that
    publishes during a resource alarm and stops reading from it, and ``connection.unblocked`` when the
    alarm clears. aiormq only logs them; ``watch`` wraps its two handlers on the connection (again after
    every reconnect) to keep the state here. A driver without those handlers leaves the state unknown (never
    blocked), which only makes error messages less precise.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def blocked(self) -> bool:
        """Whether the broker said the connection is blocked and has not unblocked it since."""
        return self.reason is not None

    def watch(self, connection: Any) -> None:
        """Track the aio-pika robust ``connection``: now, and after each reconnect."""
        self._hook(connection)
        connection.reconnect_callbacks.add(self._on_reconnect)

    def _on_reconnect(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        self._hook(connection)

    def _hook(self, connection: Any) -> None:
        self.reason = None  # a new connection starts unblocked
        transport = getattr(connection, "transport", None)
        underlay = getattr(transport, "connection", None)
        if underlay is None:
            return
        self._wrap(underlay, "_Connection__handle_connection_blocked", self._on_blocked)
        self._wrap(underlay, "_Connection__handle_connection_unblocked", self._on_unblocked)

    @staticmethod
    def _wrap(underlay: Any, name: str, record: Callable[[Any], None]) -> None:
        original = getattr(underlay, name, None)
        if original is None or getattr(original, "_mindtrace_wrapped", False):
            return

        async def handler(frame: Any) -> None:
            record(frame)
            await original(frame)

        handler._mindtrace_wrapped = True  # type: ignore[attr-defined]
        setattr(underlay, name, handler)

    def _on_blocked(self, frame: Any) -> None:
        self.reason = str(getattr(frame, "reason", None) or "no reason given")

    def _on_unblocked(self, frame: Any) -> None:
        self.reason = None


def blocked_detail(state: BlockedState) -> str | None:
    """What a publish error says while the broker blocks publishing, or None when it does not."""
    if state.reason is None:
        return None
    return (
        f"the broker is blocking publishes because of a resource alarm ({state.reason}); the job may have been "
        "queued and will be confirmed once the alarm clears, so check before publishing it again"
    )


# -- consumer_timeout --------------------------------------------------------------------------------


def is_consumer_timeout(error: BaseException | None) -> bool:
    """Whether a channel was closed because a delivery on it stayed unacked longer than ``consumer_timeout``."""
    return (
        isinstance(error, ChannelPreconditionFailed) and "acknowledgement" in str(error) and "timed out" in str(error)
    )


def log_consumer_timeout(queue: str, job_ids: Iterable[str | None], error: BaseException) -> None:
    """Log, as an error, that the broker took jobs back from a closed channel because of ``consumer_timeout``."""
    ids = ", ".join(repr(job_id) for job_id in job_ids) or "(none held)"
    logger.error(
        "RabbitMQ closed a channel of queue %r (PRECONDITION_FAILED: consumer_timeout): job %s ran longer than "
        "the broker's consumer_timeout without being acked, so the broker took it back and will deliver it "
        "again; its late ack will raise LeaseLostError. Raise consumer_timeout (rabbitmq.conf, or the "
        "consumer-timeout policy / x-consumer-timeout queue argument on RabbitMQ 3.12+) above your longest "
        "job. Broker said: %s",
        queue,
        ids,
        error,
    )


def message_job_id(message_id: str | None, body: bytes) -> str | None:
    """The job id of a delivered message: its ``message_id`` property, else the ``id`` in its body."""
    return message_id or peek_job_id(body)
