"""Pure normalisation: folding, emails, phones, the search text."""

import pytest

from omnicrm.normalize import (clean_text, digits, fold, is_valid_email, looks_like_phone, normalise_email,
                               search_text, to_e164)


@pytest.mark.parametrize("raw, folded", [
    ("Zoë", "zoe"), ("ZOË ADAMS", "zoe adams"), ("Émile Þór", "emile þor"), ("Straße", "strasse"),
    ("Ångström", "angstrom"), ("", ""), (None, ""), ("ﬁne", "fine"),
])
def test_fold_strips_case_and_accents(raw, folded):
    assert fold(raw) == folded


@pytest.mark.parametrize("raw, expected", [("  Ann@Example.COM ", "ann@example.com"), ("a@b.co", "a@b.co")])
def test_normalise_email_trims_and_lowercases(raw, expected):
    assert normalise_email(raw) == expected


@pytest.mark.parametrize("value, valid", [
    ("ann@example.com", True), ("ann+tag@mail.example.co.uk", True), ("zoë@exämple.de", True),
    ("ann", False), ("ann@", False), ("@example.com", False), ("ann@example", False), ("a b@example.com", False),
    ("ann@@example.com", False), ("ann@-example.com", False), ("x" * 321 + "@example.com", False),
])
def test_is_valid_email(value, valid):
    assert is_valid_email(value) is valid


@pytest.mark.parametrize("raw, region, e164", [
    ("+1 (415) 555-0101", "US", "+14155550101"),
    ("(415) 555-0101", "US", "+14155550101"),
    ("415.555.0101", "us", "+14155550101"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("+44 20 7946 0958", "US", "+442079460958"),
    ("06 12 34 56 78", "FR", "+33612345678"),
    ("12", "US", None),
    ("555-0101", "US", None),  # possible only locally (no area code): no E.164 form, the text is kept
    ("+1 415 555 0102 ext. 5", "US", None),  # E.164 has no extensions: the text keeps it
    ("call me", "US", None),
])
def test_to_e164(raw, region, e164):
    assert to_e164(raw, region) == e164


@pytest.mark.parametrize("query, phone", [
    ("4155550101", True), ("+1 (415) 555-0101", True), ("555-0101", True), ("12", False), ("ann", False),
    ("415a", False),
])
def test_looks_like_phone(query, phone):
    assert looks_like_phone(query) is phone


def test_digits_and_clean_text():
    assert digits("+1 (415) 555-0101") == "14155550101"
    assert digits(None) == ""
    assert clean_text("  x  ") == "x"
    assert clean_text("   ") is None
    assert clean_text(None) is None


def test_search_text_holds_folded_name_company_emails_and_phone_digits():
    text = search_text("Zoë Adams", "Café Ltd", ["zoe@example.com"], [("(415) 555-0101", "+14155550101")])
    assert text.split("\n") == ["zoe adams", "cafe ltd", "zoe@example.com", "14155550101"]
    # Written digits the E.164 digits do not contain stay searchable (a national trunk prefix, an extension).
    assert search_text(None, None, [], [("020 7946 0958", "+442079460958")]).split("\n") == [
        "02079460958", "442079460958"]
    assert search_text(None, None, [], [("ext. 12", None)]) == "12"
