"""Secrets never exposed; private files.

OAuth access/refresh tokens, authorization codes and the client secret (every string the fake OAuth
server handed out) must not appear in any command's stdout or stderr (logs included) at any verbosity,
in the database (SQLite file bytes with WAL; every PostgreSQL row as text) nor in the queue. The data
folder is 0700; database, queue and key files 0600.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.fakes.google_api import FakeGoogleApi, populate
from tests.fakes.google_oauth import FakeOAuthServer, connect_user

VERBOSITY = {"quiet": ["--quiet"], "default": [], "verbose": ["--verbose"], "log-json": ["--log-json"],
             "verbose-log-json": ["--verbose", "--log-json"]}


@pytest.fixture
def google(settings, monkeypatch):
    with FakeOAuthServer(email="me@example.com") as oauth, FakeGoogleApi(email="me@example.com") as api:
        api.valid_tokens = oauth.valid_access_tokens
        monkeypatch.setenv("OMNICRM_GOOGLE_API_ROOT", api.root)
        monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "0.001")
        monkeypatch.setenv("OMNICRM_QUEUE_NAME", "t_secrets")
        populate(api, messages=12, events=3, people=4, other=1, correspondents=5)
        connect_user(settings, "default", oauth, expired=True)  # the first command refreshes: new tokens
        yield oauth, api
    from omnicrm.queue import forget_queues

    forget_queues()


def secrets_of(oauth: FakeOAuthServer) -> list[str]:
    found = [*oauth.issued, oauth.client_secret]
    assert len(found) >= 3
    return found


def leaks(oauth: FakeOAuthServer, blob: str | bytes) -> list[str]:
    if isinstance(blob, bytes):
        return [s for s in secrets_of(oauth) if s.encode() in blob]
    return [s for s in secrets_of(oauth) if s in blob]


def stored_text(settings, home: Path) -> bytes:
    """Everything the database and queue hold: SQLite files byte for byte, or every PostgreSQL row as text."""
    from omnicrm.db import dispose_engines, ready_engine

    if settings.is_sqlite:
        dispose_engines()
        files = [p for p in home.iterdir() if p.name.startswith(("omnicrm.db", "queue.db"))]
        assert any(p.name == "omnicrm.db" for p in files)
        return b"".join(p.read_bytes() for p in files)
    engine = ready_engine(settings)
    chunks = []
    with engine.connect() as conn:
        tables = conn.execute(text("SELECT table_name FROM information_schema.tables "
                                   "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")).scalars()
        for table in list(tables):
            chunks += conn.execute(text(f'SELECT t::text FROM "{table}" t')).scalars().all()
    assert any("me@example.com" in c for c in chunks)  # the rows are really read
    return "\n".join(chunks).encode()


def test_no_secret_in_any_output_at_any_verbosity(cli, google):
    """Every verbosity: a token refresh, a sync, job and status views, a refused token, a revoked grant."""
    oauth, api = google
    outputs = []

    def run(flags, *args, code=0):
        result = cli(*flags, *args)
        assert result.exit_code == code, (flags, args, result.output)
        assert "Traceback" not in result.output or "--verbose" in flags
        outputs.append(result.output)
        return result

    run([], "sync", "run", "--format", "json")
    run(["--verbose", "--log-json"], "sync", "run", "--enqueue")
    run(["--verbose", "--log-json"], "worker", "--once")
    run([], "sync", "status", "--format", "json")
    run([], "status", "--format", "json")
    run([], "google", "status")
    for flags in VERBOSITY.values():
        run(flags, "google", "status", "--check", "--format", "json")  # forces a refresh
        run(flags, "sync", "run", "--source", "calendar", "--format", "json")
        if "--verbose" in flags:
            jobs = json.loads(run(flags, "jobs", "list", "--format", "json").stdout)
            run(flags, "jobs", "show", str(jobs[0]["id"]), "--format", "json")
        oauth.valid_access_tokens.clear()  # the access token is refused: the API client refreshes it
        run(flags, "sync", "run", "--source", "contacts")
    oauth.revoke()  # refresh answers invalid_grant: the error paths print messages
    for flags in VERBOSITY.values():
        run(flags, "sync", "run", "--source", "gmail", code=3)
        run(flags, "google", "status", "--check", code=3)
    assert oauth.counts["token.refresh"] >= 2 * len(VERBOSITY)
    assert any("me@example.com" in o for o in outputs)
    assert not leaks(oauth, "\n".join(outputs))


def test_no_secret_in_a_real_process_log_or_the_stored_bytes(omnicrm_cmd, google, settings, omnicrm_home):
    oauth, _api = google
    result = omnicrm_cmd("--verbose", "--log-json", "sync", "run", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert any(json.loads(line)["level"] for line in result.stderr.splitlines() if line.startswith("{"))
    assert not leaks(oauth, result.stdout + result.stderr)
    assert not leaks(oauth, stored_text(settings, omnicrm_home))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_data_dir_is_0700_and_database_queue_and_key_files_0600(monkeypatch, omnicrm_home, tmp_path):
    """The embedded default (SQLite database and queue), files created by real commands under a lax umask."""
    monkeypatch.setenv("OMNICRM_QUEUE_NAME", "t_secrets_perm")
    from typer.testing import CliRunner

    from omnicrm.cli import app

    def cli(*args):
        return CliRunner().invoke(app, list(args), catch_exceptions=False)

    old = os.umask(0o022)
    try:
        with FakeOAuthServer() as oauth:
            from omnicrm.config import load_settings

            connect_user(load_settings(), "default", oauth)  # creates secret.key
        assert cli("contacts", "add", "--name", "Ann").exit_code == 0
        assert cli("contacts", "import", str(_csv(tmp_path)), "--background").exit_code == 0  # queue.db
        assert cli("worker", "--once").exit_code == 0
    finally:
        os.umask(old)
    from omnicrm.queue import forget_queues

    forget_queues()
    assert _mode(omnicrm_home) == 0o700
    names = {p.name: _mode(p) for p in omnicrm_home.iterdir() if p.is_file()}
    for required in ("omnicrm.db", "queue.db", "secret.key"):
        assert required in names, names
    assert {name: mode for name, mode in names.items() if mode != 0o600} == {}


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "in.csv"
    path.write_text("display_name,email\nBea,bea@example.com\n")
    return path
