"""Import of contacts from a CSV input: parse and check the rows (in a forked reader process for a big
input), tell new contacts from rows that may repeat an email (a bitmap of email hashes; those are looked
up, and merged, at the end), and write in bulk in the caller's transaction."""

from __future__ import annotations

import csv
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, NamedTuple

from sqlalchemy.orm import Session

from omnicrm.config import now as clock_now
from omnicrm import csvformats as formats
from omnicrm.csvio.bulk import BulkDb, PgBulkLoad, SqliteBulkLoad, sqlite_pragmas
from omnicrm.csvio.forked import Forked
from omnicrm.csvio.reading import BYTES_PER_ROW, CsvInput, is_blank, open_csv
from omnicrm.errors import InvalidInput
from omnicrm.filters import normalise_tag
from omnicrm.normalize import is_valid_email, normalise_phone, search_text, to_e164

IMPORT_BATCH = 5000
DEFER_LIMIT = 20_000  # rows that may merge, held back by a fast import until this many (or the end)
FAST_MIN_EMAILS = 50_000  # a user with at most this many emails (or as many as the file) gets a fast import
PARSE_PROCESS_MIN_BYTES = 4 * 1024 * 1024  # smaller inputs are parsed inline (a fork costs ~10 ms)
TEXT_MAX = 10_000
NOTE_MAX = 100_000
PHONE_MAX = 100
TAG_MAX = 200
MAX_KEPT_ERRORS = 100
ANALYZE_MIN_ROWS = 10_000  # PostgreSQL: an import creating this many contacts refreshes the statistics
IMPORT_LOCK_KEY = 72651002  # pg_advisory_xact_lock(key, user_id): imports of one user run one at a time
ON_DUPLICATE = ("merge", "skip", "error")


# --- phones: the CPU hot spot of a big import ------------------------------------------------------

_NANP_REGIONS = ("US", "CA")


def phone_e164(raw: str, region: str) -> str | None:
    """`normalize.to_e164` with shortcuts for North American and international numbers (same answers,
    ~50x faster).

    ASCII digits with ` ().-` separators take a shortcut when they are +1 and 10 digits (the plus first),
    or (in a NANP region) a 10-digit number or 1 + 10 digits whose area code starts with 2-9, or a 7-digit
    local number starting with 2-9 (no E.164 form without its area code: None), or another number with
    the plus first that _international can answer (most are); libphonenumber answers every other shape
    (tests compare both on many generated numbers, of every country calling code).
    """
    if raw.isascii():
        number = raw.encode("ascii").translate(None, b" ().-").decode("ascii")
        if number.isdigit():
            if region in _NANP_REGIONS:
                size = len(number)
                if size == 10 and number[0] in "23456789":
                    return "+1" + number
                if size == 7 and number[0] in "23456789":
                    return None
                if size == 11 and number[0] == "1" and number[1] in "23456789":
                    return "+" + number
        elif raw[0] == "+" and number[1:].isdigit():
            if len(number) == 12 and number[1] == "1" and number[2] in "23456789":
                return number  # +1 and 10 digits: the commonest shape, answered 4x faster than below
            e164 = _international(number)
            if e164 is not _ASK_LIBPHONENUMBER:
                return e164
    return to_e164(raw, region)


_ASK_LIBPHONENUMBER = object()


def _international(number: str) -> str | None | object:
    """E.164 form (or None) of `number`, a + and digits, where libphonenumber's answer is plain: its
    country calling code (the first 1-3 digits that are one) is followed by a national number that
    starts with no 0 and no national prefix, so that the E.164 form is `number` itself exactly when the
    national number has one of the country's possible lengths. _ASK_LIBPHONENUMBER otherwise."""
    if 5 <= len(number) <= 20 and number[1] != "0":
        for size in (1, 2, 3):
            country = _country(int(number[1:1 + size]))
            if country:
                national = number[1 + size:]
                starts_with_prefix, lengths = country
                if national[0] != "0" and not (starts_with_prefix and starts_with_prefix(national)):
                    return number if len(national) in lengths else None
                break
    return _ASK_LIBPHONENUMBER


