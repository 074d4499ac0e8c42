"""A fake Google API server (Gmail, Calendar, People and the multipart batch endpoints) on 127.0.0.1.

It follows the SPEC's endpoint convention: with `OMNICRM_GOOGLE_API_ROOT=fake.root`, the real client
libraries reach it with Google's own paths. Tests drive it only through those libraries.

    with FakeGoogleApi(email="me@example.com") as fake:
        fake.add_message(headers={"From": "Ann <ann@x.org>", "To": "me@example.com"})
        ...
        fake.counts["gmail.messages.get"]

Knobs: `latency` (seconds slept per HTTP request), `fault_rate` (share of requests and batch parts that
answer 429/500/503/403 rateLimitExceeded), `fail_next(status, n)` for deterministic faults,
`valid_tokens` (anything else gets 401), `denied_paths` (403 insufficientPermissions), cursor expiry switches (`expire_history`,
`expire_calendar_tokens`, `expire_people_tokens`) and `other_contacts_granted`.
"""

from __future__ import annotations

import email.parser
import json
import random
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           410: "Gone", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def classic_error(code: int, reason: str, message: str, status: str = "") -> dict:
    return {"error": {"code": code, "message": message,
                      "errors": [{"domain": "global", "reason": reason, "message": message}],
                      "status": status}}


def aip_error(code: int, status: str, reason: str, message: str, domain: str = "people.googleapis.com") -> dict:
    return {"error": {"code": code, "message": message, "status": status,
                      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                   "reason": reason, "domain": domain}]}}


