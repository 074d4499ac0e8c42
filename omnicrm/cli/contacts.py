"""`omnicrm contacts …`: the thin layer over omnicrm.contacts."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from omnicrm.cli.common import (AppState, CreatedOpt, DryRunOpt, FormatOpt, SearchOpt, StaleOpt, TagOpt, YesOpt,
                                confirm, emit, make_filter, state)

app = typer.Typer(help="Add, find, change and remove contacts.", no_args_is_help=True)

Many = Optional[list[str]]


def _print_contact(st: AppState, session, contact, fmt: str, timeline_limit: int | None = 0) -> None:
    from omnicrm import contacts as svc
    from omnicrm.output import write_object, write_records

    data = svc.record(contact)
    if timeline_limit != 0:
        data["timeline"] = svc.timeline(session, contact, timeline_limit)
    if fmt == "table":
        entries = data.pop("timeline", None)
        write_object(data, fmt)
        if entries:
            typer.echo("\ntimeline (newest first):")
            write_records(entries, ["occurred_at", "kind", "direction", "subject"], "table")
    elif fmt == "csv":
        write_records([data], svc.FIELDS, "csv")
    else:
        write_object(data, fmt)


@app.command()
def add(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Option("--name", help="Display name.")] = None,
    email: Annotated[Many, typer.Option("--email", help="Email (repeatable; first is primary).")] = None,
    phone: Annotated[Many, typer.Option("--phone", help="Phone (repeatable).")] = None,
    company: Annotated[Optional[str], typer.Option("--company")] = None,
    title: Annotated[Optional[str], typer.Option("--title")] = None,
    tag: Annotated[Many, typer.Option("--tag", help="Tag (repeatable).")] = None,
    note: Annotated[Optional[str], typer.Option("--note", help="A first note.")] = None,
    fmt: FormatOpt = None,
) -> None:
    """Add a contact; prints its id (or the record with --format json)."""
    from omnicrm import contacts as svc

    st = state(ctx)
    with st.session() as session:
        contact = svc.add_contact(session, st.user_id(session), name=name, emails=email or (), phones=phone or (),
                                  company=company, title=title, tags=tag or (), note=note,
                                  region=st.settings.region)
        session.commit()
        output = st.fmt(fmt)
        if output == "table":
            typer.echo(contact.id)
        else:
            _print_contact(st, session, contact, output)
    st.info(f"created contact {contact.id}")


@app.command()
def show(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Contact id or email.")],
         fmt: FormatOpt = None) -> None:
    """Show contact REF (an id or any of its emails) with tags, notes and the last 10 timeline entries."""
    from omnicrm import contacts as svc

    st = state(ctx)
    with st.session(read_only=True) as session:
        contact = svc.resolve(session, st.user_id(session), ref)
        _print_contact(st, session, contact, st.fmt(fmt), timeline_limit=10)


@app.command()
def update(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Contact id or email.")],
    name: Annotated[Optional[str], typer.Option("--name")] = None,
    email: Annotated[Many, typer.Option("--email", help="Add an email (repeatable).")] = None,
    remove_email: Annotated[Many, typer.Option("--remove-email", help="Remove an email (repeatable).")] = None,
    phone: Annotated[Many, typer.Option("--phone", help="Add a phone (repeatable).")] = None,
    remove_phone: Annotated[Many, typer.Option("--remove-phone", help="Remove a phone (repeatable).")] = None,
    company: Annotated[Optional[str], typer.Option("--company")] = None,
    title: Annotated[Optional[str], typer.Option("--title")] = None,
    tag: Annotated[Many, typer.Option("--tag", help="Add a tag (repeatable).")] = None,
    untag: Annotated[Many, typer.Option("--untag", help="Remove a tag (repeatable).")] = None,
    fmt: FormatOpt = None,
) -> None:
    """Change contact REF (an id or email). Fields edited here are never overwritten by a sync."""
    from omnicrm import contacts as svc

    st = state(ctx)
    with st.session() as session:
        contact = svc.resolve(session, st.user_id(session), ref)
        changed = svc.update_contact(session, contact, name=name, company=company, title=title,
                                     add_emails=email or (), remove_emails=remove_email or (),
                                     add_phones=phone or (), remove_phones=remove_phone or (),
                                     add_tags=tag or (), remove_tags=untag or (), region=st.settings.region)
        session.commit()
        _print_contact(st, session, contact, st.fmt(fmt))
    st.info(f"updated contact {contact.id}" if changed else f"contact {contact.id} unchanged")


@app.command()
def delete(
    ctx: typer.Context,
    refs: Annotated[Optional[list[str]], typer.Argument(help="Contact ids or emails.", show_default=False)] = None,
    search: SearchOpt = None, created: CreatedOpt = None, tag: TagOpt = None, stale: StaleOpt = None,
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = None,
) -> None:
    """Delete contacts by REF, or every contact matching the filters (asks first on a terminal)."""
    from omnicrm import contacts as svc

    st = state(ctx)
    flt = make_filter(search, created, tag, stale)
    if refs and not flt.empty:
        raise svc.InvalidInput("REF: give contact refs or filters, not both")
    if not refs and flt.empty:
        raise svc.InvalidInput("REF: give contact refs or at least one filter (--search, --created, --tag, --stale)")
    with st.session() as session:
        uid = st.user_id(session)
        if refs:
            ids = list(dict.fromkeys(svc.resolve(session, uid, ref).id for ref in refs))
        else:
            ids = svc.matching_ids(session, uid, flt)
        if dry_run:
            matches = (svc.iter_contacts(session, uid, flt) if not refs
                       else (svc.resolve(session, uid, str(i)) for i in ids))
            emit(st, (svc.record(c) for c in matches), svc.TABLE_FIELDS, st.fmt(fmt))
            st.info(f"would delete {len(ids)} contact(s)")
            return
        if not refs and ids:
            confirm(st, f"Delete {len(ids)} contact(s)?", yes)
        count = svc.delete_contacts(session, uid, ids)
        session.commit()
    st.info(f"deleted {count} contact(s)")


@app.command("list")
def list_(
    ctx: typer.Context,
    search: SearchOpt = None, created: CreatedOpt = None, tag: TagOpt = None, stale: StaleOpt = None,
    sort: Annotated[str, typer.Option("--sort", help="name, created, updated, last-contact or score.")] = "created",
    order: Annotated[str, typer.Option("--order", help="asc or desc.")] = "desc",
    page: Annotated[int, typer.Option("--page", help="Page number (1-100000).")] = 1,
    page_size: Annotated[int, typer.Option("--page-size", help="Contacts per page (1-200).")] = 50,
    fields: Annotated[Optional[str], typer.Option("--fields", help="Comma-separated fields to show.")] = None,
    fmt: FormatOpt = None,
) -> None:
    """List contacts, one page at a time, filtered and sorted."""
    from omnicrm import contacts as svc

    st = state(ctx)
    output = st.fmt(fmt)
    chosen = svc.check_fields(fields, svc.TABLE_FIELDS if output == "table" else svc.FIELDS)
    flt = make_filter(search, created, tag, stale)
    with st.session(read_only=True) as session:
        result = svc.list_contacts(session, st.user_id(session), flt, sort=sort, order=order,
                                   page=page, page_size=page_size)
        emit(st, (svc.record(c) for c in result.items), chosen, output)
    if output == "table":
        more = "" if result.exact else "+"  # a large filtered total is counted up to a cap (README: scale)
        st.info(f"page {result.page} of {result.pages}{more} · {result.total}{more} contacts")


@app.command()
def note(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Contact id or email.")],
         text: Annotated[str, typer.Argument(help="The note ('-' reads stdin).")]) -> None:
    """Add note TEXT to contact REF (`-` reads TEXT from stdin); it appears on the timeline."""
    import sys

    from omnicrm import contacts as svc

    st = state(ctx)
    body = sys.stdin.read() if text == "-" else text
    with st.session() as session:
        contact = svc.resolve(session, st.user_id(session), ref)
        created = svc.add_note(session, contact, body)
        session.commit()
    st.info(f"added note {created.id} to contact {contact.id}")


@app.command()
def timeline(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Contact id or email.")],
             limit: Annotated[Optional[int], typer.Option("--limit", min=1, max=1_000_000,
                                                          help="At most this many.")] = None,
             fmt: FormatOpt = None) -> None:
    """Contact REF's emails, meetings and notes, newest first."""
    from omnicrm import contacts as svc

    st = state(ctx)
    with st.session(read_only=True) as session:
        contact = svc.resolve(session, st.user_id(session), ref)
        entries = svc.timeline(session, contact, limit)
    output = st.fmt(fmt)
    emit(st, entries, ["occurred_at", "kind", "direction", "subject", "source"] if output == "table"
         else svc.TIMELINE_FIELDS, output)
