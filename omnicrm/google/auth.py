"""Google OAuth for a command-line tool: client secrets, the installed-app flow, and stored grants.

The flow is google-auth-oauthlib's `Flow` (PKCE S256, `access_type=offline`) with a loopback
redirect to 127.0.0.1: either a small one-shot server waits for the browser (`browser`,
`no-browser` modes), or the user pastes the redirected address (`paste` mode). Both end in
`flow.fetch_token(authorization_response=...)` on the same Flow object, so state and verifier match.

Grants live in the `credentials` table: tokens and the client config are Fernet-encrypted
(`omnicrm.secrets`); only non-secret metadata is plaintext. Plain-http OAuth endpoints are allowed
for loopback hosts only, and oauthlib's `OAUTHLIB_INSECURE_TRANSPORT` is set just around a call
to such an endpoint, then restored. No message or log line carries a token, code or client secret.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import os
import select
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TextIO
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import select as sql_select
from sqlalchemy.orm import Session

from omnicrm import config
from omnicrm.config import Settings
from omnicrm.errors import AuthorizationNeeded, InvalidInput, OmniCrmError, ServiceUnavailable
from omnicrm.models import Credential

if TYPE_CHECKING:  # pragma: no cover
    from google.oauth2.credentials import Credentials

log = logging.getLogger("omnicrm.google.auth")

SCOPES = [
    "https://www.googleapis.com/auth/gmail.metadata",
    "https://www.googleapis.com/auth/calendar.readonly",
    "https://www.googleapis.com/auth/contacts.readonly",
    "https://www.googleapis.com/auth/contacts.other.readonly",
]
SCOPE_PREFIX = "https://www.googleapis.com/auth/"
PROVIDER = "google"
STATUS_OK = "ok"
STATUS_RECONNECT = "reconnect_needed"
DEFAULT_FLOW_TIMEOUT_S = 300.0
TOKEN_HTTP_TIMEOUT_S = 30.0
REFRESH_MARGIN = timedelta(minutes=5)
TESTING_WARN_AGE = timedelta(days=6)
REVOKED_ERRORS = {"invalid_grant", "invalid_client", "unauthorized_client"}
MODES = ("browser", "no-browser", "paste")
REDIRECT_HOST = "127.0.0.1"


# --- client secrets ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientConfig:
    """An OAuth client from a downloaded client-secrets JSON (`installed` = Desktop app, or `web`)."""

    kind: str
    client_id: str
    client_secret: str = field(repr=False)
    auth_uri: str
    token_uri: str

    def flow_config(self) -> dict:
        return {self.kind: {"client_id": self.client_id, "client_secret": self.client_secret,
                            "auth_uri": self.auth_uri, "token_uri": self.token_uri}}


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and localhost."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, name: str) -> None:
    """An OAuth endpoint must be https, or plain http on a loopback host (tests, local proxies)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return
    if parts.scheme == "http":
        raise InvalidInput(f"{name}: plain http is accepted only for loopback hosts "
                           f"(127.0.0.1, ::1, localhost), not {parts.hostname!r}; use https")
    raise InvalidInput(f"{name}: not an https URL")


