"""The `status` dashboard data on an empty and a populated database (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from omnicrm import contacts as svc
from omnicrm.dashboard import status, sync_outcome
from omnicrm.db import user_id as get_user_id
from omnicrm.models import Contact, Credential, Job, SyncState

NOW = datetime(2026, 6, 3, 12, 0, tzinfo=timezone.utc)  # a Wednesday


@pytest.fixture
def uid(session, monkeypatch):
    monkeypatch.setenv("OMNICRM_NOW", NOW.isoformat())
    value = get_user_id(session, "alice")
    session.commit()
    return value


def test_status_on_an_empty_database(session, uid):
    data = status(session, uid, "alice", NOW)
    assert data["contacts"] == {"total": 0, "added_this_week": 0}
    assert data["recent_contacts"] == []
    assert [(s["source"], s["outcome"]) for s in data["sync"]] == [
        ("gmail", "never"), ("calendar", "never"), ("contacts", "never")]
    assert data["jobs"] == {"queued": 0, "running": 0, "done": 0, "failed": 0, "dead": 0}
    assert data["google"]["connected"] is False and data["google"]["status"] == "not_connected"
    assert data["follow_ups"] == 0


def test_status_on_a_populated_database(session, uid):
    for i in range(7):
        contact = svc.add_contact(session, uid, name=f"Person {i}", emails=[f"p{i}@example.com"])
        contact.created_at = NOW - timedelta(days=30 - i)  # older than this week
    fresh = [svc.add_contact(session, uid, name=f"New {i}") for i in range(2)]
    overdue = svc.add_contact(session, uid, name="Overdue")
    for k in range(5):
        svc.record_interaction(session, uid, overdue.id, kind="email", direction="in",
                               occurred_at=NOW - timedelta(days=60 + 7 * k), subject=None, source="gmail",
                               external_id=f"m{k}")
    overdue.created_at = NOW - timedelta(days=400)
    other = get_user_id(session, "mallory")
    svc.add_contact(session, other, name="Not mine")
    session.add_all([
        SyncState(user_id=uid, source="gmail", last_attempt_at=NOW - timedelta(hours=1),
                  last_success_at=NOW - timedelta(hours=1), items_synced=42),
        SyncState(user_id=uid, source="calendar", last_attempt_at=NOW - timedelta(hours=2),
                  last_success_at=NOW - timedelta(days=2), last_error="HTTP 500 from Google"),
        Job(user_id=uid, kind="sync:gmail", status="done"),
        Job(user_id=uid, kind="sync:gmail", status="done"),
        Job(user_id=uid, kind="import", status="dead", last_error="bad"),
        Job(user_id=uid, kind="sync:contacts", status="running", exclusive_key=f"sync:{uid}:contacts"),
        Job(user_id=other, kind="import", status="queued"),
        Credential(user_id=uid, account_email="alice@example.com", secret="encrypted", status="reconnect_needed"),
    ])
    session.commit()

    data = status(session, uid, "alice", NOW)
    assert data["contacts"] == {"total": 10, "added_this_week": 2}
    assert [c["display_name"] for c in data["recent_contacts"]] == ["New 1", "New 0", "Person 6", "Person 5",
                                                                   "Person 4"]
    assert data["recent_contacts"][2]["email"] == "p6@example.com"
    outcomes = {s["source"]: s for s in data["sync"]}
    assert outcomes["gmail"]["outcome"] == "ok" and outcomes["gmail"]["items_synced"] == 42
    assert outcomes["calendar"]["outcome"] == "failed"
    assert outcomes["calendar"]["last_error"] == "HTTP 500 from Google"
    assert outcomes["contacts"]["outcome"] == "running"
    assert data["jobs"] == {"queued": 0, "running": 1, "done": 2, "failed": 0, "dead": 1}
    assert data["google"] == {"connected": True, "status": "reconnect_needed",
                              "account_email": "alice@example.com", "token_expiry": None}
    assert data["follow_ups"] == 1
    assert "secret" not in repr(data) and "encrypted" not in repr(data)
    assert fresh[0].id in {c["id"] for c in data["recent_contacts"]}
    assert session.get(Contact, fresh[0].id) is not None


def test_sync_outcome_rules():
    t = NOW
    assert sync_outcome(None, False) == "never"
    assert sync_outcome(None, True) == "running"
    assert sync_outcome(SyncState(last_attempt_at=t, last_success_at=t), False) == "ok"
    assert sync_outcome(SyncState(last_attempt_at=t, last_error="x"), False) == "failed"
    assert sync_outcome(SyncState(last_attempt_at=t, last_success_at=t - timedelta(1), last_error="x"),
                        False) == "failed"
    # An old error followed by a success is history, not the outcome.
    assert sync_outcome(SyncState(last_attempt_at=t, last_success_at=t, last_error="x"), False) == "ok"
