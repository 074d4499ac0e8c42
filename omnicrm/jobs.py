"""The jobs table as the source of truth for queued work. Knows no job kinds.

Life of a job: `enqueue` (queued) → `deliver` hands its id to Huey → a worker `claim`s it with one
compare-and-set UPDATE (queued and due → running, with a lease) → the handler runs while a
background thread renews the lease → `done`, or `queued` again with exponential backoff and jitter,
or `dead` after max attempts, or `failed` at once for a permanent error. A job whose worker died
keeps its expired lease until `reap` puts it back to `queued` (or `dead`). A job id delivered twice
runs once: the second claim finds it no longer queued. Jobs sharing an `exclusive_key` never run
together: the partial unique index on running jobs refuses the second claim, which leaves the job
queued for a short delay and delivers it again.

Tunables (environment): OMNICRM_JOB_LEASE_SECONDS (60; heartbeats every third of it, the reaper
runs every half of it and re-delivers a queued job whose delivery is older than one lease),
OMNICRM_JOB_BACKOFF_SECONDS (10; first retry delay, doubled per attempt, capped at one hour, with
jitter).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, ContextManager, Iterator, TypeVar

from sqlalchemy import Connection, Engine, and_, bindparam, delete, exists, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omnicrm.config import Settings, now as current_time
from omnicrm.errors import AuthorizationNeeded, InvalidInput, NotFound, OmniCrmError
from omnicrm.models import Job, User

log = logging.getLogger("omnicrm.jobs")
T = TypeVar("T")

STATUSES = ("queued", "running", "done", "failed", "dead", "cancelled")
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "dead", "cancelled")
DEFAULT_LEASE_SECONDS = 60.0
DEFAULT_BACKOFF_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 3600.0
MAX_ERROR_CHARS = 4000


class LeaseLost(Exception):
    """The job's lease expired or was taken over (or the job was cancelled): stop working on it."""


class PermanentFailure(OmniCrmError):
    """A handler error that retrying cannot fix: the job ends `failed` without further attempts."""


PERMANENT_ERRORS = (PermanentFailure, InvalidInput, AuthorizationNeeded)

Handler = Callable[["JobContext"], "dict | None"]
_handlers: dict[str, Handler] = {}


def register(kind: str, handler: Handler) -> None:
    """Make `handler` run jobs of `kind` in this process (its returned dict is stored as the result)."""
    if not kind or len(kind) > 64:
        raise ValueError("job kind must be 1-64 characters")
    _handlers[kind] = handler


def registered_kinds() -> list[str]:
    return sorted(_handlers)


# --- tunables -----------------------------------------------------------------------------------

def _number(settings: Settings, name: str, default: float, minimum: float) -> float:
    raw = settings.env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name}: {raw!r} is not a number") from None
    if value < minimum:
        raise InvalidInput(f"{name}: must be at least {minimum:g}")
    return value


