"""`omnicrm worker`: the Huey consumer that runs delivered job ids, plus the reaper and the scheduler.

- Long-running (default): Huey's consumer with N threads (or processes) takes job ids from the
  queue; each is claimed and run by `jobs.execute`. A reaper thread (every half lease) re-queues jobs
  whose worker died and re-delivers lost deliveries. SIGINT and SIGTERM both stop gracefully: no
  new jobs are taken, running ones get `grace` seconds to finish, then their leases are released so
  another worker runs them again. A second signal stops at once (leases released as well).
- `--once`: drains everything runnable now (delivered ids, due retries, anything queued in the
  table) with N threads and exits: 0 when every attempt succeeded, 1 when any attempt failed.
- `--schedule CRON`: on each matching minute (local time) runs `omnicrm sync run --all-users --enqueue`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime

from omnicrm import jobs
from omnicrm.config import Settings, now as current_time
from omnicrm.errors import InvalidInput

log = logging.getLogger("omnicrm.worker")

WORKER_KINDS = ("thread", "process")
SCHEDULED_COMMAND = ("sync", "run", "--all-users", "--enqueue")


def poll_seconds(settings: Settings) -> float:
    """Longest pause between queue polls when idle (SQLite queue; PostgreSQL and Redis are woken at once)."""
    return jobs._number(settings, "OMNICRM_WORKER_POLL_SECONDS", 1.0, 0.01)


def reap_interval(settings: Settings) -> float:
    return min(max(jobs.lease_seconds(settings) / 2, 0.25), 30.0)


def parse_schedule(expression: str):
    """A five-field cron expression → a function(datetime) → bool (huey's crontab)."""
    from huey import crontab

    fields = expression.split()
    if len(fields) != 5:
        raise InvalidInput(f"--schedule: {expression!r} is not a cron expression "
                           "(five fields: minute hour day month weekday)")
    try:
        return crontab(minute=fields[0], hour=fields[1], day=fields[2], month=fields[3], day_of_week=fields[4])
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"--schedule: {expression!r}: {exc}") from None


def check_options(workers: int, kind: str, grace: float = 30.0) -> None:
    if not 1 <= workers <= 256:
        raise InvalidInput("--workers: must be 1-256")
    if not 0 <= grace <= 86400:
        raise InvalidInput("--grace: must be 0-86400 seconds")
    if kind not in WORKER_KINDS:
        raise InvalidInput(f"--kind: {kind!r} is not one of {', '.join(WORKER_KINDS)}")


# --- --once -----------------------------------------------------------------------------------

