"""Cron expressions: what parses to what, when they fire (time zones and DST included), every error."""

from __future__ import annotations

import calendar
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from jupyter_mlops.errors import MlopsError
from jupyter_mlops.pipelines.cron import CronError, parse, zone

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def fires(text: str, start: datetime, count: int, tz: str | None = None) -> list[datetime]:
    schedule, out, current = parse(text, tz), [], start
    for _ in range(count):
        current = schedule.next_after(current)
        out.append(current)
    return out


# -- parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical"), [
    ("0 3 * * 1", "0 3 * * 1"),
    ("*/15 * * * *", "*/15 * * * *"),
    ("0-30/10 9-17 * JAN-MAR,dec 0,7", "0,10,20,30 9-17 * 1-3,12 0"),
    ("0 0 1,15 * mon-FRI", "0 0 1,15 * 1-5"),
    ("5 4 * * sun", "5 4 * * 0"),
    ("0 0 * * 7", "0 0 * * 0"),
    ("0 0 * * 5-7", "0 0 * * 0,5,6"),
    ("0 0 */2 * *", "0 0 */2 * *"),
    ("1,2,3,5 0 1-31 * *", "1-3,5 0 1-31 * *"),
    ("  0   3 *  * 1 ", "0 3 * * 1"),
    ("@hourly", "0 * * * *"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@WEEKLY", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
])
def test_canonical_text(text: str, canonical: str) -> None:
    schedule = parse(text)
    assert schedule.text == canonical
    assert parse(canonical) == schedule  # the canonical text means the same thing


def test_names_and_numbers_are_the_same_schedule() -> None:
    assert parse("0 0 * jan,Feb sun") == parse("0 0 * 1,2 0") == parse("0 0 * 1-2 7")


def test_time_zone_from_argument_or_cron_tz_prefix() -> None:
    assert parse("0 3 * * *").tz == "UTC"
    assert parse("0 3 * * *", "Europe/Berlin").tz == "Europe/Berlin"
    prefixed = parse("CRON_TZ=Europe/Berlin 0 3 * * *")
    assert (prefixed.tz, prefixed.text) == ("Europe/Berlin", "0 3 * * *")
    assert parse("CRON_TZ=Europe/Berlin 0 3 * * *", "Europe/Berlin") == prefixed
    assert zone("Europe/Berlin") == BERLIN and zone("UTC") == UTC


# -- next fire -----------------------------------------------------------------------------------------


def test_next_after_is_strictly_after() -> None:
    schedule = parse("0 3 * * 1")  # 2024-01-01 is a Monday
    assert schedule.next_after(utc(2024, 1, 1, 0, 0)) == utc(2024, 1, 1, 3, 0)
    assert schedule.next_after(utc(2024, 1, 1, 3, 0)) == utc(2024, 1, 8, 3, 0)
    assert schedule.next_after(utc(2024, 1, 1, 2, 59, 59, 999999)) == utc(2024, 1, 1, 3, 0)
    assert schedule.next_after(utc(2024, 1, 1, 3, 0, 0, 1)) == utc(2024, 1, 8, 3, 0)


def test_steps_lists_and_ranges() -> None:
    assert fires("*/15 * * * *", utc(2024, 1, 1, 0, 7), 3) == [utc(2024, 1, 1, 0, 15), utc(2024, 1, 1, 0, 30),
                                                               utc(2024, 1, 1, 0, 45)]
    assert fires("0-30/10 9-10 * * *", utc(2024, 1, 1, 9, 25), 4) == [
        utc(2024, 1, 1, 9, 30), utc(2024, 1, 1, 10, 0), utc(2024, 1, 1, 10, 10), utc(2024, 1, 1, 10, 20)]
    assert fires("0 9 * * MON-FRI", utc(2024, 1, 5, 10), 2) == [utc(2024, 1, 8, 9), utc(2024, 1, 9, 9)]
    assert fires("0 0 1 1,7 *", utc(2024, 2, 1), 2) == [utc(2024, 7, 1), utc(2025, 1, 1)]