def lease_seconds(settings: Settings) -> float:
    return _number(settings, "OMNICRM_JOB_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, 0.5)


def backoff_seconds(settings: Settings) -> float:
    return _number(settings, "OMNICRM_JOB_BACKOFF_SECONDS", DEFAULT_BACKOFF_SECONDS, 0.0)


def exclusive_delay(settings: Settings) -> float:
    """How long a job that found its exclusive key busy waits before it is offered again."""
    return min(1.0, lease_seconds(settings) / 4)


def retry_delay(settings: Settings, attempt: int) -> float:
    """Exponential backoff with jitter: base·2^(attempt-1), capped, then scaled by 0.5-1.0."""
    base = backoff_seconds(settings)
    return min(MAX_BACKOFF_SECONDS, base * 2 ** max(attempt - 1, 0)) * random.uniform(0.5, 1.0)


# --- enqueueing ---------------------------------------------------------------------------------

def enqueue(session: Session, user_id: int, kind: str, payload: dict, *, idempotency_key: str | None = None,
            exclusive_key: str | None = None, max_attempts: int | None = None,
            run_after: datetime | None = None) -> Job:
    """Add a queued job (flushed; the caller commits, then calls `deliver`).

    With an idempotency key that an active (queued or running) job of this user already holds,
    that job is returned instead of a new one.
    """
    if max_attempts is not None and not 1 <= max_attempts <= 100:
        raise InvalidInput("max_attempts: must be 1-100")
    json.dumps(payload)  # a payload must be plain JSON
    if idempotency_key is not None:
        existing = _active_with_key(session, user_id, idempotency_key)
        if existing is not None:
            return existing
    when = run_after or current_time()
    job = Job(user_id=user_id, kind=kind, payload=dict(payload), status="queued", attempts=0,
              run_after=when, delivered_at=when, idempotency_key=idempotency_key, exclusive_key=exclusive_key,
              created_at=current_time())
    if max_attempts is not None:
        job.max_attempts = max_attempts
    if idempotency_key is None:
        session.add(job)
        session.flush()
        return job
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:  # another process enqueued the same key between our check and insert
        existing = _active_with_key(session, user_id, idempotency_key)
        if existing is None:
            raise
        return existing
    return job


def _active_with_key(session: Session, user_id: int, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.user_id == user_id, Job.idempotency_key == key,
                                            Job.status.in_(ACTIVE)))


def deliver(settings: Settings, job_ids: list[int], *, eta: datetime | None = None) -> None:
    """Hand job ids to Huey (now, or at `eta`). Losing this step loses nothing: the reaper re-delivers."""
    if not job_ids:
        return
    from omnicrm.queue import get_queue

    get_queue(settings).put(list(job_ids), eta=eta)


def submit(settings: Settings, user_name: str, kind: str, payload: dict, **kw) -> Job:
    """Enqueue, commit and deliver in one call."""
    from omnicrm.db import session_scope, user_id

    with session_scope(settings) as session:
        job = enqueue(session, user_id(session, user_name), kind, payload, **kw)
        session.commit()
    if job.status == "queued":
        deliver(settings, [job.id], eta=job.run_after if job.run_after > current_time() else None)
    return job


# --- running ------------------------------------------------------------------------------------

