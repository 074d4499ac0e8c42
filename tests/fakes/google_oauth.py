"""A fake Google OAuth 2.0 server on 127.0.0.1, and helpers to point OmniCRM at it.

    with FakeOAuthServer(email="me@example.com") as oauth:
        secrets = oauth.write_client_secrets(tmp_path / "client.json")
        location = oauth.authorize(auth_url)       # act as the browser: returns the redirect target
        oauth.revoked = True                        # refresh grants now answer invalid_grant
        oauth.counts["token.refresh"]

Endpoints: GET /o/oauth2/auth (checks client, loopback redirect_uri, PKCE S256 challenge; redirects
with code + state, or error=access_denied when `deny` is set), POST /token (authorization_code:
client auth by HTTP Basic or form, one-time code, redirect_uri match, S256 verifier check;
refresh_token: client auth, answers invalid_grant when `revoked`; omits refresh_token in refresh
responses like Google unless `rotate_refresh_tokens`). `valid_access_tokens` is a live set the fake
Google API can use as its `valid_tokens`; `issued` holds every secret string handed out (for leak
checks). `connect_user(settings, user, oauth)` stores working credentials for a user directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

CLIENT_ID = "1234567890-fake.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-fake-client-secret-0123456789"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def unsigned_id_token(email: str, client_id: str = CLIENT_ID) -> str:
    header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps({"iss": "https://accounts.google.com", "aud": client_id, "email": email,
                                  "email_verified": True, "sub": "1000"}).encode())
    return f"{header}.{payload}.{_b64url(b'sig')}"


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


class FakeOAuthServer:
    def __init__(self, *, email: str | None = "me@example.com", client_id: str = CLIENT_ID,
                 client_secret: str = CLIENT_SECRET, expires_in: int = 3600, grant_scopes: list[str] | None = None,
                 id_token: bool = True) -> None:
        self.email = email
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.grant_scopes = grant_scopes  # None = grant what was asked
        self.id_token = id_token
        self.revoked = False
        self.deny = False
        self.rotate_refresh_tokens = False
        self.counts: Counter = Counter()
        self.issued: list[str] = []
        self.valid_access_tokens: set[str] = set()
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> scope
        self.codes: dict[str, dict] = {}
        self.last_token_request: dict = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "FakeOAuthServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> "FakeOAuthServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def auth_uri(self) -> str:
        return self.url + "/o/oauth2/auth"

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    # --- helpers for tests ----------------------------------------------------------------------
    def client_config(self, kind: str = "installed") -> dict:
        return {kind: {"client_id": self.client_id, "project_id": "omnicrm-test",
                       "auth_uri": self.auth_uri, "token_uri": self.token_uri,
                       "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
                       "client_secret": self.client_secret, "redirect_uris": ["http://localhost"]}}

    def write_client_secrets(self, path: Path, kind: str = "installed") -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.client_config(kind)))
        return path

    def authorize(self, auth_url: str, follow: bool = False) -> str:
        """Act as the browser: GET the authorization URL; return the redirect target (Location).

        With `follow`, also GET the redirect target (the loopback server of `google connect`).
        """
        import requests

        response = requests.get(auth_url, allow_redirects=False, timeout=10)
        assert response.status_code == 302, (response.status_code, response.text)
        location = response.headers["Location"]
        if follow:
            requests.get(location, timeout=10)
        return location

    def issue_tokens(self, scopes: list[str]) -> dict:
        """Mint an access + refresh token pair directly (what a finished consent would give)."""
        with self._lock:
            return self._mint(" ".join(scopes), refresh=True)

    def revoke(self) -> None:
        self.revoked = True
        self.valid_access_tokens.clear()

    # --- internals ------------------------------------------------------------------------------
    def _mint(self, scope: str, refresh: bool) -> dict:
        access = "ya29.fake-" + secrets.token_urlsafe(24)
        body = {"access_token": access, "expires_in": self.expires_in, "token_type": "Bearer", "scope": scope}
        self.issued.append(access)
        self.valid_access_tokens.add(access)
        if refresh:
            token = "1//fake-refresh-" + secrets.token_urlsafe(24)
            self.refresh_tokens[token] = scope
            self.issued.append(token)
            body["refresh_token"] = token
        if self.id_token and self.email:
            body["id_token"] = unsigned_id_token(self.email, self.client_id)
        return body

    def _client_auth(self, headers, form: dict) -> bool:
        header = headers.get("Authorization", "")
        if header.startswith("Basic "):
            raw = base64.b64decode(header[6:]).decode()
            client_id, _, secret = raw.partition(":")
        else:
            client_id, secret = form.get("client_id"), form.get("client_secret")
        return client_id == self.client_id and secret == self.client_secret

    def handle_authorize(self, query: dict) -> tuple[int, dict, dict]:
        self.counts["authorize"] += 1
        redirect_uri = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id:
            return 400, {"error": "invalid_client"}, {}
        if not redirect_uri.startswith("http://") or not _loopback(redirect_uri):
            return 400, {"error": "redirect_uri_mismatch"}, {}
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256" \
                or not query.get("code_challenge"):
            return 400, {"error": "invalid_request", "error_description": "PKCE S256 required"}, {}
        state = query.get("state", "")
        if self.deny:
            return 302, {}, {"Location": f"{redirect_uri}?{urlencode({'error': 'access_denied', 'state': state})}"}
        scope = " ".join(self.grant_scopes) if self.grant_scopes is not None else query.get("scope", "")
        code = "4/fake-code-" + secrets.token_urlsafe(16)
        self.issued.append(code)
        with self._lock:
            self.codes[code] = {"redirect_uri": redirect_uri, "challenge": query["code_challenge"], "scope": scope}
        params = urlencode({"state": state, "code": code, "scope": scope})
        return 302, {}, {"Location": f"{redirect_uri}?{params}"}

    def handle_token(self, headers, form: dict) -> tuple[int, dict]:
        self.last_token_request = {"grant_type": form.get("grant_type"), "fields": sorted(form),
                                   "basic_auth": headers.get("Authorization", "").startswith("Basic ")}
        grant = form.get("grant_type")
        if not self._client_auth(headers, form):
            self.counts["token.invalid_client"] += 1
            return 401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
        with self._lock:
            if grant == "authorization_code":
                self.counts["token.code"] += 1
                issued = self.codes.pop(form.get("code", ""), None)
                if issued is None:
                    return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}
                if form.get("redirect_uri") != issued["redirect_uri"]:
                    return 400, {"error": "redirect_uri_mismatch", "error_description": "Bad Request"}
                if s256(form.get("code_verifier", "")) != issued["challenge"]:
                    self.counts["token.bad_verifier"] += 1
                    return 400, {"error": "invalid_grant", "error_description": "Invalid code verifier."}
                return 200, self._mint(issued["scope"], refresh=True)
            if grant == "refresh_token":
                self.counts["token.refresh"] += 1
                token = form.get("refresh_token", "")
                if self.revoked or token not in self.refresh_tokens:
                    self.counts["token.invalid_grant"] += 1
                    return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
                scope = self.refresh_tokens[token]
                body = self._mint(scope, refresh=self.rotate_refresh_tokens)
                if self.rotate_refresh_tokens:
                    del self.refresh_tokens[token]
                return 200, body
        return 400, {"error": "unsupported_grant_type"}


def _handler(fake: FakeOAuthServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if parts.path != "/o/oauth2/auth":
                return self._json(404, {"error": "not_found"})
            status, body, headers = fake.handle_authorize(dict(parse_qsl(parts.query)))
            if status == 302:
                self.send_response(302)
                self.send_header("Location", headers["Location"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._json(status, body)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(parse_qsl(self.rfile.read(length).decode()))
            if urlsplit(self.path).path != "/token":
                return self._json(404, {"error": "not_found"})
            status, body = fake.handle_token(self.headers, form)
            self._json(status, body)

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args) -> None:  # noqa: A002
            return

    return Handler


def connect_user(settings, user_name: str, oauth_server: FakeOAuthServer, *, account_email: str | None = None,
                 scopes: list[str] | None = None, expired: bool = False):
    """Store working credentials for `user_name` (as if `google connect` had run); returns them.

    With `expired`, the stored access token is already past its expiry, so the next
    `load_credentials` refreshes it against the fake.
    """
    from google.oauth2.credentials import Credentials

    from omnicrm.config import now
    from omnicrm.db import session_scope, user_id
    from omnicrm.google import auth

    scopes = list(scopes or auth.SCOPES)
    body = oauth_server.issue_tokens(scopes)
    delta = timedelta(seconds=-60 if expired else body["expires_in"])
    expiry = (now() + delta).astimezone(timezone.utc)
    credentials = Credentials(token=body["access_token"], refresh_token=body["refresh_token"],
                              token_uri=oauth_server.token_uri, client_id=oauth_server.client_id,
                              client_secret=oauth_server.client_secret, scopes=scopes, granted_scopes=scopes,
                              expiry=(expiry - (now() - datetime.now(timezone.utc))).replace(tzinfo=None))
    with session_scope(settings) as session:
        uid = user_id(session, user_name)
        auth.store_credentials(session, settings, uid, credentials,
                               account_email if account_email is not None else oauth_server.email)
        session.commit()
    return credentials
