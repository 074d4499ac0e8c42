"""OAuth services against a fake Google OAuth server on 127.0.0.1: flow, storage, refresh, revocation."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from fakes.google_oauth import FakeOAuthServer, connect_user
from omnicrm.errors import AuthorizationNeeded, InvalidInput, OmniCrmError, ServiceUnavailable
from omnicrm.google import auth
from omnicrm.models import Credential
from omnicrm.secrets import SecretKeyError, decrypt_json, encrypt_json, key_path


@pytest.fixture
def oauth():
    with FakeOAuthServer(email="me@example.com") as server:
        yield server


@pytest.fixture
def home_settings():
    """Settings for tests that need OMNICRM_HOME but no database."""
    from omnicrm.config import load_settings

    return load_settings()


def _uid(session, name="default"):
    from omnicrm.db import user_id

    uid = user_id(session, name)
    session.commit()
    return uid


# --- client secrets ----------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not valid JSON (line 1"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"type": "service_account", "private_key": "-----BEGIN", "client_email": "x@y"}),
     "service-account key"),
    (json.dumps({"other": {}}), "no 'installed' or 'web' section"),
    (json.dumps({"installed": "x"}), "'installed' must be a JSON object"),
    (json.dumps({"installed": {"client_id": "a", "auth_uri": "https://a/auth", "token_uri": "https://a/t"}}),
     "missing field(s) installed.client_secret"),
    (json.dumps({"web": {"client_secret": "s"}}),
     "missing field(s) web.client_id, web.auth_uri, web.token_uri"),
    (json.dumps({"installed": {"client_id": "a", "client_secret": "shh-secret", "auth_uri": "https://a/auth",
                               "token_uri": "http://evil.example.com/token"}}),
     "plain http is accepted only for loopback hosts"),
    (json.dumps({"installed": {"client_id": "a", "client_secret": "shh-secret", "auth_uri": "ftp://a/auth",
                               "token_uri": "https://a/token"}}), "not an https URL"),
])
def test_bad_client_secrets_are_clear_input_errors(tmp_path, content, message):
    path = tmp_path / "client.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidInput) as err:
        auth.load_client_secrets(path)
    assert message in str(err.value)
    assert "shh-secret" not in str(err.value)


def test_client_secrets_accepts_installed_web_and_loopback_http(tmp_path, oauth):
    installed = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "i.json"))
    assert (installed.kind, installed.token_uri) == ("installed", oauth.token_uri)
    assert oauth.client_secret not in repr(installed)
    web = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "w.json", kind="web"))
    assert web.kind == "web"
    https = auth.parse_client_secrets({"installed": {"client_id": "a", "client_secret": "b",
                                                     "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                                                     "token_uri": "https://oauth2.googleapis.com/token"}})
    assert https.token_uri == "https://oauth2.googleapis.com/token"


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("10.0.0.1", False), ("example.com", False), ("localhost.example.com", False),
    ("128.0.0.1", False), ("", False), (None, False),
])
def test_is_loopback_host(host, loopback):
    assert auth.is_loopback_host(host) is loopback


def test_insecure_transport_only_around_loopback_calls(monkeypatch):
    monkeypatch.delenv("OAUTHLIB_INSECURE_TRANSPORT", raising=False)
    with auth.oauthlib_transport("http://127.0.0.1:9/token"):
        assert os.environ.get("OAUTHLIB_INSECURE_TRANSPORT") == "1"
    assert "OAUTHLIB_INSECURE_TRANSPORT" not in os.environ
    with auth.oauthlib_transport("https://oauth2.googleapis.com/token"):
        assert "OAUTHLIB_INSECURE_TRANSPORT" not in os.environ
    with pytest.raises(InvalidInput):
        with auth.oauthlib_transport("http://oauth2.example.com/token"):
            pass
    assert "OAUTHLIB_INSECURE_TRANSPORT" not in os.environ


# --- the flow (in-process; the CLI tests run it in a real subprocess) -----------------------------

def _browser_on_notify(oauth, lines, follow=True):
    """A notify callback that plays the user's browser as soon as the URL is shown."""
    def notify(message: str) -> None:
        lines.append(message)
        if message.strip().startswith("http://"):
            threading.Thread(target=oauth.authorize, args=(message.strip(),), kwargs={"follow": follow},
                             daemon=True).start()
    return notify


