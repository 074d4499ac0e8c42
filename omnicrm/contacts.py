"""Contact services: plain functions over a session; the caller commits."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Iterable, Iterator, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, selectinload

from omnicrm.config import now as clock_now
from omnicrm.errors import InvalidInput, NotFound
from omnicrm.filters import ContactFilter, apply_filter, normalise_tag, order_by, resolve_tags
from omnicrm.models import (Contact, ContactEmail, ContactPhone, ContactTag, ExternalLink, Interaction, Note,
                            Tag)
from omnicrm.normalize import clean_text, is_valid_email, normalise_email, normalise_phone, search_text, to_e164
from omnicrm.search_index import count_matches
from omnicrm.score import relationship_score

# Field names of a contact record, in output order; `email`/`phone`/`tags` hold lists (primary first).
FIELDS = ["id", "display_name", "email", "phone", "company", "title", "tags", "notes",
          "created_at", "updated_at", "last_interaction_at"]
TABLE_FIELDS = ["id", "display_name", "email", "phone", "company", "tags"]
# Computed at read time, shown only when asked for (`--fields …,score`).
COMPUTED_FIELDS = ["score"]
ALL_FIELDS = FIELDS + COMPUTED_FIELDS
EDITABLE = ("display_name", "company", "title")
PAGE_SIZE_MAX = 200
PAGE_MAX = 100_000
TEXT_MAX = 10_000
ID_MAX = 2**63 - 1  # ids are 64-bit integers


def _eager(stmt):
    return stmt.options(selectinload(Contact.emails), selectinload(Contact.phones),
                        selectinload(Contact.tags), selectinload(Contact.notes))


def record(contact: Contact, now: datetime | None = None) -> dict:
    """A contact as a flat dict with the stable field names of ALL_FIELDS (score as of `now`)."""
    return {
        "id": contact.id,
        "display_name": contact.display_name,
        "email": [e.email for e in contact.emails],
        "phone": [p.value for p in contact.phones],
        "company": contact.company,
        "title": contact.title,
        "tags": sorted(t.name for t in contact.tags),
        "notes": "\n".join(n.body for n in contact.notes) or None,
        "created_at": contact.created_at,
        "updated_at": contact.updated_at,
        "last_interaction_at": contact.last_interaction_at,
        "score": relationship_score(contact, now or clock_now()),
    }


def check_fields(fields: str | None, default: Sequence[str], known: Sequence[str] = ALL_FIELDS) -> list[str]:
    if not fields:
        return list(default)
    chosen = [f.strip() for f in fields.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in known]
    if unknown or not chosen:
        raise InvalidInput(f"--fields: unknown field(s) {', '.join(unknown) or '(none given)'}; "
                           f"known: {', '.join(known)}")
    return chosen


def _text(value: str | None, option: str) -> str | None:
    value = clean_text(value)
    if value is not None and len(value) > TEXT_MAX:
        raise InvalidInput(f"{option}: longer than {TEXT_MAX} characters")
    return value


def refresh_search_text(contact: Contact) -> None:
    contact.search_text = search_text(contact.display_name, contact.company,
                                      [e.email for e in contact.emails],
                                      [(p.raw, p.e164) for p in contact.phones])


def valid_email(value: str, option: str = "--email") -> str:
    email = normalise_email(value)
    if not is_valid_email(email):
        raise InvalidInput(f"{option}: {value.strip()!r} is not a valid email address")
    return email


def _email_owner(session: Session, user_id: int, email: str) -> int | None:
    return session.scalar(select(ContactEmail.contact_id).where(
        ContactEmail.user_id == user_id, ContactEmail.email == email))


def add_email(session: Session, contact: Contact, value: str, option: str = "--email") -> bool:
    """Attach an email; False when the contact already has it. Another contact's email is an error."""
    email = valid_email(value, option)
    if any(e.email == email for e in contact.emails):
        return False
    owner = _email_owner(session, contact.user_id, email)
    if owner is not None and owner != contact.id:
        raise InvalidInput(f"{option}: {email} already belongs to contact {owner}")
    position = max((e.position for e in contact.emails), default=-1) + 1
    contact.emails.append(ContactEmail(user_id=contact.user_id, email=email, position=position))
    return True


def add_phone(contact: Contact, raw: str, region: str) -> bool:
    raw = normalise_phone(raw)
    if not raw:
        raise InvalidInput("--phone: a phone number cannot be empty")
    if len(raw) > 100:
        raise InvalidInput(f"--phone: {raw[:20]!r}… is longer than 100 characters")
    e164 = to_e164(raw, region)
    if any((e164 and p.e164 == e164) or p.raw == raw for p in contact.phones):
        return False
    position = max((p.position for p in contact.phones), default=-1) + 1
    contact.phones.append(ContactPhone(user_id=contact.user_id, raw=raw, e164=e164, position=position))
    return True


