"""Gmail sync against the fake Google API, through the real client library, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from omnicrm import contacts as contact_service
from omnicrm.models import Contact, ContactEmail, Interaction, SyncState
from omnicrm.sync.gmail import message_summary, parse_addresses
from tests.fakes.google_api import FakeGoogleApi, populate
from tests.fakes.sync_env import ME, sync_env



@pytest.fixture
def fake():
    with FakeGoogleApi(email=ME) as server:
        yield server


@pytest.fixture
def env(db_url, fake, monkeypatch):
    with sync_env(db_url, monkeypatch, "gmail", fake) as bench:
        yield bench


def emails_of(session, uid):
    return sorted(session.scalars(select(ContactEmail.email).where(ContactEmail.user_id == uid)))


# --- headers (no database) -------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    ('"Doe, John" <John.Doe@Example.com>', [("John Doe", "john.doe@example.com")]),
    ("=?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <jm@example.de>", [("Jürgen Müller", "jm@example.de")]),
    ("=?ISO-8859-1?Q?Andr=E9?= Pirard <PIRARD@vm1.ulg.ac.be>", [("André Pirard", "pirard@vm1.ulg.ac.be")]),
    ("undisclosed-recipients:;", []),
    ("Team: a@x.org, b@x.org;", [(None, "a@x.org"), (None, "b@x.org")]),
    ("ann@x.org, Bob <BOB+news@x.org>, ann@x.org", [(None, "ann@x.org"), ("Bob", "bob+news@x.org")]),
    ("'Carl' <carl@x.org>", [("Carl", "carl@x.org")]),
    ("carl@x.org <carl@x.org>", [(None, "carl@x.org")]),
    ("not an address", []),
    ('"Smith, Jr." <js@x.org>', [("Smith, Jr.", "js@x.org")]),
])
def test_parse_addresses(header, expected):
    assert parse_addresses(header) == expected


def msg(headers, labels=("INBOX",)):
    return {"id": "m1", "labelIds": list(labels), "internalDate": "1700000000000",
            "payload": {"headers": [{"name": k, "value": v} for k, v in headers.items()]}}


@pytest.mark.parametrize("headers, labels", [
    ({"From": "noreply@shop.example", "To": ME}, ["INBOX"]),
    ({"From": "No-Reply+abc@shop.example", "To": ME}, ["INBOX"]),
    ({"From": "MAILER-DAEMON@x.org", "To": ME}, ["INBOX"]),
    ({"From": "bounces@x.org", "To": ME}, ["INBOX"]),
    ({"From": "notifications@github.example", "To": ME}, ["INBOX"]),
    ({"From": "ann@x.org", "To": ME, "List-Id": "<list.x.org>"}, ["INBOX"]),
    ({"From": "ann@x.org", "To": ME, "List-Unsubscribe": "<mailto:u@x.org>"}, ["INBOX"]),
    ({"From": "ann@x.org", "To": ME, "Precedence": "Bulk"}, ["INBOX"]),
    ({"From": "ann@x.org", "To": ME, "Precedence": "junk"}, ["INBOX"]),
    ({"From": "ann@x.org", "To": ME, "Auto-Submitted": "auto-replied"}, ["INBOX"]),
    ({"From": "ann@x.org", "To": ME}, ["SPAM"]),
    ({"From": "ann@x.org", "To": ME}, ["TRASH", "INBOX"]),
    ({"From": ME, "To": "ann@x.org"}, ["DRAFT"]),
])
def test_excluded_messages(headers, labels):
    assert message_summary(msg(headers, labels), {ME}) is None


def test_message_summary_directions_and_bcc():
    inbound = message_summary(msg({"From": "Ann <ann@x.org>", "To": f"{ME}, cy@x.org", "Cc": "Dee <dee@x.org>",
                                   "Bcc": "hidden@x.org", "Auto-Submitted": "no",
                                   "Subject": "=?UTF-8?Q?Caf=C3=A9?="}), {ME})
    assert inbound["direction"] == "in"
    assert inbound["people"] == {"ann@x.org": "Ann", "cy@x.org": None, "dee@x.org": "Dee"}
    assert inbound["subject"] == "Café"
    outbound = message_summary(msg({"From": ME, "To": "ann@x.org", "Bcc": "Secret <sec@x.org>"}, ["SENT"]), {ME})
    assert outbound["direction"] == "out"
    assert outbound["people"] == {"ann@x.org": None, "sec@x.org": "Secret"}
    # Upper-case self address is still the user.
    assert message_summary(msg({"From": "ME@EXAMPLE.COM", "To": "ann@x.org"}), {ME})["direction"] == "out"


# --- syncing ---------------------------------------------------------------------------------

def test_full_then_incremental(env):
    fake = env.fake
    fake.add_message({"From": '"Doe, John" <John.Doe@Example.com>', "To": ME, "Subject": "Hi"}, id="a1")
    fake.add_message({"From": ME, "To": "undisclosed-recipients:;", "Bcc": "ann@x.org"}, labels=["SENT"], id="a2")
    fake.add_message({"From": "noreply@x.org", "To": ME, "Cc": "nobody@x.org"}, id="a3")
    fake.add_message({"From": "spam@x.org", "To": ME}, labels=["SPAM"], id="a4")
    stats = env.sync()
    assert stats["mode"] == "full"
    assert emails_of(env.session, env.uid) == ["ann@x.org", "john.doe@example.com"]
    john = contact_service.resolve(env.session, env.uid, "john.doe@example.com")
    assert john.display_name == "John Doe"
    timeline = contact_service.timeline(env.session, john)
    assert [(t["kind"], t["direction"], t["subject"], t["source"]) for t in timeline] == [("email", "in", "Hi", "gmail")]
    assert fake.counts["gmail.profile"] == 1 and fake.counts["gmail.messages.list"] == 1
    state = env.session.scalar(select(SyncState).where(SyncState.user_id == env.uid, SyncState.source == "gmail"))
    assert state.cursor.startswith("1004") and state.progress is None and state.last_success_at

    fake.reset_counts()
    fake.add_message({"From": "Eve <eve@x.org>", "To": ME, "Subject": "New"}, id="b1")
    stats = env.sync()
    assert stats["mode"] == "incremental" and stats["items"] == 1
    assert fake.counts["gmail.history.list"] == 1 and fake.counts["gmail.messages.list"] == 0
    assert fake.counts["gmail.profile"] == 0
    assert "eve@x.org" in emails_of(env.session, env.uid)

    fake.reset_counts()
    env.sync()  # nothing new: exactly one request
    assert fake.counts["requests"] == 1


def test_history_expired_falls_back_to_full_with_same_end_state(env):
    populate(env.fake, messages=120, correspondents=30)
    env.sync()
    populate_more = [env.fake.add_message({"From": f"late{i}@x.org", "To": ME}, id=f"late{i}") for i in range(5)]
    env.fake.expire_history()
    env.fake.reset_counts()
    stats = env.sync()
    assert stats["mode"] == "full" and env.fake.counts["gmail.profile"] == 1
    env.sync(user="control")
    assert env.snap() == env.snap("control")
    assert len(populate_more) == 5 and "late4@x.org" in emails_of(env.session, env.uid)


def test_empty_history_pages_are_tolerated(env):
    env.fake.add_message({"From": "ann@x.org", "To": ME}, id="x1")
    env.sync()
    env.fake.add_message({"From": "bob@x.org", "To": ME}, id="x2")
    env.fake.empty_history_pages = 2
    env.sync()
    assert "bob@x.org" in emails_of(env.session, env.uid)


def test_rerun_is_idempotent_and_full_resync_changes_nothing(env):
    populate(env.fake, messages=200, correspondents=40)
    env.sync()
    first = env.snap()
    n_contacts = env.session.scalar(select(func.count()).select_from(Contact))
    env.sync()
    stats = env.sync(full=True)
    assert stats["contacts_created"] == 0 and stats["interactions_created"] == 0
    assert env.snap() == first
    assert env.session.scalar(select(func.count()).select_from(Contact)) == n_contacts
    # One interaction per message and contact: 6 of 10 inbound (2 people each), 3 sent (1), 1 automated (0).
    assert env.session.scalar(select(func.count()).select_from(Interaction)) == 200 // 10 * (6 * 2 + 3)


def test_existing_contact_is_matched_by_any_email_and_manual_edits_win(env):
    contact = contact_service.add_contact(env.session, env.uid, name="Annie (by hand)",
                                          emails=["first@x.org", "ANN@x.org"])
    bare = contact_service.add_contact(env.session, env.uid, name=None, emails=["bare@x.org"])
    env.session.commit()
    env.fake.add_message({"From": "Ann Sync <ann@x.org>", "To": ME}, id="c1")
    env.fake.add_message({"From": "Bare Name <bare@x.org>", "To": ME}, id="c2")
    env.sync()
    env.session.expire_all()
    assert env.session.scalar(select(func.count()).select_from(Contact)) == 2
    assert contact_service.resolve(env.session, env.uid, "ann@x.org").display_name == "Annie (by hand)"
    assert contact_service.resolve(env.session, env.uid, "bare@x.org").display_name == "Bare Name"
    assert len(contact_service.timeline(env.session, contact)) == 1
    assert bare.id == contact_service.resolve(env.session, env.uid, "bare@x.org").id


@pytest.mark.parametrize("mode, expected", [
    ("all", ["ann@x.org", "bob@x.org", "cy@x.org"]),
    ("wrote-to", ["bob@x.org"]),
    ("none", []),
])
def test_create_contacts_setting(env, mode, expected):
    env.fake.add_message({"From": "ann@x.org", "To": f"{ME}, cy@x.org"}, id="d1")
    env.fake.add_message({"From": ME, "To": "bob@x.org"}, labels=["SENT"], id="d2")
    env.fake.add_message({"From": "bob@x.org", "To": ME}, id="d3")
    env.sync(create=mode)
    assert emails_of(env.session, env.uid) == expected
    if mode == "wrote-to":  # Bob's reply is on his timeline too
        bob = contact_service.resolve(env.session, env.uid, "bob@x.org")
        assert sorted(t["direction"] for t in contact_service.timeline(env.session, bob)) == ["in", "out"]


def test_users_are_isolated(env):
    env.fake.add_message({"From": "ann@x.org", "To": ME}, id="e1")
    env.sync(user="alice")
    assert emails_of(env.session, env.uid) == []


def test_since_limits_a_full_sync(env, monkeypatch):
    from datetime import datetime, timezone

    monkeypatch.setenv("OMNICRM_SYNC_PAGE_SIZE", "20")
    populate(env.fake, messages=100, correspondents=20)  # one message a minute from 2020-09-13 12:26 UTC
    since = datetime(2020, 9, 13, 13, 0, tzinfo=timezone.utc)
    env.sync(since=since)
    times = env.session.scalars(select(Interaction.occurred_at).where(Interaction.user_id == env.uid)).all()
    assert times and min(times) >= since
    assert env.fake.counts["gmail.messages.list"] < 5  # stopped listing once past the date
