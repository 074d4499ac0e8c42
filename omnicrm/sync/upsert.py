"""What every source shares: the run context (state, per-page commits, stats) and the contact and
interaction upserts.

Rules (README "sync"): an address that matches any email of the user's contacts attaches to that contact;
new contacts are created according to the create mode; a field listed in `Contact.manual_fields` (set or
edited by hand) is never written by a sync; names from mail headers or calendar attendees only fill an
empty name, names/company/title from Google Contacts replace synced values; emails, phones and tags are
only ever added by a sync, never removed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Callable, Iterable, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from omnicrm import contacts as contact_service
from omnicrm.config import Settings, now as clock_now
from omnicrm.errors import InvalidInput
from omnicrm.models import Contact, ContactEmail, ExternalLink, Interaction, SyncState
from omnicrm.normalize import is_valid_email, normalise_email

log = logging.getLogger("omnicrm.sync")
T = TypeVar("T")

CREATE_MODES = ("all", "wrote-to", "none")
CREATE_MODE_ENV = "OMNICRM_SYNC_CREATE_CONTACTS"
SAMPLE_SIZE = 10
RACE_RETRIES = 5
ADVISORY_SPACE = 72651010  # pg_advisory_xact_lock(space, user id): the per-user sync write lock
CHUNK = 500


def create_mode(value: str | None = None) -> str:
    """all (default) | wrote-to | none — from the option, else OMNICRM_SYNC_CREATE_CONTACTS."""
    mode = (value or os.environ.get(CREATE_MODE_ENV) or "all").strip().lower()
    if mode not in CREATE_MODES:
        raise InvalidInput(f"--create-contacts / {CREATE_MODE_ENV}: {mode!r} is not one of "
                           f"{', '.join(CREATE_MODES)}")
    return mode


def page_size(default: int) -> int:
    """List page size; OMNICRM_SYNC_PAGE_SIZE lowers it (tests use small pages to exercise resumption)."""
    try:
        return max(1, min(default, int(os.environ.get("OMNICRM_SYNC_PAGE_SIZE", default))))
    except ValueError:
        return default


@dataclass
class Stats:
    items: int = 0  # messages / events / people read
    skipped: int = 0  # excluded messages (automated, spam, ...) and events without attendees
    contacts_created: int = 0
    contacts_updated: int = 0
    interactions_created: int = 0
    interactions_updated: int = 0
    interactions_removed: int = 0
    links_removed: int = 0
    pages: int = 0
    mode: str = ""
    sample: list[dict] = field(default_factory=list)

    def as_dict(self, sample: bool = False) -> dict:
        out = asdict(self)
        if not sample:
            out.pop("sample")
        return out


@dataclass
class SyncRun:
    """One source's run for one user: the session, its SyncState row and the page-commit rule."""

    session: Session
    settings: Settings
    user_id: int
    source: str
    credentials: object
    full: bool = False
    since: datetime | None = None
    mode: str = "all"
    dry_run: bool = False
    heartbeat: Callable[[], None] | None = None
    stats: Stats = field(default_factory=Stats)
    state: SyncState | None = None

    def __post_init__(self) -> None:
        self.upsert = Upserter(self)

    def load_state(self) -> SyncState:
        state = self.session.scalar(select(SyncState).where(SyncState.user_id == self.user_id,
                                                            SyncState.source == self.source))
        if state is None:
            state = SyncState(user_id=self.user_id, source=self.source, items_synced=0)
            self.session.add(state)
            self.session.flush()
        self.state = state
        if self.full and (state.progress or {}).get("mode") != "full":
            # (a full run that was interrupted resumes; a preview rolls everything back at the end)
            state.cursor, state.progress = None, None
        if not self.dry_run:
            state.last_attempt_at = clock_now()
            self.commit()
        return state

    def save_progress(self, progress: dict | None) -> None:
        """Record where the run is, together with the page just written (one transaction)."""
        # A deep copy: the JSON column notices only a new, unequal value.
        self.state.progress = json.loads(json.dumps(progress)) if progress is not None else None
        self.stats.pages += 1
        self.commit()

    def finish(self, cursor: str | None) -> None:
        state = self.state
        state.cursor = cursor
        state.cursor_at = clock_now()
        state.progress = None
        state.last_success_at = clock_now()
        state.last_error = None
        state.items_synced = self.stats.items
        self.commit()

    def atomically(self, write: Callable[[], T]) -> T:
        """Run one page's database writes; when they collide with a sync running in parallel (unique
        violation, deadlock), roll the page back and write it again from the data already fetched."""
        import copy
        import random
        import time

        for attempt in range(RACE_RETRIES + 1):
            saved = copy.deepcopy(self.stats)
            try:
                self._lock_writes()
                result = write()
                self.upsert.flush_page()
                return result
            except (IntegrityError, OperationalError) as exc:
                if self.dry_run or attempt == RACE_RETRIES or not _is_race(exc):
                    raise
                log.info("sync %s: page collided with another sync (%s); writing it again", self.source,
                         type(getattr(exc, "orig", exc)).__name__)
                self.session.rollback()
                self.upsert.forget()
                self.stats.__dict__.update(saved.__dict__)
                time.sleep(random.uniform(0.01, 0.1) * (attempt + 1))
        raise AssertionError("unreachable")

    def _lock_writes(self) -> None:
        """PostgreSQL: one writing sync transaction per user at a time (a transaction-scoped advisory
        lock, taken before any write). The sources still fetch from Google in parallel; only their
        short write transactions take turns, which avoids deadlocks between syncs creating the same
        people in different orders. SQLite's BEGIN IMMEDIATE already serialises writers."""
        bind = self.session.get_bind()
        if bind.dialect.name == "postgresql":
            from sqlalchemy import text

            self.session.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"),
                                 {"space": ADVISORY_SPACE, "key": self.user_id % 2_147_483_647})

    def commit(self) -> None:
        self.upsert.flush_page()
        if self.dry_run:
            self.session.flush()
        else:
            self.session.commit()
        if self.heartbeat is not None:
            self.heartbeat()