class _Reply(Exception):
    def __init__(self, status: int, body: dict, headers: dict | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _ms(value) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


class _PeopleStore:
    """Connections or other contacts: records with a change sequence and tombstones."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.people: dict[str, dict] = {}
        self.changed: dict[str, int] = {}
        self.seq = 0
        self.min_seq = 0

    def put(self, person: dict) -> None:
        self.seq += 1
        self.people[person["resourceName"]] = person
        self.changed[person["resourceName"]] = self.seq

    def list(self, query: dict, fields_param: str) -> dict:
        if not query.get(fields_param):
            raise _Reply(400, aip_error(400, "INVALID_ARGUMENT", "badRequest", f"{fields_param} is required"))
        size = min(int(query.get("pageSize", "100")), 1000)
        token = query.get("pageToken")
        sync_token = query.get("syncToken")
        if token:
            offset, snapshot, since = (int(x) for x in token.split(":"))
        else:
            offset, snapshot = 0, self.seq
            since = -1
            if sync_token:
                since = int(sync_token.removeprefix("st"))
                if since < self.min_seq:
                    raise _Reply(400, aip_error(400, "FAILED_PRECONDITION", "EXPIRED_SYNC_TOKEN",
                                                "Sync token is expired. Clear local cache and retry call without "
                                                "the sync token."))
        if since < 0:
            names = sorted(n for n, p in self.people.items()
                           if not p.get("metadata", {}).get("deleted") and self.changed[n] <= snapshot)
        else:
            names = sorted((n for n in self.people if since < self.changed[n] <= snapshot),
                           key=lambda n: (self.changed[n], n))
        chunk = names[offset:offset + size]
        out: dict = {"totalItems": len(names)}
        key = "connections" if self.prefix == "people" else "otherContacts"
        if chunk:
            out[key] = [dict(self.people[n], etag=f"e{self.changed[n]}") for n in chunk]
        if offset + size < len(names):
            out["nextPageToken"] = f"{offset + size}:{snapshot}:{since}"
        elif query.get("requestSyncToken") == "true" or sync_token or token:
            out["nextSyncToken"] = f"st{snapshot}"
        return out


class FakeGoogleApi:
    def __init__(self, *, email: str = "me@example.com", latency: float = 0.0, fault_rate: float = 0.0,
                 seed: int = 7, retry_after: str | None = "0") -> None:
        self.email = email
        self.latency = latency
        self.fault_rate = fault_rate
        self.retry_after = retry_after
        self.valid_tokens: set[str] | None = None
        self.other_contacts_granted = True
        self.denied_paths: set[str] = set()  # path prefixes answering 403 insufficientPermissions (scope not granted)
        self.empty_history_pages = 0  # history.list answers this many empty pages (no `history` key) first
        self.counts: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._forced: list[tuple[int, str | None]] = []
        # Gmail
        self.messages: dict[str, dict] = {}
        self.history: list[tuple[int, str]] = []
        self.history_id = 1000
        self.min_history_id = 0
        # Calendar
        self.events: dict[str, dict] = {}
        self.event_seq: dict[str, int] = {}
        self.cal_seq = 0
        self.cal_min_seq = 0
        # People
        self.connections = _PeopleStore("people")
        self.other = _PeopleStore("otherContacts")
        self.groups: dict[str, dict] = {}
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "FakeGoogleApi":
        fake = self

        class Handler(_Handler):
            api = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeGoogleApi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def root(self) -> str:
        assert self._server, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, status: int, count: int = 1, path: str | None = None) -> None:
        """The next `count` requests (or batch parts) whose path contains `path` answer `status`."""
        with self._lock:
            self._forced.extend([(status, path)] * count)

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()

    # --- Gmail data -----------------------------------------------------------------------------
    def add_message(self, headers: dict | list, *, labels=("INBOX",), date=None, id: str | None = None,
                    thread_id: str | None = None) -> str:
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
        with self._lock:
            message_id = id or f"m{uuid.uuid4().hex[:14]}"
            when = _ms(date) if date is not None else 1_700_000_000_000 + len(self.messages) * 60_000
            self.history_id += 1
            self.messages[message_id] = {"id": message_id, "threadId": thread_id or message_id,
                                         "labelIds": list(labels), "internalDate": str(when),
                                         "historyId": str(self.history_id), "headers": pairs}
            self.history.append((self.history_id, message_id))
            return message_id

    def expire_history(self) -> None:
        """Any startHistoryId older than now answers 404 (as after about a week)."""
        with self._lock:
            self.min_history_id = self.history_id + 1

    # --- Calendar data --------------------------------------------------------------------------
    def put_event(self, event: dict) -> str:
        with self._lock:
            event = dict(event)
            event.setdefault("id", f"ev{uuid.uuid4().hex[:12]}")
            event.setdefault("status", "confirmed")
            self.cal_seq += 1
            self.events[event["id"]] = event
            self.event_seq[event["id"]] = self.cal_seq
            return event["id"]

    def cancel_event(self, event_id: str) -> None:
        with self._lock:
            self.cal_seq += 1
            self.events[event_id] = {"id": event_id, "status": "cancelled"}
            self.event_seq[event_id] = self.cal_seq

    def expire_calendar_tokens(self) -> None:
        with self._lock:
            self.cal_min_seq = self.cal_seq + 1

    # --- People data ----------------------------------------------------------------------------
    def put_person(self, person: dict, *, other: bool = False) -> None:
        with self._lock:
            person = dict(person)
            person.setdefault("metadata", {"sources": [{"type": "CONTACT"}]})
            (self.other if other else self.connections).put(person)

    def delete_person(self, resource_name: str, *, other: bool = False) -> None:
        with self._lock:
            (self.other if other else self.connections).put(
                {"resourceName": resource_name, "metadata": {"deleted": True}})

    def put_group(self, resource_name: str, name: str, group_type: str = "USER_CONTACT_GROUP") -> None:
        with self._lock:
            self.groups[resource_name] = {"resourceName": resource_name, "name": name,
                                          "formattedName": name, "groupType": group_type}

    def expire_people_tokens(self) -> None:
        with self._lock:
            self.connections.min_seq = self.connections.seq + 1
            self.other.min_seq = self.other.seq + 1

    # --- request handling -----------------------------------------------------------------------
    def _fault(self, path: str) -> tuple[int, dict, dict] | None:
        with self._lock:
            for i, (status, where) in enumerate(self._forced):
                if where is None or where in path:
                    del self._forced[i]
                    return self._fault_reply(status)
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._fault_reply(self._rng.choice([429, 500, 503, 403]))
        return None

    def _fault_reply(self, status: int) -> tuple[int, dict, dict]:
        self.counts["faults"] += 1
        headers = {"Retry-After": self.retry_after} if status in (429, 503) and self.retry_after else {}
        if status == 403:
            return 403, classic_error(403, "userRateLimitExceeded", "User rate limit exceeded.",
                                      "PERMISSION_DENIED"), headers
        if status == 429:
            return 429, classic_error(429, "rateLimitExceeded", "Rate limit exceeded.",
                                      "RESOURCE_EXHAUSTED"), headers
        return status, classic_error(status, "backendError", "Backend Error", "INTERNAL"), headers

    def _authorised(self, headers) -> bool:
        if self.valid_tokens is None:
            return True
        value = headers.get("Authorization") or headers.get("authorization") or ""
        return value.removeprefix("Bearer ").strip() in self.valid_tokens

    def handle(self, method: str, target: str, headers, *, part: bool = False) -> tuple[int, dict, dict]:
        split = urlsplit(target)
        path = split.path
        query = {k: (v if len(v) > 1 else v[0]) for k, v in parse_qs(split.query).items()}
        fault = self._fault(path)
        if fault:
            return fault
        if not self._authorised(headers):
            return 401, classic_error(401, "authError", "Invalid Credentials", "UNAUTHENTICATED"), {}
        if any(path.startswith(prefix) for prefix in self.denied_paths):
            return 403, classic_error(403, "insufficientPermissions",
                                      "Request had insufficient authentication scopes.", "PERMISSION_DENIED"), {}
        try:
            with self._lock:
                return 200, self._route(method, path, query), {}
        except _Reply as reply:
            return reply.status, reply.body, reply.headers

    def _route(self, method: str, path: str, query: dict) -> dict:
        if method != "GET":
            raise _Reply(405, classic_error(405, "methodNotAllowed", "Only GET is faked"))
        if path == "/gmail/v1/users/me/profile":
            self.counts["gmail.profile"] += 1
            return {"emailAddress": self.email, "messagesTotal": len(self.messages),
                    "threadsTotal": len(self.messages), "historyId": str(self.history_id)}
        if path == "/gmail/v1/users/me/messages":
            self.counts["gmail.messages.list"] += 1
            return self._messages_list(query)
        if path.startswith("/gmail/v1/users/me/messages/"):
            self.counts["gmail.messages.get"] += 1
            return self._message_get(path.rsplit("/", 1)[1], query)
        if path == "/gmail/v1/users/me/history":
            self.counts["gmail.history.list"] += 1
            return self._history_list(query)
        if path == "/calendar/v3/calendars/primary/events":
            self.counts["calendar.events.list"] += 1
            return self._events_list(query)
        if path == "/v1/people/me/connections":
            self.counts["people.connections.list"] += 1
            return self.connections.list(query, "personFields")
        if path == "/v1/otherContacts":
            self.counts["people.otherContacts.list"] += 1
            if not self.other_contacts_granted:
                raise _Reply(403, aip_error(403, "PERMISSION_DENIED", "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                                            "Request had insufficient authentication scopes."))
            return self.other.list(query, "readMask")
        if path == "/v1/contactGroups":
            self.counts["people.contactGroups.list"] += 1
            return {"contactGroups": list(self.groups.values()), "totalItems": len(self.groups)}
        raise _Reply(404, classic_error(404, "notFound", f"no fake for {path}", "NOT_FOUND"))

    def _messages_list(self, query: dict) -> dict:
        size = min(int(query.get("maxResults", "100")), 500)
        spam_trash = query.get("includeSpamTrash") == "true"
        ordered = sorted((m for m in self.messages.values()
                          if spam_trash or not {"SPAM", "TRASH"} & set(m["labelIds"])),
                         key=lambda m: (-int(m["internalDate"]), m["id"]))
        offset = int(query.get("pageToken", "0"))
        chunk = ordered[offset:offset + size]
        out: dict = {"resultSizeEstimate": len(ordered)}
        if chunk:
            out["messages"] = [{"id": m["id"], "threadId": m["threadId"]} for m in chunk]
        if offset + size < len(ordered):
            out["nextPageToken"] = str(offset + size)
        return out

    def _message_get(self, message_id: str, query: dict) -> dict:
        message = self.messages.get(message_id)
        if message is None:
            raise _Reply(404, classic_error(404, "notFound", "Requested entity was not found.", "NOT_FOUND"))
        wanted = query.get("metadataHeaders", [])
        wanted = {w.lower() for w in ([wanted] if isinstance(wanted, str) else wanted)}
        headers = [{"name": n, "value": v} for n, v in message["headers"]
                   if query.get("format") != "metadata" or not wanted or n.lower() in wanted]
        return {"id": message["id"], "threadId": message["threadId"], "labelIds": message["labelIds"],
                "snippet": "", "historyId": message["historyId"], "internalDate": message["internalDate"],
                "sizeEstimate": 1000, "payload": {"mimeType": "text/plain", "headers": headers}}

    def _history_list(self, query: dict) -> dict:
        start = int(query["startHistoryId"])
        if start < self.min_history_id:
            raise _Reply(404, classic_error(404, "notFound", "Requested entity was not found.", "NOT_FOUND"))
        token = query.get("pageToken")
        offset = 0
        if token:
            offset = int(token)
        elif self.empty_history_pages:
            self.empty_history_pages -= 1
            return {"historyId": str(self.history_id), "nextPageToken": "0"}
        size = min(int(query.get("maxResults", "100")), 500)
        records = [(hid, mid) for hid, mid in self.history if hid > start and mid in self.messages]
        chunk = records[offset:offset + size]
        out: dict = {"historyId": str(self.history_id)}
        if chunk:
            history = []
            for hid, mid in chunk:
                m = self.messages[mid]
                summary = {"id": mid, "threadId": m["threadId"], "labelIds": m["labelIds"]}
                history.append({"id": str(hid), "messages": [{"id": mid, "threadId": m["threadId"]}],
                                "messagesAdded": [{"message": summary}]})
            out["history"] = history
        if offset + size < len(records):
            out["nextPageToken"] = str(offset + size)
        return out

    def _events_list(self, query: dict) -> dict:
        if query.get("singleEvents") != "true":
            raise _Reply(400, classic_error(400, "badRequest", "this fake only lists singleEvents=true"))
        size = min(int(query.get("maxResults", "250")), 2500)
        sync_token = query.get("syncToken")
        if sync_token and any(k in query for k in ("timeMin", "timeMax", "q", "orderBy")):
            raise _Reply(400, classic_error(400, "invalid", "syncToken cannot be combined with timeMin etc."))
        token = query.get("pageToken")
        if token:
            offset, snapshot, since = (int(x) for x in token.split(":"))
        else:
            offset, snapshot, since = 0, self.cal_seq, -1
            if sync_token:
                since = int(sync_token.removeprefix("ct"))
                if since < self.cal_min_seq:
                    raise _Reply(410, classic_error(410, "fullSyncRequired",
                                                    "Sync token is no longer valid, a full sync is required.",
                                                    "GONE"))
        if since < 0:
            time_min = query.get("timeMin")
            ids = sorted((i for i, e in self.events.items()
                          if e.get("status") != "cancelled" and self.event_seq[i] <= snapshot
                          and (not time_min or _event_start(e) >= time_min)),
                         key=lambda i: (_event_start(self.events[i]), i))
        else:
            ids = sorted((i for i in self.events if since < self.event_seq[i] <= snapshot),
                         key=lambda i: (self.event_seq[i], i))
        chunk = ids[offset:offset + size]
        out: dict = {"kind": "calendar#events", "summary": self.email, "timeZone": "UTC",
                     "items": [dict(self.events[i], etag=f'"{self.event_seq[i]}"') for i in chunk]}
        if offset + size < len(ids):
            out["nextPageToken"] = f"{offset + size}:{snapshot}:{since}"
        else:
            out["nextSyncToken"] = f"ct{snapshot}"
        return out

    # --- batch ----------------------------------------------------------------------------------
    def handle_batch(self, content_type: str, body: bytes) -> tuple[int, bytes, str]:
        message = email.parser.BytesParser().parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        if not message.is_multipart():
            return 400, b'{"error": {"code": 400, "message": "not multipart"}}', "application/json"
        boundary = f"batch_{uuid.uuid4().hex}"
        out: list[str] = []
        parts = message.get_payload()
        if len(parts) > 100:
            return 400, json.dumps(classic_error(400, "badRequest", "more than 100 calls in a batch")).encode(), \
                "application/json"
        for part in parts:
            content_id = part["Content-ID"] or ""
            raw = part.get_payload()
            if isinstance(raw, bytes):
                raw = raw.decode()
            head, _, _inner_body = raw.replace("\r\n", "\n").partition("\n\n")
            lines = head.split("\n")
            method, target, _ = lines[0].split(" ", 2)
            inner_headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    inner_headers[k.strip()] = v.strip()
            status, payload, extra = self.handle(method, target, inner_headers, part=True)
            head_lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
                          "Content-Type: application/json; charset=UTF-8"]
            head_lines += [f"{k}: {v}" for k, v in extra.items()]
            inner = "\r\n".join(head_lines) + "\r\n\r\n" + json.dumps(payload)
            cid = content_id.strip()
            cid = "<response-" + cid[1:] if cid.startswith("<") else f"<response-{cid}>"
            out.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: {cid}\r\n\r\n{inner}\r\n")
        out.append(f"--{boundary}--\r\n")
        return 200, "".join(out).encode(), f"multipart/mixed; boundary={boundary}"


def _event_start(event: dict) -> str:
    start = event.get("start") or {}
    return start.get("dateTime") or start.get("date") or ""


def _source_of(path: str, body: bytes = b"") -> str:
    probe = path if not path.startswith("/batch") else body[:4000].decode("utf-8", "replace")
    if "/gmail/" in probe:
        return "gmail"
    if "/calendar/" in probe:
        return "calendar"
    return "people"


class _Handler(BaseHTTPRequestHandler):
    api: FakeGoogleApi
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status, REASONS.get(status))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        try:
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a timeout): no one to answer
            self.close_connection = True

    def _count(self, body: bytes = b"") -> None:
        with self.api._lock:
            self.api.counts["requests"] += 1
            self.api.counts[f"requests.{_source_of(self.path, body)}"] += 1

    def do_GET(self) -> None:
        if self.path.startswith("/__fake__/"):  # out-of-band control for a fake in another process
            if self.path == "/__fake__/reset":
                self.api.reset_counts()
            self._send(200, json.dumps(dict(self.api.counts)).encode(), "application/json")
            return
        self._count()
        if self.api.latency:
            time.sleep(self.api.latency)
        status, payload, extra = self.api.handle("GET", self.path, self.headers)
        self._send(status, json.dumps(payload).encode(), "application/json; charset=UTF-8", extra)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self._count(body)
        if self.api.latency:
            time.sleep(self.api.latency)
        path = urlsplit(self.path).path
        if path not in ("/batch", "/batch/calendar/v3"):
            self._send(404, b'{"error": {"code": 404, "message": "no such endpoint"}}', "application/json")
            return
        with self.api._lock:
            self.api.counts["batch"] += 1
        fault = self.api._fault(path)
        if fault:
            status, payload, extra = fault
            self._send(status, json.dumps(payload).encode(), "application/json", extra)
            return
        if not self.api._authorised(self.headers):
            self._send(401, json.dumps(classic_error(401, "authError", "Invalid Credentials")).encode(),
                       "application/json")
            return
        status, data, content_type = self.api.handle_batch(self.headers.get("Content-Type", ""), body)
        self._send(status, data, content_type)


def now_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


def serve_in_process(root_queue, stop_event, *, latency: float = 0.0, email: str = "me@example.com",
                     **data) -> None:
    """Target of a multiprocessing.Process: populate, serve, put the root URL on `root_queue`, wait for
    `stop_event` (benchmarks keep the fake off the client's interpreter lock this way)."""
    fake = FakeGoogleApi(email=email, latency=latency)
    populate(fake, **data)
    with fake:
        root_queue.put(fake.root)
        stop_event.wait()


# --- helpers for tests and benchmarks -------------------------------------------------------------

CORRESPONDENTS = [("Ann Lee", "ann@example.org"), ("Bob Stone", "bob@example.org"), ("Carla Diaz", "carla@example.net"),
                  ("Dev Patel", "dev@example.net"), ("Eve Moss", "eve@example.com"), ("Finn O'Hara", "finn@example.com")]


def populate(fake: FakeGoogleApi, *, messages: int = 0, events: int = 0, people: int = 0, other: int = 0,
             correspondents: int = 200) -> None:
    """Deterministic test data: mail with a mix of inbound, sent and automated messages, meetings with
    attendees, and People connections overlapping the correspondents."""
    me = fake.email
    base = 1_600_000_000_000
    for i in range(messages):
        who = i % correspondents
        name, address = f"Person {who}", f"person{who}@example.org"
        other_who = (i * 7 + 3) % correspondents
        kind = i % 10
        if kind < 6:
            headers = {"From": f'"{name}" <{address}>', "To": f"{me}, person{other_who}@example.org",
                       "Subject": f"Hello {i}"}
            labels = ["INBOX"]
        elif kind < 9:
            headers = {"From": f"Me <{me}>", "To": f"{name} <{address}>", "Subject": f"Re: Hello {i}"}
            labels = ["SENT"]
        else:
            headers = {"From": "Shop <noreply@shop.example>", "To": me, "Subject": "Sale",
                       "List-Unsubscribe": "<mailto:u@shop.example>"}
            labels = ["INBOX"]
        fake.add_message(headers, labels=labels, date=base + i * 60_000, id=f"m{i:07d}")
    for i in range(events):
        who = i % correspondents
        start = datetime.fromtimestamp(base / 1000 + i * 86400, tz=timezone.utc)
        fake.put_event({"id": f"ev{i:06d}", "summary": f"Meeting {i}",
                        "start": {"dateTime": start.isoformat().replace("+00:00", "Z")},
                        "end": {"dateTime": start.isoformat().replace("+00:00", "Z")},
                        "organizer": {"email": me, "self": True},
                        "attendees": [{"email": me, "self": True, "responseStatus": "accepted"},
                                      {"email": f"person{who}@example.org", "displayName": f"Person {who}",
                                       "responseStatus": "needsAction"},
                                      {"email": "room1@resource.calendar.google.com", "resource": True}]})
    for i in range(people):
        who = i % (correspondents * 2)
        fake.put_person({"resourceName": f"people/c{i:06d}",
                         "names": [{"displayName": f"Person {who} Full", "metadata": {"primary": True}}],
                         "emailAddresses": [{"value": f"person{who}@example.org"},
                                            {"value": f"p{i}@work.example"}],
                         "phoneNumbers": [{"value": f"+1 415 555 {i % 10000:04d}"}],
                         "organizations": [{"name": f"Org {i % 17}", "title": "Engineer"}],
                         "memberships": [{"contactGroupMembership": {
                             "contactGroupResourceName": "contactGroups/myContacts"}}]})
    for i in range(other):
        fake.put_person({"resourceName": f"otherContacts/c{i:06d}",
                         "emailAddresses": [{"value": f"other{i}@example.com"}],
                         "names": [{"displayName": f"Other {i}"}]}, other=True)


def snapshot(session, user_id: int) -> dict:
    """The user's contacts and interactions, independent of row ids (to compare two runs)."""
    from sqlalchemy import select

    from omnicrm.models import Contact, ExternalLink, Interaction

    contacts = list(session.scalars(select(Contact).where(Contact.user_id == user_id)))
    key = {c.id: min((e.email for e in c.emails), default=f"name:{c.display_name}") for c in contacts}
    links = {(key[l.contact_id], l.source, l.external_id) for l in session.scalars(
        select(ExternalLink).where(ExternalLink.user_id == user_id))}
    people = sorted((key[c.id], c.display_name, c.company, c.title, tuple(sorted(e.email for e in c.emails)),
                     tuple(sorted(p.value for p in c.phones)), tuple(t.name for t in c.tags), c.last_interaction_at,
                     c.manual_fields) for c in contacts)
    interactions = sorted(
        (key[i.contact_id], i.kind, i.direction, i.occurred_at, i.subject, i.source,
         i.external_id.rsplit(":", 1)[0]) for i in session.scalars(
            select(Interaction).where(Interaction.user_id == user_id)))
    return {"contacts": people, "interactions": interactions, "links": sorted(links)}
