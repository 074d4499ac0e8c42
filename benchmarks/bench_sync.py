"""Sync benchmark: a full sync of Gmail (10,000 messages), Calendar (500 events) and Contacts (1,000
connections) against the fake Google API with 20 ms latency per HTTP request, then an incremental run
with no changes. The fake runs in its own process; the sync runs through the real product path
(`sync run`: one job per source, run in parallel in the foreground, credentials from the database).

    .venv/bin/python benchmarks/bench_sync.py [--quick] [--db URL]

Targets (issue 6): a full Gmail sync uses at most ⌈N/500⌉ list calls + ⌈N/50⌉ batch calls + 2 requests;
an incremental run with no changes uses at most one request per list (≤ 4 in all); the full sync of
all three finishes in ≤ 60 s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LATENCY = 0.020


def fake_counts(root: str, reset: bool = False) -> dict:
    with urllib.request.urlopen(f"{root}/__fake__/{'reset' if reset else 'counts'}", timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 messages, 100 events, 200 connections")
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    messages, events, people = (1000, 100, 200) if args.quick else (10_000, 500, 1000)

    from tests.fakes.google_api import serve_in_process
    from tests.fakes.google_oauth import FakeOAuthServer, connect_user

    ctx = multiprocessing.get_context("spawn")
    roots, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=serve_in_process, args=(roots, stop),
                         kwargs={"latency": LATENCY, "messages": messages, "events": events, "people": people,
                                 "other": 50, "correspondents": 500}, daemon=True)
    server.start()
    root = roots.get(timeout=300)
    home = Path(tempfile.mkdtemp(prefix="omnicrm-bench-sync-"))
    for key in [k for k in os.environ if k.startswith("OMNICRM_") and not k.startswith("OMNICRM_TEST_")]:
        del os.environ[key]
    os.environ.update({"OMNICRM_HOME": str(home), "OMNICRM_GOOGLE_API_ROOT": root,
                       "OMNICRM_DATABASE_URL": args.db or f"sqlite:///{home / 'omnicrm.db'}"})
    from omnicrm import sync
    from omnicrm.config import load_settings
    from omnicrm.db import session_scope
    from omnicrm.models import Job

    settings = load_settings()
    figures: dict = {"messages": messages, "events": events, "connections": people, "other_contacts": 50,
                     "latency_ms": LATENCY * 1000, "database": "postgresql" if "postgresql" in settings.database_url
                     else "sqlite"}
    try:
        with FakeOAuthServer(email="me@example.com") as oauth:
            connect_user(settings, "bench", oauth)
            settings = settings.with_(user="bench")
            fake_counts(root, reset=True)
            started = time.monotonic()
            report = sync.run_sync(settings)
            figures["full_wall_s"] = round(time.monotonic() - started, 2)
            full = fake_counts(root)
            assert report.exit_code == 0, report.rows
            with session_scope(settings) as session:
                for row in report.rows:
                    job = session.get(Job, row["job_id"])
                    source = row["source"]
                    figures[f"full_{source}_s"] = round((job.finished_at - job.started_at).total_seconds(), 2)
                    figures[f"full_{source}_items"] = (job.result or {}).get("items")
                counted = sync.counts(session, session.get(Job, report.rows[0]["job_id"]).user_id)
            figures["contacts"] = counted["contacts"]
            figures["interactions"] = counted["interactions"]
            for source, key in (("gmail", "gmail"), ("calendar", "calendar"), ("contacts", "people")):
                figures[f"full_{source}_requests"] = full.get(f"requests.{key}", 0)
            figures["full_gmail_list_calls"] = full.get("gmail.messages.list", 0)
            figures["full_gmail_batch_calls"] = full.get("batch", 0)  # only Gmail batches (People/Calendar list)
            figures["gmail_request_target"] = math.ceil(messages / 500) + math.ceil(messages / 50) + 2

            fake_counts(root, reset=True)
            started = time.monotonic()
            report = sync.run_sync(settings)
            figures["incremental_wall_s"] = round(time.monotonic() - started, 2)
            incremental = fake_counts(root)
            figures["incremental_requests"] = incremental.get("requests", 0)
            for source, key in (("gmail", "gmail"), ("calendar", "calendar"), ("contacts", "people")):
                figures[f"incremental_{source}_requests"] = incremental.get(f"requests.{key}", 0)
    finally:
        stop.set()
        server.join(timeout=10)

    checks = {
        "gmail_requests_ok": figures["full_gmail_requests"] <= figures["gmail_request_target"],
        "incremental_ok": figures["incremental_requests"] <= 4,
        "wall_ok": figures["full_wall_s"] <= 60,
    }
    figures.update(checks)
    for key, value in figures.items():
        print(f"{key:32} {value}")
    write_result(figures, args)


def write_result(f: dict, args) -> None:
    ok = lambda flag: "yes" if flag else "**no**"  # noqa: E731
    markdown = f"""## Google sync

Full sync of {f['messages']:,} Gmail messages, {f['events']} calendar events and {f['connections']:,} connections
(+ {f['other_contacts']} other contacts) against the fake Google API with {f['latency_ms']:.0f} ms latency per HTTP
request (fake in its own process), through `sync run` (three jobs in parallel, {f['database']}); then an
incremental run with nothing new. Result: {f['contacts']:,} contacts, {f['interactions']:,} interactions.

| source | full: wall time | full: requests | incremental: requests |
|---|---|---|---|
| gmail | {f['full_gmail_s']} s | {f['full_gmail_requests']} ({f['full_gmail_list_calls']} list + {f['full_gmail_batch_calls']} batch + profile) | {f['incremental_gmail_requests']} |
| calendar | {f['full_calendar_s']} s | {f['full_calendar_requests']} | {f['incremental_calendar_requests']} |
| contacts | {f['full_contacts_s']} s | {f['full_contacts_requests']} | {f['incremental_contacts_requests']} |
| **all three (parallel)** | **{f['full_wall_s']} s** | | **{f['incremental_requests']}** |

| target | measured | met |
|---|---|---|
| Gmail full sync ≤ ⌈N/500⌉ + ⌈N/50⌉ + 2 = {f['gmail_request_target']} requests | {f['full_gmail_requests']} | {ok(f['gmail_requests_ok'])} |
| incremental run with no changes ≤ 4 requests | {f['incremental_requests']} | {ok(f['incremental_ok'])} |
| full sync of all three ≤ 60 s | {f['full_wall_s']} s | {ok(f['wall_ok'])} |
"""
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_sync.py" + (" --quick" if args.quick else "")
    (out / "sync.json").write_text(json.dumps({"title": "Google sync", "command": command, "figures": f,
                                               "markdown": markdown}, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
