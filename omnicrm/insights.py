"""Relationship insights: the score (see omnicrm/score.py) and who is overdue for a follow-up.

A contact is due for a follow-up when the silence since the last interaction is much longer than
their usual cadence:

- cadence   = the median gap, in days, between consecutive days with an interaction, over the last
              `CADENCE_GAPS` gaps (several emails on one day count once). It needs at least
              `MIN_GAPS` gaps (three separate days of contact), and is at least one day.
- overdue   = silence >= `OVERDUE_FACTOR` x cadence and silence >= `MIN_SILENCE_DAYS`.
- ranking   = by silence / cadence (most overdue first), then by relationship score, then id.

Interactions dated in the future (a scheduled meeting) count as contact, so such a contact is never due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import median
from typing import Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from omnicrm.models import Contact, ContactEmail, Interaction
from omnicrm.score import relationship_score, score_parts  # noqa: F401  (re-exported)

CADENCE_GAPS = 12
MIN_GAPS = 2
OVERDUE_FACTOR = 2.0
MIN_SILENCE_DAYS = 7

FOLLOW_UP_FIELDS = ["id", "display_name", "email", "usual_every_days", "days_since", "last_interaction_at",
                    "overdue_ratio", "score", "reason"]
FOLLOW_UP_TABLE_FIELDS = ["id", "display_name", "score", "reason"]


@dataclass(frozen=True)
class FollowUp:
    contact_id: int
    display_name: str | None
    email: str | None
    usual_every_days: int
    days_since: int
    last_interaction_at: datetime
    overdue_ratio: float
    score: int

    @property
    def reason(self) -> str:
        return (f"usually every {_days(self.usual_every_days)}; "
                f"last contact {_days(self.days_since)} ago")

    def record(self) -> dict:
        return {"id": self.contact_id, "display_name": self.display_name, "email": self.email,
                "usual_every_days": self.usual_every_days, "days_since": self.days_since,
                "last_interaction_at": self.last_interaction_at, "overdue_ratio": self.overdue_ratio,
                "score": self.score, "reason": self.reason}


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def cadence_days(moments: list[datetime]) -> float | None:
    """Median gap in days between the distinct days of `moments` (any order); None without enough history."""
    days = sorted({m.date() for m in moments})[-(CADENCE_GAPS + 1):]
    gaps = [(b - a).days for a, b in zip(days, days[1:])]
    if len(gaps) < MIN_GAPS:
        return None
    return max(1.0, float(median(gaps)))


def follow_ups(session: Session, user_id: int, now: datetime, limit: int | None = None) -> list[FollowUp]:
    """Contacts of this user whose silence is much longer than their usual cadence, most overdue first."""
    if limit is not None and limit < 1:
        from omnicrm.errors import InvalidInput

        raise InvalidInput("--limit: must be at least 1")
    cutoff = now - timedelta(days=MIN_SILENCE_DAYS)
    # Counted from the interactions themselves (not the stored counters) so a bulk writer that only
    # keeps last_interaction_at current still gets its contacts considered.
    enough_history = (select(Interaction.contact_id).where(Interaction.user_id == user_id)
                      .group_by(Interaction.contact_id).having(func.count() >= MIN_GAPS + 1))
    candidates = (select(Contact).where(Contact.user_id == user_id, Contact.last_interaction_at < cutoff,
                                        Contact.id.in_(enough_history)))
    found: list[FollowUp] = []
    by_id = {c.id: c for c in session.scalars(candidates)}
    for contact_id, moments in _interaction_times(session, user_id, list(by_id)):
        contact = by_id[contact_id]
        cadence = cadence_days(moments)
        if cadence is None:
            continue
        last = max(moments)
        silence = (now - last).total_seconds() / 86400
        if silence < MIN_SILENCE_DAYS or silence < OVERDUE_FACTOR * cadence:
            continue
        found.append(FollowUp(contact_id=contact.id, display_name=contact.display_name, email=None,
                              usual_every_days=round(cadence), days_since=int(silence),
                              last_interaction_at=last, overdue_ratio=round(silence / cadence, 2),
                              score=relationship_score(contact, now)))
    found.sort(key=lambda f: (-f.overdue_ratio, -f.score, f.contact_id))
    if limit is not None:
        found = found[:limit]
    emails = _primary_emails(session, user_id, [f.contact_id for f in found])
    return [FollowUp(**{**f.__dict__, "email": emails.get(f.contact_id)}) for f in found]


def count_follow_ups(session: Session, user_id: int, now: datetime) -> int:
    return len(follow_ups(session, user_id, now))


def _interaction_times(session: Session, user_id: int, contact_ids: list[int]
                       ) -> Iterator[tuple[int, list[datetime]]]:
    """(contact id, its interaction times) for these contacts, in chunks."""
    for start in range(0, len(contact_ids), 500):
        chunk = contact_ids[start:start + 500]
        grouped: dict[int, list[datetime]] = {}
        rows = session.execute(select(Interaction.contact_id, Interaction.occurred_at).where(
            Interaction.user_id == user_id, Interaction.contact_id.in_(chunk)))
        for contact_id, occurred_at in rows:
            grouped.setdefault(contact_id, []).append(occurred_at)
        yield from grouped.items()


def _primary_emails(session: Session, user_id: int, contact_ids: list[int]) -> dict[int, str]:
    if not contact_ids:
        return {}
    rows = session.execute(select(ContactEmail.contact_id, ContactEmail.email)
                           .where(ContactEmail.user_id == user_id, ContactEmail.contact_id.in_(contact_ids))
                           .order_by(ContactEmail.contact_id, ContactEmail.position))
    emails: dict[int, str] = {}
    for contact_id, email in rows:
        emails.setdefault(contact_id, email)
    return emails
