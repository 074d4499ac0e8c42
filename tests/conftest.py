"""Shared fixtures: a private OMNICRM_HOME per test, SQLite and PostgreSQL databases, a CLI runner.

Database-touching tests take the `db_url` fixture, which runs them on SQLite and, when
OMNICRM_TEST_PG_URL is set, on PostgreSQL (a uniquely named database per run, one schema per test).
Without the variable the PostgreSQL runs are skipped with a reason, or fail when
OMNICRM_TEST_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("OMNICRM_TEST_PG_URL")
REDIS_URL = os.environ.get("OMNICRM_TEST_REDIS_URL")
REQUIRE_SERVICES = os.environ.get("OMNICRM_TEST_REQUIRE_SERVICES") == "1"


def service_missing(name: str, variable: str) -> None:
    message = f"{name} tests need {variable}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (OMNICRM_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def omnicrm_home(tmp_path, monkeypatch) -> Path:
    """Point all on-disk state at tmp_path and clear every OMNICRM_* setting from the outside."""
    for key in list(os.environ):
        if key.startswith("OMNICRM_") and not key.startswith("OMNICRM_TEST_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("OMNICRM_HOME", str(home))
    yield home
    from omnicrm.db import dispose_engines

    dispose_engines()


@pytest.fixture
def local_tz():
    """Switch the process's local time zone (TZ + tzset) for one test, then restore it."""
    import time

    saved = os.environ.get("TZ")

    def use(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield use
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


# --- PostgreSQL: one database per test run, one schema per test ------------------------------

def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_database():
    """A fresh, uniquely named PostgreSQL database for this run (dropped at the end)."""
    if not PG_URL:
        service_missing("PostgreSQL", "OMNICRM_TEST_PG_URL")
    import psycopg

    name = f"omnicrm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_psycopg_url(PG_URL), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_database(_psycopg_url(PG_URL), name)
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except psycopg.Error:
            pass
    yield url
    from omnicrm.db import dispose_engines

    dispose_engines()
    with psycopg.connect(_psycopg_url(PG_URL), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database):
    """A PostgreSQL URL whose search_path is a new schema (then public), dropped after the test."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{pg_database}?options=-csearch_path%3D{schema},public"
    from omnicrm.db import dispose_engines

    dispose_engines()
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, omnicrm_home):
    """Run the test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{omnicrm_home / 'omnicrm.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def redis_url():
    if not REDIS_URL:
        service_missing("Redis", "OMNICRM_TEST_REDIS_URL")
    return REDIS_URL


# --- running the CLI --------------------------------------------------------------------------

@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def settings(db_url, monkeypatch):
    """Settings for the test database (and OMNICRM_DATABASE_URL set for the CLI)."""
    from omnicrm.config import load_settings

    monkeypatch.setenv("OMNICRM_DATABASE_URL", db_url)
    return load_settings()


@pytest.fixture
def session(settings):
    """A session on the test database; the test commits."""
    from omnicrm.db import session_scope

    with session_scope(settings) as s:
        yield s


@pytest.fixture
def cli(db_url, monkeypatch):
    """Invoke the CLI in-process: cli("contacts", "list", input=..., env={...})."""
    from omnicrm.cli import app

    monkeypatch.setenv("OMNICRM_DATABASE_URL", db_url)

    def run(*args: str, input: str | bytes | None = None, env: dict | None = None) -> Run:
        result = CliRunner().invoke(app, list(args), input=input, env=env, catch_exceptions=False)
        return Run(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def omnicrm_cmd(db_url, omnicrm_home):
    """Run the installed `omnicrm` entry point in a real subprocess."""
    exe = Path(sys.executable).with_name("omnicrm")

    def run(*args: str, input: str | bytes | None = None, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home),
                    **(env or {})}
        text = not isinstance(input, bytes)
        return subprocess.run([str(exe), *args], input=input, env=full_env, capture_output=True,
                              text=text, timeout=timeout)

    return run
