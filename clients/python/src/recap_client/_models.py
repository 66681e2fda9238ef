"""Typed results: frozen dataclasses built from the API's JSON (unknown keys are ignored, so a newer recap that adds
fields does not break an older client)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "Summary",
    "Forgotten",
    "Context",
    "Conversation",
    "ConversationSummary",
    "Message",
    "parse_time",
]

_FRACTION = re.compile(r"\.(\d+)")


def parse_time(s: str) -> datetime:
    """An RFC 3339 timestamp as an aware `datetime` (any fraction length, `Z` or an offset; no offset means UTC)."""
    t = s.strip().replace("z", "Z")
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    # datetime.fromisoformat before 3.11 takes only 3 or 6 fractional digits: pad or cut to 6.
    t = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], t, count=1)
    d = datetime.fromisoformat(t.replace(" ", "T", 1))
    return d if d.tzinfo is not None else d.replace(tzinfo=timezone.utc)


def _str_list(v: Any) -> List[str]:
    return [str(x) for x in (v or [])]


def _opt_time(v: Any) -> Optional[datetime]:
    return None if v is None else parse_time(str(v))


@dataclass(frozen=True)
class Summary:
    """One conversation summary, as `/v1/recall` and `/v1/recall/search` return it (`score` in search only)."""

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
    def from_json(cls, d: Mapping[str, Any]) -> "Summary":
        score = d.get("score")
        tone = d.get("emotional_tone")
        return cls(
            id=int(d["id"]),
            bot=str(d["bot"]),
            user_id=str(d["user_id"]),
            summary_type=str(d["summary_type"]),
            text=str(d["text"]),
            key_topics=_str_list(d.get("key_topics")),
            emotional_tone=None if tone is None else str(tone),
            start=parse_time(d["start"]),
            end=parse_time(d["end"]),
            message_count=int(d["message_count"]),
            revision=int(d["revision"]),
            score=None if score is None else float(score),
        )


@dataclass(frozen=True)
class Forgotten:
    """What forgetting a user deleted: rows per table."""

    deleted: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Forgotten":
        return cls(deleted={str(k): int(v) for k, v in (d.get("deleted") or {}).items()})


@dataclass(frozen=True)
class ConversationSummary:
    """The summary of a conversation's earlier part (running, while it is open) or of all of it (final, once closed).

    It covers `message_count` messages, the last stored at `covers_until`; every other message of the conversation is
    in `Conversation.messages`, verbatim.
    """

    text: str
    key_topics: List[str]
    message_count: int
    covers_until: Optional[datetime]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ConversationSummary":
        return cls(
            text=str(d["text"]),
            key_topics=_str_list(d.get("key_topics")),
            message_count=int(d["message_count"]),
            covers_until=_opt_time(d.get("covers_until")),
        )


@dataclass(frozen=True)
class Message:
    """One message verbatim: `role` (`user`, `assistant`, ...), `text`, its stored time `ts`, its Qdrant `point_id`
    (a UUID or an unsigned integer, as text). `truncated` is true only for a latest message that alone exceeded the
    budget and was cut."""

    role: str
    text: str
    ts: datetime
    point_id: str
    truncated: bool = False

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Message":
        return cls(
            role=str(d["role"]),
            text=str(d["text"]),
            ts=parse_time(d["ts"]),
            point_id=str(d["point_id"]),
            truncated=bool(d.get("truncated", False)),
        )


@dataclass(frozen=True)
class Conversation:
    """The user's open conversation (`open`), or with none open their last closed one (its final summary, no
    messages). Exhaustive: `summary` plus `messages` (oldest first, the latest last) is the whole conversation, less
    the `Context.omitted` oldest messages the budget dropped."""

    start: datetime
    open: bool
    summary: Optional[ConversationSummary]
    messages: List[Message]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Conversation":
        s = d.get("summary")
        return cls(
            start=parse_time(d["start"]),
            open=bool(d["open"]),
            summary=None if s is None else ConversationSummary.from_json(s),
            messages=[Message.from_json(m) for m in (d.get("messages") or [])],
        )


@dataclass(frozen=True)
class Context:
    """What a bot puts in its prompt, under `max_tokens` (`GET /v1/context`): the current `conversation` (None when
    recap holds no history of the user), and recaps of `earlier` conversations (newest first, or the most relevant
    first with `query=`). `tokens` is recap's estimate of the whole; `omitted` counts the messages the budget dropped
    (the oldest verbatim ones, and the running summary's `message_count` if it was dropped too)."""

    bot: str
    user_id: str
    tokens: int
    max_tokens: int
    omitted: int
    conversation: Optional[Conversation]
    earlier: List[Summary]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Context":
        c = d.get("conversation")
        return cls(
            bot=str(d["bot"]),
            user_id=str(d["user_id"]),
            tokens=int(d["tokens"]),
            max_tokens=int(d["max_tokens"]),
            omitted=int(d.get("omitted") or 0),
            conversation=None if c is None else Conversation.from_json(c),
            earlier=[Summary.from_json(i) for i in (d.get("earlier") or [])],
        )
