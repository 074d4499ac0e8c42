"""Export of contacts as CSV, JSON or JSON Lines, streamed in constant memory: id-keyed batches of plain
driver SQL (emails, phones, tags and notes aggregated by the engine), whole exports read by two processes
(SQLite) or connections (PostgreSQL) at once."""

from __future__ import annotations

import codecs
import os
from datetime import datetime
from typing import IO, Iterator

from sqlalchemy import Integer, Text, and_, case, func, literal, literal_column, select, text, true
from sqlalchemy.orm import Session

from omnicrm.config import now as clock_now
from omnicrm import csvformats as formats
from omnicrm.csvio.bulk import sqlite_pragmas
from omnicrm.csvio.forked import Forked, prefetched
from omnicrm.errors import InvalidInput, OmniCrmError
from omnicrm.filters import ContactFilter, apply_filter
from omnicrm.models import Contact

EXPORT_COLUMNS = list(formats.NATIVE_COLUMNS)
EXPORT_BATCH = 5000
EXPORT_PROCESSES = 2  # readers of a whole export: SQLite processes, PostgreSQL connections (one per core)
PG_EXPORT_RANGE = 50_000  # contact ids per COPY of a parallel PostgreSQL export
_SEP = "\x1f"  # joins multi-values inside export queries (cannot occur in our data)


def _sqlite_aggregates(joiner: str, guard: bool = False) -> list[str]:
    """SQLite: the emails, phones, tags and notes columns of contact `c`, each joined in its order (with
    `guard`, through the formula guard): a correlated subquery each, served by the (contact_id, position)
    indexes. The guard goes inside, where the aggregate it repeats is computed once."""
    sep = "char(31)" if joiner == _SEP else "';'"
    cell = _sqlite_guard if guard else str
    return [f"(SELECT {cell(f'group_concat(email, {sep})')} FROM (SELECT email FROM contact_emails "
            "WHERE contact_id = c.id ORDER BY position))",
            f"(SELECT {cell(f'group_concat(p, {sep})')} FROM (SELECT coalesce(e164, raw) AS p FROM contact_phones "
            "WHERE contact_id = c.id ORDER BY position))",
            f"(SELECT {cell(f'group_concat(name, {sep})')} FROM (SELECT t.name FROM contact_tags ct JOIN tags t "
            "ON t.id = ct.tag_id WHERE ct.contact_id = c.id ORDER BY t.name))",
            f"(SELECT {cell('group_concat(body, char(10))')} FROM (SELECT body FROM notes WHERE contact_id = c.id "
            "ORDER BY id))"]


def _sqlite_guard(cell: str) -> str:
    """SQLite: the formula guard on `cell` (an expression cheap to repeat). Only a cell starting with one of
    the characters to look at is handed to Python (omnicrm.output.neutralise, registered as
    omnicrm_neutralise), unless it is plainly phone numbers: ;-separated digits, each part maybe starting
    with a + followed by a digit (+14155550101;+442079460958), which is what most of them are."""
    from omnicrm.output import GUARDED_FIRST

    firsts = ", ".join(str(ord(ch)) for ch in GUARDED_FIRST)
    phones = (f"{cell} NOT GLOB '*[^0-9;+]*' AND {cell} NOT GLOB '*[0-9+]+*' AND {cell} NOT GLOB '*+' "
              f"AND {cell} NOT GLOB '*+;*'")
    return f"CASE WHEN unicode({cell}) IN ({firsts}) AND NOT ({phones}) THEN omnicrm_neutralise({cell}) ELSE {cell} END"


