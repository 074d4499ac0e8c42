"""Normalisation of names, emails and phones, and the folded search text built from them."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_EMAIL_RE = re.compile(r"^[^@\s<>(),;:\"\[\]\\]+@[A-Za-z0-9\u00a0-\uffff](?:[A-Za-z0-9\u00a0-\uffff-]*[A-Za-z0-9\u00a0-\uffff])?"
                       r"(?:\.[A-Za-z0-9\u00a0-\uffff](?:[A-Za-z0-9\u00a0-\uffff-]*[A-Za-z0-9\u00a0-\uffff])?)+$")
_PHONE_CHARS_RE = re.compile(r"^[\d\s()+.\-/]+$")
_NON_DIGITS = re.compile(r"\D+")
MAX_TEXT = 10_000


def fold(text: str | None) -> str:
    """Case-fold and strip accents: 'Zoë' → 'zoe'."""
    if not text:
        return ""
    if text.isascii():  # the common case: nothing to decompose, and lower() is casefold() for ASCII
        return text.lower()
    return _fold_short(text) if len(text) <= _FOLD_CACHED_LEN else _fold_unicode(text)


def _fold_unicode(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


# Names and companies repeat a lot in real files (a big import folds a million of them); longer texts
# are not remembered.
_FOLD_CACHED_LEN = 100
_fold_short = lru_cache(maxsize=16384)(_fold_unicode)


def clean_text(value: str | None) -> str | None:
    """Trim; empty becomes None."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def normalise_phone(raw: str) -> str:
    """A phone number's text as stored: trimmed; a `;` inside it (say `;ext=2`) becomes `,`, since `;`
    separates phones in a CSV cell (the number then survives an export and an import)."""
    return raw.strip().replace(";", ",")


def normalise_email(value: str) -> str:
    return value.strip().lower()


def is_valid_email(value: str) -> bool:
    return len(value) <= 320 and bool(_EMAIL_RE.match(value))


def digits(value: str | None) -> str:
    if not value:
        return ""
    if value.isascii():  # the common case: a byte table, no regular expression
        return value.encode("ascii").translate(None, _ASCII_NON_DIGITS).decode("ascii")
    return _NON_DIGITS.sub("", value)


_ASCII_NON_DIGITS = bytes(b for b in range(128) if not 48 <= b <= 57)


def looks_like_phone(query: str) -> bool:
    """A search term made only of phone characters with at least three digits."""
    return bool(_PHONE_CHARS_RE.match(query)) and len(digits(query)) >= 3


@lru_cache(maxsize=4096)
def to_e164(raw: str, region: str = "US") -> str | None:
    """E.164 form of `raw` when it parses as a possible number, else None (the raw text is kept). A number
    only possible locally (555-0101 in the US: no area code) has no E.164 form, nor one with an extension
    (E.164 has none: the written text, which export writes then, keeps it)."""
    import phonenumbers  # heavy: imported on first use

    try:
        number = phonenumbers.parse(raw, region.upper())
    except phonenumbers.NumberParseException:
        return None
    if number.extension or \
            phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    # Degenerate numbers ("000000" in DE → +4900000 → +490000) do not survive a second parse: keep the raw
    # text for those, so normalising is idempotent and an exported phone re-imports as itself.
    # (A number written in international form with the same digits re-parses as itself: no second parse.)
    same_digits = raw[:1] == "+" and digits(raw) == e164[1:]
    if e164 != raw and not same_digits and phonenumbers.format_number(phonenumbers.parse(e164, region.upper()),
                                                                      phonenumbers.PhoneNumberFormat.E164) != e164:
        return None
    return e164


def search_text(name: str | None, company: str | None, emails: list[str], phones: list[tuple[str, str | None]]) -> str:
    """The folded text every substring search runs against: name, company, emails, phone digits."""
    parts = [p for p in (fold(name), fold(company)) if p]
    parts += emails
    if phones:
        parts += phone_search_parts(phones)
    return "\n".join(parts)


def phone_search_parts(phones: list[tuple[str, str | None]]) -> list[str]:
    """The digits of each phone as written and of its E.164 form; the written digits are left out when the
    E.164 digits already contain them ('(415) 555-0101' → '14155550101'), since a substring search of
    either then finds the same contact (and the search index is a fifth smaller)."""
    parts = []
    for raw, e164 in phones:
        written = digits(raw)
        if e164:
            full = e164[1:]
            if written and written not in full:
                parts.append(written)
            parts.append(full)
        elif written:
            parts.append(written)
    return parts
