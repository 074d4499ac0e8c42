"""SQLAlchemy 2.0 typed tables. Every user-owned row carries `user_id`."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator):
    """Stored as naive UTC on both engines, always returned timezone-aware (UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text from a bulk path
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=timezone.utc)


def utcnow() -> datetime:
    from omnicrm.config import now

    return now()


IdType = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    display_name: Mapped[str | None] = mapped_column(Text)
    company: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_interaction_at: Mapped[datetime | None]
    # Interaction counters behind the relationship score (omnicrm/score.py); kept by
    # contacts.refresh_last_interaction together with last_interaction_at.
    interaction_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    inbound_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    outbound_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Folded name/company/emails/phone digits; every write path refreshes it (normalize.search_text).
    search_text: Mapped[str] = mapped_column(Text, default="")
    # Fields the user set by hand ("display_name,company,title"); sync never overwrites them.
    manual_fields: Mapped[str] = mapped_column(String(200), default="")

    emails: Mapped[list["ContactEmail"]] = relationship(
        back_populates="contact", cascade="all, delete-orphan", order_by="ContactEmail.position",
        passive_deletes=True)
    phones: Mapped[list["ContactPhone"]] = relationship(
        back_populates="contact", cascade="all, delete-orphan", order_by="ContactPhone.position",
        passive_deletes=True)
    tags: Mapped[list["Tag"]] = relationship(secondary="contact_tags", order_by="Tag.name")
    notes: Mapped[list["Note"]] = relationship(
        back_populates="contact", cascade="all, delete-orphan", order_by="Note.id", passive_deletes=True)

    __table_args__ = (
        Index("ix_contacts_user_created", "user_id", "created_at", "id"),
        Index("ix_contacts_user_updated", "user_id", "updated_at", "id"),
        Index("ix_contacts_user_last", "user_id", "last_interaction_at", "id"),
    )


class ContactEmail(Base):
    __tablename__ = "contact_emails"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320))
    position: Mapped[int] = mapped_column(Integer, default=0)  # 0 = primary
    contact: Mapped[Contact] = relationship(back_populates="emails")
    __table_args__ = (UniqueConstraint("user_id", "email", name="uq_contact_emails_user_email"),
                      Index("ix_contact_emails_contact_position", "contact_id", "position"))

    @property
    def is_primary(self) -> bool:
        return self.position == 0


class ContactPhone(Base):
    __tablename__ = "contact_phones"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    raw: Mapped[str] = mapped_column(Text)
    e164: Mapped[str | None] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer, default=0)
    contact: Mapped[Contact] = relationship(back_populates="phones")
    __table_args__ = (Index("ix_contact_phones_user_e164", "user_id", "e164"),
                      Index("ix_contact_phones_contact_position", "contact_id", "position"))

    @property
    def value(self) -> str:
        return self.e164 or self.raw


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_tags_user_name"),)


class ContactTag(Base):
    __tablename__ = "contact_tags"
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True)


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    contact: Mapped[Contact] = relationship(back_populates="notes")


class Interaction(Base):
    """One touch point on the timeline: an email, a meeting or a note."""

    __tablename__ = "interactions"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # email | meeting | note
    direction: Mapped[str | None] = mapped_column(String(8))  # in | out
    occurred_at: Mapped[datetime]
    subject: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32))  # gmail | calendar | manual | …
    external_id: Mapped[str] = mapped_column(String(400))
    __table_args__ = (
        UniqueConstraint("user_id", "source", "external_id", name="uq_interactions_user_source_ext"),
        Index("ix_interactions_contact_time", "contact_id", "occurred_at"),
    )


class ExternalLink(Base):
    """A contact's identity in another system, e.g. a People `resourceName`."""

    __tablename__ = "external_links"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(400))
    etag: Mapped[str | None] = mapped_column(String(200))
    __table_args__ = (UniqueConstraint("user_id", "source", "external_id", name="uq_links_user_source_ext"),)


class SyncState(Base):
    """Cursor and outcome of one source's sync for one user."""

    __tablename__ = "sync_states"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(32))
    cursor: Mapped[str | None] = mapped_column(Text)  # historyId / syncToken of the last finished run
    progress: Mapped[dict | None] = mapped_column(JSON)  # page token etc. of a run in progress
    last_success_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    items_synced: Mapped[int] = mapped_column(Integer, default=0)
    cursor_at: Mapped[datetime | None]
    __table_args__ = (UniqueConstraint("user_id", "source", name="uq_sync_states_user_source"),)


class Credential(Base):
    """A user's Google OAuth grant; `secret` is Fernet-encrypted JSON (tokens + client config)."""

    __tablename__ = "credentials"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    provider: Mapped[str] = mapped_column(String(32), default="google")
    account_email: Mapped[str | None] = mapped_column(String(320))
    scopes: Mapped[str] = mapped_column(Text, default="")
    secret: Mapped[str] = mapped_column(Text)
    token_expiry: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_refresh_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(32), default="ok")  # ok | reconnect_needed


class Job(Base):
    """The source of truth for queued work; Huey only delivers job ids."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    # When the id was last handed to Huey (or, for a delayed delivery, when it becomes due);
    # the reaper re-delivers queued jobs whose delivery is older than a lease.
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(400))
    # Jobs sharing an exclusive key never run at the same time (e.g. "sync:<user>:gmail").
    exclusive_key: Mapped[str | None] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    __table_args__ = (
        Index("ix_jobs_status_run_after", "status", "run_after"),
        Index("ix_jobs_user_status", "user_id", "status"),
        Index("uq_jobs_running_exclusive", "exclusive_key", unique=True,
              sqlite_where=text("status = 'running'"), postgresql_where=text("status = 'running'")),
        Index("uq_jobs_active_idempotency", "user_id", "idempotency_key", unique=True,
              sqlite_where=text("status IN ('queued', 'running')"),
              postgresql_where=text("status IN ('queued', 'running')")),
    )
