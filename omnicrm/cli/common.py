"""What every command shares: the app state, shared options, output and messages."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Iterable, Iterator, Optional

import typer
if TYPE_CHECKING:  # SQLAlchemy costs ~0.15 s to import: only commands that touch the database load it
    from sqlalchemy.orm import Session

from omnicrm.config import FORMATS, Settings
from omnicrm.errors import InvalidInput


@dataclass
class AppState:
    settings: Settings
    _user_id: int | None = field(default=None, repr=False)

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A session for this command; commands that only read pass `read_only=True`."""
        from omnicrm.db import session_scope

        with session_scope(self.settings, read_only=read_only) as session:
            yield session

    def user_id(self, session: Session) -> int:
        if self._user_id is None:
            from omnicrm.db import user_id

            self._user_id = user_id(session, self.settings.user)
            session.commit()
        return self._user_id

    def fmt(self, override: str | None) -> str:
        fmt = override or self.settings.format
        if fmt not in FORMATS:
            raise InvalidInput(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt

    def info(self, message: str) -> None:
        """A progress or summary line on stderr (silenced by --quiet)."""
        if not self.settings.quiet:
            typer.echo(message, err=True)


def state(ctx: typer.Context) -> AppState:
    return ctx.find_root().obj


# Options shared by several commands: one definition each.
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="table, csv, json or jsonl.", show_default=False)]
SearchOpt = Annotated[Optional[str], typer.Option(
    "--search", help="Substring of name, email, phone or company (case/accent-insensitive).")]
CreatedOpt = Annotated[Optional[str], typer.Option(
    "--created", help="today, week, month, quarter, year or FROM..TO (ISO dates).")]
TagOpt = Annotated[Optional[list[str]], typer.Option("--tag", help="Has this tag (repeatable; all must match).")]
StaleOpt = Annotated[Optional[int], typer.Option("--stale", help="No interaction in this many days.",
                                                  metavar="DAYS")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")]


def make_filter(search: str | None, created: str | None, tag: list[str] | None, stale: int | None):
    from omnicrm.filters import ContactFilter

    return ContactFilter(search=search, created=created, tags=tuple(tag or ()), stale=stale).validate()


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def confirm(app: AppState, question: str, yes: bool) -> None:
    """Ask on a terminal; without one the caller must pass --yes."""
    if yes:
        return
    if not stdin_is_terminal():
        raise InvalidInput(f"{question} — refusing without a terminal: pass --yes")
    if not typer.confirm(question, err=True):
        raise typer.Abort()


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(verbose: bool, log_json: bool, quiet: bool) -> None:
    root = logging.getLogger("omnicrm")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_json else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    root.propagate = False


def emit(app: AppState, records: Iterable[dict], fields: list[str], fmt: str) -> int:
    from omnicrm.output import write_records

    return write_records(records, fields, fmt)
