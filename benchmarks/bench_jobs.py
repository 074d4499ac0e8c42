"""Jobs benchmark: 400 jobs that each wait 100 ms, one at a time versus `omnicrm worker --workers 8/32`,
and no-op jobs per second, on each queue backend (SQLite; PostgreSQL; Redis), measured in one run.

    .venv/bin/python benchmarks/bench_jobs.py [--quick]

Jobs are queued and delivered first; then a real `omnicrm worker` process drains them. The time is
measured from the first job start to the last job finish recorded in the jobs table (process start-up
and enqueueing excluded). PostgreSQL uses OMNICRM_BENCH_PG_URL or OMNICRM_TEST_PG_URL (a scratch
database is created and dropped); Redis uses OMNICRM_BENCH_REDIS_URL or OMNICRM_TEST_REDIS_URL (with
the PostgreSQL database, else SQLite, as the jobs table). Missing servers are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pgscratch import scratch_database  # noqa: E402  (benchmarks/ is the script's folder)

SLEEP = 0.1


def make_env(home: Path, db_url: str, queue_url: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICRM_") or k.startswith("OMNICRM_TEST_")}
    env.update({"OMNICRM_HOME": str(home), "OMNICRM_DATABASE_URL": db_url,
                "OMNICRM_QUEUE_NAME": f"bench{uuid.uuid4().hex[:8]}"})
    if queue_url:
        env["OMNICRM_QUEUE_URL"] = queue_url
    return env


def enqueue(settings, kind: str, payload: dict, count: int) -> list[int]:
    from omnicrm import jobs
    from omnicrm.db import session_scope, user_id

    with session_scope(settings) as session:
        uid = user_id(session, "bench")
        ids = [jobs.enqueue(session, uid, kind, payload).id for _ in range(count)]
        session.commit()
    jobs.deliver(settings, ids)
    return ids


def drain_seconds(env: dict, settings, ids: list[int], workers: int, timeout: float) -> float:
    """Start a worker, wait until these jobs are done, stop it; first start → last finish in seconds."""
    from sqlalchemy import func, select

    from omnicrm.db import session_scope
    from omnicrm.models import Job

    proc = subprocess.Popen([sys.executable, "-m", "omnicrm", "--quiet", "worker", "--workers", str(workers)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with session_scope(settings) as session:
                left = session.scalar(select(func.count()).where(Job.id.in_(ids), Job.status != "done"))
                if left == 0:
                    first, last = session.execute(select(func.min(Job.started_at), func.max(Job.finished_at))
                                                  .where(Job.id.in_(ids))).one()
                    return (last - first).total_seconds()
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{left} job(s) not done (worker exit code {proc.poll()})")
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_backend(name: str, db_url: str, queue_url: str | None, sleep_jobs: int, noop_jobs: int) -> dict:
    from omnicrm.config import load_settings
    from omnicrm.db import dispose_engines
    from omnicrm.queue import forget_queues

    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="omnicrm-bench-") as tmp:
        env = make_env(Path(tmp), db_url.replace("{home}", tmp), queue_url)
        settings = load_settings(env)
        try:
            for workers in (1, 8, 32):
                ids = enqueue(settings, "sleep", {"seconds": SLEEP}, sleep_jobs)
                seconds = drain_seconds(env, settings, ids, workers, timeout=sleep_jobs * SLEEP * 3 + 60)
                figures[f"sleep_w{workers}_s"] = round(seconds, 2)
                print(f"  {name}: {sleep_jobs} × {SLEEP * 1000:.0f} ms jobs, --workers {workers}: {seconds:.2f} s",
                      flush=True)
            for workers in (8, 32):
                figures[f"speedup_w{workers}"] = round(figures["sleep_w1_s"] / figures[f"sleep_w{workers}_s"], 2)
            ids = enqueue(settings, "noop", {}, noop_jobs)
            seconds = drain_seconds(env, settings, ids, 8, timeout=120)
            figures["noop_per_s"] = round(noop_jobs / seconds, 1)
            print(f"  {name}: {noop_jobs} no-op jobs, --workers 8: {figures['noop_per_s']:.0f} jobs/s", flush=True)
        finally:
            if queue_url and queue_url.startswith("redis"):
                import redis

                client = redis.Redis.from_url(queue_url)
                for key in client.scan_iter(f"huey.*.{env['OMNICRM_QUEUE_NAME']}*"):
                    client.delete(key)
            forget_queues()
            dispose_engines()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 sleep jobs and 200 no-op jobs per backend")
    args = parser.parse_args()
    sleep_jobs, noop_jobs = (40, 200) if args.quick else (400, 2000)
    pg = os.environ.get("OMNICRM_BENCH_PG_URL") or os.environ.get("OMNICRM_TEST_PG_URL")
    rd = os.environ.get("OMNICRM_BENCH_REDIS_URL") or os.environ.get("OMNICRM_TEST_REDIS_URL")
    results: dict = {}
    print(f"jobs benchmark: {sleep_jobs} jobs of {SLEEP * 1000:.0f} ms, {noop_jobs} no-op jobs, "
          f"{os.cpu_count()} CPU(s)", flush=True)
    results["sqlite"] = bench_backend("sqlite", "sqlite:///{home}/omnicrm.db", None, sleep_jobs, noop_jobs)
    if pg:
        url, drop = scratch_database(pg, "omnicrm_bench_jobs")
        try:
            results["postgresql"] = bench_backend("postgresql", url, None, sleep_jobs, noop_jobs)
        finally:
            drop()
    else:
        print("  postgresql: skipped (set OMNICRM_BENCH_PG_URL or OMNICRM_TEST_PG_URL)")
    if rd:
        if pg:
            url, drop = scratch_database(pg, "omnicrm_bench_jobs")
        else:
            url, drop = "sqlite:///{home}/omnicrm.db", (lambda: None)
        try:
            results["redis"] = bench_backend("redis", url, rd, sleep_jobs, noop_jobs)
            results["redis"]["jobs_table"] = "postgresql" if pg else "sqlite"
        finally:
            drop()
    else:
        print("  redis: skipped (set OMNICRM_BENCH_REDIS_URL or OMNICRM_TEST_REDIS_URL)")

    lines = ["## Jobs: parallel workers", "",
             f"{sleep_jobs} jobs that each wait {SLEEP * 1000:.0f} ms on I/O (built-in `sleep` kind), drained by "
             "`omnicrm worker` after they were queued; time from the first job start to the last finish. "
             f"No-op jobs/s: {noop_jobs} `noop` jobs with `--workers 8`. "
             "Targets: speedup ≥ 0.8 × workers (≥ 6.4× with 8, ≥ 25.6× with 32); ≥ 500 no-op jobs/s.", "",
             "| queue | one at a time | --workers 8 | speedup (target 6.4×) | --workers 32 | speedup (target 25.6×) "
             "| no-op jobs/s (target 500) |",
             "|---|---|---|---|---|---|---|"]
    for name, f in results.items():
        label = name + (f" (jobs table on {f['jobs_table']})" if "jobs_table" in f else "")
        lines.append(f"| {label} | {f['sleep_w1_s']:.2f} s | {f['sleep_w8_s']:.2f} s | {f['speedup_w8']:.1f}× "
                     f"| {f['sleep_w32_s']:.2f} s | {f['speedup_w32']:.1f}× | {f['noop_per_s']:.0f} |")
    markdown = "\n".join(lines) + "\n"
    print()
    print(markdown)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_jobs.py" + (" --quick" if args.quick else "")
    (out / "jobs.json").write_text(json.dumps({"title": "Jobs: parallel workers", "command": command,
                                               "figures": results, "markdown": markdown}, indent=2) + "\n")


if __name__ == "__main__":
    main()
