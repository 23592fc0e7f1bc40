"""Five-field cron expressions: parsing, with errors that say the fix, and the next fire time.

``minute hour day-of-month month day-of-week``, as in Vixie cron and Kubernetes CronJobs: ``*``,
lists ``1,15``, ranges ``1-5``, steps ``*/15`` and ``0-30/10``, month names ``JAN``-``DEC`` and day
names ``SUN``-``SAT`` (any case; 0 and 7 are both Sunday), and the macros ``@hourly``, ``@daily``
(``@midnight``), ``@weekly``, ``@monthly``, ``@yearly`` (``@annually``). A leading
``CRON_TZ=Europe/Berlin`` names the time zone inside the text (a pipeline's ``schedule:`` has no
other place for it).

Day-of-month and day-of-week, as Vixie cron has it: when both are restricted (neither starts with
``*``) a day fires if *either* matches (``0 0 1 * MON``: the 1st and every Monday); otherwise both
must match (``*/2`` counts as ``*`` here, so ``0 0 */2 * MON`` is odd-numbered Mondays).

Times are wall-clock times in the schedule's zone (UTC unless named). Daylight saving changes:

* a wall time the clocks skip (02:30 on the spring-forward night in Europe/Berlin) fires at the
  end of the gap (03:00 CEST); several skipped times coalesce into that one fire;
* a wall time that happens twice (02:30 on the fall-back night) fires once, at its first
  occurrence (CEST). So ``*/15 * * * *`` in such a zone pauses for the repeated hour; schedules
  that must keep a steady interval through the change belong in UTC, the default.
"""

from __future__ import annotations

import bisect
import calendar
import difflib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from functools import lru_cache

from ..errors import CronError

__all__ = ["CronError", "CronSchedule", "parse", "zone"]


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    _Field("day-of-week", 0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")),
)

_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

#: The most days each month can have (February: 29, in leap years).
_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_SEARCH_YEARS = 400  # the Gregorian cycle: every (day, month, weekday) combination occurs within it


@dataclass(frozen=True)
class CronSchedule:
    """A parsed expression: the sets of values each field allows, evaluated in ``tz``."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: tuple[int, ...]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    day_star: bool  # day-of-month written as * or */n
    weekday_star: bool
    text: str  # canonical five fields, without the zone: what a Kubernetes CronJob's `schedule` takes
    tz: str = "UTC"

    @property
    def zone(self) -> tzinfo:
        return _zone(self.tz, self.text)

    def next_after(self, when: datetime) -> datetime:
        """The first fire strictly after ``when`` (timezone-aware), in the schedule's zone."""
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"next_after needs a timezone-aware datetime, got {when!r}")
        zone = self.zone
        wall = when.astimezone(zone).replace(tzinfo=None, second=0, microsecond=0, fold=0)
        wall += timedelta(minutes=1)
        while True:
            wall = self._next_wall(wall)
            fire = _resolve(wall, zone)
            if fire > when:  # not after: the second pass of a repeated hour (fires only once)
                return fire
            wall += timedelta(minutes=1)

    def fires_between(self, start: datetime, end: datetime, limit: int = 1000) -> list[datetime]:
        """Fires ``t`` with ``start < t <= end``, the first ``limit`` of them."""
        fires: list[datetime] = []
        current = start
        while len(fires) < limit:
            current = self.next_after(current)
            if current > end:
                break
            fires.append(current)
        return fires

    def _next_wall(self, wall: datetime) -> datetime:
        """The first matching wall-clock minute at or after ``wall`` (naive, whole minutes)."""
        year, month, day, hour, minute = wall.year, wall.month, wall.day, wall.hour, wall.minute
        while year <= wall.year + _SEARCH_YEARS:
            i = bisect.bisect_left(self.months, month)
            if i == len(self.months):
                year, month, day, hour, minute = year + 1, self.months[0], 1, 0, 0
                continue
            if self.months[i] != month:
                month, day, hour, minute = self.months[i], 1, 0, 0
            days = self._days_of(year, month)
            for d in days[bisect.bisect_left(days, day):]:
                hm = self._next_time(hour, minute) if d == day else (self.hours[0], self.minutes[0])
                if hm is not None:
                    return datetime(year, month, d, *hm)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            day, hour, minute = 1, 0, 0
        raise CronError(self.text, f"no fire within {_SEARCH_YEARS} years; check the day and month fields")

    def _next_time(self, hour: int, minute: int) -> tuple[int, int] | None:
        i = bisect.bisect_left(self.hours, hour)
        if i < len(self.hours) and self.hours[i] == hour:
            j = bisect.bisect_left(self.minutes, minute)
            if j < len(self.minutes):
                return hour, self.minutes[j]
            i += 1
        return (self.hours[i], self.minutes[0]) if i < len(self.hours) else None

    def _days_of(self, year: int, month: int) -> list[int]:
        return _matching_days(year, month, self.days, self.weekdays, self.day_star or self.weekday_star)


