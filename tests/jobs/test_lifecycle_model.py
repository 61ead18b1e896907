"""The lifecycle model without a broker: the merge rule of JobInfo.apply, StateUpdate's flat form, handles as ids."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mindtrace.jobs import AsyncOrchestrator, JobStatus, LocalClient, Progress
from mindtrace.jobs.lifecycle import JobInfo, StateUpdate

STATUSES = [s for s in JobStatus if s is not JobStatus.UNKNOWN]


def _update(status: JobStatus, kind: str = "status", **fields: object) -> StateUpdate:
    return StateUpdate("j", status, kind=kind, **fields)  # type: ignore[arg-type]


def test_a_terminal_record_never_changes_but_by_a_new_publish() -> None:
    done = JobInfo.new("q", _update(JobStatus.QUEUED, "published")).apply(
        _update(JobStatus.SUCCEEDED, output='{"y": 1}', ttl=60)
    )
    for late in (_update(JobStatus.RUNNING), _update(JobStatus.FAILED, error="late"), _update(JobStatus.CANCELLED)):
        assert done.apply(late) is done
    assert done.apply(_update(JobStatus.RUNNING, "progress", progress=Progress(0.5))) is done
    assert done.apply(_update(JobStatus.UNKNOWN, "withdrawn")) is done
    again = done.apply(_update(JobStatus.QUEUED, "published"))
    assert again.status is JobStatus.QUEUED and again.output is None


def test_statuses_move_in_store_order_and_keep_what_an_update_does_not_say() -> None:
    info = JobInfo.new("q", _update(JobStatus.QUEUED, "published", schema="s", at=10.0))
    info = info.apply(_update(JobStatus.RUNNING, attempts=1, worker="w1", at=11.0))
    info = info.apply(_update(JobStatus.RETRYING, attempts=1, error="boom", at=12.0))
    info = info.apply(_update(JobStatus.RUNNING, attempts=2, worker="w2", at=13.0))
    assert (info.status, info.attempts, info.worker, info.schema) == (JobStatus.RUNNING, 2, "w2", "s")
    assert info.enqueued_at is not None and info.enqueued_at.timestamp() == 10.0
    info = info.apply(_update(JobStatus.SUCCEEDED, attempts=2, output='{"y": 2}', ttl=5.0, at=14.0))
    assert info.output == {"y": 2} and info.terminal
    assert info.expires_at is not None and info.expires_at.timestamp() == 19.0
    assert info.expired(now=19.0) and not info.expired(now=18.9)


def test_progress_applies_only_while_running_and_cancel_only_flags() -> None:
    queued = JobInfo.new("q", _update(JobStatus.QUEUED, "published"))
    assert queued.apply(_update(JobStatus.RUNNING, "progress", progress=Progress(0.3))) == queued
    running = queued.apply(_update(JobStatus.RUNNING, attempts=1))
    flagged = running.apply(_update(JobStatus.UNKNOWN, "cancel", reason="user"))
    assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested and flagged.reason == "user"
    progressed = flagged.apply(_update(JobStatus.RUNNING, "progress", progress=Progress(0.3, {"loss": 1.5})))
    assert progressed.progress == Progress(0.3, {"loss": 1.5}) and progressed.cancel_requested


@given(
    st.lists(
        st.builds(
            StateUpdate,
            job_id=st.just("j"),
            status=st.sampled_from(STATUSES),
            at=st.floats(0, 1e9),
            attempts=st.integers(0, 5),
            error=st.none() | st.text(max_size=5),
            output=st.none() | st.just('{"a": 1}'),
            kind=st.sampled_from(["published", "status", "progress", "cancel", "withdrawn"]),
            progress=st.none() | st.builds(Progress, st.none() | st.floats(0, 1)),
        ).map(lambda u: replace(u, status=JobStatus.QUEUED) if u.kind == "published" else u),
        max_size=12,
    )
)
def test_updates_round_trip_their_flat_form_and_fold_the_same(updates: list[StateUpdate]) -> None:
    direct = flat = JobInfo(job_id="j", queue="q")
    for update in updates:
        again = StateUpdate.from_fields(json.loads(json.dumps(update.to_fields())))
        assert again == update
        direct, flat = direct.apply(update), flat.apply(again)
        if direct.terminal:
            assert direct.finished_at is not None
    assert direct == flat


async def test_a_handle_is_its_job_id_and_pickles_as_one() -> None:
    async with AsyncOrchestrator(LocalClient()) as orchestrator:
        handle = orchestrator.job("abc", "q")
        assert handle == "abc" and isinstance(handle, str) and handle.id == "abc" and handle.queue == "q"
        assert {handle: 1}["abc"] == 1 and json.dumps([handle]) == '["abc"]'
        copied = pickle.loads(pickle.dumps(handle))
        assert copied == "abc" and type(copied) is str
        assert await handle.status() is JobStatus.UNKNOWN


async def test_bad_ids_and_options_are_typed_errors() -> None:
    from mindtrace.jobs import ConfigurationError, InvalidQueueNameError, JobValidationError

    with pytest.raises(ConfigurationError, match="result_ttl"):
        AsyncOrchestrator(LocalClient(), result_ttl=0)
    with pytest.raises(ConfigurationError, match="max_result_bytes"):
        AsyncOrchestrator(LocalClient(), max_result_bytes=-1)
    async with AsyncOrchestrator(LocalClient()) as orchestrator:
        with pytest.raises(JobValidationError, match="job id"):
            orchestrator.job("", "q")
        with pytest.raises(InvalidQueueNameError):
            orchestrator.job("a", "bad name")
        with pytest.raises(ConfigurationError, match="result_ttl of queue 'q'"):
            await orchestrator.declare_queue("q", result_ttl=-5)
