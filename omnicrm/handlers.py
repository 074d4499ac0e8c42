"""The handler table: which function runs each job kind. Workers and foreground runs call `register_all()`.

Built-in diagnostic kinds (for benchmarks, tests and checking a deployment):
- `noop`: does nothing and returns `{"ok": true}`.
- `sleep`: waits `payload["seconds"]` (default 0.1, at most 3600) while heartbeating, like a job waiting on I/O.

Plugin hook: `OMNICRM_EXTRA_HANDLERS=pkg.module[,other.module]` imports each module and calls its
`register_handlers(register)` with `omnicrm.jobs.register` (the tests use it for their own kinds).
"""

from __future__ import annotations

import importlib
import os
import time

from omnicrm.errors import InvalidInput


def noop(ctx) -> dict:
    return {"ok": True}


def sleep(ctx) -> dict:
    seconds = ctx.payload.get("seconds", 0.1)
    if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 3600:
        raise InvalidInput("sleep job: payload seconds must be a number from 0 to 3600")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))
        ctx.heartbeat()
    return {"slept": seconds}


def register_all() -> None:
    """Register every job kind this installation knows (handlers are imported lazily by their modules)."""
    from omnicrm import jobs

    jobs.register("noop", noop)
    jobs.register("sleep", sleep)
    from omnicrm import csvio, sync

    jobs.register("import", csvio.import_job)  # contacts import --background
    sync.register_handlers(jobs.register)  # sync:gmail, sync:calendar, sync:contacts
    from omnicrm import csvio  # contacts import --background

    jobs.register("import", csvio.import_job)
    from omnicrm.sync import sync_job  # sync:gmail, sync:calendar, sync:contacts

    for kind in ("sync:gmail", "sync:calendar", "sync:contacts"):
        jobs.register(kind, sync_job)
    for name in filter(None, (m.strip() for m in os.environ.get("OMNICRM_EXTRA_HANDLERS", "").split(","))):
        importlib.import_module(name).register_handlers(jobs.register)