@dataclass
class JobContext:
    """What a handler gets: the job, a way to open sessions, and `heartbeat()`."""

    job_id: int
    kind: str
    payload: dict
    attempt: int
    user_id: int
    user_name: str
    settings: Settings
    owner: str = field(repr=False, default="")
    max_attempts: int = field(repr=False, default=1)
    _lost: bool = field(default=False, repr=False)
    _renewed: float = field(default_factory=time.monotonic, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def session(self) -> ContextManager[Session]:
        """A new session on the application database (the handler commits)."""
        from omnicrm.db import session_scope

        return session_scope(self.settings)

    @property
    def lease_lost(self) -> bool:
        return self._lost

    def heartbeat(self) -> None:
        """Renew the lease if a third of it has passed; raise LeaseLost if it is gone."""
        if not self._lost and time.monotonic() - self._renewed >= lease_seconds(self.settings) / 3:
            self._renew()
        if self._lost:
            raise LeaseLost(f"job {self.job_id} lost its lease")

    def _renew(self) -> None:
        with self._lock:
            if self._lost:
                return
            stamp = current_time()
            try:
                stmt = (update(_T).where(_T.c.id == self.job_id, _T.c.status == "running",
                                         _T.c.lease_owner == self.owner)
                        .values(lease_expires_at=stamp + timedelta(seconds=lease_seconds(self.settings)),
                                heartbeat_at=stamp))
                renewed = _in_write(self.settings, lambda conn: conn.execute(stmt).rowcount)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again on the next beat
                log.warning("heartbeat for job %s failed: %s", self.job_id, type(exc).__name__)
                return
            self._renewed = time.monotonic()
            if renewed != 1:
                self._lost = True


class _LeaseKeeper:
    """One background thread per process renewing the leases of every job running in it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, JobContext] = {}
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, ctx: JobContext) -> None:
        with self.lock:
            idle = not self.active
            self.active[ctx.job_id] = ctx
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="omnicrm-lease-keeper", daemon=True)
                self.thread.start()
        if idle:  # the keeper sleeps long when nothing runs; make it pick up this job's interval
            self.wake.set()

    def remove(self, ctx: JobContext) -> None:
        with self.lock:
            if self.active.get(ctx.job_id) is ctx:
                del self.active[ctx.job_id]

    def snapshot(self) -> list[JobContext]:
        with self.lock:
            return list(self.active.values())

    def _run(self) -> None:
        while True:
            contexts = self.snapshot()
            interval = min((lease_seconds(c.settings) / 3 for c in contexts), default=5.0)
            self.wake.wait(max(0.05, min(interval / 2, 5.0)))
            self.wake.clear()
            for ctx in self.snapshot():
                if not ctx._lost and time.monotonic() - ctx._renewed >= lease_seconds(ctx.settings) / 3:
                    ctx._renew()


_keeper = _LeaseKeeper()


def _after_fork_in_child() -> None:
    # Threads and connections do not survive fork(): start afresh in a forked worker process.
    global _keeper
    _keeper = _LeaseKeeper()
    _sqlite_write_locks.clear()
    from omnicrm import db, queue

    for engine in list(db._engines.values()):
        engine.dispose(close=False)
    with queue._lock:
        queue._queues.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def new_owner() -> str:
    """A lease token unique to one claim: host, process and a random part."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass
class Outcome:
    """What one `execute` call did: status is done|failed|dead|retry|lost|released|busy|skipped."""

    job_id: int
    status: str
    run_after: datetime | None = None
    error: str | None = None


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message[:MAX_ERROR_CHARS]


_T = Job.__table__
_OTHER = _T.alias("other_job")
# One compare-and-set statement: queued and due, and no running job holds the same exclusive key.
_CLAIM = (update(_T)
          .where(_T.c.id == bindparam("b_id"), _T.c.status == "queued", _T.c.run_after <= bindparam("b_now"),
                 or_(_T.c.exclusive_key.is_(None),
                     ~exists(select(_OTHER.c.id).where(_OTHER.c.exclusive_key == _T.c.exclusive_key,
                                                       _OTHER.c.status == "running"))))
          .values(status="running", attempts=_T.c.attempts + 1, lease_owner=bindparam("b_owner"),
                  lease_expires_at=bindparam("b_expires", type_=_T.c.run_after.type),
                  heartbeat_at=bindparam("b_now2", type_=_T.c.run_after.type),
                  started_at=bindparam("b_now3", type_=_T.c.run_after.type), finished_at=None)
          .returning(_T.c.kind, _T.c.payload, _T.c.attempts, _T.c.max_attempts, _T.c.user_id))
_user_names: dict[tuple[str, int], str] = {}
_sqlite_write_locks: dict[str, threading.Lock] = {}


@contextmanager
def _write(settings: Settings) -> Iterator[Connection]:
    """A connection for one job-state change (each is a single statement, or a short transaction).

    PostgreSQL: autocommit on a pool of its own (one round trip per change), committing without
    waiting for the WAL flush (synchronous_commit off): a database crash may forget the last
    fraction of a second of job-state changes, which only means a job runs again (handlers are
    idempotent); data written by handlers is not affected. SQLite: one short BEGIN IMMEDIATE
    transaction; threads of this process queue on a lock (woken at once) rather than in SQLite's
    busy handler, which sleeps in growing steps.
    """
    from omnicrm import db

    url = settings.database_url
    engine = db.get_engine(url) if url in db._migrated else db.ready_engine(settings)
    if engine.dialect.name == "postgresql":
        with _state_engine(url).connect() as conn:
            yield conn
        return
    with _sqlite_write_locks.setdefault(url, threading.Lock()), engine.begin() as conn:
        yield conn


def _in_write(settings: Settings, work: Callable[[Connection], T]) -> T:
    """Run `work` in `_write`, once more if the pooled connection turned out to be dead (a restart)."""
    from sqlalchemy.exc import DBAPIError

    try:
        with _write(settings) as conn:
            return work(conn)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    with _write(settings) as conn:
        return work(conn)


def _state_engine(url: str) -> Engine:
    """PostgreSQL: the autocommit, asynchronous-commit pool for job-state changes, sized for many
    worker threads. Kept with the app's engines, so `db.dispose_engines()` disposes it too."""
    from omnicrm import db

    key = f"{url}#job-state"
    with db._lock:
        engine = db._engines.get(key)
        if engine is None:
            from sqlalchemy import create_engine, event

            engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_size=16, max_overflow=48,
                                   connect_args={"connect_timeout": 10})

            @event.listens_for(engine, "connect")
            def _async_commit(dbapi_conn, _record):
                with dbapi_conn.cursor() as cur:
                    cur.execute("SET synchronous_commit TO off")
                dbapi_conn.commit()

            db._engines[key] = engine
        return engine


