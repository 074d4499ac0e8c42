"""omnicrm.csvio and omnicrm.csvformats: reading real-world files, the bulk write path, phones, formulas."""

from __future__ import annotations

import io
import random
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from sqlalchemy import func, select

from omnicrm import csvio
from omnicrm.config import now as clock_now
from omnicrm.contacts import add_contact
from omnicrm.csvio import bulk, exporting, importing, reading
from omnicrm.db import user_id
from omnicrm.errors import InvalidInput
from omnicrm.models import Contact, ContactEmail, ContactPhone, ContactTag, Interaction, Note, Tag
from omnicrm.normalize import search_text, to_e164
from omnicrm.output import neutralise, unneutralise

DATA = Path(__file__).parent / "data" / "csv"


def opened(text: str | bytes, **kw) -> csvio.CsvInput:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return csvio.open_csv(io.BytesIO(raw), **kw)


def big(text: str) -> csvio.CsvInput:
    """`text` as an input that looks like a file of a bulk load's size (bulk.is_bulk_load)."""
    source = opened(text)
    source.total_bytes = 10 * bulk.BULK_MIN_ROWS * reading.BYTES_PER_ROW
    return source


def records(text: str | bytes, **kw) -> list[tuple[int, list[str]]]:
    return list(opened(text, **kw).records())


# --- phones -------------------------------------------------------------------------------------

def _shapes(rng: random.Random) -> str:
    area, exchange, line = rng.randint(0, 999), rng.randint(0, 999), rng.randint(0, 9999)
    return rng.choice([
        f"+1 ({area:03d}) {exchange:03d}-{line:04d}", f"{area:03d}.{exchange:03d}.{line:04d}",
        f"({area:03d}) {exchange:03d} {line:04d}", f"{area:03d}{exchange:03d}{line:04d}",
        f"1-{area:03d}-{exchange:03d}-{line:04d}", f"1{area:03d}{exchange:03d}{line:04d}",
        f"+1{area:03d}{exchange:03d}{line:04d}", f"+1 1{area:03d} {exchange:03d} {line:03d}",
        f"{exchange:03d}-{line:04d}", f"+44 20 {exchange:04d} {line:04d}", f"0{area:03d} {line:04d}",
        f"+{area} {exchange}", f"{area}-{exchange}", f"({area:03d}){exchange:03d}-{line:04d} x12",
    ])


@pytest.mark.parametrize("region", ["US", "CA", "GB"])
def test_phone_fast_path_gives_libphonenumber_answers(region):
    rng = random.Random(region)
    for _ in range(3000):
        raw = _shapes(rng)
        assert csvio.phone_e164(raw, region) == to_e164(raw, region), raw


def test_phone_fast_path_of_every_country_calling_code():
    """International numbers (the plus first) of every country calling code, of every national length, some
    starting with 0 or with the country's national prefix, with separators here and there."""
    import phonenumbers

    rng = random.Random(44)
    for code in sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE):
        for _ in range(40):
            national = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 17)))
            raw = "+" + "".join(ch + (rng.choice(" ().-") if rng.random() < 0.2 else "") for ch in f"{code}{national}")
            assert csvio.phone_e164(raw, "GB") == to_e164(raw, "GB"), raw


@hsettings(max_examples=400, deadline=None)
@given(st.from_regex(r"\+[0-9 ().-]{3,20}", fullmatch=True))
def test_phone_fast_path_on_arbitrary_international_strings(raw):
    assert csvio.phone_e164(raw, "US") == to_e164(raw, "US")


@hsettings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789 ().-+٤١٥", min_size=1, max_size=18))
def test_phone_fast_path_on_arbitrary_strings(raw):
    """(Other scripts' digits: the shortcut once copied them into the E.164 form.)"""
    assert csvio.phone_e164(raw, "US") == to_e164(raw, "US")


# --- formula guard ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,guarded", [
    ("=HYPERLINK(\"http://x\",\"y\")", True), ("@SUM(A1:A2)", True), ("+cmd|' /C calc'!A0", True),
    ("-- call me", True), ("=vip;+lead", True), ("\tx", True), ("\rx", True), ("'=already", True),
    ("+14155550101", False), ("+1 (415) 555-0101;+44 20 7946 0958", False), ("-42", False),
    ("-ann@example.com", False), ("ann@example.com", False), ("plain text", False), ("'quoted", False),
    ("+14155550101;=cmd|x", True),
])
def test_neutralise_guards_formulas_and_round_trips(value, guarded):
    out = neutralise(value)
    assert (out != value) is guarded
    assert unneutralise(out) == value


