"""The installed `omnicrm` entry point in real processes: exit codes, streams, terminals, the shim."""

import json
import os
import pty
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

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


def _run_on_terminal(args: list[str], env: dict, stdout_too: bool) -> tuple[int, str, str]:
    """Run `omnicrm ARGS` with stderr (and, if `stdout_too`, stdout) on a pseudo-terminal; returns
    (exit code, what the terminal showed, stdout when it was a pipe)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("omnicrm")), *args], stdin=subprocess.DEVNULL,
                            stdout=slave if stdout_too else subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    shown = bytearray()

    def drain() -> None:  # the terminal must be read while the command runs, or its redraws block it
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, shown.decode(errors="replace"), (out or b"").decode()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_progress_bar_on_a_terminal_and_never_inside_a_streamed_plan(db_url, omnicrm_home, omnicrm_cmd, tmp_path):
    """A big import shows its bar on a terminal's stderr; a dry-run plan streamed to that same terminal
    would be torn up by the bar's redraws, so the bar stays off then (and on when the plan is piped)."""
    big = tmp_path / "big.csv"
    with big.open("w") as fh:
        fh.write("name,email\n")
        for i in range(25_000):  # over PROGRESS_MIN_BYTES
            fh.write(f"Person number {i:05d},person.number.{i:05d}@example.com\n")
    assert omnicrm_cmd("init").returncode == 0
    env = {**os.environ, "OMNICRM_DATABASE_URL": db_url, "OMNICRM_HOME": str(omnicrm_home), "TERM": "xterm",
           "COLUMNS": "100"}

    code, shown, out = _run_on_terminal(["contacts", "import", str(big), "--dry-run", "--format", "csv"], env,
                                        stdout_too=False)
    assert code == 0 and "importing" in shown and "would create 25000" in shown
    assert out.splitlines()[0].startswith("line,action") and len(out.splitlines()) == 25_001

    code, shown, _ = _run_on_terminal(["contacts", "import", str(big), "--dry-run", "--format", "csv"], env,
                                      stdout_too=True)
    lines = shown.replace("\r\n", "\n").splitlines()
    assert code == 0 and "importing" not in shown and "\x1b[" not in shown
    assert len([line for line in lines if line.split(",")[1:2] == ["create"]]) == 25_000
