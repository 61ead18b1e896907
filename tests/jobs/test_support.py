"""The test-support helpers themselves: probes that leave nothing open behind them."""

from __future__ import annotations

import gc
import socket
import warnings
from pathlib import Path

import pytest

from tests.jobs.support import servers


def _resource_warnings_of(probe: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callable(probe)
        assert probe() is False
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_docker_probe_without_a_daemon_leaves_no_socket_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A socket file nobody listens on (a daemon that died), and a path with no socket at all.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(stale))
        for host in (f"unix://{stale}", f"unix://{tmp_path / 'absent.sock'}", f"tcp://127.0.0.1:{servers.free_port()}"):
            monkeypatch.setenv("DOCKER_HOST", host)
            assert _resource_warnings_of(servers.docker_available) == [], host
