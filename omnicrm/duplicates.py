"""Likely duplicate contacts, and merging contacts into one.

Two contacts of a user are likely the same person when they share:
- a phone number after normalisation (E.164, or the digits when it did not parse; at least 7 digits);
- a name (folded, punctuation-insensitive, word order ignored) and a company, or a name and an email
  domain that is not a free-mail domain (gmail.com, outlook.com, …);
- a near-identical name: the same words in any order, or one letter apart (names of 5+ letters),
  unless both contacts name a company and the companies differ (two John Smiths at two firms).
Pairs are joined into groups (if A~B and B~C, then A, B and C are one group), each with its reasons.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from omnicrm.contacts import (EDITABLE, refresh_last_interaction, refresh_search_text, resolve)
from omnicrm.errors import InvalidInput, NotFound
from omnicrm.models import Contact, ContactEmail, ContactPhone, ContactTag, ExternalLink, Interaction, Note
from omnicrm.normalize import digits, fold

FREEMAIL = frozenset("""
gmail.com googlemail.com yahoo.com yahoo.co.uk yahoo.fr ymail.com rocketmail.com hotmail.com hotmail.co.uk
hotmail.fr outlook.com live.com msn.com icloud.com me.com mac.com aol.com gmx.com gmx.de gmx.net web.de
proton.me protonmail.com pm.me yandex.com yandex.ru mail.ru zoho.com fastmail.com hey.com tutanota.com
qq.com 163.com 126.com naver.com orange.fr free.fr laposte.net libero.it t-online.de comcast.net
""".split())
MIN_PHONE_DIGITS = 7
MIN_FUZZY_NAME = 5
DUPLICATE_FIELDS = ["group", "ids", "names", "reasons", "merge"]

_PUNCT = re.compile(r"[^\w\s]+")


def name_key(name: str | None) -> str:
    """Folded, punctuation-free, word-sorted name: 'Smith, John' and 'john smith' give 'john smith'."""
    words = _PUNCT.sub(" ", fold(name)).split()
    return " ".join(sorted(words))


def phone_key(raw: str, e164: str | None) -> str | None:
    if e164:
        return e164
    value = digits(raw)
    return value if len(value) >= MIN_PHONE_DIGITS else None


@dataclass
class DuplicateGroup:
    ids: list[int]
    names: list[str | None]
    reasons: list[str] = field(default_factory=list)

    def record(self, number: int) -> dict:
        return {"group": number, "ids": self.ids, "names": [n or "" for n in self.names],
                "reasons": self.reasons, "merge": "omnicrm contacts merge " + " ".join(map(str, self.ids))}


class _Groups:
    """Union-find over contact ids, remembering why each pair was joined."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}
        self.reasons: list[tuple[int, str]] = []

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def join(self, ids: Iterable[int], reason: str) -> None:
        ids = sorted(set(ids))
        if len(ids) < 2:
            return
        root = self.find(ids[0])
        for other in ids[1:]:
            self.parent[self.find(other)] = root
        self.reasons.append((ids[0], reason))


