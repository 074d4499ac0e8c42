"""Google Contacts (People API) sync against the fake (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from google.oauth2.credentials import Credentials
from sqlalchemy import func, select

from omnicrm import contacts as contact_service
from omnicrm.models import Contact, ExternalLink, SyncState
from tests.fakes.google_api import populate
from tests.fakes.sync_env import sync_env



@pytest.fixture
def env(db_url, monkeypatch):
    with sync_env(db_url, monkeypatch, "contacts") as bench:
        yield bench


def person(n, name, *emails, phone=None, org=None, labels=()):
    out = {"resourceName": f"people/c{n}", "names": [{"displayName": name}],
           "emailAddresses": [{"value": e} for e in emails],
           "memberships": [{"contactGroupMembership": {"contactGroupResourceName": g}}
                           for g in ("contactGroups/myContacts", *labels)]}
    if phone:
        out["phoneNumbers"] = [{"value": phone}]
    if org:
        out["organizations"] = [{"name": org[0], "title": org[1]}]
    return out


def test_full_then_incremental_with_labels_and_deletion(env):
    fake = env.fake
    fake.put_group("contactGroups/g1", "Investors")
    fake.put_person(person(1, "Ann Lee", "Ann@x.org", "ann@work.example", phone="(415) 555-0100",
                           org=("ACME", "CTO"), labels=["contactGroups/g1", "contactGroups/starred"]))
    fake.put_person(person(2, "Bob Stone", "bob@x.org"))
    fake.put_person({"resourceName": "otherContacts/o1", "emailAddresses": [{"value": "olga@x.org"}],
                     "names": [{"displayName": "Olga"}]}, other=True)
    stats = env.sync()
    assert stats["contacts_created"] == 3
    ann = contact_service.resolve(env.session, env.uid, "ann@work.example")
    assert (ann.display_name, ann.company, ann.title) == ("Ann Lee", "ACME", "CTO")
    assert [e.email for e in ann.emails] == ["ann@x.org", "ann@work.example"]
    assert [p.value for p in ann.phones] == ["+14155550100"]
    assert sorted(t.name for t in ann.tags) == ["investors", "starred"]
    links = dict(env.session.execute(select(ExternalLink.external_id, ExternalLink.source)).all())
    assert links == {"people/c1": "google_contacts", "people/c2": "google_contacts",
                     "otherContacts/o1": "google_other_contacts"}
    state = env.session.scalar(select(SyncState).where(SyncState.source == "contacts"))
    assert set(json.loads(state.cursor)) == {"connections", "other"}

    fake.reset_counts()
    fake.put_person(person(1, "Ann Lee-Smith", "ann@x.org", org=("ACME", "CEO")))
    fake.delete_person("people/c2")
    fake.put_person(person(3, "Cy", "cy@x.org"))
    stats = env.sync()
    assert stats["mode"] == "incremental" and stats["links_removed"] == 1
    env.session.expire_all()
    ann = contact_service.resolve(env.session, env.uid, "ann@x.org")
    assert (ann.display_name, ann.title) == ("Ann Lee-Smith", "CEO")
    assert contact_service.resolve(env.session, env.uid, "bob@x.org")  # unlinked, not deleted
    assert not env.session.scalar(select(ExternalLink).where(ExternalLink.external_id == "people/c2"))
    assert fake.counts["people.contactGroups.list"] == 0

    fake.reset_counts()
    env.sync()
    assert fake.counts["requests"] == 2  # connections + other contacts, one page each


def test_manual_edits_win(env):
    env.fake.put_person(person(1, "Ann Lee", "ann@x.org", org=("ACME", "CTO")))
    env.sync()
    ann = contact_service.resolve(env.session, env.uid, "ann@x.org")
    contact_service.update_contact(env.session, ann, name="Annie", add_tags=["friend"])
    env.session.commit()
    env.fake.put_person(person(1, "Ann Lee (new)", "ann@x.org", org=("Initech", "CEO")))
    env.sync()
    env.session.expire_all()
    ann = contact_service.resolve(env.session, env.uid, "ann@x.org")
    assert ann.display_name == "Annie"  # hand-set
    assert (ann.company, ann.title) == ("Initech", "CEO")  # still synced
    assert [t.name for t in ann.tags] == ["friend"]


def test_links_to_existing_contact_by_any_email_without_duplicates(env):
    contact_service.add_contact(env.session, env.uid, name="Bob", emails=["b2@x.org"], company="Mine")
    env.session.commit()
    env.fake.put_person(person(1, "Robert", "b1@x.org", "B2@x.org", org=("Theirs", "Boss")))
    env.sync()
    env.sync(full=True)
    assert env.session.scalar(select(func.count()).select_from(Contact)) == 1
    bob = contact_service.resolve(env.session, env.uid, "b1@x.org")
    assert (bob.display_name, bob.company, bob.title) == ("Bob", "Mine", "Boss")


def test_expired_sync_token_full_listing_same_end_state(env):
    populate(env.fake, people=40, other=5, correspondents=10)
    env.sync()
    env.fake.expire_people_tokens()
    env.fake.put_person(person(4, "Renamed", "person4@example.org"))
    env.fake.put_person(person(99, "Late", "late@x.org"))
    stats = env.sync()
    assert stats["mode"] == "full"
    env.sync(user="control")
    assert env.snap() == env.snap("control")
    # Someone deleted while the token was expired is unlinked by the full listing (the contact stays).
    env.fake.expire_people_tokens()
    env.fake.delete_person("people/c000005")
    env.sync()
    assert not env.session.scalar(select(ExternalLink).where(ExternalLink.user_id == env.uid,
                                                             ExternalLink.external_id == "people/c000005"))


def test_other_contacts_skipped_when_not_granted(env):
    env.fake.other_contacts_granted = False
    env.fake.put_person({"resourceName": "otherContacts/o1", "emailAddresses": [{"value": "olga@x.org"}]},
                        other=True)
    env.fake.put_person(person(1, "Ann", "ann@x.org"))
    env.sync()
    assert sorted(env.session.scalars(select(func.count()).select_from(Contact))) == [1]
    # Credentials that say the scope was not granted: not even asked.
    env.fake.reset_counts()
    creds = Credentials(token="t", scopes=["https://www.googleapis.com/auth/contacts.readonly"])
    env.sync(user="other", credentials=creds)
    assert env.fake.counts["people.otherContacts.list"] == 0
