"""The `omnicrm` command: global flags, sub-apps, and the one place errors become exit codes."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated, Optional

import click
import typer
import typer.core
from typer.core import TyperGroup

# Plain click help: with rich installed typer backslash-escapes "[required]" even when rich markup is off,
# and rich formatting would slow every `--help`.
typer.core.HAS_RICH = False

from omnicrm import __version__
from omnicrm.cli.common import AppState, setup_logging
from omnicrm.errors import OmniCrmError

log = logging.getLogger("omnicrm")


class OmniGroup(TyperGroup):
    """Turns expected errors into one clean line on stderr and the SPEC's exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OmniCrmError as exc:
            _fail(ctx, str(exc), exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
            ctx.exit(0)
        except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback for users
            from sqlalchemy.exc import DBAPIError

            if isinstance(exc, DBAPIError):
                from omnicrm.db import describe_db_error

                _fail(ctx, f"database error: {describe_db_error(exc)}", 1)
            if isinstance(exc, OSError) and exc.strerror:  # a full disk under stdout or -o, say
                _fail(ctx, exc.strerror + (f": {exc.filename}" if exc.filename else ""), 1)
            _fail(ctx, f"unexpected error: {type(exc).__name__}: {exc}", 1)


def _verbose(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(obj and obj.settings.verbose)


def _fail(ctx: click.Context, message: str, code: int):
    if _verbose(ctx):
        traceback.print_exc(file=sys.stderr)
    typer.echo(f"Error: {message}", err=True)
    ctx.exit(code)


def _quiet_broken_pipe() -> None:
    """A closed pipe (`| head`) is a normal end: point stdout at /dev/null so the exit flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


app = typer.Typer(cls=OmniGroup, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="OmniCRM: contacts, CSV pipes, Google sync and queued jobs from the command line.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"omnicrm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    db: Annotated[Optional[str], typer.Option("--db", help="Database URL (OMNICRM_DATABASE_URL).")] = None,
    user: Annotated[Optional[str], typer.Option("--user", help="Acting user (OMNICRM_USER).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="table, csv, json or jsonl (OMNICRM_FORMAT).")] = None,
    region: Annotated[Optional[str], typer.Option("--region", help="Default phone region (OMNICRM_REGION).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only data and errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details to stderr.")] = False,
    log_json: Annotated[bool, typer.Option("--log-json", help="Logs as one JSON object per line.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """OmniCRM: contacts, CSV pipes, Google sync and queued jobs from the command line."""
    from omnicrm.config import load_settings

    setup_logging(verbose, log_json, quiet)
    ctx.obj = AppState(load_settings(db=db, user=user, fmt=fmt, region=region,
                                     quiet=quiet, verbose=verbose, log_json=log_json))


from omnicrm.cli import contacts, system, tags  # noqa: E402  (sub-apps register on `app`)
from omnicrm.cli import csvcmds  # noqa: E402,F401  (contacts export/import)
from omnicrm.cli import google as google_cli  # noqa: E402
from omnicrm.cli import insights, relationships  # noqa: E402

app.add_typer(contacts.app, name="contacts")
app.add_typer(tags.app, name="tags")
app.add_typer(google_cli.app, name="google")
app.add_typer(insights.app, name="insights")
from omnicrm.cli import sync as sync_cli  # noqa: E402

app.add_typer(sync_cli.app, name="sync")
system.register(app)
from omnicrm.cli import jobs as jobs_cli  # noqa: E402

jobs_cli.register(app)  # `jobs …` and `worker`
relationships.register(app, contacts.app)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
