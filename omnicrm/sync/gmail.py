"""Gmail: correspondents become contacts, every message an email interaction per contact.

Full sync records the mailbox historyId (profile) first, lists message ids (≤ 500 a page, SPAM/TRASH
excluded) and fetches their headers in batches of ≤ 50; each page is committed with its page token.
Later runs follow history.list(messageAdded) from the recorded historyId; a 404 (history too old)
falls back to a full sync.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from datetime import datetime, timezone
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses, parsedate_to_datetime

from omnicrm.google import clients
from omnicrm.normalize import is_valid_email, normalise_email
from omnicrm.sync.upsert import SyncRun, page_size

log = logging.getLogger("omnicrm.sync.gmail")

HEADERS = ["From", "To", "Cc", "Bcc", "Date", "Subject", "List-Id", "List-Unsubscribe", "Precedence",
           "Auto-Submitted"]
LIST_PAGE = 500
BATCH = 50
AUTOMATED_LOCAL_PARTS = frozenset({
    "noreply", "no-reply", "no_reply", "donotreply", "do-not-reply", "do_not_reply", "notifications",
    "mailer-daemon", "postmaster", "bounce", "bounces"})
BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})
EXCLUDED_LABELS = frozenset({"SPAM", "TRASH", "DRAFT"})  # a draft was never sent to anyone
NAME_SUFFIXES = frozenset({"jr", "jr.", "sr", "sr.", "ii", "iii", "iv", "phd", "ph.d.", "md", "m.d.", "esq",
                           "esq."})
_registry = HeaderRegistry()
_LAST_FIRST = re.compile(r"^\s*([^,]+?)\s*,\s*([^,]+?)\s*$")


# --- header parsing ------------------------------------------------------------------------------

def decode(value: str | None) -> str:
    """RFC 2047 encoded words decoded; undecodable input is returned as it is."""
    if not value:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except (UnicodeError, LookupError, ValueError, TypeError):
        return value


def clean_name(name: str | None, email: str) -> str | None:
    """A display name fit for a contact: unquoted, `Last, First` turned round, never the address itself."""
    name = (name or "").strip().strip("'\"").strip()
    if not name or "@" in name and normalise_email(name.strip("<>")) == email:
        return None
    match = _LAST_FIRST.match(name)
    if match and match.group(2).lower() not in NAME_SUFFIXES:
        name = f"{match.group(2)} {match.group(1)}"
    return " ".join(name.split())[:200] or None


def parse_addresses(value: str | None) -> list[tuple[str | None, str]]:
    return list(_parse_addresses(value or ""))


@lru_cache(maxsize=20000)
def _parse_addresses(value: str) -> tuple[tuple[str | None, str], ...]:
    """(name, normalised email) pairs of an address header; groups contribute their members only
    (`undisclosed-recipients:;` contributes nothing); invalid addresses are dropped."""
    if not value or not value.strip():
        return []
    pairs: list[tuple[str, str]] = []
    try:
        header = _registry("To", value)
        for group in header.groups:
            for address in group.addresses:
                pairs.append((address.display_name, address.addr_spec))
    except Exception:  # noqa: BLE001 - malformed header: fall back to the tolerant parser
        pairs = [(decode(n), a) for n, a in getaddresses([value])]
    out: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    for name, address in pairs:
        email = normalise_email(address or "")
        if not is_valid_email(email) or email in seen:
            continue
        seen.add(email)
        out.append((clean_name(name, email), email))
    return tuple(out)


def is_automated_address(email: str) -> bool:
    local = email.split("@", 1)[0].split("+", 1)[0].lower()
    return local in AUTOMATED_LOCAL_PARTS


def is_automated(headers: dict[str, str], sender: str | None) -> bool:
    if sender and is_automated_address(sender):
        return True
    if headers.get("list-unsubscribe") or headers.get("list-id"):
        return True
    if headers.get("precedence", "").strip().lower() in BULK_PRECEDENCE:
        return True
    auto = headers.get("auto-submitted", "").split(";", 1)[0].strip().lower()
    return bool(auto) and auto != "no"


def message_summary(message: dict, self_emails: set[str]) -> dict | None:
    """Direction, time, subject and correspondents of one message; None when the message is excluded."""
    labels = set(message.get("labelIds") or [])
    if labels & EXCLUDED_LABELS:
        return None
    headers: dict[str, str] = {}
    for item in (message.get("payload") or {}).get("headers") or []:
        key = (item.get("name") or "").lower()
        headers[key] = (headers[key] + ", " + item.get("value", "")) if key in headers and key in (
            "to", "cc", "bcc") else item.get("value", "")
    senders = parse_addresses(headers.get("from"))
    sender = senders[0][1] if senders else None
    if is_automated(headers, sender):
        return None
    outbound = "SENT" in labels or (sender is not None and sender in self_emails)
    fields = ["to", "cc", "bcc"] if outbound else ["from", "to", "cc"]
    people: dict[str, str | None] = {}
    for name_field in fields:
        for name, email in parse_addresses(headers.get(name_field)):
            if email in self_emails or is_automated_address(email):
                continue
            if email not in people or (name and not people[email]):
                people[email] = name
    return {"id": message["id"], "direction": "out" if outbound else "in",
            "occurred_at": _occurred_at(message, headers), "subject": decode(headers.get("subject"))[:500] or None,
            "people": people}


def _occurred_at(message: dict, headers: dict[str, str]) -> datetime:
    internal = message.get("internalDate")
    if internal:
        return datetime.fromtimestamp(int(internal) / 1000, tz=timezone.utc)
    try:
        value = parsedate_to_datetime(headers.get("date", ""))
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return datetime.fromtimestamp(0, tz=timezone.utc)


# --- the sync ------------------------------------------------------------------------------------

def sync_gmail(run: SyncRun) -> None:
    service = clients.build_service("gmail", "v1", run.credentials, run.settings)
    state = run.load_state()
    progress = dict(state.progress or {})
    if state.cursor and not run.full and progress.get("mode") != "full":
        try:
            _incremental(run, service, progress)
            return
        except clients.GoogleApiError as exc:
            if exc.status != 404:
                raise
            log.info("gmail: history %s expired, running a full sync", state.cursor)
            progress = {}
    _full(run, service, progress)


def _full(run: SyncRun, service, progress: dict) -> None:
    run.stats.mode = "full"
    if progress.get("mode") != "full":
        profile = clients.execute(service.users().getProfile(userId="me"), "gmail profile")
        progress = {"mode": "full", "history_id": profile["historyId"],
                    "account": normalise_email(profile.get("emailAddress", "")), "page_token": None}
        run.save_progress(progress)
    self_emails = {progress["account"]} if progress.get("account") else set()
    while True:
        params = {"userId": "me", "maxResults": page_size(LIST_PAGE), "includeSpamTrash": False}
        if progress.get("page_token"):
            params["pageToken"] = progress["page_token"]
        try:
            page = clients.execute(service.users().messages().list(**params), "gmail messages.list")
        except clients.GoogleApiError as exc:
            if exc.status != 400 or not progress.get("page_token"):
                raise
            log.info("gmail: saved page token refused, listing again from the start")
            progress["page_token"] = None  # re-listing is harmless: writes are idempotent
            continue
        ids = [m["id"] for m in page.get("messages") or []]
        oldest = _store(run, service, ids, self_emails)
        progress["page_token"] = page.get("nextPageToken")
        reached_since = run.since is not None and oldest is not None and oldest < run.since
        if not progress["page_token"] or reached_since:
            run.finish(_cursor(progress))
            return
        run.save_progress(progress)


def _cursor(progress: dict) -> str:
    """The Gmail cursor: historyId, with the mailbox address kept alongside (`historyId account`)."""
    return f"{progress['history_id']} {progress.get('account') or ''}".strip()


def _incremental(run: SyncRun, service, progress: dict) -> None:
    run.stats.mode = "incremental"
    history_id, _, account = run.state.cursor.partition(" ")
    if progress.get("mode") != "incremental":
        progress = {"mode": "incremental", "start": history_id, "account": account, "page_token": None}
    self_emails = {progress["account"]} if progress.get("account") else set()
    while True:
        params = {"userId": "me", "startHistoryId": progress["start"], "historyTypes": ["messageAdded"],
                  "maxResults": page_size(LIST_PAGE)}
        if progress.get("page_token"):
            params["pageToken"] = progress["page_token"]
        page = clients.execute(service.users().history().list(**params), "gmail history.list")
        ids: list[str] = []
        for record in page.get("history") or []:  # pages may come without `history`
            for added in record.get("messagesAdded") or []:
                message = added.get("message") or {}
                if message.get("id") and not EXCLUDED_LABELS & set(message.get("labelIds") or []):
                    ids.append(message["id"])
        _store(run, service, list(dict.fromkeys(ids)), self_emails)
        progress["page_token"] = page.get("nextPageToken")
        if not progress["page_token"]:
            run.finish(f"{page.get('historyId') or progress['start']} {progress.get('account') or ''}".strip())
            return
        run.save_progress(progress)


def _fetch(run: SyncRun, resource, ids: list[str]) -> list[dict]:
    messages: list[dict] = []
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        requests = {mid: resource.get(userId="me", id=mid, format="metadata", metadataHeaders=HEADERS)
                    for mid in chunk}
        got = clients.run_batch("gmail", run.settings, requests, missing_ok=True, what="gmail messages.get batch")
        messages.extend(got[mid] for mid in chunk if got.get(mid))
    return messages


def _store(run: SyncRun, service, ids: list[str], self_emails: set[str]) -> datetime | None:
    """Fetch, filter and write one page of messages; returns the oldest message time seen."""
    oldest = None
    resource = service.users().messages()  # building a Resource is costly: once per page
    for start in range(0, len(ids), BATCH):
        # One transaction per batch of 50: short transactions keep the parallel syncs from waiting on
        # each other's locks. The page token is saved after the last batch, so a crash redoes the page.
        messages = _fetch(run, resource, ids[start:start + BATCH])
        found = run.atomically(lambda: _write(run, messages, self_emails))
        run.commit()
        if found is not None and (oldest is None or found < oldest):
            oldest = found
    return oldest


def _write(run: SyncRun, messages: list[dict], self_emails: set[str]) -> datetime | None:
    summaries = []
    oldest = None
    for message in messages:
        run.stats.items += 1
        summary = message_summary(message, self_emails)
        if summary is None:
            run.stats.skipped += 1
            continue
        if oldest is None or summary["occurred_at"] < oldest:
            oldest = summary["occurred_at"]
        if run.since is not None and summary["occurred_at"] < run.since:
            continue
        summaries.append(summary)
    upsert = run.upsert
    upsert.prefetch(email for s in summaries for email in s["people"])
    # Outbound first, so that under `wrote-to` a page's replies attach to people written to on that page.
    summaries.sort(key=lambda s: s["direction"] != "out")
    rows = []
    for summary in summaries:
        create = run.mode == "all" or (run.mode == "wrote-to" and summary["direction"] == "out")
        seen: set[int] = set()
        for email, name in summary["people"].items():
            contact_id = upsert.contact_for(email, name, create=create)
            if contact_id is None or contact_id in seen:
                continue
            seen.add(contact_id)
            rows.append({"contact_id": contact_id, "kind": "email", "direction": summary["direction"],
                         "occurred_at": summary["occurred_at"], "subject": summary["subject"],
                         "external_id": f"{summary['id']}:{contact_id}"})
    upsert.add_interactions(rows)
    return oldest