@hsettings(max_examples=300, deadline=None)
@given(st.text(alphabet="=+-@'\t\r;a1 (.", max_size=8))
def test_unneutralise_inverts_neutralise(value):
    assert unneutralise(neutralise(value)) == value


_CELLS = st.text(alphabet="=+-@'\t\r;,\"\n a1٣(.@x", min_size=1, max_size=10).filter(lambda v: v.strip())


_PHONES = st.text(alphabet="+-0123456789;=( .", min_size=1, max_size=9).filter(lambda v: v.strip(" ;"))


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_CELLS, _CELLS, st.sampled_from(["=vip", "+lead", "-x", "@y", "'q", "plain"]),
                          st.lists(_PHONES, max_size=3)), min_size=1, max_size=4))
def test_export_on_both_writers_is_identical(session, cells):
    """A whole export applies the formula guard in SQL (PostgreSQL: COPY with the guard's regular expressions;
    SQLite: only the cells worth a look go to Python); the result must be the same bytes as the Python
    writer gives for the same rows."""
    from omnicrm.filters import ContactFilter
    from omnicrm.output import write_rows

    import uuid

    uid = user_id(session, f"u{uuid.uuid4().hex[:8]}")  # a fresh user per example
    for i, (name, company, tag, phones) in enumerate(cells):
        add_contact(session, uid, name=name, company=company, title="-42", tags=[tag], emails=[f"+c{i}@example.com"],
                    phones=["+1 (415) 555-0101", "=1+2", *phones], note=name)
    session.commit()
    flt = ContactFilter()
    for portable in (False, True):
        columns = [c for c in csvio.EXPORT_COLUMNS if not (portable and c in ("id", "created_at", "updated_at"))]
        chosen = io.StringIO()
        csvio.export_contacts(session, uid, flt, "csv", chosen, portable=portable)
        session.commit()  # each export in its own (read-only) transaction, as in the CLI
        python = io.StringIO()
        write_rows(columns, csvio.iter_export_batches(session, uid, flt, joiner=";", columns=columns), python)
        session.commit()
        assert chosen.getvalue() == python.getvalue()


# --- reading files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,fmt,header_line", [
    ("native.csv", "native", 1), ("google_current.csv", "google", 1), ("google_legacy.csv", "google", 1),
    ("outlook.csv", "outlook", 1), ("linkedin_connections.csv", "linkedin", 4),
])
def test_formats_are_detected_from_the_header(name, fmt, header_line):
    source = csvio.open_csv(DATA / name)
    try:
        assert (source.format, source.header_line) == (fmt, header_line)
        assert len(list(source.records())) >= 2
    finally:
        source.close()


def test_bom_crlf_multiline_and_delimiters_are_handled():
    text = "\ufeffname;email\r\n\"Ann; the first\";ann@example.com\r\n\"Multi\r\nline\";m@example.com\r\n"
    source = opened(text)
    assert source.delimiter == ";" and source.header == ["name", "email"]
    assert list(source.records()) == [(2, ["Ann; the first", "ann@example.com"]),
                                      (3, ["Multi\r\nline", "m@example.com"])]
    assert opened("name\temail\nAnn\tann@example.com\n").delimiter == "\t"
    assert opened("name|email\nAnn|a@example.com\n", delimiter="|").header == ["name", "email"]


def test_utf16_with_bom_and_explicit_encoding():
    assert records("name,email\nZoë,z@example.com\n".encode("utf-16"))[0][1] == ["Zoë", "z@example.com"]
    latin = "name,email\nJosé,j@example.com\n".encode("cp1252")
    assert records(latin, encoding="cp1252")[0][1][0] == "José"


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"\n\n", "empty"),
    (b"name,email\nJos\xe9,j@example.com\n", "--encoding"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "binary"),
    (b"name,email\x00,x\n", "binary"),
    (b"name,email,Email\nAnn,a@example.com,b@example.com\n", "duplicate column name 'Email'"),
])
def test_unreadable_inputs_fail_cleanly(data, message):
    with pytest.raises(InvalidInput, match=message):
        records(data)


def test_unterminated_quote_and_huge_fields_name_the_line():
    with pytest.raises(InvalidInput, match=r"line 3: a quoted field is never closed"):
        records('name,email\nAnn,a@example.com\n"Bob,b@example.com\nCat,c@example.com\n')
    assert len(records("name,notes\nAnn," + "x" * 2_000_000 + "\n")[0][1][1]) == 2_000_000


