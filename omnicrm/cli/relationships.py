"""`contacts duplicates`, `contacts merge` and the top-level `status` dashboard."""

from __future__ import annotations

from typing import Annotated

import typer

from omnicrm.cli.common import AppState, DryRunOpt, FormatOpt, YesOpt, confirm, emit, state

WIDTH = 80


def duplicates(ctx: typer.Context, fmt: FormatOpt = None) -> None:
    """List likely duplicate contacts in groups, with the reason (same phone, name and company, …)."""
    from omnicrm.duplicates import DUPLICATE_FIELDS, find_duplicates

    st = state(ctx)
    output = st.fmt(fmt)
    with st.session(read_only=True) as session:
        groups = find_duplicates(session, st.user_id(session))
    fields = ["group", "ids", "names", "reasons"] if output == "table" else DUPLICATE_FIELDS
    emit(st, (g.record(n) for n, g in enumerate(groups, 1)), fields, output)
    if output == "table":
        st.info(f"{len(groups)} group(s) of likely duplicates" + (
            "; merge one with `omnicrm contacts merge ID ID…` (the first id is kept)" if groups else ""))


def merge(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(help="Contact ids or emails; the first one is kept.")],
    dry_run: DryRunOpt = False, yes: YesOpt = False, fmt: FormatOpt = None,
) -> None:
    """Merge contacts into the first: emails, phones, tags, notes, interactions and links move to it,
    its empty fields are filled, the others are removed (one transaction)."""
    from omnicrm.contacts import record, resolve
    from omnicrm.duplicates import merge_contacts, preview_merge
    from omnicrm.errors import InvalidInput

    st = state(ctx)
    output = st.fmt(fmt)
    if len(refs) < 2:
        raise InvalidInput("REF: give at least two contacts to merge (the first one is kept)")
    with st.session() as session:
        uid = st.user_id(session)
        survivor, *others = [resolve(session, uid, ref) for ref in refs]
        if dry_run:
            merged, summary = preview_merge(session, uid, survivor, others)
            _print_merged(st, merged, output)
            st.info(f"would merge {', '.join(map(str, summary['merged']))} into {summary['survivor']}"
                    + _moved_text(summary))
            return
        confirm(st, f"Merge {len(others)} contact(s) into {survivor.id} and delete them?", yes)
        result = merge_contacts(session, uid, survivor, others)
        session.commit()
        summary = result.summary()
        merged = record(result.survivor)
    _print_merged(st, merged, output)
    st.info(f"merged {', '.join(map(str, summary['merged']))} into {summary['survivor']}" + _moved_text(summary))


def _moved_text(summary: dict) -> str:
    moved = ", ".join(f"{n} {label.replace('_', ' ')}" for label, n in summary["moved"].items())
    return f" (moved {moved})" if moved else ""


def _print_merged(st: AppState, data: dict, output: str) -> None:
    from omnicrm.contacts import FIELDS
    from omnicrm.output import write_object, write_records

    if output == "csv":
        write_records([data], FIELDS, "csv")
    else:
        write_object(data, output)


def status(ctx: typer.Context, fmt: FormatOpt = None) -> None:
    """Dashboard: contacts, recent additions, last sync per source, jobs, Google connection, follow-ups."""
    from omnicrm.config import now
    from omnicrm.dashboard import status as collect
    from omnicrm.output import write_object, write_records

    st = state(ctx)
    output = st.fmt(fmt)
    with st.session(read_only=True) as session:
        data = collect(session, st.user_id(session), st.settings.user, now())
    if output in ("json", "jsonl"):
        write_object(data, output)
    elif output == "csv":
        write_records(_flatten(data), ["key", "value"], "csv")
    else:
        typer.echo("\n".join(render_status(data)))


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                yield from _flatten(item, f"{name}.{item.get('source', i)}.")
        else:
            yield {"key": name, "value": value}


def _when(value) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else "-"


def _fit(text: str, width: int) -> str:
    text = str(text).replace("\r", " ").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def render_status(data: dict) -> list[str]:
    """The dashboard as lines of at most 80 characters."""
    label = "{:<12}".format
    body = WIDTH - 12
    c = data["contacts"]
    lines = [label("User") + _fit(data["user"], body),
             label("Contacts") + f"{c['total']} total · {c['added_this_week']} added this week"]
    recent = data["recent_contacts"]
    if recent:
        for i, item in enumerate(recent):
            who = item["display_name"] or item["email"] or "?"
            if item["display_name"] and item["email"]:
                who += f" <{item['email']}>"
            text = f"{item['id']:>6}  {_fit(who, body - 8 - 12)}"
            lines.append(label("Recent" if i == 0 else "") + text.ljust(body - 11) + " "
                         + _when(item["created_at"])[:10])
    for i, sync in enumerate(data["sync"]):
        text = f"{sync['source']:<9} {sync['outcome']:<8}"
        if sync["outcome"] != "never":
            text += f" {_when(sync['last_attempt_at'] or sync['last_success_at'])}"
            if sync["outcome"] == "failed" and sync["last_error"]:
                text += " " + _fit(sync["last_error"], body - len(text) - 1)
            elif sync["items_synced"]:
                text += f" ({sync['items_synced']} items)"
        lines.append(label("Sync" if i == 0 else "") + _fit(text, body))
    jobs = data["jobs"]
    lines.append(label("Jobs") + " · ".join(f"{n} {s}" for s, n in jobs.items()))
    google = data["google"]
    if not google["connected"]:
        text = "not connected (run `omnicrm google connect`)"
    elif google["status"] == "ok":
        text = f"connected as {google['account_email'] or '?'}"
    else:
        text = f"{google['status'].replace('_', ' ')}: run `omnicrm google connect` ({google['account_email'] or '?'})"
    lines.append(label("Google") + _fit(text, body))
    count = data["follow_ups"]
    lines.append(label("Follow-ups") + (f"{count} due: `omnicrm insights follow-ups`" if count
                                        else "nobody is due"))
    return [line.rstrip() for line in lines]


def register(root: typer.Typer, contacts_app: typer.Typer) -> None:
    contacts_app.command("duplicates")(duplicates)
    contacts_app.command("merge")(merge)
    root.command("status")(status)
