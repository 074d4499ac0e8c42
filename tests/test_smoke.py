import json


def test_add_list_show_roundtrip(cli):
    assert cli("contacts", "add", "--name", "Zoë Adams", "--email", "Zoe@Example.com").exit_code == 0
    listed = cli("contacts", "list", "--search", "zoe", "--format", "json")
    assert listed.exit_code == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["email"] for r in rows] == [["zoe@example.com"]]


def test_subprocess_entry_point(omnicrm_cmd):
    result = omnicrm_cmd("contacts", "add", "--name", "Ann")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