def test_encoding_error_after_the_sample_names_the_line():
    text = b"name,email\n" + b"Ann,a@example.com\n" * 5000 + b"Jos\xe9,j@example.com\n"
    with pytest.raises(InvalidInput, match="--encoding"):
        records(text)


def test_headers_that_map_to_nothing_are_listed():
    source = opened("colour,size\nred,XL\n")
    with pytest.raises(InvalidInput) as info:
        csvio.check_columns(source, csvio.ImportOptions())
    assert "'colour', 'size'" in str(info.value) and "display_name" in str(info.value)
    mapped = opened("colour,who\nred,ann@example.com\n", mapping={"who": "email"})
    assert csvio.check_columns(mapped, csvio.ImportOptions(mapping={"who": "email"})).mapped == ["email"]


# --- the bulk write path fills what the ORM path fills ---------------------------------------------

def _snapshot(session, uid, contact_id):
    c = session.get(Contact, contact_id)
    emails = session.execute(select(ContactEmail.email, ContactEmail.position).where(
        ContactEmail.contact_id == contact_id).order_by(ContactEmail.position)).all()
    phones = session.execute(select(ContactPhone.raw, ContactPhone.e164, ContactPhone.position).where(
        ContactPhone.contact_id == contact_id).order_by(ContactPhone.position)).all()
    tags = session.scalars(select(Tag.name).join(ContactTag, ContactTag.tag_id == Tag.id).where(
        ContactTag.contact_id == contact_id).order_by(Tag.name)).all()
    notes = session.scalars(select(Note.body).where(Note.contact_id == contact_id)).all()
    kinds = session.scalars(select(Interaction.kind).where(Interaction.contact_id == contact_id)).all()
    return {"name": c.display_name, "company": c.company, "search": c.search_text, "manual": c.manual_fields,
            "emails": [tuple(e) for e in emails], "phones": [tuple(p) for p in phones], "tags": list(tags),
            "notes": list(notes), "kinds": list(kinds), "has_last": c.last_interaction_at is not None}


def test_bulk_import_matches_add_contact(session, settings):
    uid = user_id(session, "default")
    orm = add_contact(session, uid, name="Zoë Adams", emails=["Zoe@Example.com", "z2@example.com"],
                      phones=["+1 (415) 555-0101", "020 7946 0958"], company="Acme", tags=["VIP", "lead"],
                      note="first note", region="US")
    session.commit()
    other = user_id(session, "copy")
    session.commit()
    source = opened("display_name,email,phone,company,tags,notes\n"
                    "Zoë Adams,Zoe@Example.com;z2@example.com,+1 (415) 555-0101;020 7946 0958,Acme,VIP;lead,"
                    "first note\n")
    summary = csvio.import_contacts(session, other, source, csvio.ImportOptions())
    session.commit()
    assert (summary.created, summary.rejected) == (1, 0)
    bulk_id = session.scalar(select(Contact.id).where(Contact.user_id == other))
    session.expire_all()
    assert _snapshot(session, other, bulk_id) == _snapshot(session, uid, orm.id)
    c = session.get(Contact, bulk_id)
    assert c.search_text == search_text("Zoë Adams", "Acme", ["zoe@example.com", "z2@example.com"],
                                        [("+1 (415) 555-0101", "+14155550101"), ("020 7946 0958", None)])


