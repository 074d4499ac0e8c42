"""`omnicrm insights …`: what the interaction history says about your relationships."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from omnicrm.cli.common import FormatOpt, emit, state

app = typer.Typer(help="Relationship insights: who is overdue for a follow-up.", no_args_is_help=True)


@app.command("follow-ups")
def follow_ups(
    ctx: typer.Context,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most this many (the most overdue).",
                                                 metavar="N")] = None,
    fmt: FormatOpt = None,
) -> None:
    """Contacts whose silence is much longer than their usual cadence, most overdue first."""
    from omnicrm import insights
    from omnicrm.config import now

    st = state(ctx)
    output = st.fmt(fmt)
    with st.session(read_only=True) as session:
        found = insights.follow_ups(session, st.user_id(session), now(), limit)
    fields = insights.FOLLOW_UP_TABLE_FIELDS if output == "table" else insights.FOLLOW_UP_FIELDS
    emit(st, (f.record() for f in found), fields, output)
    if output == "table":
        st.info(f"{len(found)} contact(s) due for a follow-up" if found else "nobody is due for a follow-up")
