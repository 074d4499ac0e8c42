"""Reading a CSV input: a file or stdin, its encoding (BOM, UTF-16, `--encoding`), its delimiter (sniffed
or given), a preamble before the header (LinkedIn), and its records in batches."""

from __future__ import annotations

import codecs
import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from omnicrm import csvformats as formats
from omnicrm.errors import InvalidInput

SAMPLE_BYTES = 64 * 1024
FIELD_LIMIT = 16 * 1024 * 1024  # a larger field is a broken file, not a contact
BYTES_PER_ROW = 100  # a rough guess of a file's rows from its size; real exports run 60-150 bytes a contact
DELIMITERS = {",": ",", ";": ";", "tab": "\t", "\\t": "\t", "\t": "\t", "|": "|"}


class _Chain(io.RawIOBase):
    """The bytes already read for sniffing, then the rest of the stream; counts what was consumed, and the
    lines before the latest chunk read (the text decoder reads chunk by chunk, so that a decoding error can
    name its line: line_of)."""

    def __init__(self, prefix: bytes, rest: IO[bytes] | None):
        self._prefix = memoryview(prefix)
        self._rest = rest
        self.consumed = 0
        self._lines = 0  # newlines before the latest chunk
        self._latest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if len(self._prefix):
            n = min(len(buffer), len(self._prefix))
            data = self._prefix[:n].tobytes()
            self._prefix = self._prefix[n:]
        elif self._rest is not None:
            data = self._rest.read(len(buffer))
            n = len(data)
        else:
            data, n = b"", 0
        buffer[:n] = data
        self.consumed += n
        self._lines += self._latest.count(b"\n")
        self._latest = data
        return n

    def line_of(self, exc: UnicodeDecodeError) -> int:
        """The line of the byte a decoding error points at: in the latest chunk, which the decoder saw
        after the few bytes of a character cut by the chunk before (those hold no newline)."""
        start = exc.start - (len(exc.object) - len(self._latest))
        return self._lines + self._latest[:max(start, 0)].count(b"\n") + 1


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
            raise _encoding_hint(exc, f"line {self._chain.line_of(exc)}") from None

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
        if prefix.startswith(codecs.BOM_UTF8):
            if codecs.lookup(encoding).name not in ("utf-8", "utf-8-sig"):
                raise InvalidInput(f"--encoding: the file starts with UTF-8's byte order mark, so it is UTF-8, not "
                                   f"{encoding}; leave --encoding out")
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
    text = io.TextIOWrapper(chain, encoding=encoding, errors="strict", newline="")  # type: ignore[arg-type]
    text._CHUNK_SIZE = 1 << 16  # type: ignore[attr-defined]  # bytes per read and decode (8 KB by default)
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
