"""Top-level commands: init, version."""

from __future__ import annotations

import typer

from omnicrm import __version__
from omnicrm.cli.common import state


def init(ctx: typer.Context) -> None:
    """Create or migrate the database schema (idempotent; also done on first use)."""
    from omnicrm.db import SCHEMA_VERSION, ready_engine

    app = state(ctx)
    ready_engine(app.settings)
    app.info(f"database ready (schema version {SCHEMA_VERSION}) at {_safe_url(app.settings.database_url)}")


def version() -> None:
    """Print the OmniCRM version."""
    typer.echo(f"omnicrm {__version__}")


def _safe_url(url: str) -> str:
    """A database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("version")(version)
