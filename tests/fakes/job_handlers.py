"""Test-only job kinds, loaded by real workers through OMNICRM_EXTRA_HANDLERS=tests.fakes.job_handlers.

Every handler appends `event job_id pid time` lines to the file named by OMNICRM_TEST_JOB_LOG (one
small O_APPEND write each, so lines from several processes never interleave).
- `test:record`: idempotent effect (a tag named `effect-<job id>`, created once however often the job
  runs), then waits `payload["seconds"]` while heartbeating.
- `test:fail`: always raises (retried with backoff, then dead).
- `test:permanent`: raises PermanentFailure (failed at once).
"""

from __future__ import annotations

import os
import time


def log_event(event: str, job_id: int) -> None:
    path = os.environ.get("OMNICRM_TEST_JOB_LOG")
    if path:
        line = f"{event} {job_id} {os.getpid()} {time.time():.6f}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_events(path) -> list[tuple[str, int, int, float]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [(e, int(j), int(p), float(t)) for e, j, p, t in (line.split() for line in fh if line.strip())]


def record(ctx) -> dict:
    from omnicrm.contacts import get_tag

    log_event("start", ctx.job_id)
    with ctx.session() as session:
        get_tag(session, ctx.user_id, f"effect-{ctx.job_id}")  # creates it only if missing
        session.commit()
    deadline = time.monotonic() + float(ctx.payload.get("seconds", 0))
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        ctx.heartbeat()
    log_event("end", ctx.job_id)
    return {"pid": os.getpid()}


def fail(ctx) -> None:
    log_event("start", ctx.job_id)
    raise RuntimeError("boom")


def permanent(ctx) -> None:
    from omnicrm.jobs import PermanentFailure

    log_event("start", ctx.job_id)
    raise PermanentFailure("bad payload")


def register_handlers(register) -> None:
    register("test:record", record)
    register("test:fail", fail)
    register("test:permanent", permanent)