def load_client_secrets(path: Path | str) -> ClientConfig:
    """Read and validate the OAuth client JSON; every problem is an InvalidInput (exit 2)."""
    name = f"--client-secrets {path}"
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInput(f"{name}: no such file")
    if not path.is_file():
        raise InvalidInput(f"{name}: not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InvalidInput(f"{name}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{name}: not a JSON text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:  # the message names a position, never the content
        raise InvalidInput(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    return parse_client_secrets(data, name)


def parse_client_secrets(data: object, name: str = "client secrets") -> ClientConfig:
    download = ("download an OAuth client ID of type 'Desktop app' from Google Cloud console → "
                "APIs & Services → Credentials")
    if not isinstance(data, dict):
        raise InvalidInput(f"{name}: expected a JSON object with an 'installed' section; {download}")
    if data.get("type") == "service_account" or "private_key" in data:
        raise InvalidInput(f"{name}: this is a service-account key, not an OAuth client; {download}")
    kind = "installed" if "installed" in data else "web" if "web" in data else None
    if kind is None:
        raise InvalidInput(f"{name}: no 'installed' or 'web' section (not an OAuth client file); {download}")
    section = data[kind]
    if not isinstance(section, dict):
        raise InvalidInput(f"{name}: '{kind}' must be a JSON object")
    missing = [key for key in ("client_id", "client_secret", "auth_uri", "token_uri")
               if not isinstance(section.get(key), str) or not section[key].strip()]
    if missing:
        raise InvalidInput(f"{name}: missing field(s) {', '.join(f'{kind}.{key}' for key in missing)}")
    for key in ("auth_uri", "token_uri"):
        check_endpoint(section[key].strip(), f"{name}: {kind}.{key}")
    if kind == "web":
        log.warning("a 'web' OAuth client works only if http://%s is one of its authorized redirect URIs; "
                    "a 'Desktop app' client is the right kind for OmniCRM", REDIRECT_HOST)
    return ClientConfig(kind=kind, client_id=section["client_id"].strip(),
                        client_secret=section["client_secret"].strip(),
                        auth_uri=section["auth_uri"].strip(), token_uri=section["token_uri"].strip())


# --- safety helpers ----------------------------------------------------------------------------

_transport_lock = threading.RLock()


@contextmanager
def oauthlib_transport(url: str) -> Iterator[None]:
    """Let oauthlib talk plain http to `url` only if it is a loopback endpoint; restore the env after.

    oauthlib reads OAUTHLIB_INSECURE_TRANSPORT from the environment on every check, so it is set for
    the duration of one call to a loopback endpoint and never left behind. OAUTHLIB_RELAX_TOKEN_SCOPE
    lets a grant with fewer scopes than requested (granular consent) through: we check scopes ourselves.
    """
    insecure = urlsplit(url).scheme == "http"
    if insecure:
        check_endpoint(url, "OAuth endpoint")
    names = ["OAUTHLIB_RELAX_TOKEN_SCOPE"] + (["OAUTHLIB_INSECURE_TRANSPORT"] if insecure else [])
    with _transport_lock:
        saved = {name: os.environ.get(name) for name in names}
        try:
            for name in names:
                os.environ[name] = "1"
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class Redactor:
    """Scrubs known secret strings out of text that came from a library or a server."""

    def __init__(self, *secrets: str | None) -> None:
        self._secrets: set[str] = set()
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        self._secrets.update(s for s in secrets if s and len(s) >= 4)

    def __call__(self, text: object, limit: int = 200) -> str:
        out = str(text)
        for secret in sorted(self._secrets, key=len, reverse=True):
            out = out.replace(secret, "[redacted]")
        out = " ".join(out.split())
        return out if len(out) <= limit else out[:limit] + "…"


def _quiet_library_loggers() -> None:
    # requests-oauthlib logs request bodies and tokens at DEBUG: keep them out of any handler.
    for name in ("requests_oauthlib", "oauthlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --- the flow ----------------------------------------------------------------------------------

@dataclass
class Grant:
    """What a finished authorization returns (the CLI stores it with `store_credentials`)."""

    credentials: "Credentials"
    account_email: str | None
    granted_scopes: list[str]

    @property
    def missing_scopes(self) -> list[str]:
        return [scope for scope in SCOPES if scope not in self.granted_scopes]


def flow_timeout(option: float | None, settings: Settings) -> float:
    """--timeout, else OMNICRM_OAUTH_TIMEOUT, else 300 seconds."""
    if option is not None:
        value, name = option, "--timeout"
    else:
        raw = settings.env.get("OMNICRM_OAUTH_TIMEOUT")
        if not raw:
            return DEFAULT_FLOW_TIMEOUT_S
        name = "OMNICRM_OAUTH_TIMEOUT"
        try:
            value = float(raw)
        except ValueError:
            raise InvalidInput(f"{name}: {raw!r} is not a number of seconds") from None
    if not value > 0:
        raise InvalidInput(f"{name}: must be a positive number of seconds")
    return value


def run_flow(client: ClientConfig, *, mode: str = "browser", port: int = 0,
             timeout: float = DEFAULT_FLOW_TIMEOUT_S, notify: Callable[[str], None] = print,
             stdin: TextIO | None = None, open_browser: Callable[[str], bool] | None = None) -> Grant:
    """Run the installed-app authorization and exchange the code for tokens.

    `notify` shows instructions (the CLI prints them on stderr); `stdin` is read in `paste` mode.
    """
    from google_auth_oauthlib.flow import Flow

    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}")
    _quiet_library_loggers()
    redact = Redactor(client.client_secret)
    server = None
    if mode == "paste":
        port = port or _free_port()
    else:
        server = _RedirectServer.open(port)
        port = server.server_port
    try:
        redirect_uri = f"http://{REDIRECT_HOST}:{port}/"
        flow = Flow.from_client_config(client.flow_config(), scopes=SCOPES, redirect_uri=redirect_uri)
        with oauthlib_transport(client.auth_uri):
            auth_url, state = flow.authorization_url(prompt="consent", access_type="offline")
        redact.add(flow.code_verifier)
        deadline = time.monotonic() + timeout
        if mode == "paste":
            notify("Open this URL in a browser on any machine and approve access:")
            notify(f"  {auth_url}")
            notify(f"The browser then goes to {redirect_uri}?… and shows an error page (nothing listens there).")
            notify("Copy that full address from the browser's address bar and paste it here:")
            response_url = _read_pasted_url(stdin, deadline, timeout)
            _check_redirect_target(response_url, port)
        else:
            server.expected_state = state
            opened = False
            if mode == "browser":
                opener = open_browser or _open_browser
                opened = opener(auth_url)
            if opened:
                notify("Opened a browser to authorize OmniCRM; if nothing appeared, open this URL:")
            else:
                notify("Open this URL in a browser to authorize OmniCRM:")
            notify(f"  {auth_url}")
            if not opened:
                notify(f"If your browser runs on another machine, first run this there, then open the URL: "
                       f"ssh -L {port}:{REDIRECT_HOST}:{port} USER@THIS-HOST")
            notify(f"Waiting up to {timeout:g} s for the redirect to {redirect_uri} …")
            response_url = f"http://{REDIRECT_HOST}:{port}" + server.wait(deadline, timeout)
        return _exchange(flow, client, response_url, state, redact)
    finally:
        if server is not None:
            server.server_close()


def _open_browser(url: str) -> bool:
    import sys
    import webbrowser

    env = os.environ
    if sys.platform.startswith("linux") and not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")
                                                 or env.get("BROWSER")):
        return False  # an SSH session: no graphical browser (and no console browser taking the terminal)
    try:
        return bool(webbrowser.open(url, new=1, autoraise=True))
    except webbrowser.Error:
        return False


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((REDIRECT_HOST, 0))
        return sock.getsockname()[1]


def _timeout_error(timeout: float) -> OmniCrmError:
    return OmniCrmError(f"timed out after {timeout:g} s waiting for the browser's authorization "
                        "(raise --timeout / OMNICRM_OAUTH_TIMEOUT, or use --paste when the browser "
                        "cannot reach this machine)")


def _read_pasted_url(stdin: TextIO | None, deadline: float, timeout: float) -> str:
    import sys

    stream = stdin or sys.stdin
    try:
        fileno = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fileno = None
    if fileno is not None:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            ready, _, _ = select.select([fileno], [], [], remaining)
        except (OSError, ValueError):
            ready = [fileno]
        if not ready:
            raise _timeout_error(timeout)
    line = stream.readline()
    value = line.strip().strip("'\"<>")
    if not value:
        raise InvalidInput("--paste: no address was pasted (expected the full URL from the browser's "
                           "address bar)")
    return value


def _check_redirect_target(url: str, port: int) -> None:
    parts = urlsplit(url)
    try:
        url_port = parts.port
    except ValueError:
        url_port = None
    if parts.scheme not in ("http", "https") or not is_loopback_host(parts.hostname) or url_port != port:
        raise InvalidInput(f"--paste: the pasted text is not the redirected address; it must start with "
                           f"http://{REDIRECT_HOST}:{port}/")


def _exchange(flow, client: ClientConfig, response_url: str, state: str, redact: Redactor) -> Grant:
    """Check the redirect's parameters, then fetch the tokens with the same Flow (state + verifier)."""
    import requests
    from oauthlib.oauth2.rfc6749.errors import OAuth2Error

    params = dict(parse_qsl(urlsplit(response_url).query))
    redact.add(params.get("code"))
    if params.get("state") != state:
        raise OmniCrmError("the authorization response does not belong to this request (state mismatch); "
                           "run `omnicrm google connect` again")
    if "error" in params:
        raise OmniCrmError(f"authorization was not granted ({redact(params['error'], 60)})")
    if not params.get("code"):
        raise OmniCrmError("the authorization response has no code; run `omnicrm google connect` again")
    # The redirect is loopback by construction; oauthlib only accepts https URLs here.
    secure_response = "https" + response_url[len("http"):] if response_url.startswith("http:") else response_url
    host = urlsplit(client.token_uri).hostname
    try:
        with oauthlib_transport(client.token_uri):
            token = flow.fetch_token(authorization_response=secure_response, timeout=TOKEN_HTTP_TIMEOUT_S)
    except OAuth2Error as exc:
        detail = redact(exc.error or type(exc).__name__, 60)
        description = redact(exc.description or "", 160)
        raise OmniCrmError(f"the token endpoint {host} refused the authorization code ({detail}"
                           f"{': ' + description if description else ''})") from None
    except requests.RequestException as exc:
        raise ServiceUnavailable(f"could not reach the token endpoint {host} ({type(exc).__name__})") from None
    except (ValueError, KeyError, Warning) as exc:
        raise OmniCrmError(f"unusable token response from {host} ({redact(exc, 120)})") from None
    redact.add(token.get("access_token"), token.get("refresh_token"), token.get("id_token"))
    if not token.get("refresh_token"):
        raise OmniCrmError("Google returned no refresh token; remove OmniCRM's access at "
                           "https://myaccount.google.com/permissions and run `omnicrm google connect` again")
    credentials = flow.credentials
    granted = token.get("scope")
    if isinstance(granted, str):
        granted = granted.split()
    granted_scopes = list(granted) if granted else list(SCOPES)
    email = email_from_id_token(token.get("id_token"))
    log.info("authorization code exchanged at %s (account %s)", host, email or "unknown")
    return Grant(credentials=credentials, account_email=email, granted_scopes=granted_scopes)


def email_from_id_token(id_token: str | None) -> str | None:
    """The `email` claim of an OpenID id_token received directly from the token endpoint (over TLS)."""
    if not id_token or id_token.count(".") < 2:
        return None
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None
    email = claims.get("email") if isinstance(claims, dict) else None
    return email if isinstance(email, str) and "@" in email and len(email) <= 320 else None


class _RedirectServer:
    """A one-shot loopback HTTP server that waits for the browser's redirect (code + state)."""

    def __init__(self, httpd) -> None:
        self.httpd = httpd
        self.expected_state: str | None = None
        self.result: str | None = None
        httpd.owner = self

    @classmethod
    def open(cls, port: int) -> "_RedirectServer":
        from http.server import HTTPServer

        class Server(HTTPServer):
            allow_reuse_address = False

        try:
            httpd = Server((REDIRECT_HOST, port), _handler_class())
        except OSError as exc:
            raise InvalidInput(f"--port {port}: cannot listen on {REDIRECT_HOST}:{port} ({exc.strerror})") from None
        return cls(httpd)

    @property
    def server_port(self) -> int:
        return self.httpd.server_address[1]

    def wait(self, deadline: float, timeout: float) -> str:
        while self.result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout_error(timeout)
            self.httpd.timeout = remaining
            self.httpd.handle_request()
        return self.result

    def server_close(self) -> None:
        self.httpd.server_close()


@functools.lru_cache(maxsize=None)
def _handler_class():
    from http.server import BaseHTTPRequestHandler

    class RedirectHandler(BaseHTTPRequestHandler):
        timeout = 10  # a connection that sends nothing cannot hold the flow

        def do_GET(self) -> None:  # noqa: N802
            owner: _RedirectServer = self.server.owner
            params = dict(parse_qsl(urlsplit(self.path).query))
            if not ({"code", "error", "state"} & params.keys()):
                return self._reply(404, "Not found.")
            if params.get("state") != owner.expected_state:
                log.warning("ignored a request on the loopback port with a wrong state")
                return self._reply(400, "This response does not belong to the running `omnicrm google connect`.")
            owner.result = self.path
            if "error" in params:
                return self._reply(200, "OmniCRM was not authorized. You may close this window.")
            return self._reply(200, "OmniCRM is authorized. You may close this window and return to the terminal.")

        def _reply(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the request line holds the code
            return

    return RedirectHandler


# --- time: the stored clock is config.now() (OMNICRM_NOW-aware); google-auth uses the real clock ---

def _skew() -> timedelta:
    return config.now() - datetime.now(timezone.utc)


def _library_expiry(stored: datetime | None) -> datetime | None:
    """A stored aware expiry → the naive-UTC real-clock expiry google-auth expects."""
    if stored is None:
        return None
    return (stored - _skew()).astimezone(timezone.utc).replace(tzinfo=None)


def _stored_expiry(library: datetime | None) -> datetime | None:
    if library is None:
        return None
    aware = library if library.tzinfo else library.replace(tzinfo=timezone.utc)
    return aware + _skew()


# --- stored grants -----------------------------------------------------------------------------

def _row(session: Session, user_id: int) -> Credential | None:
    stmt = (sql_select(Credential)
            .where(Credential.user_id == user_id, Credential.provider == PROVIDER)
            .execution_options(populate_existing=True))
    return session.scalars(stmt).first()


def _secret_payload(credentials: "Credentials", refresh_token: str | None) -> dict:
    return {"token": credentials.token, "refresh_token": refresh_token, "token_uri": credentials.token_uri,
            "client_id": credentials.client_id, "client_secret": credentials.client_secret}


def _granted(credentials: "Credentials") -> list[str] | None:
    granted = getattr(credentials, "granted_scopes", None) or credentials.scopes
    if isinstance(granted, str):
        granted = granted.split()
    return list(granted) if granted else None


def store_credentials(session: Session, settings: Settings, user_id: int, credentials: "Credentials",
                      account_email: str | None) -> None:
    """Save a new grant for the user (replacing any previous one). The caller commits."""
    from omnicrm.secrets import encrypt_json

    if not credentials.refresh_token:
        raise OmniCrmError("the grant has no refresh token; run `omnicrm google connect` again")
    if not (credentials.token_uri and credentials.client_id and credentials.client_secret):
        raise OmniCrmError("the grant lacks its token endpoint or client; run `omnicrm google connect` again")
    check_endpoint(credentials.token_uri, "token_uri")
    secret = encrypt_json(settings, _secret_payload(credentials, credentials.refresh_token))
    row = _row(session, user_id)
    if row is None:
        row = Credential(user_id=user_id, provider=PROVIDER)
        session.add(row)
    row.account_email = account_email
    row.scopes = " ".join(_granted(credentials) or SCOPES)
    row.secret = secret
    row.token_expiry = _stored_expiry(credentials.expiry)
    row.created_at = config.now()
    row.last_refresh_at = None
    row.status = STATUS_OK
    session.flush()
    log.info("stored Google credentials for user id %s (account %s)", user_id, account_email or "unknown")


def save_refreshed(session: Session, settings: Settings, user_id: int, credentials: "Credentials") -> None:
    """Save credentials that were refreshed elsewhere (e.g. by an API client); keeps the old refresh
    token when the refresh response omitted it. The caller commits."""
    from omnicrm.secrets import decrypt_json, encrypt_json

    row = _row(session, user_id)
    if row is None:
        raise AuthorizationNeeded("Google is not connected")
    refresh_token = credentials.refresh_token or decrypt_json(settings, row.secret).get("refresh_token")
    row.secret = encrypt_json(settings, _secret_payload(credentials, refresh_token))
    row.token_expiry = _stored_expiry(credentials.expiry)
    row.last_refresh_at = config.now()
    row.status = STATUS_OK
    granted = _granted(credentials)
    if granted and getattr(credentials, "granted_scopes", None):
        row.scopes = " ".join(granted)
    session.flush()


def set_account_email(session: Session, user_id: int, email: str) -> None:
    """Record the connected account's address when it is learned later (e.g. Gmail getProfile)."""
    row = _row(session, user_id)
    if row is not None and email and row.account_email != email:
        row.account_email = email
        session.flush()


def _credentials_from(settings: Settings, row: Credential) -> "Credentials":
    """Build Credentials ourselves: `from_authorized_user_info` would reset token_uri to Google's."""
    from google.oauth2.credentials import Credentials

    from omnicrm.secrets import decrypt_json

    data = decrypt_json(settings, row.secret)
    scopes = row.scopes.split() if row.scopes else list(SCOPES)
    return Credentials(token=data.get("token"), refresh_token=data.get("refresh_token"),
                       token_uri=data.get("token_uri"), client_id=data.get("client_id"),
                       client_secret=data.get("client_secret"), scopes=scopes,
                       expiry=_library_expiry(row.token_expiry))


def _needs_refresh(row: Credential, now: datetime) -> bool:
    return row.token_expiry is not None and row.token_expiry - REFRESH_MARGIN <= now


def load_credentials(session: Session, settings: Settings, user_id: int, *,
                     force_refresh: bool = False) -> "Credentials":
    """The user's decrypted grant, refreshed (and saved at once) when the access token has expired.

    Raises AuthorizationNeeded when nothing is stored, when the grant is marked "reconnect needed",
    or when the token endpoint answers invalid_grant (the row is then marked). When a refresh
    happens the session is committed (that includes anything the caller had pending).
    """
    row = _row(session, user_id)
    if row is None:
        raise AuthorizationNeeded("Google is not connected")
    if row.status == STATUS_RECONNECT:
        raise AuthorizationNeeded("the Google grant was revoked or has expired")
    credentials = _credentials_from(settings, row)
    if force_refresh or _needs_refresh(row, config.now()):
        credentials = _refresh(session, settings, user_id, row, credentials)
    return credentials


class _TimedRequest:
    """google-auth's requests transport with a bounded timeout (its default is 120 s)."""

    def __init__(self) -> None:
        from google.auth.transport.requests import Request

        self._request = Request()

    def __call__(self, *args, **kwargs):
        kwargs["timeout"] = kwargs.get("timeout") or TOKEN_HTTP_TIMEOUT_S
        return self._request(*args, **kwargs)


def _refresh(session: Session, settings: Settings, user_id: int, row: Credential,
             credentials: "Credentials") -> "Credentials":
    from google.auth.exceptions import RefreshError, TransportError

    # End the transaction first: no database lock is held during the HTTP call (SQLite holds its
    # write lock for the whole transaction). Two processes refreshing at once both get valid tokens.
    used_secret = row.secret
    session.commit()
    check_endpoint(credentials.token_uri or "", "stored token_uri")
    old_refresh = credentials.refresh_token
    redact = Redactor(credentials.token, old_refresh, credentials.client_secret)
    host = urlsplit(credentials.token_uri).hostname
    try:
        credentials.refresh(_TimedRequest())
    except RefreshError as exc:
        data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        error = str(data.get("error") or "")
        if error in REVOKED_ERRORS:
            _mark_reconnect(session, user_id, used_secret)
            log.info("token endpoint %s answered %s: marked the grant reconnect_needed", host, error)
            raise AuthorizationNeeded(f"the Google grant was revoked or has expired ({error})") from None
        raise ServiceUnavailable(f"could not refresh the Google access token at {host} "
                                 f"({redact(error or 'unexpected response', 60)})") from None
    except TransportError as exc:
        raise ServiceUnavailable(f"could not reach the token endpoint {host} "
                                 f"({type(exc.__cause__ or exc).__name__})") from None
    if not credentials.refresh_token:
        credentials._refresh_token = old_refresh  # noqa: SLF001 - the response omitted it: keep ours
    fresh = _row(session, user_id)
    if fresh is None:  # disconnected meanwhile
        session.rollback()
        raise AuthorizationNeeded("Google is not connected")
    save_refreshed(session, settings, user_id, credentials)
    session.commit()
    log.info("refreshed the Google access token for user id %s (expires %s)", user_id,
             fresh.token_expiry.isoformat() if fresh.token_expiry else "unknown")
    return credentials


def _mark_reconnect(session: Session, user_id: int, used_secret: str) -> None:
    row = _row(session, user_id)
    if row is not None and row.secret == used_secret:  # a newer grant stored meanwhile stays intact
        row.status = STATUS_RECONNECT
    session.commit()


def disconnect(session: Session, user_id: int) -> bool:
    """Delete the user's stored grant; True if there was one. The caller commits."""
    row = _row(session, user_id)
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


def short_scope(scope: str) -> str:
    return scope[len(SCOPE_PREFIX):] if scope.startswith(SCOPE_PREFIX) else scope


def connection_status(session: Session, user_id: int, *, now: datetime | None = None) -> dict | None:
    """A non-secret summary of the user's grant, or None when Google is not connected."""
    row = _row(session, user_id)
    if row is None:
        return None
    now = now or config.now()
    scopes = row.scopes.split() if row.scopes else []
    missing = [scope for scope in SCOPES if scope not in scopes]
    age = now - row.created_at
    warnings = []
    if row.status == STATUS_RECONNECT:
        warnings.append("the grant was revoked or has expired: run `omnicrm google connect`")
    if age > TESTING_WARN_AGE:
        warnings.append(f"the refresh token is {age.days} days old: OAuth consent screens in \"Testing\" "
                        "status issue refresh tokens that expire after 7 days (publish the app, or run "
                        "`omnicrm google connect` again)")
    if missing:
        warnings.append("scopes not granted: " + ", ".join(short_scope(s) for s in missing)
                        + " (those sources cannot sync; reconnect and tick every box)")
    expiry = row.token_expiry
    return {
        "account": row.account_email,
        "status": "connected" if row.status == STATUS_OK else row.status,
        "scopes": scopes,
        "missing_scopes": missing,
        "access_token_expires_at": expiry.isoformat() if expiry else None,
        "access_token_expired": bool(expiry is not None and expiry <= now),
        "granted_at": row.created_at.isoformat(),
        "refresh_token_age_days": round(age.total_seconds() / 86400, 1),
        "last_refresh_at": row.last_refresh_at.isoformat() if row.last_refresh_at else None,
        "warnings": warnings,
    }