def _pg_aggregate_joins(c, user_id: int, joiner: str, filtered: bool, ranged: bool = False):
    """PostgreSQL: `c` joined to its emails, phones, tags and notes, each joined into one text `v`.

    A whole export aggregates each table for the user in one pass (GROUP BY, then merge joins), or for the
    contact ids between :range_lo and :range_hi (`ranged`); a filtered one looks up only the matching
    contacts' rows (LATERAL)."""
    sep = "chr(31)" if joiner == _SEP else "';'"
    joined, values = c, []
    for name, (value, source, order, owner, user_col) in zip("eptn", _PG_CHILDREN):
        joiner_sql = "chr(10)" if name == "n" else sep
        if filtered:
            part = text(f"SELECT string_agg({value}, {joiner_sql} ORDER BY {order}) AS v FROM {source} "
                        f"WHERE {owner} = c.id").columns(v=Text).lateral(name)
            joined = joined.outerjoin(part, true())
        else:
            # One sort of the rows by contact and order, fed in that order to string_agg, which keeps it: an
            # ORDER BY inside the aggregate would sort every contact's few rows again (PostgreSQL < 16 does),
            # and cost a third of the export. (No parallel plan may shuffle them: _PG_EXPORT_SETTINGS.)
            within = f" AND {owner} BETWEEN :range_lo AND :range_hi" if ranged else ""
            part = text(f"SELECT contact_id, string_agg(v, {joiner_sql}) AS v FROM (SELECT {owner} AS contact_id, "
                        f"{value} AS v FROM {source} WHERE {user_col} = :agg_user{within} ORDER BY {owner}, {order}) "
                        "s GROUP BY contact_id").bindparams(agg_user=user_id).columns(
                contact_id=Integer, v=Text).subquery(name)
            joined = joined.outerjoin(part, part.c.contact_id == c.c.id)
        values.append(part.c.v)
    return joined, values


# PostgreSQL: each multi-value column as (value, FROM, order within a contact, contact column, user column)
_PG_CHILDREN = (
    ("email", "contact_emails", "position", "contact_id", "user_id"),
    ("coalesce(e164, raw)", "contact_phones", "position", "contact_id", "user_id"),
    ("t.name", "contact_tags ct JOIN tags t ON t.id = ct.tag_id", "t.name", "ct.contact_id", "t.user_id"),
    ("body", "notes", "id", "contact_id", "user_id"),
)


def _iso_sql(column: str, pg: bool) -> str:
    """ISO 8601 text of a stored (naive UTC) timestamp, as Python's isoformat() + '+00:00' writes it."""
    if pg:
        return (f"to_char({column}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN date_trunc('second', {column}) = "
                f"{column} THEN '' ELSE to_char({column}, '.US') END || '+00:00'")
    # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff'
    return f"replace(replace({column}, ' ', 'T'), '.000000', '') || '+00:00'"


def _export_select(user_id: int, flt: ContactFilter, now: datetime, pg: bool, joiner: str, columns: list[str],
                   guard: bool = False, ranged: bool = False):
    """One SELECT giving every matching contact in `columns` (native export columns), oldest id first;
    with `ranged`, those with ids between the parameters :range_lo and :range_hi.

    With `guard`, text cells a spreadsheet would run as a formula get their leading `'` in SQL: on
    PostgreSQL by the same two regular expressions as `omnicrm.output.neutralise`, with empty text as NULL
    (COPY would quote an empty string; the CSV writer writes both as an empty cell); on SQLite by
    neutralise itself, for the few cells that need a look (_sqlite_guard)."""
    from omnicrm.output import FORMULA_START_PATTERN, GUARDED_FIRST, PLAIN_CELL_PATTERN

    c = Contact.__table__.alias("c")
    if pg:
        source, (emails, phones, tags, notes) = _pg_aggregate_joins(c, user_id, joiner, not flt.empty, ranged)
    else:
        source, (emails, phones, tags, notes) = c, map(literal_column, _sqlite_aggregates(joiner, guard))
    sql = {"id": c.c.id, "display_name": c.c.display_name, "email": emails, "phone": phones,
           "company": c.c.company, "title": c.c.title, "tags": tags, "notes": notes,
           "created_at": literal_column(_iso_sql("c.created_at", pg)),
           "updated_at": literal_column(_iso_sql("c.updated_at", pg))}
    selected = []
    for name in columns:
        expr = sql[name]
        if guard and not pg and name in ("display_name", "company", "title"):
            expr = literal_column(_sqlite_guard(f"c.{name}"))
        elif guard and pg and name not in formats.TIMESTAMP_COLUMNS:
            bare = func.ltrim(expr, "'")
            first = func.ascii(expr).in_([literal_column(str(ord(ch))) for ch in GUARDED_FIRST])  # cheap, first
            formula = and_(first, bare.op("~")(FORMULA_START_PATTERN), bare.op("!~")(PLAIN_CELL_PATTERN))
            expr = case((formula, literal("'").concat(expr)), else_=func.nullif(expr, ""))
        selected.append(expr.label(name))
    # `+c.user_id` (SQLite) keeps the scan on the primary key, in id order, instead of a (user_id, …) index.
    owner = text("c.user_id = :export_user" if pg else "+c.user_id = :export_user").bindparams(export_user=user_id)
    stmt = select(*selected).select_from(source).where(owner).order_by(c.c.id)
    if ranged:  # the range is given on each execution
        stmt = stmt.where(text("c.id BETWEEN :range_lo AND :range_hi"))
    if not flt.empty:
        stmt = stmt.where(c.c.id.in_(apply_filter(select(Contact.id), user_id, flt.validate(), now)))
    return stmt


