"""Per-user isolation: every command that takes a REF or a filter, run as another user, reads, changes and
deletes nothing of the first user (SQLite and PostgreSQL).

User `alice` owns contacts (emails, phones, tags, notes, interactions, an external link), jobs, a sync
state and a Google credential. Each case runs one command as `--user mallory` aimed at alice's ids,
emails, tags and job ids, then checks the exit code, that none of alice's private strings appear in the
output, and that a full dump of alice's rows is byte-for-byte the same as before.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from omnicrm import models
from tests.fakes.google_oauth import FakeOAuthServer, connect_user

# Strings only alice's rows contain (one echoed back from the command line itself does not count).
PRIVATE = ["Ann Secret", "Zed Private", "vip-secret", "Quietcorp", "alice-account@example.com", "hush-note",
           "+14155550123", "people/c123"]
ALICE = "alice"


def _user_tables():
    return [m for m in models.Base.registry.mappers if "user_id" in m.columns]


def dump(settings) -> dict:
    """Every row that belongs to alice (all columns), plus her contacts' tag links."""
    from omnicrm.db import session_scope

    out = {}
    with session_scope(settings) as session:
        uid = session.scalar(select(models.User.id).where(models.User.name == ALICE))
        for mapper in _user_tables():
            table = mapper.local_table
            rows = session.execute(select(table).where(table.c.user_id == uid).order_by(table.c.id)).all()
            out[table.name] = [tuple(map(repr, row)) for row in rows]
        ids = [c for c in session.scalars(select(models.Contact.id).where(models.Contact.user_id == uid))]
        out["contact_tags"] = sorted(session.execute(
            select(models.ContactTag.contact_id, models.ContactTag.tag_id)
            .where(models.ContactTag.contact_id.in_(ids))).all())
    assert out["contacts"] and out["jobs"] and out["credentials"] and out["sync_states"] and out["notes"]
    return out


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory):
    """One database per engine for the whole module, holding alice's data (commands as mallory must leave
    it untouched, which each case checks). Returns (settings, env for the CLI, alice's ids)."""
    from omnicrm.config import load_settings
    from omnicrm.db import dispose_engines

    home = tmp_path_factory.mktemp("isolation") / "home"
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'omnicrm.db'}"
        schema = None
    else:
        import uuid

        import psycopg

        base = request.getfixturevalue("pg_database")
        schema = f"iso_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        url = f"{base}?options=-csearch_path%3D{schema},public"
    env = {"OMNICRM_HOME": str(home), "OMNICRM_DATABASE_URL": url}
    settings = load_settings(env)
    ids = _alice(settings)
    yield settings, env, ids
    dispose_engines()
    if schema:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _alice(settings) -> dict:
    """Alice's data; returns the values a hostile user would aim at."""
    from omnicrm import contacts as svc
    from omnicrm import jobs
    from omnicrm.config import now
    from omnicrm.db import session_scope, user_id

    with FakeOAuthServer(email="alice-account@example.com") as oauth:
        connect_user(settings, ALICE, oauth)
    with session_scope(settings) as session:
        uid = user_id(session, ALICE)
        ann = svc.add_contact(session, uid, name="Ann Secret", emails=["ann@a-private.org"], phones=["+14155550123"],
                              company="Quietcorp", tags=["vip-secret"], note="hush-note about Ann")
        twin = svc.add_contact(session, uid, name="Ann Secret", emails=["ann.twin@a-private.org"],
                               company="Quietcorp")
        zed = svc.add_contact(session, uid, name="Zed Private", emails=["zed@a-private.org"], tags=["vip-secret"])
        session.add(models.ExternalLink(user_id=uid, contact_id=zed.id, source="people", external_id="people/c123"))
        svc.record_interaction(session, uid, zed.id, kind="email", direction="in", occurred_at=now(),
                               subject="Zed Private hello", source="gmail", external_id="m1")
        queued = jobs.enqueue(session, uid, "import", {"path": "/tmp/Ann Secret.csv"})
        dead = jobs.enqueue(session, uid, "sync:gmail", {"note": "Zed Private"})
        dead.status, dead.last_error = "dead", "boom for Ann Secret"
        session.add(models.SyncState(user_id=uid, source="gmail", cursor="4242", last_error="Zed Private failed",
                                     items_synced=7, last_success_at=now()))
        session.commit()
        return {"ann": str(ann.id), "twin": str(twin.id), "zed": str(zed.id), "queued": str(queued.id),
                "dead": str(dead.id)}


def run(env: dict, *args: str):
    from typer.testing import CliRunner

    from omnicrm.cli import app

    result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


# (command with {placeholders}, expected exit code). Exit 1 = "not found": another user's ids do not exist.
CASES = [
    ("contacts show {ann}", 1),
    ("contacts show ann@a-private.org", 1),
    ("contacts update {ann} --name Mallory --company Evil --tag owned", 1),
    ("contacts update ann@a-private.org --remove-email ann@a-private.org", 1),
    ("contacts delete {ann} {zed} --yes", 1),
    ("contacts delete zed@a-private.org --yes", 1),
    ("contacts delete --search ann --yes", 0),
    ("contacts delete --tag vip-secret --yes", 0),
    ("contacts delete --created 2000-01-01.. --yes", 0),
    ("contacts delete --stale 0 --yes", 0),
    ("contacts note {ann} mallory-was-here", 1),
    ("contacts timeline {zed}", 1),
    ("contacts timeline zed@a-private.org --format json", 1),
    ("contacts merge {ann} {twin} --yes", 1),
    ("contacts list --format json", 0),
    ("contacts list --search ann --tag vip-secret --format json", 0),
    ("contacts list --search 4155550123 --format csv", 0),
    ("contacts list --created 2000-01-01.. --stale 0", 0),
    ("contacts export", 0),
    ("contacts export --search private --format jsonl", 0),
    ("contacts duplicates --format json", 0),
    ("tags list --format json", 0),
    ("tags rename vip-secret owned", 1),
    ("jobs list --format json", 0),
    ("jobs show {queued}", 1),
    ("jobs retry {dead}", 1),
    ("jobs cancel {queued}", 1),
    ("sync status --format json", 0),
    ("google status --format json", 3),
    ("google disconnect", 0),
    ("insights follow-ups --format json", 0),
    ("status --format json", 0),
]


@pytest.mark.parametrize("command, code", CASES, ids=[c for c, _ in CASES])
def test_another_user_reads_changes_and_deletes_nothing(world, command, code):
    settings, env, alice = world
    args = command.format(**alice).split()
    before = dump(settings)
    exit_code, output = run(env, "--user", "mallory", *args)
    assert exit_code == code, output
    assert "Traceback" not in output
    leaked = [s for s in PRIVATE if s.lower() in output.lower() and s.lower() not in command.lower()]
    assert not leaked, (leaked, output)
    assert dump(settings) == before


def test_the_owner_sees_and_changes_her_own_rows(world):
    """Control (runs last): the same commands as alice do read and change her rows, so the checks above
    can fail."""
    settings, env, alice = world
    before = dump(settings)
    code, output = run(env, "--user", ALICE, "contacts", "show", alice["ann"])
    assert code == 0 and "Ann Secret" in output
    assert "Zed Private" in run(env, "--user", ALICE, "contacts", "export")[1]
    assert run(env, "--user", ALICE, "contacts", "note", alice["ann"], "more")[0] == 0
    assert dump(settings) != before