def get_tag(session: Session, user_id: int, name: str) -> Tag:
    name = normalise_tag(name)
    if not name:
        raise InvalidInput("--tag: a tag cannot be empty")
    if len(name) > 200:
        raise InvalidInput("--tag: longer than 200 characters")
    tag = session.scalar(select(Tag).where(Tag.user_id == user_id, Tag.name == name))
    if tag is None:
        tag = Tag(user_id=user_id, name=name)
        session.add(tag)
        session.flush()
    return tag


def add_tag(session: Session, contact: Contact, name: str) -> bool:
    tag = get_tag(session, contact.user_id, name)
    if tag in contact.tags:
        return False
    contact.tags.append(tag)
    return True


def add_contact(session: Session, user_id: int, *, name: str | None, emails: Iterable[str] = (),
                phones: Iterable[str] = (), company: str | None = None, title: str | None = None,
                tags: Iterable[str] = (), note: str | None = None, region: str = "US") -> Contact:
    """Create a contact; it needs a name or an email. Fields given here count as set by hand."""
    contact = Contact(user_id=user_id, display_name=_text(name, "--name"),
                      company=_text(company, "--company"), title=_text(title, "--title"))
    emails, phones, tags = list(emails), list(phones), list(tags)
    if not contact.display_name and not emails:
        raise InvalidInput("--name: a contact needs a name or an --email")
    contact.manual_fields = ",".join(f for f in EDITABLE if getattr(contact, f))
    session.add(contact)
    for email in emails:
        add_email(session, contact, email)
    for phone in phones:
        add_phone(contact, phone, region)
    for tag in tags:
        add_tag(session, contact, tag)
    if note:
        add_note(session, contact, note)
    refresh_search_text(contact)
    session.flush()
    return contact


def resolve(session: Session, user_id: int, ref: str) -> Contact:
    """A contact of this user by id or by any of its emails; anything else is "not found"."""
    ref = ref.strip()
    stmt = _eager(select(Contact)).where(Contact.user_id == user_id)
    if ref.isascii() and ref.isdigit():
        if int(ref) > ID_MAX:  # no such row; the driver would overflow on it
            raise NotFound(f"contact {ref!r} not found")
        stmt = stmt.where(Contact.id == int(ref))
    elif "@" in ref:
        stmt = stmt.where(Contact.id == select(ContactEmail.contact_id).where(
            ContactEmail.user_id == user_id, ContactEmail.email == normalise_email(ref)).scalar_subquery())
    else:
        raise NotFound(f"contact {ref!r} not found (give an id or an email)")
    contact = session.scalar(stmt)
    if contact is None:
        raise NotFound(f"contact {ref!r} not found")
    return contact


def update_contact(session: Session, contact: Contact, *, name: str | None = None, company: str | None = None,
                   title: str | None = None, add_emails: Iterable[str] = (), remove_emails: Iterable[str] = (),
                   add_phones: Iterable[str] = (), remove_phones: Iterable[str] = (),
                   add_tags: Iterable[str] = (), remove_tags: Iterable[str] = (), region: str = "US") -> bool:
    """Apply a manual edit; edited fields become hand-set (sync leaves them alone). True if anything changed."""
    changed = False
    manual = set(filter(None, contact.manual_fields.split(",")))
    for field_name, value, option in (("display_name", name, "--name"), ("company", company, "--company"),
                                      ("title", title, "--title")):
        if value is None:
            continue
        value = _text(value, option)
        if field_name == "display_name" and not value and not contact.emails:
            raise InvalidInput("--name: cannot clear the name of a contact without emails")
        if getattr(contact, field_name) != value:
            setattr(contact, field_name, value)
            changed = True
        manual.add(field_name)
    for value in remove_emails:
        email = normalise_email(value)
        match = next((e for e in contact.emails if e.email == email), None)
        if match is None:
            raise InvalidInput(f"--remove-email: contact {contact.id} has no email {email}")
        contact.emails.remove(match)
        changed = True
    for value in add_emails:
        changed |= add_email(session, contact, value)
    for value in remove_phones:
        raw = normalise_phone(value)
        e164 = to_e164(raw, region)
        match = next((p for p in contact.phones if p.raw == raw or (e164 and p.e164 == e164)), None)
        if match is None:
            raise InvalidInput(f"--remove-phone: contact {contact.id} has no phone {raw}")
        contact.phones.remove(match)
        changed = True
    for value in add_phones:
        changed |= add_phone(contact, value, region)
    for value in remove_tags:
        match = next((t for t in contact.tags if t.name == normalise_tag(value)), None)
        if match is not None:
            contact.tags.remove(match)
            changed = True
    for value in add_tags:
        changed |= add_tag(session, contact, value)
    if not contact.display_name and not contact.emails:
        raise InvalidInput("--remove-email: a contact needs a name or an email")
    for i, email in enumerate(contact.emails):
        email.position = i
    for i, phone in enumerate(contact.phones):
        phone.position = i
    contact.manual_fields = ",".join(sorted(manual))
    if changed:
        contact.updated_at = clock_now()
        refresh_search_text(contact)
    session.flush()
    return changed


