"""`omnicrm contacts …` in-process on SQLite and PostgreSQL: CRUD, formats, filters, paging, bulk delete, isolation."""

import csv
import io
import json


def ok(run):
    assert run.exit_code == 0, run.output
    return run


def add(cli, *args, env=None):
    return int(ok(cli("contacts", "add", *args, env=env)).stdout.strip())


def listed(cli, *args, user=None):
    pre = ("--user", user) if user else ()
    return json.loads(ok(cli(*pre, "contacts", "list", "--format", "json", *args)).stdout)


def test_crud_round_trip(cli):
    cid = add(cli, "--name", "Zoë Adams", "--email", "Zoe@Example.com", "--phone", "+1 (415) 555-0101",
              "--company", "Acme", "--title", "CTO", "--tag", "VIP", "--tag", "friend", "--note", "met at conf")
    shown = json.loads(ok(cli("contacts", "show", "zoe@example.com", "--format", "json")).stdout)
    assert shown["id"] == cid
    assert (shown["display_name"], shown["email"], shown["phone"], shown["tags"], shown["notes"]) == (
        "Zoë Adams", ["zoe@example.com"], ["+14155550101"], ["friend", "vip"], "met at conf")
    assert [e["kind"] for e in shown["timeline"]] == ["note"]

    run = ok(cli("contacts", "update", str(cid), "--name", "Zoë B", "--email", "z@work.org", "--remove-email",
                 "zoe@example.com", "--phone", "020 7946 0958", "--untag", "vip", "--tag", "board", "--format", "json",
                 env={"OMNICRM_REGION": "GB"}))
    updated = json.loads(run.stdout)
    assert (updated["display_name"], updated["email"], updated["phone"], updated["tags"]) == (
        "Zoë B", ["z@work.org"], ["+14155550101", "+442079460958"], ["board", "friend"])
    assert f"updated contact {cid}" in run.stderr

    table = ok(cli("contacts", "show", str(cid))).stdout
    assert "Zoë B" in table and "timeline" in table
    ok(cli("contacts", "delete", str(cid)))
    gone = cli("contacts", "show", str(cid))
    assert gone.exit_code == 1 and "not found" in gone.stderr


def test_output_formats_and_fields(cli):
    a = add(cli, "--name", "Ann", "--email", "ann@x.org", "--email", "ann@home.org", "--tag", "t")
    b = add(cli, "--name", "=cmd()", "--phone", "+1 415 555 0101")
    rows = listed(cli, "--sort", "name", "--order", "asc")
    assert [r["id"] for r in rows] == [b, a]  # "=" sorts before letters
    assert set(rows[0]) >= {"id", "display_name", "email", "phone", "company", "title", "tags", "created_at",
                            "updated_at", "last_interaction_at"}
    jsonl = ok(cli("contacts", "list", "--format", "jsonl", "--fields", "id,email")).stdout.splitlines()
    assert [json.loads(line) for line in jsonl] == [{"id": b, "email": []},
                                                    {"id": a, "email": ["ann@x.org", "ann@home.org"]}]
    out = ok(cli("contacts", "list", "--format", "csv", "--fields", "id,display_name,email,phone"))
    parsed = list(csv.reader(io.StringIO(out.stdout)))
    assert parsed == [["id", "display_name", "email", "phone"], [str(b), "'=cmd()", "", "+14155550101"],
                      [str(a), "Ann", "ann@x.org;ann@home.org", ""]]
    assert "page" not in out.stderr
    table = ok(cli("contacts", "list"))
    assert table.stdout.splitlines()[0].split() == ["id", "display_name", "email", "phone", "company", "tags"]
    assert table.stderr.strip() == "page 1 of 1 · 2 contacts"
    # the global --format and OMNICRM_FORMAT apply too; the command's own --format wins
    assert json.loads(ok(cli("--format", "json", "contacts", "list")).stdout)[0]["id"] == b
    assert ok(cli("contacts", "list", env={"OMNICRM_FORMAT": "jsonl"})).stdout.count("\n") == 2
    assert ok(cli("--format", "json", "contacts", "list", "--format", "csv")).stdout.startswith("id,")
    empty = ok(cli("contacts", "list", "--search", "nobody"))
    assert empty.stdout == "" and empty.stderr.strip() == "page 1 of 1 · 0 contacts"
    assert ok(cli("contacts", "list", "--search", "nobody", "--format", "json")).stdout.strip() == "[]"


