"""The relationship score: 0-100 from recency, frequency and reciprocity of interactions.

    score = recency + frequency + reciprocity, rounded to an integer

    recency     = 50 * 30 / (30 + d)     d = days since the last interaction (0 if it is in the future);
                                         0 when there has never been one. Half (25) at 30 days, 10 at 120.
    frequency   = 30 * n / (n + 10)      n = number of interactions (emails, meetings, notes).
                                         15 at 10 interactions, 24 at 40.
    reciprocity = 20 * 2 * min(i, o) / (i + o)
                                         i / o = inbound / outbound interactions; 20 when balanced,
                                         0 when one-sided or when none has a direction.

Each part only grows with recency, frequency and balance, so the score is monotonic in each; it stays
below 100. The same formula exists twice: in Python (`relationship_score`, for records) and in SQL
(`score_expression`, for `--sort score`); `last_interaction_at` and the three counters on `contacts`
are kept current by `contacts.refresh_last_interaction` on every path that writes interactions.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Float, case, cast, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from omnicrm.models import Contact, UTCDateTime

RECENCY_MAX = 50.0
RECENCY_HALF_DAYS = 30.0
FREQUENCY_MAX = 30.0
FREQUENCY_HALF = 10.0
RECIPROCITY_MAX = 20.0


def score_parts(last: datetime | None, count: int, inbound: int, outbound: int, now: datetime) -> dict:
    """The three parts of the score (floats) for these figures."""
    if last is None:
        recency = 0.0
    else:
        days = max(0.0, (now - last).total_seconds() / 86400)
        recency = RECENCY_MAX * RECENCY_HALF_DAYS / (RECENCY_HALF_DAYS + days)
    count = count or 0
    frequency = FREQUENCY_MAX * count / (count + FREQUENCY_HALF)
    inbound, outbound = inbound or 0, outbound or 0
    both = inbound + outbound
    reciprocity = RECIPROCITY_MAX * 2 * min(inbound, outbound) / both if both else 0.0
    return {"recency": recency, "frequency": frequency, "reciprocity": reciprocity}


def relationship_score(contact: Contact, now: datetime) -> int:
    """The contact's score (0-100) at `now`."""
    parts = score_parts(contact.last_interaction_at, contact.interaction_count, contact.inbound_count,
                        contact.outbound_count, now)
    return max(0, min(100, round(sum(parts.values()))))


class days_since(FunctionElement):
    """Days (fractional) from a UTCDateTime column to `now`; NULL when the column is NULL."""

    type = Float()
    inherit_cache = True


@compiles(days_since, "sqlite")
def _days_since_sqlite(element, compiler, **kw):
    now, column = list(element.clauses)
    return f"(julianday({compiler.process(now, **kw)}) - julianday({compiler.process(column, **kw)}))"


@compiles(days_since)
def _days_since_default(element, compiler, **kw):  # PostgreSQL
    now, column = list(element.clauses)
    return (f"(EXTRACT(EPOCH FROM ({compiler.process(now, **kw)} - {compiler.process(column, **kw)}))"
            f" / 86400.0)")


def score_expression(now: datetime) -> ColumnElement[float]:
    """The unrounded score as SQL over the contacts table (for ordering)."""
    days = days_since(literal(now, UTCDateTime()), Contact.last_interaction_at)
    clamped = case((days < 0, 0.0), else_=days)
    recency = case((Contact.last_interaction_at.is_(None), 0.0),
                   else_=RECENCY_MAX * RECENCY_HALF_DAYS / (RECENCY_HALF_DAYS + clamped))
    count = cast(Contact.interaction_count, Float)
    frequency = FREQUENCY_MAX * count / (count + FREQUENCY_HALF)
    inbound, outbound = cast(Contact.inbound_count, Float), cast(Contact.outbound_count, Float)
    reciprocity = case((Contact.inbound_count + Contact.outbound_count == 0, 0.0),
                       else_=RECIPROCITY_MAX * 2 * least_(inbound, outbound) / (inbound + outbound))
    return recency + frequency + reciprocity


class least_(FunctionElement):
    """min(a, b): LEAST on PostgreSQL, two-argument MIN on SQLite."""

    type = Float()
    inherit_cache = True


@compiles(least_, "sqlite")
def _least_sqlite(element, compiler, **kw):
    return f"min({compiler.process(element.clauses, **kw)})"


@compiles(least_)
def _least_default(element, compiler, **kw):
    return f"LEAST({compiler.process(element.clauses, **kw)})"