def test_flow_no_browser_uses_pkce_and_restores_env(oauth, tmp_path):
    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    lines: list[str] = []
    grant = auth.run_flow(client, mode="no-browser", timeout=20, notify=_browser_on_notify(oauth, lines))
    assert oauth.counts["token.code"] == 1 and oauth.counts["token.bad_verifier"] == 0
    assert oauth.last_token_request["basic_auth"] and "code_verifier" in oauth.last_token_request["fields"]
    assert grant.account_email == "me@example.com"
    assert grant.credentials.token_uri == oauth.token_uri
    assert grant.credentials.refresh_token in oauth.refresh_tokens
    assert grant.missing_scopes == []
    text_out = "\n".join(lines)
    assert "ssh -L" in text_out and "code_challenge_method=S256" in text_out
    assert "OAUTHLIB_INSECURE_TRANSPORT" not in os.environ
    assert not any(secret in text_out for secret in oauth.issued + [oauth.client_secret])


def test_flow_browser_mode_opens_browser(oauth, tmp_path):
    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    opened: list[str] = []

    def browser(url: str) -> bool:
        opened.append(url)
        threading.Thread(target=oauth.authorize, args=(url,), kwargs={"follow": True}, daemon=True).start()
        return True

    lines: list[str] = []
    grant = auth.run_flow(client, mode="browser", timeout=20, notify=lines.append, open_browser=browser)
    assert len(opened) == 1 and grant.credentials.token
    assert not any("ssh -L" in line for line in lines)


def test_flow_granular_consent_reports_missing_scopes(oauth, tmp_path):
    oauth.grant_scopes = auth.SCOPES[:2]
    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    grant = auth.run_flow(client, mode="no-browser", timeout=20, notify=_browser_on_notify(oauth, []))
    assert grant.missing_scopes == auth.SCOPES[2:]


def test_flow_denied_consent(oauth, tmp_path):
    oauth.deny = True
    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    with pytest.raises(OmniCrmError, match="not granted \\(access_denied\\)"):
        auth.run_flow(client, mode="no-browser", timeout=20, notify=_browser_on_notify(oauth, []))
    assert oauth.counts["token.code"] == 0


def test_flow_times_out_with_clear_error(oauth, tmp_path):
    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    with pytest.raises(OmniCrmError, match="timed out after 0.3 s"):
        auth.run_flow(client, mode="no-browser", timeout=0.3, notify=lambda m: None)


def test_flow_rejects_wrong_client_secret_without_leaking_it(oauth, tmp_path):
    config = oauth.client_config()
    config["installed"]["client_secret"] = "GOCSPX-wrong-secret-abcdef"
    client = auth.parse_client_secrets(config)
    with pytest.raises(OmniCrmError) as err:
        auth.run_flow(client, mode="no-browser", timeout=20, notify=_browser_on_notify(oauth, []))
    assert "invalid_client" in str(err.value) and "GOCSPX" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_busy_port_is_an_input_error(oauth, tmp_path):
    import socket

    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InvalidInput, match=f"--port {port}: cannot listen"):
            auth.run_flow(client, mode="no-browser", port=port, timeout=5, notify=lambda m: None)


def test_paste_mode_checks_the_pasted_address(oauth, tmp_path):
    import io

    client = auth.load_client_secrets(oauth.write_client_secrets(tmp_path / "c.json"))
    with pytest.raises(InvalidInput, match="must start with http://127.0.0.1:"):
        auth.run_flow(client, mode="paste", timeout=5, notify=lambda m: None,
                      stdin=io.StringIO("https://evil.example.com/?code=x&state=y\n"))
    with pytest.raises(InvalidInput, match="no address was pasted"):
        auth.run_flow(client, mode="paste", timeout=5, notify=lambda m: None, stdin=io.StringIO(""))
    port = auth._free_port()
    with pytest.raises(OmniCrmError, match="state mismatch"):
        auth.run_flow(client, mode="paste", port=port, timeout=5, notify=lambda m: None,
                      stdin=io.StringIO(f"http://127.0.0.1:{port}/?code=4/abc&state=forged\n"))


