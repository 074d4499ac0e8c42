"""Huey as the delivery channel for job ids, chosen by `settings.queue_url`.

Messages carry one job id and nothing else. They are JSON, never pickle: the serializer only
accepts the one task this module registers, with a single integer argument, so whoever can write
to the queue storage can at most make a worker look at a job id (claims are compare-and-set on the
jobs table, so a forged or duplicated id is harmless).

Backends: `sqlite:///PATH` → SqliteHuey (file 0600), `postgresql://…` → PostgresHuey (built lazily:
it connects when constructed), `redis://…` → RedisHuey (needs the `redis` extra).
`OMNICRM_QUEUE_NAME` (default `omnicrm`) names the queue, so several installations can share one
Redis or PostgreSQL.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from typing import Any, Callable

from omnicrm.config import Settings, ensure_private_file
from omnicrm.errors import InvalidInput, ServiceUnavailable

TASK_NAME = "omnicrm_run_job"
MESSAGE_NAME = f"{__name__}.{TASK_NAME}"  # how Huey's registry names the task (module.name)
DEFAULT_QUEUE_NAME = "omnicrm"

_queues: dict[tuple, "JobQueue"] = {}
_lock = threading.Lock()


def queue_name(settings: Settings) -> str:
    name = settings.env.get("OMNICRM_QUEUE_NAME") or DEFAULT_QUEUE_NAME
    if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 40:
        raise InvalidInput("OMNICRM_QUEUE_NAME: use 1-40 letters, digits, '-' or '_'")
    return name


def backend(queue_url: str) -> str:
    """`sqlite`, `postgresql` or `redis` for a queue URL."""
    if queue_url.startswith("sqlite:///"):
        return "sqlite"
    if queue_url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return "postgresql"
    if queue_url.startswith(("redis://", "rediss://", "unix://")):
        return "redis"
    raise InvalidInput(f"OMNICRM_QUEUE_URL: unsupported queue URL {queue_url.split('://')[0]}://… "
                       "(use sqlite:///PATH, postgresql://… or redis://…)")


def _job_message_serializer():
    from huey.registry import Message
    from huey.serializer import Serializer

    class JobMessageSerializer(Serializer):
        """JSON `{"id", "name", "eta", "job"}`; anything else is refused, nothing is unpickled."""

        def _serialize(self, message: Any) -> bytes:
            if not isinstance(message, Message) or message.name != MESSAGE_NAME:
                raise ValueError("only job-id messages can be queued")
            (job_id,) = message.args
            eta = message.eta.isoformat() if message.eta is not None else None
            return json.dumps({"id": message.id, "name": MESSAGE_NAME, "eta": eta, "job": int(job_id)}).encode()

        def _deserialize(self, data: bytes) -> Any:
            obj = json.loads(bytes(data).decode("utf-8"))
            if (not isinstance(obj, dict) or set(obj) != {"id", "name", "eta", "job"} or obj["name"] != MESSAGE_NAME
                    or not isinstance(obj["job"], int) or isinstance(obj["job"], bool)
                    or not isinstance(obj["id"], str) or len(obj["id"]) > 64
                    or not (obj["eta"] is None or isinstance(obj["eta"], str))):
                raise ValueError("not a job-id message")
            eta = datetime.fromisoformat(obj["eta"]) if obj["eta"] else None
            return Message(obj["id"], MESSAGE_NAME, eta, 0, 0, None, (obj["job"],), {}, None, None,
                           None, None, None, None, None)

    return JobMessageSerializer()


def _sqlite_queue_storage():
    from huey.storage import SqliteStorage

    class SqliteQueueStorage(SqliteStorage):
        """WAL with synchronous=NORMAL: no fsync per message (Huey offers only FULL or OFF). A power
        loss may forget the last messages, never corrupt the file; the reaper re-delivers them."""

        def _create_connection(self):
            conn = super()._create_connection()
            conn.execute("pragma synchronous=NORMAL")
            return conn

    return SqliteQueueStorage


def _create_pg_tables(storage) -> None:
    """Huey's tables, created under an advisory lock: concurrent `CREATE TABLE IF NOT EXISTS` from
    workers starting together can otherwise fail on PostgreSQL's catalog unique index."""
    with storage.db(commit=True, close=True) as curs:
        curs.execute("SELECT pg_advisory_xact_lock(72651002)")
        for sql in storage.ddl:
            curs.execute(sql)


def _pg_queue_connection(dsn: str):
    """A queue connection that does not wait for the WAL flush on commit: a message lost in a
    database crash is re-delivered by the reaper (the jobs table is the source of truth)."""
    import psycopg

    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    conn.execute("SET synchronous_commit TO off")
    return conn


