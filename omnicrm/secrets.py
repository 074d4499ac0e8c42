"""The key that encrypts OAuth grants at rest (Fernet), and encrypt/decrypt helpers.

The key comes from `OMNICRM_SECRET_KEY` or from `$OMNICRM_HOME/secret.key`, which is created
(mode 0600) the first time something is encrypted. Messages never contain the key or a plaintext.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from omnicrm.config import Settings, ensure_private_dir
from omnicrm.errors import OmniCrmError

log = logging.getLogger("omnicrm.secrets")

KEY_FILE_NAME = "secret.key"
GENERATE_HINT = ("python -c 'from cryptography.fernet import Fernet; "
                 "print(Fernet.generate_key().decode())'")


class SecretKeyError(OmniCrmError):
    """The encryption key is missing, malformed or not the one the data was encrypted with (exit 1)."""


def key_path(settings: Settings) -> Path:
    return settings.home / KEY_FILE_NAME


def _fernet_from(key: bytes, origin: str):
    from cryptography.fernet import Fernet

    try:
        return Fernet(key.strip())
    except (ValueError, TypeError):
        raise SecretKeyError(f"{origin} is not a valid key (expected 32 url-safe base64-encoded bytes; "
                             f"make one with: {GENERATE_HINT})") from None


def _read_key_file(path: Path):
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("tightening permissions of %s from %o to 600", path, mode)
        os.chmod(path, 0o600)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecretKeyError(f"cannot read the key file {path}: {exc.strerror}") from None
    return _fernet_from(data, f"the key file {path}")


def _create_key_file(path: Path) -> None:
    """Write a new key atomically: a private temp file hard-linked into place (no partial reads)."""
    from cryptography.fernet import Fernet

    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, Fernet.generate_key() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: theirs wins
        log.info("created the encryption key file %s", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def get_fernet(settings: Settings, *, create: bool = False):
    """The Fernet for `settings`. With `create`, a missing key file is made (0600)."""
    if settings.secret_key:
        return _fernet_from(settings.secret_key.encode(), "OMNICRM_SECRET_KEY")
    path = key_path(settings)
    if not path.exists():
        if not create:
            raise SecretKeyError(f"no encryption key: set OMNICRM_SECRET_KEY or restore the key file {path} "
                                 "(stored Google credentials cannot be read without it; "
                                 "`omnicrm google connect` stores new ones)")
        _create_key_file(path)
    return _read_key_file(path)


def encrypt_json(settings: Settings, data: dict) -> str:
    """Encrypt a JSON-serialisable dict; creates the key file on first use."""
    token = get_fernet(settings, create=True).encrypt(json.dumps(data, separators=(",", ":")).encode())
    return token.decode("ascii")


def decrypt_json(settings: Settings, token: str) -> dict:
    """Decrypt what `encrypt_json` wrote; a wrong key is a clear SecretKeyError."""
    from cryptography.fernet import InvalidToken

    fernet = get_fernet(settings)
    try:
        plain = fernet.decrypt(token.encode("ascii"))
    except (InvalidToken, ValueError, UnicodeEncodeError):
        source = "OMNICRM_SECRET_KEY" if settings.secret_key else f"the key file {key_path(settings)}"
        raise SecretKeyError(f"cannot decrypt the stored Google credentials with {source}: it is not the key "
                             "they were encrypted with (set the right key, or run `omnicrm google connect` "
                             "to store new credentials)") from None
    return json.loads(plain)
