"""Relationship score, follow-ups, timeline and last_interaction_at upkeep (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from omnicrm import contacts as svc
from omnicrm.db import user_id as get_user_id
from omnicrm.filters import ContactFilter
from omnicrm.insights import cadence_days, follow_ups
from omnicrm.models import Contact
from omnicrm.score import relationship_score, score_expression, score_parts

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def touch(session, contact, when, *, direction="in", kind="email", source="gmail", subject=None):
    svc.record_interaction(session, contact.user_id, contact.id, kind=kind, direction=direction,
                           occurred_at=when, subject=subject or f"{kind} {when:%Y-%m-%d %H:%M}", source=source,
                           external_id=f"{source}-{contact.id}-{when.isoformat()}-{direction}")


def history(session, contact, *, every_days, last_days_ago, times, now=NOW):
    """`times` interactions, `every_days` apart, the last one `last_days_ago` days before `now`."""
    for i in range(times):
        touch(session, contact, now - timedelta(days=last_days_ago + i * every_days),
              direction="in" if i % 2 else "out")


@pytest.fixture
def uid(session, monkeypatch):
    monkeypatch.setenv("OMNICRM_NOW", NOW.isoformat())  # notes are dated by the clock
    value = get_user_id(session, "alice")
    session.commit()
    return value


# --- score -------------------------------------------------------------------------------------

def total(**kw):
    return sum(score_parts(**kw).values())


def test_score_is_monotonic_in_recency_frequency_and_balance():
    recencies = [total(last=NOW - timedelta(days=d), count=5, inbound=2, outbound=3, now=NOW)
                 for d in (0, 1, 7, 30, 90, 365, 3650)]
    assert recencies == sorted(recencies, reverse=True) and len(set(recencies)) == len(recencies)
    frequencies = [total(last=NOW - timedelta(days=10), count=n, inbound=0, outbound=0, now=NOW)
                   for n in (0, 1, 2, 5, 10, 50, 500)]
    assert frequencies == sorted(frequencies) and len(set(frequencies)) == len(frequencies)
    balance = [total(last=None, count=10, inbound=i, outbound=10 - i, now=NOW) for i in (0, 2, 5)]
    assert balance == sorted(balance) and balance[0] < balance[-1]
    assert total(last=None, count=0, inbound=0, outbound=0, now=NOW) == 0
    best = total(last=NOW, count=10**6, inbound=10**5, outbound=10**5, now=NOW)
    assert 99 <= best <= 100
    # A meeting tomorrow counts as "now", not as a bonus.
    assert total(last=NOW + timedelta(days=1), count=1, inbound=0, outbound=0, now=NOW) == \
        total(last=NOW, count=1, inbound=0, outbound=0, now=NOW)


def test_stored_counters_follow_every_interaction_write(session, uid):
    ada = svc.add_contact(session, uid, name="Ada", emails=["ada@example.com"], note="met at a conference")
    session.commit()
    assert (ada.interaction_count, ada.inbound_count, ada.outbound_count) == (1, 0, 0)
    touch(session, ada, NOW - timedelta(days=3), direction="in")
    touch(session, ada, NOW - timedelta(days=2), direction="out")
    touch(session, ada, NOW - timedelta(days=2), direction="out")  # same external id: not counted twice
    svc.add_note(session, ada, "called her")
    session.commit()
    session.refresh(ada)
    assert (ada.interaction_count, ada.inbound_count, ada.outbound_count) == (4, 1, 1)
    assert ada.last_interaction_at == max(e["occurred_at"] for e in svc.timeline(session, ada))


def test_sql_score_matches_python_and_sorts(session, uid):
    people = {}
    for name, (days, count) in {"recent": (1, 3), "old": (200, 3), "busy": (20, 40), "never": (None, 0)}.items():
        contact = svc.add_contact(session, uid, name=name)
        for i in range(count):
            touch(session, contact, NOW - timedelta(days=days + i), direction="in" if i % 2 else "out")
        people[name] = contact
    session.commit()
    for contact in people.values():
        session.refresh(contact)
    rows = dict(session.execute(select(Contact.id, score_expression(NOW)).where(Contact.user_id == uid)).all())
    for contact in people.values():
        parts = score_parts(contact.last_interaction_at, contact.interaction_count, contact.inbound_count,
                            contact.outbound_count, NOW)
        assert rows[contact.id] == pytest.approx(sum(parts.values()), abs=1e-6)
    page = svc.list_contacts(session, uid, ContactFilter(), sort="score", order="desc", now=NOW)
    names = [c.display_name for c in page.items]
    scores = [relationship_score(c, NOW) for c in page.items]
    assert scores == sorted(scores, reverse=True)
    assert names[-1] == "never" and names.index("recent") < names.index("old")
    assert svc.record(people["never"], NOW)["score"] == 0
    ascending = [c.display_name for c in svc.iter_contacts(session, uid, ContactFilter(), sort="score",
                                                           order="asc", now=NOW)]
    assert ascending == names[::-1]


# --- follow-ups --------------------------------------------------------------------------------

def test_cadence_uses_distinct_days_and_needs_history():
    day = datetime(2026, 1, 1, 9, tzinfo=timezone.utc)
    assert cadence_days([day, day + timedelta(hours=2)]) is None
    assert cadence_days([day, day + timedelta(days=10)]) is None
    assert cadence_days([day + timedelta(days=d) for d in (0, 14, 28, 28, 42)]) == 14
    assert cadence_days([day + timedelta(hours=h) for h in (0, 1, 2, 30, 50)]) == 1


def test_follow_ups_ranked_by_how_overdue(session, uid):
    people = {}

    def person(name, **kw):
        contact = svc.add_contact(session, uid, name=name, emails=[f"{name}@example.com"])
        history(session, contact, **kw)
        people[name] = contact

    person("fortnightly", every_days=14, last_days_ago=45, times=6)   # 45/14 = 3.2x
    person("weekly", every_days=7, last_days_ago=30, times=8)         # 30/7 = 4.3x
    person("monthly", every_days=30, last_days_ago=20, times=5)       # not yet
    person("twice", every_days=5, last_days_ago=60, times=2)          # not enough history
    person("onpace", every_days=14, last_days_ago=10, times=6)        # within cadence
    person("daily", every_days=1, last_days_ago=5, times=10)          # overdue ratio 5 but < 7 days silence
    person("booked", every_days=7, last_days_ago=40, times=5)
    touch(session, people["booked"], NOW + timedelta(days=2), kind="meeting", source="calendar")
    other = get_user_id(session, "mallory")
    stranger = svc.add_contact(session, other, name="stranger")
    history(session, stranger, every_days=7, last_days_ago=300, times=5)
    session.commit()

    found = follow_ups(session, uid, NOW)
    assert [f.display_name for f in found] == ["weekly", "fortnightly"]
    assert found[1].reason == "usually every 14 days; last contact 45 days ago"
    assert found[0].reason == "usually every 7 days; last contact 30 days ago"
    assert found[0].email == "weekly@example.com"
    assert [f.display_name for f in follow_ups(session, uid, NOW, limit=1)] == ["weekly"]
    # The clock is a parameter: a month earlier nobody was overdue yet.
    assert follow_ups(session, uid, NOW - timedelta(days=40)) == []
    # A new email resets the silence.
    touch(session, people["weekly"], NOW - timedelta(days=1))
    session.commit()
    assert [f.display_name for f in follow_ups(session, uid, NOW)] == ["fortnightly"]


# --- timeline, last contact, stale --------------------------------------------------------------

def test_timeline_merges_sources_newest_first(session, uid):
    ada = svc.add_contact(session, uid, name="Ada", emails=["ada@example.com"])
    touch(session, ada, NOW - timedelta(days=3), direction="in", subject="Re: plans")
    touch(session, ada, NOW - timedelta(days=1), kind="meeting", source="calendar", direction=None,
          subject="Lunch")
    touch(session, ada, NOW - timedelta(days=5), direction="out", subject="plans")
    touch(session, ada, NOW - timedelta(days=1), direction="out", subject="same minute, later id")
    session.commit()
    entries = svc.timeline(session, ada)
    assert [e["subject"] for e in entries] == ["same minute, later id", "Lunch", "Re: plans", "plans"]
    assert {e["source"] for e in entries} == {"gmail", "calendar"}
    assert [e["direction"] for e in entries] == ["out", None, "in", "out"]
    session.refresh(ada)
    assert ada.last_interaction_at == NOW - timedelta(days=1)


def test_stale_and_last_contact_sort(session, uid):
    fresh = svc.add_contact(session, uid, name="fresh")
    old = svc.add_contact(session, uid, name="old")
    silent = svc.add_contact(session, uid, name="silent")
    touch(session, fresh, NOW - timedelta(days=2))
    touch(session, old, NOW - timedelta(days=100))
    session.commit()
    stale = svc.list_contacts(session, uid, ContactFilter(stale=30), sort="last-contact", order="desc", now=NOW)
    assert [c.display_name for c in stale.items] == ["old", "silent"]
    ordered = svc.list_contacts(session, uid, ContactFilter(), sort="last-contact", order="asc", now=NOW)
    assert [c.display_name for c in ordered.items] == ["old", "fresh", "silent"]
    assert svc.matching_ids(session, uid, ContactFilter(stale=30), now=NOW) == sorted([old.id, silent.id])