def _no_revoke(base):
    """`base` without revocation: we never revoke (cancel is a jobs-table state), so skip the two
    revocation reads and the delete Huey would otherwise make for every message."""

    class JobHuey(base):
        def is_revoked(self, task, timestamp=None, peek=True):
            return False

        def delete(self, key):
            if isinstance(key, str) and key.startswith("r:"):
                return False
            return super().delete(key)

    JobHuey.__name__ = f"Job{base.__name__}"
    return JobHuey


class JobQueue:
    """One Huey instance with one task, `run_job(job_id)`, whose body is `executor` (set by the worker)."""

    def __init__(self, settings: Settings, *, blocking: bool = True) -> None:
        self.settings = settings
        self.backend = backend(settings.queue_url)
        self.executor: Callable[[int], None] | None = None
        self.huey = self._build(blocking)
        self.task = self.huey.task(name=TASK_NAME)(self._run)

    def _run(self, job_id: int) -> None:
        if self.executor is None:
            raise RuntimeError("this process does not run jobs")
        self.executor(job_id)

    def _build(self, blocking: bool):
        url, name = self.settings.queue_url, queue_name(self.settings)
        common = dict(results=False, utc=True, serializer=_job_message_serializer())
        try:
            if self.backend == "sqlite":
                from huey import SqliteHuey

                path = ensure_private_file(__import__("pathlib").Path(url[len("sqlite:///"):]))
                return _no_revoke(SqliteHuey)(name, filename=str(path), timeout=30,
                                              storage_class=_sqlite_queue_storage(), **common)
            if self.backend == "postgresql":
                from huey import PostgresHuey

                dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
                huey = _no_revoke(PostgresHuey)(name, connection=lambda: _pg_queue_connection(dsn),
                                                blocking=blocking, read_timeout=1, table_prefix="omnicrm_huey",
                                                create_tables=False, **common)
                _create_pg_tables(huey.storage)
                return huey
            try:
                import redis  # noqa: F401
            except ImportError:
                raise InvalidInput("OMNICRM_QUEUE_URL: redis:// needs the redis extra "
                                   "(pip install 'omnicrm[redis]')") from None
            from huey import RedisHuey

            return _no_revoke(RedisHuey)(name, url=url, blocking=blocking, read_timeout=1, **common)
        except InvalidInput:
            raise
        except Exception as exc:  # noqa: BLE001 - driver errors differ per backend
            raise ServiceUnavailable(f"cannot open the job queue ({self.backend}): "
                                     f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                     ) from None

    def put(self, job_ids: list[int], eta: datetime | None = None) -> None:
        """Hand job ids to Huey, now or (for a backoff) at `eta`."""
        try:
            for job_id in job_ids:
                if eta is None:
                    self.task(int(job_id))
                else:
                    naive = eta.astimezone(timezone.utc).replace(tzinfo=None)
                    self.task.schedule(args=(int(job_id),), eta=naive)
        except Exception as exc:  # noqa: BLE001
            raise ServiceUnavailable(f"cannot reach the job queue ({self.backend}): {type(exc).__name__}: "
                                     f"{str(exc).strip()[:200]}") from None

    def check(self) -> None:
        """Raise ServiceUnavailable (one clean line) if the queue cannot be reached."""
        try:
            self.huey.storage.queue_size()
        except Exception as exc:  # noqa: BLE001
            raise ServiceUnavailable(f"cannot reach the job queue ({self.backend}): {type(exc).__name__}: "
                                     f"{str(exc).strip()[:200]}") from None

    def pop_nowait(self) -> int | None:
        """The next delivered job id, without waiting (for `worker --once`)."""
        task = self.huey.dequeue()
        return int(task.args[0]) if task is not None else None

    def pop_due(self) -> list[int]:
        """Job ids whose delayed delivery is due (removes them from Huey's schedule)."""
        return [int(task.args[0]) for task in self.huey.read_schedule()]

    def pending(self) -> int:
        return self.huey.pending_count()

    def flush(self) -> None:
        """Forget every message (tests and benchmarks; the jobs table is untouched)."""
        self.huey.storage.flush_queue()
        self.huey.storage.flush_schedule()


def get_queue(settings: Settings, *, blocking: bool = True) -> JobQueue:
    """The process-wide JobQueue for this queue URL and name (built on first use)."""
    key = (settings.queue_url, queue_name(settings), blocking)
    with _lock:
        queue = _queues.get(key)
        if queue is None:
            queue = _queues[key] = JobQueue(settings, blocking=blocking)
        return queue


def forget_queues() -> None:
    """Drop cached queues (after fork, and between tests)."""
    with _lock:
        for queue in _queues.values():
            try:
                queue.huey.storage.close()
            except Exception:  # noqa: BLE001
                pass
        _queues.clear()