def iter_export_batches(session: Session, user_id: int, flt: ContactFilter, *, now: datetime | None = None,
                        batch: int = EXPORT_BATCH, joiner: str = _SEP, columns: list[str] | None = None,
                        threaded: bool = True) -> Iterator[list]:
    """Every matching contact as a row of `columns` (default: all native columns), oldest id first, a
    batch at a time (constant memory). Emails, phones and tags come joined with `joiner`, notes with
    newlines, timestamps as ISO 8601 text. With `threaded` (PostgreSQL), a reader thread fetches the next
    batch while the caller writes this one."""
    now = now or clock_now()
    flt.validate()
    conn = session.connection(execution_options={"sqlite_read_only": True})
    pg = conn.dialect.name == "postgresql"
    stmt = _export_select(user_id, flt, now, pg, joiner, columns or EXPORT_COLUMNS)

    def batches() -> Iterator[list]:
        result = conn.execute(stmt, execution_options={"stream_results": True, "yield_per": batch})
        yield from result.partitions(batch)

    if pg:
        _serial_plan(conn)
        yield from (prefetched(batches()) if threaded else batches())
        return
    # SQLite: read through the small page cache, not the memory map (mapped pages count as resident). No
    # reader thread: sqlite3 hands the GIL over for every row, which costs more than the overlap gains.
    cur = conn.connection.driver_connection.cursor()
    previous = sqlite_pragmas(cur, mmap_size=0)
    try:
        yield from batches()
    finally:
        sqlite_pragmas(cur, **previous)


_PG_EXPORT_SETTINGS = (
    # No parallel plan: each worker would aggregate every child table for the user again (three times the
    # work on two cores).
    "SET LOCAL max_parallel_workers_per_gather = 0",
    # The sorts by contact of a range's emails, phones and tags (a few MB) in memory, not in temporary files.
    "SET LOCAL work_mem = '64MB'",
)


def _serial_plan(conn) -> None:
    """PostgreSQL: the export query's settings (_PG_EXPORT_SETTINGS), for this transaction."""
    for setting in _PG_EXPORT_SETTINGS:
        conn.exec_driver_sql(setting)


