"""Every failure of a call is a `RecapError`: catch that one class to never fail a bot's reply for recap."""

from __future__ import annotations

from typing import Optional

__all__ = [
    "RecapError",
    "RecapTransportError",
    "RecapTimeout",
    "RecapAPIError",
    "RecapAuthError",
    "RecapResponseError",
    "RecapInputError",
]


class RecapError(Exception):
    """Base of every error the client raises.

    `status` is the HTTP status when recap answered (None otherwise), `field` the input at fault when recap (or the
    client's own check) names one, `message` recap's error text or what went wrong.
    """

    def __init__(self, message: str, status: Optional[int] = None, field: Optional[str] = None) -> None:
        text = message if status is None else f"{status}: {message}"
        super().__init__(text + (f" (field {field})" if field else ""))
        self.message = message
        self.status = status
        self.field = field


class RecapTransportError(RecapError):
    """recap could not be reached or the connection broke (refused, reset, DNS, TLS, a malformed HTTP answer)."""


class RecapTimeout(RecapTransportError, TimeoutError):
    """The call did not complete within its timeout (one total budget per call: connect, send, wait, read)."""


class RecapAPIError(RecapError):
    """recap answered with an error status (4xx: bad input, `field` names it; 5xx: recap or its store is down)."""

    status: int

    def __init__(self, message: str, status: int, field: Optional[str] = None) -> None:
        super().__init__(message, status, field)


class RecapAuthError(RecapAPIError):
    """401 / 403: the token is missing or wrong (`RECALL_TOKEN`)."""


class RecapResponseError(RecapError):
    """recap answered 2xx with a body that is not what the API specifies (e.g. a proxy's page, a cut-off body)."""


class RecapInputError(RecapError, ValueError):
    """The client refused an argument before sending it (e.g. a vector that is not flat or not finite)."""
