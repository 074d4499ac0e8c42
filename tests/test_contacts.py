"""Contact services on real SQLite and PostgreSQL: CRUD, search, filters, sorting, paging, isolation, tags."""

from datetime import datetime, timedelta, timezone

import pytest

from omnicrm import contacts as svc
from omnicrm.db import user_id
from omnicrm.errors import InvalidInput, NotFound
from omnicrm.filters import ContactFilter

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def alice(session):
    uid = user_id(session, "alice")
    session.commit()
    return uid


def add(session, uid, name, **kw):
    contact = svc.add_contact(session, uid, name=name, **kw)
    session.commit()
    return contact


def names(page_or_items):
    items = page_or_items.items if hasattr(page_or_items, "items") else page_or_items
    return [c.display_name for c in items]


def test_add_normalises_and_round_trips(session, alice):
    c = add(session, alice, "  Zoë Adams ", emails=[" Zoe@Example.COM ", "zoe@work.org"],
            phones=["(415) 555-0101", "ext 12"], company="Café Ltd", title="CTO", tags=["VIP", " close  friends"],
            note="Met in Lyon")
    got = svc.record(svc.resolve(session, alice, "ZOE@example.com"))
    assert got["id"] == c.id
    assert got["display_name"] == "Zoë Adams"
    assert got["email"] == ["zoe@example.com", "zoe@work.org"]  # primary first
    assert got["phone"] == ["+14155550101", "ext 12"]  # E.164 when parseable, the text otherwise
    assert [p.raw for p in c.phones] == ["(415) 555-0101", "ext 12"]
    assert got["tags"] == ["close friends", "vip"]
    assert (got["company"], got["title"], got["notes"]) == ("Café Ltd", "CTO", "Met in Lyon")
    assert svc.resolve(session, alice, str(c.id)).id == c.id
    nigel = add(session, alice, "Nigel", phones=["020 7946 0958"], region="GB")  # the region fills the country
    assert svc.record(nigel)["phone"] == ["+442079460958"]


BAD_ADDS = [
    ({"name": None}, "--name"),
    ({"name": "   "}, "--name"),
    ({"name": "A", "emails": ["not-an-email"]}, "--email"),
    ({"name": "A", "phones": ["  "]}, "--phone"),
    ({"name": "A", "tags": [" "]}, "--tag"),
    ({"name": "x" * 10_001}, "--name"),
]


def test_add_rejects_bad_input(session, alice):
    for kwargs, option in BAD_ADDS:
        with pytest.raises(InvalidInput, match=option):
            svc.add_contact(session, alice, **kwargs)
        session.rollback()


def test_email_unique_per_user_not_globally(session, alice):
    add(session, alice, "Ann", emails=["ann@x.org"])
    with pytest.raises(InvalidInput, match="already belongs"):
        svc.add_contact(session, alice, name="Other", emails=["ANN@x.org"])
    session.rollback()
    bob = user_id(session, "bob")
    assert add(session, bob, "Bob's Ann", emails=["ann@x.org"]).id


def test_update_adds_removes_and_marks_manual(session, alice, monkeypatch):
    c = add(session, alice, "Ann", emails=["a@x.org"], phones=["+1 415 555 0101"], tags=["one"])
    monkeypatch.setenv("OMNICRM_NOW", "2030-01-01T00:00:00+00:00")
    changed = svc.update_contact(session, c, name="Ann B", company="Acme", add_emails=["b@x.org"],
                                 remove_emails=["A@X.org"], add_phones=["415-555-0199"],
                                 remove_phones=["(415) 555-0101"], add_tags=["two"], remove_tags=["ONE"])
    session.commit()
    assert changed
    got = svc.record(svc.resolve(session, alice, "b@x.org"))
    assert (got["display_name"], got["company"], got["email"], got["phone"], got["tags"]) == (
        "Ann B", "Acme", ["b@x.org"], ["+14155550199"], ["two"])
    assert got["updated_at"] == datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert set(c.manual_fields.split(",")) == {"display_name", "company"}
    with pytest.raises(NotFound):
        svc.resolve(session, alice, "a@x.org")
    assert not svc.update_contact(session, c, name="Ann B")  # no change


