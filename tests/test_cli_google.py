"""`omnicrm google …` end to end: real subprocesses, a fake OAuth server on 127.0.0.1, the test as the browser."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fakes.google_oauth import FakeOAuthServer, connect_user

EXE = str(Path(sys.executable).with_name("omnicrm"))


@pytest.fixture
def oauth():
    with FakeOAuthServer(email="me@example.com") as server:
        yield server


class Connect:
    """A running `omnicrm google connect`; a thread collects stderr so the test can wait for the URL."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.proc = subprocess.Popen([EXE, *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def url(self, timeout: float = 30) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise AssertionError("no authorization URL on stderr: " + "".join(self.stderr_lines))
            if line.strip().startswith("http://"):
                return line.strip()

    def finish(self, stdin: str | None = None, timeout: float = 30) -> tuple[int, str, str]:
        if stdin is not None:
            self.proc.stdin.write(stdin)
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout=timeout)
        while self.lines.get(timeout=timeout) is not None:
            pass
        return code, out, "".join(self.stderr_lines)


@pytest.fixture
def connect_proc(omnicrm_home, monkeypatch):
    """Start `omnicrm … google connect …` (SQLite unless the test sets OMNICRM_DATABASE_URL)."""
    started: list[Connect] = []

    def start(*args: str, env: dict | None = None) -> Connect:
        full_env = {**os.environ, "OMNICRM_HOME": str(omnicrm_home), **(env or {})}
        started.append(Connect(list(args), full_env))
        return started[-1]

    yield start
    for item in started:
        if item.proc.poll() is None:
            item.proc.kill()
            item.proc.wait()


def _leaks(oauth: FakeOAuthServer, *texts: str | bytes) -> list[str]:
    secrets = oauth.issued + [oauth.client_secret]
    found = []
    for secret in secrets:
        for blob in texts:
            if (secret.encode() if isinstance(blob, bytes) else secret) in blob:
                found.append(secret)
    return found


def _db_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in home.glob("omnicrm.db*"))


