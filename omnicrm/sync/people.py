"""Google Contacts (People API): connections, and "other contacts" when that scope was granted.

Each person upserts one contact linked by its `resourceName` (names, emails, phones, organisation,
labels -> tags); `metadata.deleted` unlinks. Lists are read with requestSyncToken and later with the
syncToken; a 400 EXPIRED_SYNC_TOKEN falls back to a full listing of that list. The cursor holds both
tokens as JSON: {"connections": TOKEN, "other": TOKEN}.
"""

from __future__ import annotations

import json
import logging

from omnicrm.google import clients
from omnicrm.sync.upsert import SyncRun, page_size

log = logging.getLogger("omnicrm.sync.people")

PERSON_FIELDS = "names,emailAddresses,phoneNumbers,organizations,memberships,metadata"
OTHER_FIELDS = "emailAddresses,names,phoneNumbers,metadata"
OTHER_SCOPE = "https://www.googleapis.com/auth/contacts.other.readonly"
LIST_PAGE = 1000
WRITE_CHUNK = 100
LISTS = ("connections", "other")
LINK_SOURCE = {"connections": "google_contacts", "other": "google_other_contacts"}
IGNORED_GROUPS = {"myContacts", "all", "chatBuddies", "blocked"}
EXPIRED = {"EXPIRED_SYNC_TOKEN", "fullSyncRequired"}


def sync_contacts(run: SyncRun) -> None:
    service = clients.build_service("people", "v1", run.credentials, run.settings)
    state = run.load_state()
    try:
        tokens = json.loads(state.cursor) if state.cursor else {}
    except ValueError:
        tokens = {}
    progress = dict(state.progress or {})
    progress.setdefault("done", {})
    groups = _Groups(run, service)
    modes: set[str] = set()
    for name in LISTS:
        if name in progress["done"]:
            continue
        if name == "other" and not _other_granted(run.credentials):
            progress["done"][name] = None
            continue
        if progress.get("list") != name:
            token = None if run.full else tokens.get(name)
            progress.update({"list": name, "mode": "incremental" if token else "full", "sync_token": token,
                             "page_token": None, "seen": []})
        try:
            new_token = _follow(run, service, name, progress, groups)
        except clients.ScopeMissing:
            if name != "other":
                raise
            log.info("people: other contacts were not granted; skipped")
            new_token = None
        except clients.GoogleApiError as exc:
            if exc.status == 400 and exc.reason not in EXPIRED and progress.get("page_token"):
                log.info("people: saved page token refused, listing %s again", name)
                progress.update({"page_token": None, "seen": []})
                new_token = _follow(run, service, name, progress, groups)
            elif exc.reason in EXPIRED or exc.status == 410:
                log.info("people: %s sync token expired, listing everything", name)
                progress.update({"mode": "full", "sync_token": None, "page_token": None, "seen": []})
                new_token = _follow(run, service, name, progress, groups)
            else:
                raise
        progress["done"][name] = new_token
        modes.add(progress["mode"])
        progress["list"] = None
        if name != LISTS[-1]:
            run.save_progress(progress)
    run.stats.mode = modes.pop() if len(modes) == 1 else "mixed" if modes else "incremental"
    run.finish(json.dumps(progress["done"], sort_keys=True))


def _other_granted(credentials) -> bool:
    scopes = getattr(credentials, "granted_scopes", None) or getattr(credentials, "scopes", None)
    return not scopes or OTHER_SCOPE in scopes  # unknown scopes: ask, and take a 403 as "not granted"


