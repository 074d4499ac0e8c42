"""`omnicrm tags …`"""

from __future__ import annotations

from typing import Annotated

import typer

from omnicrm.cli.common import FormatOpt, emit, state

app = typer.Typer(help="List and rename tags.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, fmt: FormatOpt = None) -> None:
    """List tags with how many contacts carry each."""
    from omnicrm.contacts import list_tags

    st = state(ctx)
    with st.session(read_only=True) as session:
        rows = list_tags(session, st.user_id(session))
    emit(st, rows, ["tag", "contacts"], st.fmt(fmt))


@app.command("rename")
def rename(ctx: typer.Context,
           old: Annotated[str, typer.Argument(help="The tag to rename.")],
           new: Annotated[str, typer.Argument(help="Its new name (an existing tag is merged into).")]) -> None:
    """Rename tag OLD to NEW (merging into NEW if it exists)."""
    from omnicrm.contacts import rename_tag

    st = state(ctx)
    with st.session() as session:
        count = rename_tag(session, st.user_id(session), old, new)
        session.commit()
    st.info(f"renamed tag on {count} contact(s)")