def test_search_filters_sort_and_pages(cli):
    ids = {}
    for name, extra in (("Zoë Adams", ["--phone", "+1 (415) 555-0101", "--tag", "vip"]),
                        ("zoe brown", ["--company", "Straße AG", "--tag", "vip", "--tag", "friend"]),
                        ("Émile", ["--email", "emile@zola.fr", "--tag", "friend"]),
                        ("Bob", [])):
        ids[name] = add(cli, "--name", name, *extra)

    def names(*args):  # accented names sort differently per engine collation: compare as sets
        return sorted(r["display_name"] for r in listed(cli, "--sort", "name", "--order", "asc", *args))

    assert names("--search", "ZOE") == sorted(["Zoë Adams", "zoe brown"])
    assert names("--search", "4155550101") == ["Zoë Adams"]
    assert names("--search", "strasse") == ["zoe brown"]
    assert names("--search", "EMILE@") == ["Émile"]
    assert names("--tag", "vip", "--tag", "friend") == ["zoe brown"]
    assert names("--tag", "friend", "--search", "emile") == ["Émile"]
    assert names("--stale", "30") == sorted(ids)  # nobody was ever contacted
    assert [r["display_name"] for r in listed(cli, "--sort", "name", "--order", "desc", "--search", "b")] == [
        "zoe brown", "Bob"]
    assert [r["id"] for r in listed(cli)] == sorted(ids.values(), reverse=True)  # default: newest first

    last = cli("contacts", "list", "--page", "2", "--page-size", "3", "--fields", "id")
    assert ok(last).stderr.strip() == "page 2 of 2 · 4 contacts"
    assert last.stdout.split()[2:] == [str(ids["Zoë Adams"])]  # after the header lines: the oldest only
    past = ok(cli("contacts", "list", "--page", "3", "--page-size", "3"))
    assert past.stdout == "" and past.stderr.strip() == "page 3 of 2 · 4 contacts"


def test_created_periods_use_omnicrm_now_and_tz(cli, local_tz):
    local_tz("America/New_York")
    # Local times: Feb 28 23:59:59, Mar 1 00:00 (first instant of March), Mar 31 23:59:59, Apr 1 00:00.
    for name, instant in (("feb-last", "2026-03-01T04:59:59+00:00"), ("mar-first", "2026-03-01T05:00:00+00:00"),
                          ("mar-last", "2026-04-01T03:59:59+00:00"), ("apr-first", "2026-04-01T04:00:00+00:00")):
        add(cli, "--name", name, env={"OMNICRM_NOW": instant})
    now = {"OMNICRM_NOW": "2026-03-31T23:30:00-04:00"}

    def created(spec):
        run = ok(cli("contacts", "list", "--created", spec, "--format", "json", "--sort", "created",
                     "--order", "asc", env=now))
        return [r["display_name"] for r in json.loads(run.stdout)]

    assert created("month") == ["mar-first", "mar-last", "apr-first"]  # open-ended: the future counts
    assert created("2026-03-01..2026-03-31") == ["mar-first", "mar-last"]
    assert created("..2026-02-28") == ["feb-last"]
    assert created("2026-04-01..") == ["apr-first"]
    assert created("today") == ["mar-last", "apr-first"]
    assert created("quarter") == ["feb-last", "mar-first", "mar-last", "apr-first"]
    assert created("week") == ["mar-last", "apr-first"]  # Monday March 30


BAD_VALUES = [
    (["contacts", "list", "--page-size", "0"], "--page-size"),
    (["contacts", "list", "--page-size", "201"], "--page-size"),
    (["contacts", "list", "--page", "0"], "--page"),
    (["contacts", "list", "--page", "100001"], "--page"),
    (["contacts", "list", "--page", "x"], "--page"),
    (["contacts", "list", "--sort", "size"], "--sort"),
    (["contacts", "list", "--order", "up"], "--order"),
    (["contacts", "list", "--created", "2026-13-01.."], "--created"),
    (["contacts", "list", "--created", "2026-02-01..2026-01-01"], "--created"),
    (["contacts", "list", "--created", "lately"], "--created"),
    (["contacts", "list", "--search", ""], "--search"),
    (["contacts", "list", "--search", "x" * 201], "--search"),
    (["contacts", "list", "--stale", "-1"], "--stale"),
    (["contacts", "list", "--fields", "id,nope"], "--fields"),
    (["contacts", "list", "--format", "xml"], "--format"),
    (["--format", "xml", "contacts", "list"], "--format"),
    (["--region", "Narnia", "contacts", "list"], "--region"),
    (["--db", "mysql://h/d", "contacts", "list"], "--db"),
    (["contacts", "add"], "--name"),
    (["contacts", "add", "--name", "A", "--email", "nope"], "--email"),
    (["contacts", "delete"], "REF"),
    (["contacts", "delete", "1", "--tag", "x"], "REF"),
    (["contacts", "delete", "--tag", "x", "--search", ""], "--search"),
    (["contacts", "note", "1", "   "], "TEXT"),
]


def test_bad_option_values_exit_2_naming_the_option(cli):
    add(cli, "--name", "Ann")
    for args, option in BAD_VALUES:
        run = cli(*args)
        assert run.exit_code == 2, (args, run.output)
        assert option in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.output