def test_email_from_id_token():
    from fakes.google_oauth import unsigned_id_token

    assert auth.email_from_id_token(unsigned_id_token("ann@example.org")) == "ann@example.org"
    assert auth.email_from_id_token("garbage") is None
    assert auth.email_from_id_token(None) is None


# --- storage, refresh, revocation ---------------------------------------------------------------

def test_store_and_load_keeps_the_client_token_uri(settings, session, oauth):
    stored = connect_user(settings, "default", oauth)
    credentials = auth.load_credentials(session, settings, _uid(session))
    assert credentials.token == stored.token
    assert credentials.token_uri == oauth.token_uri  # not Google's default endpoint
    assert credentials.refresh_token == stored.refresh_token
    assert credentials.client_secret == oauth.client_secret
    assert oauth.counts["token.refresh"] == 0


def test_expired_token_is_refreshed_and_saved_at_once(settings, session, oauth):
    from omnicrm.db import session_scope

    old = connect_user(settings, "default", oauth, expired=True)
    uid = _uid(session)
    fresh = auth.load_credentials(session, settings, uid)
    assert oauth.counts["token.refresh"] == 1
    assert fresh.token != old.token and fresh.token in oauth.valid_access_tokens
    assert fresh.refresh_token == old.refresh_token  # the refresh response omitted it
    with session_scope(settings) as other:
        again = auth.load_credentials(other, settings, uid)
        row = other.scalar(select(Credential).where(Credential.user_id == uid))
    assert again.token == fresh.token and oauth.counts["token.refresh"] == 1
    assert row.last_refresh_at is not None and row.token_expiry > datetime.now(timezone.utc)


def test_refresh_follows_omnicrm_now(settings, session, oauth, monkeypatch):
    connect_user(settings, "default", oauth)
    uid = _uid(session)
    auth.load_credentials(session, settings, uid)
    assert oauth.counts["token.refresh"] == 0
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    monkeypatch.setenv("OMNICRM_NOW", later.isoformat())
    auth.load_credentials(session, settings, uid)
    assert oauth.counts["token.refresh"] == 1
    status = auth.connection_status(session, uid)
    assert status["access_token_expired"] is False and status["last_refresh_at"] == later.isoformat()


def test_rotated_refresh_token_is_saved(settings, session, oauth):
    old = connect_user(settings, "default", oauth, expired=True)
    oauth.rotate_refresh_tokens = True
    uid = _uid(session)
    fresh = auth.load_credentials(session, settings, uid, force_refresh=True)
    assert fresh.refresh_token != old.refresh_token
    assert decrypt_json(settings, session.scalar(select(Credential.secret)))["refresh_token"] == fresh.refresh_token


def test_save_refreshed_keeps_old_refresh_token(settings, session, oauth):
    from google.oauth2.credentials import Credentials

    old = connect_user(settings, "default", oauth)
    uid = _uid(session)
    refreshed = Credentials(token="ya29.new-one", refresh_token=None, token_uri=oauth.token_uri,
                            client_id=oauth.client_id, client_secret=oauth.client_secret,
                            expiry=datetime.utcnow() + timedelta(hours=1))
    auth.save_refreshed(session, settings, uid, refreshed)
    session.commit()
    loaded = auth.load_credentials(session, settings, uid)
    assert (loaded.token, loaded.refresh_token) == ("ya29.new-one", old.refresh_token)


def test_revoked_grant_needs_reconnect(settings, session, oauth):
    connect_user(settings, "default", oauth, expired=True)
    oauth.revoke()
    uid = _uid(session)
    with pytest.raises(AuthorizationNeeded, match="run `omnicrm google connect`") as err:
        auth.load_credentials(session, settings, uid)
    assert err.value.exit_code == 3
    assert auth.connection_status(session, uid)["status"] == auth.STATUS_RECONNECT
    with pytest.raises(AuthorizationNeeded):
        auth.load_credentials(session, settings, uid)
    assert oauth.counts["token.refresh"] == 1  # marked: no further calls to the token endpoint
    session.commit()
    connect_user(settings, "default", oauth)  # reconnecting clears the mark
    assert auth.connection_status(session, uid)["status"] == "connected"