def find_duplicates(session: Session, user_id: int) -> list[DuplicateGroup]:
    """Likely duplicate groups of this user's contacts, each sorted by id, groups by their first id."""
    contacts = {cid: (name, company) for cid, name, company in session.execute(
        select(Contact.id, Contact.display_name, Contact.company).where(Contact.user_id == user_id))}
    groups = _Groups()

    by_phone: dict[str, set[int]] = {}
    for cid, raw, e164 in session.execute(select(ContactPhone.contact_id, ContactPhone.raw, ContactPhone.e164)
                                          .where(ContactPhone.user_id == user_id)):
        key = phone_key(raw, e164)
        if key:
            by_phone.setdefault(key, set()).add(cid)
    for key, ids in sorted(by_phone.items()):
        groups.join(ids, f"same phone {key}")

    keys = {cid: name_key(name) for cid, (name, _company) in contacts.items()}
    companies = {cid: " ".join(_PUNCT.sub(" ", fold(company)).split()) for cid, (_n, company) in contacts.items()}
    by_name_company: dict[tuple[str, str], set[int]] = {}
    for cid, company_key in companies.items():
        if keys[cid] and company_key:
            by_name_company.setdefault((keys[cid], company_key), set()).add(cid)
    for (_key, _company), ids in sorted(by_name_company.items()):
        if len(ids) > 1:
            groups.join(ids, f"same name and company ({contacts[min(ids)][1]})")

    by_name_domain: dict[tuple[str, str], set[int]] = {}
    for cid, email in session.execute(select(ContactEmail.contact_id, ContactEmail.email)
                                      .where(ContactEmail.user_id == user_id)):
        domain = email.rsplit("@", 1)[-1]
        if keys.get(cid) and domain not in FREEMAIL:
            by_name_domain.setdefault((keys[cid], domain), set()).add(cid)
    for (_key, domain), ids in sorted(by_name_domain.items()):
        if len(ids) > 1:
            groups.join(ids, f"same name and email domain ({domain})")

    by_key: dict[str, set[int]] = {}
    for cid, key in keys.items():
        if key:
            by_key.setdefault(key, set()).add(cid)
    def compatible(a: int, b: int) -> bool:
        return not (companies[a] and companies[b] and companies[a] != companies[b])

    for key, ids in sorted(by_key.items()):
        ordered = sorted(ids)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                if compatible(a, b):
                    groups.join((a, b), f"same name ({contacts[a][0]} / {contacts[b][0]})"
                                if contacts[a][0] != contacts[b][0] else f"same name ({contacts[a][0]})")
    for a, b in one_edit_pairs([k for k in by_key if len(k.replace(" ", "")) >= MIN_FUZZY_NAME]):
        for x in by_key[a]:
            for y in by_key[b]:
                if compatible(x, y):
                    first, second = sorted((x, y))
                    groups.join((x, y), f"near-identical names ({contacts[first][0]} / {contacts[second][0]})")

    members: dict[int, list[int]] = {}
    for cid in groups.parent:
        members.setdefault(groups.find(cid), []).append(cid)
    reasons: dict[int, list[str]] = {}
    for cid, reason in groups.reasons:
        bucket = reasons.setdefault(groups.find(cid), [])
        if reason not in bucket:
            bucket.append(reason)
    result = []
    for root, ids in members.items():
        if len(ids) > 1:
            ids.sort()
            result.append(DuplicateGroup(ids=ids, names=[contacts[i][0] for i in ids], reasons=reasons[root]))
    result.sort(key=lambda g: g.ids[0])
    return result


def one_edit_pairs(keys: Iterable[str]) -> set[tuple[str, str]]:
    """Pairs (a < b) of distinct keys exactly one edit apart, without comparing all pairs.

    Pigeonhole blocking: if `a` (length m) and `b` (length m or m+1) are one edit apart, the edit
    leaves intact either a's first m//2 characters (a prefix of b too) or a's last m - m//2
    (a suffix of b too). Each key is filed under its halves as the shorter string (m = len) and
    as the longer one (m = len - 1); only keys sharing a block are compared.
    """
    blocks: dict[tuple[str, int, str], list[str]] = {}
    for key in keys:
        for m in {len(key), len(key) - 1}:
            if m < 1:
                continue
            half = m // 2
            blocks.setdefault(("p", m, key[:half]), []).append(key)
            blocks.setdefault(("s", m, key[len(key) - (m - half):]), []).append(key)
    pairs: set[tuple[str, str]] = set()
    for block in blocks.values():
        if len(block) < 2:
            continue
        for i, a in enumerate(block):
            size = len(a)
            for b in block[i + 1:]:
                if -1 <= len(b) - size <= 1 and _one_edit_apart(a, b):
                    pairs.add((a, b) if a < b else (b, a))
    return pairs


