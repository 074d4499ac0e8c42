"""Header sets of the CSV formats `contacts import` reads, and how a row becomes contact fields.

Each format maps a header name to a target field and says how several values share one cell
(`;` in our native files, ` ::: ` in Google's). `Extractor` is compiled once per file from the
header and then turns each row (a list of cells) into a `RowData` or a list of (column, reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

# Target fields a column can map to (`--map COL=FIELD`).
TEXT_FIELDS = ("display_name", "first_name", "middle_name", "last_name", "company", "title", "notes")
MULTI_FIELDS = ("email", "phone", "tags")
KNOWN_FIELDS = ("display_name", "first_name", "middle_name", "last_name", "email", "phone", "company", "title",
                "tags", "notes", "created_at", "updated_at", "id", "ignore")
FIELD_ALIASES = {"name": "display_name", "emails": "email", "phones": "phone", "tag": "tags", "note": "notes"}
FORMATS = ("native", "google", "outlook", "linkedin")

NATIVE_COLUMNS = ["id", "display_name", "email", "phone", "company", "title", "tags", "notes",
                  "created_at", "updated_at"]
TIMESTAMP_COLUMNS = ("id", "created_at", "updated_at")

# Native columns plus the usual names other tools give the same fields (compared case-insensitively).
_NATIVE = {c: c for c in NATIVE_COLUMNS} | {
    "name": "display_name", "full name": "display_name", "display name": "display_name",
    "e-mail": "email", "email address": "email", "e-mail address": "email", "emails": "email", "mail": "email",
    "phone number": "phone", "phones": "phone", "mobile": "phone", "telephone": "phone", "tel": "phone",
    "organization": "company", "organisation": "company", "job title": "title", "position": "title",
    "tag": "tags", "labels": "tags", "categories": "tags", "note": "notes",
    "first name": "first_name", "given name": "first_name", "last name": "last_name",
    "family name": "last_name", "surname": "last_name",
}

_GOOGLE = {
    "name": "display_name", "first name": "first_name", "given name": "first_name",
    "middle name": "middle_name", "additional name": "middle_name",
    "last name": "last_name", "family name": "last_name",
    "organization name": "company", "organization 1 - name": "company",
    "organization title": "title", "organization 1 - title": "title",
    "notes": "notes", "labels": "tags", "group membership": "tags",
}
_GOOGLE_MULTI = re.compile(r"^(e-mail|phone) \d+ - value$")

_OUTLOOK = {
    "first name": "first_name", "middle name": "middle_name", "last name": "last_name",
    "company": "company", "job title": "title", "categories": "tags", "notes": "notes",
    "e-mail address": "email", "e-mail 2 address": "email", "e-mail 3 address": "email",
    "mobile phone": "phone", "business phone": "phone", "business phone 2": "phone", "home phone": "phone",
    "home phone 2": "phone", "other phone": "phone", "primary phone": "phone", "company main phone": "phone",
    "car phone": "phone", "assistant's phone": "phone",
}

_LINKEDIN = {
    "first name": "first_name", "last name": "last_name", "email address": "email", "company": "company",
    "position": "title", "url": "linkedin_url", "connected on": "connected_on",
}

GOOGLE_SEP = " ::: "
# Google's own groups, not the user's labels: current exports write `* myContacts`, legacy ones `* My Contacts`
# (compared lower-cased, without spaces).
GOOGLE_SYSTEM_LABELS = {"*mycontacts", "mycontacts", "*othercontacts"}


def _key(header: str) -> str:
    return " ".join(header.strip().lstrip("\ufeff").split()).lower()


def detect_format(header: list[str]) -> str | None:
    """The format a header row belongs to, or None when it maps to nothing we know."""
    keys = {_key(h) for h in header if h.strip()}
    if not keys:
        return None
    if any(_GOOGLE_MULTI.match(k) for k in keys) or "group membership" in keys or (
            "labels" in keys and "first name" in keys) or "organization 1 - name" in keys:
        return "google"
    if "e-mail address" in keys and keys & {"e-mail display name", "e-mail 2 address", "mobile phone",
                                            "business phone", "categories", "job title", "first name"}:
        return "outlook"
    if "connected on" in keys or {"url", "position", "email address"} <= keys:
        return "linkedin"
    if keys & set(_NATIVE):
        return "native"
    return None


def column_map(header: list[str], fmt: str | None) -> list[str | None]:
    """Target field of each column (None = ignored) for a format."""
    table = {"native": _NATIVE, "google": _GOOGLE, "outlook": _OUTLOOK, "linkedin": _LINKEDIN}.get(fmt or "", {})
    result: list[str | None] = []
    for name in header:
        key = _key(name)
        target = table.get(key)
        if target is None and fmt == "google":
            match = _GOOGLE_MULTI.match(key)
            if match:
                target = "email" if match.group(1) == "e-mail" else "phone"
        result.append(target)
    return result


@dataclass(slots=True)
class RowData:
    display_name: str | None = None
    company: str | None = None
    title: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    ref: str | None = None  # the `id` column: the contact's id in the database the file was exported from


def _split_semicolon(value: str) -> list[str]:
    if ";" not in value:
        return [value]  # already stripped and non-empty
    return [p.strip() for p in value.split(";") if p.strip()]


def _split_google(value: str) -> list[str]:
    return [p.strip() for p in value.split(":::") if p.strip()]


def _google_tags(value: str) -> list[str]:
    tags = []
    for label in _split_google(value):
        if "".join(label.lower().split()) in GOOGLE_SYSTEM_LABELS:
            continue
        tags.append(label[2:].strip() if label.startswith("* ") else label)
    return [t for t in tags if t]


class Extractor:
    """Turns a row of cells into RowData for one header and format (compiled once per file)."""

    def __init__(self, header: list[str], fmt: str | None, targets: list[str | None],
                 unneutralise: Callable[[str], str] | None) -> None:
        self.header = header
        self.format = fmt
        self.width = len(header)
        # Columns nothing reads (not even `--map COL=ignore`): a native or mapped file's may be typos.
        self.unread = [name for name, target in zip(header, targets) if name and target is None]
        self.columns: list[tuple[int, str]] = [(i, t) for i, t in enumerate(targets) if t and t != "ignore"]
        self.first_column: dict[str, str] = {}
        for i, target in self.columns:
            self.first_column.setdefault(target, header[i])
        self.unneutralise = unneutralise
        if fmt == "google":
            self.split_multi, self.split_tags = _split_google, _google_tags
        else:
            self.split_multi = self.split_tags = _split_semicolon

    @property
    def mapped(self) -> list[str]:
        return sorted({t for _, t in self.columns})

    def column_of(self, target: str) -> str:
        return self.first_column.get(target, target)

    def extract(self, cells: list[str]) -> RowData:
        """The row's values by target field (compiled per header: only mapped columns are looked at)."""
        row = RowData(None, None, None, [], [], [], None, None, None)
        found: dict[str, list[str]] | None = None  # the rarer fields, when the header has them
        unneutralise = self.unneutralise
        for i, target in self.columns:
            value = cells[i].strip()
            if not value:
                continue
            if unneutralise is not None and value[0] == "'":
                value = unneutralise(value)
            if target == "email":
                row.emails += self.split_multi(value)
            elif target == "phone":
                row.phones += self.split_multi(value)
            elif target == "tags":
                row.tags += self.split_tags(value)
            elif target == "display_name":
                if row.display_name is None:
                    row.display_name = value
            elif target == "company":
                if row.company is None:
                    row.company = value
            elif target == "title":
                if row.title is None:
                    row.title = value
            else:  # name parts, notes, timestamps, LinkedIn's extras
                if found is None:
                    found = {}
                found.setdefault(target, []).append(value)
        if found:
            self._extract_rest(row, found)
        return row

    @staticmethod
    def _extract_rest(row: RowData, found: dict[str, list[str]]) -> None:
        get = found.get
        if get("created_at"):
            row.created_at = found["created_at"][0]
        if get("updated_at"):
            row.updated_at = found["updated_at"][0]
        if get("id"):
            row.ref = found["id"][0]
        if not row.display_name and (get("first_name") or get("middle_name") or get("last_name")):
            row.display_name = " ".join(v[0] for v in (get("first_name"), get("middle_name"), get("last_name")) if v)
        notes = get("notes")
        connected, url = get("connected_on"), get("linkedin_url")
        if connected or url:
            text = "Connected on LinkedIn" + (f" on {connected[0]}" if connected else "")
            notes = [*(notes or ()), text + (f" ({url[0]})" if url else "")]
        if notes:
            row.notes = notes[0] if len(notes) == 1 else "\n".join(notes)


def parse_mapping(specs: list[str]) -> dict[str, str]:
    """`--map COL=FIELD` options as {column key: field}; unknown fields are an error (raised by caller)."""
    result: dict[str, str] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--map: {spec!r} is not COL=FIELD")
        column, target = spec.rsplit("=", 1)
        target = FIELD_ALIASES.get(target.strip().lower(), target.strip().lower())
        if target not in KNOWN_FIELDS:
            raise ValueError(f"--map: unknown field {target!r} in {spec!r}; known fields: {', '.join(KNOWN_FIELDS)}")
        if not column.strip():
            raise ValueError(f"--map: {spec!r} names no column")
        result[_key(column)] = target
    return result


def build_extractor(header: list[str], fmt: str | None, mapping: dict[str, str],
                    unneutralise: Callable[[str], str] | None) -> Extractor:
    targets = column_map(header, fmt)
    for i, name in enumerate(header):
        if _key(name) in mapping:
            targets[i] = mapping[_key(name)]
    return Extractor(header, fmt, targets, unneutralise if fmt == "native" else None)


def key(header: str) -> str:
    return _key(header)
