"""Faults: unreachable or dying databases, a locked SQLite file, concurrent imports, a worker killed with
SIGKILL in the middle of an import job, and a fake Google answering 500/429 or not answering in time.

Real processes (the installed entry point) and real servers on 127.0.0.1 throughout.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from omnicrm.models import Contact, ContactEmail, Job, User
from tests.fakes.google_api import FakeGoogleApi, populate
from tests.fakes.google_oauth import FakeOAuthServer, connect_user

ROOT = Path(__file__).resolve().parent.parent
EXE = str(Path(sys.executable).with_name("omnicrm"))


def write_csv(path: Path, start: int, stop: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("display_name,email,phone,company,tags\n")
        for i in range(start, stop):
            handle.write(f"Person {i},p{i}@example.com,+1 415 555 {i % 10000:04d},Co {i % 97},t{i % 5}\n")
    return path


def counts(settings, user: str = "default") -> tuple[int, int, int]:
    """(contacts, distinct primary emails, email rows) of a user."""
    from omnicrm.db import session_scope

    with session_scope(settings) as session:
        uid = session.scalar(select(User.id).where(User.name == user))
        if uid is None:
            return 0, 0, 0
        contacts = session.scalar(select(func.count()).select_from(Contact).where(Contact.user_id == uid))
        distinct = session.scalar(select(func.count(func.distinct(ContactEmail.email))).where(
            ContactEmail.user_id == uid))
        rows = session.scalar(select(func.count()).select_from(ContactEmail).where(ContactEmail.user_id == uid))
        return contacts, distinct, rows


def wait_for(predicate, timeout: float = 60, what: str = "condition", proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.returncode}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL `proc` once `ready()` holds (waiting for it); the process is gone afterwards either way."""
    try:
        wait_for(ready, what=what, proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def no_traceback(stderr: str) -> None:
    """No traceback of ours (an in-process run also captures the fake server's thread noise about
    connections the client gave up on: skipped)."""
    import re

    ours = re.sub(r"-{40}\nException occurred during processing of request.*?\n-{40}\n", "", stderr, flags=re.S)
    assert "Traceback" not in ours, ours[-2000:]


# --- PostgreSQL unreachable ------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["contacts", "add", "--name", "Ann"], ["jobs", "list"], ["status"]])
def test_postgres_unreachable_is_exit_1_with_a_clear_message(tmp_path, args):
    env = {**os.environ, "OMNICRM_HOME": str(tmp_path / "home"),
           "OMNICRM_DATABASE_URL": "postgresql://omnicrm:s3cret-pass@127.0.0.1:1/omnicrm"}
    result = subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: ") and "database" in result.stderr, result.stderr
    assert "127.0.0.1" in result.stderr or "connect" in result.stderr.lower()
    assert "s3cret-pass" not in result.stderr
    no_traceback(result.stderr)
    assert result.stdout == ""


# --- a database connection lost in the middle of an import -------------------------------------------

def _import_holds_the_write_lock(path: Path) -> bool:
    """SQLite: is the write lock taken (our import's one long transaction)?"""
    conn = sqlite3.connect(path, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        conn.close()


def test_database_lost_mid_import_is_exit_1_and_nothing_half_written(db_url, settings, omnicrm_home, tmp_path):
    """PostgreSQL: the import's backend is terminated (pg_terminate_backend) once it has written rows.
    SQLite: the process is killed with SIGKILL while it holds the write transaction. Either way no
    contact is left behind and the same import afterwards succeeds completely."""
    big = write_csv(tmp_path / "big.csv", 0, 25_000)
    app = f"omnicrm_fault_{uuid.uuid4().hex[:8]}"
    url = f"{db_url}&application_name={app}" if not settings.is_sqlite else db_url
    env = {**os.environ, "OMNICRM_HOME": str(omnicrm_home), "OMNICRM_DATABASE_URL": url}
    assert subprocess.run([EXE, "init"], env=env, capture_output=True, timeout=60).returncode == 0
    proc = subprocess.Popen([EXE, "contacts", "import", str(big)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if settings.is_sqlite:
            db_file = omnicrm_home / "omnicrm.db"
            wait_for(lambda: _import_holds_the_write_lock(db_file) and (time.sleep(0.2) or True)
                     and _import_holds_the_write_lock(db_file), what="the import transaction", proc=proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        else:
            import psycopg

            from tests.conftest import _psycopg_url

            with psycopg.connect(_psycopg_url(db_url.split("?")[0]), autocommit=True) as admin:
                def writing() -> bool:
                    return admin.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND backend_xid IS NOT NULL AND query ILIKE %s", (app, "%contact%")).fetchone()[0] > 0

                wait_for(writing, what="the import to write", proc=proc)
                killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE application_name = %s", (app,)).fetchall()
                assert killed
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 1, err[-2000:]
            assert "Error: database error: " in err, err[-2000:]  # (psycopg may log one line first)
            no_traceback(err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from omnicrm.db import dispose_engines

    dispose_engines()
    assert counts(settings) == (0, 0, 0)
    if settings.is_sqlite:
        with sqlite3.connect(omnicrm_home / "omnicrm.db") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    small = write_csv(tmp_path / "small.csv", 0, 500)  # the database is intact and usable
    again = subprocess.run([EXE, "contacts", "import", str(small)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert counts(settings) == (500, 500, 500)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_bulk_load_killed_mid_import_is_rolled_back(settings, omnicrm_home, tmp_path):
    """SQLite, a bulk load, which writes through a rollback journal instead of WAL
    (csvio.bulk.sqlite_bulk_journal): SIGKILL once the import has written pages into the database file
    itself. The next command rolls the hot journal back (the older contact intact, nothing of the import,
    integrity ok) and puts the database back in WAL; the same import then succeeds."""
    from omnicrm.csvio import bulk, reading

    big = write_csv(tmp_path / "big.csv", 0, 2 * bulk.BULK_MIN_ROWS)
    assert big.stat().st_size >= bulk.BULK_MIN_ROWS * reading.BYTES_PER_ROW  # a bulk load's size
    env = {**os.environ, "OMNICRM_HOME": str(omnicrm_home), "OMNICRM_DATABASE_URL": settings.database_url}
    add = subprocess.run([EXE, "contacts", "add", "--name", "Earlier", "--email", "earlier@example.com"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    db_file = omnicrm_home / "omnicrm.db"
    journal = db_file.with_name(db_file.name + "-journal")
    size = db_file.stat().st_size
    proc = subprocess.Popen([EXE, "contacts", "import", str(big)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: journal.exists() and db_file.stat().st_size > size + 4_000_000,
              "the import's pages in the database file")
    assert journal.exists()  # hot: the import's transaction was cut off
    from omnicrm.db import dispose_engines

    dispose_engines()
    assert counts(settings) == (1, 1, 1)
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not journal.exists()
    again = subprocess.run([EXE, "contacts", "import", str(big)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    dispose_engines()
    assert counts(settings) == (1 + 2 * bulk.BULK_MIN_ROWS,) * 3


# --- SQLite locked by another writer -----------------------------------------------------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_locked_by_a_concurrent_writer_waits_and_succeeds(omnicrm_cmd, omnicrm_home):
    assert omnicrm_cmd("init").returncode == 0
    holder = sqlite3.connect(omnicrm_home / "omnicrm.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO users (name, created_at) VALUES ('lock-holder', '2026-01-01 00:00:00')")
    released = threading.Event()

    def release():
        time.sleep(1.5)  # a concurrent writer's transaction, not time logic
        holder.execute("COMMIT")
        released.set()

    threading.Thread(target=release, daemon=True).start()
    started = time.monotonic()
    result = omnicrm_cmd("contacts", "add", "--name", "Waiter", "--email", "w@example.com")
    waited = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert released.is_set() and waited >= 1.0
    holder.close()
    listed = json.loads(omnicrm_cmd("contacts", "list", "--format", "json").stdout)
    assert [c["display_name"] for c in listed] == ["Waiter"]


# --- concurrent imports ----------------------------------------------------------------------------------

def test_two_concurrent_imports_of_overlapping_files_create_no_duplicates(db_url, settings, omnicrm_home, tmp_path):
    first = write_csv(tmp_path / "a.csv", 0, 2000)
    second = write_csv(tmp_path / "b.csv", 1000, 3000)
    env = {**os.environ, "OMNICRM_HOME": str(omnicrm_home), "OMNICRM_DATABASE_URL": db_url}
    assert subprocess.run([EXE, "init"], env=env, capture_output=True, timeout=60).returncode == 0
    procs = [subprocess.Popen([EXE, "contacts", "import", str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for path in (first, second, first)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    for code, err in results:
        assert code == 0, err[-2000:]
        no_traceback(err)
    assert counts(settings) == (3000, 3000, 3000)


# --- a worker killed during an import job ------------------------------------------------------------------

def test_worker_killed_during_an_import_job_resumes_to_the_same_end_state(db_url, settings, omnicrm_home,
                                                                          tmp_path, cli):
    rows = 60_000  # ~2 s of import: the kill below lands in the middle of it
    path = write_csv(tmp_path / "job.csv", 0, rows)
    queue = f"t_faults_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OMNICRM_HOME": str(omnicrm_home), "OMNICRM_DATABASE_URL": db_url,
           "OMNICRM_QUEUE_NAME": queue, "OMNICRM_JOB_LEASE_SECONDS": "1.5", "OMNICRM_WORKER_POLL_SECONDS": "0.05"}
    submitted = cli("contacts", "import", str(path), "--background", env={"OMNICRM_QUEUE_NAME": queue})
    assert submitted.exit_code == 0, submitted.output
    job_id = int(submitted.stdout.strip())
    from omnicrm.db import session_scope

    def job() -> Job:
        with session_scope(settings) as session:
            # a read that does not queue behind the import's write lock on SQLite
            session.connection(execution_options={"sqlite_read_only": True})
            return session.get(Job, job_id)

    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen([EXE, "worker", "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=log)
        # once the job runs, let it write part of the file (a race with the import itself, not time logic)
        kill_when(worker, lambda: job().status == "running" and (time.sleep(0.3) or True), "the job to start")
    assert job().status == "running"  # nobody finished it: the lease still names the dead worker
    assert counts(settings)[0] in (0, rows)  # atomic: all or nothing was committed
    from omnicrm.config import now

    wait_for(lambda: job().lease_expires_at < now(), what="the lease to expire")
    second = subprocess.run([EXE, "worker", "--once"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    final = job()
    assert final.status == "done" and final.attempts == 2, (final.status, final.attempts, final.last_error)
    assert counts(settings) == (rows, rows, rows)
    # the same end state as one uninterrupted import of the file
    assert cli("--user", "reference", "contacts", "import", str(path)).exit_code == 0
    mine = cli("contacts", "export", "--portable").stdout
    reference = cli("--user", "reference", "contacts", "export", "--portable").stdout
    assert mine == reference
    from omnicrm.queue import forget_queues

    forget_queues()


# --- Google answering 500/429 or not at all ------------------------------------------------------------------

@pytest.fixture
def google(db_url, monkeypatch):
    from omnicrm.config import load_settings

    with FakeOAuthServer() as oauth, FakeGoogleApi() as api:
        api.valid_tokens = oauth.valid_access_tokens
        monkeypatch.setenv("OMNICRM_DATABASE_URL", db_url)
        monkeypatch.setenv("OMNICRM_GOOGLE_API_ROOT", api.root)
        monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "0.001")
        monkeypatch.setenv("OMNICRM_RETRY_MAX", "4")
        monkeypatch.setenv("OMNICRM_HTTP_TIMEOUT_SECONDS", "0.3")
        populate(api, messages=20, events=5, people=5, other=1, correspondents=8)
        settings = load_settings()
        connect_user(settings, "default", oauth)
        yield SimpleNamespace(oauth=oauth, api=api, settings=settings)


def end_state(settings) -> tuple:
    from omnicrm.db import session_scope
    from omnicrm.models import Interaction

    with session_scope(settings) as session:
        return (session.scalar(select(func.count()).select_from(Contact)),
                sorted(session.scalars(select(Interaction.external_id))))


def test_google_500_and_429_bursts_are_retried_to_the_clean_end_state(cli, google):
    google.api.fail_next(500, 3)
    google.api.fail_next(429, 3)
    google.api.fail_next(503, 2, path="/batch")
    result = cli("sync", "run")
    assert result.exit_code == 0, result.output
    assert google.api.counts["faults"] == 8
    faulty = end_state(google.settings)
    connect_user(google.settings, "clean", google.oauth)
    assert cli("--user", "clean", "sync", "run").exit_code == 0
    from omnicrm.db import session_scope
    from omnicrm.models import Interaction

    with session_scope(google.settings) as session:
        per_user = {name: (session.scalar(select(func.count()).select_from(Contact).join(User).where(
                        User.name == name)),
                           session.scalar(select(func.count()).select_from(Interaction).join(User).where(
                        User.name == name)))
                    for name in ("default", "clean")}
    assert per_user["default"] == per_user["clean"] and per_user["default"][1] > 0, per_user
    assert faulty[0] == per_user["default"][0]


def test_google_failing_past_the_retries_exits_1_and_records_the_error(cli, google):
    google.api.fail_next(500, 1000)
    result = cli("sync", "run", "--source", "gmail")
    assert result.exit_code == 1, result.output
    assert "gmail" in result.stderr and "500" in result.stderr
    no_traceback(result.output)
    assert google.api.counts["faults"] == 5  # 1 try + OMNICRM_RETRY_MAX=4 retries
    status = {row["source"]: row for row in json.loads(cli("sync", "status", "--format", "json").stdout)}
    assert "500" in status["gmail"]["last_error"]
    assert end_state(google.settings)[0] == 0
    google.api.fail_next(429, 1000)
    result = cli("sync", "run")
    assert result.exit_code == 1, result.output
    google.api._forced.clear()  # Google recovers: the next run finishes the work
    assert cli("sync", "run").exit_code == 0
    assert end_state(google.settings)[0] > 0


def test_google_timeouts_are_retried_then_the_documented_outcome(cli, google):
    google.api.latency = 1.0  # every request outlives the 0.3 s client timeout
    result = cli("sync", "run", "--source", "calendar")
    assert result.exit_code == 1, result.output
    assert "cannot reach Google" in result.stderr
    no_traceback(result.output)
    assert google.api.counts["requests"] == 5  # 1 try + 4 retries
    google.api.reset_counts()

    def recover():  # Google becomes responsive again after two timed-out requests
        wait_for(lambda: google.api.counts["requests"] >= 2, what="two requests")
        google.api.latency = 0

    threading.Thread(target=recover, daemon=True).start()
    result = cli("sync", "run", "--source", "calendar")
    assert result.exit_code == 0, result.output
    assert end_state(google.settings)[0] > 0
    status = {row["source"]: row for row in json.loads(cli("sync", "status", "--format", "json").stdout)}
    assert status["calendar"]["last_error"] is None and status["calendar"]["last_success_at"]