def _follow(run: SyncRun, service, name: str, progress: dict, groups: "_Groups") -> str | None:
    while True:
        params = {"pageSize": page_size(LIST_PAGE), "requestSyncToken": True}
        if progress.get("sync_token"):
            params["syncToken"] = progress["sync_token"]
        if progress.get("page_token"):
            params["pageToken"] = progress["page_token"]
        if name == "connections":
            request = service.people().connections().list(resourceName="people/me", personFields=PERSON_FIELDS,
                                                          **params)
        else:
            request = service.otherContacts().list(readMask=OTHER_FIELDS, **params)
        page = clients.execute(request, f"people {name}.list")
        people = page.get("connections" if name == "connections" else "otherContacts") or []
        for start in range(0, len(people), WRITE_CHUNK):  # short transactions (see gmail._store)
            chunk = people[start:start + WRITE_CHUNK]
            run.atomically(lambda: _store_page(run, name, chunk, groups))
            run.commit()
        if progress["mode"] == "full":
            progress["seen"].extend(p["resourceName"] for p in people if p.get("resourceName"))
        progress["page_token"] = page.get("nextPageToken")
        if not progress["page_token"]:
            if progress["mode"] == "full":
                _sweep(run, name, set(progress["seen"]))
            progress["seen"] = []
            return page.get("nextSyncToken")
        run.save_progress(progress)


def _sweep(run: SyncRun, name: str, seen: set[str]) -> None:
    """After a full listing: people gone from Google (deleted while the token was expired) are unlinked."""
    from sqlalchemy import select

    from omnicrm.models import ExternalLink

    source = LINK_SOURCE[name]
    linked = set(run.session.scalars(select(ExternalLink.external_id).where(
        ExternalLink.user_id == run.user_id, ExternalLink.source == source)))
    for resource_name in sorted(linked - seen):
        run.upsert.unlink(source, resource_name)


def _first(items: list[dict] | None, key: str) -> str | None:
    for item in items or []:
        if (item.get("metadata") or {}).get("primary") and item.get(key):
            return str(item[key]).strip() or None
    for item in items or []:
        if item.get(key):
            return str(item[key]).strip() or None
    return None


def _store_page(run: SyncRun, name: str, people: list[dict], groups: "_Groups") -> None:
    source = LINK_SOURCE[name]
    batch = []
    for person in people:
        run.stats.items += 1
        resource_name = person.get("resourceName")
        if not resource_name:
            continue
        if (person.get("metadata") or {}).get("deleted"):
            run.upsert.unlink(source, resource_name)
            continue
        names = person.get("names") or []
        organisations = person.get("organizations") or []
        batch.append({
            "external_id": resource_name, "etag": person.get("etag"),
            "name": _first(names, "displayName") or _first(names, "unstructuredName"),
            "emails": [e.get("value", "") for e in person.get("emailAddresses") or [] if e.get("value")],
            "phones": [p.get("value", "") for p in person.get("phoneNumbers") or [] if p.get("value")],
            "company": _first(organisations, "name"), "title": _first(organisations, "title"),
            "tags": groups.tags(person.get("memberships") or [])})
    run.upsert.upsert_people(source, batch, create=name == "connections" or run.mode == "all")


class _Groups:
    """Contact group (label) names, fetched once per run and only when a person carries a label."""

    def __init__(self, run: SyncRun, service) -> None:
        self.run, self.service = run, service
        self.names: dict[str, str] | None = None

    def tags(self, memberships: list[dict]) -> list[str]:
        out = []
        for membership in memberships:
            group = (membership.get("contactGroupMembership") or {}).get("contactGroupResourceName")
            if not group:
                continue
            group_id = group.rsplit("/", 1)[-1]
            if group_id in IGNORED_GROUPS:
                continue
            if self.names is None:
                self._load()
            label = self.names.get(group) or (group_id if group_id in ("starred", "friends", "family",
                                                                         "coworkers") else None)
            if label:
                out.append(label)
        return out

    def _load(self) -> None:
        self.names = {}
        token = None
        while True:
            params = {"pageSize": 1000}
            if token:
                params["pageToken"] = token
            page = clients.execute(self.service.contactGroups().list(**params), "people contactGroups.list")
            for group in page.get("contactGroups") or []:
                label = group.get("formattedName") or group.get("name")
                if group.get("resourceName") and label:
                    self.names[group["resourceName"]] = label
            token = page.get("nextPageToken")
            if not token:
                return