def test_year_rollover() -> None:
    assert parse("0 0 1 1 *").next_after(utc(2024, 12, 31, 23, 59)) == utc(2025, 1, 1)
    assert parse("59 23 31 12 *").next_after(utc(2024, 12, 31, 23, 59)) == utc(2025, 12, 31, 23, 59)


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # Vixie cron: the 13th of every month, and every Friday
    got = parse("0 0 13 * FRI").fires_between(utc(2024, 9, 1), utc(2024, 10, 31), limit=50)
    assert [d.day for d in got if d.month == 9] == [6, 13, 20, 27]  # Sept 13th 2024 is itself a Friday
    assert [d.day for d in got if d.month == 10] == [4, 11, 13, 18, 25]  # Oct 13th is a Sunday


def test_day_fields_must_both_match_when_one_is_a_star() -> None:
    assert [d.day for d in parse("0 0 * * MON").fires_between(utc(2024, 1, 1), utc(2024, 1, 31))] == [8, 15, 22, 29]
    # */2 counts as a star: odd-numbered days that are Mondays (Vixie cron's rule)
    assert [d.date().isoformat() for d in fires("0 0 */2 * MON", utc(2023, 12, 31), 3)] == [
        "2024-01-01", "2024-01-15", "2024-01-29"]


def test_month_ends_skip_months_without_the_day() -> None:
    assert fires("0 0 31 * *", utc(2024, 1, 31), 3) == [utc(2024, 3, 31), utc(2024, 5, 31), utc(2024, 7, 31)]
    assert parse("0 0 30 * *").next_after(utc(2024, 1, 30)) == utc(2024, 3, 30)
    assert parse("0 12 28-31 * *").next_after(utc(2023, 2, 28, 12)) == utc(2023, 3, 28, 12)


def test_february_29th_fires_only_in_leap_years() -> None:
    schedule = parse("0 0 29 2 *")
    assert schedule.next_after(utc(2024, 3, 1)) == utc(2028, 2, 29)
    assert schedule.next_after(utc(2096, 3, 1)) == utc(2104, 2, 29)  # 2100 is not a leap year
    assert parse("0 0 29 2 MON").next_after(utc(2024, 2, 20)) == utc(2024, 2, 26)  # or rule: Mondays too


def test_rare_schedules_are_found_without_minute_scanning() -> None:
    schedule = parse("0 0 29 2 *")
    started = time.perf_counter()
    for _ in range(200):
        assert schedule.next_after(utc(2096, 3, 1)) == utc(2104, 2, 29)
    assert time.perf_counter() - started < 1.0  # about 3 ms here; a minute-by-minute walk takes seconds each


def test_fires_between_is_start_exclusive_end_inclusive_and_limited() -> None:
    schedule = parse("0 * * * *")
    assert schedule.fires_between(utc(2024, 1, 1, 0), utc(2024, 1, 1, 3)) == [
        utc(2024, 1, 1, 1), utc(2024, 1, 1, 2), utc(2024, 1, 1, 3)]
    assert len(schedule.fires_between(utc(2024, 1, 1), utc(2025, 1, 1), limit=5)) == 5
    assert schedule.fires_between(utc(2024, 1, 1, 0, 1), utc(2024, 1, 1, 0, 59)) == []


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse("* * * * *").next_after(datetime(2024, 1, 1))


def test_fires_are_in_the_schedule_zone_whatever_zone_is_given() -> None:
    schedule = parse("0 3 * * *", "Europe/Berlin")
    fire = schedule.next_after(datetime(2024, 1, 1, 12, tzinfo=ZoneInfo("America/New_York")))
    assert fire.tzinfo == BERLIN and fire == datetime(2024, 1, 2, 3, tzinfo=BERLIN)
    assert fire.astimezone(UTC) == utc(2024, 1, 2, 2)  # CET
    assert schedule.next_after(utc(2024, 7, 1)).astimezone(UTC) == utc(2024, 7, 1, 1)  # CEST


