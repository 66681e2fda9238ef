"""`Recap` (sync) and `AsyncRecap` (async): one pooled httpx client each, the same methods and results.

Each public method builds a `_Call` (pure: path, query, body, how to read the answer); `_run` sends it. The two
classes differ only in `_run`, so both always send the same requests and read the same results.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
from dataclasses import dataclass
from types import TracebackType
from typing import (
    Any,
    Callable,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    SupportsFloat,
    Type,
    TypeVar,
    Union,
)

import anyio
import httpx

from ._errors import (
    RecapAPIError,
    RecapAuthError,
    RecapError,
    RecapInputError,
    RecapResponseError,
    RecapTimeout,
    RecapTransportError,
)
from ._models import Context, Forgotten, Summary

__all__ = ["Recap", "AsyncRecap", "Vector", "SupportsToList", "DEFAULT_TIMEOUT", "__version__"]

__version__ = "0.2.0"

DEFAULT_TIMEOUT = 5.0
"""Seconds a whole call may take (connect, send, wait for recap, read), unless the call or the client says otherwise."""

T = TypeVar("T")


class SupportsToList(Protocol):
    """Anything with `tolist()`: numpy arrays, torch tensors, array.array (no such package is needed)."""

    def tolist(self) -> Any: ...


Vector = Union[Sequence[SupportsFloat], SupportsToList]
"""An embedding: a sequence of numbers (floats, numpy scalars ...) or a 1-d array with `tolist()` (numpy, torch)."""


def _vector(v: Vector) -> List[float]:
    """The vector as a JSON-ready list of floats; a RecapInputError (field `vector`) if it is not flat or not finite."""
    raw: Any = v.tolist() if hasattr(v, "tolist") else v
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__"):
        raise RecapInputError("vector must be a flat sequence of numbers", field="vector")
    out: List[float] = []
    for x in raw:
        if isinstance(x, bool) or not isinstance(x, (int, float)) and not hasattr(x, "__float__"):
            raise RecapInputError(
                f"vector must be a flat sequence of numbers, not of {type(x).__name__}", field="vector"
            )
        f = float(x)
        if not math.isfinite(f):
            raise RecapInputError("vector components must be finite (no NaN or infinity)", field="vector")
        out.append(f)
    return out


def _seg(s: str, name: str) -> str:
    """One path segment, every reserved character escaped (a user id may hold `/`, `?`, `%`, spaces ...)."""
    try:
        return urllib.parse.quote(s, safe="")
    except UnicodeEncodeError:
        raise RecapInputError(f"{name} is not valid text (a lone surrogate)", field=name) from None


def _query(params: Mapping[str, Any]) -> Dict[str, str]:
    return {k: str(v) for k, v in params.items() if v is not None}


def _body(fields: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[Any], T]
    params: Optional[Dict[str, str]] = None
    body: Optional[Dict[str, Any]] = None


def _items(doc: Any) -> List[Summary]:
    return [Summary.from_json(i) for i in doc["items"]]


def _recall(
    bot: str,
    user_id: str,
    since: Optional[str],
    until: Optional[str],
    limit: Optional[int],
    type: Optional[str],
    tz: Optional[str],
) -> _Call[List[Summary]]:
    params = _query(
        {"bot": bot, "user_id": user_id, "since": since, "until": until, "limit": limit, "type": type, "tz": tz}
    )
    return _Call("GET", "/v1/recall", _items, params=params)


def _search(
    bot: str,
    user_id: str,
    vector: Optional[Vector],
    text: Optional[str],
    limit: Optional[int],
    since: Optional[str],
    until: Optional[str],
    tz: Optional[str],
    type: Optional[str],
) -> _Call[List[Summary]]:
    body = _body(
        {
            "bot": bot,
            "user_id": user_id,
            "vector": None if vector is None else _vector(vector),
            "text": text,
            "limit": limit,
            "since": since,
            "until": until,
            "tz": tz,
            "type": type,
        }
    )
    return _Call("POST", "/v1/recall/search", _items, body=body)


def _forget(bot: str, user_id: str) -> _Call[Forgotten]:
    return _Call("DELETE", f"/v1/users/{_seg(bot, 'bot')}/{_seg(user_id, 'user_id')}", Forgotten.from_json)


def _context(bot: str, user_id: str, max_tokens: Optional[int], query: Optional[str]) -> _Call[Context]:
    params = _query({"bot": bot, "user_id": user_id, "max_tokens": max_tokens, "query": query})
    return _Call("GET", "/v1/context", Context.from_json, params=params)


def _read(call: _Call[T], status: int, content: bytes) -> T:
    """The answer as the call's result, or the RecapError it stands for."""
    try:
        doc: Any = json.loads(content) if content else {}
    except ValueError:
        doc = None
    if status >= 400:
        if isinstance(doc, dict):
            message = str(doc.get("error") or doc.get("message") or "")
            fld = doc.get("field")
        else:
            message, fld = content.decode("utf-8", errors="replace").strip()[:500], None
        cls = RecapAuthError if status in (401, 403) else RecapAPIError
        raise cls(message or httpx.codes.get_reason_phrase(status), status, None if fld is None else str(fld))
    if not isinstance(doc, dict):
        raise RecapResponseError(f"{call.method} {call.path}: the answer is not a JSON object", status)
    try:
        return call.read(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RecapResponseError(f"{call.method} {call.path}: unexpected answer ({type(e).__name__}: {e})", status)


def _transport_error(call: _Call[Any], e: Exception, timeout: float) -> RecapError:
    if isinstance(e, (httpx.TimeoutException, TimeoutError)):
        return RecapTimeout(f"{call.method} {call.path}: no complete answer within {timeout:g} s")
    return RecapTransportError(f"{call.method} {call.path}: {type(e).__name__}: {e}")


def _headers(token: Optional[str]) -> Dict[str, str]:
    h = {"User-Agent": f"recap-client/{__version__}", "Accept": "application/json"}
    if token:
        t = token.strip()
        if not t.isascii() or not t.isprintable():
            raise RecapInputError("token must be printable ASCII (RECALL_TOKEN)", field="token")
        h["Authorization"] = f"Bearer {t}"
    return h


def _base_url(url: str) -> str:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise RecapInputError(f"base_url {url!r} is not a URL: {e}", field="base_url") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise RecapInputError(f"base_url {url!r} must be http(s)://host:port", field="base_url")
    return url.rstrip("/")


def _closed(call: _Call[Any]) -> RecapError:
    return RecapTransportError(f"{call.method} {call.path}: the client is closed")


def _deadline_extensions(deadline: float, budget: float) -> Dict[str, Any]:
    """httpx request extensions that hold a sync call to one deadline.

    httpx's timeouts are per step (connect, write, each read). httpcore reads them from the request's `timeout`
    extension when each step starts, right after announcing the step to the `trace` extension; the trace callback
    sets them to what is left of the budget then. So each step waits at most until the deadline (a body that
    arrives in many chunks is checked against the deadline after each one)."""
    limits: Dict[str, Optional[float]] = {"connect": budget, "read": budget, "write": budget, "pool": budget}

    def trace(event: str, info: Mapping[str, Any]) -> None:
        if event.endswith(".started"):
            left = max(deadline - time.monotonic(), 0.001)
            for k in limits:
                limits[k] = left

    return {"timeout": limits, "trace": trace}


def _check_timeout(timeout: float) -> float:
    if not timeout > 0 or not math.isfinite(timeout):
        raise RecapInputError(f"timeout must be a positive number of seconds, not {timeout!r}", field="timeout")
    return float(timeout)


class Recap:
    """Synchronous client over one pooled `httpx.Client` (keep-alive connections): make it once and reuse it.

    `base_url`: recap's `HTTP_ADDR` (e.g. `http://127.0.0.1:9464`); `token`: its `RECALL_TOKEN`; `timeout`: seconds a
    whole call may take (each method takes its own `timeout=` too); `http`: your own `httpx.Client` (proxies, TLS,
    limits; the client then leaves closing it to you). Use it as a context manager or call `close()`.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.timeout = _check_timeout(timeout)
        self._headers = _headers(token)  # every argument checked before a pool is made
        self._own = http is None
        self._http = http if http is not None else httpx.Client(limits=httpx.Limits(max_keepalive_connections=20))

    def __enter__(self) -> "Recap":
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the pooled connections (not those of an `http` client passed in)."""
        if self._own:
            self._http.close()

    def _run(self, call: _Call[T], timeout: Optional[float]) -> T:
        budget = self.timeout if timeout is None else _check_timeout(timeout)
        if self._http.is_closed:
            raise _closed(call)
        deadline = time.monotonic() + budget
        try:
            with self._http.stream(
                call.method,
                self.base_url + call.path,
                params=call.params,
                json=call.body,
                headers=self._headers,
                extensions=_deadline_extensions(deadline, budget),
            ) as resp:
                chunks = []
                for chunk in resp.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise TimeoutError
                status = resp.status_code
        except (httpx.HTTPError, TimeoutError) as e:
            raise _transport_error(call, e, budget) from e
        except UnicodeEncodeError:
            raise RecapInputError(f"{call.method} {call.path}: an argument is not valid text") from None
        return _read(call, status, b"".join(chunks))

    def recall(
        self,
        bot: str,
        user_id: str,
        since: Optional[str] = None,
        until: Optional[str] = None,
        limit: Optional[int] = None,
        type: Optional[str] = None,
        tz: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
    ) -> List[Summary]:
        """The user's summaries overlapping [since, until), newest first. `since`/`until`: RFC 3339, a date, `7d`,
        `yesterday`, `last week`, `this month` ... resolved in `tz` (IANA, default UTC)."""
        return self._run(_recall(bot, user_id, since, until, limit, type, tz), timeout)

    def search(
        self,
        bot: str,
        user_id: str,
        vector: Optional[Vector] = None,
        text: Optional[str] = None,
        limit: Optional[int] = None,
        since: Optional[str] = None,
        until: Optional[str] = None,
        tz: Optional[str] = None,
        type: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
    ) -> List[Summary]:
        """The user's summaries nearest to `vector` (the bot's own embedding of a message: a list or a numpy array),
        matching `text`, or both (fused), best first; each has a `score`."""
        return self._run(_search(bot, user_id, vector, text, limit, since, until, tz, type), timeout)

    def context(
        self,
        bot: str,
        user_id: str,
        max_tokens: Optional[int] = None,
        query: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Context:
        """What to put in the prompt, within `max_tokens` (at least 64; None: recap's default, 2000): the user's
        current conversation (its summary so far plus the rest verbatim, or with none open the last one's summary)
        and recaps of earlier ones (newest first; with `query`, the most relevant to it first)."""
        return self._run(_context(bot, user_id, max_tokens, query), timeout)

    def forget(self, bot: str, user_id: str, *, timeout: Optional[float] = None) -> Forgotten:
        """Deletes everything recap holds about the user (summaries, state, summary vectors); idempotent."""
        return self._run(_forget(bot, user_id), timeout)


class AsyncRecap:
    """Asynchronous client (asyncio or trio) with the same methods as `Recap`, as coroutines, over one pooled
    `httpx.AsyncClient`. A call is cancellable: cancelling the awaiting task ends its request at once. Use it as an
    async context manager or call `await aclose()`."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        http: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.base_url = _base_url(base_url)
        self.timeout = _check_timeout(timeout)
        self._headers = _headers(token)  # every argument checked before a pool is made
        self._own = http is None
        self._http = (
            http if http is not None else httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=20))
        )

    async def __aenter__(self) -> "AsyncRecap":
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the pooled connections (not those of an `http` client passed in)."""
        if self._own:
            await self._http.aclose()

    async def _run(self, call: _Call[T], timeout: Optional[float]) -> T:
        budget = self.timeout if timeout is None else _check_timeout(timeout)
        if self._http.is_closed:
            raise _closed(call)
        try:
            with anyio.fail_after(budget):
                resp = await self._http.request(
                    call.method,
                    self.base_url + call.path,
                    params=call.params,
                    json=call.body,
                    headers=self._headers,
                    timeout=httpx.Timeout(budget),
                )
        except (httpx.HTTPError, TimeoutError) as e:
            raise _transport_error(call, e, budget) from e
        except UnicodeEncodeError:
            raise RecapInputError(f"{call.method} {call.path}: an argument is not valid text") from None
        return _read(call, resp.status_code, resp.content)

    async def recall(
        self,
        bot: str,
        user_id: str,
        since: Optional[str] = None,
        until: Optional[str] = None,
        limit: Optional[int] = None,
        type: Optional[str] = None,
        tz: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
    ) -> List[Summary]:
        """See `Recap.recall`."""
        return await self._run(_recall(bot, user_id, since, until, limit, type, tz), timeout)

    async def search(
        self,
        bot: str,
        user_id: str,
        vector: Optional[Vector] = None,
        text: Optional[str] = None,
        limit: Optional[int] = None,
        since: Optional[str] = None,
        until: Optional[str] = None,
        tz: Optional[str] = None,
        type: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
    ) -> List[Summary]:
        """See `Recap.search`."""
        return await self._run(_search(bot, user_id, vector, text, limit, since, until, tz, type), timeout)

    async def context(
        self,
        bot: str,
        user_id: str,
        max_tokens: Optional[int] = None,
        query: Optional[str] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Context:
        """See `Recap.context`."""
        return await self._run(_context(bot, user_id, max_tokens, query), timeout)

    async def forget(self, bot: str, user_id: str, *, timeout: Optional[float] = None) -> Forgotten:
        """See `Recap.forget`."""
        return await self._run(_forget(bot, user_id), timeout)
