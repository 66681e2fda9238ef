"""Client for recap's recall API: what a bot puts in its prompt (`context`), a user's conversation summaries by time
(`recall`) or similarity (`search`), and forgetting a user (`forget`).

`Recap` is synchronous, `AsyncRecap` has the same methods as coroutines (asyncio or trio); both keep a pool of
connections (httpx), bound each call by one total timeout, and raise only `RecapError` subclasses.
"""

from ._client import DEFAULT_TIMEOUT, AsyncRecap, Recap, SupportsToList, Vector, __version__
from ._errors import (
    RecapAPIError,
    RecapAuthError,
    RecapError,
    RecapInputError,
    RecapResponseError,
    RecapTimeout,
    RecapTransportError,
)
from ._models import Context, Conversation, ConversationSummary, Forgotten, Message, Summary, parse_time

__all__ = [
    "Recap",
    "AsyncRecap",
    "Summary",
    "Forgotten",
    "Context",
    "Conversation",
    "ConversationSummary",
    "Message",
    "Vector",
    "SupportsToList",
    "RecapError",
    "RecapTransportError",
    "RecapTimeout",
    "RecapAPIError",
    "RecapAuthError",
    "RecapResponseError",
    "RecapInputError",
    "DEFAULT_TIMEOUT",
    "parse_time",
    "__version__",
]