def test_dst_gap_fires_once_at_the_end_of_the_gap() -> None:
    # 2024-03-31 in Berlin: 02:00 CET jumps to 03:00 CEST (01:00 UTC)
    schedule = parse("30 2 * * *", "Europe/Berlin")
    first = schedule.next_after(utc(2024, 3, 30, 12))
    assert first == datetime(2024, 3, 31, 3, 0, tzinfo=BERLIN) and first.astimezone(UTC) == utc(2024, 3, 31, 1)
    assert schedule.next_after(first) == datetime(2024, 4, 1, 2, 30, tzinfo=BERLIN)
    # every quarter hour: the four skipped ones coalesce into the fire at 03:00
    quarter = parse("*/15 * * * *", "Europe/Berlin").fires_between(utc(2024, 3, 31, 0, 40), utc(2024, 3, 31, 1, 20))
    assert [f.astimezone(UTC) for f in quarter] == [utc(2024, 3, 31, 0, 45), utc(2024, 3, 31, 1), utc(2024, 3, 31, 1, 15)]


def test_dst_repeated_hour_fires_once_at_the_first_occurrence() -> None:
    # 2024-10-27 in Berlin: 03:00 CEST falls back to 02:00 CET; 02:00-02:59 happens twice
    schedule = parse("30 2 * * *", "Europe/Berlin")
    first = schedule.next_after(utc(2024, 10, 26, 12))
    assert first.astimezone(UTC) == utc(2024, 10, 27, 0, 30)  # 02:30 CEST
    assert schedule.next_after(first).astimezone(UTC) == utc(2024, 10, 28, 1, 30)  # not 02:30 CET again
    half = parse("*/30 * * * *", "Europe/Berlin").fires_between(utc(2024, 10, 26, 23, 50), utc(2024, 10, 27, 2, 10))
    assert [f.astimezone(UTC) for f in half] == [utc(2024, 10, 27, 0), utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 2)]
    # asked from inside the second pass: the next wall time that has not happened yet
    assert parse("*/30 * * * *", "Europe/Berlin").next_after(utc(2024, 10, 27, 1, 10)) == utc(2024, 10, 27, 2)


def test_a_midnight_that_does_not_exist() -> None:
    # Chile moves its clocks from 24:00 to 01:00: the daily fire comes at 01:00 that day
    schedule = parse("@daily", "America/Santiago")
    first = schedule.next_after(utc(2024, 9, 7, 12))
    assert first.replace(tzinfo=None) == datetime(2024, 9, 8, 1, 0)
    assert schedule.next_after(first).replace(tzinfo=None) == datetime(2024, 9, 9, 0, 0)


def _reference_matches(text: str, when: datetime) -> bool:
    """The obvious reading of Vixie cron, field by field, for a brute-force comparison."""
    minute, hour, dom, month, dow = text.split()

    def allowed(field: str, value: int, low: int, high: int) -> bool:
        for item in field.split(","):
            base, _, step = item.partition("/")
            first, last = (low, high) if base == "*" else (
                (int(base.split("-")[0]), int(base.split("-")[1])) if "-" in base else (int(base), int(base)))
            if first <= value <= last and (value - first) % int(step or 1) == 0:
                return True
        return False

    weekday = (when.weekday() + 1) % 7
    by_dom = allowed(dom, when.day, 1, 31)
    by_dow = allowed(dow, weekday, 0, 6) or (weekday == 0 and allowed(dow, 7, 0, 7))
    day_ok = (by_dom and by_dow) if dom.startswith("*") or dow.startswith("*") else (by_dom or by_dow)
    return (allowed(minute, when.minute, 0, 59) and allowed(hour, when.hour, 0, 23) and day_ok
            and allowed(month, when.month, 1, 12))


@pytest.mark.parametrize("text", [
    "*/7 */5 * * *", "15,45 1-3 1,15,31 * *", "0 12 * * 1-5", "0 0 13 * 5", "30 6 */3 2,3 *",
    "0 */6 * * 0,6", "5-10/2 23 28-31 * 7",
])
def test_agrees_with_a_minute_by_minute_reference(text: str) -> None:
    start, end = utc(2024, 2, 1), utc(2024, 3, 20)
    expected, t = [], start + timedelta(minutes=1)
    while t <= end:
        if _reference_matches(text, t):
            expected.append(t)
        t += timedelta(minutes=1)
    assert expected and parse(text).fires_between(start, end, limit=100_000) == expected