def add_note(session: Session, contact: Contact, body: str) -> Note:
    """A free-text note; it also appears on the timeline as a `note` interaction."""
    body = (body or "").strip()
    if not body:
        raise InvalidInput("TEXT: a note cannot be empty")
    if len(body) > 100_000:
        raise InvalidInput("TEXT: a note is limited to 100,000 characters")
    note = Note(user_id=contact.user_id, body=body, created_at=clock_now())
    contact.notes.append(note)
    session.flush()
    record_interaction(session, contact.user_id, contact.id, kind="note", direction=None,
                       occurred_at=note.created_at, subject=body.splitlines()[0][:200],
                       source="note", external_id=str(note.id))
    return note


def record_interaction(session: Session, user_id: int, contact_id: int, *, kind: str, direction: str | None,
                       occurred_at: datetime, subject: str | None, source: str, external_id: str) -> bool:
    """Insert an interaction unless (user, source, external_id) exists; keeps last_interaction_at current."""
    exists = session.scalar(select(Interaction.id).where(
        Interaction.user_id == user_id, Interaction.source == source, Interaction.external_id == external_id))
    if exists is not None:
        return False
    session.add(Interaction(user_id=user_id, contact_id=contact_id, kind=kind, direction=direction,
                            occurred_at=occurred_at, subject=subject, source=source, external_id=external_id))
    session.flush()
    refresh_last_interaction(session, [contact_id])
    return True


def refresh_last_interaction(session: Session, contact_ids: Iterable[int]) -> None:
    """Recompute last_interaction_at and the score counters (omnicrm/score.py) from the interactions.

    Every path that adds, moves or removes interactions calls this for the contacts it touched.
    """
    def of_contact(*extra):
        return (select(func.count()).select_from(Interaction)
                .where(Interaction.contact_id == Contact.id, *extra).correlate(Contact).scalar_subquery())

    ids = sorted(set(contact_ids))
    for start in range(0, len(ids), 500):
        latest = (select(func.max(Interaction.occurred_at)).where(Interaction.contact_id == Contact.id)
                  .correlate(Contact).scalar_subquery())
        session.execute(update(Contact).where(Contact.id.in_(ids[start:start + 500])).values(
            last_interaction_at=latest, interaction_count=of_contact(),
            inbound_count=of_contact(Interaction.direction == "in"),
            outbound_count=of_contact(Interaction.direction == "out")))


def timeline(session: Session, contact: Contact, limit: int | None = None) -> list[dict]:
    """The contact's interactions, newest first."""
    stmt = (select(Interaction).where(Interaction.user_id == contact.user_id,
                                      Interaction.contact_id == contact.id)
            .order_by(Interaction.occurred_at.desc(), Interaction.id.desc()))
    if limit:
        stmt = stmt.limit(limit)
    return [{"id": i.id, "kind": i.kind, "direction": i.direction, "occurred_at": i.occurred_at,
             "subject": i.subject, "source": i.source, "external_id": i.external_id}
            for i in session.scalars(stmt)]


TIMELINE_FIELDS = ["id", "kind", "direction", "occurred_at", "subject", "source", "external_id"]


@dataclass
class Page:
    items: list[Contact]
    total: int
    page: int
    page_size: int
    exact: bool = True  # False: `total` is a lower bound (a filtered count stops at search_index.COUNT_CAP)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))


def check_paging(page: int, page_size: int) -> None:
    if not 1 <= page_size <= PAGE_SIZE_MAX:
        raise InvalidInput(f"--page-size: must be between 1 and {PAGE_SIZE_MAX} (got {page_size})")
    if not 1 <= page <= PAGE_MAX:
        raise InvalidInput(f"--page: must be between 1 and {PAGE_MAX} (got {page})")