@lru_cache(maxsize=None)
def _country(code: int) -> tuple[Callable | None, frozenset[int]] | None:
    """For a country calling code, what libphonenumber's parse and possible-number check read of its main
    region's metadata: the national prefix pattern (matched at the start) and the possible lengths of a
    national number (never one of those only possible locally). None for a code that is none."""
    import phonenumbers
    from phonenumbers import PhoneMetadata

    if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        return None
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(
        code, phonenumbers.region_code_for_country_code(code))
    prefix, general = metadata.national_prefix_for_parsing, metadata.general_desc
    return re.compile(prefix).match if prefix else None, frozenset(general.possible_length)


# --- options, rows and results ----------------------------------------------------------------------

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
    defer_limit: int = DEFER_LIMIT

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
    ignored: list[str] = field(default_factory=list)  # columns of a native or mapped file that nothing reads

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
        """The summary for --format json; a failed atomic import created, merged and skipped nothing."""
        failed = self.failed
        return {"format": self.format, "rows": self.rows, "created": 0 if failed else self.created,
                "merged": 0 if failed else self.merged, "skipped": 0 if failed else self.skipped,
                "rejected": self.rejected, "dry_run": self.dry_run,
                "written": not self.dry_run and not failed, "ignored_columns": self.ignored,
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
    notes: tuple[str, ...]
    emails: list[str]
    phones: list[tuple[str, str | None]]
    tags: list[str]
    created_at: datetime | None
    updated_at: datetime | None
    search: str  # the search text if the row becomes a new contact (computed by the reader)
    slot: int  # the row's place among the batch's valid rows (a fast import reserves a contact id for each)
    ref: int | None  # the row's `id`, when it has created_at too: it may be that existing contact (our export)


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


class _KnownIds:
    """The ids of the user's contacts as a bitmap, for a fast import of a file with an `id` column: a row whose
    id is one of them may be that contact (our own export read back), and takes the exact path."""

    def __init__(self, ids: Iterable[int]):
        self.bits = bits = bytearray()
        for cid in ids:
            if cid >> 3 >= len(bits):
                bits.extend(bytes((cid >> 3) + 1 - len(bits)))
            bits[cid >> 3] |= 1 << (cid & 7)

    def __contains__(self, cid: int | None) -> bool:
        return cid is not None and (cid >> 3) < len(self.bits) and bool(self.bits[cid >> 3] & (1 << (cid & 7)))


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
        self.contacts.append((name, company, title, created, updated, last, search, manual, len(notes)))
        for position, email in enumerate(emails):
            self.emails.append((email, k, position))
        for position, (raw, e164) in enumerate(phones):
            self.phones.append((k, raw, e164, position))
        for tag in tags:
            self.tags.append((k, tag))
        for body in notes:
            self.notes.append((k, body))

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
_EMAIL_COLUMNS = ("user_id", "contact_id", "email", "position")
_PHONE_COLUMNS = ("user_id", "contact_id", "raw", "e164", "position")
_TAG_COLUMNS = ("contact_id", "tag_id")
_MANUAL_FIELDS = ("display_name", "company", "title")
# manual_fields for each combination of name, company and title being set (bit 2, 1, 0 of the index)
_MANUAL_BY_MASK = tuple(",".join(f for bit, f in zip((4, 2, 1), _MANUAL_FIELDS) if mask & bit) for mask in range(8))


def check_columns(source: CsvInput, options: ImportOptions, unneutralise=None) -> formats.Extractor:
    """The extractor for this file's header; InvalidInput when its columns map to nothing useful."""
    known = ", ".join(f for f in formats.KNOWN_FIELDS if f != "ignore")
    seen = ", ".join(repr(h) for h in source.header if h) or "(none)"
    missing = set(options.mapping) - {formats.key(h) for h in source.header}
    if missing:
        raise InvalidInput(f"--map: the file has no column {sorted(missing)[0]!r}. Columns seen: {seen}")
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
                                     atomic=not options.skip_invalid,
                                     ignored=self.extractor.unread if fmt in (None, "native") else [])
        self.on_error, self.on_reject, self.on_progress, self.on_plan = on_error, on_reject, on_progress, on_plan
        self.now = clock_now()
        self.db = BulkDb(session)
        self.tag_ids: dict[str, int] = {}
        self.width = len(source.header)
        self.region = options.region
        self.now_ts = self.db.ts(self.now)
        self.keep_cells = on_reject is not None  # original cells are only needed for the rejects file
        self._pending_rejects: list[tuple] = []
        self._blank_rows = 0
        self.seen: _SeenEmails | None = None  # set for a fast import (see _fast_path)
        self.known_ids = _KnownIds(())  # the user's contact ids, for a fast import of a file with ids
        self.fresh: _Fresh | None = None  # the batch's new contacts, while a fast import parses it
        self.deferred: list[_Row] = []
        self.reserved: dict[int, int] = {}  # line of a held-back row -> the contact id it gets if it is new
        self.before_early_merge: Callable[[], None] = lambda: None  # (PgBulkLoad.restore_lookups)

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
                if len(self.deferred) >= self.opts.defer_limit:
                    self.before_early_merge()
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
        child = Forked(lambda: map(self._parse_batch, self._record_batches()), "reading the CSV", ahead=16)
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
        same = self._same_contacts(rows)
        index = self._load_targets(set(owners.values()) | set(same.values()))
        touched: list[_Target] = []
        for row in rows:
            self._apply(row, owners, same, index, touched)
        self._write(touched)

    def _parse(self, record: tuple[int, list[str]]) -> _Row | None:
        line, cells = record
        ext = self.extractor
        if len(cells) > self.width and is_blank(cells[self.width:]):
            cells = cells[:self.width]  # a spreadsheet's empty cells past the header's columns: no data
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
                                            f"missing: the row has {len(cells)} field{'s' * (len(cells) != 1)}, "
                                            f"the header {self.width}")]))
            return None
        errors: list[tuple[str, str]] = []
        if "\x00" in "".join(cells):
            errors = [(self.source.header[i] or str(i + 1), "contains a NUL character")
                      for i, cell in enumerate(cells) if "\x00" in cell]
            self._pending_rejects.append((line, cells if self.keep_cells else [], errors))
            return None
        data = ext.extract(cells)
        notes = (data.notes,) if data.notes else ()
        if (data.notes and len(data.notes) > NOTE_MAX) or (data.display_name and len(data.display_name) > TEXT_MAX) \
                or (data.company and len(data.company) > TEXT_MAX) or (data.title and len(data.title) > TEXT_MAX):
            for attr in ("display_name", "company", "title"):
                value = getattr(data, attr)
                if value is not None and len(value) > TEXT_MAX:
                    column = attr if attr in ext.first_column or attr != "display_name" else "first_name"
                    errors.append((ext.column_of(column), f"longer than {TEXT_MAX:,} characters"))
            if data.notes and len(data.notes) > NOTE_MAX:
                notes = _note_bodies(data.notes)
                if not notes:
                    errors.append((ext.column_of("notes"), f"a line longer than {NOTE_MAX:,} characters"))
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
            if ";" in raw:  # (Google's ` ::: ` cells; a native cell's `;` has split it already)
                raw = normalise_phone(raw)
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
        ref = None
        if data.ref and created is not None and data.ref.isascii() and data.ref.isdigit():
            ref = int(data.ref)
        if not data.display_name and not data.emails:
            if self._skip_blank(cells):
                return None
            column = ext.column_of("display_name") if "display_name" in ext.first_column else (
                ext.column_of("first_name") if "first_name" in ext.first_column else ext.column_of("email"))
            errors.append((column, "a contact needs a name or an email"))
        if errors:
            self._pending_rejects.append((line, cells if self.keep_cells else [], errors))
            return None
        name, company, title = data.display_name, data.company, data.title
        search = search_text(name, company, emails, phones)
        slot, self._slots = self._slots, self._slots + 1
        if self.fresh is not None and not self.seen.add(emails) and ref not in self.known_ids:  # certainly new
            ts, now_ts = self.db.ts, self.now_ts
            created_ts = ts(created) if created else now_ts
            self.fresh.add(slot, name, company, title, notes, emails, phones, tags, created_ts,
                           ts(updated) if updated else created_ts, now_ts if notes else None, search)
            return None
        return _Row(line, cells if self.keep_cells else None, name, company, title, notes, emails, phones, tags,
                    created, updated, search, slot, ref)

    def _owners(self, rows: list[_Row]) -> dict[str, int]:
        """Existing contacts (this user's) owning any email of the batch."""
        emails = list({e for row in rows for e in row.emails})
        found = self.db.select_in("SELECT email, contact_id FROM contact_emails WHERE user_id = ? AND email IN_LIST",
                                  (self.user_id,), emails)
        return dict(found)

    def _same_contacts(self, rows: list[_Row]) -> dict[int, int]:
        """Rows that are an existing contact of this user, read back from our export (the row's id and
        created_at are the contact's), as {line: contact id}."""
        refs = sorted({row.ref for row in rows if row.ref is not None})
        if not refs:
            return {}
        created = {cid: _aware(at) for cid, at in self.db.select_in(
            "SELECT id, created_at FROM contacts WHERE +user_id = ? AND id IN_LIST", (self.user_id,), refs)}
        return {row.line: row.ref for row in rows if row.ref is not None and created.get(row.ref) == row.created_at}

    def _load_targets(self, ids: set[int]) -> dict[str | int, _Target]:
        """Existing contacts that rows of this batch merge into, indexed by each of their emails and their id."""
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
        index: dict[str | int, _Target] = dict(targets)
        for t in targets.values():
            t.n_emails, t.n_phones, t.n_tags, t.n_notes = len(t.emails), len(t.phones), len(t.tags), len(t.notes)
            for email in t.emails:
                index[email] = t
        return index

    def _apply(self, row: _Row, owners: dict[str, int], same: dict[int, int], index: dict[str | int, _Target],
               touched: list[_Target]) -> None:
        ref = same.get(row.line)
        target = index[ref] if ref is not None else next((index[e] for e in row.emails if e in index), None)
        if target is None:
            t = _Target(id=self.reserved.pop(row.line, None), name=row.name, company=row.company, title=row.title,
                        line=row.line,
                        created_at=row.created_at or self.now,
                        updated_at=row.updated_at or row.created_at or self.now,
                        manual=[f for f, v in zip(_MANUAL_FIELDS, (row.name, row.company, row.title)) if v])
            t.emails = list(row.emails)
            for e in t.emails:
                index[e] = t
            t.phones = list(row.phones)
            t.tags = list(row.tags)
            t.notes = list(row.notes)
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
            if ref is not None:
                self._reject(row.line, row.cells, [(self.extractor.column_of("id"), f"contact {ref} already "
                                                    "exists (same id and created_at; --on-duplicate error)")])
                return
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
        for body in row.notes:
            if body not in target.notes:
                target.notes.append(body)
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
            into = target.name or (target.emails[0] if target.emails else f"contact {target.id}")
            self.on_plan({"line": row.line, "action": action, "contact_id": None if target.new else target.id,
                          "display_name": row.name, "email": row.emails[0] if row.emails else None,
                          "detail": None if target.new else f"into {into}"})

    # -- writing --------------------------------------------------------------------------------
    def _write(self, touched: list[_Target]) -> None:
        db, uid = self.db, self.user_id
        now, now_ts = self.now, self.now_ts

        def ts(value: datetime):
            return now_ts if value is now else db.ts(value)
        new = [t for t in touched if t.new and t.id is None]  # (a held-back row has its id)
        for t, cid in zip(new, db.new_ids("contacts", len(new))):
            t.id = cid
        notes = [(t, body) for t in touched for body in t.notes[t.n_notes:]]
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
        db.insert("contact_emails", _EMAIL_COLUMNS, emails)
        db.insert("contact_phones", _PHONE_COLUMNS, phones)
        db.insert("contact_tags", _TAG_COLUMNS, tag_rows)
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
        db.insert("contact_emails", _EMAIL_COLUMNS, [(uid, ids[k], email, pos) for email, k, pos in fresh.emails])
        db.insert("contact_phones", _PHONE_COLUMNS,
                  [(uid, ids[k], raw, e164, pos) for k, raw, e164, pos in fresh.phones])
        tag_ids = self._tag_ids({tag for _, tag in fresh.tags})
        db.insert("contact_tags", _TAG_COLUMNS, [(ids[k], tag_ids[tag]) for k, tag in fresh.tags])
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