def _user_name(settings: Settings, conn: Connection, user_id: int) -> str:
    key = (settings.database_url, user_id)
    name = _user_names.get(key)
    if name is None:
        name = _user_names[key] = conn.execute(select(User.name).where(User.id == user_id)).scalar_one()
    return name


def claim(settings: Settings, job_id: int, owner: str, *, now: datetime | None = None
          ) -> tuple[JobContext | None, datetime | None]:
    """Compare-and-set a queued, due job to running with a lease.

    Returns (context, None) on success, (None, run_after) if its exclusive key was busy (the job
    stays queued until run_after), or (None, None) if it is not claimable (done, running elsewhere,
    not due, cancelled, unknown).
    """
    stamp = now or current_time()
    params = {"b_id": job_id, "b_now": stamp, "b_now2": stamp, "b_now3": stamp, "b_owner": owner,
              "b_expires": stamp + timedelta(seconds=lease_seconds(settings))}

    def take(conn: Connection) -> JobContext | None:
        row = conn.execute(_CLAIM, params).first()
        if row is None:
            return None
        kind, payload, attempts, max_attempts, uid = row
        return JobContext(job_id=job_id, kind=kind, payload=dict(payload or {}), attempt=attempts, user_id=uid,
                          user_name=_user_name(settings, conn, uid), settings=settings, owner=owner,
                          max_attempts=max_attempts)

    try:
        ctx = _in_write(settings, take)
        if ctx is not None:
            return ctx, None
    except IntegrityError:  # lost a race for the exclusive key with a concurrent claim
        pass
    later = stamp + timedelta(seconds=exclusive_delay(settings))
    bounced = _in_write(settings, lambda conn: conn.execute(
        update(_T).where(_T.c.id == job_id, _T.c.status == "queued", _T.c.run_after <= stamp,
                         _T.c.exclusive_key.is_not(None))
        .values(run_after=later, delivered_at=later)).rowcount)
    return (None, later) if bounced == 1 else (None, None)


def _settle(settings: Settings, job_id: int, owner: str, **values) -> bool:
    """Write the end of an attempt if this claim still holds the lease."""
    values.setdefault("lease_owner", None)
    values.setdefault("lease_expires_at", None)
    stmt = update(_T).where(_T.c.id == job_id, _T.c.status == "running", _T.c.lease_owner == owner).values(**values)
    return _in_write(settings, lambda conn: conn.execute(stmt).rowcount) == 1


def _plain_result(result) -> dict | None:
    if result is None:
        return None
    if not isinstance(result, dict):
        result = {"value": result}
    return json.loads(json.dumps(result, default=str))