def test_search_finds_bulk_imported_contacts(cli, tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("display_name,email,phone\nÉmile Lefèvre,emile@example.com,(415) 555-0123\n"
                    "Ann Lee,ann@example.com,\n")
    assert cli("contacts", "import", str(path)).exit_code == 0
    for query in ("emile lef", "4155550123", "ann@exa"):
        found = cli("contacts", "list", "--search", query, "--format", "json")
        assert len(__import__("json").loads(found.stdout)) == 1, query


def test_batches_see_earlier_rows_of_the_same_file(session):
    uid = user_id(session, "default")
    rows = "".join(f"P{i},p{i}@example.com,tag{i % 3}\n" for i in range(25))
    rows += "Again,P3@Example.com,extra\n"
    source = opened("name,email,tags\n" + rows)
    summary = csvio.import_contacts(session, uid, source, csvio.ImportOptions(batch_size=7))
    session.commit()
    assert (summary.created, summary.merged) == (25, 1)
    assert session.scalar(select(func.count()).select_from(Contact).where(Contact.user_id == uid)) == 25
    tags = session.scalars(select(Tag.name).join(ContactTag, ContactTag.tag_id == Tag.id).join(
        ContactEmail, ContactEmail.contact_id == ContactTag.contact_id).where(
        ContactEmail.email == "p3@example.com").order_by(Tag.name)).all()
    assert tags == ["extra", "tag0"]


def test_rows_held_back_as_possible_duplicates_keep_the_file_order(session):
    """A fast import writes the rows whose emails it has certainly not met at once, and holds back the others
    (a bitmap of email hashes: with 8 bits, nearly every row). Held back or not, new contacts come out in
    file order, duplicates merge, and everything is in the search index."""
    uid = user_id(session, "default")
    session.commit()
    rows = "".join(f"P{i},p{i}@example.com,t{i % 3}\n" for i in range(50)) + "Again,P7@example.com,extra\n"
    summary = csvio.import_contacts(session, uid, opened("name,email,tags\n" + rows),
                                    csvio.ImportOptions(batch_size=2, seen_bits=8))
    session.commit()
    assert (summary.created, summary.merged) == (50, 1)
    names = session.scalars(select(Contact.display_name).where(Contact.user_id == uid).order_by(Contact.id)).all()
    assert names == [f"P{i}" for i in range(50)]
    tags = session.scalars(select(Tag.name).join(ContactTag, ContactTag.tag_id == Tag.id).join(
        ContactEmail, ContactEmail.contact_id == ContactTag.contact_id).where(
        ContactEmail.email == "p7@example.com").order_by(Tag.name)).all()
    assert tags == ["extra", "t1"]
    if session.connection().dialect.name == "sqlite":
        session.connection().exec_driver_sql("INSERT INTO contacts_fts(contacts_fts, rank) VALUES ('integrity-check', 1)")
    from omnicrm.contacts import list_contacts
    from omnicrm.filters import ContactFilter

    for term, count in (("p49@", 1), ("p4", 11), ("p7@ex", 1)):
        assert len(list_contacts(session, uid, ContactFilter(search=term)).items) == count, term


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "exact"])
def test_a_row_of_our_export_is_its_contact_by_id_and_created_at(session, fast):
    """Read back into the database it came from, a row of our export whose id and created_at are an existing
    contact's merges into it, email or not (a re-import duplicates nothing). The same id with another
    created_at, another user's contact and an id that is no number are new contacts."""
    import csv

    from omnicrm.filters import ContactFilter

    uid, other = user_id(session, "default"), user_id(session, "someone-else")
    add_contact(session, uid, name="No Email", company="Acme")
    add_contact(session, other, name="Theirs")
    session.commit()
    exported = {}
    for owner in (uid, other):
        out = io.StringIO()
        csvio.export_contacts(session, owner, ContactFilter(), "csv", out)
        exported[owner] = next(csv.DictReader(io.StringIO(out.getvalue())))
    mine, theirs = exported[uid], exported[other]
    rows = [mine | {"tags": "vip", "company": "Other Co"},
            mine | {"display_name": "Same Id", "created_at": "2020-01-02T03:04:05+00:00"},
            theirs,
            mine | {"display_name": "Junk Id", "id": f"x{mine['id']}"}]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(mine))
    writer.writeheader()
    writer.writerows(rows)
    plan: list[dict] = []
    summary = csvio.import_contacts(session, uid, opened(text.getvalue()), csvio.ImportOptions(),
                                    **({} if fast else {"on_plan": plan.append}))
    session.commit()
    assert (summary.created, summary.merged) == (3, 1)
    assert [p["action"] for p in plan] == ([] if fast else ["merge", "create", "create", "create"])
    contacts = session.scalars(select(Contact).where(Contact.user_id == uid).order_by(Contact.id)).all()
    assert [(c.display_name, c.company) for c in contacts] == [
        ("No Email", "Acme"), ("Same Id", "Acme"), ("Theirs", None), ("Junk Id", "Acme")]
    assert [t.name for t in contacts[0].tags] == ["vip"]
    assert session.scalar(select(func.count()).select_from(Contact).where(Contact.user_id == other)) == 1

    skip = csvio.import_contacts(session, uid, opened(text.getvalue()), csvio.ImportOptions(on_duplicate="skip"))
    assert (skip.created, skip.merged, skip.skipped) == (3, 0, 1)
    session.rollback()
    error = csvio.import_contacts(session, uid, opened(text.getvalue()), csvio.ImportOptions(on_duplicate="error"))
    session.rollback()
    assert [(e.line, e.column) for e in error.errors] == [(2, "id")]
    assert f"contact {mine['id']} already exists" in error.errors[0].reason


