"""`omnicrm contacts export` and `omnicrm contacts import`: the thin layer over omnicrm.csvio."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from omnicrm.cli.common import CreatedOpt, DryRunOpt, SearchOpt, StaleOpt, TagOpt, make_filter, state
from omnicrm.cli.contacts import app
from omnicrm.errors import InvalidInput, PartialSuccess

PROGRESS_MIN_BYTES = 1 << 20
PLAN_FIELDS = ["line", "action", "contact_id", "display_name", "email", "detail"]


@app.command()
def export(
    ctx: typer.Context,
    search: SearchOpt = None, created: CreatedOpt = None, tag: TagOpt = None, stale: StaleOpt = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="csv (default), json or jsonl.",
                                               show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write to FILE instead of stdout.",
                                                  metavar="FILE")] = None,
    portable: Annotated[bool, typer.Option(
        "--portable", help="Leave out id, created_at and updated_at (to diff two exports or re-import "
                           "elsewhere).")] = False,
) -> None:
    """Export every contact matching the filters (all of them by default), oldest first, streamed.

    CSV columns: id,display_name,email,phone,company,title,tags,notes,created_at,updated_at; several
    emails, phones or tags are joined with `;` (primary first). Cells a spreadsheet would run as a
    formula get a leading `'` (import removes it).
    """
    from omnicrm import csvio

    st = state(ctx)
    chosen = fmt or ("csv" if st.settings.format == "table" else st.settings.format)
    if chosen not in ("csv", "json", "jsonl"):
        raise InvalidInput(f"--format: export writes csv, json or jsonl (got {chosen!r})")
    flt = make_filter(search, created, tag, stale)
    with st.session(read_only=True) as session:
        uid = st.user_id(session)
        if output and output != "-":
            try:
                stream = open(output, "w", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as exc:
                raise InvalidInput(f"--output: cannot write {output}: {exc.strerror}") from None
            with stream:
                count = csvio.export_contacts(session, uid, flt, chosen, stream, portable=portable)
        else:
            count = csvio.export_contacts(session, uid, flt, chosen, sys.stdout, portable=portable)
            sys.stdout.flush()
    st.info(f"exported {count} contact(s)" + (f" to {output}" if output and output != "-" else ""))


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(help="CSV file, or - for stdin.", metavar="[FILE|-]")] = "-",
    source_format: Annotated[str, typer.Option(
        "--from", help="auto, native, google, outlook or linkedin (auto: detected from the header).")] = "auto",
    mapping: Annotated[Optional[list[str]], typer.Option(
        "--map", help="Map a column to a field: COL=FIELD (repeatable; FIELD: display_name, first_name, "
                      "middle_name, last_name, email, phone, company, title, tags, notes, created_at, "
                      "updated_at, id, ignore).",
        metavar="COL=FIELD")] = None,
    on_duplicate: Annotated[str, typer.Option(
        "--on-duplicate", help="A row whose email is already known (or, read back from our export, whose "
                               "id and created_at are a contact's): merge (fill empty fields, add "
                               "emails/phones/tags), skip, or error.")] = "merge",
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Import the valid rows and reject the others (exit 4) instead of importing "
                               "nothing (exit 2).")] = False,
    rejects: Annotated[Optional[str], typer.Option(
        "--rejects", help="With --skip-invalid: write rejected rows (original columns + error) here "
                          "(not with --dry-run, which writes nothing).",
        metavar="FILE")] = None,
    dry_run: DryRunOpt = False,
    encoding: Annotated[Optional[str], typer.Option(
        "--encoding", help="Input encoding (default: UTF-8, with or without BOM).")] = None,
    delimiter: Annotated[Optional[str], typer.Option(
        "--delimiter", help="',', ';', 'tab' or '|' (default: sniffed).")] = None,
    background: Annotated[bool, typer.Option("--background", help="Queue the import as a job; "
                                             "prints the job id.")] = False,
    fmt: Annotated[Optional[str], typer.Option("--format", help="json: a JSON summary on stdout. With "
                                               "--dry-run, table/csv/jsonl list each row's outcome.",
                                               show_default=False)] = None,
) -> None:
    """Import contacts from CSV: native, Google Contacts, Outlook or LinkedIn files.

    Atomic by default: if any row is invalid nothing is written, every bad row is reported as
    `line N, column C: reason`, and the exit code is 2. With --skip-invalid the valid rows are
    written and the exit code is 4 when rows were rejected. A row whose email matches an existing
    contact (or an earlier row) is merged unless --on-duplicate says otherwise.
    """
    from omnicrm import csvio
    from omnicrm.csvformats import parse_mapping
    from omnicrm.db import ready_engine

    st = state(ctx)
    output = st.fmt(fmt)
    if delimiter is not None and delimiter not in csvio.DELIMITERS:
        raise InvalidInput(f"--delimiter: {delimiter!r} is not one of ',', ';', 'tab', '|'")
    if rejects and not skip_invalid:
        raise InvalidInput("--rejects: only meaningful with --skip-invalid")
    if rejects and file != "-" and os.path.exists(rejects) and os.path.exists(file) and \
            os.path.samefile(rejects, file):
        raise InvalidInput(f"--rejects: {rejects} is the input file; give the rejected rows another file")
    try:
        mapped = parse_mapping(mapping or [])
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    options = csvio.ImportOptions(source_format=source_format, mapping=mapped, on_duplicate=on_duplicate,
                                  skip_invalid=skip_invalid, dry_run=dry_run, region=st.settings.region).validate()
    if background:
        _submit(st, file, options, encoding, delimiter, rejects, output)
        return
    if file == "-" and sys.stdin.isatty():
        raise InvalidInput("FILE: give a CSV file, or pipe one into stdin (`... | omnicrm contacts import -`)")
    source = csvio.open_csv(file, encoding=encoding, delimiter=delimiter, source_format=source_format,
                            mapping=mapped)
    rejects_writer = None
    plan = _Plan(output) if dry_run and output != "json" else None
    try:
        if skip_invalid and rejects and not dry_run:  # a dry run writes nothing; its plan lists the rejects
            try:
                rejects_writer = csvio.RejectsWriter(rejects, source.header)
            except OSError as exc:
                raise InvalidInput(f"--rejects: cannot write {rejects}: {exc.strerror}") from None
        report_rows = rejects_writer is None
        progress = _progress(st, source, plan)

        def on_progress(done: int) -> None:
            if plan:
                plan.flush()  # a batch is done
            progress.update(done)
        with csvio.sqlite_bulk_journal(ready_engine(st.settings), source), st.session() as session:
            uid = st.user_id(session)
            try:
                summary = csvio.import_contacts(
                    session, uid, source, options,
                    on_error=(lambda e: progress.echo(str(e))) if report_rows else None,
                    on_reject=rejects_writer.write if rejects_writer else None,
                    on_progress=on_progress,
                    on_plan=plan.add if plan else None)
            finally:
                progress.close()
            if summary.failed or dry_run:
                session.rollback()
            else:
                session.commit()
    finally:
        source.close()
        if rejects_writer:
            rejects_writer.close()
    if dry_run and rejects:
        st.info(f"dry run: {rejects} was not written")
    _finish(st, summary, output, plan)


def _finish(st, summary, output: str, plan: "_Plan | None") -> None:
    from omnicrm.output import write_object

    if output == "json":
        write_object(summary.as_dict(), "json")
    elif plan:
        plan.close()
    if summary.failed:
        raise InvalidInput(f"{summary.rejected} invalid row(s) of {summary.rows}; nothing was imported "
                           "(fix them, or pass --skip-invalid to import the valid rows)")
    st.info(summary.line() + f" ({summary.format} format, {summary.rows} rows)")
    if summary.ignored:
        shown = ", ".join(map(repr, summary.ignored[:10])) + (f" and {len(summary.ignored) - 10} more"
                                                               if len(summary.ignored) > 10 else "")
        st.info(f"ignored column(s): {shown} (--map COL=FIELD reads one, --map COL=ignore silences this)")
    if summary.rejected:
        raise PartialSuccess(f"{summary.rejected} row(s) rejected")


def _submit(st, file: str, options, encoding, delimiter, rejects, output: str) -> None:
    from omnicrm import csvio, jobs
    from omnicrm.output import write_object

    if file == "-":
        raise InvalidInput("--background: needs a FILE (stdin cannot be read by a worker later)")
    if options.dry_run:
        raise InvalidInput("--background: cannot be combined with --dry-run")
    source = csvio.open_csv(file, encoding=encoding, delimiter=delimiter, source_format=options.source_format,
                            mapping=options.mapping)
    try:
        csvio.check_columns(source, options)  # a file that maps to nothing fails now, not in the worker
    finally:
        source.close()
    payload = csvio.job_payload(file, options=options, encoding=encoding, delimiter=delimiter, rejects=rejects)
    job = jobs.submit(st.settings, st.settings.user, "import", payload)
    if output == "json":
        write_object({"job_id": job.id, "kind": "import", "status": job.status}, "json")
    else:
        typer.echo(job.id)
    st.info(f"queued import job {job.id}; run `omnicrm worker` to process it, `omnicrm jobs show {job.id}` "
            "to follow it")


class _Plan:
    """A dry run's row-by-row plan, written as the import goes (a million rows' plan is not held in memory):
    a batch's entries are sorted by line, since its rejected rows are found before the others are applied."""

    def __init__(self, output: str):
        from omnicrm.output import RecordWriter

        self.writer = RecordWriter(PLAN_FIELDS, output)
        self.pending: list[dict] = []

    def add(self, entry: dict) -> None:
        self.pending.append(entry)

    def flush(self) -> None:
        self.pending.sort(key=lambda entry: entry["line"])
        for entry in self.pending:
            self.writer.write(entry)
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _Progress:
    """A rich progress bar on stderr when it is a terminal and the input is big enough; else nothing."""

    def __init__(self, total: int | None, enabled: bool):
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

            self._bar = Progress("importing", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("import", total=total)
            self._bar.start()

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done)

    def echo(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            typer.echo(line, err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _progress(st, source, plan: "_Plan | None") -> _Progress:
    big = source.total_bytes is None or source.total_bytes >= PROGRESS_MIN_BYTES
    # A plan streamed to the same terminal would be torn up by the bar's redraws (a table waits for the end).
    streams_to_terminal = plan is not None and plan.writer.fmt != "table" and sys.stdout.isatty()
    return _Progress(source.total_bytes,
                     enabled=big and sys.stderr.isatty() and not st.settings.quiet and not streams_to_terminal)