def test_update_rejects_bad_input(session, alice):
    c = add(session, alice, "Ann")
    for kwargs, option in (({"remove_emails": ["none@x.org"]}, "--remove-email"),
                           ({"remove_phones": ["123"]}, "--remove-phone"),
                           ({"add_emails": ["bad"]}, "--email")):
        with pytest.raises(InvalidInput, match=option):
            svc.update_contact(session, c, **kwargs)
    only = add(session, alice, None, emails=["only@x.org"])
    with pytest.raises(InvalidInput):  # a contact needs a name or an email
        svc.update_contact(session, only, remove_emails=["only@x.org"])


def test_other_users_contacts_are_not_found(session, alice):
    c = add(session, alice, "Ann", emails=["ann@x.org"], tags=["vip"])
    bob = user_id(session, "bob")
    for ref in (str(c.id), "ann@x.org"):
        with pytest.raises(NotFound):
            svc.resolve(session, bob, ref)
    assert svc.list_contacts(session, bob, ContactFilter()).total == 0
    assert svc.list_contacts(session, bob, ContactFilter(tags=("vip",))).total == 0
    assert svc.delete_contacts(session, bob, [c.id]) == 0
    assert svc.list_tags(session, bob) == []
    with pytest.raises(NotFound):
        svc.rename_tag(session, bob, "vip", "x")
    session.commit()
    assert svc.resolve(session, alice, str(c.id)).display_name == "Ann"
    for ref in ("999999", "nobody@x.org", "ann", ""):
        with pytest.raises(NotFound):
            svc.resolve(session, alice, ref)


@pytest.fixture
def people(session, alice):
    add(session, alice, "Zoë Adams", emails=["zoe@example.com"], phones=["+1 (415) 555-0101"], tags=["vip"])
    add(session, alice, "ZOE Brown", company="Straße AG", tags=["vip", "friend"])
    add(session, alice, "Émile Zola", emails=["emile@zola.fr"], phones=["415.555.0199"], tags=["friend"])
    add(session, alice, "Bob 100%_done", company="Café Ltd")
    return alice


SEARCHES = [
    ("zoe", ["Zoë Adams", "ZOE Brown"]),
    ("ZOË", ["Zoë Adams", "ZOE Brown"]),
    ("emile", ["Émile Zola"]),
    ("EMILE@ZOLA", ["Émile Zola"]),
    ("strasse", ["ZOE Brown"]),
    ("cafe", ["Bob 100%_done"]),
    ("4155550101", ["Zoë Adams"]),
    ("(415) 555-0101", ["Zoë Adams"]),
    ("+14155550199", ["Émile Zola"]),
    ("555", ["Zoë Adams", "Émile Zola"]),
    ("100%_", ["Bob 100%_done"]),
    ("%", ["Bob 100%_done"]),
    ("_", ["Bob 100%_done"]),
    ("nobody", []),
]


def test_search(session, people):
    for query, expected in SEARCHES:
        page = svc.list_contacts(session, people, ContactFilter(search=query), sort="name", order="asc")
        assert (sorted(names(page)), page.total) == (sorted(expected), len(expected)), query


def test_tags_all_must_match(session, people):
    assert sorted(names(svc.list_contacts(session, people, ContactFilter(tags=("vip",))))) == [
        "ZOE Brown", "Zoë Adams"]
    assert names(svc.list_contacts(session, people, ContactFilter(tags=("VIP", "friend")))) == ["ZOE Brown"]
    assert names(svc.list_contacts(session, people, ContactFilter(tags=("vip", "nope")))) == []


