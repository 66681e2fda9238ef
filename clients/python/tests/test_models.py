"""The client's pure parts, no server: time parsing, result types from the API's JSON, vector conversion."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Dict

import numpy as np
import pytest

from recap_client import (
    Context,
    Conversation,
    ConversationSummary,
    Message,
    RecapError,
    RecapInputError,
    Summary,
    parse_time,
)
from recap_client._client import _vector

UTC = timezone.utc


@pytest.mark.parametrize(
    "text, want",
    [
        ("2026-11-20T12:00:00Z", datetime(2026, 11, 20, 12, tzinfo=UTC)),
        ("2026-11-20T12:00:00+00:00", datetime(2026, 11, 20, 12, tzinfo=UTC)),
        ("2026-11-20T12:00:00.5Z", datetime(2026, 11, 20, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-20T12:00:00.123456789Z", datetime(2026, 11, 20, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-20 12:00:00", datetime(2026, 11, 20, 12, tzinfo=UTC)),
        (
            "2026-11-20T13:30:00+01:30",
            datetime(2026, 11, 20, 13, 30, tzinfo=timezone(timedelta(hours=1, minutes=30))),
        ),
    ],
)
def test_parse_time(text: str, want: datetime) -> None:
    got = parse_time(text)
    assert got == want and got.tzinfo is not None


def _item(i: int, **extra: Any) -> Dict[str, Any]:
    return {
        "id": i,
        "bot": "elena",
        "user_id": "u1",
        "summary_type": "time_window",
        "text": f"summary {i}",
        "key_topics": ["hiking"],
        "emotional_tone": None,
        "start": "2026-11-20T12:00:00Z",
        "end": "2026-11-20T12:30:00Z",
        "message_count": 6,
        "revision": 1,
        **extra,
    }


def test_context_from_the_issue_shape() -> None:
    doc: Dict[str, Any] = {
        "bot": "elena",
        "user_id": "u1",
        "tokens": 512,
        "max_tokens": 600,
        "omitted": 2,
        "conversation": {
            "start": "2026-12-07T10:00:00Z",
            "open": True,
            "summary": {
                "text": "They planned a hike.",
                "key_topics": ["hiking", "weather"],
                "message_count": 20,
                "covers_until": "2026-12-07T10:40:00.123Z",
            },
            "messages": [
                {"role": "user", "text": "and the weather?", "ts": "2026-12-07T10:41:00Z", "point_id": "p-1"},
                {"role": "assistant", "text": "sunny", "ts": "2026-12-07T10:41:05Z", "point_id": "7", "new": 1},
            ],
        },
        "earlier": [_item(2, future_field="ignored"), _item(1)],
        "a_field_from_a_newer_recap": True,
    }
    c = Context.from_json(doc)
    assert (c.bot, c.user_id, c.tokens, c.max_tokens, c.omitted) == ("elena", "u1", 512, 600, 2)
    assert isinstance(c.conversation, Conversation) and c.conversation.open
    assert c.conversation.summary == ConversationSummary(
        "They planned a hike.", ["hiking", "weather"], 20, datetime(2026, 12, 7, 10, 40, 0, 123000, tzinfo=UTC)
    )
    assert c.conversation.messages == [
        Message("user", "and the weather?", datetime(2026, 12, 7, 10, 41, tzinfo=UTC), "p-1"),
        Message("assistant", "sunny", datetime(2026, 12, 7, 10, 41, 5, tzinfo=UTC), "7"),
    ]
    assert [s.id for s in c.earlier] == [2, 1] and all(isinstance(s, Summary) for s in c.earlier)

    closed = Context.from_json({**doc, "conversation": {**doc["conversation"], "open": False, "summary": None}})
    assert closed.conversation is not None and not closed.conversation.open and closed.conversation.summary is None
    none = Context.from_json({**doc, "conversation": None, "earlier": []})
    assert none.conversation is None and none.earlier == []


def test_summary_from_json() -> None:
    s = Summary.from_json(_item(3, score=0.25, emotional_tone="joy"))
    assert (s.id, s.score, s.emotional_tone, s.key_topics) == (3, 0.25, "joy", ["hiking"])
    assert s.end - s.start == timedelta(minutes=30)
    assert Summary.from_json(_item(4)).score is None


def test_vectors_lists_and_arrays() -> None:
    assert _vector([1, 2.5, np.float32(0.5)]) == [1.0, 2.5, 0.5]
    assert _vector(np.array([0.25, -1.0], dtype=np.float32)) == [0.25, -1.0]
    assert _vector(np.arange(3, dtype=np.float64)) == [0.0, 1.0, 2.0]
    assert _vector((0.5,)) == [0.5]


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 2)), np.float32(1.0), [1.0, "2"], "1,2", [float("nan")], np.array([1.0, np.inf]), [True, 1.0]],
)
def test_bad_vectors_are_refused_before_sending(bad: Any) -> None:
    with pytest.raises(RecapInputError) as e:
        _vector(bad)
    assert e.value.field == "vector" and isinstance(e.value, RecapError) and isinstance(e.value, ValueError)
