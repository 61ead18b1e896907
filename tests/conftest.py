"""Test-wide settings: the shipped pytest plugin, and SIGINT as Python sets it. (asyncio debug mode is opt-in: see
README, Running the tests.)"""

from __future__ import annotations

import signal

import pytest

#: Our own suite uses the opt-in plugin it ships (tests/jobs/test_user_flows.py), so the plugin cannot drift.
pytest_plugins = ["mindtrace.jobs.testing"]


def pytest_configure(config: pytest.Config) -> None:
    """A shell runs a background job (``pytest ... &``) with SIGINT ignored, and the processes it starts inherit
    that: the Ctrl-C tests' subprocesses would never see their SIGINT. Take it back, so they start with it."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
