"""The substring search index (omnicrm/search_index.py): same answers as a plain scan, on every write path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings as hsettings, strategies as st
from sqlalchemy import delete, insert, select, text, update

from omnicrm import contacts as svc
from omnicrm import search_index
from omnicrm.db import dispose_engines, ready_engine, session_scope, user_id
from omnicrm.filters import ContactFilter, search_term
from omnicrm.models import Contact

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ALPHABET = "abcdeéëlmnoöprstuzßłØ -.@'\"*?[]()^:+"
names = st.text(alphabet=ALPHABET, min_size=1, max_size=14).filter(lambda s: s.strip())
companies = st.one_of(st.none(), st.sampled_from(["Acme", "Café Zoë", "NEAR Co", "a*b", '"Quoted" Ltd']), names)
phones = st.one_of(st.none(), st.from_regex(r"\+?1? ?\(?[2-9]\d\d\)? ?\d\d\d-\d\d\d\d", fullmatch=True))
people = st.lists(st.tuples(names, companies, phones), min_size=1, max_size=12)
terms = st.one_of(
    st.text(alphabet=ALPHABET + "0123456789", min_size=1, max_size=8).filter(lambda s: s.strip()),
    st.sampled_from(['"', '""', "*", "a*", "NEAR(a b)", "x OR y", "-abc", "^abc", "zoë", "ZOE", "555", "%", "_",
                     "acme", "café", "e\"q", "s:a", "a?c", "[ab]", "b[*]", "*?[", "]a"]),
)
FAST = hsettings(max_examples=25, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _scan(session, uid: int, query: str) -> list[int]:
    """The reference answer: a plain substring test on the stored search text, in Python."""
    term = search_term(query)
    rows = session.execute(select(Contact.id, Contact.search_text).where(Contact.user_id == uid))
    return sorted(cid for cid, text_ in rows if term in text_)


def _like(session, uid: int, query: str) -> list[int]:
    """The plain LIKE scan (no index)."""
    pattern = search_index.like_pattern(search_term(query))
    return sorted(session.scalars(select(Contact.id).where(Contact.user_id == uid,
                                                            Contact.search_text.like(pattern, escape="\\"))))


def _indexed(session, uid: int, query: str) -> list[int]:
    return sorted(svc.matching_ids(session, uid, ContactFilter(search=query)))


def _assert_consistent(session, uid: int, queries) -> None:
    for query in queries:
        expected = _scan(session, uid, query)
        assert _indexed(session, uid, query) == expected, query
        assert _like(session, uid, query) == expected, query


def _index_used(settings) -> bool:
    engine = ready_engine(settings)
    with engine.connect() as conn:
        present = search_index.index_present(conn)
        conn.rollback()
    return present


def test_index_is_created(settings):
    assert _index_used(settings)


@FAST
@given(people=people, queries=st.lists(terms, min_size=1, max_size=6))
@example(people=[("Zoë O'Brien", "Acme", "+1 (415) 555-0101")],
         queries=["zoe", "ZOË", "o'b", "4155550101", "555-01", "acme", '"', "NEAR(a b)", "a*"])
def test_index_equals_plain_scan(session, people, queries):
    uid = user_id(session, f"u{uuid.uuid4().hex[:10]}")
    other = user_id(session, f"o{uuid.uuid4().hex[:10]}")
    for i, (name, company, phone) in enumerate(people):
        owner = other if i % 4 == 3 else uid  # some rows belong to another user: never in the answer
        svc.add_contact(session, owner, name=name, company=company, phones=[phone] if phone else [])
    session.commit()
    # Terms drawn from the data itself too, so that most queries have matches.
    texts = session.scalars(select(Contact.search_text).where(Contact.user_id == uid)).all()
    drawn = [t[i:i + n] for t in texts[:3] for i, n in ((0, 3), (1, 5), (2, 2)) if t[i:i + n].strip()]
    _assert_consistent(session, uid, [q for q in queries + drawn if q.strip()])


def test_migration_4_drops_two_unused_indexes(db_url, settings):
    """A database from before migration 4 loses the two indexes no query uses; searches are unchanged."""
    from omnicrm import db

    engine = db.ready_engine(settings)
    with engine.begin() as conn:  # as migrations 1-3 left it
        conn.exec_driver_sql("CREATE INDEX ix_contacts_user_name ON contacts (user_id, display_name, id)")
        conn.exec_driver_sql("CREATE INDEX ix_contact_tags_tag_id ON contact_tags (tag_id)")
        conn.execute(text("DELETE FROM omnicrm_schema WHERE version = 4"))
    assert db.migrate(engine) == db.SCHEMA_VERSION
    with engine.connect() as conn:
        for name in ("ix_contacts_user_name", "ix_contact_tags_tag_id"):
            found = (conn.exec_driver_sql("SELECT count(*) FROM sqlite_master WHERE name = ?", (name,)).scalar()
                     if engine.dialect.name == "sqlite" else
                     conn.execute(text("SELECT count(*) FROM pg_indexes WHERE indexname = :n "
                                          "AND schemaname = current_schema()"), {"n": name}).scalar())
            assert found == 0, name


def test_every_write_path_keeps_the_index(session, settings):
    uid = user_id(session, "writer")
    ann = svc.add_contact(session, uid, name="Ann Example", emails=["ann@example.com"], phones=["+1 415 555 0101"],
                          company="Globex", tags=["vip"])
    bob = svc.add_contact(session, uid, name="Bob Builder", emails=["bob@build.io"])
    session.commit()
    queries = ["ann", "example", "globex", "4155550101", "bob", "build", "initech", "carol", "zed", "555"]
    _assert_consistent(session, uid, queries)

    svc.update_contact(session, ann, name="Annabel Initech", company="", add_emails=["a@zed.org"],
                       remove_emails=["ann@example.com"], add_tags=["lead"], remove_tags=["vip"])
    session.commit()
    _assert_consistent(session, uid, queries)
    assert _indexed(session, uid, "globex") == [] and _indexed(session, uid, "initech") == [ann.id]

    # Bulk Core insert (the CSV import's path) and a Core UPDATE of search_text (sync, merge).
    session.execute(insert(Contact), [
        {"user_id": uid, "display_name": f"Carol {i}", "search_text": f"carol {i}\ncarol{i}@bulk.example"}
        for i in range(50)])
    session.execute(update(Contact).where(Contact.id == bob.id).values(search_text="bobby tables\nbob@build.io"))
    session.commit()
    _assert_consistent(session, uid, queries + ["carol 4", "bobby", "bulk.ex"])
    assert len(_indexed(session, uid, "carol")) == 50

    svc.delete_contacts(session, uid, [bob.id])
    session.execute(delete(Contact).where(Contact.user_id == uid, Contact.display_name.like("Carol 1%")))
    session.commit()
    _assert_consistent(session, uid, queries + ["carol 1", "bobby", "carol"])
    assert _indexed(session, uid, "bobby") == []

    from omnicrm.duplicates import merge_contacts

    dup = svc.add_contact(session, uid, name="Dup Person", emails=["dup@merge.example"])
    keep = svc.add_contact(session, uid, name="Keep Person")
    session.commit()
    merge_contacts(session, uid, keep, [dup])
    session.commit()
    _assert_consistent(session, uid, ["dup", "keep", "merge.example", "person"])


def test_import_path_keeps_the_index(cli, db_url):
    csv_text = "display_name,email,phone,company\nÉmile Zola,emile@zola.fr,+33 1 23 45 67 89,Rougon\n" \
               "Nana Coupeau,nana@assommoir.fr,,Lantier\n"
    result = cli("contacts", "import", "-", input=csv_text)
    assert result.exit_code == 0, result.stderr
    for term, expected in (("emile", 1), ("ZOLA", 1), ("123456789", 1), ("assommoir", 1), ("lantier", 1),
                           ("rougon", 1), ("xyz", 0)):
        listed = cli("contacts", "list", "--search", term, "--format", "json")
        assert listed.exit_code == 0, listed.stderr
        assert len(__import__("json").loads(listed.stdout)) == expected, term


def test_short_terms_and_operators_still_work(session):
    uid = user_id(session, "short")
    a = svc.add_contact(session, uid, name="Al Xu", emails=["al@x.io"])
    b = svc.add_contact(session, uid, name='Quote "Q" Person', company="AND OR NOT")
    session.commit()
    assert _indexed(session, uid, "xu") == [a.id]
    assert _indexed(session, uid, "q") == [b.id]
    assert _indexed(session, uid, '"q"') == [b.id]
    assert _indexed(session, uid, "and or") == [b.id]
    assert _indexed(session, uid, "NOT") == [b.id]
    assert _indexed(session, uid, '" OR "') == []
    c = svc.add_contact(session, uid, name="Łł1[?]:nd) *x*")
    session.commit()
    for term in ("łł1[?]:nd)", "ł1[?]", "nd) *x", "*x*", "[?]"):
        assert _indexed(session, uid, term) == [c.id], term


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _fallback_url(db_url: str, tmp_path) -> str:
    if db_url.startswith("sqlite"):
        return db_url
    # A schema whose search_path does not reach pg_trgm (installed in `public`): the index cannot be built.
    return db_url.replace(",public", "")


def test_fallback_without_index_is_correct_with_one_warning(db_url, tmp_path):
    from omnicrm.config import load_settings

    url = _fallback_url(db_url, tmp_path)
    settings = load_settings({"OMNICRM_HOME": str(tmp_path / "home"), "OMNICRM_DATABASE_URL": url})
    collect = _Collect()
    logger = logging.getLogger("omnicrm.search")
    logger.addHandler(collect)
    try:
        if url.startswith("sqlite"):
            # An SQLite without FTS5 leaves no index behind: the same state as dropping it.
            engine = ready_engine(settings)
            with engine.begin() as conn:
                search_index.drop_index(conn)
            dispose_engines()
        engine = ready_engine(settings)
        with engine.connect() as conn:
            assert not search_index.index_present(conn)
            conn.rollback()
        with session_scope(settings) as session:
            uid = user_id(session, "fallback")
            for name in ("Zoë Adams", "Zoe Zhang", "Adam Smith"):
                svc.add_contact(session, uid, name=name)
            session.commit()
            _assert_consistent(session, uid, ["zoe", "adam", "zh", "smith", "x"])
        dispose_engines()
        ready_engine(settings)  # reopening: no second warning
    finally:
        logger.removeHandler(collect)
    if url.startswith("postgresql"):
        assert len([m for m in collect.messages if "search index unavailable" in m]) == 1, collect.messages


def test_search_drives_from_the_index(session, settings):
    """SQLite: the plan fetches FTS matches by rowid (no walk of the user's contacts); PostgreSQL: the
    trigram GIN index exists on search_text (the planner picks it at scale; see benchmarks/bench_search.py)."""
    uid = user_id(session, "planner")
    svc.add_contact(session, uid, name="Plan Target")
    session.commit()
    stmt = select(Contact.id).where(Contact.user_id == uid,
                                    search_index.search_match(search_term("target")))
    conn = session.connection()
    if conn.dialect.name == "sqlite":
        compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
        assert "contacts_fts" in plan and "INTEGER PRIMARY KEY" in plan, plan
    else:
        definition = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                                  {"n": search_index.PG_INDEX}).scalar()
        assert "gin" in definition and "gin_trgm_ops" in definition and "search_text" in definition


HEAVY = ("sqlalchemy", "googleapiclient", "google_auth_oauthlib", "huey", "phonenumbers", "tabulate",
         "cryptography", "psycopg")


def test_help_imports_nothing_heavy():
    code = ("import sys\nfrom omnicrm.cli import main\nsys.argv = ['omnicrm', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OMNICRM_HOME": "/nonexistent-omnicrm-home"})
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1]
    assert loaded == "HEAVY=", f"`omnicrm --help` imports {loaded[6:]}"


def test_count_is_exact_up_to_the_cap_then_a_lower_bound(session, cli):
    uid = user_id(session, "default")
    cap = search_index.COUNT_CAP
    session.execute(insert(Contact), [{"user_id": uid, "display_name": f"Bulk {i}", "search_text": f"bulk {i}"}
                                      for i in range(cap + 20)])
    session.commit()
    page = svc.list_contacts(session, uid, ContactFilter(search="bulk"), page_size=50)
    assert (page.total, page.exact, len(page.items)) == (cap, False, 50)
    last = svc.list_contacts(session, uid, ContactFilter(search="bulk"), page=cap // 50 + 1, page_size=50)
    assert (last.total, last.exact, len(last.items)) == (cap + 20, True, 20)
    small = svc.list_contacts(session, uid, ContactFilter(search="bulk 99"), page_size=50)
    assert small.exact and small.total == len(svc.matching_ids(session, uid, ContactFilter(search="bulk 99")))
    session.rollback()  # end the read transaction (SQLite: every transaction holds the write lock)
    shown = cli("contacts", "list", "--search", "bulk", "--page-size", "5")
    assert shown.exit_code == 0, shown.stderr
    assert f"page 1 of {cap // 5}+ · {cap}+ contacts" in shown.stderr


def test_pages_are_the_same_whichever_plan(session):
    """Many matches (count past the cap: the sort index drives) or few (the matches drive): same pages."""
    from omnicrm.models import ContactTag, Tag
    from omnicrm.filters import order_by

    uid = user_id(session, "plans")
    cap = search_index.COUNT_CAP
    session.execute(insert(Contact), [{"user_id": uid, "display_name": f"Wide {i}", "search_text": f"wide {i}"}
                                      for i in range(cap + 30)])
    tag = Tag(user_id=uid, name="odd")
    session.add(tag)
    session.flush()
    ids = session.scalars(select(Contact.id).where(Contact.user_id == uid).order_by(Contact.id)).all()
    session.execute(insert(ContactTag), [{"contact_id": cid, "tag_id": tag.id} for cid in ids[1:]])
    session.commit()
    for flt in (ContactFilter(search="wide"), ContactFilter(tags=("odd",)), ContactFilter(search="wide 1", tags=("ODD",)),
                ContactFilter(tags=("odd", "nosuch"))):
        expected = session.scalars(
            select(Contact.id).where(Contact.id.in_(svc.matching_ids(session, uid, flt)))
            .order_by(*order_by("created", "desc")).limit(50)).all()
        page = svc.list_contacts(session, uid, flt, page_size=50)
        assert [c.id for c in page.items] == list(expected), flt
        assert page.total == min(len(svc.matching_ids(session, uid, flt)), cap)