@lru_cache(maxsize=256)
def _matching_days(year: int, month: int, days: frozenset[int], weekdays: frozenset[int], both: bool) -> list[int]:
    first, count = calendar.monthrange(year, month)  # first: Monday = 0
    out = []
    for d in range(1, count + 1):
        by_day, by_weekday = d in days, (first + d) % 7 in weekdays  # cron: Sunday = 0
        if (by_day and by_weekday) if both else (by_day or by_weekday):
            out.append(d)
    return out


def _resolve(wall: datetime, zone: tzinfo) -> datetime:
    """The instant of a wall time: its first occurrence, or the end of the gap it falls in."""
    first = wall.replace(tzinfo=zone, fold=0)
    if first.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # In a gap: fold=1 reads it with the offset after the change (an earlier instant), fold=0 with
    # the one before; the change lies between. The local time reaches `wall` exactly there.
    lo = int(wall.replace(tzinfo=zone, fold=1).timestamp())
    hi = int(first.timestamp())
    while lo < hi:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).replace(tzinfo=None) >= wall:
            hi = mid
        else:
            lo = mid + 1
    return datetime.fromtimestamp(lo, zone)


def zone(name: str) -> tzinfo:
    """The time zone called ``name`` (IANA, or UTC); :class:`CronError` with close names if unknown."""
    return _zone(name, None)


@lru_cache(maxsize=64)
def _zone(name: str, text: str | None) -> tzinfo:
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return timezone.utc
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "use an IANA name such as Europe/Berlin or UTC"
        raise CronError(text, f"unknown time zone {name!r}; {hint}", field="time zone", value=name) from None


def parse(text: str, tz: str | None = None) -> CronSchedule:
    """Parse ``text``; ``tz`` (an IANA name) is the zone it is evaluated in, default UTC.

    Raises :class:`CronError` naming the field, the value and the fix.
    """
    original = text
    body = text.strip()
    if body.upper().startswith(("CRON_TZ=", "TZ=")):
        prefix, _, body = body.partition(" ")
        named = prefix.partition("=")[2]
        if tz and tz != named:
            raise CronError(original, f"names the time zone {named} but {tz} was given as well; keep one")
        tz, body = named, body.strip()
    tz = tz or "UTC"
    _zone(tz, original)
    if not body:
        raise CronError(original, "empty; write five fields, minute hour day-of-month month day-of-week, e.g. '0 3 * * 1'")
    if body.startswith("@"):
        macro = _MACROS.get(body.lower())
        if macro is None:
            raise CronError(original, f"unknown macro {body}; use one of {', '.join(_MACROS)} or five fields",
                            field="macro", value=body)
        body = macro
    parts = body.split()
    if len(parts) != 5:
        extra = "; seconds and years are not supported" if len(parts) in (6, 7) else ""
        raise CronError(original, f"has {len(parts)} fields; write five: minute hour day-of-month month "
                        f"day-of-week, e.g. '0 3 * * 1'{extra}")
    values = [_parse_field(part, spec, original) for part, spec in zip(parts, _FIELDS)]
    minutes, hours, days, months, weekdays = (v[0] for v in values)
    weekdays = {0 if d == 7 else d for d in weekdays}
    day_star, weekday_star = parts[2].startswith("*"), parts[4].startswith("*")
    if not day_star and weekday_star and not any(d <= _MONTH_DAYS[m] for m in months for d in days):
        raise CronError(original, f"day-of-month {parts[2]} never occurs in month {parts[3]}; this schedule "
                        "would never fire", field="day-of-month", value=parts[2])
    fields = [(v[0], v[1], spec) for v, spec in zip(values, _FIELDS)]
    canonical = " ".join(_render(vals, star_step, spec) for vals, star_step, spec in fields)
    return CronSchedule(tuple(sorted(minutes)), tuple(sorted(hours)), frozenset(days), tuple(sorted(months)),
                        frozenset(weekdays), day_star, weekday_star, canonical, tz)


