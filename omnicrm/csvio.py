"""CSV import and export of contacts, streamed in constant memory and written in bulk.

Export reads contacts in id-keyed batches with plain Core/driver SQL (emails, phones, tags and notes
aggregated by the engine), never ORM objects per row, and writes them through `omnicrm.output`.

Import reads a file or stdin (UTF-8 with or without BOM, UTF-16 with BOM, or `--encoding`), sniffs
the delimiter, skips preamble lines (LinkedIn), detects the format from the header, and then works in
batches: parse and validate the rows (in a forked reader process for a big input), tell new contacts
from rows that may repeat an email (a bitmap of email hashes; those are looked up, and merged, at the
end), and write with driver-level `executemany` (SQLite) or `COPY` (PostgreSQL) into the real tables.
Everything happens in the caller's one transaction, so an atomic import that finds a bad row is rolled
back by simply not committing.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import pickle
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from omnicrm import csvformats as formats
from omnicrm.config import now as clock_now
from omnicrm.errors import InvalidInput, OmniCrmError
from omnicrm.filters import ContactFilter, apply_filter, normalise_tag
from omnicrm.models import Contact
from omnicrm.normalize import is_valid_email, search_text, to_e164

EXPORT_COLUMNS = list(formats.NATIVE_COLUMNS)
EXPORT_BATCH = 5000
EXPORT_PROCESSES = 2  # readers of a whole export: SQLite processes, PostgreSQL connections (one per core)
PG_EXPORT_RANGE = 50_000  # contact ids per COPY of a parallel PostgreSQL export
IMPORT_BATCH = 5000
DEFER_LIMIT = 20_000  # rows that may merge, held back by a fast import until this many (or the end)
FAST_MIN_EMAILS = 50_000  # a user with at most this many emails (or as many as the file) gets a fast import
BYTES_PER_ROW = 100  # a rough guess of a file's rows from its size; real exports run 60-150 bytes a contact
PARSE_PROCESS_MIN_BYTES = 4 * 1024 * 1024  # smaller inputs are parsed inline (a fork costs ~10 ms)
SAMPLE_BYTES = 64 * 1024
FIELD_LIMIT = 16 * 1024 * 1024  # a larger field is a broken file, not a contact
TEXT_MAX = 10_000
NOTE_MAX = 100_000
PHONE_MAX = 100
TAG_MAX = 200
MAX_KEPT_ERRORS = 100
ANALYZE_MIN_ROWS = 10_000  # PostgreSQL: an import creating this many contacts refreshes the statistics
IMPORT_LOCK_KEY = 72651002  # pg_advisory_xact_lock(key, user_id): imports of one user run one at a time
ON_DUPLICATE = ("merge", "skip", "error")
DELIMITERS = {",": ",", ";": ";", "tab": "\t", "\\t": "\t", "\t": "\t", "|": "|"}
_SEP = "\x1f"  # joins multi-values inside export queries (cannot occur in our data)


# --- phones: the CPU hot spot of a big import ------------------------------------------------------

_NANP_REGIONS = ("US", "CA")


def phone_e164(raw: str, region: str) -> str | None:
    """`normalize.to_e164` with a shortcut for North American numbers (same answers, ~50x faster).

    ASCII digits with ` ().-` separators take the shortcut when they are +1 and 10 digits (the
    plus first), or (in a NANP region) a 10-digit number or 1 + 10 digits whose area code starts with
    2-9, or a 7-digit local number starting with 2-9; libphonenumber answers every other shape (tests
    compare both on many generated numbers).
    """
    if raw.isascii():
        number = raw.encode("ascii").translate(None, b" ().-").decode("ascii")
        if number.isdigit():
            if region in _NANP_REGIONS:
                size = len(number)
                if (size == 10 or size == 7) and number[0] in "23456789":
                    return "+1" + number
                if size == 11 and number[0] == "1" and number[1] in "23456789":
                    return "+" + number
        elif (raw[0] == "+" and len(number) == 12 and number[1] == "1" and number[2] in "23456789"
              and number[1:].isdigit()):
            return number
    return to_e164(raw, region)


# --- reading the input ----------------------------------------------------------------------------

class _Chain(io.RawIOBase):
    """The bytes already read for sniffing, then the rest of the stream; counts what was consumed."""

    def __init__(self, prefix: bytes, rest: IO[bytes] | None):
        self._prefix = memoryview(prefix)
        self._rest = rest
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if len(self._prefix):
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
        elif self._rest is not None:
            data = self._rest.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        else:
            n = 0
        self.consumed += n
        return n


def _read_prefix(raw: IO[bytes], size: int) -> tuple[bytes, bool]:
    chunks, total = [], 0
    while total < size:
        data = raw.read(size - total)
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
        total += len(data)
    return b"".join(chunks), False


def _encoding_hint(exc: UnicodeDecodeError, where: str) -> InvalidInput:
    bad = exc.object[exc.start:exc.start + 1].hex() if isinstance(exc.object, (bytes, bytearray)) else "?"
    return InvalidInput(f"--encoding: {where} is not valid {exc.encoding} (byte 0x{bad}); "
                        "pass the file's encoding, e.g. --encoding cp1252 or --encoding latin-1")


@dataclass
class CsvInput:
    """An opened CSV: its header, detected format and delimiter, and its records with line numbers."""

    header: list[str]
    format: str | None
    delimiter: str
    encoding: str
    header_line: int
    total_bytes: int | None
    _reader: Any = field(repr=False)
    _chain: _Chain = field(repr=False)
    _close: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def bytes_read(self) -> int:
        return self._chain.consumed

    def records(self) -> Iterator[tuple[int, list[str]]]:
        """(first line of the record, cells), blank lines and rows of blank cells left out."""
        for batch in self.batches(1000):
            for line, cells in batch:
                if not is_blank(cells):
                    yield line, cells

    def batches(self, size: int) -> Iterator[list[tuple[int, list[str]]]]:
        """Lists of up to `size` records as (first line, cells). Empty lines are left out, but rows of
        blank cells (spreadsheets write those) are not: whoever reads the cells skips them (is_blank)."""
        reader = self._reader
        last = reader.line_num
        batch: list[tuple[int, list[str]]] = []
        try:
            for cells in reader:
                line = last + 1
                last = reader.line_num
                if cells:
                    batch.append((line, cells))
                    if len(batch) >= size:
                        yield batch
                        batch = []
            if batch:
                yield batch
        except csv.Error as exc:
            message = str(exc)
            if "end of data" in message:
                raise InvalidInput(f"line {last + 1}: a quoted field is never closed (unterminated quote)") from None
            if "field larger" in message:
                raise InvalidInput(f"line {last + 1}: a field is larger than {FIELD_LIMIT // 2**20} MB") from None
            raise InvalidInput(f"line {last + 1}: malformed CSV ({message})") from None
        except UnicodeDecodeError as exc:
            raise _encoding_hint(exc, f"line {last + 1}") from None

    def close(self) -> None:
        if self._close:
            self._close()


def is_blank(cells: list[str]) -> bool:
    return not "".join(cells).strip()


def open_csv(source: str | Path | IO[bytes], *, encoding: str | None = None, delimiter: str | None = None,
             source_format: str = "auto", mapping: dict[str, str] | None = None) -> CsvInput:
    """Open FILE (or `-`/a binary stream): detect encoding, delimiter, preamble and format."""
    csv.field_size_limit(FIELD_LIMIT)
    close = None
    total = None
    if isinstance(source, (str, Path)) and str(source) == "-":
        raw: IO[bytes] = sys.stdin.buffer
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            raw = open(path, "rb")  # noqa: SIM115 - closed by CsvInput.close
        except FileNotFoundError:
            raise InvalidInput(f"FILE: {path} does not exist") from None
        except IsADirectoryError:
            raise InvalidInput(f"FILE: {path} is a directory") from None
        except PermissionError:
            raise InvalidInput(f"FILE: {path} is not readable") from None
        close = raw.close
        total = os.fstat(raw.fileno()).st_size
    else:
        raw = source
    try:
        return _open(raw, total, close, encoding, delimiter, source_format, mapping or {})
    except BaseException:
        if close:
            close()
        raise


def _open(raw, total, close, encoding, delimiter, source_format, mapping) -> CsvInput:
    prefix, at_eof = _read_prefix(raw, SAMPLE_BYTES)
    if not prefix.strip(b" \r\n\t\xef\xbb\xbf"):
        raise InvalidInput("FILE: the input is empty (expected a header row)")
    if encoding:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise InvalidInput(f"--encoding: unknown encoding {encoding!r}") from None
        if codecs.lookup(encoding).name == "utf-8" and prefix.startswith(codecs.BOM_UTF8):
            encoding = "utf-8-sig"
    elif prefix.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    elif prefix.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8"
    head = prefix[:8192]
    nul = head.count(b"\x00")
    if nul and "16" not in encoding and "32" not in encoding and (
            (nul > 2 and nul * 100 >= len(head)) or b"\x00" in head.split(b"\n", 1)[0]):
        raise InvalidInput("FILE: the input looks binary (it contains NUL bytes), not like CSV text")
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    try:
        sample = decoder.decode(prefix, final=at_eof)
    except UnicodeDecodeError as exc:
        raise _encoding_hint(exc, "the input") from None
    if "\x00" in sample[:8192] and "16" in encoding:
        raise InvalidInput("FILE: the input looks binary (it contains NUL characters), not like CSV text")
    if not at_eof:  # the last sampled line may be cut
        sample = sample[: max(sample.rfind("\n"), 0)]

    forced = None if source_format == "auto" else source_format
    choices = [DELIMITERS[delimiter]] if delimiter else [",", ";", "\t"]
    best = None
    for delim in choices:
        records = _sample_records(sample, delim)
        for index, record in enumerate(records[:25]):
            if not record:
                continue
            fmt = forced or formats.detect_format(record)
            mapped = [t for t in formats.column_map(record, fmt) if t] if fmt else []
            mapped += [1 for h in record if formats.key(h) in mapping]
            if mapped:
                score = (len(mapped), len(record))
                if best is None or score > best[0]:
                    best = (score, delim, index, record, fmt)
                break
    if best is None:  # nothing recognisable: the first non-empty record is the header
        for delim in choices:
            records = _sample_records(sample, delim)
            first = next(((i, r) for i, r in enumerate(records) if r), None)
            if first and (best is None or len(first[1]) > len(best[3])):
                best = ((0, len(first[1])), delim, first[0], first[1], forced)
    if best is None:
        raise InvalidInput("FILE: no header row found")
    _, delim, header_index, _, fmt = best

    chain = _Chain(prefix, None if at_eof else raw)
    text = io.TextIOWrapper(io.BufferedReader(chain, 1 << 16), encoding=encoding, errors="strict", newline="")
    reader = csv.reader(text, delimiter=delim, strict=True)
    header: list[str] = []
    try:
        for _ in range(header_index + 1):
            header = next(reader)
    except (csv.Error, StopIteration):
        raise InvalidInput("FILE: cannot read the header row") from None
    header_line = reader.line_num
    header = [h.strip().lstrip("\ufeff").strip() for h in header]
    seen: dict[str, int] = {}
    for position, name in enumerate(header, 1):
        if not name:
            continue
        k = formats.key(name)
        if k in seen:
            raise InvalidInput(f"FILE: duplicate column name {name!r} (columns {seen[k]} and {position}) "
                               f"in the header on line {header_line}")
        seen[k] = position
    return CsvInput(header=header, format=fmt, delimiter=delim, encoding=encoding, header_line=header_line,
                    total_bytes=total, _reader=reader, _chain=chain, _close=close)


def _sample_records(sample: str, delim: str) -> list[list[str]]:
    records = []
    reader = csv.reader(io.StringIO(sample), delimiter=delim)
    try:
        for record in reader:
            records.append(record)
            if len(records) >= 30:
                break
    except csv.Error:
        pass
    return records


# --- import ---------------------------------------------------------------------------------------

@dataclass
class ImportOptions:
    source_format: str = "auto"
    mapping: dict[str, str] = field(default_factory=dict)
    on_duplicate: str = "merge"
    skip_invalid: bool = False
    dry_run: bool = False
    region: str = "US"
    batch_size: int = IMPORT_BATCH
    seen_bits: int = 1 << 28  # the size (a power of two) of a fast import's bitmap of emails (_SeenEmails): 32 MB

    def validate(self) -> "ImportOptions":
        if self.source_format not in ("auto", *formats.FORMATS):
            raise InvalidInput(f"--from: {self.source_format!r} is not one of auto, {', '.join(formats.FORMATS)}")
        if self.on_duplicate not in ON_DUPLICATE:
            raise InvalidInput(f"--on-duplicate: {self.on_duplicate!r} is not one of {', '.join(ON_DUPLICATE)}")
        return self


@dataclass
class RowError:
    line: int
    column: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.reason}"


@dataclass
class ImportSummary:
    format: str
    rows: int = 0
    created: int = 0
    merged: int = 0
    skipped: int = 0
    rejected: int = 0
    dry_run: bool = False
    atomic: bool = True
    errors: list[RowError] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Atomic mode found bad rows: nothing may be written."""
        return self.atomic and self.rejected > 0

    def line(self) -> str:
        if self.dry_run:
            return (f"would create {self.created}, merge {self.merged}, skip {self.skipped}, "
                    f"reject {self.rejected}")
        return f"created {self.created}, merged {self.merged}, skipped {self.skipped}, rejected {self.rejected}"

    def as_dict(self) -> dict:
        return {"format": self.format, "rows": self.rows, "created": self.created, "merged": self.merged,
                "skipped": self.skipped, "rejected": self.rejected, "dry_run": self.dry_run,
                "written": not self.dry_run and not self.failed,
                "errors": [{"line": e.line, "column": e.column, "reason": e.reason} for e in self.errors]}


