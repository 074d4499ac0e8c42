"""The one writer for data on stdout: table, csv, json (one array) and jsonl, streamed."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from datetime import date, datetime
from typing import IO, Any, Iterable


def neutralise(value: str) -> str:
    """OWASP CSV injection guard: prefix `'` to a cell a spreadsheet would run as a formula.

    Valid phone numbers (+14155550101) and plain negative numbers are data, not formulas.
    """
    if not value or value[0] not in _GUARDED_FIRST or not _is_formula(value.lstrip("'")):
        return value
    return "'" + value  # a cell already starting with ' gets one more, so unneutralise is exact


def unneutralise(value: str) -> str:
    """Reverse `neutralise` on import."""
    if value.startswith("'") and _is_formula(value.lstrip("'")):
        return value[1:]
    return value


GUARDED_FIRST = sorted("=+-@\t\r'")  # the first characters worth a closer look
_GUARDED_FIRST = frozenset(GUARDED_FIRST)
# The rules as two regular expressions, shared with the PostgreSQL export (omnicrm/csvio/exporting.py),
# which applies them in SQL: a cell is a formula when it starts with one of = + - @ tab CR, unless every
# `;`-separated part of it is plain data: empty, not starting with one of those, a signed number or phone
# (+14155550101, +1 (415) 555-0101, -42), or an email address with a leading + or - (+news@example.com).
FORMULA_START_PATTERN = "^[=+@\t\r-]"
_PLAIN_PART = "(?:[^=+@\t\r;-][^;]*|[+-][0-9][0-9 ().-]*|[+-][A-Za-z0-9._%+-]*@[A-Za-z0-9.-]+)?"
PLAIN_CELL_PATTERN = f"^{_PLAIN_PART}(?:;{_PLAIN_PART})*$"
_FORMULA_START = re.compile(FORMULA_START_PATTERN)
_PLAIN_CELL = re.compile(PLAIN_CELL_PATTERN)


def _is_formula(value: str) -> bool:
    # fullmatch: Python's `$` also matches before a final newline, PostgreSQL's only at the very end
    return bool(_FORMULA_START.match(value)) and not _PLAIN_CELL.fullmatch(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(_cell(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(_scalar(value))


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return _scalar(value)


def write_records(records: Iterable[dict], fields: list[str], fmt: str, stream: IO[str] | None = None,
                  *, csv_safe: bool = True) -> int:
    """Write `records` (dicts) restricted to `fields` in `fmt`; returns how many were written."""
    writer = RecordWriter(fields, fmt, stream, csv_safe=csv_safe)
    for record in records:
        writer.write(record)
    return writer.close()


class RecordWriter:
    """write_records a record at a time, for records that come from callbacks (an import's plan). A table
    is written at `close` (its column widths need every row); the other formats as they come. Nothing is
    written before the first record or `close` (a command that fails before either prints no header)."""

    def __init__(self, fields: list[str], fmt: str, stream: IO[str] | None = None, *, csv_safe: bool = True):
        self.fields, self.fmt, self.out, self.csv_safe = fields, fmt, stream or sys.stdout, csv_safe
        self.count = 0
        self.rows: list[list[str]] = []  # a table's rows until close
        self.csv = csv.writer(self.out, lineterminator="\n") if fmt == "csv" else None
        self.started = False

    def _start(self) -> None:
        self.started = True
        if self.csv:
            self.csv.writerow(self.fields)
        elif self.fmt == "json":
            self.out.write("[")

    def write(self, record: dict) -> None:
        if not self.started:
            self._start()
        fields, fmt, out = self.fields, self.fmt, self.out
        if fmt == "csv":
            cells = [_cell(record.get(f)) for f in fields]
            if self.csv_safe:
                cells = [neutralise(c) for c in cells]
            if any("\r" in c and "\n" not in c for c in cells):
                out.write(_csv_line(cells))
            else:
                self.csv.writerow(cells)
        elif fmt == "jsonl":
            out.write(json.dumps({f: _json_value(record.get(f)) for f in fields}, ensure_ascii=False) + "\n")
        elif fmt == "json":
            out.write(",\n" if self.count else "\n")
            out.write(json.dumps({f: _json_value(record.get(f)) for f in fields}, ensure_ascii=False))
        else:
            self.rows.append([_table_cell(record.get(f)) for f in fields])
        self.count += 1

    def close(self) -> int:
        """Finish the output; returns how many records were written."""
        if not self.started:
            self._start()
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "]\n")
        elif self.fmt not in ("csv", "jsonl") and self.rows:
            from tabulate import tabulate

            self.out.write(tabulate(self.rows, headers=self.fields, tablefmt="simple", disable_numparse=True) + "\n")
            self.rows = []
        return self.count


def write_rows(header: list[str] | None, batches: Iterable[list[list]], stream: IO[str] | None = None) -> int:
    """CSV of pre-rendered rows (lists of str/int/None), a batch at a time, with the formula guard:
    the bulk export path. Returns the number of rows. No header line when `header` is None."""
    out = stream or sys.stdout
    writer = csv.writer(out, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    count = 0
    guarded = _GUARDED_FIRST
    for rows in batches:
        lone_cr = False
        for n, row in enumerate(rows):
            copied = False
            for i, cell in enumerate(row):
                if cell.__class__ is str and cell and (cell[0] in guarded or "\r" in cell):
                    safe = neutralise(cell)  # most often the same object (a phone number)
                    if safe is not cell:
                        if not copied:
                            rows[n] = row = list(row)
                            copied = True
                        row[i] = safe
                    lone_cr = lone_cr or ("\r" in cell and "\n" not in cell)
        if lone_cr:  # rare: written row by row, see _csv_line
            for row in rows:
                out.write(_csv_line(row))
        else:
            writer.writerows(rows)
        count += len(rows)
    return count


def csv_text(rows: list) -> str:
    """CSV lines of rows whose cells are final (the formula guard applied already), as write_rows writes them."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    text = out.getvalue()
    if "\r" in text:  # rare: a cell may hold a bare CR, which csv does not quote (see _csv_line)
        text = "".join(map(_csv_line, rows))
    return text


def _csv_line(row) -> str:
    """One CSV line as csv.writer writes it, except that a cell holding a carriage return without a line feed
    is quoted too (the csv module only quotes the line terminator's characters, and most readers end a row
    at a bare CR)."""
    cells = []
    for value in row:
        text = "" if value is None else str(value)
        if any(ch in text for ch in ',"\n\r'):
            text = '"' + text.replace('"', '""') + '"'
        cells.append(text)
    return ",".join(cells) + "\n"


def _table_cell(value: Any) -> str:
    text = _cell(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:59] + "…"


def write_object(record: dict, fmt: str, stream: IO[str] | None = None) -> None:
    """One record: JSON object for json/jsonl, key/value lines for table, a one-row CSV for csv."""
    out = stream or sys.stdout
    if fmt in ("json", "jsonl"):
        indent = 2 if fmt == "json" else None
        out.write(json.dumps(_json_value(record), ensure_ascii=False, indent=indent) + "\n")
    elif fmt == "csv":
        write_records([record], list(record), "csv", out)
    else:
        width = max((len(k) for k in record), default=0)
        for key, value in record.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                continue  # nested tables are printed by the caller
            out.write(f"{key.ljust(width)}  {_cell(value)}\n")