def test_every_fire_matches_its_weekday_across_years() -> None:
    for fire in parse("0 0 1 * MON").fires_between(utc(2023, 1, 1), utc(2030, 1, 1), limit=1000):
        assert fire.day == 1 or fire.weekday() == 0
    days = {f.date() for f in parse("0 0 * 2 *").fires_between(utc(2023, 12, 31), utc(2028, 12, 31), limit=2000)}
    assert len(days) == sum(calendar.monthrange(y, 2)[1] for y in range(2024, 2029))


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "tz", "message"), [
    ("0 24 * * *", None, "cron '0 24 * * *': hour 24 is out of range 0-23"),
    ("60 0 * * *", None, "minute 60 is out of range 0-59"),
    ("0 0 0 * *", None, "day-of-month 0 is out of range 1-31"),
    ("0 0 32 * *", None, "day-of-month 32 is out of range 1-31"),
    ("0 0 * 13 *", None, "month 13 is out of range 1-12"),
    ("0 0 * * 8", None, "day-of-week 8 is out of range 0-7"),
    ("", None, "empty; write five fields, minute hour day-of-month month day-of-week"),
    ("* * *", None, "has 3 fields; write five"),
    ("0 0 3 * * * *", None, "has 7 fields; write five: minute hour day-of-month month day-of-week, e.g. '0 3 * * 1'; "
                           "seconds and years are not supported"),
    ("@reboot", None, "unknown macro @reboot; use one of @hourly, @daily"),
    ("x * * * *", None, "minute 'x' is not a number 0-59"),
    ("0 0 * * MOM", None, "day-of-week 'MOM' is not a number 0-7 or a name SUN-SAT"),
    ("0 0 * FOO *", None, "month 'FOO' is not a number 1-12 or a name JAN-DEC"),
    ("0 0 * * JAN", None, "day-of-week 'JAN' is not a number 0-7 or a name SUN-SAT"),
    ("5-2 * * * *", None, "minute range 5-2 is backwards; write the smaller value first"),
    ("0 0 * * FRI-MON", None, "day-of-week range FRI-MON is backwards"),
    ("1-2-3 * * * *", None, "minute range '1-2-3' is not FIRST-LAST"),
    ("-5 * * * *", None, "minute range '-5' is not FIRST-LAST"),
    ("*/0 * * * *", None, "minute step 0 is out of range 1-59"),
    ("*/60 * * * *", None, "minute step 60 is out of range 1-59"),
    ("*/x * * * *", None, "minute step 'x' in '*/x' is not a whole number"),
    ("5/10 * * * *", None, "minute '5/10': a step needs a range; write 5-59/10 or */10"),
    ("1,,2 * * * *", None, "minute '1,,2' has an empty list item"),
    ("*/2,5 * * * *", None, "minute '*/2,5': * must stand alone in a field; write 0-59/2,5"),
    ("0 0 30 2 *", None, "day-of-month 30 never occurs in month 2; this schedule would never fire"),
    ("0 0 31 4,6 *", None, "day-of-month 31 never occurs in month 4,6"),
    ("0 0 * * *", "Europe/Berln", "unknown time zone 'Europe/Berln'; did you mean Europe/Berlin"),
    ("0 0 * * *", "Nowhere/Atall", "unknown time zone 'Nowhere/Atall'"),
    ("CRON_TZ=Asia/Tokyo 0 0 * * *", "Europe/Berlin", "names the time zone Asia/Tokyo but Europe/Berlin was given"),
])
def test_errors_name_the_field_the_value_and_the_fix(text: str, tz: str | None, message: str) -> None:
    with pytest.raises(CronError) as info:
        parse(text, tz)
    assert message in str(info.value)
    assert str(info.value).startswith(f"cron {text!r}: ")
    assert isinstance(info.value, ValueError) and isinstance(info.value, MlopsError)


def test_errors_carry_the_field_and_value() -> None:
    with pytest.raises(CronError) as info:
        parse("0 24 * * *")
    assert (info.value.field, info.value.value, info.value.text) == ("hour", "24", "0 24 * * *")
    assert info.value.problem == "hour 24 is out of range 0-23"
    with pytest.raises(CronError, match="^unknown time zone 'Mars/Olympus'; use an IANA name such as Europe/Berlin"):
        zone("Mars/Olympus")


def test_never_firing_is_fine_when_the_weekday_can_fire() -> None:
    assert parse("0 0 30 2 MON").next_after(utc(2024, 1, 1)) == utc(2024, 2, 5)
