"""Duplicate detection and merging (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from omnicrm import contacts as svc
from omnicrm.db import user_id as get_user_id
from omnicrm.duplicates import count_rows, find_duplicates, merge_contacts, name_key, one_edit_pairs, preview_merge
from omnicrm.errors import InvalidInput, NotFound
from omnicrm.models import Contact, ExternalLink

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def uid(session, monkeypatch):
    monkeypatch.setenv("OMNICRM_NOW", NOW.isoformat())  # notes are dated by the clock
    value = get_user_id(session, "alice")
    session.commit()
    return value


def add(session, uid, name, **kw):
    return svc.add_contact(session, uid, name=name, **kw)


def groups_by_names(session, uid):
    return {tuple(g.names): g.reasons for g in find_duplicates(session, uid)}


def test_name_key_folds_punctuation_and_order():
    assert name_key("Smith, John") == name_key("john  SMITH") == "john smith"
    assert name_key("Zoë O'Neil") == name_key("o neil zoe")
    assert name_key(None) == ""


def test_one_edit_pairs_finds_exactly_the_brute_force_pairs():
    import itertools
    import random

    def distance_one(a, b):
        if a == b or abs(len(a) - len(b)) > 1:
            return False
        if len(a) == len(b):
            return sum(x != y for x, y in zip(a, b)) == 1
        short, long_ = sorted((a, b), key=len)
        return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))

    rng = random.Random(7)
    for _ in range(20):
        keys = {"".join(rng.choices("ab ", k=rng.randint(1, 7))) for _ in range(60)}
        expected = {tuple(sorted(p)) for p in itertools.combinations(keys, 2) if distance_one(*p)}
        assert one_edit_pairs(keys) == expected


def test_duplicate_detection_cases(session, uid):
    add(session, uid, "Ada Lovelace", phones=["+1 415 555 0101"])
    add(session, uid, "Countess of Lovelace", phones=["(415) 555-0101"])
    add(session, uid, "Zoë Ng", company="Acme Corp.")
    add(session, uid, "zoe NG", company="ACME corp")
    add(session, uid, "Sam Lee", company="Initech", emails=["sam@initech.com"])
    add(session, uid, "Sam Lee", company="Initech Ltd", emails=["slee@initech.com"])
    add(session, uid, "Pat Kim", company="Foo", emails=["pat@gmail.com"])   # free-mail domain: not evidence
    add(session, uid, "Pat Kim", company="Bar", emails=["pk@gmail.com"])
    add(session, uid, "Smith, John")
    add(session, uid, "John Smith", emails=["john@example.org"])
    add(session, uid, "Jon Smith")
    add(session, uid, "Al Wu")                                                # too short for one-letter fuzz
    add(session, uid, "Al Xu")
    add(session, uid, "Grace Hopper", phones=["555"])                         # too short a number
    add(session, uid, "Alan Turing", phones=["555"])
    other = get_user_id(session, "mallory")
    svc.add_contact(session, other, name="Ada Lovelace", phones=["415-555-0101"])
    session.commit()

    found = groups_by_names(session, uid)
    assert found[("Ada Lovelace", "Countess of Lovelace")] == ["same phone +14155550101"]
    assert found[("Zoë Ng", "zoe NG")][0] == "same name and company (Acme Corp.)"
    assert found[("Sam Lee", "Sam Lee")] == ["same name and email domain (initech.com)"]
    smiths = found[("Smith, John", "John Smith", "Jon Smith")]
    assert "same name (Smith, John / John Smith)" in smiths
    assert any(r.startswith("near-identical names") for r in smiths)
    assert len(found) == 4, found
    # The other user's contact with Ada's number is invisible here, and has no group of its own.
    assert find_duplicates(session, other) == []


# --- merge -------------------------------------------------------------------------------------

def touch(session, contact, days_ago, source, direction="in"):
    svc.record_interaction(session, contact.user_id, contact.id, kind="email" if source == "gmail" else "meeting",
                           direction=direction, occurred_at=NOW - timedelta(days=days_ago),
                           subject=f"{source} {days_ago}", source=source,
                           external_id=f"{source}-{contact.id}-{days_ago}")


def build_family(session, uid):
    keep = add(session, uid, "Ada Lovelace", emails=["ada@acme.com"], phones=["+1 415 555 0101"], tags=["vip"])
    dup1 = add(session, uid, None, emails=["ada.l@acme.com", "ada@home.example"], phones=["(415) 555-0101"],
               company="Acme", tags=["vip", "math"], note="Met at the conference")
    dup2 = add(session, uid, "A. Lovelace", title="Countess", phones=["+44 20 7946 0958"], tags=["london"])
    svc.add_note(session, dup2, "Second note")
    touch(session, keep, 20, "gmail", "out")
    touch(session, dup1, 3, "gmail", "in")
    touch(session, dup2, 10, "calendar", "out")
    touch(session, dup2, 40, "gmail", "in")
    for contact, ext in ((dup1, "people/c1"), (dup2, "people/c2")):
        session.add(ExternalLink(user_id=uid, contact_id=contact.id, source="contacts", external_id=ext))
    bystander = add(session, uid, "Bystander", emails=["by@stander.example"], tags=["vip"])
    touch(session, bystander, 1, "gmail")
    session.commit()
    return keep, dup1, dup2, bystander


def test_merge_moves_every_related_row(session, uid):
    keep, dup1, dup2, bystander = build_family(session, uid)
    other = get_user_id(session, "mallory")
    svc.add_contact(session, other, name="Ada Lovelace", emails=["ada@mallory.example"], note="hers")
    session.commit()
    before, other_before = count_rows(session, uid), count_rows(session, other)
    timeline_before = {(e["source"], e["external_id"]) for c in (keep, dup1, dup2) for e in svc.timeline(session, c)}
    keep_id, gone = keep.id, [dup1.id, dup2.id]

    result = merge_contacts(session, uid, keep, [dup1, dup2], now=NOW)
    session.commit()
    session.expire_all()

    after = count_rows(session, uid)
    assert after == {**before, "contacts": before["contacts"] - 2,
                     "contact_phones": before["contact_phones"] - 1,  # the same number once
                     "contact_tags": before["contact_tags"] - 1}       # vip was on both; math, london move
    assert count_rows(session, other) == other_before
    assert session.scalars(select(Contact.id).where(Contact.id.in_(gone))).all() == []
    survivor = svc.resolve(session, uid, str(keep_id))
    data = svc.record(survivor, NOW)
    assert data["display_name"] == "Ada Lovelace"        # kept, not overwritten
    assert data["company"] == "Acme" and data["title"] == "Countess"  # filled
    assert data["email"] == ["ada@acme.com", "ada.l@acme.com", "ada@home.example"]
    assert data["phone"] == ["+14155550101", "+442079460958"]
    assert data["tags"] == ["london", "math", "vip"]
    assert data["notes"] == "Met at the conference\nSecond note"
    assert {(e["source"], e["external_id"]) for e in svc.timeline(session, survivor)} == timeline_before
    assert survivor.last_interaction_at == NOW  # the notes
    assert (survivor.interaction_count, survivor.inbound_count, survivor.outbound_count) == (6, 2, 2)
    assert {link for link in session.scalars(select(ExternalLink.external_id).where(
        ExternalLink.contact_id == keep_id))} == {"people/c1", "people/c2"}
    assert "ada@home.example" in survivor.search_text and "acme" in survivor.search_text
    assert svc.list_contacts(session, uid, svc.ContactFilter(search="home.example")).total == 1
    assert sorted(result.merged_ids) == sorted(gone) and result.filled == {"company": "Acme", "title": "Countess"}
    assert svc.resolve(session, uid, "ada.l@acme.com").id == keep_id
    assert svc.record(svc.resolve(session, uid, str(bystander.id)))["tags"] == ["vip"]


def test_merge_preview_writes_nothing(session, uid):
    keep, dup1, dup2, _ = build_family(session, uid)
    before = count_rows(session, uid)
    merged, summary = preview_merge(session, uid, keep, [dup1.id, str(dup2.id)], now=NOW)
    assert merged["email"] == ["ada@acme.com", "ada.l@acme.com", "ada@home.example"]
    assert summary["merged"] == [dup1.id, dup2.id]
    session.commit()
    assert count_rows(session, uid) == before
    assert svc.resolve(session, uid, "ada.l@acme.com").id == dup1.id


def test_merge_rejects_bad_refs(session, uid):
    keep = add(session, uid, "Keep")
    other = get_user_id(session, "mallory")
    theirs = svc.add_contact(session, other, name="Theirs")
    session.commit()
    with pytest.raises(InvalidInput):
        merge_contacts(session, uid, keep, [keep.id])
    with pytest.raises(NotFound):
        merge_contacts(session, uid, keep, [theirs.id])
    with pytest.raises(NotFound):
        merge_contacts(session, uid, keep, [theirs])
