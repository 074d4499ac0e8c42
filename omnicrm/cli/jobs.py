"""`omnicrm jobs …` and the top-level `omnicrm worker`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from omnicrm.cli.common import FormatOpt, emit, state

app = typer.Typer(no_args_is_help=True, help="Look at and manage queued jobs.")


@app.command("list")
def list_(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(
        "--status", help="queued, running, done, failed, dead or cancelled.")] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="Only jobs of this kind (e.g. sync:gmail).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first (0 = all).")] = 100,
    fmt: FormatOpt = None,
) -> None:
    """List your jobs, newest first."""
    from omnicrm import jobs

    app_ = state(ctx)
    with app_.session(read_only=True) as session:
        rows = jobs.list_jobs(session, app_.user_id(session), status=status, kind=kind, limit=limit)
        emit(app_, (jobs.record(job) for job in rows), jobs.LIST_FIELDS, app_.fmt(fmt))


@app.command("show")
def show(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.")],
         fmt: FormatOpt = None) -> None:
    """Show one job: status, attempts, lease, last error, payload and result."""
    from omnicrm import jobs
    from omnicrm.output import write_object

    app_ = state(ctx)
    with app_.session(read_only=True) as session:
        job = jobs.show(session, app_.user_id(session), job_id)
    record, fmt = jobs.record(job), app_.fmt(fmt)
    if fmt in ("table", "csv"):  # nested payload/result as JSON text
        record = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in record.items()}
    write_object(record, fmt)


@app.command("retry")
def retry(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Queue a failed, dead or cancelled job again (attempts start over)."""
    from omnicrm import jobs

    app_ = state(ctx)
    with app_.session() as session:
        job = jobs.retry(session, app_.user_id(session), job_id)
        session.commit()
    jobs.deliver(app_.settings, [job.id])
    app_.info(f"job {job.id} queued again")


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: Annotated[int, typer.Argument(metavar="ID", help="Job id.")]) -> None:
    """Cancel a queued job (a running one stops at its next heartbeat)."""
    from omnicrm import jobs

    app_ = state(ctx)
    with app_.session() as session:
        job = jobs.cancel(session, app_.user_id(session), job_id)
        session.commit()
    app_.info(f"job {job.id} cancelled")


@app.command("reap")
def reap(ctx: typer.Context, fmt: FormatOpt = None) -> None:
    """Re-queue jobs whose worker died (expired lease) and re-deliver queued jobs that were never picked up.

    Workers do this on their own every half lease; this is for cron or a manual check. All users.
    """
    from omnicrm import jobs
    from omnicrm.output import write_object

    app_ = state(ctx)
    report = jobs.reap_and_deliver(app_.settings)
    summary = report.summary()
    if app_.fmt(fmt) == "table":
        app_.info(f"{summary['requeued']} re-queued, {summary['dead']} dead, {summary['redelivered']} re-delivered")
    else:
        write_object(summary, app_.fmt(fmt))


@app.command("purge")
def purge(
    ctx: typer.Context,
    older_than: Annotated[float, typer.Option("--older-than", metavar="DAYS",
                                              help="Delete finished jobs that ended more than DAYS ago.")],
    all_users: Annotated[bool, typer.Option("--all-users", help="Purge every user's jobs, not only yours.")] = False,
) -> None:
    """Delete finished jobs (done, failed, dead, cancelled) older than --older-than DAYS."""
    from omnicrm import jobs

    app_ = state(ctx)
    with app_.session() as session:
        count = jobs.purge(session, None if all_users else app_.user_id(session), older_than)
        session.commit()
    app_.info(f"{count} job(s) purged")


def worker(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Jobs run in parallel (1-256).")] = 4,
    kind: Annotated[str, typer.Option("--kind", help="thread or process.")] = "thread",
    once: Annotated[bool, typer.Option("--once", help="Run everything runnable now, then exit "
                                                      "(exit 1 if any attempt failed).")] = False,
    schedule: Annotated[Optional[str], typer.Option(
        "--schedule", metavar="CRON",
        help="Also run `sync run --all-users --enqueue` on this cron expression (local time).")] = None,
    grace: Annotated[float, typer.Option("--grace", metavar="SECONDS",
                                         help="On SIGINT/SIGTERM, time running jobs get to finish.")] = 30.0,
) -> None:
    """Run queued jobs: a Huey consumer with N workers, a reaper and (optionally) a schedule.

    Stops gracefully on SIGINT or SIGTERM: running jobs get --grace seconds, then go back to the queue.
    """
    from omnicrm import worker as worker_service

    app_ = state(ctx)
    code = worker_service.run(app_.settings, workers=workers, kind=kind, once=once, schedule=schedule, grace=grace)
    raise typer.Exit(code)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="jobs")
    root.command("worker")(worker)
