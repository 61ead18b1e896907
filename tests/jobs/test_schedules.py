"""Schedules without a broker: fire times across daylight saving time, misfires, fire ids, spec checks."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from mindtrace.jobs import JobInput, JobSchema, JobValidationError, job_from_schema
from mindtrace.jobs.schedules import Due, ScheduleSpec, due, fire_id, make_spec

BERLIN = ZoneInfo("Europe/Berlin")
SCHEMA = JobSchema(name="report", input=JobInput)


def _spec(**options: object) -> ScheduleSpec:
    return make_spec("nightly", "reports", job_from_schema(SCHEMA, JobInput()), anchor_ms=0, **options)


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def _fires(spec: ScheduleSpec, start: datetime, count: int) -> list[str]:
    times, at = [], _ms(start)
    for _ in range(count):
        at = spec.next_after(at)
        times.append(datetime.fromtimestamp(at / 1000, BERLIN).isoformat())
    return times


@pytest.mark.parametrize(
    ("cron", "start", "expected"),
    [
        # Spring (29 March 2026, 02:00 -> 03:00): 02:30 does not exist that night; cron runs it at 03:00.
        (
            "30 2 * * *",
            datetime(2026, 3, 28, 12, tzinfo=BERLIN),
            ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
        ),
        # Autumn (25 October 2026, 03:00 -> 02:00): 02:30 happens twice; a daily job runs once, at the first.
        (
            "30 2 * * *",
            datetime(2026, 10, 24, 12, tzinfo=BERLIN),
            ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
        ),
        # A job every half hour runs in both of the repeated hours: four distinct instants, none twice.
        (
            "*/30 * * * *",
            datetime(2026, 10, 25, 1, 40, tzinfo=BERLIN),
            [
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T02:30:00+02:00",
                "2026-10-25T02:00:00+01:00",
                "2026-10-25T02:30:00+01:00",
                "2026-10-25T03:00:00+01:00",
            ],
        ),
        # Weekdays at 09:00 local, across the spring change: the UTC offset moves, the local time does not.
        (
            "0 9 * * 1-5",
            datetime(2026, 3, 27, 10, tzinfo=BERLIN),
            ["2026-03-30T09:00:00+02:00", "2026-03-31T09:00:00+02:00"],
        ),
    ],
)
def test_cron_fire_times_keep_local_time_across_daylight_saving_changes(
    cron: str, start: datetime, expected: list[str]
) -> None:
    spec = _spec(cron=cron, tz="Europe/Berlin")
    fires = _fires(spec, start, len(expected))
    assert fires == expected
    ids = {fire_id("nightly", _ms(datetime.fromisoformat(fire))) for fire in fires}
    assert len(ids) == len(fires)


def test_an_interval_is_aligned_to_the_epoch_and_its_fires_come_from_the_previous_one() -> None:
    spec = _spec(every=timedelta(minutes=5))
    start = datetime(2026, 12, 4, 10, 2, 13, tzinfo=timezone.utc)
    assert spec.next_after(_ms(start)) == _ms(datetime(2026, 12, 4, 10, 5, tzinfo=timezone.utc))
    assert spec.next_after(_ms(datetime(2026, 12, 4, 10, 5, tzinfo=timezone.utc))) == _ms(
        datetime(2026, 12, 4, 10, 10, tzinfo=timezone.utc)
    )
    assert spec.latest_until(_ms(start)) == _ms(datetime(2026, 12, 4, 10, 0, tzinfo=timezone.utc))


def test_due_fires_the_latest_owed_time_once_and_skips_past_the_grace() -> None:
    every = _spec(every=10)
    assert due(every, 5_000, 7_000) == Due(None, 5_000, 10_000)  # nothing owed yet
    assert due(every, 5_000, 10_000) == Due(10_000, 10_000, 20_000)  # on time
    # Down for three fire times: one fire, at the latest of them (coalesced), 5.5 s late.
    assert due(every, 5_000, 35_500) == Due(30_000, 30_000, 40_000)
    assert due(_spec(every=10, grace=2), 5_000, 35_500) == Due(None, 30_000, 40_000)  # over its grace: skipped
    assert due(_spec(every=10, misfire="skip"), 5_000, 35_500).fire_ms == 30_000  # within SKIP_GRACE (60 s)
    assert due(_spec(every=100, misfire="skip"), 5_000, 170_000) == Due(None, 100_000, 200_000)  # 70 s late
    nightly = _spec(cron="0 3 * * *")
    cursor = _ms(datetime(2026, 12, 4, tzinfo=timezone.utc))
    now = _ms(datetime(2026, 12, 6, 3, 30, tzinfo=timezone.utc))  # two nights missed
    assert due(nightly, cursor, now).fire_ms == _ms(datetime(2026, 12, 6, 3, tzinfo=timezone.utc))


def test_a_fire_id_is_the_name_and_the_utc_fire_time() -> None:
    at = _ms(datetime(2026, 12, 4, 3, tzinfo=timezone.utc))
    assert fire_id("nightly", at) == "nightly@2026-12-04T03:00:00Z"
    assert fire_id("fast", at + 250) == "fast@2026-12-04T03:00:00.250Z"


def test_the_same_schedule_with_another_template_instance_is_the_same_spec() -> None:
    first = _spec(cron="0 3 * * *", tz="Europe/Berlin")
    assert first.same_as(_spec(cron="0 3 * * *", tz="Europe/Berlin"))  # a new job: another id, another time
    assert not first.same_as(_spec(cron="0 4 * * *", tz="Europe/Berlin"))
    other = make_spec("nightly", "reports", job_from_schema(SCHEMA, JobInput(), priority=5), cron="0 3 * * *",
                      tz="Europe/Berlin", anchor_ms=0)  # fmt: skip
    assert not first.same_as(other)
    assert ScheduleSpec.model_validate_json(first.model_dump_json()) == first


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cron": "0 25 * * *"}, "cron"),
        ({"cron": 5}, "cron"),
        ({"cron": "0 3 * * *", "tz": "Berlin"}, "tz"),
        ({"cron": "0 3 * * *", "tz": ""}, "tz"),
        ({"every": timedelta(0)}, "every"),
        ({"every": True}, "every"),
        ({"every": 10 * 365 * 86400}, "every"),
        ({"every": 1, "grace": timedelta(seconds=-1)}, "grace"),
    ],
)
def test_bad_specs_name_their_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(JobValidationError) as caught:
        _spec(**options)
    assert caught.value.field == field
    assert "nightly" in str(caught.value)


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 201, 7])
def test_bad_names_are_refused(name: object) -> None:
    with pytest.raises(JobValidationError) as caught:
        make_spec(name, "reports", job_from_schema(SCHEMA, JobInput()), every=1, anchor_ms=0)
    assert caught.value.field == "name"