def list_contacts(session: Session, user_id: int, flt: ContactFilter, *, sort: str = "created",
                  order: str = "desc", page: int = 1, page_size: int = 50,
                  now: datetime | None = None) -> Page:
    check_paging(page, page_size)
    now = now or clock_now()
    ordering = order_by(sort, order, now)
    flt = resolve_tags(session, user_id, flt.validate())
    ids = apply_filter(select(Contact.id), user_id, flt, now)
    total, exact = count_matches(session, ids, page=page, page_size=page_size)
    if not exact and not flt.empty:
        flt = replace(flt, many=True)  # walk the sort index rather than fetch every match
    stmt = _eager(apply_filter(select(Contact), user_id, flt, now)).order_by(*ordering)
    items = list(session.scalars(stmt.limit(page_size).offset((page - 1) * page_size)))
    return Page(items=items, total=total, page=page, page_size=page_size, exact=exact)


def iter_contacts(session: Session, user_id: int, flt: ContactFilter, *, sort: str = "created",
                  order: str = "asc", now: datetime | None = None, batch: int = 1000) -> Iterator[Contact]:
    """Every match, streamed in id batches (constant memory)."""
    now = now or clock_now()
    ordering = order_by(sort, order, now)
    ids = session.scalars(apply_filter(select(Contact.id), user_id, flt.validate(), now).order_by(*ordering))
    chunk: list[int] = []
    for contact_id in ids:
        chunk.append(contact_id)
        if len(chunk) >= batch:
            yield from _load_in_order(session, chunk)
            chunk = []
    if chunk:
        yield from _load_in_order(session, chunk)


def _load_in_order(session: Session, ids: list[int]) -> list[Contact]:
    by_id = {c.id: c for c in session.scalars(_eager(select(Contact)).where(Contact.id.in_(ids)))}
    return [by_id[i] for i in ids if i in by_id]


def matching_ids(session: Session, user_id: int, flt: ContactFilter, now: datetime | None = None) -> list[int]:
    stmt = apply_filter(select(Contact.id), user_id, flt.validate(), now or clock_now()).order_by(Contact.id)
    return list(session.scalars(stmt))


def delete_contacts(session: Session, user_id: int, ids: Sequence[int]) -> int:
    """Delete these contacts of this user (with everything attached); returns how many went."""
    total = 0
    for start in range(0, len(ids), 500):
        chunk = list(ids[start:start + 500])
        for table in (ContactEmail, ContactPhone, Note, Interaction, ExternalLink):
            session.execute(delete(table).where(table.user_id == user_id, table.contact_id.in_(chunk)))
        session.execute(delete(ContactTag).where(ContactTag.contact_id.in_(
            select(Contact.id).where(Contact.user_id == user_id, Contact.id.in_(chunk)))))
        result = session.execute(delete(Contact).where(Contact.user_id == user_id, Contact.id.in_(chunk)))
        total += result.rowcount or 0
    session.expire_all()
    return total


def list_tags(session: Session, user_id: int) -> list[dict]:
    stmt = (select(Tag.name, func.count(ContactTag.contact_id))
            .outerjoin(ContactTag, ContactTag.tag_id == Tag.id)
            .where(Tag.user_id == user_id).group_by(Tag.id, Tag.name).order_by(Tag.name))
    return [{"tag": name, "contacts": count} for name, count in session.execute(stmt)]


def rename_tag(session: Session, user_id: int, old: str, new: str) -> int:
    """Rename a tag; renaming onto an existing tag merges the two. Returns contacts affected."""
    source = session.scalar(select(Tag).where(Tag.user_id == user_id, Tag.name == normalise_tag(old)))
    if source is None:
        raise NotFound(f"tag {normalise_tag(old)!r} not found")
    target_name = normalise_tag(new)
    if not target_name:
        raise InvalidInput("NEW: a tag cannot be empty")
    if len(target_name) > 200:
        raise InvalidInput("NEW: longer than 200 characters")
    members = list(session.scalars(select(ContactTag.contact_id).where(ContactTag.tag_id == source.id)))
    if target_name == source.name:
        return len(members)
    target = session.scalar(select(Tag).where(Tag.user_id == user_id, Tag.name == target_name))
    if target is None:
        source.name = target_name
    else:
        have = set(session.scalars(select(ContactTag.contact_id).where(ContactTag.tag_id == target.id)))
        for contact_id in members:
            if contact_id not in have:
                session.add(ContactTag(contact_id=contact_id, tag_id=target.id))
        session.execute(delete(ContactTag).where(ContactTag.tag_id == source.id))
        session.delete(source)
    session.flush()
    return len(members)
