"""A throw-away PostgreSQL database for one benchmark run."""

from __future__ import annotations

import uuid
from typing import Callable


def scratch_database(server_url: str, prefix: str = "omnicrm_bench") -> tuple[str, Callable[[], None]]:
    """Create a uniquely named database on the server of `server_url`; returns (its URL, a drop callback).

    The callback closes this process's OmniCRM engines first, then drops the database (WITH FORCE).
    """
    import psycopg
    from sqlalchemy.engine import make_url

    server = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        from omnicrm.db import dispose_engines

        dispose_engines()
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return make_url(server).set(database=name).render_as_string(hide_password=False), drop
