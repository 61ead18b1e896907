"""The consumer's decisions without a broker: RetryPolicy validation and backoff, and each Outcome rule."""

from __future__ import annotations

import math

import pytest

from mindtrace.jobs import ConfigurationError, DecodeError, Job, JobSchema, RetryPolicy, UndecodableMessage
from mindtrace.jobs.policy import (
    REDELIVERED_ERROR,
    Action,
    after_run,
    before_run,
    release,
    requeued,
    retry_refused,
    undecodable,
)
from mindtrace.jobs.wire import undecodable_job
from tests.jobs.conformance.models import image_schema, make_job

POLICY = RetryPolicy(max_retries=2, retry_delay=1.0, retry_backoff=2.0, max_retry_delay=3.0)


def job(attempts: int = 0) -> Job:
    return make_job(image_schema("q"), 1).model_copy(update={"attempts": attempts})


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": True},
        {"retry_delay": -0.1},
        {"retry_delay": math.nan},
        {"retry_delay": math.inf},
        {"retry_backoff": 0.5},
        {"max_retry_delay": -1},
        {"retry_delay": "1"},
    ],
)
def test_a_retry_policy_out_of_range_names_the_option(options: dict[str, object]) -> None:
    name = next(iter(options))
    with pytest.raises(ConfigurationError, match=name):
        RetryPolicy(**options)  # type: ignore[arg-type]


def test_options_given_replace_the_policy_fields_and_none_keeps_them() -> None:
    assert RetryPolicy.of() == RetryPolicy()
    assert RetryPolicy.of(POLICY) is POLICY
    assert RetryPolicy.of(POLICY, max_retries=5) == RetryPolicy(5, 1.0, 2.0, 3.0)
    with pytest.raises(ConfigurationError, match="retry_policy"):
        RetryPolicy.of({"max_retries": 1})  # type: ignore[arg-type]


def test_backoff_grows_per_attempt_up_to_its_cap_and_never_overflows() -> None:
    assert [POLICY.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    assert POLICY.delay(100_000) == 3.0


def test_a_run_that_returned_is_acked_unchanged() -> None:
    outcome = after_run(job(), None, POLICY)
    assert outcome.action is Action.ACK and outcome.counts


def test_a_failed_run_is_retried_with_its_delay_then_dead_lettered_and_the_input_job_is_not_modified() -> None:
    first = job()
    outcome = after_run(first, RuntimeError("boom \udcff"), POLICY)
    assert (outcome.action, outcome.delay, outcome.job.attempts) == (Action.RETRY, 1.0, 1)
    assert outcome.job.error == "RuntimeError: boom \\udcff"
    assert outcome.counts and not outcome.resumes
    assert first.attempts == 0 and first.error is None
    last = after_run(job(attempts=2), ValueError("again"), POLICY)
    assert (last.action, last.job.attempts, last.job.error) == (Action.DEAD_LETTER, 3, "ValueError: again")
    assert last.counts


def test_a_redelivery_on_a_broker_that_only_flags_it_is_recorded_and_not_counted() -> None:
    outcome = before_run(job(), 2, POLICY, counted_deliveries=False)
    assert (outcome.action, outcome.job.attempts, outcome.job.error) == (Action.RETRY, 1, REDELIVERED_ERROR)
    assert outcome.resumes and outcome.delay == 0 and not outcome.counts
    over = before_run(job(attempts=2), 2, POLICY, counted_deliveries=False)
    assert over.action is Action.DEAD_LETTER and over.job.attempts == 3 and over.counts
    assert before_run(job(), 1, POLICY, counted_deliveries=False).action is Action.RUN


def test_counted_deliveries_over_the_budget_dead_letter_a_poison_job() -> None:
    assert before_run(job(), 3, POLICY, counted_deliveries=True).action is Action.RUN
    poison = before_run(job(attempts=1), 3, POLICY, counted_deliveries=True)
    assert poison.action is Action.DEAD_LETTER and poison.job.attempts == 3
    assert "delivered 3 times" in (poison.job.error or "")


def test_undecodable_bytes_are_dead_lettered_raw_and_a_refused_retry_too() -> None:
    outcome = undecodable(DecodeError("not JSON", b"\x00", queue="q"))
    assert outcome.action is Action.DEAD_LETTER and outcome.counts
    assert isinstance(outcome.job.payload.input, UndecodableMessage) and outcome.job.payload.input.raw == b"\x00"
    retry = after_run(job(), RuntimeError("x"), POLICY)
    refused = retry_refused(retry, ValueError("too large"))
    assert refused.action is Action.DEAD_LETTER and refused.job.error == "RuntimeError: x (not retried: too large)"


def test_a_release_is_not_counted_and_requeue_resets_all_but_undecodable_stand_ins() -> None:
    assert not release(job()).counts
    back = requeued(job(attempts=3).model_copy(update={"error": "e"}))
    assert back is not None and (back.attempts, back.error) == (0, None)
    stand_in = undecodable_job(DecodeError("x", b"y"))
    assert requeued(stand_in) is None
    assert requeued(Job(payload=JobSchema(name="other", input=stand_in.payload.input))) is not None
