"""Real `omnicrm worker` processes on SQLite, PostgreSQL and Redis queues: parallelism, crashes, signals.

Workers load the test-only kinds in tests/fakes/job_handlers.py through OMNICRM_EXTRA_HANDLERS and
run with a short lease (OMNICRM_JOB_LEASE_SECONDS) so crash recovery takes about a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the workers import tests.fakes.job_handlers from the checkout
    sys.path.insert(0, str(ROOT))

from tests.fakes.job_handlers import read_events  # noqa: E402

LEASE = "1"


class Harness:
    """Starts workers against one database + queue, submits jobs and reads what happened."""

    def __init__(self, tmp: Path, home: Path, db_url: str, queue_url: str | None) -> None:
        from omnicrm.config import load_settings

        self.tmp = tmp
        self.log = tmp / "events.log"
        self.queue_name = f"t{uuid.uuid4().hex[:10]}"
        self.env = {**os.environ, "OMNICRM_HOME": str(home), "OMNICRM_DATABASE_URL": db_url,
                    "OMNICRM_QUEUE_NAME": self.queue_name, "OMNICRM_JOB_LEASE_SECONDS": LEASE,
                    "OMNICRM_JOB_BACKOFF_SECONDS": "0.2", "OMNICRM_WORKER_POLL_SECONDS": "0.05",
                    "OMNICRM_EXTRA_HANDLERS": "tests.fakes.job_handlers", "OMNICRM_TEST_JOB_LOG": str(self.log),
                    "PYTHONPATH": str(ROOT)}
        if queue_url:
            self.env["OMNICRM_QUEUE_URL"] = queue_url
        self.settings = load_settings(self.env)
        self.procs: list[subprocess.Popen] = []

    def worker(self, *args: str) -> subprocess.Popen:
        stderr = open(self.tmp / f"worker{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "omnicrm", "--log-json", "worker", *args], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
        proc.stderr_path = stderr.name
        self.procs.append(proc)
        return proc

    def drain(self, workers: int = 2):
        """`worker --once` in this process (the same code path as the command)."""
        from omnicrm.worker import drain

        return drain(self.settings, workers)

    def submit(self, kind: str, payload: dict | None = None, **kw) -> int:
        from omnicrm import jobs

        return jobs.submit(self.settings, "default", kind, payload or {}, **kw).id

    def jobs(self, ids) -> dict:
        from sqlalchemy import select

        from omnicrm.db import session_scope
        from omnicrm.models import Job

        with session_scope(self.settings) as session:
            return {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(list(ids))))}

    def wait_final(self, ids, timeout: float = 40) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.jobs(ids)
            if all(r.status in ("done", "failed", "dead", "cancelled") for r in rows.values()):
                return rows
            if time.monotonic() > deadline:
                pytest.fail(f"jobs not finished in {timeout}s: {[(r.id, r.status) for r in rows.values()]}"
                            f"\n{self.logs()}")
            time.sleep(0.05)

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(0.02)

    def events(self, event: str | None = None, job_id: int | None = None):
        return [e for e in read_events(self.log) if (event is None or e[0] == event)
                and (job_id is None or e[1] == job_id)]

    def logs(self) -> str:
        return "\n".join(Path(p.stderr_path).read_text()[-3000:] for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # graceful: a process worker also stops its children
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(autouse=True)
def _test_handlers_here(monkeypatch, tmp_path):
    """In-process drains load the same test kinds and log to the same file as the workers."""
    monkeypatch.setenv("OMNICRM_EXTRA_HANDLERS", "tests.fakes.job_handlers")
    monkeypatch.setenv("OMNICRM_TEST_JOB_LOG", str(tmp_path / "events.log"))


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def harness(request, tmp_path, omnicrm_home):
    """A harness per queue backend: SQLite DB+queue, PostgreSQL DB+queue, SQLite DB + Redis queue."""
    queue_url = None
    if request.param == "sqlite":
        db_url = f"sqlite:///{omnicrm_home / 'omnicrm.db'}"
    elif request.param == "postgresql":
        db_url = request.getfixturevalue("pg_url")
    else:
        queue_url = request.getfixturevalue("redis_url")
        db_url = f"sqlite:///{omnicrm_home / 'omnicrm.db'}"
    h = Harness(tmp_path, omnicrm_home, db_url, queue_url)
    yield h
    h.stop()
    _cleanup_queue(h)


def _cleanup_queue(h: Harness) -> None:
    from omnicrm.queue import forget_queues

    forget_queues()
    if h.settings.queue_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(h.settings.queue_url)
        keys = [k for pattern in (f"huey.*.{h.queue_name}", f"huey.*.{h.queue_name}.*")
                for k in client.scan_iter(pattern)]
        if keys:
            client.delete(*keys)


@pytest.fixture
def sql_harness(db_url, tmp_path, omnicrm_home):
    """SQLite and PostgreSQL (each its own queue)."""
    h = Harness(tmp_path, omnicrm_home, db_url, None)
    yield h
    h.stop()
    _cleanup_queue(h)


def max_concurrency(events) -> int:
    points = sorted((t, 1 if e == "start" else -1) for e, _, _, t in events if e in ("start", "end"))
    level = best = 0
    for _, delta in points:
        level += delta
        best = max(best, level)
    return best


def test_worker_runs_jobs_in_parallel(harness):
    proc = harness.worker("--workers", "8")
    ids = [harness.submit("test:record", {"seconds": 0.3}) for _ in range(12)]
    rows = harness.wait_final(ids)
    assert {r.status for r in rows.values()} == {"done"}
    events = harness.events()
    assert max_concurrency(events) >= 4
    span = max(t for *_, t in events) - min(t for *_, t in events)
    assert span < 12 * 0.3 / 2  # well under one-at-a-time
    assert proc.poll() is None


def test_kill9_mid_job_is_finished_once_by_another_worker(sql_harness):
    h = sql_harness
    first = h.worker("--workers", "2")
    job_id = h.submit("test:record", {"seconds": 0.5})
    h.wait_for(lambda: h.events("start", job_id), what="first attempt to start")
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    h.wait_for(lambda: h.jobs([job_id])[job_id].lease_expires_at < _now(), what="the lease to expire")
    outcomes = h.drain()  # another worker: reaps the expired lease, then runs the job again
    assert outcomes["done"] == 1
    row = h.jobs([job_id])[job_id]
    assert row.status == "done" and row.attempts == 2
    assert len(h.events("start", job_id)) == 2 and len(h.events("end", job_id)) == 1
    from sqlalchemy import func, select

    from omnicrm.db import session_scope
    from omnicrm.models import Tag

    with session_scope(h.settings) as session:
        assert session.scalar(select(func.count()).where(Tag.name == f"effect-{job_id}")) == 1


def _now():
    from omnicrm.config import now

    return now()


def test_same_id_delivered_twice_runs_once(sql_harness):
    from omnicrm import jobs

    h = sql_harness
    job_id = h.submit("test:record", {"seconds": 0.2})
    jobs.deliver(h.settings, [job_id] * 4)
    outcomes = h.drain(4)
    assert outcomes["done"] == 1 and outcomes["skipped"] >= 1
    assert h.jobs([job_id])[job_id].status == "done"
    assert len(h.events("start", job_id)) == 1


def test_two_workers_on_one_postgresql_share_without_overlap(pg_url, tmp_path, omnicrm_home):
    h = Harness(tmp_path, omnicrm_home, pg_url, None)
    try:
        a, b = h.worker("--workers", "4"), h.worker("--workers", "4")
        for proc in (a, b):
            h.wait_for(lambda: "worker_started" in Path(proc.stderr_path).read_text(), what="worker start")
        ids = [h.submit("test:record", {"seconds": 0.2}) for _ in range(16)]
        rows = h.wait_final(ids)
        assert {r.status for r in rows.values()} == {"done"}
        starts = h.events("start")
        assert sorted(j for _, j, _, _ in starts) == sorted(ids)  # each job ran exactly once
        assert {pid for *_, pid, _ in [(e, j, p, t) for e, j, p, t in starts]} == {a.pid, b.pid}
    finally:
        h.stop()
        _cleanup_queue(h)


def test_retry_with_backoff_then_dead(tmp_path, omnicrm_home):
    h = Harness(tmp_path, omnicrm_home, f"sqlite:///{omnicrm_home / 'omnicrm.db'}", None)
    try:
        h.worker("--workers", "2")
        job_id = h.submit("test:fail", max_attempts=3)
        permanent = h.submit("test:permanent")
        rows = h.wait_final([job_id, permanent])
        assert rows[job_id].status == "dead" and rows[job_id].attempts == 3
        assert rows[job_id].last_error == "RuntimeError: boom"
        times = [t for *_, t in h.events("start", job_id)]
        assert len(times) == 3 and all(later - earlier >= 0.1 for earlier, later in zip(times, times[1:]))
        assert rows[permanent].status == "failed" and rows[permanent].attempts == 1
        assert rows[permanent].last_error == "PermanentFailure: bad payload"
    finally:
        h.stop()
        _cleanup_queue(h)


def test_cancelled_job_never_runs(sql_harness):
    h = sql_harness
    keep, drop = h.submit("test:record"), h.submit("test:record")
    from omnicrm import jobs
    from omnicrm.db import session_scope

    with session_scope(h.settings) as session:
        jobs.cancel(session, h.jobs([drop])[drop].user_id, drop)
        session.commit()
    assert h.drain()["done"] == 1
    rows = h.jobs([keep, drop])
    assert (rows[keep].status, rows[drop].status) == ("done", "cancelled")
    assert not h.events("start", drop)


@pytest.mark.parametrize("grace,expected", [("5", "done"), ("0.2", "queued")])
def test_sigterm_finishes_or_releases_running_jobs(tmp_path, omnicrm_home, grace, expected):
    h = Harness(tmp_path, omnicrm_home, f"sqlite:///{omnicrm_home / 'omnicrm.db'}", None)
    try:
        schedule = ("--schedule", "* * * * *") if expected == "done" else ()
        proc = h.worker("--workers", "2", "--grace", grace, *schedule)
        job_id = h.submit("test:record", {"seconds": 1.0})
        h.wait_for(lambda: h.events("start", job_id), what="job start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        row = h.jobs([job_id])[job_id]
        assert row.status == expected
        log = Path(proc.stderr_path).read_text()
        if expected == "queued":  # released: runs again, attempt not counted
            assert row.attempts == 0 and row.lease_owner is None
            assert "jobs_released" in log
        else:  # the schedule fires at once for "every minute"
            fired = [json.loads(line) for line in log.splitlines() if '"schedule_fired"' in line]
            assert fired and fired[0]["command"] == "omnicrm sync run --all-users --enqueue"
    finally:
        h.stop()
        _cleanup_queue(h)


def test_exclusive_key_under_eight_workers(sql_harness):
    h = sql_harness
    h.worker("--workers", "8")
    keys = ["sync:1:gmail", "sync:1:calendar"]
    ids = {h.submit("test:record", {"seconds": 0.15}, exclusive_key=keys[i % 2]): keys[i % 2] for i in range(6)}
    rows = h.wait_final(ids, timeout=30)
    assert {r.status for r in rows.values()} == {"done"}
    for key in keys:
        spans = sorted((s[3], e[3]) for job_id in ids if ids[job_id] == key
                       for s, e in [(h.events("start", job_id)[0], h.events("end", job_id)[0])])
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans


def test_process_workers(tmp_path, omnicrm_home):
    h = Harness(tmp_path, omnicrm_home, f"sqlite:///{omnicrm_home / 'omnicrm.db'}", None)
    try:
        parent = h.worker("--workers", "4", "--kind", "process")
        ids = [h.submit("test:record", {"seconds": 0.25}) for _ in range(6)]
        rows = h.wait_final(ids)
        assert {r.status for r in rows.values()} == {"done"}
        children = {pid for *_, pid, _ in h.events("start")}
        assert len(children) >= 2 and parent.pid not in children
        parent.kill()  # SIGKILL: the forked workers must not live on as orphans
        parent.wait(5)
        h.wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=10,
                   what="the forked workers to exit with their parent")
    finally:
        h.stop()
        _cleanup_queue(h)
