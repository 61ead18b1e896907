"""Conformance: every backend declares its capabilities, and the ones the contract can see hold."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mindtrace.jobs import UsageError
from mindtrace.jobs.backends.base import Backend, Capabilities
from mindtrace.jobs.constants import MAX_PRIORITY, MIN_PRIORITY
from tests.jobs.conformance.models import image_schema, make_job
from tests.jobs.support.api import Api


def test_every_backend_declares_its_capabilities(backend_factory: Callable[[], Backend]) -> None:
    capabilities = backend_factory().capabilities
    assert isinstance(capabilities, Capabilities)
    assert capabilities.priority_levels == MAX_PRIORITY - MIN_PRIORITY + 1
    assert capabilities.lease_timeout is None or capabilities.lease_timeout > 0
    assert capabilities.max_delay is None or capabilities.max_delay > 0
    assert capabilities.queued_job_removal in ("remove", "tombstone", "none")
    assert isinstance(capabilities.unique_job_ids, bool)  # test_unique_ids.py checks what it says


async def test_job_records_capability_says_whether_handles_can_be_followed(api: Api, queue: str) -> None:
    """Where ``job_records`` is False, a handle's methods raise UsageError naming the backend and the
    capability (never a wrong status); where it is True, the record of a published job reads QUEUED."""
    schema = image_schema(queue)
    await api.register(schema)
    handle = await api.publish(queue, make_job(schema))
    orchestrator = api.orchestrator
    aio = getattr(orchestrator, "aio", orchestrator)
    if aio.records:
        info = await api.run_on_loop(aio.job_info(str(handle), queue))
        assert info.status.value == "queued"
        return
    with pytest.raises(UsageError, match="job_records"):
        await api.run_on_loop(aio.job_info(str(handle), queue))
    assert await api.count_queue_messages(queue) == 1  # the job itself is queued as ever