def _parse_field(part: str, spec: _Field, text: str) -> tuple[set[int], int]:
    """The values a field allows, and its step if written ``*`` or ``*/n`` (else 0)."""
    if part.startswith("*") and "," in part:
        spelled = f"{spec.low}-{6 if spec.name == 'day-of-week' else spec.high}" + part[1:]
        raise CronError(text, f"{spec.name} {part!r}: * must stand alone in a field; write {spelled}",
                        field=spec.name, value=part)
    values: set[int] = set()
    star_step = 0
    for item in part.split(","):
        if not item:
            raise CronError(text, f"{spec.name} {part!r} has an empty list item; separate values with single commas",
                            field=spec.name, value=part)
        base, slash, step_text = item.partition("/")
        step = _step(step_text, item, spec, text) if slash else 1
        if base == "*":
            low, high = spec.low, (6 if spec.name == "day-of-week" else spec.high)
            star_step = step
        elif "-" in base:
            first, _, last = base.partition("-")
            if not first or not last or "-" in last:
                raise CronError(text, f"{spec.name} range {base!r} is not FIRST-LAST; write e.g. "
                                f"{spec.low}-{spec.low + 4}", field=spec.name, value=base)
            low, high = _value(first, spec, text), _value(last, spec, text)
            if low > high:
                raise CronError(text, f"{spec.name} range {base} is backwards; write the smaller value first "
                                "(a range cannot wrap around)", field=spec.name, value=base)
        elif slash:
            raise CronError(text, f"{spec.name} {item!r}: a step needs a range; write {base}-{spec.high}/{step_text} "
                            f"or */{step_text}", field=spec.name, value=item)
        else:
            low = high = _value(base, spec, text)
        values.update(range(low, high + 1, step))
    return values, star_step


def _step(step_text: str, item: str, spec: _Field, text: str) -> int:
    if not step_text.isdigit():
        raise CronError(text, f"{spec.name} step {step_text!r} in {item!r} is not a whole number",
                        field=spec.name, value=item)
    step = int(step_text)
    if not 1 <= step <= spec.high:
        raise CronError(text, f"{spec.name} step {step} is out of range 1-{spec.high}", field=spec.name, value=item)
    return step


def _value(token: str, spec: _Field, text: str) -> int:
    if token.isdigit():
        number = int(token)
        if not spec.low <= number <= spec.high:
            raise CronError(text, f"{spec.name} {number} is out of range {spec.low}-{spec.high}",
                            field=spec.name, value=token)
        return number
    if spec.names and token.upper() in spec.names:
        return spec.low + spec.names.index(token.upper())
    kinds = f" or a name {spec.names[0]}-{spec.names[-2 if spec.name == 'day-of-week' else -1]}" if spec.names else ""
    raise CronError(text, f"{spec.name} {token!r} is not a number {spec.low}-{spec.high}{kinds}",
                    field=spec.name, value=token)


def _render(values: set[int], star_step: int, spec: _Field) -> str:
    """One field, canonical: ``*``/``*/n`` kept as written (it matters for the day rule), else runs."""
    if star_step:
        return "*" if star_step == 1 else f"*/{star_step}"
    if spec.name == "day-of-week":
        values = {0 if v == 7 else v for v in values}
    ordered = sorted(values)
    runs: list[str] = []
    start = prev = ordered[0]
    for v in [*ordered[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}" if prev > start + 1 else f"{start},{prev}")
        if v is not None:
            start = prev = v
    return ",".join(runs)
