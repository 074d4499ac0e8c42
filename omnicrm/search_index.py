"""The substring index behind `--search`, and the SQL that uses it.

Every contact keeps a folded `search_text` (omnicrm.normalize.search_text). It is indexed for
substring matching on both engines:

- SQLite: an FTS5 table `contacts_fts` with the trigram tokenizer, external content on `contacts`,
  kept in step by triggers on `contacts`. Every write path (ORM, Core bulk inserts, sync, merge,
  delete) goes through those triggers, so nothing in Python has to remember to update it.
  Trigrams need three characters: shorter terms use a plain LIKE scan.
- PostgreSQL: `pg_trgm` and a GIN `gin_trgm_ops` index on `contacts.search_text`; the planner uses
  it for `search_text LIKE '%term%'` on its own.

Where the index cannot be created (an SQLite without FTS5, `pg_trgm` not installable) the search
falls back to a LIKE scan: slower, equally correct, with one warning when the index is first missed.
"""

from __future__ import annotations

import logging

from sqlalchemy import Boolean, Connection, Engine, column, select, table, text
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

log = logging.getLogger("omnicrm.search")

FTS_TABLE = "contacts_fts"
PG_INDEX = "ix_contacts_search_trgm"
MIN_INDEXED_CHARS = 3  # a trigram index needs at least one trigram

# The flag compiled queries read: set on the engine's dialect when the engine is made ready.
_DIALECT_FLAG = "omnicrm_fts5"

_SQLITE_DDL = [
    f"""CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(
        search_text, content='contacts', content_rowid='id', tokenize='trigram case_sensitive 1')""",
    # External content: the index is told the old text on delete/update (triggers see it as `old`).
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ai AFTER INSERT ON contacts BEGIN
        INSERT INTO {FTS_TABLE}(rowid, search_text) VALUES (new.id, new.search_text);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ad AFTER DELETE ON contacts BEGIN
        INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, search_text) VALUES ('delete', old.id, old.search_text);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_au AFTER UPDATE OF search_text, id ON contacts
    WHEN old.search_text IS NOT new.search_text OR old.id IS NOT new.id BEGIN
        INSERT INTO {FTS_TABLE}({FTS_TABLE}, rowid, search_text) VALUES ('delete', old.id, old.search_text);
        INSERT INTO {FTS_TABLE}(rowid, search_text) VALUES (new.id, new.search_text);
    END""",
]


# --- schema (called by the migration in omnicrm/db.py, inside its locked transaction) -----------

def create_index(conn: Connection) -> bool:
    """Create the search index for the connection's engine; False (and one warning) when impossible."""
    if conn.dialect.name == "sqlite":
        return _create_sqlite(conn)
    if conn.dialect.name == "postgresql":
        return _create_postgresql(conn)
    return False


def _create_sqlite(conn: Connection) -> bool:
    from sqlalchemy.exc import OperationalError

    try:
        for statement in _SQLITE_DDL:
            conn.exec_driver_sql(statement)
        # Index the contacts that exist already (no-op on an empty table).
        conn.exec_driver_sql(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('rebuild')")
    except OperationalError as exc:  # e.g. "no such module: fts5" or no trigram tokenizer (< 3.34)
        _drop_sqlite(conn)
        log.warning("search index unavailable (SQLite FTS5 trigram: %s); --search will scan", exc.orig)
        return False
    return True


def _drop_sqlite(conn: Connection) -> None:
    for trigger in ("ai", "ad", "au"):
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {FTS_TABLE}_{trigger}")
    try:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {FTS_TABLE}")
    except Exception:  # noqa: BLE001 - without the fts5 module the table cannot exist either
        pass


def _create_postgresql(conn: Connection) -> bool:
    from sqlalchemy.exc import DBAPIError

    # Each step in a savepoint: a failure must not abort the migration's transaction.
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DBAPIError as exc:
        log.debug("CREATE EXTENSION pg_trgm failed: %s", exc.orig)
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {PG_INDEX} ON contacts "
                                 "USING gin (search_text gin_trgm_ops)")
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        log.warning("search index unavailable (PostgreSQL pg_trgm: %s); --search will scan", first)
        return False
    return True


def drop_index(conn: Connection) -> None:
    """Remove the search index (used to measure the scan baseline and to test the fallback)."""
    if conn.dialect.name == "sqlite":
        _drop_sqlite(conn)
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {PG_INDEX}")