def execute(settings: Settings, job_id: int, *, owner: str | None = None) -> Outcome:
    """Claim job `job_id` and run its handler here; the one code path shared by workers and foreground runs."""
    owner = owner or new_owner()
    ctx, busy_until = claim(settings, job_id, owner)
    if ctx is None:
        return Outcome(job_id, "busy" if busy_until else "skipped", run_after=busy_until)
    fields = {"job_id": job_id, "kind": ctx.kind, "attempt": ctx.attempt, "user": ctx.user_name}
    log.info("job %s %s started (attempt %s)", job_id, ctx.kind, ctx.attempt,
             extra={"fields": {"event": "job_started", **fields}})
    started = time.monotonic()
    _keeper.add(ctx)
    outcome: Outcome
    try:
        handler = _handlers.get(ctx.kind)
        if handler is None:
            raise PermanentFailure(f"no handler for job kind {ctx.kind!r} in this worker")
        result = _plain_result(handler(ctx))
        if ctx._lost:
            raise LeaseLost(f"job {job_id} lost its lease")
        stamp = current_time()
        if _settle(settings, job_id, owner, status="done", result=result, finished_at=stamp, last_error=None):
            outcome = Outcome(job_id, "done")
        else:
            outcome = Outcome(job_id, "lost", error="lease lost before the result was saved")
    except LeaseLost as exc:
        outcome = Outcome(job_id, "lost", error=str(exc))
    except PERMANENT_ERRORS as exc:
        error = _error_text(exc)
        _settle(settings, job_id, owner, status="failed", last_error=error, finished_at=current_time())
        outcome = Outcome(job_id, "failed", error=error)
    except Exception as exc:  # noqa: BLE001 - any handler error is recorded on the job
        error = _error_text(exc)
        outcome = _after_error(settings, ctx, error)
    except BaseException:  # KeyboardInterrupt/SystemExit: give the job back, do not count the attempt
        release(settings, ctx)
        log.warning("job %s %s interrupted; lease released", job_id, ctx.kind,
                    extra={"fields": {"event": "job_released", **fields}})
        raise
    finally:
        _keeper.remove(ctx)
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    level = logging.INFO if outcome.status == "done" else logging.WARNING
    log.log(level, "job %s %s finished: %s%s (%.0f ms)", job_id, ctx.kind, outcome.status,
            f" — {outcome.error}" if outcome.error else "", duration_ms,
            extra={"fields": {"event": "job_finished", **fields, "status": outcome.status,
                              "error": outcome.error, "duration_ms": duration_ms,
                              **({"run_after": outcome.run_after.isoformat()} if outcome.run_after else {})}})
    return outcome


def _after_error(settings: Settings, ctx: JobContext, error: str) -> Outcome:
    stamp = current_time()
    if ctx.attempt >= ctx.max_attempts:
        _settle(settings, ctx.job_id, ctx.owner, status="dead", last_error=error, finished_at=stamp)
        return Outcome(ctx.job_id, "dead", error=error)
    later = stamp + timedelta(seconds=retry_delay(settings, ctx.attempt))
    if _settle(settings, ctx.job_id, ctx.owner, status="queued", last_error=error, run_after=later,
               delivered_at=later):
        return Outcome(ctx.job_id, "retry", run_after=later, error=error)
    return Outcome(ctx.job_id, "lost", error=error)


def release(settings: Settings, ctx: JobContext) -> bool:
    """Give a running job back (queued, due now, attempt not counted); the handler is told to stop."""
    ctx._lost = True
    stamp = current_time()
    return _settle(settings, ctx.job_id, ctx.owner, status="queued", attempts=_T.c.attempts - 1, run_after=stamp,
                   delivered_at=stamp)


def release_running(settings: Settings) -> list[int]:
    """Release every job still running in this process (shutdown after the grace period)."""
    released = []
    for ctx in _keeper.snapshot():
        try:
            if release(settings, ctx):
                released.append(ctx.job_id)
        except Exception as exc:  # noqa: BLE001 - the lease will expire and the reaper will do it
            log.warning("could not release job %s: %s", ctx.job_id, type(exc).__name__)
    return released


