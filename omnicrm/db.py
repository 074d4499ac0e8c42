"""Engine and session factory, and the versioned schema migrations."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from omnicrm.config import Settings, ensure_private_dir, ensure_private_file
from omnicrm.errors import ServiceUnavailable
from omnicrm.models import Base, User

SQLITE_BUSY_TIMEOUT_S = 30
log = logging.getLogger("omnicrm.db")

_engines: dict[str, Engine] = {}
_migrated: set[str] = set()
_lock = threading.Lock()


def sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


def use_wal(cur) -> None:
    """Switch the database file to WAL: a new one, or one a bulk load left (csvio.bulk.sqlite_bulk_journal);
    and this connection to synchronous NORMAL, WAL's safe level. The switch needs an exclusive lock and
    SQLite reports "database is locked" at once (no busy wait) when processes open a brand-new file
    together: retry."""
    import sqlite3
    import time

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling is disabled so that every transaction starts with
    # BEGIN IMMEDIATE: a writer waits for the busy timeout instead of failing on lock upgrade.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA foreign_keys = ON")
        use_wal(cur)
        # Reads through a memory map: no read() call per page for index lookups on big tables.
        cur.execute("PRAGMA mmap_size = 1073741824")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        options = conn.get_execution_options()
        # A CSV import checks its own references (it only writes rows for contacts it created or loaded
        # under the write lock) and asks for the per-row foreign key lookups to be skipped; the pragma
        # only takes effect outside a transaction, so it is set here, before each BEGIN.
        checks = "OFF" if options.get("sqlite_foreign_keys") is False else "ON"
        conn.exec_driver_sql(f"PRAGMA foreign_keys = {checks}")
        conn.exec_driver_sql(f"BEGIN {'DEFERRED' if options.get('sqlite_read_only') else 'IMMEDIATE'}")


def get_engine(url: str) -> Engine:
    """One engine per URL per process; SQLite files and their folder are created private."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            path = sqlite_path(url)
            if path is not None:
                ensure_private_file(path)
                engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S,
                                                          "check_same_thread": False})
                _configure_sqlite(engine)
            else:
                # A worker runs up to --workers handlers at once, each with its own session.
                engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=45,
                                       connect_args={"connect_timeout": 10})
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _migrated.clear()


# --- migrations -------------------------------------------------------------------------------
# Each migration runs once, in order, inside one locked transaction. Append, never edit:
# a database at version N runs migrations N+1… only.

def _m1_initial(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _m2_search_index(conn: Connection) -> None:
    # Substring index on contacts.search_text (FTS5 trigram / pg_trgm GIN) and the list indexes.
    from omnicrm import search_index

    search_index.create_index(conn)
    search_index.create_list_indexes(conn)


def _m3_child_position_indexes(conn: Connection) -> None:
    # Emails and phones of a contact in their stored order straight from an index (export reads them per
    # contact); the new indexes replace the contact_id-only ones.
    for table in ("contact_emails", "contact_phones"):
        conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_{table}_contact_position "
                             f"ON {table} (contact_id, position)")
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS ix_{table}_contact_id")


def _m4_unused_indexes(conn: Connection) -> None:
    # Two indexes no query uses, which every write (a million rows of an import) kept up: contacts
    # (user_id, display_name, id), since `--sort name` uses the lower() index, and contact_tags (tag_id),
    # which (tag_id, contact_id) covers.
    for name in ("ix_contacts_user_name", "ix_contact_tags_tag_id"):
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")


MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _m1_initial),
    (2, _m2_search_index),
    (3, _m3_child_position_indexes),
    (4, _m4_unused_indexes),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS omnicrm_schema (version INTEGER NOT NULL)"


def schema_version(engine: Engine) -> int:
    """The recorded schema version (0 for a new database), read without taking a write lock."""
    with engine.execution_options(sqlite_read_only=True).connect() as conn:
        if not inspect(conn).has_table("omnicrm_schema"):
            return 0
        return conn.execute(text("SELECT max(version) FROM omnicrm_schema")).scalar() or 0


def migrate(engine: Engine) -> int:
    """Bring the schema to SCHEMA_VERSION; idempotent and safe when processes race."""
    current = schema_version(engine)
    if current >= SCHEMA_VERSION:  # the common case: no lock, so a running import does not block us
        return current
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE serialises racing processes
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(72651001)"))
        conn.execute(text(_VERSION_TABLE))
        current = conn.execute(text("SELECT max(version) FROM omnicrm_schema")).scalar() or 0
        for version, step in MIGRATIONS:
            if version > current:
                step(conn)
                conn.execute(text("INSERT INTO omnicrm_schema (version) VALUES (:v)"), {"v": version})
                current = version
        return current


def ready_engine(settings: Settings) -> Engine:
    """The engine for `settings`, with the home folder private and the schema up to date."""
    ensure_private_dir(settings.home)
    engine = get_engine(settings.database_url)
    if settings.database_url not in _migrated:
        try:
            version = migrate(engine)
            log.debug("database %s at schema version %s", engine.url.render_as_string(hide_password=True),
                      version, extra={"fields": {"schema_version": version, "dialect": engine.dialect.name}})
        except OperationalError as exc:
            raise ServiceUnavailable(f"cannot open the database: {describe_db_error(exc)}") from None
        from omnicrm.search_index import attach

        attach(engine)  # is the search index there? (decides how --search compiles)
        _migrated.add(settings.database_url)
    return engine


def describe_db_error(exc: Exception) -> str:
    """One line about a driver error, with no credentials or SQL."""
    orig = getattr(exc, "orig", exc)
    message = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if message == "database is locked":  # SQLite, after the busy timeout
        message += (f": another command (an import?) has been writing it for over {SQLITE_BUSY_TIMEOUT_S} s; "
                    "try again once it has finished")
    return message


def session_factory(settings: Settings, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on the settings' database. `read_only` sessions start SQLite transactions DEFERRED, so
    they read a WAL snapshot instead of waiting for a long writer (an import) to finish."""
    engine = ready_engine(settings)
    if read_only:
        engine = engine.execution_options(sqlite_read_only=True)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(settings: Settings, *, read_only: bool = False) -> Iterator[Session]:
    """A session for one unit of work. The caller commits; anything uncommitted is rolled back."""
    session = session_factory(settings, read_only=read_only)()
    try:
        yield session
    finally:
        session.close()


def user_id(session: Session, name: str) -> int:
    """The id of user `name`, created on first use."""
    found = session.scalar(select(User.id).where(User.name == name))
    if found is not None:
        return found
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(User).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
    return session.scalar(select(User.id).where(User.name == name))
