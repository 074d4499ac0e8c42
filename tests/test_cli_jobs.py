"""`omnicrm jobs …` and `omnicrm worker` through the CLI (in-process runner), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _jobs_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNICRM_EXTRA_HANDLERS", "tests.fakes.job_handlers")
    monkeypatch.setenv("OMNICRM_TEST_JOB_LOG", str(tmp_path / "events.log"))
    monkeypatch.setenv("OMNICRM_JOB_BACKOFF_SECONDS", "0")
    monkeypatch.setenv("OMNICRM_QUEUE_NAME", "t_cli_jobs")
    yield
    from omnicrm.queue import forget_queues

    forget_queues()


def submit(kind, payload=None, user="default", **kw) -> int:
    from omnicrm import jobs
    from omnicrm.config import load_settings

    return jobs.submit(load_settings(), user, kind, payload or {}, **kw).id


def listed(cli, *args) -> list[dict]:
    result = cli("jobs", "list", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_worker_once_runs_everything_and_jobs_list_shows_it(cli):
    ok = [submit("noop"), submit("sleep", {"seconds": 0.05})]
    result = cli("worker", "--once", "--workers", "2")
    assert result.exit_code == 0, result.stderr
    rows = listed(cli)
    assert [r["id"] for r in rows] == sorted(ok, reverse=True)
    assert {r["status"] for r in rows} == {"done"}
    for field in ("id", "kind", "status", "attempts", "last_error", "created_at", "finished_at"):
        assert field in rows[0]
    assert [r["kind"] for r in listed(cli, "--kind", "noop")] == ["noop"]


def test_worker_once_exits_1_when_a_job_fails_and_shows_the_error(cli):
    bad = submit("test:fail", max_attempts=2)
    assert cli("worker", "--once").exit_code == 1
    shown = cli("jobs", "show", str(bad), "--format", "json")
    job = json.loads(shown.stdout)
    assert (job["status"], job["attempts"], job["last_error"]) == ("dead", 2, "RuntimeError: boom")
    assert [r["id"] for r in listed(cli, "--status", "dead")] == [bad]
    assert cli("jobs", "retry", str(bad)).exit_code == 0
    assert json.loads(cli("jobs", "show", str(bad), "--format", "json").stdout)["status"] == "queued"


def test_cancel_then_worker_skips_it(cli):
    job_id = submit("test:record")
    assert cli("jobs", "cancel", str(job_id)).exit_code == 0
    again = cli("jobs", "cancel", str(job_id))
    assert again.exit_code == 2 and "only queued or running" in again.stderr
    assert cli("worker", "--once").exit_code == 0
    assert listed(cli)[0]["status"] == "cancelled"


def test_errors_map_to_exit_codes(cli):
    assert cli("jobs", "show", "999").exit_code == 1
    other = submit("noop", user="bob")
    hidden = cli("jobs", "show", str(other))
    assert hidden.exit_code == 1 and "not found" in hidden.stderr
    bad_status = cli("jobs", "list", "--status", "sleeping")
    assert bad_status.exit_code == 2 and "--status" in bad_status.stderr
    assert cli("worker", "--workers", "0").exit_code == 2
    assert cli("worker", "--kind", "greenlet").exit_code == 2
    assert cli("worker", "--grace", "-1").exit_code == 2
    bad_cron = cli("worker", "--schedule", "61 * * * *")
    assert bad_cron.exit_code == 2 and "--schedule" in bad_cron.stderr
    assert cli("worker", "--schedule", "not cron").exit_code == 2
    unreachable = cli("worker", "--once", env={"OMNICRM_QUEUE_URL": "redis://127.0.0.1:1/0"})
    assert unreachable.exit_code == 1 and "cannot reach the job queue (redis)" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_reap_and_purge(cli):
    submit("noop")
    reaped = cli("jobs", "reap", "--format", "json")
    assert reaped.exit_code == 0
    assert json.loads(reaped.stdout) == {"requeued": 0, "dead": 0, "redelivered": 0}
    assert cli("worker", "--once").exit_code == 0
    purged = cli("jobs", "purge", "--older-than", "0")
    assert purged.exit_code == 0 and "1 job(s) purged" in purged.stderr
    assert listed(cli) == []
    assert cli("jobs", "purge", "--older-than", "-1").exit_code == 2


def test_every_jobs_command_has_help(cli):
    for args in (["jobs", "list"], ["jobs", "show"], ["jobs", "retry"], ["jobs", "cancel"], ["jobs", "reap"],
                 ["jobs", "purge"], ["worker"]):
        result = cli(*args, "--help")
        assert result.exit_code == 0
        assert len(result.stdout.split("Options")[0].strip().splitlines()) >= 2, args


def test_background_import_runs_in_the_worker_and_records_its_summary(cli, tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("display_name,email\nAnn,ann@example.com\nBob,bob@example.com\n")
    queued = cli("contacts", "import", str(path), "--background")
    assert queued.exit_code == 0, queued.stderr
    job_id = queued.stdout.strip()
    assert cli("worker", "--once").exit_code == 0
    job = json.loads(cli("jobs", "show", job_id, "--format", "json").stdout)
    assert (job["kind"], job["status"]) == ("import", "done")
    assert job["result"]["created"] == 2


def test_worker_once_does_not_wait_for_a_key_held_by_another_process(cli):
    import time

    from omnicrm import jobs
    from omnicrm.config import load_settings

    settings = load_settings()
    elsewhere = submit("test:record", exclusive_key="sync:1:gmail")
    assert jobs.claim(settings, elsewhere, "another-host:1:abc")[0] is not None  # running in "another worker"
    blocked = submit("test:record", exclusive_key="sync:1:gmail")
    free = submit("noop")
    started = time.monotonic()
    assert cli("worker", "--once").exit_code == 0
    assert time.monotonic() - started < 5
    statuses = {r["id"]: r["status"] for r in listed(cli)}
    assert statuses == {elsewhere: "running", blocked: "queued", free: "done"}