def test_import_leaves_the_search_index_consistent(session):
    """SQLite: the import pauses the FTS trigger and enlarges FTS5's buffer; both are back afterwards and the
    index matches the table (FTS5 integrity-check). Both engines: later contacts are indexed as usual."""
    uid = user_id(session, "default")
    add_contact(session, uid, name="Earlier Person", emails=["earlier@example.com"], region="US")
    session.commit()
    rows = "".join(f"Zoë {i},z{i}@example.com,(415) 555-{i:04d}\n" for i in range(30))
    # Merges in later batches: into a contact that existed before, and into one an earlier batch created.
    rows += "Earlier Person,earlier@example.com;earlier2@example.com,\nZoë 2,z2@example.com;zed@example.com,\n"
    summary = csvio.import_contacts(session, uid, opened("name,email,phone\n" + rows),
                                    csvio.ImportOptions(batch_size=7))
    session.commit()
    assert (summary.created, summary.merged) == (30, 2)
    add_contact(session, uid, name="Later Person", emails=["later@example.com"], region="US")
    session.commit()
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        from omnicrm.search_index import FTS_TABLE, index_present

        assert index_present(conn)
        conn.exec_driver_sql(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}, rank) VALUES ('integrity-check', 1)")
        stored = conn.exec_driver_sql(f"SELECT v FROM {FTS_TABLE}_config WHERE k = 'hashsize'").all()
        assert stored in ([], [(bulk.SqliteBulkLoad.DEFAULT_HASHSIZE,)])
    from omnicrm.contacts import list_contacts
    from omnicrm.filters import ContactFilter

    for term, count in (("zoe 1", 11), ("later pers", 1), ("4155550007", 1), ("earlier2@", 1), ("zed@ex", 1),
                        ("earlier pers", 1)):
        found = list_contacts(session, uid, ContactFilter(search=term))
        assert len(found.items) == count, term


def test_postgresql_bulk_load_puts_indexes_and_foreign_keys_back(session):
    """PostgreSQL, a big file: the import drops the contact tables' secondary indexes, the unique email index
    and the foreign keys for its duration and creates them again before the commit; a failed import rolls
    the drop back."""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        pytest.skip("PostgreSQL bulk load")
    tables = "'{contacts,contact_emails,contact_phones,contact_tags,notes,interactions}'::regclass[]"
    schema = (f"SELECT indrelid::regclass::text, indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
              f"WHERE indrelid = ANY({tables}) UNION ALL SELECT conrelid::regclass::text, conname, "
              f"pg_get_constraintdef(oid) || ' ' || convalidated FROM pg_constraint WHERE conrelid = ANY({tables}) "
              "ORDER BY 1, 2, 3")
    before = conn.exec_driver_sql(schema).all()
    assert any("gin_trgm_ops" in row[2] for row in before) and any("FOREIGN KEY" in row[2] for row in before)
    uid = user_id(session, "default")
    session.commit()

    rows = "".join(f"P{i},p{i}@example.com,(415) 555-{i:04d},t{i % 4}\n" for i in range(40))
    failed = csvio.import_contacts(session, uid, big("name,email,phone,tags\n" + rows + "Bad,not-an-email,,\n"),
                                   csvio.ImportOptions(batch_size=7))
    assert failed.failed
    session.rollback()
    assert session.connection().exec_driver_sql(schema).all() == before
    summary = csvio.import_contacts(session, uid, big("name,email,phone,tags\n" + rows),
                                    csvio.ImportOptions(batch_size=7))
    session.commit()
    assert summary.created == 40
    assert session.connection().exec_driver_sql(schema).all() == before
    later = add_contact(session, uid, name="Later", emails=["later@example.com"], region="US")
    session.commit()
    ids = session.scalars(select(Contact.id).where(Contact.user_id == uid).order_by(Contact.id)).all()
    assert len(ids) == len(set(ids)) == 41 and ids[-1] == later.id
    from omnicrm.contacts import list_contacts
    from omnicrm.filters import ContactFilter

    assert len(list_contacts(session, uid, ContactFilter(search="555-0007")).items) == 1