class Upserter:
    """Contacts by email and interactions by external id, batched per page."""

    def __init__(self, run: SyncRun) -> None:
        self.run = run
        self.session = run.session
        self.user_id = run.user_id
        self.stats = run.stats
        self._ids: dict[str, int] = {}  # email -> contact id (only positive answers are cached)
        self._touched: set[int] = set()
        self._named: set[int] = set()  # contacts whose name needs no filling
        self._tags: dict = {}

    # --- contacts -------------------------------------------------------------------------------
    def prefetch(self, emails: Iterable[str]) -> None:
        wanted = sorted({e for e in emails if e not in self._ids})
        for start in range(0, len(wanted), CHUNK):
            rows = self.session.execute(select(ContactEmail.email, ContactEmail.contact_id).where(
                ContactEmail.user_id == self.user_id, ContactEmail.email.in_(wanted[start:start + CHUNK])))
            for email, contact_id in rows:
                self._ids[email] = contact_id

    def find(self, email: str) -> int | None:
        if email not in self._ids:
            self.prefetch([email])
        return self._ids.get(email)

    def contact_for(self, email: str, name: str | None, *, create: bool) -> int | None:
        """The contact owning `email`; created (named `name`) when missing and `create`."""
        contact_id = self.find(email)
        if contact_id is not None:
            if name:
                self._fill_name(contact_id, name)
            return contact_id
        if not create or not is_valid_email(email):
            return None
        return self._create(email, name)

    def _fill_name(self, contact_id: int, name: str) -> None:
        if contact_id in self._named:
            return
        contact = self.session.get(Contact, contact_id)
        if contact is None or contact.display_name or "display_name" in _manual(contact):
            self._named.add(contact_id)
            return
        self._named.add(contact_id)
        contact.display_name = name
        contact.updated_at = clock_now()
        contact_service.refresh_search_text(contact)
        self.stats.contacts_updated += 1

    def _create(self, email: str, name: str | None, attempt: int = 0) -> int:
        try:
            with self.session.begin_nested():
                contact = Contact(user_id=self.user_id, display_name=name, manual_fields="")
                contact.emails.append(ContactEmail(user_id=self.user_id, email=email, position=0))
                contact_service.refresh_search_text(contact)
                self.session.add(contact)
                self.session.flush()
        except (IntegrityError, OperationalError) as exc:  # another sync created it a moment ago
            if not _is_race(exc):
                raise
            self._ids.pop(email, None)
            found = self.find(email)
            if found is None:
                if attempt < RACE_RETRIES:
                    return self._create(email, name, attempt + 1)
                raise
            return found
        self._ids[email] = contact.id
        if name:
            self._named.add(contact.id)
        self.stats.contacts_created += 1
        if len(self.stats.sample) < SAMPLE_SIZE:
            self.stats.sample.append({"action": "create", "display_name": name, "email": email,
                                      "source": self.run.source})
        return contact.id

    def forget(self) -> None:
        """Drop cached ids (after a rollback)."""
        self._ids.clear()
        self._touched.clear()
        self._named.clear()
        self._tags.clear()

    # --- interactions ---------------------------------------------------------------------------
    def add_interactions(self, rows: list[dict]) -> None:
        """Insert interactions whose (source, external_id) is new; existing ones are left as they are."""
        source = self.run.source
        by_key = {row["external_id"]: row for row in rows}
        keys = sorted(by_key)
        existing: set[str] = set()
        for start in range(0, len(keys), CHUNK):
            existing.update(self.session.scalars(select(Interaction.external_id).where(
                Interaction.user_id == self.user_id, Interaction.source == source,
                Interaction.external_id.in_(keys[start:start + CHUNK]))))
        for key in keys:
            if key in existing:
                continue
            row = by_key[key]
            self.session.add(Interaction(user_id=self.user_id, source=source, **row))
            self._touched.add(row["contact_id"])
            self.stats.interactions_created += 1

    def replace_interactions(self, prefix: str, rows: list[dict]) -> None:
        """Make the interactions whose external id starts with `prefix` exactly `rows` (e.g. one event)."""
        source = self.run.source
        current = {i.external_id: i for i in self.session.scalars(select(Interaction).where(
            Interaction.user_id == self.user_id, Interaction.source == source,
            Interaction.external_id.startswith(prefix, autoescape=True)))}
        wanted = {row["external_id"]: row for row in rows}
        for key, interaction in current.items():
            if key not in wanted:
                self._touched.add(interaction.contact_id)
                self.session.delete(interaction)
                self.stats.interactions_removed += 1
        for key, row in wanted.items():
            interaction = current.get(key)
            if interaction is None:
                self.session.add(Interaction(user_id=self.user_id, source=source, **row))
                self.stats.interactions_created += 1
                self._touched.add(row["contact_id"])
                continue
            changed = False
            for name in ("kind", "direction", "occurred_at", "subject"):
                if getattr(interaction, name) != row[name]:
                    setattr(interaction, name, row[name])
                    changed = True
            if changed:
                self.stats.interactions_updated += 1
                self._touched.add(interaction.contact_id)

    def external_ids(self) -> list[str]:
        return list(self.session.scalars(select(Interaction.external_id).where(
            Interaction.user_id == self.user_id, Interaction.source == self.run.source)))

    def flush_page(self) -> None:
        self.session.flush()
        if self._touched:
            contact_service.refresh_last_interaction(self.session, self._touched)
            self._touched.clear()

    # --- external links (Google Contacts) ---------------------------------------------------------
    def link(self, link_source: str, external_id: str) -> ExternalLink | None:
        return self.session.scalar(select(ExternalLink).where(
            ExternalLink.user_id == self.user_id, ExternalLink.source == link_source,
            ExternalLink.external_id == external_id))

    def unlink(self, link_source: str, external_id: str) -> None:
        result = self.session.execute(delete(ExternalLink).where(
            ExternalLink.user_id == self.user_id, ExternalLink.source == link_source,
            ExternalLink.external_id == external_id))
        self.stats.links_removed += result.rowcount or 0

    def upsert_people(self, link_source: str, people: list[dict], *, create: bool = True) -> None:
        """Create or update the contacts linked to one page of Google Contacts people.

        Each item: external_id, name, emails, phones, company, title, tags, etag. Reads are batched
        per page and there is one flush at the end (the slow part used to be a flush per person).
        The page runs in a savepoint: when a sync running in parallel took one of its addresses
        meanwhile (unique violation, or a PostgreSQL deadlock), the page is read and written again."""
        import copy

        for attempt in range(RACE_RETRIES + 1):
            saved = copy.deepcopy(self.stats)
            try:
                with self.session.begin_nested():
                    self._upsert_people(link_source, copy.deepcopy(people), create)
                return
            except (IntegrityError, OperationalError) as exc:
                if attempt == RACE_RETRIES or not _is_race(exc):
                    raise
                log.info("sync: page raced with another sync (%s); redoing it", type(exc.orig).__name__)
                self.stats.__dict__.update(saved.__dict__)
                self._ids.clear()
                self._named.clear()
                self._tags.clear()
                self.session.expire_all()

    def _upsert_people(self, link_source: str, people: list[dict], create: bool) -> None:
        from sqlalchemy.orm import selectinload

        session = self.session
        if not people:
            return
        for person in people:
            person["emails"] = list(dict.fromkeys(
                e for e in (normalise_email(x) for x in person["emails"]) if is_valid_email(e)))
        ids = [p["external_id"] for p in people]
        links: dict[str, ExternalLink] = {}
        for start in range(0, len(ids), CHUNK):
            for link in session.scalars(select(ExternalLink).where(
                    ExternalLink.user_id == self.user_id, ExternalLink.source == link_source,
                    ExternalLink.external_id.in_(ids[start:start + CHUNK]))):
                links[link.external_id] = link
        self.prefetch(e for p in people for e in p["emails"])
        wanted = {l.contact_id for l in links.values()} | {self._ids[e] for p in people for e in p["emails"]
                                                            if e in self._ids}
        loaded: dict[int, Contact] = {}
        wanted_ids = sorted(wanted)
        for start in range(0, len(wanted_ids), CHUNK):
            for contact in session.scalars(select(Contact).where(Contact.id.in_(wanted_ids[start:start + CHUNK]))
                                           .options(selectinload(Contact.emails), selectinload(Contact.phones),
                                                    selectinload(Contact.tags))):
                loaded[contact.id] = contact
        new_by_email: dict[str, Contact] = {}
        pending_links: list[tuple[Contact, dict, ExternalLink | None]] = []
        region = self.run.settings.region
        with session.no_autoflush:
            for person in people:
                emails = person["emails"]
                link = links.get(person["external_id"])
                contact = loaded.get(link.contact_id) if link else None
                if contact is None:
                    for email in emails:
                        contact = new_by_email.get(email) or loaded.get(self._ids.get(email, -1))
                        if contact is not None:
                            break
                created = False
                if contact is None:
                    if not create or not (person["name"] or emails):
                        continue
                    contact = Contact(user_id=self.user_id, display_name=person["name"], company=person["company"],
                                      title=person["title"], manual_fields="")
                    session.add(contact)
                    created = True
                manual = _manual(contact)
                changed = False
                if not created:
                    for attr in ("display_name", "company", "title"):
                        value = person["name" if attr == "display_name" else attr]
                        if value and attr not in manual and getattr(contact, attr) != value:
                            setattr(contact, attr, value)
                            changed = True
                for email in emails:
                    if any(e.email == email for e in contact.emails):
                        continue
                    owner = self._ids.get(email)
                    if (owner is not None and owner != contact.id) or (
                            email in new_by_email and new_by_email[email] is not contact):
                        continue  # belongs to another contact: never steal it
                    position = max((e.position for e in contact.emails), default=-1) + 1
                    contact.emails.append(ContactEmail(user_id=self.user_id, email=email, position=position))
                    new_by_email[email] = contact
                    changed = True
                for raw in person["phones"]:
                    try:
                        changed |= contact_service.add_phone(contact, raw, region)
                    except InvalidInput:
                        continue
                for name in person["tags"]:
                    tag = self._tag(name)
                    if tag is not None and tag not in contact.tags:
                        contact.tags.append(tag)
                        changed = True
                if created or changed:
                    contact.updated_at = clock_now()
                    contact_service.refresh_search_text(contact)
                pending_links.append((contact, person, link))
                if created:
                    self.stats.contacts_created += 1
                    if len(self.stats.sample) < SAMPLE_SIZE:
                        self.stats.sample.append({"action": "create", "display_name": person["name"],
                                                  "email": emails[0] if emails else None, "source": self.run.source})
                elif changed:
                    self.stats.contacts_updated += 1
                    if len(self.stats.sample) < SAMPLE_SIZE:
                        self.stats.sample.append({"action": "update", "display_name": contact.display_name,
                                                  "email": emails[0] if emails else None, "source": self.run.source})
        session.flush()
        seen_links = {}
        for contact, person, link in pending_links:
            for email in contact.emails:
                self._ids[email.email] = contact.id
            if link is None:
                link = seen_links.get(person["external_id"])
            if link is None:
                link = ExternalLink(user_id=self.user_id, contact_id=contact.id, source=link_source,
                                    external_id=person["external_id"], etag=person["etag"])
                session.add(link)
                seen_links[person["external_id"]] = link
            else:
                link.contact_id, link.etag = contact.id, person["etag"]
        session.flush()

    def _tag(self, name: str):
        if name not in self._tags:
            try:
                self._tags[name] = contact_service.get_tag(self.session, self.user_id, name)
            except InvalidInput:
                self._tags[name] = None
        return self._tags[name]


def _is_race(exc: Exception) -> bool:
    """A unique violation or a deadlock / serialization failure: worth redoing the work."""
    if isinstance(exc, IntegrityError):
        return True
    code = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(getattr(exc, "orig", None), "pgcode", None)
    return code in ("40P01", "40001")


def _manual(contact: Contact) -> set[str]:
    return set(filter(None, (contact.manual_fields or "").split(",")))
