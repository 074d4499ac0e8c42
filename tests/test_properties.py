"""Property-based tests (hypothesis) on SQLite and PostgreSQL.

- export → import preserves every contact field for field, whatever the text (quotes, commas, newlines,
  emoji, RTL, formula-looking cells, phones written any way), and importing it again changes nothing;
- email and phone normalisation are idempotent;
- `contacts list` with random filter combinations returns exactly what a plain-Python filter over the
  same data returns, in the documented order.

Each example works under a fresh user name, so examples never see each other's rows and no database has
to be rebuilt between them (the function-scoped fixtures are shared on purpose).
"""

from __future__ import annotations

import io
import uuid
from datetime import date, datetime, time, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from omnicrm import contacts as svc
from omnicrm import csvio
from omnicrm.filters import ContactFilter
from omnicrm.models import Contact
from omnicrm.normalize import clean_text, digits, fold, is_valid_email, normalise_email, to_e164

PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
               derandomize=True)

# --- strategies ----------------------------------------------------------------------------------

SPECIAL = ['"', "'", ",", ";", "\n", "\r\n", "\t", "=", "+", "-", "@", "😀", "👩‍👩‍👧", "שלום", "مرحبا",
           "\u202e", "é", "Ω", "\\", "%", "_", "<b>", "${HOME}", "$(id)", "`x`", "'; DROP TABLE contacts;--"]
FORMULAS = ["=1+2", "=HYPERLINK(\"http://x\")", "+SUM(A1:A2)", "-2+3", "@cmd", "\t=1", "'=already quoted",
            "=", "+", "-", "@"]

plain_chars = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), max_codepoint=0x1FAFF)
free_text = st.lists(st.one_of(st.text(plain_chars, min_size=1, max_size=6), st.sampled_from(SPECIAL)),
                     min_size=1, max_size=6).map("".join)
text_value = st.one_of(free_text, st.sampled_from(FORMULAS), st.sampled_from(FORMULAS).flatmap(
    lambda f: free_text.map(lambda t: f + t)))
optional_text = st.one_of(st.none(), text_value)
phone = st.one_of(
    st.sampled_from(["+1 415 555 0101", "(415) 555-0102", "415.555.0103", "+44 20 7946 0958", "020 7946 0959",
                     "+33 1 42 68 53 00", "555-0104", "12345", "+1-415-555-0105 ext 7", "0049 30 123456"]),
    st.tuples(st.text(st.sampled_from("+(. "), max_size=2), st.text(st.sampled_from("0123456789"), min_size=3,
                                                                  max_size=12),
              st.text(st.sampled_from("0123456789 -().+"), max_size=8)).map("".join),
)
tag = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzé-_ 0123456789"), min_size=1, max_size=12).filter(
    lambda t: t.strip())
email_local = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789._+-'"), min_size=1, max_size=12)


@st.composite
def contact_specs(draw):
    name = draw(optional_text)
    n_emails = draw(st.integers(0 if clean_text(name) else 1, 3))
    emails = [f"{draw(email_local)}{i}@{draw(st.sampled_from(['example.com', 'exämple.de', 'x.co.uk']))}"
              for i in range(n_emails)]
    return {"name": name, "emails": [e for e in emails if is_valid_email(normalise_email(e))],
            "phones": draw(st.lists(phone, max_size=3)), "company": draw(optional_text),
            "title": draw(optional_text), "tags": draw(st.lists(tag, max_size=3)),
            "note": draw(st.one_of(st.none(), text_value))}


def comparable(contact: Contact) -> dict:
    record = svc.record(contact)
    return {key: record[key] for key in ("display_name", "email", "phone", "company", "title", "notes")} | {
        "tags": sorted(record["tags"])}


def _user() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


# --- export → import round trip ---------------------------------------------------------------------