def _one_edit_apart(a: str, b: str) -> bool:
    """Levenshtein distance exactly 1 (one substitution, insertion or deletion)."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) > 1 or a == b:
        return False
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:]
    return a[i:] == b[i + 1:]


# --- merge ------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    survivor: Contact
    merged_ids: list[int]
    filled: dict[str, str]
    moved: dict[str, int]

    def summary(self) -> dict:
        return {"survivor": self.survivor.id, "merged": self.merged_ids, "filled": self.filled,
                "moved": self.moved}


def _contact(session: Session, user_id: int, ref: Contact | int | str) -> Contact:
    if isinstance(ref, Contact):
        if ref.user_id != user_id:
            raise NotFound(f"no contact {ref.id!r}")
        return ref
    return resolve(session, user_id, str(ref))


def merge_contacts(session: Session, user_id: int, survivor: Contact | int | str,
                   others: Sequence[Contact | int | str], now: datetime | None = None) -> MergeResult:
    """Merge `others` into `survivor` (the caller commits: one transaction).

    Emails, phones, tags, notes, interactions and external links move to the survivor; its empty
    name/company/title are filled from the others in order; the others are deleted. A phone the
    survivor already has (same number) is not repeated.
    """
    from omnicrm.config import now as clock_now

    keeper = _contact(session, user_id, survivor)
    gone: list[Contact] = []
    for ref in others:
        contact = _contact(session, user_id, ref)
        if contact.id != keeper.id and all(contact.id != g.id for g in gone):
            gone.append(contact)
    if not gone:
        raise InvalidInput("REF: give at least two different contacts to merge")
    gone_ids = [c.id for c in gone]

    filled: dict[str, str] = {}
    manual = set(filter(None, keeper.manual_fields.split(",")))
    for name in EDITABLE:
        if getattr(keeper, name):
            continue
        donor = next((c for c in gone if getattr(c, name)), None)
        if donor is not None:
            setattr(keeper, name, getattr(donor, name))
            filled[name] = getattr(donor, name)
            if name in donor.manual_fields.split(","):
                manual.add(name)
    keeper.manual_fields = ",".join(sorted(manual))
    session.flush()

    moved: dict[str, int] = {}
    # Emails are unique per user, so they can simply follow, after the survivor's own.
    position = max((e.position for e in keeper.emails), default=-1) + 1
    for contact in gone:
        for email in list(contact.emails):
            session.execute(update(ContactEmail).where(ContactEmail.id == email.id)
                            .values(contact_id=keeper.id, position=position))
            position += 1
            moved["emails"] = moved.get("emails", 0) + 1
    have = {p.e164 or p.raw for p in keeper.phones}
    position = max((p.position for p in keeper.phones), default=-1) + 1
    for contact in gone:
        for phone in list(contact.phones):
            if phone.value in have:
                continue  # the same number is already on the survivor
            have.add(phone.value)
            session.execute(update(ContactPhone).where(ContactPhone.id == phone.id)
                            .values(contact_id=keeper.id, position=position))
            position += 1
            moved["phones"] = moved.get("phones", 0) + 1
    tag_ids = set(session.scalars(select(ContactTag.tag_id).where(ContactTag.contact_id == keeper.id)))
    for tag_id in session.scalars(select(ContactTag.tag_id).where(ContactTag.contact_id.in_(gone_ids))
                                  .distinct()):
        if tag_id not in tag_ids:
            session.add(ContactTag(contact_id=keeper.id, tag_id=tag_id))
            tag_ids.add(tag_id)
            moved["tags"] = moved.get("tags", 0) + 1
    for table, label in ((Note, "notes"), (Interaction, "interactions"), (ExternalLink, "external_links")):
        result = session.execute(update(table).where(table.user_id == user_id, table.contact_id.in_(gone_ids))
                                 .values(contact_id=keeper.id).execution_options(synchronize_session=False))
        if result.rowcount:
            moved[label] = result.rowcount
    session.flush()
    # What is left on the others (repeated phones, their tag links) goes with them.
    session.execute(delete(ContactPhone).where(ContactPhone.contact_id.in_(gone_ids)))
    session.execute(delete(ContactTag).where(ContactTag.contact_id.in_(gone_ids)))
    session.execute(delete(Contact).where(Contact.user_id == user_id, Contact.id.in_(gone_ids))
                    .execution_options(synchronize_session=False))
    for contact in gone:
        session.expunge(contact)
    keeper.updated_at = now or clock_now()
    session.flush()
    session.expire(keeper)
    refresh_last_interaction(session, [keeper.id])
    keeper = resolve(session, user_id, str(keeper.id))
    refresh_search_text(keeper)
    session.flush()
    return MergeResult(survivor=keeper, merged_ids=gone_ids, filled=filled, moved=moved)


def preview_merge(session: Session, user_id: int, survivor: Contact | int | str,
                  others: Sequence[Contact | int | str], now: datetime | None = None) -> tuple[dict, dict]:
    """What `merge_contacts` would produce (the survivor's record and the summary); writes nothing."""
    from omnicrm.contacts import record

    savepoint = session.begin_nested()
    try:
        result = merge_contacts(session, user_id, survivor, others, now)
        return record(result.survivor, now), result.summary()
    finally:
        savepoint.rollback()
        session.expire_all()


def count_rows(session: Session, user_id: int) -> dict[str, int]:
    """Rows per contact-related table for this user (used to show that a merge loses nothing)."""
    counts = {}
    for table in (Contact, ContactEmail, ContactPhone, Note, Interaction, ExternalLink):
        counts[table.__tablename__] = session.scalar(
            select(func.count()).select_from(table).where(table.user_id == user_id))
    counts["contact_tags"] = session.scalar(select(func.count()).select_from(ContactTag).join(
        Contact, Contact.id == ContactTag.contact_id).where(Contact.user_id == user_id))
    return counts
