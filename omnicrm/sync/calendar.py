"""Google Calendar: attendees become contacts, each occurrence a meeting interaction per attendee.

Events of the primary calendar are listed with singleEvents=true (recurring events expanded, all-day
events included) over the whole history unless --since; each page is committed with its page token.
Later runs send the syncToken (every other parameter unchanged); cancelled events remove their
interactions; a 410 (token expired) falls back to a full sync.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from omnicrm.google import clients
from omnicrm.normalize import is_valid_email, normalise_email
from omnicrm.sync.gmail import clean_name
from omnicrm.sync.upsert import SyncRun, page_size

log = logging.getLogger("omnicrm.sync.calendar")

LIST_PAGE = 2500
WRITE_CHUNK = 100


def sync_calendar(run: SyncRun) -> None:
    service = clients.build_service("calendar", "v3", run.credentials, run.settings)
    state = run.load_state()
    progress = dict(state.progress or {})
    if progress.get("mode") not in ("full", "incremental"):
        progress = {"mode": "incremental" if state.cursor and not run.full else "full",
                    "sync_token": None if run.full else state.cursor, "page_token": None}
        if progress["mode"] == "full" and run.since is not None:
            progress["time_min"] = run.since.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    for _ in range(3):  # at most: a refused page token, then an expired sync token, then the full listing
        try:
            _pages(run, service, progress)
            return
        except clients.GoogleApiError as exc:
            if exc.status == 400 and progress.get("page_token"):
                log.info("calendar: saved page token refused, listing again from the start")
                progress["page_token"] = None
                continue
            if exc.status != 410:
                raise
            log.info("calendar: sync token expired, running a full sync")
            progress = {"mode": "full", "sync_token": None, "page_token": None,
                        **({"time_min": progress["time_min"]} if progress.get("time_min") else {})}
    raise clients.GoogleApiError(410, "fullSyncRequired", "Calendar kept refusing the listing")


def _pages(run: SyncRun, service, progress: dict) -> None:
    run.stats.mode = progress["mode"]
    while True:
        params = {"calendarId": "primary", "singleEvents": True, "maxResults": page_size(LIST_PAGE)}
        if progress["mode"] == "incremental":
            params["syncToken"] = progress["sync_token"]
        elif progress.get("time_min"):
            params["timeMin"] = progress["time_min"]
        if progress.get("page_token"):
            params["pageToken"] = progress["page_token"]
        page = clients.execute(service.events().list(**params), "calendar events.list")
        summary = normalise_email(page.get("summary") or "")
        if is_valid_email(summary):
            progress["account"] = summary
        sweep = progress["mode"] == "full" and not progress.get("time_min")
        items = page.get("items") or []
        for start in range(0, len(items), WRITE_CHUNK):  # short transactions (see gmail._store)
            chunk = items[start:start + WRITE_CHUNK]
            run.atomically(lambda: [_store_event(run, event, progress.get("account")) for event in chunk])
            run.commit()
        if sweep:
            progress.setdefault("seen", []).extend(event["id"] for event in items if event.get("id"))
        progress["page_token"] = page.get("nextPageToken")
        if not progress["page_token"]:
            if sweep:
                run.atomically(lambda: _sweep(run, set(progress.get("seen") or [])))
            run.finish(page.get("nextSyncToken"))
            return
        run.save_progress(progress)


def _sweep(run: SyncRun, seen: set[str]) -> None:
    """After a full listing: events that no longer exist (deleted while the token was expired) lose
    their interactions."""
    gone = {key.rsplit(":", 1)[0] for key in run.upsert.external_ids()} - seen
    for event_id in sorted(gone):
        run.upsert.replace_interactions(f"{event_id}:", [])


def event_time(event: dict) -> datetime | None:
    start = event.get("start") or {}
    try:
        if start.get("dateTime"):
            value = datetime.fromisoformat(start["dateTime"].replace("Z", "+00:00"))
            return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if start.get("date"):
            return datetime.fromisoformat(start["date"]).replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return None


def _is_resource(email: str, attendee: dict) -> bool:
    return bool(attendee.get("resource")) or email.endswith(("resource.calendar.google.com",
                                                             "group.calendar.google.com",
                                                             "group.v.calendar.google.com"))


def event_people(event: dict, account: str | None) -> dict[str, str | None]:
    """Attendees (and the organizer) other than the user and resources: email -> name."""
    people: dict[str, str | None] = {}
    candidates = list(event.get("attendees") or [])
    organizer = event.get("organizer") or {}
    if organizer.get("email"):
        candidates.append(organizer)
    for attendee in candidates:
        email = normalise_email(attendee.get("email") or "")
        if not is_valid_email(email) or attendee.get("self") or email == account or _is_resource(email, attendee):
            continue
        name = clean_name(attendee.get("displayName"), email)
        if email not in people or (name and not people[email]):
            people[email] = name
    return people


def _store_event(run: SyncRun, event: dict, account: str | None) -> None:
    run.stats.items += 1
    event_id = event.get("id")
    if not event_id:
        return
    prefix = f"{event_id}:"
    upsert = run.upsert
    occurred_at = event_time(event)
    if event.get("status") == "cancelled" or occurred_at is None:
        upsert.replace_interactions(prefix, [])
        return
    if run.since is not None and occurred_at < run.since:
        return
    people = event_people(event, account)
    if not people:
        run.stats.skipped += 1
    organised = bool((event.get("organizer") or {}).get("self")) or (
        (event.get("organizer") or {}).get("email") == account)
    create = run.mode == "all" or (run.mode == "wrote-to" and organised)
    upsert.prefetch(people)
    rows, seen = [], set()
    for email, name in people.items():
        contact_id = upsert.contact_for(email, name, create=create)
        if contact_id is None or contact_id in seen:
            continue
        seen.add(contact_id)
        rows.append({"contact_id": contact_id, "kind": "meeting", "direction": "out" if organised else "in",
                     "occurred_at": occurred_at, "subject": (event.get("summary") or "")[:500] or None,
                     "external_id": f"{prefix}{contact_id}"})
    upsert.replace_interactions(prefix, rows)
