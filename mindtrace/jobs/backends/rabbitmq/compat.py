"""What differs between aio-pika 9 / aiormq 6 (all that Python 3.10 installs) and aio-pika 10 / aiormq 7."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any, Final

from aiormq import spec

#: aiormq 6 (aio-pika 9) lacks consumer-cancel callbacks and waits forever for the answer to a ``nowait`` call.
_AIORMQ_6: Final = int(importlib.metadata.version("aiormq").split(".")[0]) < 7

_CancelCallback = Callable[[spec.Basic.Cancel], None]


class _CancelNotifyingConsumers(dict[str, Any]):
    """aiormq 6's ``Channel.consumers`` table, calling each of ``callbacks`` when a consumer is dropped from it."""

    def __init__(self, consumers: dict[str, Any]) -> None:
        super().__init__(consumers)
        self.callbacks: set[_CancelCallback] = set()

    def pop(self, tag: str, *default: Any) -> Any:
        had = tag in self
        value = super().pop(tag, *default)
        if had:
            frame = spec.Basic.Cancel(consumer_tag=tag)
            for callback in list(self.callbacks):
                callback(frame)
        return value


def _on_consumer_cancel(underlay: Any, callback: _CancelCallback) -> None:
    """Call ``callback(frame)`` when the broker cancels a consumer of the aiormq channel ``underlay``.

    aiormq 7 (aio-pika 10, Python >= 3.11) has ``on_consumer_cancel_callbacks`` for that. aiormq 6 (aio-pika 9,
    all that Python 3.10 installs) has no hook: on the broker's basic.cancel it only drops the tag from
    ``channel.consumers``, so that table is wrapped to report the drop. It also reports the cancel-ok of a
    client basic.cancel; ``callback`` ignores tags that are not the current consumer's.
    """
    callbacks = getattr(underlay, "on_consumer_cancel_callbacks", None)
    if callbacks is None:
        consumers = underlay.consumers
        if not isinstance(consumers, _CancelNotifyingConsumers):
            consumers = underlay.consumers = _CancelNotifyingConsumers(consumers)
        callbacks = consumers.callbacks
    callbacks.add(callback)