def test_created_periods_and_ranges(session, alice, monkeypatch):
    # One contact per instant; "now" is 2026-03-10 12:00 UTC; TZ of the test process is whatever it is,
    # so compare against ranges computed in UTC via explicit FROM..TO on dates far from midnight.
    for day in ("2025-12-31T12:00:00", "2026-01-05T12:00:00", "2026-03-01T12:00:00", "2026-03-10T11:00:00"):
        monkeypatch.setenv("OMNICRM_NOW", day + "+00:00")
        add(session, alice, day[:10])
    monkeypatch.delenv("OMNICRM_NOW")

    def created(spec):
        return sorted(names(svc.list_contacts(session, alice, ContactFilter(created=spec), now=T0)))

    assert created("today") == ["2026-03-10"]
    assert created("month") == ["2026-03-01", "2026-03-10"]
    assert created("year") == ["2026-01-05", "2026-03-01", "2026-03-10"]
    assert created("2026-01-05..2026-03-01") == ["2026-01-05", "2026-03-01"]
    assert created("..2025-12-31") == ["2025-12-31"]
    assert created("2026-03-02..") == ["2026-03-10"]


def test_stale(session, alice):
    fresh = add(session, alice, "Fresh")
    old = add(session, alice, "Old")
    add(session, alice, "Never")
    svc.record_interaction(session, alice, fresh.id, kind="email", direction="in", occurred_at=T0 - timedelta(days=2),
                           subject="hi", source="gmail", external_id="m1")
    svc.record_interaction(session, alice, old.id, kind="meeting", direction=None,
                           occurred_at=T0 - timedelta(days=40), subject="sync", source="calendar", external_id="e1")
    session.commit()
    stale = svc.list_contacts(session, alice, ContactFilter(stale=30), now=T0, sort="name", order="asc")
    assert names(stale) == ["Never", "Old"]
    assert names(svc.list_contacts(session, alice, ContactFilter(stale=1), now=T0, sort="name", order="asc")) == [
        "Fresh", "Never", "Old"]


@pytest.fixture
def tied(session, alice, monkeypatch):
    """Five contacts created at the same instant, two pairs with the same name."""
    monkeypatch.setenv("OMNICRM_NOW", "2026-01-01T00:00:00+00:00")
    ids = [add(session, alice, name).id for name in ("bea", "Ann", "ann", "Bea", "Cy")]
    monkeypatch.delenv("OMNICRM_NOW")
    return ids


def test_sorting_is_stable_with_ties(session, alice, tied):
    def order(sort, direction):
        return [c.id for c in svc.list_contacts(session, alice, ContactFilter(), sort=sort, order=direction).items]

    a_bea, a_ann, a_ann2, a_bea2, a_cy = tied
    assert order("created", "desc") == sorted(tied, reverse=True)  # the default: ties newest id first
    assert order("created", "asc") == sorted(tied)
    assert order("updated", "asc") == sorted(tied)
    assert order("name", "asc") == [a_ann, a_ann2, a_bea, a_bea2, a_cy]
    assert order("name", "desc") == [a_cy, a_bea2, a_bea, a_ann2, a_ann]
    assert order("last-contact", "desc") == sorted(tied, reverse=True)  # all empty: by id
    # paging through ties never repeats or skips a row
    seen = []
    for page in (1, 2, 3):
        seen += [c.id for c in svc.list_contacts(session, alice, ContactFilter(), sort="name", order="asc",
                                                 page=page, page_size=2).items]
    assert seen == [a_ann, a_ann2, a_bea, a_bea2, a_cy]


def test_last_contact_sort_puts_never_contacted_last(session, alice):
    a, b, c = (add(session, alice, n) for n in ("A", "B", "C"))
    for contact, days, ext in ((a, 5, "x1"), (c, 1, "x2")):
        svc.record_interaction(session, alice, contact.id, kind="email", direction="out",
                               occurred_at=T0 - timedelta(days=days), subject=None, source="gmail", external_id=ext)
    session.commit()
    desc = svc.list_contacts(session, alice, ContactFilter(), sort="last-contact", order="desc")
    asc = svc.list_contacts(session, alice, ContactFilter(), sort="last-contact", order="asc")
    assert names(desc) == ["C", "A", "B"]
    assert names(asc) == ["A", "C", "B"]


def test_paging(session, alice):
    empty = svc.list_contacts(session, alice, ContactFilter())
    assert (empty.total, empty.pages, empty.items) == (0, 1, [])
    for n in "ABCDE":
        add(session, alice, n)
    for page, size, expected_names, pages in ((1, 2, ["A", "B"], 3), (3, 2, ["E"], 3), (4, 2, [], 3),
                                              (1, 200, ["A", "B", "C", "D", "E"], 1), (100_000, 1, [], 5)):
        result = svc.list_contacts(session, alice, ContactFilter(), sort="name", order="asc", page=page,
                                   page_size=size)
        assert (names(result), result.total, result.pages) == (expected_names, 5, pages)


