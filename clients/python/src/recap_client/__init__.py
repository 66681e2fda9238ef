"""Client for recap's recall API: read back a user's conversation summaries by time or similarity, forget a user.

Standard library only. `Recap` is synchronous; `AsyncRecap` has the same methods as coroutines (each request runs in
a worker thread, so it never blocks the event loop).
"""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["Recap", "AsyncRecap", "Summary", "Forgotten", "RecapError"]


class RecapError(Exception):
    """A request recap refused or could not answer: `status` (HTTP), `field` (the input at fault, if any)."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(f"{status}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.message = message
        self.field = field


def _time(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Summary:
    """One conversation summary."""

    id: int
    bot: str
    user_id: str
    summary_type: str
    text: str
    key_topics: List[str]
    emotional_tone: Optional[str]
    start: datetime
    end: datetime
    message_count: int
    revision: int
    score: Optional[float] = None

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Summary":
        return cls(
            id=int(d["id"]),
            bot=d["bot"],
            user_id=d["user_id"],
            summary_type=d["summary_type"],
            text=d["text"],
            key_topics=list(d.get("key_topics") or []),
            emotional_tone=d.get("emotional_tone"),
            start=_time(d["start"]),
            end=_time(d["end"]),
            message_count=int(d["message_count"]),
            revision=int(d["revision"]),
            score=d.get("score"),
        )


@dataclass(frozen=True)
class Forgotten:
    """What forgetting a user deleted, rows per table."""

    deleted: Dict[str, int] = field(default_factory=dict)


class Recap:
    """Synchronous client. `base_url` is recap's HTTP_ADDR (e.g. http://127.0.0.1:9090); `token` its RECALL_TOKEN."""

    def __init__(self, base_url: str, token: Optional[str] = None, timeout: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {"error": raw.decode(errors="replace")}
            raise RecapError(e.code, err.get("error", ""), err.get("field")) from None

    def recall(
        self,
        bot: str,
        user: str,
        since: Optional[str] = None,
        until: Optional[str] = None,
        limit: Optional[int] = None,
        type: Optional[str] = None,
        tz: Optional[str] = None,
    ) -> List[Summary]:
        """The user's summaries overlapping [since, until), newest first. `since`/`until`: RFC 3339, a date, `7d`,
        `yesterday`, `last week`, `this month` ... resolved in `tz` (IANA, default UTC)."""
        params = {"bot": bot, "user_id": user, "since": since, "until": until, "limit": limit, "type": type, "tz": tz}
        qs = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        return [Summary.from_json(i) for i in self._request("GET", f"/v1/recall?{qs}")["items"]]

    def search(
        self,
        bot: str,
        user: str,
        vector: Optional[Sequence[float]] = None,
        text: Optional[str] = None,
        limit: Optional[int] = None,
        since: Optional[str] = None,
        until: Optional[str] = None,
        tz: Optional[str] = None,
        type: Optional[str] = None,
    ) -> List[Summary]:
        """The user's summaries nearest to `vector` (the bot's own embedding of a message), matching `text`, or both
        (fused), best first; each has a `score`."""
        body: Dict[str, Any] = {"bot": bot, "user_id": user}
        for k, v in (("vector", list(vector) if vector is not None else None), ("text", text), ("limit", limit),
                     ("since", since), ("until", until), ("tz", tz), ("type", type)):
            if v is not None:
                body[k] = v
        return [Summary.from_json(i) for i in self._request("POST", "/v1/recall/search", body)["items"]]

    def forget(self, bot: str, user: str) -> Forgotten:
        """Deletes everything recap holds about the user (summaries, state, summary vectors); idempotent."""
        path = f"/v1/users/{urllib.parse.quote(bot, safe='')}/{urllib.parse.quote(user, safe='')}"
        return Forgotten(deleted=dict(self._request("DELETE", path).get("deleted", {})))


class AsyncRecap:
    """Asynchronous client with the same methods as `Recap`, as coroutines."""

    def __init__(self, base_url: str, token: Optional[str] = None, timeout: float = 5.0):
        self._sync = Recap(base_url, token, timeout)

    async def __aenter__(self) -> "AsyncRecap":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def recall(self, bot: str, user: str, **kwargs: Any) -> List[Summary]:
        return await asyncio.to_thread(self._sync.recall, bot, user, **kwargs)

    async def search(self, bot: str, user: str, **kwargs: Any) -> List[Summary]:
        return await asyncio.to_thread(self._sync.search, bot, user, **kwargs)

    async def forget(self, bot: str, user: str) -> Forgotten:
        return await asyncio.to_thread(self._sync.forget, bot, user)