class _Target:
    """A contact rows merge into: one just created by this batch, or an existing one loaded for merging."""

    __slots__ = ("id", "new", "name", "company", "title", "emails", "phones", "tags", "notes", "manual",
                 "created_at", "updated_at", "last_at", "n_emails", "n_phones", "n_tags", "n_notes",
                 "next_email_pos", "next_phone_pos", "changed", "line", "search")

    def __init__(self, *, id=None, new=True, name=None, company=None, title=None, manual=(), created_at=None,
                 updated_at=None, last_at=None, line=0):
        self.id, self.new, self.line = id, new, line
        self.name, self.company, self.title = name, company, title
        self.emails: list[str] = []
        self.phones: list[tuple[str, str | None]] = []
        self.tags: list[str] = []
        self.notes: list[str] = []
        self.manual = set(manual)
        self.created_at, self.updated_at, self.last_at = created_at, updated_at, last_at
        self.n_emails = self.n_phones = self.n_tags = self.n_notes = 0
        self.next_email_pos = self.next_phone_pos = 0
        self.changed = False
        self.search: str | None = None


class _Row(NamedTuple):
    """A parsed, valid row (a plain tuple: it crosses the pipe from the reader process)."""

    line: int
    cells: list[str] | None
    name: str | None
    company: str | None
    title: str | None
    notes: str | None
    emails: list[str]
    phones: list[tuple[str, str | None]]
    tags: list[str]
    created_at: datetime | None
    updated_at: datetime | None
    search: str  # the search text if the row becomes a new contact (computed by the reader)
    slot: int  # the row's place among the batch's valid rows (a fast import reserves a contact id for each)


class _SeenEmails:
    """The emails an import has met (the user's own, then each row's), as a bitmap of their hashes, so that
    telling a new contact from a duplicate costs no query. A set bit means "maybe seen": another email can
    share it (about one row in 150 at a million emails), and such rows take the exact path."""

    def __init__(self, size: int, emails: Iterable[str] = ()):
        self.bits, self.mask = bytearray(max(size >> 3, 1)), max(size, 8) - 1
        for email in emails:
            self.add((email,))

    def add(self, emails: list[str]) -> bool:
        """Mark `emails` as met; True when any of them may have been met before."""
        bits, mask, met = self.bits, self.mask, False
        for email in emails:
            h = hash(email) & mask
            if bits[h >> 3] & (1 << (h & 7)):
                met = True
            else:
                bits[h >> 3] |= 1 << (h & 7)
        return met


class _Fresh:
    """The new contacts of one batch (rows sharing no email with an earlier row or an existing contact), as
    insert rows without ids, built by the reader: `k` is a contact's index in `contacts`."""

    __slots__ = ("slots", "contacts", "emails", "phones", "tags", "notes")

    def __init__(self) -> None:
        self.slots: list[int] = []  # each contact's row slot (see _Row.slot)
        # (display_name, company, title, created_at, updated_at, last_interaction_at, search_text,
        #  manual_fields, interaction_count): the columns of _CONTACT_COLUMNS after id and user_id
        self.contacts: list[tuple] = []
        self.emails: list[tuple[str, int, int]] = []  # (email, k, position), in email order
        self.phones: list[tuple[int, str, str | None, int]] = []  # (k, raw, e164, position)
        self.tags: list[tuple[int, str]] = []  # (k, tag)
        self.notes: list[tuple[int, str]] = []  # (k, body)

    def add(self, slot, name, company, title, notes, emails, phones, tags, created, updated, last, search) -> None:
        k = len(self.contacts)
        self.slots.append(slot)
        manual = _MANUAL_BY_MASK[(name is not None) << 2 | (company is not None) << 1 | (title is not None)]
        self.contacts.append((name, company, title, created, updated, last, search, manual, 1 if notes else 0))
        for position, email in enumerate(emails):
            self.emails.append((email, k, position))
        for position, (raw, e164) in enumerate(phones):
            self.phones.append((k, raw, e164, position))
        for tag in tags:
            self.tags.append((k, tag))
        if notes:
            self.notes.append((k, notes))

    def __getstate__(self):
        return self.slots, self.contacts, self.emails, self.phones, self.tags, self.notes

    def __setstate__(self, state) -> None:
        self.slots, self.contacts, self.emails, self.phones, self.tags, self.notes = state


class _Parsed(NamedTuple):
    """One batch of records as the reader hands it over."""

    count: int  # records read
    slots: int  # valid rows
    fresh: _Fresh | None  # new contacts (fast imports)
    rows: list[_Row]  # rows that may merge into a contact (every valid row outside a fast import)
    rejects: list[tuple]  # (line, cells, [(column, reason)])
    consumed: int  # bytes of input read so far


_CONTACT_COLUMNS = ("id", "user_id", "display_name", "company", "title", "created_at", "updated_at",
                    "last_interaction_at", "search_text", "manual_fields", "interaction_count")
_MANUAL_FIELDS = ("display_name", "company", "title")
# manual_fields for each combination of name, company and title being set (bit 2, 1, 0 of the index)
_MANUAL_BY_MASK = tuple(",".join(f for bit, f in zip((4, 2, 1), _MANUAL_FIELDS) if mask & bit) for mask in range(8))


