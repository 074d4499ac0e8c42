"""Google sync services: run one source, preview, status, and the job handler behind `sync run`.

Sources: `gmail`, `calendar`, `contacts` (People connections and, when granted, other contacts).
Each runs as a job of kind `sync:<source>` with exclusive key `sync:<user_id>:<source>`, so at most
one sync per user and source runs at a time. Every page is committed with its cursor, so a run that
was killed resumes where it stopped (see omnicrm/sync/upsert.py for the upsert rules).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Callable, Iterable

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from omnicrm.config import Settings, now as clock_now
from omnicrm.errors import AuthorizationNeeded, InvalidInput, OmniCrmError, PartialSuccess
from omnicrm.models import Contact, Credential, Interaction, Job, SyncState, User

log = logging.getLogger("omnicrm.sync")

SOURCES = ("gmail", "calendar", "contacts")
FOREGROUND_WORKERS = 9  # three users' three sources at once under `sync run --all-users`
KIND_PREFIX = "sync:"


def job_kind(source: str) -> str:
    return f"{KIND_PREFIX}{source}"


def exclusive_key(user_id: int, source: str) -> str:
    return f"sync:{user_id}:{source}"


def check_sources(sources: Iterable[str] | None) -> list[str]:
    chosen = list(dict.fromkeys(s.strip().lower() for s in (sources or []) if s.strip())) or list(SOURCES)
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown:
        raise InvalidInput(f"--source: {', '.join(unknown)} is not one of {', '.join(SOURCES)}")
    return chosen


def parse_since(value: str | None) -> datetime | None:
    """--since DATE (ISO date or date-time; a date means its midnight UTC)."""
    if not value:
        return None
    try:
        if len(value.strip()) == 10:
            return datetime.combine(date.fromisoformat(value.strip()), datetime.min.time(), timezone.utc)
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput(f"--since: {value!r} is not an ISO date (YYYY-MM-DD)") from None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _runner(source: str) -> Callable:
    if source == "gmail":
        from omnicrm.sync.gmail import sync_gmail

        return sync_gmail
    if source == "calendar":
        from omnicrm.sync.calendar import sync_calendar

        return sync_calendar
    from omnicrm.sync.people import sync_contacts

    return sync_contacts


# --- one source ----------------------------------------------------------------------------------

def run_source(session: Session, settings: Settings, user_id: int, source: str, credentials, *,
               full: bool = False, since: datetime | None = None, create: str | None = None,
               heartbeat: Callable[[], None] | None = None) -> dict:
    """Sync one source for one user. Commits page by page (that is what makes it resumable) and
    records the outcome on the source's SyncState; returns the run's counts."""
    from omnicrm.sync.upsert import SyncRun, create_mode

    check_sources([source])
    run = SyncRun(session=session, settings=settings, user_id=user_id, source=source, credentials=credentials,
                  full=full, since=since, mode=create_mode(create), heartbeat=heartbeat)
    from omnicrm.sync.upsert import RACE_RETRIES, _is_race

    for attempt in range(RACE_RETRIES + 1):
        try:
            _runner(source)(run)
            break
        except BaseException as exc:
            session.rollback()
            run.upsert.forget()
            if isinstance(exc, DBAPIError) and _is_race(exc) and attempt < RACE_RETRIES:
                # A parallel sync of another source touched the same contacts (PostgreSQL deadlock or
                # unique race): only the uncommitted page is lost; resume from the saved progress.
                log.info("sync %s: page raced with another sync (%s); resuming", source, type(exc.orig).__name__)
                run.full = False  # the cursor was already reset and committed by the first attempt
                continue
            _record_error(session, user_id, source, exc)
            raise
    return run.stats.as_dict()


def _record_error(session: Session, user_id: int, source: str, exc: BaseException) -> None:
    if not isinstance(exc, Exception):
        return
    try:
        state = session.scalar(select(SyncState).where(SyncState.user_id == user_id, SyncState.source == source))
        if state is not None:
            state.last_error = f"{type(exc).__name__}: {exc}"[:2000]
            session.commit()
    except Exception:  # noqa: BLE001 - never hide the original error
        session.rollback()


def preview(session: Session, settings: Settings, user_id: int, sources: Iterable[str], credentials, *,
            full: bool = False, since: datetime | None = None, create: str | None = None) -> dict:
    """What a run would create and change, per source, with a sample; everything is rolled back."""
    from omnicrm.sync.upsert import SyncRun, create_mode

    report: dict = {"sources": {}, "sample": []}
    for source in check_sources(sources):
        run = SyncRun(session=session, settings=settings, user_id=user_id, source=source,
                      credentials=credentials, full=full, since=since, mode=create_mode(create), dry_run=True)
        try:
            _runner(source)(run)
            report["sources"][source] = run.stats.as_dict()
            report["sample"].extend(run.stats.sample)
        finally:
            session.rollback()
    totals = {key: sum(s[key] for s in report["sources"].values())
              for key in ("contacts_created", "contacts_updated", "interactions_created", "interactions_updated",
                          "interactions_removed", "links_removed")}
    report["totals"] = totals
    report["sample"] = report["sample"][:10]
    return report


# --- the job handler -----------------------------------------------------------------------------

def sync_job(ctx) -> dict:
    """Job handler for `sync:gmail`, `sync:calendar` and `sync:contacts` (payload: full, since, create)."""
    from omnicrm.google import auth

    source = ctx.kind[len(KIND_PREFIX):]
    payload = ctx.payload or {}
    with ctx.session() as session:
        credentials = auth.load_credentials(session, ctx.settings, ctx.user_id)
        token = credentials.token
        try:
            stats = run_source(session, ctx.settings, ctx.user_id, source, credentials,
                               full=bool(payload.get("full")), since=parse_since(payload.get("since")),
                               create=payload.get("create"), heartbeat=ctx.heartbeat)
        except AuthorizationNeeded as exc:
            from omnicrm.google.clients import ScopeMissing

            if isinstance(exc, ScopeMissing):  # the grant is fine, it lacks a scope
                raise
            # The access token was refused after a refresh: check the grant (marks it on invalid_grant).
            try:
                auth.load_credentials(session, ctx.settings, ctx.user_id, force_refresh=True)
            except OmniCrmError:
                pass
            raise
        finally:
            if credentials.token != token:  # refreshed by the API client on a 401: keep the new token
                try:
                    auth.save_refreshed(session, ctx.settings, ctx.user_id, credentials)
                    session.commit()
                except OmniCrmError:
                    session.rollback()
        if source == "gmail":
            _remember_account(session, ctx.user_id)
    return stats


def _remember_account(session: Session, user_id: int) -> None:
    from omnicrm.google import auth

    state = session.scalar(select(SyncState).where(SyncState.user_id == user_id, SyncState.source == "gmail"))
    account = (state.cursor or "").partition(" ")[2] if state else ""
    if account:
        auth.set_account_email(session, user_id, account)
        session.commit()


def register_handlers(register: Callable) -> None:
    for source in SOURCES:
        register(job_kind(source), sync_job)


# --- sync run ------------------------------------------------------------------------------------

@dataclass
class RunReport:
    """Outcome of `sync run`: one row per user and source."""

    rows: list[dict] = field(default_factory=list)
    enqueued: bool = False

    @property
    def exit_code(self) -> int:
        """0 all fine (or queued), 1 all failed, 3 authorization needed, 4 some failed."""
        fine = {"done", "queued", "running"} if self.enqueued else {"done"}
        failed = [r for r in self.rows if r["status"] not in fine]
        if not failed:
            return 0
        if len(failed) < len(self.rows):
            return 4
        return 3 if all(r.get("auth") for r in failed) else 1


def sync_users(session: Session, settings: Settings, all_users: bool) -> list[tuple[int, str]]:
    """The users a run covers: the acting user, or with --all-users everyone with a stored Google grant."""
    if not all_users:
        from omnicrm.db import user_id

        uid = user_id(session, settings.user)
        session.commit()
        return [(uid, settings.user)]
    rows = session.execute(select(User.id, User.name).join(Credential, Credential.user_id == User.id)
                           .order_by(User.name)).all()
    return [(uid, name) for uid, name in rows]


def run_sync(settings: Settings, *, sources: Iterable[str] | None = None, full: bool = False,
             enqueue: bool = False, all_users: bool = False, since: str | None = None,
             create: str | None = None, workers: int | None = None) -> RunReport:
    """`sync run`: one job per user and source, run here in parallel (or queued with `enqueue`)."""
    from omnicrm import jobs
    from omnicrm.db import session_scope
    from omnicrm.google import auth
    from omnicrm.sync.upsert import create_mode

    chosen = check_sources(sources)
    parse_since(since)
    if create is not None:
        create_mode(create)
    payload = {"full": full, **({"since": since} if since else {}), **({"create": create} if create else {})}
    report = RunReport(enqueued=enqueue)
    job_ids: list[int] = []
    with session_scope(settings) as session:
        users = sync_users(session, settings, all_users)
        for uid, name in users:
            row = session.scalar(select(Credential).where(Credential.user_id == uid))
            if row is None or row.status != "ok":
                if not all_users:
                    auth.load_credentials(session, settings, uid)  # raises AuthorizationNeeded (exit 3)
                for source in chosen:
                    report.rows.append({"user": name, "source": source, "job_id": None, "status": "failed",
                                        "auth": True, "error": "Google authorization needed"})
                continue
            for source in chosen:
                job = jobs.enqueue(session, uid, job_kind(source), payload,
                                   idempotency_key=exclusive_key(uid, source) if enqueue else None,
                                   exclusive_key=exclusive_key(uid, source), max_attempts=None if enqueue else 1)
                job_ids.append(job.id)
                report.rows.append({"user": name, "source": source, "job_id": job.id, "status": job.status})
        session.commit()
    if enqueue:
        jobs.deliver(settings, [r["job_id"] for r in report.rows if r["job_id"] and r["status"] == "queued"])
        return report
    # At most FOREGROUND_WORKERS at once: each holds a database connection (the pool has 15).
    parallel = workers or max(1, min(len(job_ids), FOREGROUND_WORKERS))
    finished = {job.id: job for job in jobs.run_foreground(settings, job_ids, parallel)}
    for row in report.rows:
        job = finished.get(row["job_id"])
        if job is None:
            continue
        row["status"] = job.status
        row["error"] = job.last_error
        # AuthorizationNeeded (and its ScopeMissing) always end with the reconnect advice.
        row["auth"] = bool(job.last_error and "omnicrm google connect" in job.last_error)
        row["result"] = job.result
    return report


def raise_for(report: RunReport) -> None:
    """Turn a finished run's outcome into the SPEC's exit code."""
    code = report.exit_code
    if code == 0:
        return
    failed = [r for r in report.rows if r["status"] != "done"]
    summary = "; ".join(f"{r['user']}/{r['source']}: {r.get('error') or r['status']}" for r in failed)
    if code == 3:
        raise AuthorizationNeeded(f"Google authorization needed ({summary})")
    if code == 4:
        raise PartialSuccess(f"some syncs failed: {summary}")
    raise OmniCrmError(f"sync failed: {summary}")


# --- status --------------------------------------------------------------------------------------

STATUS_FIELDS = ["source", "connected", "last_success_at", "last_error", "items_synced", "cursor_age_seconds",
                 "in_progress", "job"]


def sync_status(session: Session, user_id: int, now: datetime | None = None) -> list[dict]:
    """Per source: connected, last success, last error, items synced, cursor age, running/queued job."""
    now = now or clock_now()
    credential = session.scalar(select(Credential).where(Credential.user_id == user_id))
    connected = credential is not None and credential.status == "ok"
    states = {s.source: s for s in session.scalars(select(SyncState).where(SyncState.user_id == user_id))}
    jobs = {}
    for job in session.scalars(select(Job).where(Job.user_id == user_id, Job.kind.in_([job_kind(s) for s in SOURCES]),
                                                 Job.status.in_(("queued", "running"))).order_by(Job.id)):
        jobs.setdefault(job.kind[len(KIND_PREFIX):], f"{job.id} {job.status}")
    rows = []
    for source in SOURCES:
        state = states.get(source)
        rows.append({
            "source": source,
            "connected": connected,
            "last_success_at": state.last_success_at if state else None,
            "last_error": state.last_error if state else None,
            "items_synced": state.items_synced if state else 0,
            "cursor_age_seconds": int((now - state.cursor_at).total_seconds()) if state and state.cursor_at else None,
            "in_progress": bool(state and state.progress),
            "job": jobs.get(source),
        })
    return rows


def counts(session: Session, user_id: int) -> dict:
    """Contacts and interactions of a user (for summaries)."""
    return {"contacts": session.scalar(select(func.count()).select_from(Contact).where(Contact.user_id == user_id)),
            "interactions": session.scalar(select(func.count()).select_from(Interaction)
                                           .where(Interaction.user_id == user_id))}