def index_present(conn: Connection) -> bool:
    if conn.dialect.name == "sqlite":
        found = conn.exec_driver_sql(
            "SELECT count(*) FROM sqlite_master WHERE name IN (?, ?, ?, ?)",
            (FTS_TABLE, f"{FTS_TABLE}_ai", f"{FTS_TABLE}_ad", f"{FTS_TABLE}_au")).scalar()
        return found == 4
    if conn.dialect.name == "postgresql":
        return conn.execute(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": PG_INDEX}).scalar()
    return False


def attach(engine: Engine) -> bool:
    """Look once per engine whether the index is there and tell the query compiler (see SearchMatch)."""
    if engine.dialect.name != "sqlite":
        # PostgreSQL runs the same LIKE with or without the index: nothing to switch.
        return True
    with engine.connect().execution_options(sqlite_read_only=True) as conn:
        present = index_present(conn)
        conn.rollback()
    use_index(engine, present)
    if not present:
        log.info("search index missing: --search scans contacts")
    return present


def use_index(engine: Engine, enabled: bool) -> None:
    """Switch index-backed search on or off for this engine (off = the plain LIKE scan)."""
    setattr(engine.dialect, _DIALECT_FLAG, enabled)
    engine.clear_compiled_cache()


# --- query side -----------------------------------------------------------------------------------

def fts_phrase(term: str) -> str:
    """`term` as one FTS5 phrase: quoted, inner quotes doubled, so no input can act as an operator."""
    return '"' + term.replace('"', '""') + '"'


def like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class SearchMatch(ColumnElement[bool]):
    """`contacts.search_text` contains `term`, compiled per engine.

    PostgreSQL and the fallback: `search_text LIKE '%term%'` (the trigram GIN index serves it).
    SQLite with the FTS5 index and a term of 3+ characters: `contacts.id IN (SELECT rowid FROM
    contacts_fts WHERE search_text MATCH '"term"')`.
    """

    type = Boolean()
    inherit_cache = True
    _traverse_internals = [("like", InternalTraversal.dp_clauseelement),
                           ("fts", InternalTraversal.dp_clauseelement)]

    def __init__(self, like: ColumnElement, fts: ColumnElement | None):
        self.like = like
        self.fts = fts

    def self_group(self, against=None):
        # Both forms are comparisons already: no `= 1` wrapper on engines without a boolean type.
        return self


@compiles(SearchMatch)
def _compile_like(element: SearchMatch, compiler, **kw) -> str:
    return compiler.process(element.like, **kw)


@compiles(SearchMatch, "sqlite")
def _compile_sqlite(element: SearchMatch, compiler, **kw) -> str:
    if element.fts is not None and getattr(compiler.dialect, _DIALECT_FLAG, False):
        return compiler.process(element.fts, **kw)
    return compiler.process(element.like, **kw)


_fts = table(FTS_TABLE, column("rowid"), column("search_text"))


def search_match(term: str, many: bool = False) -> SearchMatch:
    """The WHERE clause for "search text contains the (already folded) term".

    `many`: the term is known to match many contacts (the capped count hit its cap); see `not_driving`.
    """
    from omnicrm.models import Contact

    like = Contact.search_text.like(like_pattern(term), escape="\\")
    fts = None
    if len(term) >= MIN_INDEXED_CHARS:
        matches = select(_fts.c.rowid).where(
            _fts.c.search_text.op("MATCH")(fts_phrase(term)))
        fts = not_driving(Contact.id, many).in_(matches)
    return SearchMatch(like, fts)


class _NotDriving(ColumnElement):
    """A column SQLite must not use an index of to drive the query: rendered `+col` there, `col` elsewhere."""

    inherit_cache = True
    _traverse_internals = [("col", InternalTraversal.dp_clauseelement)]

    def __init__(self, col):
        self.col = col
        self.type = col.type


@compiles(_NotDriving)
def _compile_plain(element: _NotDriving, compiler, **kw) -> str:
    return compiler.process(element.col, **kw)


@compiles(_NotDriving, "sqlite")
def _compile_plus(element: _NotDriving, compiler, **kw) -> str:
    return "+" + compiler.process(element.col, **kw)


def not_driving(column, many: bool = False):
    """`column`, or `+column` on SQLite when the filter is known to match many contacts.

    SQLite fetches the matches of an FTS or tag filter by id and sorts them: right for a few hundred,
    slow for 100,000 (a lookup per match). When `many` (list_contacts' capped count overflowed), the id
    is written `+contacts.id`, which SQLite cannot use to drive the query: it walks the ordered
    (user_id, created_at, id) index instead and stops after one page. PostgreSQL estimates both cases
    itself and gets the plain column.
    """
    return _NotDriving(column) if many else column


class _PerEngine(ColumnElement[bool]):
    """One condition written two ways: `sqlite` for SQLite, `default` (in parentheses) elsewhere."""

    type = Boolean()
    inherit_cache = True
    _traverse_internals = [("default", InternalTraversal.dp_clauseelement),
                           ("sqlite", InternalTraversal.dp_clauseelement)]

    def __init__(self, default: ColumnElement, sqlite: ColumnElement):
        self.default = default
        self.sqlite = sqlite

    def self_group(self, against=None):
        return self


@compiles(_PerEngine)
def _compile_default(element: _PerEngine, compiler, **kw) -> str:
    return "(" + compiler.process(element.default, **kw) + ")"


@compiles(_PerEngine, "sqlite")
def _compile_per_engine_sqlite(element: _PerEngine, compiler, **kw) -> str:
    return compiler.process(element.sqlite, **kw)


def many_tagged(tag_id: int) -> ColumnElement[bool]:
    """"Has tag `tag_id`" for a tag known to be on many contacts: checked row by row while the sort index
    is walked, so the first page costs ~page/share rows whatever the tag's size.

    SQLite: a correlated EXISTS on the (contact_id, tag_id) key. PostgreSQL: `id IN (…) OR false`; the
    OR keeps the planner from turning the IN into a join, so it filters the walk with one hash of the
    tag's contacts (a join would probe an index per row: 20x slower for a 1% tag).
    """
    from sqlalchemy import bindparam, exists, literal_column, or_

    from omnicrm.models import Contact, ContactTag

    def tag():
        return ContactTag.tag_id == bindparam(None, int(tag_id), literal_execute=True)

    sqlite = exists().where(ContactTag.contact_id == Contact.id, tag())
    default = or_(Contact.id.in_(select(ContactTag.contact_id).where(tag())), literal_column("false"))
    return _PerEngine(default, sqlite)


# --- indexes for listing ------------------------------------------------------------------------

LIST_INDEXES = [
    # `--sort name` orders by lower(display_name), id.
    "CREATE INDEX IF NOT EXISTS ix_contacts_user_lname ON contacts (user_id, lower(display_name), id)",
    # `--tag`: tag -> contact ids without touching the table.
    "CREATE INDEX IF NOT EXISTS ix_contact_tags_tag_contact ON contact_tags (tag_id, contact_id)",
]


def create_list_indexes(conn: Connection) -> None:
    for statement in LIST_INDEXES:
        conn.exec_driver_sql(statement)
    if conn.dialect.name == "sqlite":
        write_sqlite_stats(conn)


# SQLite plans without statistics assume ~10 rows per `user_id = ?`, so it would walk a user's whole
# (user_id, created_at) index probing a list of FTS matches instead of fetching the few matches by
# rowid. Statistics describing the shape we design for (many contacts per user) make it drive from
# the FTS match (and from the tag list for --tag). A later ANALYZE replaces them with measured ones.
STATS_ROWS = 1_000_000
STATS_PER_USER = 100_000


def write_sqlite_stats(conn: Connection) -> None:
    conn.exec_driver_sql("ANALYZE sqlite_schema")  # creates sqlite_stat1 if it is missing (instant)
    for (index,) in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'contacts'").all():
        columns = [row[2] for row in conn.exec_driver_sql(f'PRAGMA index_info("{index}")').all()]
        if not columns or columns[0] != "user_id":
            continue
        # rows, rows per user, then ~unique for each further column
        stat = " ".join([str(STATS_ROWS), str(STATS_PER_USER)] + ["2"] * (len(columns) - 2) + ["1"] * (len(columns) > 1))
        conn.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = 'contacts' AND idx = ?", (index,))
        conn.exec_driver_sql("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('contacts', ?, ?)", (index, stat))
    conn.exec_driver_sql("DELETE FROM sqlite_stat1 WHERE tbl = 'contacts' AND idx IS NULL")
    conn.exec_driver_sql("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES ('contacts', NULL, ?)", (str(STATS_ROWS),))
    conn.exec_driver_sql("ANALYZE sqlite_schema")  # reload the statistics into this connection's schema


# --- the total behind `page P of N` -----------------------------------------------------------------

# Counting every match of a broad filter at a million contacts costs more than the page itself (one
# row lookup per match), so the count stops at COUNT_CAP (or the end of the requested page) and is
# then shown as a lower bound ("page 1 of 20+ · 1000+ contacts"). The same rule holds without a
# filter: PostgreSQL needs ~0.1-0.2 s to count a million rows. Below the cap the count is exact.
COUNT_CAP = 1_000  # PostgreSQL: ~1-3 ms per 100 counted rows (a heap fetch each, user check)


def count_matches(session, ids_stmt, *, page: int = 1, page_size: int = 50) -> tuple[int, bool]:
    """(total, exact) for a SELECT of contact ids: exact up to the cap, else (cap, False)."""
    from sqlalchemy import func

    cap = max(COUNT_CAP, page * page_size)
    found = session.scalar(select(func.count()).select_from(ids_stmt.limit(cap + 1).subquery()))
    return (found, True) if found <= cap else (cap, False)
