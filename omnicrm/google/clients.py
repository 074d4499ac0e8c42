"""Google API clients: static discovery, one API root for tests, and retries that honour Retry-After.

`OMNICRM_GOOGLE_API_ROOT=http://HOST:PORT` moves every request, batch requests included, to that root
with Google's own paths (the SPEC's "Google endpoints"). Nothing here touches the database.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from typing import Any, Callable, TypeVar

from omnicrm.config import Settings
from omnicrm.errors import AuthorizationNeeded, OmniCrmError, ServiceUnavailable

log = logging.getLogger("omnicrm.google")
T = TypeVar("T")

RETRY_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
HTTP_TIMEOUT_S = 60
DEFAULT_RETRIES = 8
MAX_DELAY_S = 64.0
MAX_RETRY_AFTER_S = 300.0


class GoogleApiError(OmniCrmError):
    """Google answered with an error that retrying will not fix (the message has status and reason)."""

    def __init__(self, status: int, reason: str | None, message: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(f"Google API error {status}{f' {reason}' if reason else ''}: {message}")


class ScopeMissing(AuthorizationNeeded):
    """Google refused a call for lack of a scope the user did not grant (exit 3: reconnect, tick every box)."""


SCOPE_REASONS = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"})


def _discovery_document(name: str, version: str, settings: Settings) -> dict:
    from googleapiclient.discovery_cache import get_static_doc

    text = get_static_doc(name, version)
    if text is None:
        raise OmniCrmError(f"no bundled discovery document for {name} {version}")
    doc = json.loads(text)
    if settings.google_api_root:
        # rootUrl drives both the request base (rootUrl + servicePath) and the batch URI (rootUrl + batchPath).
        doc["rootUrl"] = settings.google_api_root.rstrip("/") + "/"
        doc.pop("mtlsRootUrl", None)
    return doc


def build_service(name: str, version: str, credentials, settings: Settings):
    """A googleapiclient Resource built from the bundled discovery document (no network at build time).

    A 401 makes the credentials refresh once (then the request is retried once); a refresh refused
    by Google surfaces as `google.auth.exceptions.RefreshError` (see `call`).
    """
    import google_auth_httplib2
    from googleapiclient.discovery import build_from_document
    from googleapiclient.http import build_http

    http = google_auth_httplib2.AuthorizedHttp(credentials, http=build_http(), max_refresh_attempts=1)
    http.http.timeout = http_timeout()
    return build_from_document(_discovery_document(name, version, settings), http=http)


def batch_uri(service_name: str, settings: Settings) -> str:
    """ROOT/batch for Gmail and People, ROOT/batch/calendar/v3 for Calendar."""
    version = {"gmail": "v1", "calendar": "v3", "people": "v1"}[service_name]
    doc = _discovery_document(service_name, version, settings)
    return doc["rootUrl"] + doc.get("batchPath", "batch")


def new_batch(service_name: str, settings: Settings, callback=None):
    """A BatchHttpRequest posting to the right batch endpoint (the library's own ignores api_endpoint)."""
    from googleapiclient.http import BatchHttpRequest

    return BatchHttpRequest(callback=callback, batch_uri=batch_uri(service_name, settings))


# --- retries --------------------------------------------------------------------------------------

def http_timeout() -> float:
    """Socket timeout of one API request; `OMNICRM_HTTP_TIMEOUT_SECONDS` changes it (tests, slow links)."""
    try:
        value = float(os.environ.get("OMNICRM_HTTP_TIMEOUT_SECONDS", HTTP_TIMEOUT_S))
    except ValueError:
        return HTTP_TIMEOUT_S
    return value if 0 < value <= 600 else HTTP_TIMEOUT_S


def retry_base_seconds() -> float:
    """First backoff step; `OMNICRM_RETRY_BASE_SECONDS` shrinks it for tests and benchmarks."""
    try:
        return max(0.0, float(os.environ.get("OMNICRM_RETRY_BASE_SECONDS", "1")))
    except ValueError:
        return 1.0


def max_retries() -> int:
    try:
        return max(0, int(os.environ.get("OMNICRM_RETRY_MAX", str(DEFAULT_RETRIES))))
    except ValueError:
        return DEFAULT_RETRIES


def backoff_delay(attempt: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; never shorter than the server's Retry-After."""
    step = min(MAX_DELAY_S, retry_base_seconds() * (2 ** attempt))
    delay = random.uniform(step / 2, step)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def error_reason(exc) -> str | None:
    """The machine reason of an HttpError: errors[0].reason, else details[].reason, else status."""
    try:
        data = json.loads(exc.content.decode("utf-8") if isinstance(exc.content, bytes) else exc.content)
        error = data.get("error", {}) if isinstance(data, dict) else {}
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(error, dict):
        return None
    for item in error.get("errors") or []:
        if isinstance(item, dict) and item.get("reason"):
            return item["reason"]
    for item in error.get("details") or []:
        if isinstance(item, dict) and item.get("reason"):
            return item["reason"]
    return error.get("status")


def error_message(exc) -> str:
    try:
        data = json.loads(exc.content)
        return str(data["error"]["message"])[:300]
    except Exception:  # noqa: BLE001 - any shape of body
        return str(getattr(exc, "reason", "") or "")[:300]


def retry_after(exc) -> float | None:
    resp = getattr(exc, "resp", None)
    value = resp.get("retry-after") if resp is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            from omnicrm.config import now

            return max(0.0, (parsedate_to_datetime(value) - now()).total_seconds())
        except (TypeError, ValueError):
            return None


def is_retryable(exc) -> bool:
    status = getattr(getattr(exc, "resp", None), "status", None)
    if status is None:
        return False
    status = int(status)
    if status == 429 or status >= 500:
        return True
    return status == 403 and error_reason(exc) in RETRY_REASONS


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httplib2

    return (socket.timeout, ConnectionError, TimeoutError, httplib2.HttpLib2Error, OSError)


def _auth_error(exc) -> AuthorizationNeeded:
    detail = ""
    if len(getattr(exc, "args", ())) > 1 and isinstance(exc.args[1], dict):
        detail = exc.args[1].get("error", "")
    return AuthorizationNeeded(f"Google refused the stored authorization{f' ({detail})' if detail else ''}")


def call(fn: Callable[[], T], what: str = "Google API request") -> T:
    """Run `fn` (one API call), retrying 429/5xx/rate-limit 403 and transport errors with backoff.

    A non-retryable HttpError becomes GoogleApiError (status/reason kept); a refused token refresh
    becomes AuthorizationNeeded (exit 3).
    """
    from google.auth.exceptions import RefreshError
    from googleapiclient.errors import HttpError

    attempts = max_retries()
    for attempt in range(attempts + 1):
        try:
            return fn()
        except RefreshError as exc:
            raise _auth_error(exc) from None
        except HttpError as exc:
            status = int(exc.resp.status)
            if status == 401:
                raise AuthorizationNeeded("Google rejected the access token after a refresh") from None
            if status == 403 and error_reason(exc) in SCOPE_REASONS:
                raise ScopeMissing(f"{what}: a Google permission was not granted ({error_reason(exc)})") from None
            if not is_retryable(exc) or attempt == attempts:
                raise GoogleApiError(status, error_reason(exc), error_message(exc)) from None
            delay = backoff_delay(attempt, retry_after(exc))
            log.info("%s: HTTP %s, retrying in %.2fs", what, status, delay)
        except _transport_errors() as exc:
            if attempt == attempts:
                raise ServiceUnavailable(f"{what}: cannot reach Google: {exc}") from None
            delay = backoff_delay(attempt)
            log.info("%s: %s, retrying in %.2fs", what, type(exc).__name__, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def execute(request, what: str = "Google API request") -> dict:
    """`request.execute()` with our retry policy (the library's own ignores Retry-After)."""
    return call(lambda: request.execute(num_retries=0), what)


def run_batch(service_name: str, settings: Settings, requests: dict[str, Any], *,
              missing_ok: bool = False, what: str = "batch request") -> dict[str, dict | None]:
    """Execute `requests` (id -> HttpRequest, ≤ 100) as one batch; failed parts that are retryable go
    again in a smaller batch after a backoff. With `missing_ok`, a 404 part yields None (e.g. a message
    deleted between list and get). Returns id -> response."""
    from googleapiclient.errors import HttpError

    results: dict[str, dict | None] = {}
    pending = dict(requests)
    attempts = max_retries()
    for attempt in range(attempts + 1):
        failed: dict[str, HttpError] = {}

        def collect(request_id, response, exception):
            if exception is None:
                results[request_id] = response
            else:
                failed[request_id] = exception

        batch = new_batch(service_name, settings, callback=collect)
        for request_id, request in pending.items():
            batch.add(request, request_id=request_id)
        call(lambda: batch.execute(), what)
        retry: dict[str, Any] = {}
        wait: float | None = None
        for request_id, exc in failed.items():
            status = int(exc.resp.status)
            if status == 404 and missing_ok:
                results[request_id] = None
            elif is_retryable(exc) and attempt < attempts:
                retry[request_id] = pending[request_id]
                hint = retry_after(exc)
                if hint is not None:
                    wait = max(wait or 0.0, hint)
            elif status == 401:
                raise AuthorizationNeeded("Google rejected the access token after a refresh")
            else:
                raise GoogleApiError(status, error_reason(exc), error_message(exc))
        if not retry:
            return results
        delay = backoff_delay(attempt, wait)
        log.info("%s: %d part(s) failed, retrying in %.2fs", what, len(retry), delay)
        time.sleep(delay)
        pending = retry
    return results
