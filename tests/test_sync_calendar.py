"""Calendar sync against the fake Google API (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from omnicrm import contacts as contact_service
from omnicrm.models import ContactEmail, Interaction
from tests.fakes.google_api import populate
from tests.fakes.sync_env import ME, sync_env



@pytest.fixture
def env(db_url, monkeypatch):
    with sync_env(db_url, monkeypatch, "calendar") as bench:
        yield bench


def meeting(event_id, start, *attendees, summary="Sync", organizer_self=True, **extra):
    people = [{"email": ME, "self": True, "responseStatus": "accepted"}]
    people += [{"email": a, "responseStatus": "declined" if i else "needsAction"} for i, a in enumerate(attendees)]
    return {"id": event_id, "summary": summary, "start": start, "end": start, "attendees": people,
            "organizer": {"email": ME, "self": True} if organizer_self else {"email": attendees[0]}, **extra}


def meetings_of(session, email):
    contact = session.scalar(select(ContactEmail).where(ContactEmail.email == email)).contact
    return [(t["kind"], t["subject"], t["occurred_at"]) for t in contact_service.timeline(session, contact)]


def test_full_then_incremental_with_cancellation_and_all_day(env):
    fake = env.fake
    fake.put_event(meeting("e1", {"dateTime": "2024-03-01T10:00:00+01:00"}, "ann@x.org", "Bob@X.org"))
    fake.put_event(meeting("e2", {"date": "2024-03-05"}, "ann@x.org", summary="Offsite"))
    fake.put_event({**meeting("e3", {"dateTime": "2024-03-06T09:00:00Z"}, "room@resource.calendar.google.com"),
                    "attendees": [{"email": "room@resource.calendar.google.com", "resource": True},
                                  {"email": ME, "self": True}]})
    # A recurring event as singleEvents=true lists it: one instance per occurrence.
    for day in (10, 17):
        fake.put_event(meeting(f"w1_202403{day}T090000Z", {"dateTime": f"2024-03-{day}T09:00:00Z"}, "cy@x.org",
                               summary="Weekly", recurringEventId="w1"))
    stats = env.sync()
    assert stats["mode"] == "full"
    emails = sorted(env.session.scalars(select(ContactEmail.email)))
    assert emails == ["ann@x.org", "bob@x.org", "cy@x.org"]
    assert meetings_of(env.session, "ann@x.org") == [
        ("meeting", "Offsite", datetime(2024, 3, 5, tzinfo=timezone.utc)),
        ("meeting", "Sync", datetime(2024, 3, 1, 9, tzinfo=timezone.utc))]
    assert len(meetings_of(env.session, "cy@x.org")) == 2
    assert fake.counts["calendar.events.list"] == 1

    fake.reset_counts()
    fake.cancel_event("e1")
    fake.put_event(meeting("e4", {"dateTime": "2024-04-01T10:00:00Z"}, "dee@x.org", summary="New"))
    fake.put_event(meeting("e2", {"date": "2024-03-06"}, "ann@x.org", summary="Offsite moved"))
    stats = env.sync()
    assert stats["mode"] == "incremental" and fake.counts["calendar.events.list"] == 1
    assert meetings_of(env.session, "ann@x.org") == [
        ("meeting", "Offsite moved", datetime(2024, 3, 6, tzinfo=timezone.utc))]
    assert meetings_of(env.session, "bob@x.org") == []
    assert meetings_of(env.session, "dee@x.org")[0][1] == "New"
    ann = contact_service.resolve(env.session, env.uid, "ann@x.org")
    env.session.refresh(ann)
    assert ann.last_interaction_at == datetime(2024, 3, 6, tzinfo=timezone.utc)

    fake.reset_counts()
    env.sync()
    assert fake.counts["requests"] == 1


def test_removed_attendee_loses_the_meeting(env):
    env.fake.put_event(meeting("e1", {"dateTime": "2024-03-01T10:00:00Z"}, "ann@x.org", "bob@x.org"))
    env.sync()
    env.fake.put_event(meeting("e1", {"dateTime": "2024-03-01T10:00:00Z"}, "ann@x.org"))
    stats = env.sync()
    assert stats["interactions_removed"] == 1
    assert meetings_of(env.session, "bob@x.org") == []


def test_expired_token_full_resync_same_end_state(env):
    populate(env.fake, events=60, correspondents=15)
    env.sync()
    env.fake.expire_calendar_tokens()
    env.fake.cancel_event("ev000003")  # deleted while the token was expired
    env.fake.put_event(meeting("late", {"dateTime": "2025-01-01T10:00:00Z"}, "late@x.org"))
    env.fake.reset_counts()
    stats = env.sync()
    assert stats["mode"] == "full"
    assert env.fake.counts["calendar.events.list"] == 2  # the 410, then the full listing
    env.sync(user="control")
    assert env.snap() == env.snap("control")
    assert not env.session.scalars(select(Interaction).where(Interaction.external_id.like("ev000003:%"))).all()


def test_pages_and_since(env, monkeypatch):
    monkeypatch.setenv("OMNICRM_SYNC_PAGE_SIZE", "7")
    populate(env.fake, events=30, correspondents=30)
    env.sync()
    assert env.fake.counts["calendar.events.list"] == 5
    env.sync(user="recent", full=True, since=datetime(2020, 9, 23, tzinfo=timezone.utc))
    from omnicrm.db import user_id

    recent = user_id(env.session, "recent")
    times = env.session.scalars(select(Interaction.occurred_at).where(Interaction.user_id == recent)).all()
    assert times and min(times) >= datetime(2020, 9, 23, tzinfo=timezone.utc) and len(times) < 30
