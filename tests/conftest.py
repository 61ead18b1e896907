"""Test-wide settings: the shipped pytest plugin. (asyncio debug mode is opt-in: see README, Running the tests.)"""

from __future__ import annotations

#: Our own suite uses the opt-in plugin it ships (tests/jobs/test_user_flows.py), so the plugin cannot drift.
pytest_plugins = ["mindtrace.jobs.testing"]