def running_here() -> list[int]:
    return [ctx.job_id for ctx in _keeper.snapshot()]


def run_foreground(settings: Settings, job_ids: list[int], workers: int) -> list[Job]:
    """Claim and run exactly these jobs in threads in this process, retries included; return final rows.

    Same claim and lease rules as a worker: a job running elsewhere (or waiting for its exclusive
    key) is waited for; a retry waits for its backoff (enqueue with max_attempts=1 to avoid that).
    """
    from concurrent.futures import ThreadPoolExecutor

    from omnicrm.db import session_scope
    from omnicrm.handlers import register_all  # the handler table lives above this module

    register_all()

    def run_one(job_id: int) -> None:
        owner = new_owner()
        while True:
            execute(settings, job_id, owner=owner)
            with session_scope(settings) as session:
                job = session.get(Job, job_id)
                if job is None or job.status in FINAL:
                    return
                wait = (job.run_after - current_time()).total_seconds() if job.status == "queued" else 0.2
            time.sleep(min(max(wait, 0.02), 5.0))

    ids = list(dict.fromkeys(int(i) for i in job_ids))
    if ids:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(ids))),
                                thread_name_prefix="omnicrm-job") as pool:
            for future in [pool.submit(run_one, job_id) for job_id in ids]:
                future.result()
    with session_scope(settings) as session:
        rows = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
    return [rows[i] for i in ids if i in rows]


# --- maintenance --------------------------------------------------------------------------------

@dataclass
class ReapReport:
    requeued: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    redeliver: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        return {"requeued": len(self.requeued), "dead": len(self.dead), "redelivered": len(self.redeliver)}


def reap(session: Session, settings: Settings, *, now: datetime | None = None, limit: int = 10000) -> ReapReport:
    """Expired running jobs → queued (or dead after max attempts); stale queued jobs → to re-deliver.

    All users (maintenance). The caller commits, then delivers `report.redeliver`.
    """
    stamp = now or current_time()
    report = ReapReport()
    expired = session.execute(select(Job.id, Job.attempts, Job.max_attempts).where(
        Job.status == "running", Job.lease_expires_at < stamp).limit(limit)).all()
    for job_id, attempts, max_attempts in expired:
        still = and_(Job.id == job_id, Job.status == "running", Job.lease_expires_at < stamp)
        error = f"lease expired: the worker stopped answering during attempt {attempts}"
        if attempts >= max_attempts:
            values = dict(status="dead", finished_at=stamp)
        else:
            values = dict(status="queued", run_after=stamp, delivered_at=None)
        changed = session.execute(update(Job).where(still).values(
            lease_owner=None, lease_expires_at=None, last_error=error, **values)
            .execution_options(synchronize_session=False)).rowcount
        if changed:
            (report.dead if values["status"] == "dead" else report.requeued).append(job_id)
    stale = stamp - timedelta(seconds=lease_seconds(settings))
    report.redeliver = list(session.scalars(select(Job.id).where(
        Job.status == "queued", Job.run_after <= stamp,
        or_(Job.delivered_at.is_(None), Job.delivered_at < stale)).order_by(Job.id).limit(limit)))
    if report.redeliver:
        session.execute(update(Job).where(Job.id.in_(report.redeliver), Job.status == "queued")
                        .values(delivered_at=stamp).execution_options(synchronize_session=False))
    session.flush()
    return report


def reap_and_deliver(settings: Settings) -> ReapReport:
    """One reaper pass in its own transaction, then the re-deliveries."""
    from omnicrm.db import session_scope

    with session_scope(settings) as session:
        report = reap(session, settings)
        session.commit()
    deliver(settings, report.requeued + report.redeliver)
    return report


def _get(session: Session, user_id: int, job_id: int) -> Job:
    if not 0 < job_id < 2**63:  # no such row; the driver would overflow on it
        raise NotFound(f"job {job_id} not found")
    job = session.scalar(select(Job).where(Job.id == job_id, Job.user_id == user_id))
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def show(session: Session, user_id: int, job_id: int) -> Job:
    return _get(session, user_id, job_id)


