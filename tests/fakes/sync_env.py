"""A sync test bench: the fake Google API, settings pointing at it and a session on the test database."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from google.oauth2.credentials import Credentials

from tests.fakes.google_api import FakeGoogleApi, snapshot

ME = "me@example.com"


class SyncEnv:
    def __init__(self, settings, session, fake: FakeGoogleApi, source: str) -> None:
        from omnicrm.db import user_id

        self.settings, self.session, self.fake, self.source = settings, session, fake, source
        self.uid = user_id(session, "default")
        session.commit()

    def user(self, name: str | None) -> int:
        from omnicrm.db import user_id

        uid = user_id(self.session, name) if name else self.uid
        self.session.commit()
        return uid

    def sync(self, source: str | None = None, user: str | None = None, credentials=None, **kw):
        """Run one source's sync in-process, with a plain access token (the fake accepts any)."""
        from omnicrm.sync import run_source

        return run_source(self.session, self.settings, self.user(user), source or self.source,
                          credentials or Credentials(token="t"), **kw)

    def snap(self, user: str | None = None):
        return snapshot(self.session, self.user(user))


@contextmanager
def sync_env(db_url: str, monkeypatch, source: str, fake: FakeGoogleApi | None = None) -> Iterator[SyncEnv]:
    from omnicrm.config import load_settings
    from omnicrm.db import session_scope

    with (FakeGoogleApi(email=ME) if fake is None else _given(fake)) as server:
        monkeypatch.setenv("OMNICRM_DATABASE_URL", db_url)
        monkeypatch.setenv("OMNICRM_GOOGLE_API_ROOT", server.root)
        monkeypatch.setenv("OMNICRM_RETRY_BASE_SECONDS", "0.001")
        settings = load_settings()
        with session_scope(settings) as session:
            yield SyncEnv(settings, session, server, source)


@contextmanager
def _given(fake: FakeGoogleApi) -> Iterator[FakeGoogleApi]:
    yield fake  # started and stopped by its own fixture
