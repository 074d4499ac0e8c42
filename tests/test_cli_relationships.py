"""CLI: status, insights follow-ups, contacts duplicates/merge/timeline, score field and sort."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from omnicrm import contacts as svc
from omnicrm.db import session_scope, user_id as get_user_id
from omnicrm.models import Contact

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
ENV = {"OMNICRM_NOW": NOW.isoformat()}


def ids(out: str) -> list[int]:
    return [row["id"] for row in json.loads(out)]


@pytest.fixture
def populated(settings, monkeypatch):
    """Contacts of the default user built through the services; returns their ids by name."""
    monkeypatch.setenv("OMNICRM_NOW", NOW.isoformat())
    made = {}
    with session_scope(settings) as session:
        uid = get_user_id(session, "default")

        def person(name, every=None, last=None, times=0, **kw):
            contact = svc.add_contact(session, uid, name=name, **kw)
            for k in range(times):
                svc.record_interaction(session, uid, contact.id, kind="email", direction="in" if k % 2 else "out",
                                       occurred_at=NOW - timedelta(days=last + k * every), subject=f"mail {k}",
                                       source="gmail", external_id=f"{name}-{k}")
            made[name] = contact.id

        person("Weekly Wendy", every=7, last=30, times=6, emails=["wendy@example.com"])
        person("Fortnight Fred", every=14, last=45, times=6, emails=["fred@example.com"])
        person("Recent Rita", every=3, last=1, times=10, emails=["rita@example.com"], phones=["+1 415 555 0101"])
        person("Rita Recent", phones=["(415) 555-0101"], company="Acme", tags=["dup"])
        person("Quiet Quinn", company="A very long company name " * 4, emails=["quinn@" + "x" * 60 + ".example"])
        session.commit()
    return made


def test_every_new_command_has_help(cli):
    for args in (["status"], ["insights", "follow-ups"], ["contacts", "duplicates"], ["contacts", "merge"],
                 ["contacts", "timeline"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage" in result.stdout and len(result.stdout.splitlines()) > 3


def test_status_empty_database(cli):
    result = cli("status")
    assert result.exit_code == 0, result.output
    assert "0 total" in result.stdout and "not connected" in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    data = json.loads(cli("status", "--format", "json").stdout)
    assert data["contacts"]["total"] == 0 and data["follow_ups"] == 0 and data["recent_contacts"] == []


def test_status_populated(cli, populated):
    result = cli("status", env=ENV)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "5 total" in result.stdout and "Quiet Quinn" in result.stdout
    assert any(line.startswith("Follow-ups") and "2 due" in line for line in lines)
    data = json.loads(cli("--format", "json", "status", env=ENV).stdout)
    assert data["contacts"]["total"] == 5 and data["follow_ups"] == 2
    assert [c["id"] for c in data["recent_contacts"]] == sorted(populated.values(), reverse=True)[:5]
    csv_out = cli("status", "--format", "csv", env=ENV).stdout.splitlines()
    assert csv_out[0] == "key,value" and "contacts.total,5" in csv_out


def test_follow_ups_command(cli, populated):
    result = cli("insights", "follow-ups", "--format", "json", env=ENV)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["display_name"] for r in rows] == ["Weekly Wendy", "Fortnight Fred"]
    assert rows[1]["reason"] == "usually every 14 days; last contact 45 days ago"
    assert ids(cli("insights", "follow-ups", "--limit", "1", "--format", "json", env=ENV).stdout) == \
        [populated["Weekly Wendy"]]
    table = cli("insights", "follow-ups", env=ENV)
    assert "usually every 7 days; last contact 30 days ago" in table.stdout
    assert cli("insights", "follow-ups", "--limit", "0").exit_code == 2
    later = cli("insights", "follow-ups", "--format", "json", env={"OMNICRM_NOW": "2026-04-01T00:00:00+00:00"})
    assert json.loads(later.stdout) == []


def test_score_field_and_sort(cli, populated):
    result = cli("contacts", "list", "--fields", "id,display_name,score", "--sort", "score", "--format", "json",
                 env=ENV)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    assert rows[0]["display_name"] == "Recent Rita" and scores[-1] == 0
    assert set(rows[0]) == {"id", "display_name", "score"}
    asc = cli("contacts", "list", "--sort", "score", "--order", "asc", "--format", "json", env=ENV)
    assert ids(asc.stdout)[-1] == populated["Recent Rita"]
    stale = cli("contacts", "list", "--stale", "20", "--sort", "last-contact", "--format", "json", env=ENV)
    assert ids(stale.stdout) == [populated[n] for n in ("Weekly Wendy", "Fortnight Fred", "Quiet Quinn",
                                                          "Rita Recent")]
    doomed = cli("contacts", "delete", "--stale", "40", "--dry-run", "--format", "json", env=ENV)
    assert sorted(ids(doomed.stdout)) == sorted(populated[n] for n in ("Fortnight Fred", "Quiet Quinn",
                                                                       "Rita Recent"))
    gone = cli("contacts", "delete", "--stale", "40", "--yes", env=ENV)
    assert gone.exit_code == 0 and "deleted 3" in gone.stderr
    left = cli("contacts", "list", "--format", "json", env=ENV)
    assert sorted(ids(left.stdout)) == sorted([populated["Weekly Wendy"], populated["Recent Rita"]])
    bad = cli("contacts", "list", "--sort", "popularity")
    assert bad.exit_code == 2 and "score" in bad.stderr


def test_timeline_and_show(cli, populated):
    wendy = str(populated["Weekly Wendy"])
    assert cli("contacts", "note", wendy, "Called about the offsite", env=ENV).exit_code == 0
    entries = json.loads(cli("contacts", "timeline", "wendy@example.com", "--format", "json").stdout)
    assert set(entries[0]) >= {"kind", "direction", "occurred_at", "subject", "source", "external_id"}
    assert entries[0]["kind"] == "note" and entries[0]["subject"] == "Called about the offsite"
    times = [e["occurred_at"] for e in entries]
    assert times == sorted(times, reverse=True) and len(entries) == 7
    shown = json.loads(cli("contacts", "show", "rita@example.com", "--format", "json", env=ENV).stdout)
    assert len(shown["timeline"]) == 10 and shown["score"] > 50
    table = cli("contacts", "show", wendy, env=ENV).stdout
    assert "timeline (newest first)" in table and "Called about the offsite" in table


def test_duplicates_and_merge(cli, populated):
    rita, dup = populated["Recent Rita"], populated["Rita Recent"]
    result = cli("contacts", "duplicates", "--format", "json")
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)
    assert len(groups) == 1 and groups[0]["ids"] == [rita, dup]
    assert "same phone +14155550101" in groups[0]["reasons"]
    assert groups[0]["merge"] == f"omnicrm contacts merge {rita} {dup}"
    assert "same phone" in cli("contacts", "duplicates").stdout

    preview = cli("contacts", "merge", str(rita), str(dup), "--dry-run", "--format", "json", env=ENV)
    assert preview.exit_code == 0, preview.output
    assert json.loads(preview.stdout)["company"] == "Acme" and "would merge" in preview.stderr
    assert cli("contacts", "show", str(dup)).exit_code == 0  # nothing written

    refused = cli("contacts", "merge", str(rita), str(dup))
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert cli("contacts", "merge", str(rita)).exit_code == 2
    assert cli("contacts", "merge", str(rita), "999999", "--yes").exit_code == 1
    merged = cli("contacts", "merge", str(rita), str(dup), "--yes", "--format", "json", env=ENV)
    assert merged.exit_code == 0, merged.output
    data = json.loads(merged.stdout)
    assert data["id"] == rita and data["company"] == "Acme" and data["tags"] == ["dup"]
    assert data["phone"] == ["+14155550101"]
    assert cli("contacts", "show", str(dup)).exit_code == 1
    assert json.loads(cli("contacts", "duplicates", "--format", "json").stdout) == []


def test_other_user_sees_nothing(cli, populated):
    assert json.loads(cli("--user", "bob", "contacts", "duplicates", "--format", "json").stdout) == []
    assert json.loads(cli("--user", "bob", "insights", "follow-ups", "--format", "json", env=ENV).stdout) == []
    data = json.loads(cli("--user", "bob", "status", "--format", "json").stdout)
    assert data["contacts"]["total"] == 0 and data["user"] == "bob"
    rita = str(populated["Recent Rita"])
    assert cli("--user", "bob", "contacts", "merge", rita, str(populated["Rita Recent"]), "--yes").exit_code == 1


def test_status_in_a_real_process(omnicrm_cmd):
    result = omnicrm_cmd("status", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["contacts"]["total"] == 0


def test_imported_notes_count_towards_the_score(cli, settings):
    assert cli("contacts", "add", "--name", "Ada", "--email", "ada@example.com", "--note", "first").exit_code == 0
    data = "display_name,email,notes\nAda,ada@example.com,second note\nBob,bob@example.com,hello\nCy,cy@example.com,\n"
    result = cli("contacts", "import", "-", input=data)
    assert result.exit_code == 0, result.output
    with session_scope(settings) as session:
        counts = dict(session.execute(select(Contact.display_name, Contact.interaction_count)).all())
        assert counts == {"Ada": 2, "Bob": 1, "Cy": 0}
        assert session.scalar(select(Contact.last_interaction_at).where(Contact.display_name == "Cy")) is None
    rows = json.loads(cli("contacts", "list", "--sort", "score", "--fields", "display_name,score",
                          "--format", "json").stdout)
    assert [r["display_name"] for r in rows] == ["Ada", "Bob", "Cy"] and rows[-1]["score"] == 0