class _Db:
    """Driver-level bulk access inside the session's transaction (SQLite executemany / PostgreSQL COPY)."""

    def __init__(self, session: Session):
        # SQLite checks no foreign keys for an import that begins the transaction: the rows it writes only
        # point at the user, at tags it looked up or made, and at contacts it made or loaded, all under
        # the write lock (see db._configure_sqlite).
        begins = not session.in_transaction()
        self.conn = session.connection(execution_options={"sqlite_foreign_keys": False} if begins else None)
        self.raw = self.conn.connection.driver_connection
        self.pg = self.conn.dialect.name == "postgresql"
        self.cur = self.raw.cursor()
        self.mark = "%s" if self.pg else "?"
        self._next: dict[str, int] = {}
        self.exclusive: set[str] = set()  # PostgreSQL tables this transaction holds an exclusive lock on

    def ts(self, value: datetime):
        naive = value.astimezone(timezone.utc).replace(tzinfo=None)
        return naive if self.pg else naive.strftime("%Y-%m-%d %H:%M:%S.%f")

    def query(self, sql: str, params=()) -> list[tuple]:
        self.cur.execute(sql.replace("?", self.mark), params)
        return self.cur.fetchall()

    def select_in(self, sql: str, head: tuple, values: list) -> list[tuple]:
        """`sql` has one `IN_LIST` placeholder for `values`, after the `head` parameters.

        (`+user_id` in these queries keeps SQLite off the (user_id, …) indexes, which would scan every
        row of the user instead of looking up the few contact ids.)"""
        if not values:
            return []
        if self.pg:
            return self.query(sql.replace("IN_LIST", "= ANY(?)"), (*head, list(values)))
        rows: list[tuple] = []
        for start in range(0, len(values), 5000):
            chunk = values[start:start + 5000]
            rows += self.query(sql.replace("IN_LIST", f"IN ({','.join('?' * len(chunk))})"), (*head, *chunk))
        return rows

    def insert(self, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        if not rows:
            return
        if self.pg:
            with self.cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" * len(columns))
            self.cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        if rows:
            self.cur.executemany(sql.replace("?", self.mark), rows)

    def new_ids(self, table: str, count: int) -> list[int]:
        """Ids for rows about to be inserted (we insert explicit ids so children can point at them)."""
        if count == 0:
            return []
        if self.pg and table in self.exclusive:  # nobody else can insert meanwhile: reserve a block at once
            last = self.query("SELECT setval(pg_get_serial_sequence(?, 'id'), nextval(pg_get_serial_sequence(?, 'id')) "
                              "+ ? - 1)", (table, table, count))[0][0]
            return list(range(last - count + 1, last + 1))
        if self.pg:
            rows = self.query("SELECT nextval(pg_get_serial_sequence(?, 'id')) FROM generate_series(1, ?)",
                              (table, count))
            return [r[0] for r in rows]
        # SQLite: the import holds the write lock (BEGIN IMMEDIATE) for its whole transaction.
        start = self._next.get(table)
        if start is None:
            start = (self.query(f"SELECT coalesce(max(id), 0) FROM {table}")[0][0] or 0) + 1
        self._next[table] = start + count
        return list(range(start, start + count))


def check_columns(source: CsvInput, options: ImportOptions, unneutralise=None) -> formats.Extractor:
    """The extractor for this file's header; InvalidInput when its columns map to nothing useful."""
    known = ", ".join(f for f in formats.KNOWN_FIELDS if f != "ignore")
    seen = ", ".join(repr(h) for h in source.header if h) or "(none)"
    if source.format is None and not options.mapping:
        raise InvalidInput(f"FILE: none of the columns maps to a contact field. Columns seen: {seen}. "
                           f"Known fields: {known}; formats: native, google, outlook, linkedin (--from); "
                           "map other columns with --map COL=FIELD")
    extractor = formats.build_extractor(source.header, source.format, options.mapping, unneutralise)
    if not extractor.columns:
        raise InvalidInput(f"FILE: none of the columns maps to a contact field. Columns seen: {seen}. "
                           f"Known fields: {known}; map columns with --map COL=FIELD")
    if not {"display_name", "first_name", "middle_name", "last_name", "email"} & set(extractor.mapped):
        raise InvalidInput(f"FILE: no column gives a name or an email (mapped: {', '.join(extractor.mapped)}); "
                           "use --map COL=display_name or --map COL=email")
    return extractor


class Importer:
    """One import run over one CsvInput, inside the caller's transaction."""

    def __init__(self, session: Session, user_id: int, source: CsvInput, options: ImportOptions, *,
                 on_error: Callable[[RowError], None] | None = None,
                 on_reject: Callable[[list[str], str], None] | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 on_plan: Callable[[dict], None] | None = None):
        from omnicrm.output import unneutralise

        self.session, self.user_id, self.source, self.opts = session, user_id, source, options
        fmt = source.format
        self.extractor = check_columns(source, options, unneutralise)
        self.summary = ImportSummary(format=fmt or "custom", dry_run=options.dry_run,
                                     atomic=not options.skip_invalid)
        self.on_error, self.on_reject, self.on_progress, self.on_plan = on_error, on_reject, on_progress, on_plan
        self.now = clock_now()
        self.db = _Db(session)
        self.tag_ids: dict[str, int] = {}
        self.width = len(source.header)
        self.region = options.region
        self.now_ts = self.db.ts(self.now)
        self.keep_cells = on_reject is not None  # original cells are only needed for the rejects file
        self._pending_rejects: list[tuple] = []
        self._blank_rows = 0
        self.seen: _SeenEmails | None = None  # set for a fast import (see _seen_emails)
        self.fresh: _Fresh | None = None  # the batch's new contacts, while a fast import parses it
        self.deferred: list[_Row] = []
        self.reserved: dict[int, int] = {}  # line of a held-back row -> the contact id it gets if it is new

    # -- driving --------------------------------------------------------------------------------
    def run(self) -> ImportSummary:
        """Read every record and write it. A fast import writes new contacts at once and holds back the
        rows that may merge into another contact for `flush_deferred`."""
        for parsed in self._parsed():
            self.summary.rows += parsed.count
            for line, cells, errors in parsed.rejects:
                self._reject(line, cells, errors)
            if self.seen is None:
                self._batch(parsed.rows)
            else:
                # A contact id for every valid row, in file order: new contacts keep the file's order even
                # when a held-back row turns out to be new (a merged row leaves its id unused).
                ids = self.db.new_ids("contacts", parsed.slots)
                self._add_fresh(parsed.fresh, [ids[slot] for slot in parsed.fresh.slots])
                for row in parsed.rows:
                    self.reserved[row.line] = ids[row.slot]
                self.deferred += parsed.rows
                if len(self.deferred) >= DEFER_LIMIT:
                    self.flush_deferred()
            if self.on_progress:
                self.on_progress(parsed.consumed)
        return self.summary

    def flush_deferred(self) -> None:
        """Merge the held-back rows, in file order, the exact way (each email looked up). A row that
        repeats an email only ever merges into a contact of an earlier row, so holding it back changes
        nothing but the new contact's id when it turns out to be new after all."""
        rows, self.deferred = self.deferred, []
        size = self.opts.batch_size
        for start in range(0, len(rows), size):
            self._batch(rows[start:start + size])
        self.reserved.clear()  # the ids of rows that merged stay unused

    # -- parsing: inline, or in a forked process while this one writes ---------------------------
    def _record_batches(self) -> Iterator[list[tuple[int, list[str]]]]:
        return self.source.batches(self.opts.batch_size)

    def _parse_batch(self, batch: list[tuple[int, list[str]]]) -> _Parsed:
        """Parse and check a batch of records. In a fast import, rows that are certainly new contacts go
        straight into insert rows (`_parse` adds them to self.fresh); the others come back as _Row."""
        self._pending_rejects: list[tuple] = []
        self._blank_rows = self._slots = 0
        self.fresh = _Fresh() if self.seen is not None else None
        rows = [row for row in map(self._parse, batch) if row is not None]
        if self.fresh is not None:
            self.fresh.emails.sort()  # the unique (user_id, email) index's order: each of its pages visited once
        return _Parsed(len(batch) - self._blank_rows, self._slots, self.fresh, rows, self._pending_rejects,
                       self.source.bytes_read)

    def _skip_blank(self, cells: list[str]) -> bool:
        """A row of blank cells is no record at all (checked only for rows that fail otherwise)."""
        if is_blank(cells):
            self._blank_rows += 1
            return True
        return False

    def _parsed(self) -> Iterator[_Parsed]:
        total = self.source.total_bytes
        if (hasattr(os, "fork") and os.environ.get("OMNICRM_CSV_PARSE_PROCESS", "1") != "0"
                and (total is None or total >= PARSE_PROCESS_MIN_BYTES)):
            yield from self._parsed_in_process()
        else:
            for batch in self._record_batches():
                yield self._parse_batch(batch)

    def _parsed_in_process(self) -> Iterator[_Parsed]:
        """Reading, decoding, validating and phone parsing run in a forked child (the second core), which
        sends parsed batches through a pipe; this process only merges and writes."""
        child = _Forked(lambda: map(self._parse_batch, self._record_batches()), "reading the CSV", ahead=16)
        try:
            yield from child
        finally:
            child.stop()

    def _reject(self, line: int, cells: list[str], errors: list[tuple[str, str]]) -> None:
        self.summary.rejected += 1
        for column, reason in errors:
            error = RowError(line, column, reason)
            if len(self.summary.errors) < MAX_KEPT_ERRORS:
                self.summary.errors.append(error)
            if self.on_error:
                self.on_error(error)
        if self.on_reject:
            self.on_reject(cells, "; ".join(f"line {line}, column {c}: {r}" for c, r in errors))
        if self.on_plan:
            self.on_plan({"line": line, "action": "reject", "contact_id": None, "display_name": None,
                          "email": None, "detail": "; ".join(f"column {c}: {r}" for c, r in errors)})

    # -- one batch ------------------------------------------------------------------------------
    def _batch(self, rows: list[_Row]) -> None:
        owners = self._owners(rows)
        index = self._load_targets(set(owners.values()))
        touched: list[_Target] = []
        for row in rows:
            self._apply(row, owners, index, touched)
        self._write(touched)

    def _parse(self, record: tuple[int, list[str]]) -> _Row | None:
        line, cells = record
        ext = self.extractor
        if len(cells) != self.width:
            if self._skip_blank(cells):
                return None
            if len(cells) > self.width:
                self._pending_rejects.append((line, cells if self.keep_cells else [], [(
                    str(self.width + 1), f"unexpected extra field: the row has "
                                            f"{len(cells)} fields, the header {self.width}")]))
            else:
                self._pending_rejects.append((line, cells if self.keep_cells else [], [(
                    self.source.header[len(cells)] or str(len(cells) + 1),
                                            f"missing: the row has {len(cells)} fields, the header {self.width}")]))
            return None
        errors: list[tuple[str, str]] = []
        if "\x00" in "".join(cells):
            errors = [(self.source.header[i] or str(i + 1), "contains a NUL character")
                      for i, cell in enumerate(cells) if "\x00" in cell]
            self._pending_rejects.append((line, cells if self.keep_cells else [], errors))
            return None
        data = ext.extract(cells)
        if (data.notes and len(data.notes) > NOTE_MAX) or (data.display_name and len(data.display_name) > TEXT_MAX) \
                or (data.company and len(data.company) > TEXT_MAX) or (data.title and len(data.title) > TEXT_MAX):
            for attr, limit in (("display_name", TEXT_MAX), ("company", TEXT_MAX), ("title", TEXT_MAX),
                                ("notes", NOTE_MAX)):
                value = getattr(data, attr)
                if value is not None and len(value) > limit:
                    column = attr if attr in ext.first_column or attr != "display_name" else "first_name"
                    errors.append((ext.column_of(column), f"longer than {limit:,} characters"))
        emails: list[str] = []
        for value in data.emails:
            email = value.strip().lower()
            if not is_valid_email(email):
                shown = value if len(value) <= 80 else value[:77] + "..."
                errors.append((ext.column_of("email"), f"{shown!r} is not a valid email address"))
            elif email not in emails:
                emails.append(email)
        phones: list[tuple[str, str | None]] = []
        for raw in data.phones:
            if len(raw) > PHONE_MAX:
                errors.append((ext.column_of("phone"), f"a phone number is longer than {PHONE_MAX} characters"))
                continue
            e164 = phone_e164(raw, self.region)
            if not phones or not any((e164 and e == e164) or r == raw for r, e in phones):
                phones.append((raw, e164))
        tags: list[str] = []
        for value in data.tags:
            tag = normalise_tag(value)
            if len(tag) > TAG_MAX:
                errors.append((ext.column_of("tags"), f"a tag is longer than {TAG_MAX} characters"))
            elif tag and tag not in tags:
                tags.append(tag)
        created = updated = None
        if data.created_at:
            created = _timestamp(data.created_at)
            if created is None:
                errors.append((ext.column_of("created_at"), f"{data.created_at[:40]!r} is not an ISO 8601 timestamp"))
        if data.updated_at:
            updated = _timestamp(data.updated_at)
            if updated is None:
                errors.append((ext.column_of("updated_at"), f"{data.updated_at[:40]!r} is not an ISO 8601 timestamp"))
        if not data.display_name and not data.emails:
            if self._skip_blank(cells):
                return None
            column = ext.column_of("display_name") if "display_name" in ext.first_column else (
                ext.column_of("first_name") if "first_name" in ext.first_column else ext.column_of("email"))
            errors.append((column, "a contact needs a name or an email"))
        if errors:
            self._pending_rejects.append((line, cells if self.keep_cells else [], errors))
            return None
        name, company, title, notes = data.display_name, data.company, data.title, data.notes
        search = search_text(name, company, emails, phones)
        if self.fresh is not None and not self.seen.add(emails):  # certainly a new contact
            ts, now_ts = self.db.ts, self.now_ts
            created_ts = ts(created) if created else now_ts
            self.fresh.add(self._slots, name, company, title, notes, emails, phones, tags, created_ts,
                           ts(updated) if updated else created_ts, now_ts if notes else None, search)
            self._slots += 1
            return None
        self._slots += 1
        return _Row(line, cells if self.keep_cells else None, name, company, title, notes, emails, phones, tags,
                    created, updated, search, self._slots - 1)

    def _owners(self, rows: list[_Row]) -> dict[str, int]:
        """Existing contacts (this user's) owning any email of the batch."""
        emails = list({e for row in rows for e in row.emails})
        found = self.db.select_in("SELECT email, contact_id FROM contact_emails WHERE user_id = ? AND email IN_LIST",
                                  (self.user_id,), emails)
        return dict(found)

    def _load_targets(self, ids: set[int]) -> dict[str, _Target]:
        """Existing contacts that rows of this batch merge into, indexed by each of their emails."""
        if not ids:
            return {}
        db, uid, id_list = self.db, self.user_id, sorted(ids)
        targets: dict[int, _Target] = {}
        for cid, name, company, title, manual, created, updated, last in db.select_in(
                "SELECT id, display_name, company, title, manual_fields, created_at, updated_at, "
                "last_interaction_at FROM contacts WHERE +user_id = ? AND id IN_LIST", (uid,), id_list):
            targets[cid] = _Target(id=cid, new=False, name=name, company=company, title=title,
                                   manual=filter(None, (manual or "").split(",")), created_at=_aware(created),
                                   updated_at=_aware(updated), last_at=_aware(last))
        for cid, email, pos in db.select_in("SELECT contact_id, email, position FROM contact_emails "
                                            "WHERE +user_id = ? AND contact_id IN_LIST ORDER BY contact_id, position",
                                            (uid,), id_list):
            t = targets[cid]
            t.emails.append(email)
            t.next_email_pos = max(t.next_email_pos, pos + 1)
        for cid, raw, e164, pos in db.select_in("SELECT contact_id, raw, e164, position FROM contact_phones "
                                                "WHERE +user_id = ? AND contact_id IN_LIST ORDER BY contact_id, position",
                                                (uid,), id_list):
            t = targets[cid]
            t.phones.append((raw, e164))
            t.next_phone_pos = max(t.next_phone_pos, pos + 1)
        for cid, name in db.select_in("SELECT ct.contact_id, t.name FROM contact_tags ct JOIN tags t ON "
                                      "t.id = ct.tag_id WHERE +t.user_id = ? AND ct.contact_id IN_LIST", (uid,), id_list):
            targets[cid].tags.append(name)
        for cid, body in db.select_in("SELECT contact_id, body FROM notes WHERE +user_id = ? AND contact_id IN_LIST",
                                      (uid,), id_list):
            targets[cid].notes.append(body)
        index: dict[str, _Target] = {}
        for t in targets.values():
            t.n_emails, t.n_phones, t.n_tags, t.n_notes = len(t.emails), len(t.phones), len(t.tags), len(t.notes)
            for email in t.emails:
                index[email] = t
        return index

    def _apply(self, row: _Row, owners: dict[str, int], index: dict[str, _Target], touched: list[_Target]) -> None:
        target = next((index[e] for e in row.emails if e in index), None)
        if target is None:
            t = _Target(id=self.reserved.pop(row.line, None), name=row.name, company=row.company, title=row.title,
                        line=row.line,
                        created_at=row.created_at or self.now,
                        updated_at=row.updated_at or row.created_at or self.now,
                        manual=[f for f, v in (("display_name", row.name), ("company", row.company),
                                               ("title", row.title)) if v])
            t.emails = list(row.emails)
            for e in t.emails:
                index[e] = t
            t.phones = list(row.phones)
            t.tags = list(row.tags)
            t.notes = [row.notes] if row.notes else []
            t.search = row.search
            touched.append(t)
            self.summary.created += 1
            self._plan(row, "create", t)
            return
        mode = self.opts.on_duplicate
        if mode == "skip":
            self.summary.skipped += 1
            self._plan(row, "skip", target)
            return
        if mode == "error":
            where = (f"contact {target.id}" if target.id is not None else f"the row on line {target.line}")
            email = next(e for e in row.emails if e in index)
            self._reject(row.line, row.cells, [(self.extractor.column_of("email"),
                                                f"{email} already belongs to {where} (--on-duplicate error)")])
            return
        changed = False
        for attr, f in (("name", "display_name"), ("company", "company"), ("title", "title")):
            value = getattr(row, attr)
            if value and not getattr(target, attr):
                setattr(target, attr, value)
                target.manual.add(f)
                changed = True
        for email in row.emails:
            if email in index or email in owners:
                continue  # already this contact's, or another contact's (emails are unique per user)
            target.emails.append(email)
            index[email] = target
            changed = True
        for raw, e164 in row.phones:
            if not any((e164 and e == e164) or r == raw for r, e in target.phones):
                target.phones.append((raw, e164))
                changed = True
        for tag in row.tags:
            if tag not in target.tags:
                target.tags.append(tag)
                changed = True
        if row.notes and row.notes not in target.notes:
            target.notes.append(row.notes)
            changed = True
        if changed and not target.changed:
            target.changed = True
            target.search = None  # recomputed from the merged values
            if not target.new:
                touched.append(target)
        self.summary.merged += 1
        self._plan(row, "merge", target)

    def _plan(self, row: _Row, action: str, target: _Target) -> None:
        if self.on_plan:
            self.on_plan({"line": row.line, "action": action, "contact_id": None if target.new else target.id,
                          "display_name": row.name, "email": row.emails[0] if row.emails else None,
                          "detail": None if target.new else f"into {target.name or target.emails[0]}"})

    # -- writing --------------------------------------------------------------------------------
    def _write(self, touched: list[_Target]) -> None:
        db, uid = self.db, self.user_id
        now, now_ts_value = self.now, self.now_ts

        def ts(value: datetime):
            return now_ts_value if value is now else db.ts(value)
        new = [t for t in touched if t.new and t.id is None]  # (a held-back row has its id)
        for t, cid in zip(new, db.new_ids("contacts", len(new))):
            t.id = cid
        notes = [(t, body) for t in touched for body in t.notes[t.n_notes:]]
        now_ts = ts(self.now)
        for t, _ in notes:
            t.last_at = self.now if t.last_at is None or t.last_at < self.now else t.last_at
        contacts, updates, emails, phones, tag_rows = [], [], [], [], []
        tag_ids = self._tag_ids({tag for t in touched for tag in t.tags[t.n_tags:]})
        for t in touched:
            text = t.search if t.search is not None else search_text(t.name, t.company, t.emails, t.phones)
            manual = ",".join(f for f in _MANUAL_FIELDS if f in t.manual)
            last = ts(t.last_at) if t.last_at is not None else None
            if t.new:  # its notes' interactions counted at once (the relationship score's counter, score.py)
                contacts.append((t.id, uid, t.name, t.company, t.title, ts(t.created_at), ts(t.updated_at),
                                 last, text, manual, len(t.notes)))
            else:
                updates.append((t.name, t.company, t.title, text, manual, now_ts, last, t.id))
            cid = t.id
            pos = t.next_email_pos
            for email in t.emails[t.n_emails:]:
                emails.append((uid, cid, email, pos))
                pos += 1
            pos = t.next_phone_pos
            for raw, e164 in t.phones[t.n_phones:]:
                phones.append((uid, cid, raw, e164, pos))
                pos += 1
            for tag in t.tags[t.n_tags:]:
                tag_rows.append((cid, tag_ids[tag]))
        db.insert("contacts", _CONTACT_COLUMNS, contacts)
        db.executemany("UPDATE contacts SET display_name = ?, company = ?, title = ?, search_text = ?, "
                       "manual_fields = ?, updated_at = ?, last_interaction_at = ? WHERE id = ?", updates)
        emails.sort(key=_by_email)  # in the unique (user_id, email) index's order: each leaf page visited once
        db.insert("contact_emails", ("user_id", "contact_id", "email", "position"), emails)
        db.insert("contact_phones", ("user_id", "contact_id", "raw", "e164", "position"), phones)
        db.insert("contact_tags", ("contact_id", "tag_id"), tag_rows)
        self._insert_notes([(t.id, body) for t, body in notes])
        # The relationship score's counter (omnicrm/score.py) counts these note interactions too.
        added: dict[int, int] = {}
        for t, _ in notes:
            if not t.new:
                added[t.id] = added.get(t.id, 0) + 1
        db.executemany("UPDATE contacts SET interaction_count = interaction_count + ? WHERE id = ?",
                       [(n, cid) for cid, n in added.items()])

    def _add_fresh(self, fresh: _Fresh, ids: list[int]) -> None:
        db, uid = self.db, self.user_id
        db.insert("contacts", _CONTACT_COLUMNS, [(cid, uid, *row) for cid, row in zip(ids, fresh.contacts)])
        db.insert("contact_emails", ("user_id", "contact_id", "email", "position"),
                  [(uid, ids[k], email, pos) for email, k, pos in fresh.emails])
        db.insert("contact_phones", ("user_id", "contact_id", "raw", "e164", "position"),
                  [(uid, ids[k], raw, e164, pos) for k, raw, e164, pos in fresh.phones])
        tag_ids = self._tag_ids({tag for _, tag in fresh.tags})
        db.insert("contact_tags", ("contact_id", "tag_id"), [(ids[k], tag_ids[tag]) for k, tag in fresh.tags])
        self._insert_notes([(ids[k], body) for k, body in fresh.notes])
        self.summary.created += len(ids)

    def _insert_notes(self, notes: list[tuple[int, str]]) -> None:
        """Notes (contact id, body) and their timeline entries."""
        if not notes:
            return
        db, uid, now_ts = self.db, self.user_id, self.now_ts
        ids = db.new_ids("notes", len(notes))
        db.insert("notes", ("id", "user_id", "contact_id", "body", "created_at"),
                  [(nid, uid, cid, body, now_ts) for nid, (cid, body) in zip(ids, notes)])
        db.insert("interactions", ("user_id", "contact_id", "kind", "direction", "occurred_at", "subject",
                                   "source", "external_id"),
                  [(uid, cid, "note", None, now_ts, body.splitlines()[0][:200] if body else "", "note", str(nid))
                   for nid, (cid, body) in zip(ids, notes)])

    def _tag_ids(self, names: set[str]) -> dict[str, int]:
        missing = [n for n in names if n not in self.tag_ids]
        if missing:
            if len(self.tag_ids) > 100_000:
                self.tag_ids.clear()
            db = self.db
            found = dict(db.select_in("SELECT name, id FROM tags WHERE user_id = ? AND name IN_LIST",
                                      (self.user_id,), missing))
            absent = [n for n in missing if n not in found]
            if absent:
                ids = db.new_ids("tags", len(absent))
                db.insert("tags", ("id", "user_id", "name"), [(i, self.user_id, n) for i, n in zip(ids, absent)])
                found.update(zip(absent, ids))
            self.tag_ids.update(found)
        return {n: self.tag_ids[n] for n in names}


_by_email = itemgetter(2)


def _aware(value) -> datetime | None:
    """A timestamp read through the driver (SQLite text or a naive PostgreSQL datetime) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc)


def _timestamp(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


@contextmanager
def _fewer_gc_passes() -> Iterator[None]:
    """A big import allocates millions of short-lived lists and tuples and keeps few of them; Python's cycle
    collector would scan the long-lived heap over and over (a quarter of the parse time). Meanwhile it runs
    ~140x less often and skips the objects alive at the start (gc.freeze); both are restored afterwards.
    The forked reader process inherits the setting."""
    import gc

    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def import_contacts(session: Session, user_id: int, source: CsvInput, options: ImportOptions,
                    **callbacks) -> ImportSummary:
    """Import every record of `source` in the session's transaction; the caller commits or rolls back.

    The caller must not commit when `summary.failed` (atomic mode found bad rows) or for a dry run.
    """
    options.validate()
    importer = Importer(session, user_id, source, options, **callbacks)
    db, summary = importer.db, importer.summary
    if db.pg:
        # One import per user at a time: a second import of overlapping rows waits here, then sees the
        # first one's contacts (and merges into them) instead of failing on the unique email index.
        # SQLite gets the same from BEGIN IMMEDIATE.
        db.cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (IMPORT_LOCK_KEY, user_id))
    importer.seen = _seen_emails(importer)
    if db.pg:
        bulk = _PgBulkLoad.start(db, source, fast=importer.seen is not None)
        with _fewer_gc_passes():
            importer.run()
            if not summary.dry_run and not summary.failed:  # otherwise the caller rolls back (the drop too)
                if bulk:
                    bulk.restore()
                if summary.created + len(importer.deferred) >= ANALYZE_MIN_ROWS:
                    # Fresh statistics with the rows (ANALYZE in the transaction counts them): without them
                    # the planner takes the tables for near-empty until autovacuum gets round to them, and
                    # scans every contact (list, search, export; the lookups of the held-back rows below,
                    # which are counted in as they are mostly new contacts too). ~0.7 s for 1M rows.
                    db.cur.execute("ANALYZE contacts, contact_emails, contact_phones, contact_tags, tags, notes, "
                                   "interactions")
            importer.flush_deferred()
        return summary
    # A larger page cache for the bulk writes (index pages of 1M rows; 32 MB was as fast as 64 or 200 MB, 16 MB
    # spills more), and no memory map: mapped pages of a big database would count as resident memory. Both
    # back to what they were after.
    pragmas = _sqlite_pragmas(db.cur, cache_size=-32768, mmap_size=0)
    try:
        search_index = _FtsPause.start(db)
        with _fewer_gc_passes():
            importer.run()
            importer.flush_deferred()
        if search_index:
            search_index.restore()
    finally:
        _sqlite_pragmas(db.cur, **pragmas)
    return summary


def _seen_emails(importer: Importer) -> _SeenEmails | None:
    """The bitmap of a fast import, holding the user's emails; None (every row is looked up) for a user with
    many more emails than the file has rows, for --on-duplicate error (its message names the row a duplicate
    repeats) and for a dry run's plan (which names the contacts rows merge into)."""
    if importer.opts.on_duplicate == "error" or importer.on_plan:
        return None
    limit = max(FAST_MIN_EMAILS, (importer.source.total_bytes or 0) // BYTES_PER_ROW)
    emails = [email for (email,) in importer.db.query(
        "SELECT email FROM contact_emails WHERE user_id = ? LIMIT ?", (importer.user_id, limit + 1))]
    return _SeenEmails(importer.opts.seen_bits, emails) if len(emails) <= limit else None


def _sqlite_pragmas(cur, **values) -> dict:
    """Set connection pragmas; returns their previous values (to restore them)."""
    previous = {}
    for name, value in values.items():
        cur.execute(f"PRAGMA {name}")
        previous[name] = cur.fetchone()[0]
        cur.execute(f"PRAGMA {name} = {int(value)}")
    return previous


class _FtsPause:
    """SQLite: the search index's insert trigger costs ~0.2 ms a row. The import drops it inside its own
    transaction and indexes every contact it created with one INSERT … SELECT just before the commit
    (DDL is transactional in SQLite, and the import holds the write lock throughout, so the new contacts
    are exactly those with an id above the largest one at the start). Meanwhile the update trigger only
    runs for contacts that existed before the import (a merge into one of them); the import's own contacts
    are not in the index yet, and get their final text at the end.

    FTS5 also flushes its in-memory term buffer to a new segment every `hashsize` bytes (1 MB by
    default); one statement with a larger buffer writes few, large segments and merges far less (~40%
    less FTS time than a statement per batch). It is an FTS5 setting stored in the index, so it is put
    back before the commit too."""

    HASHSIZE = 64 * 1024 * 1024  # 1M contacts: ~1.5 s faster than 32 MB, for +40 MB resident while indexing
    DEFAULT_HASHSIZE = 1024 * 1024  # FTS5's own default

    def __init__(self, db: _Db, saved: list[str], first_id: int):
        from omnicrm.search_index import FTS_TABLE

        self.db, self.saved, self.first_id, self.table = db, saved, first_id, FTS_TABLE

    @classmethod
    def start(cls, db: _Db) -> "_FtsPause | None":
        from omnicrm.search_index import FTS_TABLE

        names = (f"{FTS_TABLE}_ai", f"{FTS_TABLE}_au")
        found = dict(db.query("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?)", names))
        if set(found) != set(names):
            return None
        first_id = (db.query("SELECT max(id) FROM contacts")[0][0] or 0) + 1
        for name in names:
            db.cur.execute(f"DROP TRIGGER {name}")
        db.cur.execute(re.sub(r"\bWHEN\b(.*?)\bBEGIN\b", lambda m: f"WHEN old.id < {int(first_id)} AND ({m[1]}) BEGIN",
                              found[names[1]], count=1, flags=re.S | re.I))
        return cls(db, [found[n] for n in names], first_id)

    def restore(self) -> None:
        db, table = self.db, self.table
        stored = db.query(f"SELECT v FROM {table}_config WHERE k = 'hashsize'")
        db.cur.execute(f"INSERT INTO {table}({table}, rank) VALUES ('hashsize', ?)", (self.HASHSIZE,))
        db.cur.execute(f"INSERT INTO {table}(rowid, search_text) SELECT id, search_text FROM contacts WHERE id >= ?",
                       (self.first_id,))
        db.cur.execute(f"INSERT INTO {table}({table}, rank) VALUES ('hashsize', ?)",
                       (int(stored[0][0]) if stored else self.DEFAULT_HASHSIZE,))
        db.cur.execute(f"DROP TRIGGER {table}_au")
        for sql in self.saved:
            db.cur.execute(sql)


class _PgBulkLoad:
    """PostgreSQL, a big file into a small database: maintaining the trigram index, the list indexes and
    the foreign keys row by row costs four times the inserts themselves (the GIN index alone half).
    For the import the contact tables' foreign keys and their indexes are dropped inside the import's
    transaction and created again before the commit (`restore`): one sort per index and one join per
    foreign key. Primary keys stay; so do the unique email index and the contact_id indexes, which the
    import reads, unless it is a fast import (which reads them only after `restore`). DDL is
    transactional, so a failed or rolled-back import gets everything back. The cost: until the import
    commits, other sessions that touch these tables wait for it (the drop takes an exclusive lock), so this
    only happens for a file expected to hold at least MIN_ROWS contacts and at least as many as the whole
    table has already."""

    TABLES = ("contacts", "contact_emails", "contact_phones", "contact_tags", "notes", "interactions")
    INDEXED = TABLES[:4]  # notes and interactions keep their indexes (few notes; many synced emails)
    MIN_ROWS = 50_000
    MAINTENANCE_MEMORY = "256MB"  # server memory for each index build (SET LOCAL: this transaction only)

    def __init__(self, db: _Db, indexes: list[str], constraints: list[tuple[str, str, str]]):
        self.db, self.indexes, self.constraints = db, indexes, constraints

    @classmethod
    def start(cls, db: _Db, source: CsvInput, fast: bool) -> "_PgBulkLoad | None":
        expected = (source.total_bytes or 0) // BYTES_PER_ROW
        if expected < cls.MIN_ROWS or expected < db.query("SELECT count(*) FROM contacts")[0][0]:
            return None
        tables = list(cls.TABLES)
        db.cur.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        # Foreign keys, and (fast) the unique email constraint: (table, name, definition).
        constraints = db.query("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                               "FROM pg_constraint WHERE conrelid = ANY(?::regclass[]) "
                               "AND (contype = 'f' OR (? AND contype = 'u' AND conrelid = 'contact_emails'::regclass)) "
                               "ORDER BY contype DESC, 1, 2", (tables, fast))
        # The contact tables' other indexes (those on contact_id only when fast).
        indexes = [(name, sql) for name, sql in db.query(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "WHERE i.indrelid = ANY(?::regclass[]) AND NOT i.indisprimary "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) ORDER BY 1",
            (list(cls.INDEXED),))
            if fast or not re.search(r"\(\s*contact_id\b", sql)]
        for table, name, _ in constraints:
            db.cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        for name, _ in indexes:
            db.cur.execute(f"DROP INDEX {name}")
        db.exclusive.update(tables)
        return cls(db, [sql for _, sql in indexes], constraints)

    def restore(self) -> None:
        cur = self.db.cur
        cur.execute(f"SET LOCAL maintenance_work_mem = '{self.MAINTENANCE_MEMORY}'")
        for sql in self.indexes:
            cur.execute(sql)
        for table, name, definition in self.constraints:  # the unique one first: foreign keys do not need it
            cur.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')


# --- forked reader processes (the import's parser, the SQLite export's readers) ----------------------

class _Forked:
    """A forked child process that sends what `produce()` yields through a pipe (pickled, then an empty
    message at the end); this process receives the items in order. A bare fork (multiprocessing.Process
    would close the inherited stdin in the child), and the child leaves with os._exit, running none of this
    process's cleanup."""

    def __init__(self, produce: Callable[[], Iterator], doing: str, ahead: int = 2):
        import multiprocessing

        self.doing, self.ahead = doing, ahead
        self.receiver, sender = multiprocessing.Pipe(duplex=False)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self.receiver.close()
                _send_all(sender, produce, doing)
            finally:
                os._exit(0)
        sender.close()

    def receive(self) -> Any:
        """The next item (None after the last one)."""
        data = self._next_message()
        return _unpickled(data) if data else None

    def __iter__(self) -> Iterator:
        """The items in order. A thread keeps reading the pipe (up to `ahead` items) while this one works,
        so the child never waits for a slow step here, and this one rarely waits for the child."""
        for data in _prefetched(iter(self._next_message, b""), depth=self.ahead):
            yield _unpickled(data)

    def _next_message(self) -> bytes:
        """The next pickled item as it arrives (empty: the end)."""
        try:
            return self.receiver.recv_bytes()
        except EOFError:
            raise OmniCrmError(f"the process {self.doing} ended unexpectedly") from None

    def stop(self) -> None:
        import signal

        self.receiver.close()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def _unpickled(data: bytes) -> Any:
    """An item sent by `_send_all`; an exception the child met is raised here."""
    item = pickle.loads(data)
    if isinstance(item, BaseException):
        raise item
    return item


def _dumps(item: Any) -> bytes:
    """Pickle without the memo (pickle's "fast" mode): what crosses the pipe is tuples of strings with no
    shared references worth keeping, and the memo costs three quarters of the time."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(item)
    return out.getvalue()


def _send_all(sender, produce: Callable[[], Iterator], doing: str) -> None:
    try:
        for item in produce():
            sender.send_bytes(_dumps(item))
        sender.send_bytes(b"")  # the end
    except BrokenPipeError:
        pass
    except BaseException as exc:  # noqa: BLE001 - re-raised by the parent
        try:
            sender.send_bytes(_dumps(exc if isinstance(exc, OmniCrmError) else OmniCrmError(f"{doing}: {exc}")))
        except Exception:  # noqa: BLE001
            pass
    finally:
        sender.close()


# --- background import (a job) ------------------------------------------------------------------------

def job_payload(path: str, *, options: ImportOptions, encoding: str | None, delimiter: str | None,
                rejects: str | None) -> dict:
    return {"path": str(Path(path).resolve()), "from": options.source_format, "map": options.mapping,
            "on_duplicate": options.on_duplicate, "skip_invalid": options.skip_invalid, "region": options.region,
            "encoding": encoding, "delimiter": delimiter,
            "rejects": str(Path(rejects).resolve()) if rejects else None}


def import_job(ctx) -> dict:
    """Job handler for kind "import": runs an import described by its payload (see job_payload)."""
    payload = ctx.payload
    options = ImportOptions(source_format=payload.get("from") or "auto", mapping=payload.get("map") or {},
                            on_duplicate=payload.get("on_duplicate") or "merge",
                            skip_invalid=bool(payload.get("skip_invalid")),
                            region=payload.get("region") or ctx.settings.region).validate()
    source = open_csv(payload["path"], encoding=payload.get("encoding"), delimiter=payload.get("delimiter"),
                      source_format=options.source_format, mapping=options.mapping)
    rejects = RejectsWriter(payload.get("rejects"), source.header) if payload.get("rejects") else None
    # SQLite: the import holds the database's write lock until it commits, so a lease renewal from this
    # thread would wait out the whole busy timeout on every batch. Nobody can reap the job meanwhile
    # (that is a write too); the worker's lease keeper renews it once the lock is free.
    sqlite = ctx.settings.is_sqlite
    try:
        with ctx.session() as session:
            summary = import_contacts(session, ctx.user_id, source, options,
                                      on_reject=rejects.write if rejects else None,
                                      on_progress=None if sqlite else lambda _n: ctx.heartbeat())
            if summary.failed:
                session.rollback()
                raise InvalidInput(f"{summary.rejected} invalid row(s), nothing imported; first: "
                                   + "; ".join(str(e) for e in summary.errors[:5]))
            session.commit()
    finally:
        source.close()
        if rejects:
            rejects.close()
    return summary.as_dict()


class RejectsWriter:
    """The rejected rows with their original columns plus `error`, as CSV."""

    def __init__(self, path: str | None, header: list[str], stream: IO[str] | None = None):
        self._file = open(path, "w", encoding="utf-8", newline="") if path else None  # noqa: SIM115
        self._writer = csv.writer(self._file or stream, lineterminator="\n")
        self._writer.writerow([*header, "error"])

    def write(self, cells: list[str], error: str) -> None:
        self._writer.writerow([*cells, error])

    def close(self) -> None:
        if self._file:
            self._file.close()


# --- export ---------------------------------------------------------------------------------------

def _sqlite_aggregates(joiner: str, guard: bool = False) -> list[str]:
    """SQLite: the emails, phones, tags and notes columns of contact `c`, each joined in its order (with
    `guard`, through the formula guard): a correlated subquery each, served by the (contact_id, position)
    indexes. The guard goes inside, where the aggregate it repeats is computed once."""
    sep = "char(31)" if joiner == _SEP else "';'"
    cell = _sqlite_guard if guard else str
    return [f"(SELECT {cell(f'group_concat(email, {sep})')} FROM (SELECT email FROM contact_emails "
            "WHERE contact_id = c.id ORDER BY position))",
            f"(SELECT {cell(f'group_concat(p, {sep})')} FROM (SELECT coalesce(e164, raw) AS p FROM contact_phones "
            "WHERE contact_id = c.id ORDER BY position))",
            f"(SELECT {cell(f'group_concat(name, {sep})')} FROM (SELECT t.name FROM contact_tags ct JOIN tags t "
            "ON t.id = ct.tag_id WHERE ct.contact_id = c.id ORDER BY t.name))",
            f"(SELECT {cell('group_concat(body, char(10))')} FROM (SELECT body FROM notes WHERE contact_id = c.id "
            "ORDER BY id))"]


def _sqlite_guard(cell: str) -> str:
    """SQLite: the formula guard on `cell` (an expression cheap to repeat). Only a cell starting with one of
    the characters to look at is handed to Python (omnicrm.output.neutralise, registered as
    omnicrm_neutralise), unless it is plainly phone numbers: ;-separated digits, each part maybe starting
    with a + followed by a digit (+14155550101;+442079460958), which is what most of them are."""
    from omnicrm.output import GUARDED_FIRST

    firsts = ", ".join(str(ord(ch)) for ch in GUARDED_FIRST)
    phones = (f"{cell} NOT GLOB '*[^0-9;+]*' AND {cell} NOT GLOB '*[0-9+]+*' AND {cell} NOT GLOB '*+' "
              f"AND {cell} NOT GLOB '*+;*'")
    return f"CASE WHEN unicode({cell}) IN ({firsts}) AND NOT ({phones}) THEN omnicrm_neutralise({cell}) ELSE {cell} END"


def _pg_aggregate_joins(c, user_id: int, joiner: str, filtered: bool, ranged: bool = False):
    """PostgreSQL: `c` joined to its emails, phones, tags and notes, each joined into one text `v`.

    A whole export aggregates each table for the user in one pass (GROUP BY, then merge joins), or for the
    contact ids between :range_lo and :range_hi (`ranged`); a filtered one looks up only the matching
    contacts' rows (LATERAL)."""
    from sqlalchemy import Integer, Text, text, true

    sep = "chr(31)" if joiner == _SEP else "';'"
    joined, values = c, []
    for name, (value, source, order, owner, user_col) in zip("eptn", _PG_CHILDREN):
        joiner_sql = "chr(10)" if name == "n" else sep
        if filtered:
            part = text(f"SELECT string_agg({value}, {joiner_sql} ORDER BY {order}) AS v FROM {source} "
                        f"WHERE {owner} = c.id").columns(v=Text).lateral(name)
            joined = joined.outerjoin(part, true())
        else:
            # One sort of the rows by contact and order, fed in that order to string_agg, which keeps it: an
            # ORDER BY inside the aggregate would sort every contact's few rows again (PostgreSQL < 16 does),
            # and cost a third of the export. (No parallel plan may shuffle them: _PG_EXPORT_SETTINGS.)
            within = f" AND {owner} BETWEEN :range_lo AND :range_hi" if ranged else ""
            part = text(f"SELECT contact_id, string_agg(v, {joiner_sql}) AS v FROM (SELECT {owner} AS contact_id, "
                        f"{value} AS v FROM {source} WHERE {user_col} = :agg_user{within} ORDER BY {owner}, {order}) "
                        "s GROUP BY contact_id").bindparams(agg_user=user_id).columns(
                contact_id=Integer, v=Text).subquery(name)
            joined = joined.outerjoin(part, part.c.contact_id == c.c.id)
        values.append(part.c.v)
    return joined, values


# PostgreSQL: each multi-value column as (value, FROM, order within a contact, contact column, user column)
_PG_CHILDREN = (
    ("email", "contact_emails", "position", "contact_id", "user_id"),
    ("coalesce(e164, raw)", "contact_phones", "position", "contact_id", "user_id"),
    ("t.name", "contact_tags ct JOIN tags t ON t.id = ct.tag_id", "t.name", "ct.contact_id", "t.user_id"),
    ("body", "notes", "id", "contact_id", "user_id"),
)


def _iso_sql(column: str, pg: bool) -> str:
    """ISO 8601 text of a stored (naive UTC) timestamp, as Python's isoformat() + '+00:00' writes it."""
    if pg:
        return (f"to_char({column}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE WHEN date_trunc('second', {column}) = "
                f"{column} THEN '' ELSE to_char({column}, '.US') END || '+00:00'")
    # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff'
    return f"replace(replace({column}, ' ', 'T'), '.000000', '') || '+00:00'"


def _export_select(user_id: int, flt: ContactFilter, now: datetime, pg: bool, joiner: str, columns: list[str],
                   guard: bool = False, ranged: bool = False):
    """One SELECT giving every matching contact in `columns` (native export columns), oldest id first;
    with `ranged`, those with ids between the parameters :range_lo and :range_hi.

    With `guard`, text cells a spreadsheet would run as a formula get their leading `'` in SQL: on
    PostgreSQL by the same two regular expressions as `omnicrm.output.neutralise`, with empty text as NULL
    (COPY would quote an empty string; the CSV writer writes both as an empty cell); on SQLite by
    neutralise itself, for the few cells that need a look (_sqlite_guard)."""
    from sqlalchemy import and_, case, func, literal, literal_column

    from omnicrm.output import FORMULA_START_PATTERN, GUARDED_FIRST, PLAIN_CELL_PATTERN

    c = Contact.__table__.alias("c")
    if pg:
        source, (emails, phones, tags, notes) = _pg_aggregate_joins(c, user_id, joiner, not flt.empty, ranged)
    else:
        source, (emails, phones, tags, notes) = c, map(literal_column, _sqlite_aggregates(joiner, guard))
    sql = {"id": c.c.id, "display_name": c.c.display_name, "email": emails, "phone": phones,
           "company": c.c.company, "title": c.c.title, "tags": tags, "notes": notes,
           "created_at": literal_column(_iso_sql("c.created_at", pg)),
           "updated_at": literal_column(_iso_sql("c.updated_at", pg))}
    selected = []
    for name in columns:
        expr = sql[name]
        if guard and not pg and name in ("display_name", "company", "title"):
            expr = literal_column(_sqlite_guard(f"c.{name}"))
        elif guard and pg and name not in formats.TIMESTAMP_COLUMNS:
            bare = func.ltrim(expr, "'")
            first = func.ascii(expr).in_([literal_column(str(ord(ch))) for ch in GUARDED_FIRST])  # cheap, first
            formula = and_(first, bare.op("~")(FORMULA_START_PATTERN), bare.op("!~")(PLAIN_CELL_PATTERN))
            expr = case((formula, literal("'").concat(expr)), else_=func.nullif(expr, ""))
        selected.append(expr.label(name))
    # `+c.user_id` (SQLite) keeps the scan on the primary key, in id order, instead of a (user_id, …) index.
    owner = text("c.user_id = :export_user" if pg else "+c.user_id = :export_user").bindparams(export_user=user_id)
    stmt = select(*selected).select_from(source).where(owner).order_by(c.c.id)
    if ranged:  # the range is given on each execution
        stmt = stmt.where(text("c.id BETWEEN :range_lo AND :range_hi"))
    if not flt.empty:
        stmt = stmt.where(c.c.id.in_(apply_filter(select(Contact.id), user_id, flt.validate(), now)))
    return stmt


def iter_export_batches(session: Session, user_id: int, flt: ContactFilter, *, now: datetime | None = None,
                        batch: int = EXPORT_BATCH, joiner: str = _SEP, columns: list[str] | None = None,
                        threaded: bool = True) -> Iterator[list]:
    """Every matching contact as a row of `columns` (default: all native columns), oldest id first, a
    batch at a time (constant memory). Emails, phones and tags come joined with `joiner`, notes with
    newlines, timestamps as ISO 8601 text. With `threaded` (PostgreSQL), a reader thread fetches the next
    batch while the caller writes this one."""
    now = now or clock_now()
    flt.validate()
    conn = session.connection(execution_options={"sqlite_read_only": True})
    pg = conn.dialect.name == "postgresql"
    stmt = _export_select(user_id, flt, now, pg, joiner, columns or EXPORT_COLUMNS)

    def batches() -> Iterator[list]:
        result = conn.execute(stmt, execution_options={"stream_results": True, "yield_per": batch})
        yield from result.partitions(batch)

    if pg:
        _serial_plan(conn)
        yield from (_prefetched(batches()) if threaded else batches())
        return
    # SQLite: read through the small page cache, not the memory map (mapped pages count as resident). No
    # reader thread: sqlite3 hands the GIL over for every row, which costs more than the overlap gains.
    cur = conn.connection.driver_connection.cursor()
    previous = _sqlite_pragmas(cur, mmap_size=0)
    try:
        yield from batches()
    finally:
        _sqlite_pragmas(cur, **previous)


_PG_EXPORT_SETTINGS = (
    # No parallel plan: each worker would aggregate every child table for the user again (three times the
    # work on two cores).
    "SET LOCAL max_parallel_workers_per_gather = 0",
    # The sorts by contact of a range's emails, phones and tags (a few MB) in memory, not in temporary files.
    "SET LOCAL work_mem = '64MB'",
)


def _serial_plan(conn) -> None:
    """PostgreSQL: the export query's settings (_PG_EXPORT_SETTINGS), for this transaction."""
    for setting in _PG_EXPORT_SETTINGS:
        conn.exec_driver_sql(setting)


def _prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced up to `depth` steps ahead by a reader thread."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            hand_over(exc)

    reader = threading.Thread(target=produce, name="prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = ahead.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


def _copy_csv(session: Session, user_id: int, flt: ContactFilter, now: datetime, columns: list[str],
              stream: IO[str]) -> int:
    """PostgreSQL: the server writes the CSV itself (`COPY (SELECT …) TO STDOUT`, formula guard in SQL)
    and this process only passes the text on, so the export runs at the server's speed on its own core."""
    conn = session.connection()
    _serial_plan(conn)
    if flt.empty:
        count = _pg_parallel_copy(session, user_id, now, columns, stream)
        if count is not None:
            return count
    compiled = _export_select(user_id, flt, now, True, ";", columns, guard=True).compile(
        dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    cur = conn.connection.driver_connection.cursor()
    stream.write(",".join(columns) + "\n")
    pending: list = []
    size = 0
    with cur.copy(f"COPY ({compiled}) TO STDOUT WITH (FORMAT csv)", compiled.params) as copy:
        for data in copy:
            pending.append(data)
            size += len(data)
            if size >= 1 << 16:
                _write_utf8(stream, b"".join(pending))
                pending, size = [], 0
    _write_utf8(stream, b"".join(pending))
    return cur.rowcount


def _pg_parallel_copy(session: Session, user_id: int, now: datetime, columns: list[str], stream: IO[str], *,
                      span: int = PG_EXPORT_RANGE) -> int | None:
    """PostgreSQL, a whole export of more than one range of `span` ids: EXPORT_PROCESSES more
    connections (server backends, one core each) COPY every other id range, all in the session's snapshot
    (pg_export_snapshot), and this process writes the ranges in order, a piece of at most 1 MB at a time.
    None when there is only one range."""
    from psycopg import sql

    conn = session.connection()
    cur = conn.connection.driver_connection.cursor()
    lo, hi = cur.execute("SELECT min(id), max(id) FROM contacts WHERE user_id = %s", (user_id,)).fetchone()
    if lo is None or hi - lo < span:
        return None
    starts = list(range(lo, hi + 1, span))
    snapshot = cur.execute("SELECT pg_export_snapshot()").fetchone()[0]
    compiled = _export_select(user_id, ContactFilter(), now, True, ";", columns, guard=True, ranged=True).compile(
        dialect=conn.dialect)
    statement = f"COPY ({compiled}) TO STDOUT WITH (FORMAT csv)"
    engine = session.get_bind()

    def ranges(mine: list[int]) -> Iterator[tuple[int, bytes, bool]]:
        raw = engine.raw_connection()
        try:
            driver = raw.driver_connection
            driver.rollback()
            worker = driver.cursor()
            worker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            worker.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            for setting in _PG_EXPORT_SETTINGS:
                worker.execute(setting)
            for start in mine:
                params = compiled.construct_params({"range_lo": start, "range_hi": start + span - 1})
                pending: list = []
                size = 0
                with worker.copy(statement, params) as copy:
                    for data in copy:  # one whole row per message: a joined piece decodes cleanly
                        pending.append(data)
                        size += len(data)
                        if size >= 1 << 20:
                            yield 0, b"".join(pending), False
                            pending, size = [], 0
                yield worker.rowcount, b"".join(pending), True  # the range's last piece, and its row count
        finally:
            raw.rollback()
            raw.close()

    readers = [_prefetched(ranges(starts[k::EXPORT_PROCESSES])) for k in range(EXPORT_PROCESSES)]
    try:
        stream.write(",".join(columns) + "\n")
        count = 0
        for i in range(len(starts)):
            last = False
            while not last:  # the pieces of range i, from the reader of every other range
                n, data, last = next(readers[i % EXPORT_PROCESSES])
                _write_utf8(stream, data)
                count += n
        return count
    finally:
        for reader in readers:
            reader.close()


def _write_utf8(stream: IO[str], data: bytes, piece: int = 1 << 16) -> None:
    """Write UTF-8 text `data` to `stream`: to its byte buffer when it has one and writes UTF-8 (after what
    was written to it as text), else decoded; at most a pipe's capacity at a time (a write much larger than
    that into a pipe whose reader has gone, `| head`, can end without an error, and the export would carry
    on for nothing)."""
    target = getattr(stream, "buffer", None)
    if target is None or codecs.lookup(getattr(stream, "encoding", None) or "ascii").name != "utf-8":
        stream.write(data.decode())
        return
    stream.flush()
    for start in range(0, len(data), piece):
        target.write(data[start:start + piece])


def _sqlite_parallel_csv(session: Session, user_id: int, now: datetime, columns: list[str], stream: IO[str], *,
                         span: int = EXPORT_BATCH) -> int | None:
    """SQLite, a whole export: EXPORT_PROCESSES forked readers each run the export query over every other
    range of `span` contact ids and format their ranges as CSV, which this process writes in order.
    (One process is bound by SQLite's per-row work and Python's, on one core.)

    The readers must see one and the same snapshot: this process holds the write lock (BEGIN IMMEDIATE,
    without waiting) until every reader has begun its read transaction, so nothing can commit in between.
    None (export in this process instead) when a writer holds the lock, for a file-less database, or
    without fork()."""
    import sqlite3
    from functools import partial

    path = session.get_bind().url.database
    if not path or path == ":memory:" or not hasattr(os, "fork"):
        return None
    guard = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        guard.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:  # a writer is at work: do not wait for it
        guard.close()
        return None
    readers: list[_Forked] = []
    try:
        lo, hi = guard.execute("SELECT min(id), max(id) FROM contacts WHERE user_id = ?", (user_id,)).fetchone()
        starts = list(range(lo, hi + 1, span)) if lo is not None else []
        compiled = _export_select(user_id, ContactFilter(), now, False, ";", columns, guard=True, ranged=True).compile(
            dialect=session.get_bind().dialect)
        sql, names = str(compiled), compiled.positiontup
        for k in range(min(EXPORT_PROCESSES, len(starts))):
            readers.append(_Forked(partial(_export_ranges, path, sql, names, user_id, starts[k::EXPORT_PROCESSES],
                                           span), "exporting"))
        for reader in readers:
            if reader.receive() != "ready":
                raise OmniCrmError("an export reader process did not start")
        guard.rollback()  # every reader has its snapshot: writers may go on
        stream.write(",".join(columns) + "\n")
        count = 0
        for i in range(len(starts)):
            n, data = readers[i % len(readers)].receive()
            _write_utf8(stream, data)
            count += n
        return count
    finally:
        guard.close()
        for reader in readers:
            reader.stop()


def _export_ranges(path: str, sql: str, names, user_id: int, starts: list[int], span: int) -> Iterator:
    """In an export reader process: "ready" once its read transaction has begun, then (count, UTF-8 CSV)
    for each of its id ranges (the query applies the formula guard: the rows are written as they come)."""
    import sqlite3

    from omnicrm.output import csv_text, neutralise

    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("omnicrm_neutralise", 1, neutralise, deterministic=True)
    conn.execute("PRAGMA mmap_size = 0")  # mapped pages would count as resident memory
    conn.execute("BEGIN")
    conn.execute("SELECT 1 FROM contacts LIMIT 1").fetchall()  # the read transaction (snapshot) starts here
    yield "ready"
    for start in starts:
        values = {"export_user": user_id, "range_lo": start, "range_hi": start + span - 1}
        rows = conn.execute(sql, [values[name] for name in names]).fetchall()
        yield len(rows), csv_text(rows).encode()


def export_contacts(session: Session, user_id: int, flt: ContactFilter, fmt: str, stream: IO[str], *,
                    portable: bool = False, now: datetime | None = None) -> int:
    """Write every matching contact to `stream` as csv (native columns), json or jsonl; returns the count.

    `portable` leaves out id, created_at and updated_at (for diffing two exports or moving contacts).
    """
    from omnicrm.output import write_records, write_rows

    if fmt not in ("csv", "json", "jsonl"):
        raise InvalidInput(f"--format: export writes csv, json or jsonl (got {fmt!r})")
    now = now or clock_now()
    flt.validate()
    columns = [c for c in EXPORT_COLUMNS if not (portable and c in formats.TIMESTAMP_COLUMNS)]
    if fmt == "csv":
        if session.get_bind().dialect.name == "postgresql":
            return _copy_csv(session, user_id, flt, now, columns, stream)
        if flt.empty:
            count = _sqlite_parallel_csv(session, user_id, now, columns, stream)
            if count is not None:
                return count
        return write_rows(columns, iter_export_batches(session, user_id, flt, now=now, joiner=";", columns=columns),
                          stream)
    multi = {"email", "phone", "tags"}

    def records() -> Iterator[dict]:
        for part in iter_export_batches(session, user_id, flt, now=now, columns=columns):
            for row in part:
                yield {name: (value.split(_SEP) if value else []) if name in multi else value
                       for name, value in zip(columns, row)}
    return write_records(records(), columns, fmt, stream)


__all__ = ["CsvInput", "ImportOptions", "ImportSummary", "RowError", "RejectsWriter", "export_contacts",
           "import_contacts", "import_job", "iter_export_batches", "job_payload", "open_csv", "phone_e164",
           "OmniCrmError"]
