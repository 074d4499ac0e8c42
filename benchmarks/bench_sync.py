"""Sync benchmark: a full sync of Gmail (10,000 messages), Calendar (500 events) and Contacts (1,000
connections) against the fake Google API with 20 ms latency per HTTP request, then an incremental run
with no changes. The fake runs in its own process; the sync runs through the real product path
(`sync run`: one job per source, run in parallel in the foreground, credentials from the database).

    .venv/bin/python benchmarks/bench_sync.py [--quick] [--db URL]

Runs on a fresh SQLite database and, when OMNICRM_BENCH_PG_URL or OMNICRM_TEST_PG_URL is set, on a
scratch PostgreSQL database too (created and dropped); `--db URL` measures that database only.

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
from pgscratch import scratch_database  # noqa: E402  (benchmarks/ is the script's folder)

LATENCY = 0.020
SOURCES = (("gmail", "gmail"), ("calendar", "calendar"), ("contacts", "people"))  # source, fake counter


def fake_counts(root: str, reset: bool = False) -> dict:
    with urllib.request.urlopen(f"{root}/__fake__/{'reset' if reset else 'counts'}", timeout=10) as response:
        return json.loads(response.read())


def measure(root: str, db_url: str, home: Path, oauth) -> dict:
    """Full sync then incremental sync of one user on `db_url`; figures for this database."""
    from tests.fakes.google_oauth import connect_user

    from omnicrm import sync
    from omnicrm.config import load_settings
    from omnicrm.db import dispose_engines, session_scope
    from omnicrm.models import Job

    os.environ["OMNICRM_DATABASE_URL"] = db_url
    settings = load_settings()
    connect_user(settings, "bench", oauth)
    settings = settings.with_(user="bench")
    f: dict = {}
    fake_counts(root, reset=True)
    started = time.monotonic()
    report = sync.run_sync(settings)
    f["full_wall_s"] = round(time.monotonic() - started, 2)
    full = fake_counts(root)
    if report.exit_code != 0:
        raise SystemExit(f"sync failed: {report.rows}")
    with session_scope(settings) as session:
        for row in report.rows:
            job = session.get(Job, row["job_id"])
            f[f"full_{row['source']}_s"] = round((job.finished_at - job.started_at).total_seconds(), 2)
            f[f"full_{row['source']}_items"] = (job.result or {}).get("items")
        f.update(sync.counts(session, session.get(Job, report.rows[0]["job_id"]).user_id))
    for source, key in SOURCES:
        f[f"full_{source}_requests"] = full.get(f"requests.{key}", 0)
    f["full_gmail_list_calls"] = full.get("gmail.messages.list", 0)
    f["full_gmail_batch_calls"] = full.get("batch", 0)  # only Gmail uses batches here

    fake_counts(root, reset=True)
    started = time.monotonic()
    report = sync.run_sync(settings)
    f["incremental_wall_s"] = round(time.monotonic() - started, 2)
    incremental = fake_counts(root)
    f["incremental_requests"] = incremental.get("requests", 0)
    for source, key in SOURCES:
        f[f"incremental_{source}_requests"] = incremental.get(f"requests.{key}", 0)
    dispose_engines()
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 messages, 100 events, 200 connections")
    parser.add_argument("--db", help="measure this database only (default: SQLite, and PostgreSQL if configured)")
    args = parser.parse_args()
    messages, events, people = (1000, 100, 200) if args.quick else (10_000, 500, 1000)
    pg_base = os.environ.get("OMNICRM_BENCH_PG_URL") or os.environ.get("OMNICRM_TEST_PG_URL")

    from tests.fakes.google_api import serve_in_process
    from tests.fakes.google_oauth import FakeOAuthServer

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
    os.environ.update({"OMNICRM_HOME": str(home), "OMNICRM_GOOGLE_API_ROOT": root})
    figures: dict = {"messages": messages, "events": events, "connections": people, "other_contacts": 50,
                     "latency_ms": LATENCY * 1000,
                     "gmail_request_target": math.ceil(messages / 500) + math.ceil(messages / 50) + 2, "runs": {}}
    try:
        with FakeOAuthServer(email="me@example.com") as oauth:
            if args.db:
                targets = [("postgresql" if args.db.startswith("postgres") else "sqlite", args.db, None)]
            else:
                targets = [("sqlite", f"sqlite:///{home / 'omnicrm.db'}", None)]
                if pg_base:
                    url, drop = scratch_database(pg_base, "omnicrm_bench_sync")
                    targets.append(("postgresql", url, drop))
            for name, url, drop in targets:
                try:
                    figures["runs"][name] = measure(root, url, home, oauth)
                finally:
                    if drop:
                        drop()
    finally:
        stop.set()
        server.join(timeout=10)
    for name, f in figures["runs"].items():
        f["gmail_requests_ok"] = f["full_gmail_requests"] <= figures["gmail_request_target"]
        f["incremental_ok"] = f["incremental_requests"] <= 4
        f["wall_ok"] = f["full_wall_s"] <= 60
        for key, value in f.items():
            print(f"{name:10} {key:32} {value}")
    write_result(figures, args)


def write_result(figures: dict, args) -> None:
    ok = lambda flag: "yes" if flag else "**no**"  # noqa: E731
    f = figures
    rows, checks = [], []
    for name, r in f["runs"].items():
        rows.append(
            f"| {name} | {r['full_gmail_s']} s · {r['full_gmail_requests']} req "
            f"({r['full_gmail_list_calls']} list + {r['full_gmail_batch_calls']} batch + profile) "
            f"| {r['full_calendar_s']} s · {r['full_calendar_requests']} req "
            f"| {r['full_contacts_s']} s · {r['full_contacts_requests']} req "
            f"| **{r['full_wall_s']} s** | {r['incremental_gmail_requests']} + {r['incremental_calendar_requests']} + "
            f"{r['incremental_contacts_requests']} = **{r['incremental_requests']}** ({r['incremental_wall_s']} s) |")
        checks += [
            f"| {name}: Gmail full sync ≤ ⌈N/500⌉ + ⌈N/50⌉ + 2 = {f['gmail_request_target']} requests "
            f"| {r['full_gmail_requests']} | {ok(r['gmail_requests_ok'])} |",
            f"| {name}: incremental run with no changes ≤ 4 requests | {r['incremental_requests']} "
            f"| {ok(r['incremental_ok'])} |",
            f"| {name}: full sync of all three ≤ 60 s | {r['full_wall_s']} s | {ok(r['wall_ok'])} |"]
    first = next(iter(f["runs"].values()))
    markdown = f"""## Google sync

Full sync of {f['messages']:,} Gmail messages, {f['events']} calendar events and {f['connections']:,} connections
(+ {f['other_contacts']} other contacts) against the fake Google API with {f['latency_ms']:.0f} ms latency per HTTP
request (the fake runs in its own process), through `sync run`: three jobs in parallel, credentials from the
database. Then an incremental run with nothing new. Result: {first['contacts']:,} contacts,
{first['interactions']:,} interactions. Times are each job's start to finish; "all three" is the command's wall time.

| database | gmail | calendar | contacts | all three (parallel) | incremental: requests gmail + calendar + contacts |
|---|---|---|---|---|---|
{chr(10).join(rows)}

| target | measured | met |
|---|---|---|
{chr(10).join(checks)}
"""
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_sync.py" + (" --quick" if args.quick else "")
    (out / "sync.json").write_text(json.dumps({"title": "Google sync", "command": command, "figures": figures,
                                               "markdown": markdown}, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