def test_postgresql_bulk_load_builds_the_lookup_indexes_before_merging_early(session):
    """A fast bulk load drops the indexes that looking rows up needs too. When held-back rows must merge
    before the end (a file repeating many emails), those indexes are built first: without them every lookup
    scanned the tables (a re-import of a 1M-row export took minutes a batch)."""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        pytest.skip("PostgreSQL bulk load")
    uid = user_id(session, "default")
    session.commit()
    rows = "".join(f"P{i},p{i}@example.com,\n" for i in range(30)) + "".join(
        f"Again {i},P{i}@Example.com,again\n" for i in range(30))
    lookup_index = []

    def progress(_consumed: int) -> None:
        lookup_index.append(session.connection().exec_driver_sql(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_contact_emails_contact_position'").scalar())

    summary = csvio.import_contacts(session, uid, big("name,email,tags\n" + rows),
                                    csvio.ImportOptions(batch_size=5, defer_limit=5), on_progress=progress)
    session.commit()
    assert (summary.created, summary.merged) == (30, 30)
    assert lookup_index[:6] == [0] * 6 and lookup_index[-1] == 1  # dropped while rows were new, then built
    tagged = session.scalars(select(ContactEmail.email).join(ContactTag, ContactTag.contact_id == ContactEmail.contact_id)
                             .where(ContactEmail.user_id == uid)).all()
    assert sorted(tagged) == sorted(f"p{i}@example.com" for i in range(30))


def test_big_postgresql_import_refreshes_statistics(session):
    """Without statistics the planner takes a freshly imported table for empty (export scanned every contact
    per batch at 1M rows); an import of ANALYZE_MIN_ROWS contacts or more analyzes the tables it filled."""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        pytest.skip("PostgreSQL statistics")
    uid = user_id(session, "default")
    rows = "".join(f"P{i},p{i}@example.com\n" for i in range(importing.ANALYZE_MIN_ROWS))
    summary = csvio.import_contacts(session, uid, opened("name,email\n" + rows), csvio.ImportOptions())
    session.commit()
    assert summary.created == importing.ANALYZE_MIN_ROWS
    estimate = session.connection().exec_driver_sql(
        "SELECT reltuples FROM pg_class WHERE oid = 'contacts'::regclass").scalar()
    assert estimate >= importing.ANALYZE_MIN_ROWS * 0.9


def test_sqlite_import_puts_the_search_triggers_back(session):
    """SQLite: the import drops the search index's triggers and indexes its own contacts at the end, with
    their final text (rows held back as duplicates merge into them first). Afterwards the schema is exactly
    as before, FTS5's integrity-check (against the table) passes and searches find the merged values."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        pytest.skip("SQLite search index")
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    before = conn.exec_driver_sql(schema).all()
    uid = user_id(session, "default")
    session.commit()
    rows = "".join(f"P{i},p{i}@example.com,(415) 555-{i:04d}\n" for i in range(60))
    # Merges into contacts of earlier batches (one of them twice).
    rows += ("P3,p3@example.com;p3b@example.com,\nP3,p3@example.com;p3c@example.com,\n"
             "P41,p41@example.com,(212) 555-0199\n")
    summary = csvio.import_contacts(session, uid, opened("name,email,phone\n" + rows),
                                    csvio.ImportOptions(batch_size=2))
    session.commit()
    assert (summary.created, summary.merged) == (60, 3)
    conn = session.connection()
    assert conn.exec_driver_sql(schema).all() == before
    conn.exec_driver_sql("INSERT INTO contacts_fts(contacts_fts, rank) VALUES ('integrity-check', 1)")
    from omnicrm.contacts import list_contacts
    from omnicrm.filters import ContactFilter

    for term, count in (("p3b@", 1), ("p3c@ex", 1), ("2125550199", 1), ("4155550041", 1), ("p5", 11)):
        assert len(list_contacts(session, uid, ContactFilter(search=term)).items) == count, term


def test_sqlite_bulk_load_builds_the_random_order_indexes_at_the_end(session):
    """SQLite, a big file: the name and E.164 indexes are dropped while the rows stream in and built before
    the commit, with their statistics put back; a failed import rolls the drop back."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        pytest.skip("SQLite bulk load")
    uid = user_id(session, "default")
    add_contact(session, uid, name="Earlier", emails=["earlier@example.com"], phones=["(415) 555-0100"], region="US")
    session.commit()
    conn = session.connection()
    conn.exec_driver_sql("ANALYZE")  # statistics for every index, not only the ones the migration writes
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    stats = "SELECT tbl, idx, stat FROM sqlite_stat1 ORDER BY tbl, idx"
    before, stats_before = conn.exec_driver_sql(schema).all(), conn.exec_driver_sql(stats).all()
    deferred = set(bulk.SqliteBulkLoad.DEFERRED_INDEXES)
    assert deferred <= {name for _, name, _ in before} and deferred <= {idx for _, idx, _ in stats_before}
    session.commit()
    present = []

    def indexes_present(_consumed) -> None:
        present.append(deferred & {name for (name,) in session.connection().exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index'").all()})

    rows = "".join(f"P{(i * 7) % 40},p{i}@example.com,(415) 555-{(i * 13) % 40:04d}\n" for i in range(40))
    failed = csvio.import_contacts(session, uid, big("name,email,phone\n" + rows + "Bad,not-an-email,\n"),
                                   csvio.ImportOptions(batch_size=7))
    assert failed.failed
    session.rollback()
    conn = session.connection()
    assert conn.exec_driver_sql(schema).all() == before and conn.exec_driver_sql(stats).all() == stats_before
    summary = csvio.import_contacts(session, uid, big("name,email,phone\n" + rows),
                                    csvio.ImportOptions(batch_size=7), on_progress=indexes_present)
    session.commit()
    assert summary.created == 40 and present and all(found == set() for found in present)
    conn = session.connection()
    assert conn.exec_driver_sql(schema).all() == before and conn.exec_driver_sql(stats).all() == stats_before
    assert conn.exec_driver_sql("PRAGMA integrity_check").all() == [("ok",)]  # every row in every index
    names = conn.exec_driver_sql("SELECT display_name FROM contacts INDEXED BY ix_contacts_user_lname "
                                 "WHERE user_id = ? ORDER BY lower(display_name), id", (uid,)).scalars().all()
    assert names == sorted(["Earlier"] + [f"P{(i * 7) % 40}" for i in range(40)], key=str.lower)


def test_sqlite_bulk_load_writes_through_a_rollback_journal(settings):
    """SQLite, a big file into a database no other connection has open: the import's session runs with a
    rollback journal and synchronous FULL, and WAL (synchronous NORMAL) is back afterwards, also when the
    import fails. A small file, or another open connection, leaves the database in WAL."""
    import sqlite3

    from omnicrm.db import ready_engine, session_scope

    if not settings.is_sqlite:
        pytest.skip("SQLite journal")
    engine = ready_engine(settings)
    path = engine.url.database
    rows = "".join(f"P{i},p{i}@example.com\n" for i in range(30))

    def journal() -> str:  # as a new connection finds the file
        with closing(sqlite3.connect(path)) as conn:
            return conn.execute("PRAGMA journal_mode").fetchone()[0]

    def import_rows(text: str, fail: bool = False) -> tuple[bool, str, int]:
        """Import `text` in a session inside sqlite_bulk_journal: (switched, the session's journal mode and
        synchronous level)."""
        source = big(text)
        with bulk.sqlite_bulk_journal(engine, source) as switched, session_scope(settings) as session:
            uid = user_id(session, "default")
            summary = csvio.import_contacts(session, uid, source, csvio.ImportOptions())
            conn = session.connection()
            seen = (switched, conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
                    conn.exec_driver_sql("PRAGMA synchronous").scalar())
            if fail:
                raise RuntimeError("the import's caller fails before the commit")
            assert not summary.failed
            session.commit()
        return seen

    assert journal() == "wal"
    with pytest.raises(RuntimeError):
        import_rows("name,email\n" + rows, fail=True)
    assert journal() == "wal"
    assert import_rows("name,email\n" + rows) == (True, "delete", 2)  # 2: FULL
    assert journal() == "wal"
    with closing(engine.raw_connection()) as raw:
        assert raw.driver_connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL again
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(Contact)) == 30
    other = sqlite3.connect(path)
    try:
        other.execute("SELECT count(*) FROM contacts").fetchall()  # open, and has read: SQLite keeps WAL
        assert import_rows("name,email\nQ,q@example.com\n")[:2] == (False, "wal")
    finally:
        other.close()
    small = opened("name,email\nR,r@example.com\n")
    with bulk.sqlite_bulk_journal(engine, small) as switched:
        assert not switched and journal() == "wal"


def test_sqlite_export_in_reader_processes_equals_one_process(session):
    """SQLite: a whole export runs in forked reader processes (every other id range each); the file is the
    same as the one-process writer's, also across ranges with gaps, and when a writer holds the lock the
    export runs in this process without waiting."""
    import sqlite3

    from omnicrm.filters import ContactFilter
    from omnicrm.output import write_rows

    if session.connection().dialect.name != "sqlite":
        pytest.skip("SQLite reader processes")
    uid = user_id(session, "default")
    rows = "".join(f"=P{i},p{i}@example.com,(415) 555-{i:04d},t{i % 4}\n" for i in range(37))
    csvio.import_contacts(session, uid, opened("name,email,phone,tags\n" + rows), csvio.ImportOptions())
    session.execute(Contact.__table__.delete().where(Contact.id.between(10, 20)))  # a gap of whole ranges
    session.commit()
    one = io.StringIO()
    write_rows(csvio.EXPORT_COLUMNS, csvio.iter_export_batches(session, uid, ContactFilter(), joiner=";"), one)
    session.commit()
    parallel = io.StringIO()
    assert exporting._sqlite_parallel_csv(session, uid, clock_now(), csvio.EXPORT_COLUMNS, parallel, span=4) == 26
    assert parallel.getvalue() == one.getvalue() and "'=P1," in one.getvalue()
    session.commit()
    writer = sqlite3.connect(session.get_bind().url.database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert exporting._sqlite_parallel_csv(session, uid, clock_now(), csvio.EXPORT_COLUMNS, io.StringIO()) is None
        fallback = io.StringIO()
        csvio.export_contacts(session, uid, ContactFilter(), "csv", fallback)
        assert fallback.getvalue() == one.getvalue()
    finally:
        writer.rollback()
        writer.close()


def test_postgresql_export_over_several_connections_equals_one_copy(session):
    """PostgreSQL: a whole export runs as COPYs of id ranges on more connections, in the session's snapshot
    (pg_export_snapshot); the file is the same as one COPY's."""
    from omnicrm.filters import ContactFilter

    if session.connection().dialect.name != "postgresql":
        pytest.skip("PostgreSQL parallel export")
    uid = user_id(session, "default")
    rows = "".join(f"=P{i},p{i}@example.com,(415) 555-{i:04d},t{i % 4}\n" for i in range(47))
    csvio.import_contacts(session, uid, opened("name,email,phone,tags\n" + rows), csvio.ImportOptions())
    session.commit()
    one = io.StringIO()
    csvio.export_contacts(session, uid, ContactFilter(search="example.com"), "csv", one)  # filtered: one COPY
    session.commit()
    parallel = io.StringIO()
    assert exporting._pg_parallel_copy(session, uid, clock_now(), csvio.EXPORT_COLUMNS, parallel, span=5) == 47
    assert parallel.getvalue() == one.getvalue() and "'=P1," in one.getvalue()
    session.commit()
    assert exporting._pg_parallel_copy(session, uid, clock_now(), csvio.EXPORT_COLUMNS, io.StringIO(),
                                   span=100) is None  # one range: a single COPY does it


def test_a_bare_carriage_return_is_quoted_by_both_csv_writers():
    """csv only quotes the line terminator's characters; a cell with a bare CR would end the row in most readers."""
    import csv as csvlib

    from omnicrm.output import write_records, write_rows

    rows, records = io.StringIO(), io.StringIO()
    write_rows(["a", "b"], [[("x\ry", "+14155550101"), ("plain", "-- call")]], rows)
    write_records([{"a": "x\ry", "b": "+14155550101"}, {"a": "plain", "b": "-- call"}], ["a", "b"], "csv", records)
    assert rows.getvalue() == records.getvalue() == 'a,b\n"x\ry",+14155550101\nplain,\'-- call\n'
    assert list(csvlib.reader(io.StringIO(rows.getvalue(), newline=""))) == [
        ["a", "b"], ["x\ry", "+14155550101"], ["plain", "'-- call"]]


def test_imported_notes_count_as_interactions(session):
    """Each imported note is an interaction: the contact's stored counter (the score's input) equals its
    interaction rows, for new contacts, merges within a batch, and merges into contacts from earlier."""
    uid = user_id(session, "default")
    add_contact(session, uid, name="Old", emails=["old@example.com"], note="first", region="US")
    session.commit()
    rows = ("name,email,notes\nAnn,ann@example.com,hello\nAnn,ann@example.com,again\nBob,bob@example.com,\n"
            "Cy,cy@example.com,x\nOld,old@example.com,later\nAnn,ann@example.com,third\n")
    csvio.import_contacts(session, uid, opened(rows), csvio.ImportOptions(batch_size=3))
    session.commit()
    stored = dict(session.execute(select(Contact.display_name, Contact.interaction_count)
                                  .where(Contact.user_id == uid)).all())
    counted = dict(session.execute(select(Contact.display_name, func.count(Interaction.id))
                                   .outerjoin(Interaction, Interaction.contact_id == Contact.id)
                                   .where(Contact.user_id == uid).group_by(Contact.display_name)).all())
    assert stored == counted == {"Old": 2, "Ann": 3, "Bob": 0, "Cy": 1}
