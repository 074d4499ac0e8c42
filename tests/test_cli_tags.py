"""`omnicrm tags list | rename` in-process on SQLite and PostgreSQL."""

import json


def test_tags_list_and_rename(cli):
    for name, tags in (("A", ["Old"]), ("B", ["old", "new"]), ("C", ["new"]), ("D", [])):
        args = [a for t in tags for a in ("--tag", t)]
        assert cli("contacts", "add", "--name", name, *args).exit_code == 0
    table = cli("tags", "list")
    assert table.exit_code == 0
    assert [line.split() for line in table.stdout.splitlines()[2:]] == [["new", "2"], ["old", "2"]]
    assert json.loads(cli("tags", "list", "--format", "json").stdout) == [{"tag": "new", "contacts": 2},
                                                                         {"tag": "old", "contacts": 2}]
    assert cli("tags", "list", "--format", "csv").stdout == "tag,contacts\nnew,2\nold,2\n"

    merged = cli("tags", "rename", "OLD", "New")  # onto an existing tag: merge
    assert merged.exit_code == 0 and "2 contact" in merged.stderr
    assert json.loads(cli("tags", "list", "--format", "json").stdout) == [{"tag": "new", "contacts": 3}]
    assert cli("tags", "rename", "new", "Customers 2026").exit_code == 0
    rows = json.loads(cli("contacts", "list", "--tag", "customers 2026", "--format", "json").stdout)
    assert sorted(r["display_name"] for r in rows) == ["A", "B", "C"]

    missing = cli("tags", "rename", "nope", "x")
    assert missing.exit_code == 1 and "tag 'nope' not found" in missing.stderr
    empty = cli("tags", "rename", "customers 2026", "  ")
    assert empty.exit_code == 2 and "NEW" in empty.stderr
    too_long = cli("tags", "rename", "customers 2026", "x" * 201)
    assert too_long.exit_code == 2 and "NEW" in too_long.stderr
    assert cli("--user", "bob", "tags", "list", "--format", "json").stdout.strip() == "[]"
