"""The filter builder: --created periods in local time, validation messages, ordering, search terms."""

from datetime import datetime, timezone

import pytest

from omnicrm.errors import InvalidInput
from omnicrm.filters import ContactFilter, created_range, normalise_tag, order_by, search_term


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


# 2026-03-31 23:30 in New York (EDT, UTC-4) is already 2026-04-01 03:30 UTC: local periods must use March 31.
NY_NOW = utc("2026-04-01T03:30:00")


@pytest.mark.parametrize("spec, start, end", [
    ("today", "2026-03-31T04:00:00", None),
    ("week", "2026-03-30T04:00:00", None),       # Monday
    ("month", "2026-03-01T05:00:00", None),      # before the DST switch: EST, UTC-5
    ("quarter", "2026-01-01T05:00:00", None),
    ("year", "2026-01-01T05:00:00", None),
    ("2026-03-01..2026-03-31", "2026-03-01T05:00:00", "2026-04-01T04:00:00"),  # TO is inclusive
    ("2026-03-31..", "2026-03-31T04:00:00", None),
    ("..2026-03-31", None, "2026-04-01T04:00:00"),
    (" 2026-03-31..2026-03-31 ", "2026-03-31T04:00:00", "2026-04-01T04:00:00"),
])
def test_created_periods_are_local_calendar_periods(local_tz, spec, start, end):
    local_tz("America/New_York")
    got = created_range(spec, NY_NOW)
    assert got == (utc(start) if start else None, utc(end) if end else None)


@pytest.mark.parametrize("tz, today_start", [
    ("UTC", "2026-04-01T00:00:00"),
    ("Asia/Tokyo", "2026-04-01T15:00:00"),  # 01:00 on April 2nd in Tokyo
    ("America/Los_Angeles", "2026-04-01T07:00:00"),  # 09:00 on April 1st in Los Angeles (PDT)
])
def test_today_depends_on_the_local_zone(local_tz, tz, today_start):
    local_tz(tz)
    now = utc("2026-04-01T16:00:00")  # Tokyo: 2026-04-02 01:00 → today began 2026-04-01T15:00Z
    assert created_range("today", now)[0] == utc(today_start)


def test_quarter_and_year_at_their_first_instant(local_tz):
    local_tz("UTC")
    first = utc("2026-10-01T00:00:00")
    assert created_range("quarter", first)[0] == first
    assert created_range("year", utc("2026-01-01T00:00:00"))[0] == utc("2026-01-01T00:00:00")
    assert created_range("week", utc("2026-11-29T23:59:59"))[0] == utc("2026-11-23T00:00:00")  # Sunday → Monday


@pytest.mark.parametrize("spec", ["yesterday", "2026-13-01..", "2026-01-01..x", "..", "2026-02-02..2026-02-01",
                                  "2026-01-01"])
def test_bad_created_names_the_option(spec):
    with pytest.raises(InvalidInput, match="--created"):
        created_range(spec, NY_NOW)


@pytest.mark.parametrize("flt, option", [
    (ContactFilter(search=""), "--search"),
    (ContactFilter(search="   "), "--search"),
    (ContactFilter(search="x" * 201), "--search"),
    (ContactFilter(stale=-1), "--stale"),
    (ContactFilter(tags=("vip", " ")), "--tag"),
    (ContactFilter(created="soon"), "--created"),
])
def test_invalid_filters_name_the_option(flt, option):
    with pytest.raises(InvalidInput, match=option):
        flt.validate()


def test_valid_filter_bounds():
    assert ContactFilter(search="x" * 200, stale=0).validate()
    assert ContactFilter(search="a").validate()
    assert ContactFilter().empty
    assert not ContactFilter(stale=0).empty
    assert not ContactFilter(tags=("a",)).empty


@pytest.mark.parametrize("sort, order, option", [("size", "asc", "--sort"), ("name", "up", "--order"),
                                                 ("", "asc", "--sort")])
def test_order_by_rejects_unknown_values(sort, order, option):
    with pytest.raises(InvalidInput, match=option):
        order_by(sort, order)


@pytest.mark.parametrize("query, term", [
    ("  Zoë ", "zoe"), ("+1 (415) 555-0101", "14155550101"), ("555-0101", "5550101"), ("ÉMILE", "emile"),
    ("bob@x.org", "bob@x.org"), ("12", "12"),
])
def test_search_term(query, term):
    assert search_term(query) == term


def test_normalise_tag():
    assert normalise_tag("  Close   Friends ") == "close friends"


@pytest.mark.parametrize("spec", ["..9999-12-31", "0001-01-01..0001-01-02"])
def test_extreme_dates_are_clean_errors_or_ranges(local_tz, spec):
    local_tz("Asia/Tokyo")
    try:
        created_range(spec, NY_NOW)
    except InvalidInput as exc:
        assert "--created" in str(exc)