def cancel(session: Session, user_id: int, job_id: int, *, now: datetime | None = None) -> Job:
    """Cancel a queued job; a running one is cancelled too and its handler stops at its next heartbeat."""
    job = _get(session, user_id, job_id)
    if job.status not in ACTIVE:
        raise InvalidInput(f"job {job_id} is {job.status}; only queued or running jobs can be cancelled")
    changed = session.execute(update(Job).where(Job.id == job_id, Job.status == job.status)
                              .values(status="cancelled", finished_at=now or current_time(),
                                      lease_owner=None, lease_expires_at=None)
                              .execution_options(synchronize_session=False)).rowcount
    if changed != 1:
        raise InvalidInput(f"job {job_id} changed while cancelling; look at it again")
    session.refresh(job)
    return job


def retry(session: Session, user_id: int, job_id: int, *, now: datetime | None = None) -> Job:
    """Queue a failed, dead or cancelled job again with a fresh attempt count (the caller delivers it)."""
    job = _get(session, user_id, job_id)
    if job.status not in ("failed", "dead", "cancelled"):
        raise InvalidInput(f"job {job_id} is {job.status}; only failed, dead or cancelled jobs can be retried")
    stamp = now or current_time()
    try:
        with session.begin_nested():
            session.execute(update(Job).where(Job.id == job_id, Job.status == job.status)
                            .values(status="queued", attempts=0, run_after=stamp, delivered_at=stamp,
                                    finished_at=None, lease_owner=None, lease_expires_at=None)
                            .execution_options(synchronize_session=False))
    except IntegrityError:
        raise InvalidInput(f"job {job_id}: another active job holds its idempotency key") from None
    session.refresh(job)
    return job


def purge(session: Session, user_id: int | None, older_than_days: float, *, now: datetime | None = None) -> int:
    """Delete finished jobs (done, failed, dead, cancelled) older than the given days; None = all users."""
    if not 0 <= older_than_days <= 1_000_000:  # also NaN; a larger value overflows a date
        raise InvalidInput("--older-than: must be 0-1000000 days")
    cutoff = (now or current_time()) - timedelta(days=older_than_days)
    stmt = delete(Job).where(Job.status.in_(FINAL), Job.finished_at < cutoff)
    if user_id is not None:
        stmt = stmt.where(Job.user_id == user_id)
    return session.execute(stmt.execution_options(synchronize_session=False)).rowcount


def list_jobs(session: Session, user_id: int, *, status: str | None = None, kind: str | None = None,
              limit: int = 100) -> Iterator[Job]:
    """The user's jobs, newest first."""
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"--status: {status!r} is not one of {', '.join(STATUSES)}")
    if limit < 0:
        raise InvalidInput("--limit: must be 0 (no limit) or more")
    stmt = select(Job).where(Job.user_id == user_id).order_by(Job.id.desc())
    if status:
        stmt = stmt.where(Job.status == status)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    if limit:
        stmt = stmt.limit(limit)
    return iter(session.scalars(stmt).all())


LIST_FIELDS = ["id", "kind", "status", "attempts", "max_attempts", "last_error", "created_at", "started_at",
               "finished_at"]


def record(job: Job) -> dict:
    """A job as plain data (the fields `jobs list/show --format json` print)."""
    return {"id": job.id, "kind": job.kind, "status": job.status, "attempts": job.attempts,
            "max_attempts": job.max_attempts, "last_error": job.last_error, "created_at": job.created_at,
            "started_at": job.started_at, "finished_at": job.finished_at, "run_after": job.run_after,
            "payload": job.payload, "result": job.result, "idempotency_key": job.idempotency_key,
            "exclusive_key": job.exclusive_key, "lease_owner": job.lease_owner,
            "lease_expires_at": job.lease_expires_at, "heartbeat_at": job.heartbeat_at}
