"""One exception root; each subclass carries the exit code the SPEC gives it."""


class OmniCrmError(Exception):
    """Expected failure: printed as one clean line, exit 1."""

    exit_code = 1


class NotFound(OmniCrmError):
    """A contact, job or other record does not exist for the acting user."""


class InvalidInput(OmniCrmError):
    """Bad option value or invalid input data (exit 2); the message names the option, row or field."""

    exit_code = 2


class AuthorizationNeeded(OmniCrmError):
    """Google is not connected or the grant was revoked/expired (exit 3)."""

    exit_code = 3

    def __init__(self, message: str = "Google authorization needed") -> None:
        super().__init__(f"{message}: run `omnicrm google connect`")


class PartialSuccess(OmniCrmError):
    """Some rows or sources failed while others succeeded (exit 4)."""

    exit_code = 4


class ServiceUnavailable(OmniCrmError):
    """A database, queue or Google server could not be reached (exit 1)."""
