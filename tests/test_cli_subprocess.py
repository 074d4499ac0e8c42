"""The installed `omnicrm` entry point in real processes: exit codes, streams, terminals, the shim."""

import json
import os
import pty
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_add_list_and_exit_codes(omnicrm_cmd, omnicrm_home):
    first = omnicrm_cmd("contacts", "add", "--name", "Zoë", "--email", "zoe@example.com", "--phone", "4155550101")
    assert first.returncode == 0, first.stderr
    listed = omnicrm_cmd("--format", "json", "contacts", "list", "--search", "ZOE")
    assert listed.returncode == 0
    assert [r["phone"] for r in json.loads(listed.stdout)] == [["+14155550101"]]
    assert listed.stderr == ""  # the footer belongs to the table view only

    bad = omnicrm_cmd("contacts", "list", "--page-size", "201")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "Error: --page-size: must be between 1 and 200 (got 201)"
    missing = omnicrm_cmd("--user", "bob", "contacts", "show", first.stdout.strip())
    assert missing.returncode == 1 and "Traceback" not in missing.stderr and "not found" in missing.stderr

    assert stat.S_IMODE(omnicrm_home.stat().st_mode) == 0o700

    refused = omnicrm_cmd("contacts", "delete", "--search", "zoe", input="y\n")  # a pipe is not a terminal
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = omnicrm_cmd("contacts", "delete", "--search", "zoe", "--yes")
    assert done.returncode == 0 and "deleted 1 contact(s)" in done.stderr


def test_bulk_delete_asks_on_a_terminal(db_url, omnicrm_home, omnicrm_cmd):
    assert omnicrm_cmd("contacts", "add", "--name", "A", "--tag", "tmp").returncode == 0
    exe = Path(sys.executable).with_name("omnicrm")
    env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home)}
    for answer, code in (("n\n", 1), ("y\n", 0)):
        master, slave = pty.openpty()
        proc = subprocess.Popen([str(exe), "contacts", "delete", "--tag", "tmp"], stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        os.close(slave)
        os.write(master, answer.encode())
        _, err = proc.communicate(timeout=60)
        os.close(master)
        assert proc.returncode == code, err
        assert "Delete 1 contact(s)?" in err
    assert json.loads(omnicrm_cmd("contacts", "list", "--format", "json").stdout) == []


def test_version_help_and_the_checkout_shim():
    version = subprocess.run([str(Path(sys.executable).with_name("omnicrm")), "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("omnicrm ")
    shim = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert shim.returncode == 0 and "contacts" in shim.stdout


def test_closed_pipe_is_quiet(omnicrm_cmd, db_url, omnicrm_home):
    for i in range(2):
        omnicrm_cmd("contacts", "add", "--name", f"P{i}")
    exe = Path(sys.executable).with_name("omnicrm")
    env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home)}
    run = subprocess.run(f"'{exe}' contacts list --format jsonl | head -n 1", shell=True, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and len(run.stdout.splitlines()) == 1
    assert "Traceback" not in run.stderr and "Error" not in run.stderr


def test_a_full_disk_under_stdout_is_one_clear_line(omnicrm_cmd, db_url, omnicrm_home):
    """`export > /dev/full`: exit 1 with the system's reason, not an "unexpected error"."""
    omnicrm_cmd("contacts", "add", "--name", "Ann", "--email", "ann@example.com")
    exe = Path(sys.executable).with_name("omnicrm")
    env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home)}
    run = subprocess.run(f"'{exe}' contacts export > /dev/full", shell=True, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.startswith("Error: No space left on device"), run.stderr
    assert "Traceback" not in run.stderr and "unexpected" not in run.stderr
