"""`omnicrm google …`: connect a Google account, show or remove the stored grant."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from omnicrm.cli.common import FormatOpt, state
from omnicrm.errors import AuthorizationNeeded, InvalidInput

app = typer.Typer(help="Connect a Google account (OAuth) and inspect or remove the stored grant.",
                  no_args_is_help=True)


def _say(message: str) -> None:
    """Flow instructions go to stderr even with --quiet: the user has to act on them."""
    typer.echo(message, err=True)


@app.command("connect")
def connect(
    ctx: typer.Context,
    client_secrets: Annotated[Path, typer.Option(
        "--client-secrets", metavar="FILE", help="OAuth client JSON (type 'Desktop app') from Google Cloud console.",
        show_default=False)],
    no_browser: Annotated[bool, typer.Option(
        "--no-browser", help="Do not open a browser: print the URL and wait for the redirect on 127.0.0.1.")] = False,
    paste: Annotated[bool, typer.Option(
        "--paste", help="Print the URL, then read the redirected address pasted from the browser (stdin).")] = False,
    port: Annotated[int, typer.Option(
        "--port", min=0, max=65535, help="Loopback port for the redirect (0 = a free port).")] = 0,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", metavar="SECONDS", help="Give up waiting after this long (OMNICRM_OAUTH_TIMEOUT; 300).",
        show_default=False)] = None,
) -> None:
    """Authorize OmniCRM to read Gmail headers, Calendar events and Contacts for the acting user.

    Runs Google's installed-app flow (PKCE, loopback redirect to 127.0.0.1). By default a browser
    opens; --no-browser prints the URL (use `ssh -L PORT:127.0.0.1:PORT` from a remote machine);
    --paste works when the browser cannot reach this machine at all. The grant is stored encrypted.
    """
    from omnicrm.google import auth

    st = state(ctx)
    if no_browser and paste:
        raise InvalidInput("--no-browser and --paste: choose one")
    client = auth.load_client_secrets(client_secrets)
    seconds = auth.flow_timeout(timeout, st.settings)
    mode = "paste" if paste else "no-browser" if no_browser else "browser"
    grant = auth.run_flow(client, mode=mode, port=port, timeout=seconds, notify=_say, stdin=sys.stdin)
    with st.session() as session:
        auth.store_credentials(session, st.settings, st.user_id(session), grant.credentials, grant.account_email)
        session.commit()
    who = grant.account_email or "your Google account"
    st.info(f"connected {who} for user {st.settings.user}")
    if grant.missing_scopes:
        _say("Warning: scopes not granted: " + ", ".join(auth.short_scope(s) for s in grant.missing_scopes)
             + " (those sources cannot sync; run `omnicrm google connect` again and tick every box)")


@app.command("status")
def status(
    ctx: typer.Context,
    fmt: FormatOpt = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Verify the grant with Google now (refreshes the access token; exit 3 if revoked).")] = False,
) -> None:
    """Show the connected account, scopes, token expiry, refresh-token age and last refresh.

    Exits 3 when Google is not connected or the grant needs reconnecting.
    """
    from omnicrm.google import auth
    from omnicrm.output import write_object

    st = state(ctx)
    out = st.fmt(fmt)
    with st.session() as session:
        uid = st.user_id(session)
        problem: AuthorizationNeeded | None = None
        if check:
            try:
                auth.load_credentials(session, st.settings, uid, force_refresh=True)
            except AuthorizationNeeded as exc:
                problem = exc
            session.commit()
        info = auth.connection_status(session, uid)
    if info is None:
        write_object({"user": st.settings.user, "connected": False}, out)
        raise problem or AuthorizationNeeded("Google is not connected")
    record = {"user": st.settings.user, "connected": True, **info}
    if out == "table":
        record["scopes"] = " ".join(auth.short_scope(s) for s in info["scopes"])
        missing = record.pop("missing_scopes")
        if missing:
            record["missing_scopes"] = " ".join(auth.short_scope(s) for s in missing)
        record["status"] = "reconnect needed" if info["status"] == auth.STATUS_RECONNECT else info["status"]
        warnings = record.pop("warnings")
        write_object(record, out)
        for warning in warnings:
            _say(f"Warning: {warning}")
    else:
        write_object(record, out)
    if info["status"] == auth.STATUS_RECONNECT:
        raise problem or AuthorizationNeeded("the Google grant was revoked or has expired (reconnect needed)")
    if check:
        st.info("the grant is valid (access token refreshed)")


@app.command("disconnect")
def disconnect(ctx: typer.Context) -> None:
    """Delete the acting user's stored Google credentials (revoke access at myaccount.google.com/permissions)."""
    from omnicrm.google import auth

    st = state(ctx)
    with st.session() as session:
        removed = auth.disconnect(session, st.user_id(session))
        session.commit()
    if removed:
        st.info(f"removed the stored Google credentials of user {st.settings.user}; to revoke access at Google "
                "too, visit https://myaccount.google.com/permissions")
    else:
        st.info(f"user {st.settings.user} has no stored Google credentials")