def _copy_csv(session: Session, user_id: int, flt: ContactFilter, now: datetime, columns: list[str],
              stream: IO[str]) -> int:
    """PostgreSQL: the server writes the CSV itself (`COPY (SELECT …) TO STDOUT`, formula guard in SQL)
    and this process only passes the text on, so the export runs at the server's speed on its own core."""
    conn = session.connection()
    _serial_plan(conn)
    if flt.empty:
        count = _pg_parallel_copy(session, user_id, now, columns, stream)
        if count is not None:
            return count
    compiled = _export_select(user_id, flt, now, True, ";", columns, guard=True).compile(
        dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    cur = conn.connection.driver_connection.cursor()
    stream.write(",".join(columns) + "\n")
    with cur.copy(f"COPY ({compiled}) TO STDOUT WITH (FORMAT csv)", compiled.params) as copy:
        for piece in _pieces(copy, 1 << 16):
            _write_utf8(stream, piece)
    return cur.rowcount


def _pieces(copy, size: int) -> Iterator[bytes]:
    """The data of a `COPY … TO STDOUT` joined into pieces of about `size` bytes (one whole row per message,
    so a piece decodes cleanly); the last piece may be empty."""
    pending: list = []
    total = 0
    for data in copy:
        pending.append(data)
        total += len(data)
        if total >= size:
            yield b"".join(pending)
            pending, total = [], 0
    yield b"".join(pending)


def _pg_parallel_copy(session: Session, user_id: int, now: datetime, columns: list[str], stream: IO[str], *,
                      span: int = PG_EXPORT_RANGE) -> int | None:
    """PostgreSQL, a whole export of more than one range of `span` ids: EXPORT_PROCESSES more
    connections (server backends, one core each) COPY every other id range, all in the session's snapshot
    (pg_export_snapshot), and this process writes the ranges in order, a piece of at most 1 MB at a time.
    None when there is only one range."""
    from psycopg import sql

    conn = session.connection()
    cur = conn.connection.driver_connection.cursor()
    lo, hi = cur.execute("SELECT min(id), max(id) FROM contacts WHERE user_id = %s", (user_id,)).fetchone()
    if lo is None or hi - lo < span:
        return None
    starts = list(range(lo, hi + 1, span))
    snapshot = cur.execute("SELECT pg_export_snapshot()").fetchone()[0]
    compiled = _export_select(user_id, ContactFilter(), now, True, ";", columns, guard=True, ranged=True).compile(
        dialect=conn.dialect)
    statement = f"COPY ({compiled}) TO STDOUT WITH (FORMAT csv)"
    engine = session.get_bind()

    def ranges(mine: list[int]) -> Iterator[tuple[int, bytes, bool]]:
        raw = engine.raw_connection()
        try:
            driver = raw.driver_connection
            driver.rollback()
            worker = driver.cursor()
            worker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            worker.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            for setting in _PG_EXPORT_SETTINGS:
                worker.execute(setting)
            for start in mine:
                params = compiled.construct_params({"range_lo": start, "range_hi": start + span - 1})
                with worker.copy(statement, params) as copy:
                    for piece in _pieces(copy, 1 << 20):
                        yield 0, piece, False
                yield worker.rowcount, b"", True  # the end of the range, and its row count
        finally:
            raw.rollback()
            raw.close()

    readers = [prefetched(ranges(starts[k::EXPORT_PROCESSES])) for k in range(EXPORT_PROCESSES)]
    try:
        stream.write(",".join(columns) + "\n")
        count = 0
        for i in range(len(starts)):
            last = False
            while not last:  # the pieces of range i, from the reader of every other range
                n, data, last = next(readers[i % EXPORT_PROCESSES])
                _write_utf8(stream, data)
                count += n
        return count
    finally:
        for reader in readers:
            reader.close()


def _write_utf8(stream: IO[str], data: bytes, piece: int = 1 << 16) -> None:
    """Write UTF-8 text `data` to `stream`: to its byte buffer when it has one and writes UTF-8 (after what
    was written to it as text), else decoded; at most a pipe's capacity at a time (a write much larger than
    that into a pipe whose reader has gone, `| head`, can end without an error, and the export would carry
    on for nothing)."""
    target = getattr(stream, "buffer", None)
    if target is None or codecs.lookup(getattr(stream, "encoding", None) or "ascii").name != "utf-8":
        stream.write(data.decode())
        return
    stream.flush()
    for start in range(0, len(data), piece):
        target.write(data[start:start + piece])


def _sqlite_parallel_csv(session: Session, user_id: int, now: datetime, columns: list[str], stream: IO[str], *,
                         span: int = EXPORT_BATCH) -> int | None:
    """SQLite, a whole export: EXPORT_PROCESSES forked readers each run the export query over every other
    range of `span` contact ids and format their ranges as CSV, which this process writes in order.
    (One process is bound by SQLite's per-row work and Python's, on one core.)

    The readers must see one and the same snapshot: this process holds the write lock (BEGIN IMMEDIATE,
    without waiting) until every reader has begun its read transaction, so nothing can commit in between.
    None (export in this process instead) when a writer holds the lock, for a file-less database, or
    without fork()."""
    import sqlite3
    from functools import partial

    path = session.get_bind().url.database
    if not path or path == ":memory:" or not hasattr(os, "fork"):
        return None
    guard = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        guard.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:  # a writer is at work: do not wait for it
        guard.close()
        return None
    readers: list[Forked] = []
    try:
        lo, hi = guard.execute("SELECT min(id), max(id) FROM contacts WHERE user_id = ?", (user_id,)).fetchone()
        starts = list(range(lo, hi + 1, span)) if lo is not None else []
        compiled = _export_select(user_id, ContactFilter(), now, False, ";", columns, guard=True, ranged=True).compile(
            dialect=session.get_bind().dialect)
        sql, names = str(compiled), compiled.positiontup
        for k in range(min(EXPORT_PROCESSES, len(starts))):
            readers.append(Forked(partial(_export_ranges, path, sql, names, user_id, starts[k::EXPORT_PROCESSES],
                                           span), "exporting"))
        for reader in readers:
            if reader.receive() != "ready":
                raise OmniCrmError("an export reader process did not start")
        guard.rollback()  # every reader has its snapshot: writers may go on
        stream.write(",".join(columns) + "\n")
        count = 0
        for i in range(len(starts)):
            n, data = readers[i % len(readers)].receive()
            _write_utf8(stream, data)
            count += n
        return count
    finally:
        guard.close()
        for reader in readers:
            reader.stop()


def _export_ranges(path: str, sql: str, names, user_id: int, starts: list[int], span: int) -> Iterator:
    """In an export reader process: "ready" once its read transaction has begun, then (count, UTF-8 CSV)
    for each of its id ranges (the query applies the formula guard: the rows are written as they come)."""
    import sqlite3

    from omnicrm.output import csv_text, neutralise

    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("omnicrm_neutralise", 1, neutralise, deterministic=True)
    conn.execute("PRAGMA mmap_size = 0")  # mapped pages would count as resident memory
    conn.execute("BEGIN")
    conn.execute("SELECT 1 FROM contacts LIMIT 1").fetchall()  # the read transaction (snapshot) starts here
    yield "ready"
    for start in starts:
        values = {"export_user": user_id, "range_lo": start, "range_hi": start + span - 1}
        rows = conn.execute(sql, [values[name] for name in names]).fetchall()
        yield len(rows), csv_text(rows).encode()


def export_contacts(session: Session, user_id: int, flt: ContactFilter, fmt: str, stream: IO[str], *,
                    portable: bool = False, now: datetime | None = None) -> int:
    """Write every matching contact to `stream` as csv (native columns), json or jsonl; returns the count.

    `portable` leaves out id, created_at and updated_at (for diffing two exports or moving contacts).
    """
    from omnicrm.output import write_records, write_rows

    if fmt not in ("csv", "json", "jsonl"):
        raise InvalidInput(f"--format: export writes csv, json or jsonl (got {fmt!r})")
    now = now or clock_now()
    flt.validate()
    columns = [c for c in EXPORT_COLUMNS if not (portable and c in formats.TIMESTAMP_COLUMNS)]
    if fmt == "csv":
        if session.get_bind().dialect.name == "postgresql":
            return _copy_csv(session, user_id, flt, now, columns, stream)
        if flt.empty:
            count = _sqlite_parallel_csv(session, user_id, now, columns, stream)
            if count is not None:
                return count
        return write_rows(columns, iter_export_batches(session, user_id, flt, now=now, joiner=";", columns=columns),
                          stream)
    multi = {"email", "phone", "tags"}

    def records() -> Iterator[dict]:
        for part in iter_export_batches(session, user_id, flt, now=now, columns=columns):
            for row in part:
                yield {name: (value.split(_SEP) if value else []) if name in multi else value
                       for name, value in zip(columns, row)}
    return write_records(records(), columns, fmt, stream)
