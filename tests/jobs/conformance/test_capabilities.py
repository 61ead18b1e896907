"""Conformance: every backend declares its capabilities, and the ones the contract can see hold."""

from __future__ import annotations

from collections.abc import Callable

from mindtrace.jobs.backends.base import Backend, Capabilities
from mindtrace.jobs.constants import MAX_PRIORITY, MIN_PRIORITY


def test_every_backend_declares_its_capabilities(backend_factory: Callable[[], Backend]) -> None:
    capabilities = backend_factory().capabilities
    assert isinstance(capabilities, Capabilities)
    assert capabilities.priority_levels == MAX_PRIORITY - MIN_PRIORITY + 1
    assert capabilities.lease_timeout is None or capabilities.lease_timeout > 0
    assert capabilities.max_delay is None or capabilities.max_delay > 0
    assert capabilities.queued_job_removal in ("remove", "tombstone", "none")
    assert isinstance(capabilities.unique_job_ids, bool)  # test_unique_ids.py checks what it says
