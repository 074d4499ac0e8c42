"""Settings, private files, the versioned schema and racing `init`s on SQLite and PostgreSQL."""

import os
import stat
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from omnicrm import db
from omnicrm.config import load_settings, normalise_db_url, now
from omnicrm.errors import InvalidInput, ServiceUnavailable


@pytest.mark.parametrize("url, expected", [
    ("postgresql://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
    ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
    ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_database_urls(url, expected):
    assert normalise_db_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://h/d", "postgresql+psycopg2://h/d", "x.db"])
def test_unsupported_database_url_names_the_option(url):
    with pytest.raises(InvalidInput, match="--db"):
        normalise_db_url(url)


def test_settings_defaults_from_home(tmp_path):
    s = load_settings({"OMNICRM_HOME": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path}/omnicrm.db"
    assert s.queue_url == f"sqlite:///{tmp_path}/queue.db"
    assert (s.user, s.format, s.region, s.secret_key, s.google_api_root) == ("default", "table", "US", None, None)


def test_settings_env_and_flags(tmp_path):
    env = {"OMNICRM_HOME": str(tmp_path), "OMNICRM_DATABASE_URL": "postgresql://pg/db", "OMNICRM_USER": "alice",
           "OMNICRM_FORMAT": "json", "OMNICRM_REGION": "gb", "OMNICRM_SECRET_KEY": "k",
           "OMNICRM_GOOGLE_API_ROOT": "http://127.0.0.1:9/"}
    s = load_settings(env)
    assert s.database_url == s.queue_url == "postgresql+psycopg://pg/db"  # the queue follows a PG database
    assert (s.user, s.format, s.region, s.secret_key, s.google_api_root) == (
        "alice", "json", "GB", "k", "http://127.0.0.1:9")
    flagged = load_settings({**env, "OMNICRM_QUEUE_URL": "redis://r/1"}, db="sqlite:////tmp/a.db", user="bob",
                            fmt="csv", region="fr")
    assert (flagged.database_url, flagged.queue_url, flagged.user, flagged.format, flagged.region) == (
        "sqlite:////tmp/a.db", "redis://r/1", "bob", "csv", "FR")


@pytest.mark.parametrize("env, option", [
    ({"OMNICRM_FORMAT": "xml"}, "--format"),
    ({"OMNICRM_REGION": "USA"}, "--region"),
    ({"OMNICRM_USER": "   "}, "--user"),
    ({"OMNICRM_DATABASE_URL": "oracle://x"}, "--db"),
    ({"OMNICRM_NOW": "next tuesday"}, "OMNICRM_NOW"),
])
def test_bad_settings_name_the_option(tmp_path, env, option):
    with pytest.raises(InvalidInput, match=option):
        load_settings({"OMNICRM_HOME": str(tmp_path), **env})


def test_now_is_pinned_by_omnicrm_now(monkeypatch):
    monkeypatch.setenv("OMNICRM_NOW", "2026-03-01T12:00:00+02:00")
    assert now() == datetime(2026, 3, 1, 10, tzinfo=timezone.utc)
    monkeypatch.setenv("OMNICRM_NOW", "yesterday")
    with pytest.raises(InvalidInput, match="OMNICRM_NOW"):
        now()
    monkeypatch.delenv("OMNICRM_NOW")
    assert now().tzinfo is timezone.utc


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_is_0700_and_sqlite_file_0600(omnicrm_home):
    omnicrm_home.mkdir(mode=0o755)
    os.chmod(omnicrm_home, 0o755)
    settings = load_settings()
    with db.session_scope(settings) as session:
        db.user_id(session, "alice")
        session.commit()
    assert _mode(omnicrm_home) == 0o700
    for name in ("omnicrm.db", "omnicrm.db-wal", "omnicrm.db-shm"):
        path = omnicrm_home / name
        if path.exists():
            assert _mode(path) == 0o600, name


def test_migrate_is_idempotent_and_versioned(settings):
    engine = db.ready_engine(settings)
    assert db.migrate(engine) == db.SCHEMA_VERSION
    assert db.migrate(engine) == db.SCHEMA_VERSION
    with engine.connect() as conn:
        versions = [v for (v,) in conn.execute(text("SELECT version FROM omnicrm_schema ORDER BY version"))]
        conn.rollback()
    assert versions == [v for v, _ in db.MIGRATIONS]


def test_user_id_is_created_once(session):
    first = db.user_id(session, "alice")
    assert db.user_id(session, "alice") == first
    assert db.user_id(session, "bob") != first
    session.commit()


def test_unreachable_postgres_is_a_clean_failure(tmp_path):
    settings = load_settings({"OMNICRM_HOME": str(tmp_path)}, db="postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(ServiceUnavailable, match="cannot open the database"):
        db.ready_engine(settings)


def test_concurrent_init_in_real_processes(db_url, omnicrm_home):
    """Several `omnicrm init` started at once on a brand-new database all succeed, schema created once."""
    exe = Path(sys.executable).with_name("omnicrm")
    env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home)}
    procs = [subprocess.Popen([str(exe), "init"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(code == 0 for code, _ in results), results
    assert all("database ready" in err for _, err in results)
    engine = db.get_engine(normalise_db_url(db_url))
    with engine.connect() as conn:
        versions = [v for (v,) in conn.execute(text("SELECT version FROM omnicrm_schema ORDER BY version"))]
        conn.rollback()
    assert versions == [v for v, _ in db.MIGRATIONS]


def test_read_commands_do_not_wait_for_a_sqlite_writer(omnicrm_home, monkeypatch):
    """A long write (an import) holds SQLite's write lock; list/export/status read a snapshot meanwhile."""
    import sqlite3
    import time

    from typer.testing import CliRunner

    from omnicrm.cli import app

    db = omnicrm_home / "omnicrm.db"
    monkeypatch.setenv("OMNICRM_DATABASE_URL", f"sqlite:///{db}")
    runner = CliRunner()
    assert runner.invoke(app, ["contacts", "add", "--name", "Ann", "--company", "Old"]).exit_code == 0
    from omnicrm.db import dispose_engines

    dispose_engines()  # a new process would start here: schema check included
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE contacts SET company = 'Uncommitted'")
    try:
        for args in (["contacts", "list", "--format", "csv"], ["contacts", "export"], ["status"]):
            started = time.monotonic()
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            assert time.monotonic() - started < 5, args
            assert "Uncommitted" not in result.stdout
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_lock_timeout_says_what_to_do():
    """SQLite's bare "database is locked" (after the 30 s busy timeout) gets its likely cause and the remedy."""
    import sqlite3

    from omnicrm.db import describe_db_error

    message = describe_db_error(sqlite3.OperationalError("database is locked"))
    assert message.startswith("database is locked: another command") and "try again" in message
    assert describe_db_error(sqlite3.OperationalError("disk I/O error")) == "disk I/O error"