def test_bulk_delete(cli):
    keep = add(cli, "--name", "Keep", "--tag", "keep")
    doomed = [add(cli, "--name", f"Temp {i}", "--tag", "temp") for i in range(3)]

    refused = cli("contacts", "delete", "--tag", "temp")  # CliRunner's stdin is not a terminal
    assert refused.exit_code == 2 and "--yes" in refused.stderr and "3 contact" in refused.stderr
    assert len(listed(cli)) == 4

    dry = ok(cli("contacts", "delete", "--tag", "temp", "--dry-run", "--format", "json"))
    assert sorted(r["id"] for r in json.loads(dry.stdout)) == doomed
    assert "would delete 3 contact(s)" in dry.stderr
    assert len(listed(cli)) == 4

    dry_refs = ok(cli("contacts", "delete", str(doomed[0]), str(doomed[0]), "--dry-run", "--format", "jsonl"))
    assert [json.loads(line)["id"] for line in dry_refs.stdout.splitlines()] == [doomed[0]]

    missing = cli("contacts", "delete", str(doomed[0]), "999999")
    assert missing.exit_code == 1 and "999999" in missing.stderr
    assert len(listed(cli)) == 4  # all or nothing

    done = ok(cli("contacts", "delete", "--tag", "temp", "--search", "temp", "--yes"))
    assert "deleted 3 contact(s)" in done.stderr
    assert [r["id"] for r in listed(cli)] == [keep]
    none = ok(cli("contacts", "delete", "--tag", "temp"))
    assert "deleted 0 contact(s)" in none.stderr


def test_users_are_isolated(cli):
    cid = add(cli, "--name", "Alice's friend", "--email", "f@x.org", "--tag", "secret",
              env={"OMNICRM_USER": "alice"})
    for args in (["contacts", "show", str(cid)], ["contacts", "show", "f@x.org"],
                 ["contacts", "update", str(cid), "--name", "hacked"], ["contacts", "delete", str(cid), "--yes"],
                 ["contacts", "note", str(cid), "hi"], ["contacts", "timeline", str(cid)],
                 ["tags", "rename", "secret", "public"]):
        run = cli("--user", "bob", *args)
        assert run.exit_code == 1, (args, run.output)
        assert "not found" in run.stderr
    assert listed(cli, user="bob") == []
    assert ok(cli("--user", "bob", "contacts", "delete", "--tag", "secret", "--yes")).stderr.strip() == \
        "deleted 0 contact(s)"
    # bob may hold the same email himself
    add(cli, "--name", "Bob's friend", "--email", "f@x.org", env={"OMNICRM_USER": "bob"})
    mine = listed(cli, user="alice")
    assert [(r["id"], r["display_name"], r["tags"]) for r in mine] == [(cid, "Alice's friend", ["secret"])]


def test_note_timeline_and_quiet(cli):
    cid = add(cli, "--name", "Ann", "--email", "ann@x.org")
    ok(cli("contacts", "note", "ann@x.org", "Lunch on Friday", env={"OMNICRM_NOW": "2026-03-01T12:00:00Z"}))
    ok(cli("contacts", "note", str(cid), "-", input="From stdin\nsecond line\n",
           env={"OMNICRM_NOW": "2026-03-02T12:00:00Z"}))
    entries = json.loads(ok(cli("contacts", "timeline", str(cid), "--format", "json")).stdout)
    assert [list(e) for e in entries][0] == ["id", "kind", "direction", "occurred_at", "subject", "source",
                                             "external_id"]
    assert [(e["kind"], e["subject"], e["occurred_at"]) for e in entries] == [
        ("note", "From stdin", "2026-03-02T12:00:00+00:00"), ("note", "Lunch on Friday", "2026-03-01T12:00:00+00:00")]
    assert len(json.loads(ok(cli("contacts", "timeline", str(cid), "--limit", "1", "--format", "json")).stdout)) == 1
    assert "Lunch on Friday" in ok(cli("contacts", "timeline", str(cid))).stdout
    shown = json.loads(ok(cli("contacts", "show", str(cid), "--format", "json")).stdout)
    assert shown["last_interaction_at"] == "2026-03-02T12:00:00+00:00"
    quiet = ok(cli("--quiet", "contacts", "add", "--name", "Q"))
    assert quiet.stderr == "" and quiet.stdout.strip().isdigit()


def test_verbose_and_json_logs(cli):
    logged = ok(cli("--verbose", "--log-json", "init"))  # the first use in this test migrates and logs it
    entries = [json.loads(line) for line in logged.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("schema_version") and e["level"] == "debug" for e in entries), logged.stderr
    plain = cli("contacts", "show", "999")
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr
    verbose = cli("-v", "contacts", "show", "999")
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr  # --verbose may add one
