"""The one filter builder behind `contacts list`, `export` and `delete`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone

from sqlalchemy import Select, func, or_, select

from omnicrm.errors import InvalidInput
from omnicrm.models import Contact, ContactTag, Tag
from omnicrm.normalize import digits, fold, looks_like_phone
from omnicrm.score import score_expression

PERIODS = ("today", "week", "month", "quarter", "year")
SEARCH_MAX = 200


@dataclass(frozen=True)
class ContactFilter:
    search: str | None = None
    created: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    stale: int | None = None
    # The ids of `tags` looked up beforehand (resolve_tags): a literal tag id lets PostgreSQL estimate
    # each tag's size from its statistics and pick the right plan for rare and common tags alike.
    tag_ids: tuple[int, ...] | None = None
    # Known to match many contacts (list_contacts' capped count overflowed): see search_index.not_driving.
    many: bool = False

    @property
    def empty(self) -> bool:
        return not (self.search or self.created or self.tags or self.stale is not None)

    def validate(self) -> "ContactFilter":
        if self.search is not None and not (1 <= len(self.search) <= SEARCH_MAX and self.search.strip()):
            raise InvalidInput(f"--search: must be 1-{SEARCH_MAX} characters (got {len(self.search)})")
        if self.stale is not None and not (0 <= self.stale <= 36500):
            raise InvalidInput("--stale: DAYS must be between 0 and 36500")
        for tag in self.tags:
            if not tag.strip():
                raise InvalidInput("--tag: a tag cannot be empty")
        if self.created is not None:
            created_range(self.created, datetime.now(timezone.utc))
        return self


def _local_midnight(day: date) -> datetime:
    # The zone's offset on `day` itself (a month that began in winter time starts at the winter offset).
    return datetime.combine(day, time.min).astimezone().astimezone(timezone.utc)


def created_range(spec: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """[start, end) in UTC for `today|week|month|quarter|year|FROM..TO` (calendar periods, local time)."""
    today = now.astimezone().date()
    spec = spec.strip()
    if len(spec) > 50:  # no period or date range is this long; do not echo megabytes back
        raise InvalidInput(f"--created: {spec[:20]!r}… is not one of {', '.join(PERIODS)} or FROM..TO (ISO dates)")
    if spec in PERIODS:
        if spec == "today":
            start = today
        elif spec == "week":
            start = today - timedelta(days=today.weekday())
        elif spec == "month":
            start = today.replace(day=1)
        elif spec == "quarter":
            start = today.replace(month=3 * ((today.month - 1) // 3) + 1, day=1)
        else:
            start = today.replace(month=1, day=1)
        return _local_midnight(start), None
    if ".." not in spec:
        raise InvalidInput(f"--created: {spec!r} is not one of {', '.join(PERIODS)} or FROM..TO (ISO dates)")
    left, right = spec.split("..", 1)
    try:
        start = date.fromisoformat(left.strip()) if left.strip() else None
        end = date.fromisoformat(right.strip()) if right.strip() else None
    except ValueError:
        raise InvalidInput(f"--created: {spec!r} is not FROM..TO with ISO dates (YYYY-MM-DD)") from None
    if start and end and end < start:
        raise InvalidInput(f"--created: {spec!r} ends before it starts")
    if not start and not end:
        raise InvalidInput("--created: FROM..TO needs at least one date")
    try:
        return (_local_midnight(start) if start else None,
                _local_midnight(end + timedelta(days=1)) if end else None)
    except (OverflowError, ValueError, OSError):
        raise InvalidInput(f"--created: {spec!r} is out of range") from None


def search_term(query: str) -> str:
    """What a search query is matched against the folded search text with."""
    query = query.strip()
    return digits(query) if looks_like_phone(query) else fold(query)


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search_clause(term: str, many: bool = False):
    """`search_text` contains the folded `term`: FTS5 trigram on SQLite, LIKE + pg_trgm GIN on PostgreSQL,
    a LIKE scan where no index exists or the term is shorter than a trigram (omnicrm/search_index.py)."""
    from omnicrm.search_index import search_match

    return search_match(term, many)


def apply_filter(stmt: Select, user_id: int, flt: ContactFilter, now: datetime) -> Select:
    """Restrict `stmt` (selecting from contacts) to the acting user and the filter."""
    from sqlalchemy import and_, bindparam
    from sqlalchemy.orm import aliased

    from omnicrm.search_index import many_tagged

    stmt = stmt.where(Contact.user_id == user_id)
    if flt.search:
        stmt = stmt.where(search_clause(search_term(flt.search), flt.many))
    if flt.created:
        start, end = created_range(flt.created, now)
        if start:
            stmt = stmt.where(Contact.created_at >= start)
        if end:
            stmt = stmt.where(Contact.created_at < end)
    if flt.tag_ids is not None:
        for tag_id in flt.tag_ids:
            if flt.many:
                stmt = stmt.where(many_tagged(tag_id))
                continue
            # A join on the (contact_id, tag_id) key: streams (a count can stop early), no duplicates.
            # The id inline in the SQL text (literal_execute): a statement psycopg prepares after a few
            # runs must not fall back to PostgreSQL's generic plan, which assumes an average tag size.
            tagged = aliased(ContactTag)
            stmt = stmt.join(tagged, and_(tagged.contact_id == Contact.id,
                                          tagged.tag_id == bindparam(None, int(tag_id), literal_execute=True)))
    for tag in flt.tags if flt.tag_ids is None else ():
        tagged = (select(ContactTag.contact_id).join(Tag, Tag.id == ContactTag.tag_id)
                  .where(Tag.user_id == user_id, Tag.name == normalise_tag(tag)))
        stmt = stmt.where(Contact.id.in_(tagged))
    if flt.stale is not None:
        cutoff = now - timedelta(days=flt.stale)
        stmt = stmt.where(or_(Contact.last_interaction_at.is_(None), Contact.last_interaction_at < cutoff))
    return stmt


def resolve_tags(session, user_id: int, flt: ContactFilter) -> ContactFilter:
    """`flt` with the ids of its tags filled in (an unknown tag becomes id 0, which matches nothing)."""
    from dataclasses import replace

    if not flt.tags or flt.tag_ids is not None:
        return flt
    ids = []
    for tag in flt.tags:
        found = session.scalar(select(Tag.id).where(Tag.user_id == user_id, Tag.name == normalise_tag(tag)))
        ids.append(found if found is not None else 0)
    return replace(flt, tag_ids=tuple(ids))


def normalise_tag(tag: str) -> str:
    """Tags are trimmed and case-insensitive (stored lower-case). A `;` separates tags in a CSV cell, so
    inside one tag it becomes `,` (the tag then survives an export and an import)."""
    return " ".join(tag.replace(";", ",").split()).lower()


SORTS = {
    "name": func.lower(Contact.display_name),
    "created": Contact.created_at,
    "updated": Contact.updated_at,
    "last-contact": Contact.last_interaction_at,
}
# Sorts computed at a moment in time: the relationship score decays with silence (omnicrm/score.py).
TIMED_SORTS = {"score": score_expression}


def order_by(sort: str, order: str, now: datetime | None = None):
    """Stable ordering: the sort column, then id in the same direction; empty values last."""
    if sort not in SORTS and sort not in TIMED_SORTS:
        raise InvalidInput(f"--sort: {sort!r} is not one of {', '.join([*SORTS, *TIMED_SORTS])}")
    if order not in ("asc", "desc"):
        raise InvalidInput(f"--order: {order!r} is not asc or desc")
    if sort in TIMED_SORTS:
        column = TIMED_SORTS[sort](now or datetime.now(timezone.utc))
    else:
        column = SORTS[sort]
    if sort in NOT_NULL_SORTS:
        # No NULLS LAST on a NOT NULL column: PostgreSQL can then walk (user_id, created_at, id) backwards
        # for the default list instead of sorting every match (same order: there are no NULLs).
        if order == "desc":
            return (column.desc(), Contact.id.desc())
        return (column.asc(), Contact.id.asc())
    if order == "desc":
        return (column.desc().nulls_last(), Contact.id.desc())
    return (column.asc().nulls_last(), Contact.id.asc())


NOT_NULL_SORTS = ("created", "updated")
