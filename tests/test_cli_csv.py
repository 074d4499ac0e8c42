"""`omnicrm contacts export` / `contacts import` end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "csv"


def exported(cli, *args: str) -> list[dict]:
    result = cli("contacts", "export", "--format", "json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def by_email(rows: list[dict]) -> dict[str, dict]:
    return {r["email"][0]: r for r in rows if r["email"]}


def write(tmp_path: Path, text: str, name: str = "in.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)


# --- formats ----------------------------------------------------------------------------------------

def test_every_sample_format_imports(cli):
    for name, fmt in [("native", "native"), ("google_current", "google"), ("google_legacy", "google"),
                      ("outlook", "outlook"), ("linkedin_connections", "linkedin")]:
        result = cli("contacts", "import", str(DATA / f"{name}.csv"), "--format", "json")
        assert result.exit_code == 0, (name, result.stderr)
        summary = json.loads(result.stdout)
        assert summary["format"] == fmt and summary["rejected"] == 0 and summary["created"] >= 2, name
    rows = exported(cli)
    people = by_email(rows)
    zoe = people["zoe@example.com"]
    assert zoe["phone"] == ["+14155550101", "+442079460958"] and zoe["tags"] == ["lead", "vip"]
    assert zoe["notes"] == 'Met at the conference.\nLikes "good" coffee.'
    assert zoe["created_at"].startswith("2024-03-01T09:30:00")
    mallory = people["mallory@example.com"]  # our own export's formula guard is undone on import
    assert mallory["display_name"].startswith("=HYPERLINK(") and mallory["tags"] == ["+lead", "=vip"]
    assert mallory["notes"] == "-- call me"
    ingrid = people["ingrid@globex.example"]  # Google current: ::: cells, labels without * myContacts
    assert ingrid["email"] == ["ingrid@globex.example", "ingrid.j@example.org"]
    assert ingrid["phone"] == ["+46701234567", "+12125550133"] and ingrid["tags"] == ["customers", "vip"]
    assert (ingrid["company"], ingrid["title"]) == ("Globex", "Head of Sales")
    kenji = people["kenji.sato@example.jp"]  # a `;` inside a phone would split it in our export: it becomes `,`
    assert kenji["email"] == ["kenji.sato@example.jp", "k.sato@example.com"]
    assert kenji["phone"] == ["+81 3-1234-5678,ext=9"]
    olu = people["olu@news.example"]  # Google legacy: Given/Family Name, Group Membership without * My Contacts
    assert olu["display_name"] == "Olu Okafor" and olu["tags"] == ["friends", "press"]
    assert people["monica.ruiz@example.es"]["title"] == "Owner"
    priya = people["priya.patel@umbrella.example"]  # Outlook
    assert priya["email"] == ["priya.patel@umbrella.example", "priya@example.net"]
    assert priya["title"] == "Chief Scientist" and priya["tags"] == ["partners", "research"]
    assert priya["phone"] == ["+13125550100", "+13125550111"]
    fatima = people["fatima.haddad@example.com"]  # LinkedIn: preamble skipped, Connected On kept
    assert fatima["company"] == "Hooli, Inc." and "12 Jan 2023" in fatima["notes"]
    assert any(r["display_name"] == "Mateo Rossi" and not r["email"] for r in rows)


def test_map_option_and_from_override(cli, tmp_path):
    path = write(tmp_path, "Who,Address,Firm,Colour\nAnn Lee,ann@example.com,Acme,red\n")
    result = cli("contacts", "import", path)
    assert result.exit_code == 2 and "'Who', 'Address', 'Firm', 'Colour'" in result.stderr
    assert "display_name" in result.stderr
    result = cli("contacts", "import", path, "--map", "Who=name", "--map", "Address=email", "--map", "Firm=company")
    assert result.exit_code == 0, result.stderr
    assert exported(cli)[0]["company"] == "Acme"
    assert cli("contacts", "import", path, "--map", "Who=colour").exit_code == 2
    # A native file's column that nothing reads is named (a typo would drop its data silently); trailing empty
    # cells past the header (spreadsheets write those) are no extra field.
    native = cli("--user", "typo", "contacts", "import", write(tmp_path, "display_name,emial,company\n"
                                                                 "Bo,bo@example.com,Acme,,\n", "typo.csv"),
                 "--format", "json")
    assert native.exit_code == 0, native.stderr
    assert "ignored column(s): 'emial'" in native.stderr
    assert json.loads(native.stdout)["ignored_columns"] == ["emial"] and json.loads(native.stdout)["created"] == 1
    typo = cli("contacts", "import", path, "--map", "Who=name", "--map", "Adress=email")  # no such column
    assert typo.exit_code == 2 and "--map: the file has no column 'adress'" in typo.stderr, typo.stderr
    assert "'Address'" in typo.stderr and len(exported(cli)) == 1
    assert cli("contacts", "import", path, "--from", "excel").exit_code == 2


# --- validation: atomic vs --skip-invalid -------------------------------------------------------------

BAD = ("display_name,email,phone\n"
       "Good One,good1@example.com,+1 415 555 0101\n"
       "Bad Mail,not-an-email,\n"
       ",,555\n"
       "Good Two,good2@example.com,not a phone\n"
       "Ragged,r@example.com,1,extra\n")


def test_atomic_import_writes_nothing_and_reports_every_bad_row(cli, tmp_path):
    cli("contacts", "add", "--name", "Existing", "--email", "existing@example.com")
    result = cli("contacts", "import", write(tmp_path, BAD))
    assert result.exit_code == 2
    assert "line 3, column email: 'not-an-email' is not a valid email address" in result.stderr
    assert "line 4, column display_name: a contact needs a name or an email" in result.stderr
    assert "line 6, column 4: unexpected extra field" in result.stderr
    assert "nothing was imported" in result.stderr
    assert [r["display_name"] for r in exported(cli)] == ["Existing"]
    summary = json.loads(cli("contacts", "import", write(tmp_path, BAD), "--format", "json").stdout)
    assert (summary["created"], summary["rejected"], summary["written"]) == (0, 3, False)  # nothing was created


def test_skip_invalid_writes_good_rows_and_rejects_file(cli, tmp_path):
    rejects = tmp_path / "rejects.csv"
    result = cli("contacts", "import", write(tmp_path, BAD), "--skip-invalid", "--rejects", str(rejects))
    assert result.exit_code == 4, result.stderr
    assert "created 2, merged 0, skipped 0, rejected 3" in result.stderr
    rows = by_email(exported(cli))
    assert set(rows) == {"good1@example.com", "good2@example.com"}
    assert rows["good2@example.com"]["phone"] == ["not a phone"]  # unparseable phones are kept as written
    rejected = list(csv.reader(io.StringIO(rejects.read_text())))
    assert rejected[0] == ["display_name", "email", "phone", "error"]
    assert rejected[1][:2] == ["Bad Mail", "not-an-email"] and "line 3, column email" in rejected[1][3]
    assert rejected[3][:3] == ["Ragged", "r@example.com", "1"] and "line 6, column 4" in rejected[3][3]
    assert rejected[3][4:] == ["extra"]  # a long row's extra cells after the error
    # A short row is padded: the error stays in the error column.
    short = cli("--user", "short", "contacts", "import", write(tmp_path, "display_name,email,company\nA,a@example.com\n",
                                                                   "short.csv"), "--skip-invalid", "--rejects", str(rejects))
    assert short.exit_code == 4, short.stderr
    assert list(csv.reader(io.StringIO(rejects.read_text())))[1] == [
        "A", "a@example.com", "", "line 2, column company: missing: the row has 2 fields, the header 3"]
    # The rejects file cannot be the input file (it would be emptied before it is read).
    source = write(tmp_path, BAD, "same.csv")
    same = cli("--user", "same", "contacts", "import", source, "--skip-invalid", "--rejects", source)
    assert same.exit_code == 2 and "--rejects:" in same.stderr and "is the input file" in same.stderr
    assert Path(source).read_text() == BAD
    assert cli("--user", "same", "contacts", "list", "--format", "json").stdout.strip() == "[]"
    # Without --rejects the rejected rows go to stderr.
    again = cli("--user", "other", "contacts", "import", write(tmp_path, BAD, "b.csv"), "--skip-invalid")
    assert again.exit_code == 4 and "line 3, column email" in again.stderr


@pytest.mark.parametrize("text,expected", [
    ("", "empty"),
    ("display_name,email\n", None),  # header only: nothing to do, success
    ('display_name,email\nAnn,"ann@example.com\n', "never closed"),
    ("display_name,email\nAnn,a@example.com\x00\n", "line 2, column email: contains a NUL character"),
    ("display_name,notes\nAnn," + "x" * 2_000_000 + "\n", "line 2, column notes: a line longer than 100,000"),
    ("display_name,email,email\nAnn,a@example.com,b@example.com\n", "duplicate column name"),
    ("display_name,email\nAnn\n", "line 2, column email: missing: the row has 1 field, the header 2"),
])
def test_bad_files(cli, tmp_path, text, expected):
    result = cli("contacts", "import", write(tmp_path, text))
    if expected is None:
        assert result.exit_code == 0 and "created 0" in result.stderr
    else:
        assert result.exit_code == 2 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.output


def test_binary_and_wrong_encoding(cli, tmp_path):
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 40)
    result = cli("contacts", "import", str(junk))
    assert result.exit_code == 2 and "binary" in result.stderr
    latin = tmp_path / "latin.csv"
    latin.write_bytes("display_name,email\nJosé Núñez,jose@example.com\n".encode("cp1252"))
    result = cli("contacts", "import", str(latin))
    assert result.exit_code == 2 and "--encoding" in result.stderr
    assert cli("contacts", "import", str(latin), "--encoding", "cp1252").exit_code == 0
    bom = tmp_path / "bom.csv"  # UTF-8's byte order mark and another --encoding: refused, not mojibake
    bom.write_bytes(b"\xef\xbb\xbfdisplay_name,email\nZo\xc3\xab,zoe@example.com\n")
    result = cli("contacts", "import", str(bom), "--encoding", "cp1252")
    assert result.exit_code == 2 and "--encoding: the file starts with UTF-8's byte order mark" in result.stderr
    # Far into the file (the text is decoded 64 KB ahead of the rows) the message still names the bad line.
    late = tmp_path / "late.csv"
    late.write_bytes(b"display_name,email\n" + b"".join(f"P{i},p{i}@example.com\n".encode() for i in range(9000))
                     + b'"Two\nJos\xe9",jose@example.com\n')
    result = cli("contacts", "import", str(late))
    assert result.exit_code == 2 and "--encoding: line 9003 is not valid utf-8 (byte 0xe9)" in result.stderr, result.stderr
    assert exported(cli)[0]["display_name"] == "José Núñez"


# --- duplicates -----------------------------------------------------------------------------------

def test_merge_fills_empty_fields_and_adds_values_without_overwriting(cli, tmp_path):
    cli("contacts", "add", "--name", "Ann Lee", "--email", "ann@example.com", "--company", "Acme",
        "--phone", "+1 415 555 0101", "--tag", "vip")
    text = ("display_name,email,phone,company,title,tags\n"
            "Someone Else,ANN@example.com;ann.lee@work.example.com,(415) 555-0101;+44 20 7946 0958,Globex,CTO,"
            "lead;VIP\n"
            "Ann Again,ann.lee@work.example.com,,,,friend\n")
    result = cli("contacts", "import", write(tmp_path, text), "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["merged"] == 2
    (ann,) = exported(cli)
    assert (ann["display_name"], ann["company"], ann["title"]) == ("Ann Lee", "Acme", "CTO")
    assert ann["email"] == ["ann@example.com", "ann.lee@work.example.com"]
    assert ann["phone"] == ["+14155550101", "+442079460958"]
    assert ann["tags"] == ["friend", "lead", "vip"]


def test_on_duplicate_skip_and_error(cli, tmp_path):
    cli("contacts", "add", "--name", "Ann Lee", "--email", "ann@example.com")
    text = "display_name,email,company\nAnn,ann@example.com,Acme\nBob,bob@example.com,\nBobby,BOB@example.com,X\n"
    path = write(tmp_path, text)
    result = cli("contacts", "import", path, "--on-duplicate", "error")
    assert result.exit_code == 2
    assert "line 2, column email: ann@example.com already belongs to contact" in result.stderr
    assert "line 4, column email: bob@example.com already belongs to the row on line 3" in result.stderr
    assert len(exported(cli)) == 1
    result = cli("contacts", "import", path, "--on-duplicate", "skip")
    assert result.exit_code == 0 and "created 1, merged 0, skipped 2" in result.stderr
    assert by_email(exported(cli))["ann@example.com"]["company"] is None


def test_dry_run_writes_nothing_and_lists_outcomes(cli, tmp_path):
    cli("contacts", "add", "--name", "Ann Lee", "--email", "ann@example.com")
    path = write(tmp_path, "display_name,email\nAnn,ann@example.com\nNew,new@example.com\nBad,bad@\n")
    result = cli("contacts", "import", path, "--dry-run", "--skip-invalid", "--format", "jsonl")
    assert result.exit_code == 4
    plan = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(p["line"], p["action"]) for p in plan] == [(2, "merge"), (3, "create"), (4, "reject")]
    assert "would create 1, merge 1, skip 0, reject 1" in result.stderr
    assert len(exported(cli)) == 1
    summary = cli("contacts", "import", path, "--dry-run", "--format", "json")
    assert summary.exit_code == 2 and json.loads(summary.stdout)["dry_run"] is True
    rejects = tmp_path / "rejects.csv"  # not even the rejects file: the plan lists the rejected rows
    result = cli("contacts", "import", path, "--dry-run", "--skip-invalid", "--rejects", str(rejects))
    assert result.exit_code == 4 and "reject" in result.stdout and not rejects.exists()
    assert f"dry run: {rejects} was not written" in result.stderr
    unmapped = cli("contacts", "import", write(tmp_path, "Colour\nred\n"), "--dry-run", "--format", "csv")
    assert unmapped.exit_code == 2 and unmapped.stdout == ""  # no plan header before the error


def test_dry_run_plan_of_several_batches_is_in_file_order(cli, tmp_path):
    """The plan is written batch by batch as the import goes (not held in memory): still one entry a row, in
    file order, also where rejected rows (found first in each batch) and applied rows alternate."""
    rows = "".join(f"P{i},{'bad@' if i % 997 == 0 else f'p{i}@example.com'}\n" for i in range(12_000))
    path = write(tmp_path, "display_name,email\n" + rows)
    result = cli("contacts", "import", path, "--dry-run", "--skip-invalid", "--format", "jsonl")
    assert result.exit_code == 4
    plan = [json.loads(line) for line in result.stdout.splitlines()]
    assert [p["line"] for p in plan] == list(range(2, 12_002))
    assert [p["line"] for p in plan if p["action"] == "reject"] == [i + 2 for i in range(0, 12_000, 997)]
    table = cli("contacts", "import", path, "--dry-run", "--skip-invalid")
    assert table.stdout.splitlines()[0].split() == ["line", "action", "contact_id", "display_name", "email", "detail"]
    assert len(table.stdout.splitlines()) == 12_002


# --- export --------------------------------------------------------------------------------------------

def test_export_formula_guard_filters_and_output_file(cli, tmp_path):
    cli("contacts", "add", "--name", "=HYPERLINK(\"http://evil.example\")", "--email", "-ann@example.com",
        "--phone", "+14155550101", "--tag", "=vip", "--tag", "+lead", "--note", "@SUM(1)")
    cli("contacts", "add", "--name", "Bob", "--email", "bob@example.com", "--tag", "other")
    out = tmp_path / "out.csv"
    result = cli("contacts", "export", "--tag", "=vip", "-o", str(out))
    assert result.exit_code == 0 and result.stdout == "" and "exported 1" in result.stderr
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 1
    row = rows[0]
    assert list(row) == ["id", "display_name", "email", "phone", "company", "title", "tags", "notes",
                         "created_at", "updated_at"]
    assert row["display_name"] == "'=HYPERLINK(\"http://evil.example\")"
    assert (row["email"], row["phone"]) == ("-ann@example.com", "+14155550101")
    assert (row["tags"], row["notes"]) == ("'+lead;=vip", "'@SUM(1)")
    assert len(exported(cli, "--search", "bob")) == 1
    portable = cli("contacts", "export", "--portable").stdout.splitlines()
    assert portable[0] == "display_name,email,phone,company,title,tags,notes"


def test_round_trip_reproduces_the_same_contacts(cli, tmp_path):
    for name in ("native", "google_current", "outlook", "linkedin_connections"):
        assert cli("contacts", "import", str(DATA / f"{name}.csv")).exit_code == 0
    cli("contacts", "add", "--name", "'=odd quote", "--email", "odd@example.com", "--note", "line 1\nline 2")
    for letter in "yz":  # notes of 120,000+ characters in all: one cell, more than one note may hold
        assert cli("contacts", "note", "odd@example.com", "-", input=letter * 60_000).exit_code == 0
    # Phones with an extension (no E.164 form: their text is exported), a `;` in a phone and in a tag
    # (stored with a `,`).
    assert cli("contacts", "add", "--name", "Ext", "--email", "ext@example.com", "--phone", "+1 415 555 0102 ext. 5",
               "--phone", "+1-201-555-0123;ext=7", "--tag", "a;b").exit_code == 0
    first = cli("contacts", "export")
    full = tmp_path / "full.csv"
    full.write_text(first.stdout, encoding="utf-8")
    copy = cli("--user", "copy", "contacts", "import", str(full))
    assert copy.exit_code == 0, copy.stderr
    a = cli("contacts", "export", "--portable").stdout
    b = cli("--user", "copy", "contacts", "export", "--portable").stdout
    assert a == b and a.count("\n") > 10
    notes = [e["subject"] for e in json.loads(cli("--user", "copy", "contacts", "timeline", "odd@example.com",
                                                   "--format", "json").stdout) if e["kind"] == "note"]
    assert sorted(note[:6] for note in notes) == ["line 1", "zzzzzz"]  # two notes, cut at a line end
    ext = by_email(exported(cli, "--search", "ext@example"))["ext@example.com"]
    assert (ext["phone"], ext["tags"]) == (["+1 415 555 0102 ext. 5", "+1-201-555-0123,ext=7"], ["a,b"])
    assert by_email(json.loads(cli("--user", "copy", "contacts", "export", "--format", "json", "--search",
                                   "ext@example").stdout))["ext@example.com"]["phone"] == ext["phone"]
    # created_at/updated_at are kept, so only the ids may differ
    strip = [line.split(",", 1)[1] for line in first.stdout.splitlines()[1:] if line[:1].isdigit()]
    again = cli("--user", "copy", "contacts", "export").stdout
    assert strip == [line.split(",", 1)[1] for line in again.splitlines()[1:] if line[:1].isdigit()]


# --- real processes: pipes, stdin, a closed pipe --------------------------------------------------------

def test_pipes_through_real_processes(omnicrm_cmd, db_url, omnicrm_home):
    filler = "x" * 150  # ~250 KB of export: far more than a pipe buffer, so `head` closes it mid-stream
    rows = "".join(f"Person {i},p{i}@example.com,+1 415 555 {i % 10000:04d},{filler}\n" for i in range(1500))
    imported = omnicrm_cmd("contacts", "import", "-", input="display_name,email,phone,notes\n" + rows)
    assert imported.returncode == 0, imported.stderr
    assert "created 1500" in imported.stderr
    # `omnicrm contacts export | head -2`: the closed pipe ends the export quietly with exit 0.
    exe = Path(sys.executable).with_name("omnicrm")
    env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home)}
    pipeline = subprocess.run(f"'{exe}' contacts export | head -2; echo \"status=${{PIPESTATUS[0]}}\"",
                              shell=True, executable="/bin/bash", env=env, capture_output=True, text=True,
                              timeout=60)
    lines = pipeline.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("id,display_name"), pipeline.stdout
    assert lines[-1] == "status=0" and pipeline.stderr == "", pipeline.stderr
    # and back in through stdin: export | import into another user
    chained = subprocess.run(f"'{exe}' contacts export | '{exe}' --user copy contacts import - --format json",
                             shell=True, executable="/bin/bash", env=env, capture_output=True, text=True,
                             timeout=60)
    assert chained.returncode == 0, chained.stderr
    assert json.loads(chained.stdout)["created"] == 1500


# --- background ------------------------------------------------------------------------------------

def test_background_import_runs_as_a_job(cli, tmp_path, settings):
    jobs = pytest.importorskip("omnicrm.jobs")
    path = write(tmp_path, "display_name,email\nAnn,ann@example.com\nBob,bob@example.com\n")
    assert cli("contacts", "import", "-", "--background").exit_code == 2
    assert cli("contacts", "import", write(tmp_path, "colour\nred\n", "bad.csv"), "--background").exit_code == 2
    queued = cli("contacts", "import", path, "--background")
    assert queued.exit_code == 0, queued.stderr
    job_id = int(queued.stdout.strip())
    (job,) = jobs.run_foreground(settings, [job_id], 1)
    assert job.status == "done", job.last_error
    assert job.result["created"] == 2
    assert len(exported(cli)) == 2


def test_commands_have_help(cli):
    for command in ("export", "import"):
        result = cli("contacts", command, "--help")
        assert result.exit_code == 0 and len(result.stdout) > 200


def test_stdin_errors_found_by_the_reader_process(omnicrm_cmd, cli):
    rows = "".join(f"P{i},p{i}@example.com\n" for i in range(600))
    broken = omnicrm_cmd("contacts", "import", "-", input="display_name,email\n" + rows + '"Open,quote@example.com\n')
    assert broken.returncode == 2 and "line 602: a quoted field is never closed" in broken.stderr
    bad = omnicrm_cmd("contacts", "import", "-", input="display_name,email\n" + rows + "X,bad@\n")
    assert bad.returncode == 2 and "line 602, column email: 'bad@' is not a valid email address" in bad.stderr
    assert exported(cli) == []
