"""The jobs service on SQLite and PostgreSQL: enqueue, claim, leases, retries, reaper, queue messages."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from omnicrm import jobs
from omnicrm.db import session_scope, user_id
from omnicrm.errors import InvalidInput, NotFound
from omnicrm.models import Job


class Recorder:
    """A small real handler that remembers what it ran."""

    def __init__(self, fail_with: Exception | None = None, seconds: float = 0.0) -> None:
        self.calls: list[int] = []
        self.fail_with = fail_with
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, ctx: jobs.JobContext) -> dict:
        with self.lock:
            self.calls.append(ctx.job_id)
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
            ctx.heartbeat()
        if self.fail_with is not None:
            raise self.fail_with
        return {"attempt": ctx.attempt, "user": ctx.user_name}


@pytest.fixture
def fast(settings):
    """Settings with no backoff and a short lease."""
    return settings.with_(env={**settings.env, "OMNICRM_JOB_BACKOFF_SECONDS": "0",
                               "OMNICRM_JOB_LEASE_SECONDS": "1", "OMNICRM_QUEUE_NAME": "t_jobs"})


@pytest.fixture(autouse=True)
def _forget_queues():
    yield
    from omnicrm.queue import forget_queues

    forget_queues()


def add(settings, kind="t:rec", payload=None, user="default", **kw) -> int:
    with session_scope(settings) as session:
        job = jobs.enqueue(session, user_id(session, user), kind, payload or {}, **kw)
        session.commit()
        return job.id


def row(settings, job_id) -> Job:
    with session_scope(settings) as session:
        return session.get(Job, job_id)


def test_enqueue_idempotency_key_returns_the_active_job(fast):
    first = add(fast, idempotency_key="import:abc")
    assert add(fast, idempotency_key="import:abc") == first
    jobs.register("t:rec", Recorder())
    assert jobs.execute(fast, first).status == "done"
    assert add(fast, idempotency_key="import:abc") != first  # the key is free again once finished


def test_claim_is_compare_and_set_and_a_second_delivery_is_skipped(fast):
    handler = Recorder()
    jobs.register("t:rec", handler)
    job_id = add(fast)
    assert jobs.execute(fast, job_id).status == "done"
    assert jobs.execute(fast, job_id).status == "skipped"
    assert handler.calls == [job_id]
    done = row(fast, job_id)
    assert done.result == {"attempt": 1, "user": "default"} and done.lease_owner is None


def test_concurrent_claims_of_one_job_run_it_once(fast):
    handler = Recorder(seconds=0.1)
    jobs.register("t:rec", handler)
    job_id = add(fast)
    outcomes = []
    threads = [threading.Thread(target=lambda: outcomes.append(jobs.execute(fast, job_id).status))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["done"] + ["skipped"] * 5
    assert handler.calls == [job_id]


def test_exclusive_key_allows_one_running_job(fast):
    a = add(fast, exclusive_key="sync:1:gmail")
    b = add(fast, exclusive_key="sync:1:gmail")
    c = add(fast, exclusive_key="sync:1:calendar")
    ctx, _ = jobs.claim(fast, a, "owner-a")
    assert ctx is not None
    ctx_b, busy_until = jobs.claim(fast, b, "owner-b")
    assert ctx_b is None and busy_until is not None
    waiting = row(fast, b)
    assert waiting.status == "queued" and waiting.run_after == busy_until
    assert jobs.claim(fast, c, "owner-c")[0] is not None  # another source runs alongside


def test_concurrent_claims_on_one_exclusive_key_let_exactly_one_run(fast):
    ids = [add(fast, exclusive_key="sync:1:gmail") for _ in range(8)]
    barrier = threading.Barrier(len(ids))
    results = {}

    def grab(job_id: int) -> None:
        barrier.wait()
        results[job_id] = jobs.claim(fast, job_id, f"owner-{job_id}")

    threads = [threading.Thread(target=grab, args=(job_id,)) for job_id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [job_id for job_id, (ctx, _) in results.items() if ctx is not None]
    assert len(claimed) == 1
    with session_scope(fast) as session:
        statuses = sorted(session.scalars(select(Job.status).where(Job.id.in_(ids))))
    assert statuses == ["queued"] * 7 + ["running"]


def test_retry_backoff_then_dead_keeps_the_error(fast):
    jobs.register("t:fail", Recorder(fail_with=RuntimeError("server said 503")))
    job_id = add(fast, "t:fail", max_attempts=3)
    statuses = [jobs.execute(fast, job_id).status for _ in range(3)]
    assert statuses == ["retry", "retry", "dead"]
    dead = row(fast, job_id)
    assert (dead.status, dead.attempts, dead.last_error) == ("dead", 3, "RuntimeError: server said 503")
    assert dead.finished_at is not None


def test_backoff_grows_exponentially_with_jitter(settings):
    slow = settings.with_(env={**settings.env, "OMNICRM_JOB_BACKOFF_SECONDS": "10"})
    for attempt, base in [(1, 10), (2, 20), (3, 40), (20, 3600)]:
        delays = [jobs.retry_delay(slow, attempt) for _ in range(50)]
        assert all(base * 0.5 <= d <= base for d in delays)
        assert len(set(delays)) > 1


def test_retry_is_scheduled_in_the_table(fast):
    slow = fast.with_(env={**fast.env, "OMNICRM_JOB_BACKOFF_SECONDS": "30"})
    jobs.register("t:fail", Recorder(fail_with=RuntimeError("boom")))
    job_id = add(slow, "t:fail")
    outcome = jobs.execute(slow, job_id)
    queued = row(slow, job_id)
    assert outcome.status == "retry" and queued.status == "queued"
    assert timedelta(seconds=14) < queued.run_after - queued.started_at <= timedelta(seconds=31)
    assert jobs.execute(slow, job_id).status == "skipped"  # not due yet


@pytest.mark.parametrize("error", [jobs.PermanentFailure("bad payload"), InvalidInput("--file: missing")])
def test_permanent_errors_fail_without_retry(fast, error):
    jobs.register("t:perm", Recorder(fail_with=error))
    job_id = add(fast, "t:perm")
    assert jobs.execute(fast, job_id).status == "failed"
    failed = row(fast, job_id)
    assert failed.attempts == 1 and str(error) in failed.last_error


def test_unknown_kind_fails_with_a_clear_error(fast):
    job_id = add(fast, "t:never-registered")
    assert jobs.execute(fast, job_id).status == "failed"
    assert "no handler for job kind 't:never-registered'" in row(fast, job_id).last_error


def test_cancelled_running_job_loses_its_lease(fast):
    started = threading.Event()

    def handler(ctx):
        started.set()
        while True:
            time.sleep(0.02)
            ctx.heartbeat()  # renews every third of the 1 s lease; raises LeaseLost once cancelled

    jobs.register("t:long", handler)
    job_id = add(fast, "t:long")
    result = {}
    thread = threading.Thread(target=lambda: result.update(outcome=jobs.execute(fast, job_id)))
    thread.start()
    assert started.wait(5)
    with session_scope(fast) as session:
        jobs.cancel(session, row(fast, job_id).user_id, job_id)
        session.commit()
    thread.join(5)
    assert result["outcome"].status == "lost"
    assert row(fast, job_id).status == "cancelled"


def test_reaper_requeues_expired_leases_and_buries_the_last_attempt(fast):
    a = add(fast)
    b = add(fast, max_attempts=1)
    assert jobs.claim(fast, a, "dead-worker")[0] and jobs.claim(fast, b, "dead-worker")[0]
    later = row(fast, a).lease_expires_at + timedelta(seconds=1)
    with session_scope(fast) as session:
        report = jobs.reap(session, fast, now=later)
        session.commit()
    assert (report.requeued, report.dead) == ([a], [b])
    requeued, dead = row(fast, a), row(fast, b)
    assert requeued.status == "queued" and requeued.lease_owner is None and "lease expired" in requeued.last_error
    assert dead.status == "dead" and dead.finished_at is not None
    assert a in report.redeliver  # re-queued and never delivered since


def test_reaper_redelivers_queued_jobs_whose_delivery_is_stale(fast):
    job_id = add(fast)
    created = row(fast, job_id).delivered_at
    with session_scope(fast) as session:
        assert jobs.reap(session, fast, now=created + timedelta(seconds=0.5)).redeliver == []
        report = jobs.reap(session, fast, now=created + timedelta(seconds=2))
        session.commit()
    assert report.redeliver == [job_id]
    with session_scope(fast) as session:  # delivered_at moved on: not again right away
        assert jobs.reap(session, fast, now=created + timedelta(seconds=2.5)).redeliver == []


def test_cancel_retry_purge_and_user_scope(fast):
    jobs.register("t:fail", Recorder(fail_with=RuntimeError("x")))
    queued = add(fast)
    failing = add(fast, "t:fail", max_attempts=1)
    other = add(fast, user="bob")
    assert jobs.execute(fast, failing).status == "dead"
    with session_scope(fast) as session:
        me = user_id(session, "default")
        assert jobs.cancel(session, me, queued).status == "cancelled"
        with pytest.raises(InvalidInput, match="only queued or running"):
            jobs.cancel(session, me, queued)
        with pytest.raises(NotFound):
            jobs.show(session, me, other)
        again = jobs.retry(session, me, failing)
        assert (again.status, again.attempts, again.finished_at) == ("queued", 0, None)
        with pytest.raises(InvalidInput, match="only failed, dead or cancelled"):
            jobs.retry(session, me, failing)
        session.commit()
        assert [j.id for j in jobs.list_jobs(session, me, status="cancelled")] == [queued]
        future = jobs.show(session, me, queued).finished_at + timedelta(days=8)
        assert jobs.purge(session, me, 7, now=future) == 1  # the cancelled one; bob's and queued stay
        session.commit()
        assert {j.id for j in session.scalars(select(Job))} == {failing, other}


def test_run_foreground_runs_exactly_these_jobs_in_parallel(fast):
    handler = Recorder(seconds=0.5)
    jobs.register("t:rec", handler)
    ids = [add(fast) for _ in range(4)]
    untouched = add(fast)
    started = time.monotonic()
    rows = jobs.run_foreground(fast, ids, workers=4)
    assert time.monotonic() - started < 1.5  # one at a time would take 2 s
    assert [r.id for r in rows] == ids and {r.status for r in rows} == {"done"}
    assert sorted(handler.calls) == ids and row(fast, untouched).status == "queued"


def test_run_foreground_waits_for_retries(fast):
    attempts = []

    def flaky(ctx):
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("try again")
        return {"ok": True}

    jobs.register("t:flaky", flaky)
    job_id = add(fast, "t:flaky")
    (final,) = jobs.run_foreground(fast, [job_id], workers=1)
    assert final.status == "done" and attempts == [1, 2, 3]


def test_queue_messages_are_json_job_ids_only(fast, tmp_path):
    from huey.registry import Message

    from omnicrm.queue import MESSAGE_NAME, get_queue

    queue = get_queue(fast)
    serializer = queue.huey.serializer
    data = serializer.serialize(Message("abc", MESSAGE_NAME, None, 0, 0, None, (42,), {}))
    assert data.startswith(b"{") and b"42" in data
    assert serializer.deserialize(data).args == (42,)
    import pickle

    for bad in [pickle.dumps({"job": 1}), b'{"id": "x", "name": "os.system", "eta": null, "job": 1}',
                b'{"id": "x", "name": "%s", "eta": null, "job": "1"}' % MESSAGE_NAME.encode()]:
        with pytest.raises(ValueError):
            serializer.deserialize(bad)
    with pytest.raises(ValueError):
        serializer.serialize(Message("abc", "other.task", None, 0, 0, None, (1,), {}))


def test_sqlite_queue_file_is_private(fast):
    import stat

    from omnicrm.queue import get_queue

    if not fast.queue_url.startswith("sqlite"):
        pytest.skip("SQLite queue only")
    path = fast.queue_url[len("sqlite:///"):]
    queue = get_queue(fast)
    queue.put([1])
    assert stat.S_IMODE(__import__("os").stat(path).st_mode) == 0o600
    assert queue.pop_nowait() == 1