@hsettings(max_examples=15, **PROFILE)
@given(specs=st.lists(contact_specs(), min_size=1, max_size=5))
def test_export_then_import_preserves_every_field_and_reimport_changes_nothing(session, settings, specs):
    from omnicrm.db import user_id

    source_user, target_user = user_id(session, _user()), user_id(session, _user())
    made = []
    for i, spec in enumerate(specs):
        emails = [f"{i}.{e}" for e in spec["emails"]]  # unique per user
        if not clean_text(spec["name"]) and not emails:
            continue
        made.append(svc.add_contact(session, source_user, name=spec["name"], emails=emails, phones=spec["phones"],
                                    company=spec["company"], title=spec["title"], tags=spec["tags"],
                                    note=spec["note"] if clean_text(spec["note"]) else None))
    session.commit()
    assume(made)
    for fmt in ("csv",):
        out = io.StringIO()
        assert csvio.export_contacts(session, source_user, ContactFilter(), fmt, out) == len(made)
        data = out.getvalue().encode("utf-8")
        summary = csvio.import_contacts(session, target_user, csvio.open_csv(io.BytesIO(data)),
                                        csvio.ImportOptions())
        assert not summary.failed and summary.rejected == 0, summary.errors
        session.commit()
    session.expire_all()
    before = [comparable(c) for c in svc.iter_contacts(session, source_user, ContactFilter(), sort="created")]
    after = [comparable(c) for c in svc.iter_contacts(session, target_user, ContactFilter(), sort="created")]
    assert after == before
    # importing the file again into the user it came from merges every contact into itself (by its id and
    # created_at, and by its emails): no duplicate, no change
    summary = csvio.import_contacts(session, source_user, csvio.open_csv(io.BytesIO(data)), csvio.ImportOptions())
    assert summary.rejected == 0 and summary.created == 0 and summary.merged == len(made)
    session.commit()
    session.expire_all()
    again = [comparable(c) for c in svc.iter_contacts(session, source_user, ContactFilter(), sort="created")]
    assert again == before


def test_reimport_of_contacts_without_email_creates_no_duplicate(session, settings):
    from omnicrm.db import user_id

    uid = user_id(session, _user())
    svc.add_contact(session, uid, name="No Email", company="Acme")
    session.commit()
    out = io.StringIO()
    csvio.export_contacts(session, uid, ContactFilter(), "csv", out)
    csvio.import_contacts(session, uid, csvio.open_csv(io.BytesIO(out.getvalue().encode())), csvio.ImportOptions())
    session.commit()
    assert svc.list_contacts(session, uid, ContactFilter()).total == 1


# --- normalisation is idempotent ---------------------------------------------------------------------

@hsettings(max_examples=200, deadline=None)
@given(value=st.text(max_size=40))
def test_email_normalisation_is_idempotent(value):
    once = normalise_email(value)
    assert normalise_email(once) == once
    assert is_valid_email(once) == is_valid_email(normalise_email(once))


@hsettings(max_examples=200, deadline=None)
@given(raw=st.one_of(phone, st.text(max_size=25)), region=st.sampled_from(["US", "GB", "FR", "DE", "CA"]))
def test_phone_normalisation_is_idempotent(raw, region):
    e164 = to_e164(raw, region)
    if e164 is not None:
        assert e164.startswith("+") and digits(e164) == e164[1:]
        assert to_e164(e164, region) == e164
        assert to_e164(e164, "US") == e164  # E.164 carries its country: the region no longer matters
    assert fold(fold(raw)) == fold(raw)


# --- filtered list == a plain-Python reference filter --------------------------------------------------

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
NAME_PARTS = ["Ann", "Zoë", "zoe", "Émile", "Bob", "O'Hara", "李", "Ann-Marie", "%", "_"]
COMPANIES = [None, "Acme", "ACME Corp", "Ångström AB", "50% Off", "Under_Score"]
PHONES = ["+1 415 555 0101", "(415) 555-0199", "020 7946 0958", "555-7777"]
TAGS = ["vip", "lead", "friend", "press"]


@st.composite
def datasets(draw):
    rows = []
    for i in range(draw(st.integers(0, 10))):
        rows.append({
            "name": " ".join(draw(st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=2))),
            "company": draw(st.sampled_from(COMPANIES)),
            "emails": [f"{draw(st.sampled_from(['ann', 'zoe', 'b.o', 'x_y']))}{i}@{draw(st.sampled_from(['acme.io', 'mail.org']))}"
                       for _ in range(draw(st.integers(0, 1)))],
            "phones": draw(st.lists(st.sampled_from(PHONES), max_size=2, unique=True)),
            "tags": draw(st.lists(st.sampled_from(TAGS), max_size=3, unique=True)),
            "created_days_ago": draw(st.integers(0, 400)),
            "last_days_ago": draw(st.one_of(st.none(), st.integers(0, 400))),
        })
    return rows