def test_connect_no_browser_end_to_end(connect_proc, omnicrm_cmd, db_url, oauth, tmp_path, omnicrm_home):
    secrets_file = oauth.write_client_secrets(tmp_path / "client_secret.json")
    proc = connect_proc("--verbose", "--log-json", "google", "connect", "--client-secrets", str(secrets_file),
                        "--no-browser", env={"OMNICRM_DATABASE_URL": db_url})
    url = proc.url()
    assert "code_challenge_method=S256" in url and "access_type=offline" in url
    location = oauth.authorize(url, follow=True)  # the test is the browser
    assert location.startswith("http://127.0.0.1:")
    code, out, err = proc.finish()
    assert code == 0, err
    assert "ssh -L" in err and "connected me@example.com" in err
    assert oauth.counts["token.code"] == 1 and oauth.counts["token.bad_verifier"] == 0
    for line in err.splitlines():  # --log-json lines are JSON
        if line.startswith("{"):
            json.loads(line)

    status = omnicrm_cmd("--verbose", "--log-json", "google", "status", "--check", "--format", "json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["account"] == "me@example.com" and info["status"] == "connected"
    assert info["scopes"] and info["missing_scopes"] == [] and info["last_refresh_at"]
    assert oauth.counts["token.refresh"] == 1
    assert not _leaks(oauth, out, err, status.stdout, status.stderr)
    if (omnicrm_home / "omnicrm.db").exists():  # the SQLite run: raw file bytes, WAL included
        assert not _leaks(oauth, _db_bytes(omnicrm_home))
    assert (os.stat(omnicrm_home / "secret.key").st_mode & 0o777) == 0o600


def test_connect_paste_flow(connect_proc, omnicrm_cmd, db_url, oauth, tmp_path):
    secrets_file = oauth.write_client_secrets(tmp_path / "client_secret.json")
    proc = connect_proc("google", "connect", "--client-secrets", str(secrets_file), "--paste",
                        env={"OMNICRM_DATABASE_URL": db_url})
    url = proc.url()
    location = oauth.authorize(url)  # the browser lands on an unreachable loopback page; the user copies it
    code, out, err = proc.finish(stdin=location + "\n")
    assert code == 0, err
    assert "paste it here" in err and oauth.counts["token.code"] == 1
    assert not _leaks(oauth, out, err)
    table = omnicrm_cmd("google", "status")
    assert table.returncode == 0 and "me@example.com" in table.stdout and "connected" in table.stdout


def test_connect_default_mode_opens_the_browser(connect_proc, oauth, tmp_path):
    # webbrowser honours $BROWSER: a script that forks and plays the browser, like a real one would.
    browser = tmp_path / "browser.py"
    browser.write_text(textwrap.dedent(f"""\
        import os, sys
        if os.fork():
            sys.exit(0)
        import requests
        r = requests.get(sys.argv[1], allow_redirects=True, timeout=10)
    """))
    secrets_file = oauth.write_client_secrets(tmp_path / "client_secret.json")
    proc = connect_proc("google", "connect", "--client-secrets", str(secrets_file),
                        env={"BROWSER": f"{sys.executable} {browser} %s", "DISPLAY": ""})
    code, out, err = proc.finish()
    assert code == 0, err
    assert "Opened a browser" in err and oauth.counts["token.code"] == 1


def test_connect_times_out_with_clear_error(connect_proc, oauth, tmp_path):
    secrets_file = oauth.write_client_secrets(tmp_path / "client_secret.json")
    proc = connect_proc("google", "connect", "--client-secrets", str(secrets_file), "--no-browser",
                        env={"OMNICRM_OAUTH_TIMEOUT": "0.5"})
    code, out, err = proc.finish()
    assert code == 1
    assert "timed out after 0.5 s" in err and "Traceback" not in err


def test_revoked_grant_exits_3_and_status_says_reconnect(cli, settings, oauth):
    connect_user(settings, "default", oauth)
    oauth.revoke()
    check = cli("--verbose", "google", "status", "--check")
    assert check.exit_code == 3, check.stderr
    assert "run `omnicrm google connect`" in check.stderr
    assert "reconnect needed" in check.stdout
    status = cli("google", "status", "--format", "json")
    assert status.exit_code == 3 and json.loads(status.stdout)["status"] == "reconnect_needed"
    assert not _leaks(oauth, check.stdout, check.stderr, status.stdout, status.stderr)
    assert not _leaks(oauth, str(check), str(status))


def test_status_and_disconnect(cli, settings, oauth):
    none = cli("google", "status", "--format", "json")
    assert none.exit_code == 3 and json.loads(none.stdout)["connected"] is False
    assert "omnicrm google connect" in none.stderr
    connect_user(settings, "default", oauth)
    assert cli("google", "status").exit_code == 0
    assert cli("--user", "bob", "google", "status").exit_code == 3  # per user
    gone = cli("google", "disconnect")
    assert gone.exit_code == 0 and "removed" in gone.stderr
    assert cli("google", "status").exit_code == 3
    again = cli("google", "disconnect")
    assert again.exit_code == 0 and "no stored Google credentials" in again.stderr


def test_wrong_key_is_a_clear_error(cli, settings, oauth):
    from cryptography.fernet import Fernet

    connect_user(settings, "default", oauth)
    run = cli("google", "status", "--check", env={"OMNICRM_SECRET_KEY": Fernet.generate_key().decode()})
    assert run.exit_code == 1
    assert "cannot decrypt the stored Google credentials with OMNICRM_SECRET_KEY" in run.stderr
    assert "Traceback" not in run.stderr
    bad = cli("google", "status", "--check", env={"OMNICRM_SECRET_KEY": "not-a-key"})
    assert bad.exit_code == 1 and "OMNICRM_SECRET_KEY is not a valid key" in bad.stderr
    assert cli("google", "status").exit_code == 0  # the plaintext summary needs no key


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{oops", "not valid JSON"),
    ('{"type": "service_account", "private_key": "x"}', "service-account key"),
    ('{"installed": {"client_id": "a"}}', "missing field(s) installed.client_secret, installed.auth_uri"),
])
def test_bad_client_secrets_exit_2(cli, tmp_path, content, message):
    path = tmp_path / "client.json"
    if content is not None:
        path.write_text(content)
    run = cli("google", "connect", "--client-secrets", str(path), "--no-browser")
    assert run.exit_code == 2 and message in run.stderr


def test_no_browser_and_paste_conflict(cli, oauth, tmp_path):
    run = cli("google", "connect", "--client-secrets", str(oauth.write_client_secrets(tmp_path / "c.json")),
              "--no-browser", "--paste")
    assert run.exit_code == 2 and "choose one" in run.stderr


@pytest.mark.parametrize("command", [["google"], ["google", "connect"], ["google", "status"],
                                     ["google", "disconnect"]])
def test_google_commands_have_help(command):
    from typer.testing import CliRunner

    from omnicrm.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and len(result.stdout.split("\n\n")[1].strip()) > 10