@pytest.mark.parametrize("page, size, option", [(0, 10, "--page"), (100_001, 10, "--page"), (1, 0, "--page-size"),
                                                (1, 201, "--page-size")])
def test_paging_bounds(page, size, option):
    with pytest.raises(InvalidInput, match=option):
        svc.check_paging(page, size)


def test_iter_and_matching_ids_and_delete(session, people):
    flt = ContactFilter(tags=("friend",))
    ids = svc.matching_ids(session, people, flt)
    assert len(ids) == 2
    assert [c.id for c in svc.iter_contacts(session, people, flt, batch=1)] == sorted(ids)
    target = svc.resolve(session, people, str(ids[0]))
    svc.add_note(session, target, "bye")
    session.commit()
    assert svc.delete_contacts(session, people, ids) == 2
    session.commit()
    assert sorted(names(svc.list_contacts(session, people, ContactFilter()))) == ["Bob 100%_done", "Zoë Adams"]
    assert {t["tag"]: t["contacts"] for t in svc.list_tags(session, people)} == {"friend": 0, "vip": 1}


def test_notes_and_timeline(session, alice, monkeypatch):
    c = add(session, alice, "Ann")
    monkeypatch.setenv("OMNICRM_NOW", "2026-03-01T09:00:00+00:00")
    svc.add_note(session, c, "First line\nmore")
    monkeypatch.setenv("OMNICRM_NOW", "2026-03-02T09:00:00+00:00")
    svc.add_note(session, c, "Second")
    assert svc.record_interaction(session, alice, c.id, kind="email", direction="in", occurred_at=T0,
                                  subject="Re: hi", source="gmail", external_id="m-1")
    assert not svc.record_interaction(session, alice, c.id, kind="email", direction="in", occurred_at=T0,
                                      subject="Re: hi", source="gmail", external_id="m-1")  # idempotent
    session.commit()
    entries = svc.timeline(session, c)
    assert [(e["kind"], e["subject"]) for e in entries] == [("email", "Re: hi"), ("note", "Second"),
                                                            ("note", "First line")]
    assert list(entries[0]) == svc.TIMELINE_FIELDS
    assert len(svc.timeline(session, c, limit=1)) == 1
    session.refresh(c)
    assert c.last_interaction_at == T0
    assert svc.record(c)["notes"] == "First line\nmore\nSecond"
    with pytest.raises(InvalidInput, match="TEXT"):
        svc.add_note(session, c, "   ")


def test_tags_list_and_rename_merges(session, alice):
    add(session, alice, "A", tags=["old"])
    add(session, alice, "B", tags=["old", "new"])
    add(session, alice, "C", tags=["new"])
    assert svc.list_tags(session, alice) == [{"tag": "new", "contacts": 2}, {"tag": "old", "contacts": 2}]
    assert svc.rename_tag(session, alice, "OLD", "New") == 2
    session.commit()
    assert svc.list_tags(session, alice) == [{"tag": "new", "contacts": 3}]
    assert svc.rename_tag(session, alice, "new", "Fresh Start") == 3
    session.commit()
    assert svc.list_tags(session, alice) == [{"tag": "fresh start", "contacts": 3}]
    with pytest.raises(NotFound):
        svc.rename_tag(session, alice, "missing", "x")
    with pytest.raises(InvalidInput):
        svc.rename_tag(session, alice, "fresh start", "  ")


@pytest.mark.parametrize("fields, expected", [(None, ["id", "email"]), ("id, company", ["id", "company"])])
def test_check_fields(fields, expected):
    assert svc.check_fields(fields, ["id", "email"]) == expected


@pytest.mark.parametrize("fields", ["nope", "id,bogus", ",,"])
def test_check_fields_rejects_unknown(fields):
    with pytest.raises(InvalidInput, match="--fields"):
        svc.check_fields(fields, ["id"])
