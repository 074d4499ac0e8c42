"""Sync resilience: injected 429/5xx/rate-limit faults, batch part retries, Retry-After, cursors committed
per page so a sync killed with SIGKILL resumes to the same end state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.oauth2.credentials import Credentials
from sqlalchemy import select

from omnicrm.config import load_settings
from omnicrm.google import clients
from omnicrm.models import SyncState
from omnicrm.sync import SOURCES, run_source
from tests.fakes.google_api import FakeGoogleApi, populate, snapshot

ROOT = Path(__file__).resolve().parent.parent
ME = "me@example.com"

DRIVER = """
import sys
from google.oauth2.credentials import Credentials
from omnicrm.config import load_settings
from omnicrm.db import session_scope, user_id
from omnicrm.sync import run_source
settings = load_settings()
with session_scope(settings) as session:
    uid = user_id(session, sys.argv[1])
    session.commit()
    run_source(session, settings, uid, sys.argv[2], Credentials(token="t"))
"""


@pytest.fixture
def world(db_url, monkeypatch):
    from omnicrm.db import session_scope

    with FakeGoogleApi(email=ME) as fake:
        monkeypatch.setenv("OMNICRM_DATABASE_URL", db_url)
        monkeypatch.setenv("OMNICRM_GOOGLE_API_ROOT", fake.root)
        monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "0.001")
        settings = load_settings()
        with session_scope(settings) as session:
            yield fake, settings, session


def sync_user(session, settings, user, source, **kw):
    from omnicrm.db import user_id

    uid = user_id(session, user)
    session.commit()
    return run_source(session, settings, uid, source, Credentials(token="t"), **kw)


def snap(session, user):
    from omnicrm.db import user_id

    return snapshot(session, user_id(session, user))


def test_ten_percent_faults_give_the_same_end_state(world):
    fake, settings, session = world
    populate(fake, messages=150, events=20, people=30, other=5, correspondents=30)
    for source in SOURCES:
        sync_user(session, settings, "clean", source)
    fake.fault_rate = 0.10
    for source in SOURCES:
        sync_user(session, settings, "faulty", source)
    assert fake.counts["faults"] > 3
    assert snap(session, "faulty") == snap(session, "clean")
    # Incremental runs under faults too.
    populate_more(fake)
    for source in SOURCES:
        sync_user(session, settings, "faulty", source)
    fake.fault_rate = 0.0
    for source in SOURCES:
        sync_user(session, settings, "clean", source)
    assert snap(session, "faulty") == snap(session, "clean")


def populate_more(fake):
    for i in range(30):
        fake.add_message({"From": f"New {i} <new{i}@x.org>", "To": ME, "Subject": f"n{i}"}, id=f"new{i}")
    fake.put_event({"id": "newev", "summary": "New", "start": {"dateTime": "2025-01-01T10:00:00Z"},
                    "attendees": [{"email": "new1@x.org"}, {"email": ME, "self": True}]})
    fake.put_person({"resourceName": "people/new", "names": [{"displayName": "Newbie"}],
                     "emailAddresses": [{"value": "new2@x.org"}]})


def test_failed_batch_parts_are_retried(world):
    fake, settings, session = world
    populate(fake, messages=40, correspondents=10)
    fake.fail_next(503, 3, path="/messages/")
    fake.fail_next(403, 2, path="/messages/")  # userRateLimitExceeded
    sync_user(session, settings, "u", "gmail")
    assert fake.counts["batch"] == 2  # one batch of 40, then one of the 5 failed parts
    assert fake.counts["gmail.messages.get"] == 40
    fake.reset_counts()
    sync_user(session, settings, "control", "gmail")
    assert snap(session, "u") == snap(session, "control")


def test_non_retryable_error_fails_fast_and_is_recorded(world):
    fake, settings, session = world
    fake.fail_next(404, 1, path="/profile")
    with pytest.raises(clients.GoogleApiError) as info:
        sync_user(session, settings, "u", "gmail")
    assert info.value.status == 404 and fake.counts["requests"] == 1
    state = session.scalar(select(SyncState).where(SyncState.source == "gmail"))
    assert "404" in state.last_error and state.last_success_at is None


def test_retry_after_is_honoured(monkeypatch):
    monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "0.001")
    with FakeGoogleApi(email=ME, retry_after="1") as fake:
        settings = load_settings({"OMNICRM_GOOGLE_API_ROOT": fake.root, "OMNICRM_HOME": "/nonexistent"})
        service = clients.build_service("gmail", "v1", Credentials(token="t"), settings)
        fake.fail_next(429, 1)
        started = time.monotonic()
        assert clients.execute(service.users().getProfile(userId="me"))["emailAddress"] == ME
        assert time.monotonic() - started >= 1.0
        assert fake.counts["requests"] == 2


def test_backoff_is_exponential_with_jitter(monkeypatch):
    monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "1")
    delays = [clients.backoff_delay(attempt) for attempt in range(4) for _ in range(20)]
    assert all(0.5 * 2 ** (i // 20) <= d <= 2 ** (i // 20) for i, d in enumerate(delays))
    assert len(set(delays)) > 60  # jitter
    assert clients.backoff_delay(0, retry_after=30) == 30


@pytest.mark.parametrize("source, total", [("gmail", 300), ("calendar", 150)])
def test_kill_9_mid_sync_resumes_to_the_same_end_state(world, db_url, source, total):
    fake, settings, session = world
    fake.latency = 0.01
    if source == "gmail":
        populate(fake, messages=total, correspondents=80)
    else:
        populate(fake, events=total, correspondents=80)
    env = {**os.environ, "OMNICRM_SYNC_PAGE_SIZE": "25" if source == "gmail" else "10"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "victim", source], env=env, cwd=ROOT)
    counter = "batch" if source == "gmail" else "calendar.events.list"
    deadline = time.monotonic() + 60
    while fake.counts[counter] < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    from omnicrm.db import user_id

    session.expire_all()
    state = session.scalar(select(SyncState).where(SyncState.user_id == user_id(session, "victim"),
                                                   SyncState.source == source))
    assert state.progress and state.progress.get("page_token") and state.cursor is None
    fake.latency = 0.0
    before = fake.counts["gmail.messages.get"] if source == "gmail" else fake.counts["calendar.events.list"]
    sync_user(session, settings, "victim", source)
    resumed = (fake.counts["gmail.messages.get"] if source == "gmail" else fake.counts["calendar.events.list"]) - before
    assert resumed < (total if source == "gmail" else total // 10)  # it did not start over
    sync_user(session, settings, "control", source)
    assert snap(session, "victim") == snap(session, "control")


def test_batch_endpoints_follow_the_api_root():
    with FakeGoogleApi(email=ME) as fake:
        settings = load_settings({"OMNICRM_GOOGLE_API_ROOT": fake.root + "/", "OMNICRM_HOME": "/nonexistent"})
        assert clients.batch_uri("gmail", settings) == fake.root + "/batch"
        assert clients.batch_uri("people", settings) == fake.root + "/batch"
        assert clients.batch_uri("calendar", settings) == fake.root + "/batch/calendar/v3"
        fake.put_event({"id": "e1", "start": {"date": "2024-01-01"}})
        calendar = clients.build_service("calendar", "v3", Credentials(token="t"), settings)
        got = clients.run_batch("calendar", settings, {
            "a": calendar.events().list(calendarId="primary", singleEvents=True)})
        assert got["a"]["items"][0]["id"] == "e1" and fake.counts["batch"] == 1
        default = load_settings({"OMNICRM_HOME": "/nonexistent"})
        assert clients.batch_uri("calendar", default) == "https://www.googleapis.com/batch/calendar/v3"
        assert clients.batch_uri("gmail", default) == "https://gmail.googleapis.com/batch"


@pytest.mark.parametrize("source", ["gmail", "calendar", "contacts"])
def test_stale_saved_page_token_lists_again(world, source):
    """A run resumed days later may hold a page token Google no longer accepts: list from the start."""
    fake, settings, session = world
    populate(fake, messages=30, events=10, people=10, correspondents=10)
    from omnicrm.db import user_id

    uid = user_id(session, "u")
    state = SyncState(user_id=uid, source=source, items_synced=0, progress={
        "gmail": {"mode": "full", "history_id": "1", "account": ME, "page_token": "999999"},
        "calendar": {"mode": "full", "sync_token": None, "page_token": "bad"},
        "contacts": {"list": "connections", "mode": "full", "sync_token": None, "page_token": "bad", "seen": [],
                     "done": {}},
    }[source])
    session.add(state)
    session.commit()
    fake.fail_next(400, 1, path={"gmail": "/messages", "calendar": "/events", "contacts": "/connections"}[source])
    sync_user(session, settings, "u", source)
    sync_user(session, settings, "control", source)
    assert snap(session, "u") == snap(session, "control")