def _note_bodies(text: str) -> tuple[str, ...]:
    """A notes cell longer than a note may be (NOTE_MAX; an export joins all of a contact's notes with
    newlines) as several notes, cut at line ends; () when a line alone is longer than that."""
    bodies = []
    while len(text) > NOTE_MAX:
        cut = text.rfind("\n", 0, NOTE_MAX + 1)
        if cut <= 0:
            return ()
        bodies.append(text[:cut])
        text = text[cut + 1:]
    return (*bodies, text)


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
        _fast_path(importer)
        bulk = PgBulkLoad.start(db, source, fast=importer.seen is not None)
        if bulk:
            importer.before_early_merge = bulk.restore_lookups
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
    pragmas = sqlite_pragmas(db.cur, cache_size=-32768, mmap_size=0)
    try:
        _fast_path(importer)
        bulk = SqliteBulkLoad.start(db, source)
        with _fewer_gc_passes():
            importer.run()
            importer.flush_deferred()
        if not summary.dry_run and not summary.failed:  # otherwise the caller rolls back (the drops too)
            bulk.restore()
    finally:
        sqlite_pragmas(db.cur, **pragmas)
    return summary


def _fast_path(importer: Importer) -> None:
    """Sets up a fast import: the bitmap of the user's emails (importer.seen) and, for a file with an `id`
    column, of their contact ids. No fast import (every row is looked up) for a user with many more emails or
    contacts than the file has rows, for --on-duplicate error (its message names the row a duplicate
    repeats) and for a dry run's plan (which names the contacts rows merge into)."""
    if importer.opts.on_duplicate == "error" or importer.on_plan:
        return
    db, uid = importer.db, importer.user_id
    limit = max(FAST_MIN_EMAILS, (importer.source.total_bytes or 0) // BYTES_PER_ROW)
    with_ids = "id" in importer.extractor.first_column
    if db.count_upto("contact_emails", uid, limit + 1) > limit or (
            with_ids and db.count_upto("contacts", uid, limit + 1) > limit):
        return
    if with_ids:
        ids = db.stream("SELECT id FROM contacts WHERE user_id = ?", (uid,))
        importer.known_ids = _KnownIds(cid for (cid,) in ids)
    emails = db.stream("SELECT email FROM contact_emails WHERE user_id = ?", (uid,))
    importer.seen = _SeenEmails(importer.opts.seen_bits, (email for (email,) in emails))


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
        self._width = len(header)

    def write(self, cells: list[str], error: str) -> None:
        """A short row is padded to the header, so that the error stays in the `error` column; a long row's
        extra cells follow it."""
        width = self._width
        cells = cells + [""] * (width - len(cells))
        self._writer.writerow([*cells[:width], error, *cells[width:]])

    def close(self) -> None:
        if self._file:
            self._file.close()