def drain(settings: Settings, workers: int, grace: float = 30.0) -> Counter:
    """Run everything runnable now with `workers` threads; return outcome counts.

    SIGINT/SIGTERM (from the main thread): take no new job, give running ones `grace` seconds,
    then release the rest (counted as "released")."""
    from sqlalchemy import select

    from omnicrm.db import session_scope
    from omnicrm.handlers import register_all
    from omnicrm.models import Job
    from omnicrm.queue import get_queue

    register_all()
    with session_scope(settings) as session:
        jobs.reap(session, settings)  # expired leases become runnable; the table scan below finds them
        session.commit()
    queue = get_queue(settings, blocking=False)
    queue.check()
    outcomes: Counter = Counter()
    lock = threading.Lock()
    # "waiting": jobs whose exclusive key is held by a job running in another process: not runnable
    # now, and a drain does not wait for other processes.
    state = {"busy": 0, "buffer": [], "in_hand": set(), "waiting": set()}
    finished = threading.Event()
    soon = jobs.exclusive_delay(settings)

    def scan() -> list[int]:
        from datetime import timedelta

        try:
            due = queue.pop_due()
        except Exception as exc:  # noqa: BLE001 - the table scan below still finds every due job
            log.warning("queue schedule read failed: %s", type(exc).__name__)
            due = []
        with session_scope(settings) as session:
            stamp = current_time()
            waiting = Job.id.not_in(state["waiting"]) if state["waiting"] else Job.id.is_not(None)
            ids = list(session.scalars(select(Job.id).where(Job.status == "queued", Job.run_after <= stamp, waiting)
                                       .order_by(Job.run_after, Job.id).limit(500)))
            if not ids and not due and state["busy"] == 0:
                pending = session.scalar(select(Job.id).where(
                    Job.status == "queued", Job.run_after <= stamp + timedelta(seconds=soon), waiting).limit(1))
                if pending is None:
                    finished.set()
        return list(dict.fromkeys(due + ids))

    def next_job() -> int | None:
        with lock:
            try:
                delivered = queue.pop_nowait()
            except Exception as exc:  # noqa: BLE001 - the table is the source of truth; keep draining
                log.warning("queue read failed: %s", type(exc).__name__)
                delivered = None
            if delivered is not None and delivered not in state["waiting"]:
                return delivered  # even a duplicate: the claim (compare-and-set) settles it
            while state["buffer"]:
                job_id = state["buffer"].pop(0)
                if job_id not in state["in_hand"]:
                    return job_id
            state["buffer"] = [i for i in scan() if i not in state["in_hand"]]
            return state["buffer"].pop(0) if state["buffer"] else None

    def loop() -> None:
        while not finished.is_set():
            job_id = next_job()
            if job_id is None:
                time.sleep(0.02)
                continue
            with lock:
                state["busy"] += 1
                state["in_hand"].add(job_id)
            try:
                outcome = jobs.execute(settings, job_id)
                with lock:
                    outcomes[outcome.status] += 1
                    if outcome.status == "busy" and not _key_held_here(settings, job_id, state["in_hand"]):
                        state["waiting"].add(job_id)
            except Exception:  # noqa: BLE001 - a database error on one job must not stop the drain
                log.exception("job %s could not be run", job_id)
                with lock:
                    outcomes["error"] += 1
            finally:
                with lock:
                    state["busy"] -= 1
                    state["in_hand"].discard(job_id)

    threads = [threading.Thread(target=loop, name=f"omnicrm-once-{i + 1}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    with _signals_interrupt():
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:
            finished.set()
            log.warning("stopping: running jobs get %gs to finish", grace,
                        extra={"fields": {"event": "stopping", "grace": grace}})
            deadline = time.monotonic() + grace
            for thread in threads:
                thread.join(max(deadline - time.monotonic(), 0))
            released = jobs.release_running(settings)
            outcomes["released"] += len(released)
            if released:
                log.warning("released %s running job(s): %s", len(released), ", ".join(map(str, released)),
                            extra={"fields": {"event": "jobs_released", "job_ids": released}})
    return outcomes


class _signals_interrupt:
    """SIGTERM raises KeyboardInterrupt like SIGINT while draining (main thread only)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _key_held_here(settings: Settings, job_id: int, running_here: set[int]) -> bool:
    """Is the job holding `job_id`'s exclusive key one this drain is running?"""
    from sqlalchemy import select

    from omnicrm.db import session_scope
    from omnicrm.models import Job

    with session_scope(settings) as session:
        key = session.scalar(select(Job.exclusive_key).where(Job.id == job_id))
        holder = session.scalar(select(Job.id).where(Job.exclusive_key == key, Job.status == "running"))
    return holder is None or holder in running_here


def once_exit_code(outcomes: Counter) -> int:
    return 1 if any(outcomes[s] for s in ("failed", "dead", "retry", "lost", "error", "released")) else 0


# --- long-running -----------------------------------------------------------------------------

def _consumer_class():
    from huey.consumer import Consumer

    class GracefulConsumer(Consumer):
        """Huey's consumer with SIGTERM as graceful as SIGINT (systemd and `kill` send SIGTERM)."""

        def _set_signal_handlers(self):
            self._signal_actions[signal.SIGINT] = (False, True)
            self._signal_actions[signal.SIGTERM] = (False, True)
            super()._set_signal_handlers()

    return GracefulConsumer


LOCAL_TIMER_SECONDS = 5.0


def _run_delivered(settings: Settings, job_id: int) -> None:
    outcome = jobs.execute(settings, job_id)
    if outcome.status in ("busy", "retry") and outcome.run_after is not None:
        _deliver_later(settings, job_id, outcome.run_after)


def _deliver_later(settings: Settings, job_id: int, when: datetime) -> None:
    """A short wait (exclusive key busy, first retries) on a local timer, to the sub-second; a long one
    through Huey's schedule. Either may be lost with the process: the reaper then re-delivers."""
    delay = (when - current_time()).total_seconds()
    if delay > LOCAL_TIMER_SECONDS:
        jobs.deliver(settings, [job_id], eta=when)
        return
    timer = threading.Timer(max(delay, 0.0), _deliver_quietly, args=(settings, job_id))
    timer.daemon = True
    timer.start()


def _deliver_quietly(settings: Settings, job_id: int) -> None:
    try:
        jobs.deliver(settings, [job_id])
    except Exception as exc:  # noqa: BLE001 - the reaper re-delivers it
        log.warning("could not deliver job %s again: %s", job_id, type(exc).__name__)


def _periodic(stop: threading.Event, interval: float, name: str, action, *, immediately: bool = False
              ) -> threading.Thread:
    def run() -> None:
        first = immediately
        while first or not stop.wait(interval):
            first = False
            try:
                action()
            except Exception as exc:  # noqa: BLE001 - keep the worker alive; the next round retries
                log.warning("%s failed: %s: %s", name, type(exc).__name__, str(exc)[:200])

    thread = threading.Thread(target=run, name=f"omnicrm-{name}", daemon=True)
    thread.start()
    return thread


def _die_with_parent() -> None:
    """A forked worker process exits with its parent, even when the parent is killed with SIGKILL
    (Linux); otherwise orphans would keep polling. Its job's lease then expires as usual."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _reap_once(settings: Settings) -> None:
    report = jobs.reap_and_deliver(settings)
    if report.requeued or report.dead:
        log.warning("reaper: %s job(s) re-queued, %s dead after losing their worker",
                    len(report.requeued), len(report.dead),
                    extra={"fields": {"event": "reaped", **report.summary()}})
    elif report.redeliver:
        log.info("reaper: %s queued job(s) delivered again", len(report.redeliver),
                 extra={"fields": {"event": "reaped", **report.summary()}})


def _schedule_tick(settings: Settings, matches, state: dict) -> None:
    local = datetime.now().replace(second=0, microsecond=0)
    if state.get("last") == local or not matches(local):
        return
    state["last"] = local
    log.info("schedule: running omnicrm %s", " ".join(SCHEDULED_COMMAND),
             extra={"fields": {"event": "schedule_fired", "command": "omnicrm " + " ".join(SCHEDULED_COMMAND)}})
    env = {**settings.env, "OMNICRM_DATABASE_URL": settings.database_url, "OMNICRM_QUEUE_URL": settings.queue_url,
           "OMNICRM_USER": settings.user}
    command = [sys.executable, "-m", "omnicrm", "--quiet", *SCHEDULED_COMMAND]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    fields = {"event": "schedule_finished", "command": "omnicrm " + " ".join(SCHEDULED_COMMAND),
              "exit_code": result.returncode}
    if result.returncode == 0:
        log.info("schedule: omnicrm %s done", " ".join(SCHEDULED_COMMAND), extra={"fields": fields})
    else:
        error = (result.stderr.strip().splitlines() or [""])[-1][:300]
        log.warning("schedule: omnicrm %s exited %s: %s", " ".join(SCHEDULED_COMMAND), result.returncode, error,
                    extra={"fields": {**fields, "error": error}})


def serve(settings: Settings, *, workers: int, kind: str, grace: float, schedule: str | None = None) -> int:
    """Run the consumer until SIGINT/SIGTERM; returns the exit code (0)."""
    from omnicrm.db import ready_engine
    from omnicrm.handlers import register_all
    from omnicrm.queue import get_queue

    matches = parse_schedule(schedule) if schedule else None
    register_all()
    ready_engine(settings)
    queue = get_queue(settings)
    queue.check()
    queue.executor = lambda job_id: _run_delivered(settings, job_id)
    stop = threading.Event()
    _reap_once(settings)
    _periodic(stop, reap_interval(settings), "reaper", lambda: _reap_once(settings))
    if matches is not None:
        tick_state: dict = {}
        _periodic(stop, 1.0, "schedule", lambda: _schedule_tick(settings, matches, tick_state), immediately=True)
    if kind == "process":
        os.register_at_fork(after_in_child=_die_with_parent)
    consumer = _consumer_class()(queue.huey, workers=workers, worker_type=kind, periodic=False,
                                 initial_delay=min(0.05, poll_seconds(settings)),
                                 max_delay=poll_seconds(settings), backoff=1.15, scheduler_interval=1,
                                 check_worker_health=True, health_check_interval=5, shutdown_timeout=grace)
    log.info("worker started: %s %s worker(s) on the %s queue, lease %gs", workers, kind, queue.backend,
                jobs.lease_seconds(settings),
                extra={"fields": {"event": "worker_started", "workers": workers, "kind": kind,
                                  "queue": queue.backend, "pid": os.getpid()}})
    try:
        consumer.run()
    finally:
        stop.set()
        released = jobs.release_running(settings)
        if released:
            try:
                jobs.deliver(settings, released)
            except Exception as exc:  # noqa: BLE001 - the reaper re-delivers them later
                log.warning("could not re-deliver released jobs: %s", type(exc).__name__)
            log.warning("released %s running job(s) after the %gs grace period: %s", len(released), grace,
                        ", ".join(map(str, released)),
                        extra={"fields": {"event": "jobs_released", "job_ids": released}})
        log.info("worker stopped", extra={"fields": {"event": "worker_stopped", "pid": os.getpid()}})
    return 0


def configure_logging(settings: Settings) -> None:
    """One line per job start/finish on stderr (JSON with --log-json); --quiet keeps warnings only."""
    level = logging.WARNING if settings.quiet else logging.INFO
    for name in ("omnicrm.jobs", "omnicrm.worker"):
        logging.getLogger(name).setLevel(logging.DEBUG if settings.verbose else level)
    root = logging.getLogger("omnicrm")
    huey_log = logging.getLogger("huey")
    huey_log.handlers = list(root.handlers)
    huey_log.propagate = False
    huey_log.setLevel(logging.INFO if settings.verbose else logging.WARNING)


def run(settings: Settings, *, workers: int, kind: str = "thread", once: bool = False,
        schedule: str | None = None, grace: float = 30.0) -> int:
    """The `omnicrm worker` command body; returns the exit code."""
    check_options(workers, kind, grace)
    if schedule and once:
        raise InvalidInput("--schedule: cannot be combined with --once (cron already schedules --once runs)")
    if schedule:
        parse_schedule(schedule)
    configure_logging(settings)
    if once:
        outcomes = drain(settings, workers, grace)
        log.info("worker --once finished: %s", dict(outcomes) or "nothing to run",
                 extra={"fields": {"event": "drained", **dict(outcomes)}})
        return once_exit_code(outcomes)
    return serve(settings, workers=workers, kind=kind, grace=grace, schedule=schedule)