def test_not_connected_and_per_user_isolation(settings, session, oauth):
    connect_user(settings, "alice", oauth)
    bob = _uid(session, "bob")
    with pytest.raises(AuthorizationNeeded, match="not connected"):
        auth.load_credentials(session, settings, bob)
    assert auth.connection_status(session, bob) is None
    assert auth.disconnect(session, bob) is False
    alice = _uid(session, "alice")
    assert auth.disconnect(session, alice) is True
    session.commit()
    assert auth.connection_status(session, alice) is None


def test_unreachable_token_endpoint_is_service_unavailable(settings, session, oauth):
    connect_user(settings, "default", oauth, expired=True)
    oauth.stop()
    with pytest.raises(ServiceUnavailable, match="could not reach the token endpoint 127.0.0.1"):
        auth.load_credentials(session, settings, _uid(session))


def test_status_warns_about_testing_consent_screens(settings, session, oauth):
    connect_user(settings, "default", oauth)
    uid = _uid(session)
    now = datetime.now(timezone.utc)
    assert auth.connection_status(session, uid, now=now)["warnings"] == []
    old = auth.connection_status(session, uid, now=now + timedelta(days=6, hours=1))
    assert any('"Testing"' in w and "7 days" in w for w in old["warnings"])
    assert old["refresh_token_age_days"] == pytest.approx(6.04, abs=0.05)


# --- encryption at rest ------------------------------------------------------------------------

def test_tokens_are_encrypted_at_rest(settings, session, oauth, omnicrm_home):
    connect_user(settings, "default", oauth, expired=True)
    auth.load_credentials(session, settings, _uid(session))  # a refresh writes new tokens too
    secrets = oauth.issued + [oauth.client_secret]
    raw = session.execute(text("SELECT secret, account_email, scopes FROM credentials")).one()
    assert not any(secret in "|".join(map(str, raw)) for secret in secrets)
    assert raw.account_email == "me@example.com"
    if settings.is_sqlite:
        from omnicrm.db import dispose_engines

        session.close()
        dispose_engines()
        blob = b"".join(p.read_bytes() for p in omnicrm_home.glob("omnicrm.db*"))
        assert b"me@example.com" in blob  # the file holds the row...
        assert not any(secret.encode() in blob for secret in secrets)  # ...but no secret in clear


def test_key_file_is_created_private_on_first_use(home_settings):
    path = key_path(home_settings)
    assert not path.exists()
    token = encrypt_json(home_settings, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert decrypt_json(home_settings, token) == {"a": 1}
    os.chmod(path, 0o644)
    assert decrypt_json(home_settings, token) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened


def test_wrong_or_missing_key_is_a_clear_error(home_settings):
    from cryptography.fernet import Fernet

    token = encrypt_json(home_settings, {"refresh_token": "1//very-secret"})
    other = Fernet.generate_key().decode()
    with pytest.raises(SecretKeyError, match="not the key they were encrypted with") as err:
        decrypt_json(home_settings.with_(secret_key=other), token)
    assert other not in str(err.value) and "very-secret" not in str(err.value)
    with pytest.raises(SecretKeyError, match="OMNICRM_SECRET_KEY is not a valid key"):
        decrypt_json(home_settings.with_(secret_key="hunter2"), token)
    key_path(home_settings).unlink()
    with pytest.raises(SecretKeyError, match="no encryption key"):
        decrypt_json(home_settings, token)


def test_env_key_is_used_instead_of_a_file(home_settings):
    from cryptography.fernet import Fernet

    keyed = home_settings.with_(secret_key=Fernet.generate_key().decode())
    assert decrypt_json(keyed, encrypt_json(keyed, {"x": "y"})) == {"x": "y"}
    assert not key_path(home_settings).exists()
