"""Settings from environment variables and global flags. No I/O at import."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from omnicrm.errors import InvalidInput

FORMATS = ("table", "csv", "json", "jsonl")


def default_home() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "omnicrm"


def normalise_db_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` and route both through psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if url.startswith(("sqlite:///", "postgresql+psycopg://")) or url == "sqlite://":
        return url
    raise InvalidInput(f"--db / OMNICRM_DATABASE_URL: unsupported database URL {url.split('://')[0]}://… "
                       "(use sqlite:///PATH or postgresql://…)")


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    queue_url: str
    user: str = "default"
    secret_key: str | None = None
    google_api_root: str | None = None
    format: str = "table"
    region: str = "US"
    quiet: bool = False
    verbose: bool = False
    log_json: bool = False
    env: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


def load_settings(env: dict | None = None, *, db: str | None = None, user: str | None = None,
                  fmt: str | None = None, region: str | None = None, **flags) -> Settings:
    """Build settings: flag > environment variable > default."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("OMNICRM_HOME") or default_home()).expanduser()
    database_url = normalise_db_url(db or env.get("OMNICRM_DATABASE_URL") or f"sqlite:///{home / 'omnicrm.db'}")
    queue_url = env.get("OMNICRM_QUEUE_URL") or (
        f"sqlite:///{home / 'queue.db'}" if database_url.startswith("sqlite") else database_url
    )
    fmt = fmt or env.get("OMNICRM_FORMAT") or "table"
    if fmt not in FORMATS:
        raise InvalidInput(f"--format / OMNICRM_FORMAT: {fmt!r} is not one of {', '.join(FORMATS)}")
    user = user or env.get("OMNICRM_USER") or "default"
    if not user.strip() or len(user) > 200:
        raise InvalidInput("--user / OMNICRM_USER: must be 1-200 characters")
    region = (region or env.get("OMNICRM_REGION") or "US").upper()
    if len(region) != 2 or not region.isalpha():
        raise InvalidInput(f"--region / OMNICRM_REGION: {region!r} is not a two-letter country code")
    if env.get("OMNICRM_NOW"):
        try:
            datetime.fromisoformat(env["OMNICRM_NOW"])
        except ValueError:
            raise InvalidInput(f"OMNICRM_NOW: {env['OMNICRM_NOW']!r} is not an ISO 8601 date-time") from None
    return Settings(
        home=home,
        database_url=database_url,
        queue_url=queue_url,
        user=user.strip(),
        secret_key=env.get("OMNICRM_SECRET_KEY") or None,
        google_api_root=(env.get("OMNICRM_GOOGLE_API_ROOT") or "").rstrip("/") or None,
        format=fmt,
        region=region,
        env=env,
        **flags,
    )


def now() -> datetime:
    """The current time (aware, UTC). `OMNICRM_NOW` (ISO 8601) pins it for reproducible runs and tests."""
    pinned = os.environ.get("OMNICRM_NOW")
    if pinned:
        try:
            value = datetime.fromisoformat(pinned)
        except ValueError:
            raise InvalidInput(f"OMNICRM_NOW: {pinned!r} is not an ISO 8601 date-time") from None
        if value.tzinfo is None:
            value = value.astimezone()
        return value.astimezone(timezone.utc)
    return datetime.now(timezone.utc)


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the owner only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def ensure_private_file(path: Path) -> Path:
    """Create `path` if missing with mode 0600 and tighten it if it exists."""
    if not path.parent.exists():
        ensure_private_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path