searches = st.one_of(st.none(), st.sampled_from(
    ["ann", "ZOE", "zoë", "emile", "acme", "angstrom", "%", "_", "o'h", "555", "415-555", "(415)", "4155550101",
     "7946", "mail.org", "0@", "李", "marie", "ann-marie", "50%", "der_s", "nobody"]))
days = st.integers(0, 400)
createds = st.one_of(st.none(), st.tuples(days, st.none()), st.tuples(st.none(), days), st.tuples(days, days))


def _local_midnight(day: date) -> datetime:
    return datetime.combine(day, time.min).astimezone().astimezone(timezone.utc)


def reference(rows: list[dict], search, tags, stale, created) -> list[int]:
    """The SPEC's filter semantics written plainly over Python data; default order created desc, id desc."""
    out = []
    for row in rows:
        if search:
            query = search.strip()
            phone_like = all(c in "0123456789 ()+.-/" for c in query) and len(digits(query)) >= 3
            term = digits(query) if phone_like else fold(query)
            fields = [fold(row["name"]), fold(row["company"]), *row["emails"]]
            fields += [digits(p) for p in row["phones"]] + [digits(to_e164(p, "US") or "") for p in row["phones"]]
            if not any(term in f for f in fields if f):
                continue
        if any(t not in row["tags"] for t in tags):
            continue
        if stale is not None and row["last"] is not None and row["last"] >= NOW - timedelta(days=stale):
            continue
        if created is not None:
            start, end = created
            if start is not None and row["created"] < _local_midnight(start):
                continue
            if end is not None and row["created"] >= _local_midnight(end + timedelta(days=1)):
                continue
        out.append(row)
    out.sort(key=lambda r: (r["created"], r["id"]), reverse=True)
    return [r["id"] for r in out]


@hsettings(max_examples=20, **PROFILE)
@given(rows=datasets(), data=st.data())
def test_filtered_list_equals_reference_filter(session, settings, rows, data):
    from sqlalchemy import update

    from omnicrm.db import user_id

    uid = user_id(session, _user())
    for row in rows:
        contact = svc.add_contact(session, uid, name=row["name"], emails=row["emails"], phones=row["phones"],
                                  company=row["company"], tags=row["tags"])
        row["id"] = contact.id
        # whole seconds and many ties: the id tie-break must decide
        row["created"] = (NOW - timedelta(days=row["created_days_ago"] // 3 * 3)).replace(hour=3)
        row["last"] = None if row["last_days_ago"] is None else NOW - timedelta(days=row["last_days_ago"])
        session.flush()
        session.execute(update(Contact).where(Contact.id == contact.id).values(
            created_at=row["created"], last_interaction_at=row["last"]))
    session.commit()
    for _ in range(4):
        search = data.draw(searches)
        tags = tuple(data.draw(st.lists(st.sampled_from(TAGS + ["VIP", "none-such"]), max_size=2)))
        stale = data.draw(st.one_of(st.none(), st.integers(0, 400)))
        created = data.draw(createds)
        created_spec = None
        created_dates = None
        if created is not None:
            start = (NOW - timedelta(days=created[0])).date() if created[0] is not None else None
            end = (NOW - timedelta(days=created[1])).date() if created[1] is not None else None
            if start and end and end < start:
                start, end = end, start
            created_dates = (start, end)
            created_spec = f"{start.isoformat() if start else ''}..{end.isoformat() if end else ''}"
        flt = ContactFilter(search=search, tags=tags, stale=stale, created=created_spec)
        page = svc.list_contacts(session, uid, flt, page_size=200, now=NOW)
        expected = reference(rows, search, [t.lower() for t in tags], stale, created_dates)
        assert [c.id for c in page.items] == expected, (search, tags, stale, created_spec)
        assert page.total == len(expected)
        assert svc.matching_ids(session, uid, flt, now=NOW) == sorted(expected)
