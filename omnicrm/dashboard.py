"""The data behind `omnicrm status`: one dict, rendered by the CLI as text (80 columns) or JSON."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from omnicrm.filters import created_range
from omnicrm.insights import count_follow_ups
from omnicrm.models import Contact, Credential, Job, SyncState

SOURCES = ("gmail", "calendar", "contacts")
JOB_STATUSES = ("queued", "running", "done", "failed", "dead")
RECENT = 5


def sync_outcome(state: SyncState | None, running: bool) -> str:
    """never | running | ok | failed for one source."""
    if running:
        return "running"
    if state is None or (state.last_attempt_at is None and state.last_success_at is None):
        return "never"
    if state.last_error and (state.last_success_at is None or (
            state.last_attempt_at is not None and state.last_attempt_at > state.last_success_at)):
        return "failed"
    return "ok" if state.last_success_at else "never"


def status(session: Session, user_id: int, user_name: str, now: datetime) -> dict:
    """Contacts, recent additions, sync per source, jobs by status, Google connection, follow-ups."""
    week_start, _ = created_range("week", now)
    total = session.scalar(select(func.count()).select_from(Contact).where(Contact.user_id == user_id))
    this_week = session.scalar(select(func.count()).select_from(Contact).where(
        Contact.user_id == user_id, Contact.created_at >= week_start))
    recent = session.scalars(select(Contact).options(selectinload(Contact.emails))
                             .where(Contact.user_id == user_id)
                             .order_by(Contact.created_at.desc(), Contact.id.desc()).limit(RECENT))

    jobs = {s: 0 for s in JOB_STATUSES}
    for job_status, count in session.execute(select(Job.status, func.count()).where(Job.user_id == user_id)
                                             .group_by(Job.status)):
        jobs[job_status] = count
    running = set(session.scalars(select(Job.exclusive_key).where(
        Job.user_id == user_id, Job.status == "running", Job.exclusive_key.is_not(None))))
    states = {s.source: s for s in session.scalars(select(SyncState).where(SyncState.user_id == user_id))}
    sync = []
    for source in [*SOURCES, *sorted(set(states) - set(SOURCES))]:
        state = states.get(source)
        sync.append({
            "source": source,
            "outcome": sync_outcome(state, f"sync:{user_id}:{source}" in running),
            "last_attempt_at": state.last_attempt_at if state else None,
            "last_success_at": state.last_success_at if state else None,
            "items_synced": state.items_synced if state else 0,
            "last_error": state.last_error if state else None,
        })

    credential = session.scalar(select(Credential).where(Credential.user_id == user_id))
    if credential is None:
        google = {"connected": False, "status": "not_connected", "account_email": None, "token_expiry": None}
    else:
        google = {"connected": True, "status": credential.status, "account_email": credential.account_email,
                  "token_expiry": credential.token_expiry}

    return {
        "user": user_name,
        "generated_at": now,
        "contacts": {"total": total, "added_this_week": this_week},
        "recent_contacts": [{"id": c.id, "display_name": c.display_name,
                             "email": c.emails[0].email if c.emails else None, "created_at": c.created_at}
                            for c in recent],
        "sync": sync,
        "jobs": jobs,
        "google": google,
        "follow_ups": count_follow_ups(session, user_id, now),
    }
