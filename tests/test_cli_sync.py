"""`omnicrm sync …` end to end: stored OAuth grant (fake OAuth server), fake Google API, real jobs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from omnicrm.models import Contact, Credential, Interaction, Job, SyncState
from tests.fakes.google_api import FakeGoogleApi, populate
from tests.fakes.google_oauth import FakeOAuthServer, connect_user

ME = "me@example.com"


@pytest.fixture
def google(db_url, monkeypatch):
    from omnicrm.config import load_settings

    with FakeOAuthServer(email=ME) as oauth, FakeGoogleApi(email=ME) as api:
        api.valid_tokens = oauth.valid_access_tokens  # the API accepts exactly the tokens the OAuth server minted
        monkeypatch.setenv("OMNICRM_DATABASE_URL", db_url)
        monkeypatch.setenv("OMNICRM_GOOGLE_API_ROOT", api.root)
        monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "0.001")
        populate(api, messages=60, events=10, people=12, other=2, correspondents=15)
        yield SimpleNamespace(oauth=oauth, api=api, settings=load_settings())


def count(settings, model, user="default", **where):
    from omnicrm.db import session_scope, user_id

    with session_scope(settings) as session:
        stmt = select(func.count()).select_from(model).where(model.user_id == user_id(session, user))
        for key, value in where.items():
            stmt = stmt.where(getattr(model, key) == value)
        return session.scalar(stmt)


def test_run_then_status(cli, google):
    connect_user(google.settings, "default", google.oauth)
    result = cli("sync", "run")
    assert result.exit_code == 0, result.output
    assert "gmail: done" in result.stderr and "contacts: done" in result.stderr
    assert count(google.settings, Job, status="done") == 3
    assert count(google.settings, Interaction, kind="meeting") == 10
    assert count(google.settings, Contact) > 15
    status = json.loads(cli("sync", "status", "--format", "json").stdout)
    assert [row["source"] for row in status] == ["gmail", "calendar", "contacts"]
    assert all(row["connected"] and row["last_success_at"] and row["last_error"] is None for row in status)
    assert {row["source"]: row["items_synced"] for row in status}["gmail"] == 60
    # Second run: incremental, one request per list followed.
    google.api.reset_counts()
    result = cli("sync", "run", "--format", "json")
    assert result.exit_code == 0
    assert {r["source"]: r["status"] for r in json.loads(result.stdout)} == {
        "gmail": "done", "calendar": "done", "contacts": "done"}
    assert google.api.counts["requests"] == 4


def test_not_connected_exits_3(cli, google):
    result = cli("sync", "run")
    assert result.exit_code == 3
    assert "omnicrm google connect" in result.stderr
    assert count(google.settings, Job) == 0


def test_revoked_grant_exits_3_and_marks_reconnect(cli, google):
    connect_user(google.settings, "default", google.oauth)
    google.oauth.revoke()  # access tokens stop working and the refresh answers invalid_grant
    result = cli("sync", "run", "--source", "gmail")
    assert result.exit_code == 3, result.output
    assert "omnicrm google connect" in result.stderr
    from omnicrm.db import session_scope

    with session_scope(google.settings) as session:
        assert session.scalar(select(Credential.status)) == "reconnect_needed"


def test_401_refreshes_once_and_saves_the_token(cli, google):
    connect_user(google.settings, "default", google.oauth)
    google.oauth.valid_access_tokens.clear()  # the stored access token is refused; the refresh token works
    result = cli("sync", "run", "--source", "calendar")
    assert result.exit_code == 0, result.output
    assert google.oauth.counts["token.refresh"] == 1
    from omnicrm.db import session_scope

    with session_scope(google.settings) as session:
        assert session.scalar(select(Credential.last_refresh_at)) is not None


def test_missing_gmail_scope_exits_3(cli, google):
    connect_user(google.settings, "default", google.oauth)
    google.api.denied_paths.add("/gmail/")
    result = cli("sync", "run", "--source", "gmail")
    assert result.exit_code == 3 and "permission was not granted" in result.stderr


def test_one_source_failing_exits_4_all_failing_exits_1(cli, google):
    connect_user(google.settings, "default", google.oauth)
    google.api.fail_next(400, 1, path="/v1/people/me/connections")
    result = cli("sync", "run")
    assert result.exit_code == 4, result.output
    assert "contacts" in result.stderr
    assert count(google.settings, Interaction, kind="email") > 0  # the others went through
    google.api.fail_next(400, 3)
    result = cli("sync", "run", "--full")
    assert result.exit_code == 1, result.output
    status = {row["source"]: row for row in json.loads(cli("sync", "status", "--format", "json").stdout)}
    assert "400" in status["gmail"]["last_error"]


def test_preview_writes_nothing(cli, google):
    connect_user(google.settings, "default", google.oauth)
    before = (count(google.settings, Contact), count(google.settings, Interaction), count(google.settings, SyncState))
    result = cli("sync", "preview", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["totals"]["contacts_created"] > 15 and report["totals"]["interactions_created"] > 40
    assert report["sample"] and report["sample"][0]["action"] == "create"
    assert (count(google.settings, Contact), count(google.settings, Interaction),
            count(google.settings, SyncState)) == before == (0, 0, 0)
    table = cli("sync", "preview", "--source", "calendar")
    assert table.exit_code == 0 and "calendar" in table.stdout and "nothing was written" in table.stderr
    # After a real run, a preview sees nothing new.
    assert cli("sync", "run").exit_code == 0
    report = json.loads(cli("sync", "preview", "--format", "json").stdout)
    assert report["totals"]["contacts_created"] == 0 and report["totals"]["interactions_created"] == 0


@pytest.mark.parametrize("args, needle", [
    (["--source", "fax"], "--source"),
    (["--since", "yesterday"], "--since"),
    (["--create-contacts", "some"], "--create-contacts"),
])
def test_bad_options_exit_2(cli, google, args, needle):
    result = cli("sync", "run", *args)
    assert result.exit_code == 2 and needle in result.stderr


def test_all_users_share_one_database(cli, google):
    connect_user(google.settings, "alice", google.oauth)
    connect_user(google.settings, "bob", google.oauth)
    result = cli("sync", "run", "--all-users", "--source", "calendar", "--format", "json")
    assert result.exit_code == 0, result.output
    assert sorted(r["user"] for r in json.loads(result.stdout)) == ["alice", "bob"]
    assert count(google.settings, Interaction, user="alice") == count(google.settings, Interaction, user="bob") == 10
    assert count(google.settings, Interaction, user="default") == 0


def test_enqueue_then_a_real_worker_runs_the_three_sources_in_parallel(cli, google, omnicrm_cmd):
    connect_user(google.settings, "default", google.oauth)
    google.api.latency = 0.01
    # What the README's crontab line runs (quiet: cron mails nothing unless something failed).
    result = omnicrm_cmd("--quiet", "sync", "run", "--all-users", "--enqueue")
    assert (result.returncode, result.stderr) == (0, "")
    again = cli("sync", "run", "--enqueue")  # still queued: nothing new
    assert again.exit_code == 0 and "queued 3 sync job(s)" in again.stderr
    assert count(google.settings, Job) == 3
    status = json.loads(cli("sync", "status", "--format", "json").stdout)
    assert all(row["job"] and row["job"].endswith("queued") for row in status)
    worker = omnicrm_cmd("worker", "--once", "--workers", "3", timeout=120)
    assert worker.returncode == 0, worker.stderr
    from omnicrm.db import session_scope

    with session_scope(google.settings) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
    assert [j.status for j in jobs] == ["done"] * 3
    assert sorted(j.kind for j in jobs) == ["sync:calendar", "sync:contacts", "sync:gmail"]
    # In parallel: every job started before any of them finished.
    assert max(j.started_at for j in jobs) < min(j.finished_at for j in jobs)
    assert count(google.settings, Interaction, kind="meeting") == 10


def test_every_sync_command_has_help(cli):
    for command in ("run", "preview", "status"):
        result = cli("sync", command, "--help")
        assert result.exit_code == 0 and len(result.stdout.split("\n\n")[1].strip()) > 20
