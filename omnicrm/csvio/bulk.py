"""Bulk writing at the driver level inside the caller's transaction: SQLite `executemany`, PostgreSQL
`COPY`, and each engine's way to load many rows at once (the SQLite search index built at the end; the
PostgreSQL indexes and foreign keys dropped and made again)."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from omnicrm.csvio.reading import BYTES_PER_ROW, CsvInput


class BulkDb:
    """Driver-level bulk access inside the session's transaction (SQLite executemany / PostgreSQL COPY)."""

    def __init__(self, session: Session):
        # SQLite checks no foreign keys for an import that begins the transaction: the rows it writes only
        # point at the user, at tags it looked up or made, and at contacts it made or loaded, all under
        # the write lock (see db._configure_sqlite).
        begins = not session.in_transaction()
        self.conn = session.connection(execution_options={"sqlite_foreign_keys": False} if begins else None)
        self.raw = self.conn.connection.driver_connection
        self.pg = self.conn.dialect.name == "postgresql"
        self.cur = self.raw.cursor()
        self.mark = "%s" if self.pg else "?"
        self._next: dict[str, int] = {}
        self._types: dict[str, dict[str, int]] = {}  # PostgreSQL: table -> column -> type oid
        self.exclusive: set[str] = set()  # PostgreSQL tables this transaction holds an exclusive lock on

    def ts(self, value: datetime):
        naive = value.astimezone(timezone.utc).replace(tzinfo=None)
        return naive if self.pg else naive.strftime("%Y-%m-%d %H:%M:%S.%f")

    def query(self, sql: str, params=()) -> list[tuple]:
        self.cur.execute(sql.replace("?", self.mark), params)
        return self.cur.fetchall()

    def stream(self, sql: str, params=()) -> Iterator[tuple]:
        """The rows of a big result one by one, never all in memory (PostgreSQL: a server-side cursor)."""
        cur = self.raw.cursor(name="omnicrm_stream") if self.pg else self.raw.cursor()
        try:
            cur.execute(sql.replace("?", self.mark), params)
            while rows := cur.fetchmany(10_000):
                yield from rows
        finally:
            cur.close()

    def count_upto(self, table: str, user_id: int, limit: int) -> int:
        """The user's rows in `table`, counted up to `limit`."""
        return self.query(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE user_id = ? LIMIT ?) AS t",
                          (user_id, limit))[0][0]

    def select_in(self, sql: str, head: tuple, values: list) -> list[tuple]:
        """`sql` has one `IN_LIST` placeholder for `values`, after the `head` parameters.

        (`+user_id` in these queries keeps SQLite off the (user_id, …) indexes, which would scan every
        row of the user instead of looking up the few contact ids.)"""
        if not values:
            return []
        if self.pg:
            return self.query(sql.replace("IN_LIST", "= ANY(?)"), (*head, list(values)))
        rows: list[tuple] = []
        for start in range(0, len(values), 5000):
            chunk = values[start:start + 5000]
            rows += self.query(sql.replace("IN_LIST", f"IN ({','.join('?' * len(chunk))})"), (*head, *chunk))
        return rows

    def insert(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if not rows:
            return
        if self.pg:
            # Binary COPY with the columns' own types: less than half our CPU of text rows (200,000 contacts'
            # rows: 1.1-1.2 s against 2.8-3.0 s), and the server spends less on parsing them too.
            types = self._column_types(table, columns)  # not inside the COPY: the connection is busy there
            with self.cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" * len(columns))
            self.cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _column_types(self, table: str, columns: tuple[str, ...]) -> list[int]:
        """The type oids of `table`'s `columns` (binary COPY needs them exactly: bigint, varchar, …)."""
        if table not in self._types:
            self._types[table] = dict(self.query("SELECT attname, atttypid FROM pg_attribute "
                                                 "WHERE attrelid = ?::regclass AND attnum > 0 AND NOT attisdropped",
                                                 (table,)))
        return [self._types[table][column] for column in columns]

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        if rows:
            self.cur.executemany(sql.replace("?", self.mark), rows)

    def new_ids(self, table: str, count: int) -> list[int]:
        """Ids for rows about to be inserted (we insert explicit ids so children can point at them)."""
        if count == 0:
            return []
        if self.pg and table in self.exclusive:  # nobody else can insert meanwhile: reserve a block at once
            last = self.query("SELECT setval(pg_get_serial_sequence(?, 'id'), nextval(pg_get_serial_sequence(?, 'id')) "
                              "+ ? - 1)", (table, table, count))[0][0]
            return list(range(last - count + 1, last + 1))
        if self.pg:
            rows = self.query("SELECT nextval(pg_get_serial_sequence(?, 'id')) FROM generate_series(1, ?)",
                              (table, count))
            return [r[0] for r in rows]
        # SQLite: the import holds the write lock (BEGIN IMMEDIATE) for its whole transaction.
        start = self._next.get(table)
        if start is None:
            start = (self.query(f"SELECT coalesce(max(id), 0) FROM {table}")[0][0] or 0) + 1
        self._next[table] = start + count
        return list(range(start, start + count))


def sqlite_pragmas(cur, **values) -> dict:
    """Set connection pragmas; returns their previous values (to restore them)."""
    previous = {}
    for name, value in values.items():
        cur.execute(f"PRAGMA {name}")
        previous[name] = cur.fetchone()[0]
        cur.execute(f"PRAGMA {name} = {int(value)}")
    return previous


BULK_MIN_ROWS = 50_000


def is_bulk_load(cur, source: CsvInput) -> bool:
    """A file expected to hold at least BULK_MIN_ROWS contacts and at least as many as the table has
    already (`cur`: a driver cursor): building an index once at the end then costs less than keeping it up
    to date row by row."""
    expected = (source.total_bytes or 0) // BYTES_PER_ROW
    if expected < BULK_MIN_ROWS:
        return False
    cur.execute("SELECT count(*) FROM contacts")
    return expected >= cur.fetchone()[0]


@contextmanager
def sqlite_bulk_journal(engine: Engine, source: CsvInput) -> Iterator[bool]:
    """SQLite, around the session of a bulk load (is_bulk_load): the import writes through a rollback
    journal instead of the WAL, so that its pages go to the database file once, instead of into the WAL
    and again into the file at the checkpoint (1M rows: ~8 s of ~45 s, and half the system CPU).
    Synchronous is FULL meanwhile, the safe level for a rollback journal. The price is the one PostgreSQL's
    bulk load pays: until the import commits, other processes' reads wait for it too (busy timeout),
    instead of reading the database as it was. SQLite leaves WAL only for the one connection that has the
    database open, and refuses at once otherwise: then the import runs on WAL as usual. Yields whether it
    switched. WAL is back after the session has ended, or, if this process dies, with the next
    connection that opens the database (db.use_wal; the rollback journal undoes the import first)."""
    import sqlite3

    from omnicrm.db import use_wal

    switched = False
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()  # the pool's connection, which the session then takes
        try:
            cur = raw.driver_connection.cursor()
            if is_bulk_load(cur, source):
                try:
                    switched = cur.execute("PRAGMA journal_mode = DELETE").fetchone()[0].lower() == "delete"
                except sqlite3.OperationalError:  # "database is locked": others have it open
                    pass
                if switched:
                    cur.execute("PRAGMA synchronous = FULL")
        finally:
            raw.close()
    try:
        yield switched
    finally:
        if switched:
            raw = engine.raw_connection()
            try:
                use_wal(raw.driver_connection.cursor())  # and synchronous NORMAL again
            except sqlite3.OperationalError:  # still locked after the busy timeout: the next connection does it
                pass
            finally:
                raw.close()


class SqliteBulkLoad:
    """SQLite: what the import stops maintaining row by row and builds once before the commit. DDL is
    transactional in SQLite and the import holds the write lock throughout, so a rolled-back import gets
    everything back and nobody sees the schema in between.

    The search index: its insert trigger costs ~0.2 ms a row. It is dropped, and every contact the import
    created is indexed by one INSERT … SELECT at the end (the new contacts are exactly those with an id
    above the largest one at the start). Meanwhile the update trigger only runs for contacts that existed
    before the import (a merge into one of them); the import's own contacts are not in the index yet, and
    get their final text at the end. FTS5 also flushes its in-memory term buffer to a new segment every
    `hashsize` bytes (1 MB by default); one statement with a larger buffer writes few, large segments and
    merges far less (~40% less FTS time than a statement per batch). It is an FTS5 setting stored in the
    index, so it is put back too.

    For a bulk load (is_bulk_load), also the indexes whose order is not the import's: the name index
    (lower(display_name)) and the E.164 phone index take every new row at a random place, which costs the
    single writer ~4 s and ~2.5 s of 1M rows; built at the end they take ~1.6 s and ~1.2 s. (The other
    indexes grow at their end during an import and cost about the same either way.) DROP INDEX deletes an
    index's statistics, so those are put back as they were."""

    HASHSIZE = 64 * 1024 * 1024  # 1M contacts: ~1.5 s faster than 32 MB, for +40 MB resident while indexing
    DEFAULT_HASHSIZE = 1024 * 1024  # FTS5's own default
    DEFERRED_INDEXES = ("ix_contacts_user_lname", "ix_contact_phones_user_e164")

    def __init__(self, db: BulkDb, fts: tuple[str, list[str], int] | None, indexes: list[str], stats: list[tuple]):
        self.db, self.fts, self.indexes, self.stats = db, fts, indexes, stats

    @classmethod
    def start(cls, db: BulkDb, source: CsvInput) -> "SqliteBulkLoad":
        indexes, stats = [], []
        if is_bulk_load(db.cur, source):
            names = cls.DEFERRED_INDEXES
            found = db.query("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name IN (?, ?)", names)
            if db.query("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'"):
                stats = db.query("SELECT tbl, idx, stat FROM sqlite_stat1 WHERE idx IN (?, ?)", names)
            for name, sql in found:
                db.cur.execute(f"DROP INDEX {name}")
                indexes.append(sql)
        return cls(db, cls._pause_search_index(db), indexes, stats)

    @staticmethod
    def _pause_search_index(db: BulkDb) -> tuple[str, list[str], int] | None:
        """Drop the insert trigger, limit the update trigger to older contacts; (table, saved triggers,
        first new id), or None without a search index."""
        from omnicrm.search_index import FTS_TABLE

        names = (f"{FTS_TABLE}_ai", f"{FTS_TABLE}_au")
        found = dict(db.query("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?)", names))
        if set(found) != set(names):
            return None
        first_id = (db.query("SELECT max(id) FROM contacts")[0][0] or 0) + 1
        for name in names:
            db.cur.execute(f"DROP TRIGGER {name}")
        db.cur.execute(re.sub(r"\bWHEN\b(.*?)\bBEGIN\b", lambda m: f"WHEN old.id < {int(first_id)} AND ({m[1]}) BEGIN",
                              found[names[1]], count=1, flags=re.S | re.I))
        return FTS_TABLE, [found[n] for n in names], first_id

    def restore(self) -> None:
        db = self.db
        for sql in self.indexes:
            db.cur.execute(sql)
        if self.stats:
            db.cur.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", self.stats)
            db.cur.execute("ANALYZE sqlite_schema")  # reload the statistics into this connection's schema
        if self.fts:
            self._index_new_contacts(*self.fts)

    def _index_new_contacts(self, table: str, saved: list[str], first_id: int) -> None:
        db = self.db
        stored = db.query(f"SELECT v FROM {table}_config WHERE k = 'hashsize'")
        db.cur.execute(f"INSERT INTO {table}({table}, rank) VALUES ('hashsize', ?)", (self.HASHSIZE,))
        db.cur.execute(f"INSERT INTO {table}(rowid, search_text) SELECT id, search_text FROM contacts WHERE id >= ?",
                       (first_id,))
        db.cur.execute(f"INSERT INTO {table}({table}, rank) VALUES ('hashsize', ?)",
                       (int(stored[0][0]) if stored else self.DEFAULT_HASHSIZE,))
        db.cur.execute(f"DROP TRIGGER {table}_au")
        for sql in saved:
            db.cur.execute(sql)


class PgBulkLoad:
    """PostgreSQL, a big file into a small database: maintaining the trigram index, the list indexes and
    the foreign keys row by row costs four times the inserts themselves (the GIN index alone half).
    For the import the contact tables' foreign keys and their indexes are dropped inside the import's
    transaction and created again before the commit (`restore`): one sort per index and one join per
    foreign key. Primary keys stay; so do the unique email index and the contact_id indexes, which the
    import reads, unless it is a fast import, which reads them only after `restore`, or after
    `restore_lookups` if it must merge held-back rows earlier (a file repeating many emails it knows). DDL
    is transactional, so a failed or rolled-back import gets everything back. The cost: until the import
    commits, other sessions that touch these tables wait for it (the drop takes an exclusive lock), so this
    only happens for a bulk load (is_bulk_load)."""

    TABLES = ("contacts", "contact_emails", "contact_phones", "contact_tags", "notes", "interactions")
    INDEXED = TABLES[:4]  # notes and interactions keep their indexes (few notes; many synced emails)
    MAINTENANCE_MEMORY = "256MB"  # server memory for each index build (SET LOCAL: this transaction only)

    def __init__(self, db: BulkDb, lookups: list[str], rest: list[str]):
        self.db = db
        self.lookups = lookups  # (fast) what looking rows up needs: the unique email index, contact_id indexes
        self.rest = rest  # the other indexes, then the foreign keys

    @classmethod
    def start(cls, db: BulkDb, source: CsvInput, fast: bool) -> "PgBulkLoad | None":
        if not is_bulk_load(db.cur, source):
            return None
        tables = list(cls.TABLES)
        db.cur.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        # Foreign keys, and (fast) the unique email constraint: (table, name, definition).
        constraints = db.query("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                               "FROM pg_constraint WHERE conrelid = ANY(?::regclass[]) "
                               "AND (contype = 'f' OR (? AND contype = 'u' AND conrelid = 'contact_emails'::regclass)) "
                               "ORDER BY contype DESC, 1, 2", (tables, fast))
        # The contact tables' other indexes, as (name, definition, on contact_id); those on contact_id only when
        # fast (the others' lookups read them).
        indexes = []
        for name, sql in db.query(
                "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
                "WHERE i.indrelid = ANY(?::regclass[]) AND NOT i.indisprimary "
                "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1",
                (list(cls.INDEXED),)):
            on_contact = bool(re.search(r"\(\s*contact_id\b", sql))
            if fast or not on_contact:
                indexes.append((name, sql, on_contact))
        for table, name, _ in constraints:
            db.cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _, _ in indexes:
            db.cur.execute(f"DROP INDEX {name}")
        db.exclusive.update(tables)
        adds = [(d.startswith("UNIQUE"), f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}') for t, n, d in constraints]
        lookups = [sql for unique, sql in adds if unique] + [sql for _, sql, on_contact in indexes if on_contact]
        rest = [sql for _, sql, on_contact in indexes if not on_contact] + [sql for unique, sql in adds if not unique]
        return cls(db, lookups, rest)

    def restore_lookups(self) -> None:
        """Build what looking rows up needs now, with fresh statistics, instead of every lookup of the
        held-back rows scanning the tables (a re-import of a 1M-row export: minutes a batch)."""
        if self.lookups:
            self._build(self.lookups)
            self.lookups = []
            self.db.cur.execute(f"ANALYZE {', '.join(self.INDEXED)}")

    def restore(self) -> None:
        self._build(self.lookups + self.rest)
        self.lookups = self.rest = []

    def _build(self, statements: list[str]) -> None:
        cur = self.db.cur
        cur.execute(f"SET LOCAL maintenance_work_mem = '{self.MAINTENANCE_MEMORY}'")
        for sql in statements:
            cur.execute(sql)
