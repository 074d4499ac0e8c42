"""`omnicrm sync …`: run, preview and inspect the Google sync."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from omnicrm.cli.common import FormatOpt, emit, state

app = typer.Typer(no_args_is_help=True, help="Sync contacts and interactions from Gmail, Calendar and Contacts.")

SourceOpt = Annotated[Optional[list[str]], typer.Option(
    "--source", help="gmail, calendar or contacts (repeatable; default all three).")]
FullOpt = Annotated[bool, typer.Option("--full", help="Ignore the saved cursors and read everything again.")]
SinceOpt = Annotated[Optional[str], typer.Option(
    "--since", metavar="DATE", help="Full syncs only read mail and events from this date on (YYYY-MM-DD).")]
CreateOpt = Annotated[Optional[str], typer.Option(
    "--create-contacts", metavar="MODE",
    help="Who becomes a new contact: all correspondents, wrote-to (only people you wrote to or invited), "
         "or none (OMNICRM_SYNC_CREATE_CONTACTS; default all).")]

RUN_FIELDS = ["user", "source", "job_id", "status", "contacts_created", "interactions_created", "error"]


@app.command("run")
def run(
    ctx: typer.Context,
    source: SourceOpt = None,
    full: FullOpt = False,
    enqueue: Annotated[bool, typer.Option("--enqueue", help="Queue the jobs for workers instead of running "
                                                           "them here.")] = False,
    all_users: Annotated[bool, typer.Option("--all-users", help="Every user with a Google grant in this "
                                                               "database (e.g. a shared PostgreSQL).")] = False,
    since: SinceOpt = None,
    create: CreateOpt = None,
    fmt: FormatOpt = None,
) -> None:
    """Sync now: one job per source, run in parallel here (exit 0 ok, 1 failed, 3 authorization needed,
    4 some sources failed), or queued for `omnicrm worker` with --enqueue."""
    from omnicrm import sync

    app_ = state(ctx)
    report = sync.run_sync(app_.settings, sources=source, full=full, enqueue=enqueue, all_users=all_users,
                           since=since, create=create)
    rows = []
    for row in report.rows:
        result = row.get("result") or {}
        rows.append({**row, "contacts_created": result.get("contacts_created"),
                     "interactions_created": result.get("interactions_created")})
    if not rows:
        app_.info("nothing to sync: no user has connected Google (`omnicrm google connect`)")
    if fmt:  # asked for data: the outcome rows on stdout
        emit(app_, rows, RUN_FIELDS, app_.fmt(fmt))
    else:
        for row in rows:
            detail = (f"{row['contacts_created'] or 0} contacts created, "
                      f"{row['interactions_created'] or 0} interactions created" if row["status"] == "done"
                      else row.get("error") or "")
            app_.info(f"{row['user']} {row['source']}: {row['status']}{' — ' + detail if detail else ''}")
    if enqueue:
        app_.info(f"queued {sum(1 for r in rows if r['job_id'])} sync job(s); run `omnicrm worker` to process them")
    sync.raise_for(report)


@app.command("preview")
def preview(
    ctx: typer.Context,
    source: SourceOpt = None,
    full: FullOpt = False,
    since: SinceOpt = None,
    create: CreateOpt = None,
    fmt: FormatOpt = None,
) -> None:
    """Show how many contacts and interactions a run would create or change, with a sample; writes nothing."""
    from omnicrm import sync
    from omnicrm.google import auth
    from omnicrm.output import write_object

    app_ = state(ctx)
    with app_.session() as session:
        uid = app_.user_id(session)
        credentials = auth.load_credentials(session, app_.settings, uid)
        report = sync.preview(session, app_.settings, uid, sync.check_sources(source), credentials, full=full,
                              since=sync.parse_since(since), create=create)
    chosen = app_.fmt(fmt)
    if chosen == "table":
        rows = [{"source": name, **{k: v for k, v in stats.items() if k != "pages"}}
                for name, stats in report["sources"].items()]
        emit(app_, rows, ["source", "mode", "items", "contacts_created", "contacts_updated",
                          "interactions_created", "interactions_updated", "interactions_removed"], "table")
        if report["sample"]:
            typer.echo("sample:", err=True)
            emit(app_, report["sample"], ["action", "display_name", "email", "source"], "table")
        app_.info("preview only: nothing was written")
    else:
        write_object(report, chosen)


@app.command("status")
def status(ctx: typer.Context, fmt: FormatOpt = None) -> None:
    """Per source: connected, last success, last error, items synced, cursor age, running or queued job."""
    from omnicrm import sync

    app_ = state(ctx)
    with app_.session(read_only=True) as session:
        rows = sync.sync_status(session, app_.user_id(session))
    emit(app_, rows, sync.STATUS_FIELDS, app_.fmt(fmt))
