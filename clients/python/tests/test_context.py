"""context(): what a bot puts in its prompt (GET /v1/context, issue 23), sync and async, against the live recap.

Skipped, with a message, only while the recap under test has no /v1/context route (a 404 that names no field).
"""

from __future__ import annotations

import asyncio
from typing import Iterator

import httpx
import pytest
from conftest import Live

from recap_client import (
    AsyncRecap,
    Context,
    Conversation,
    Recap,
    RecapAPIError,
    RecapAuthError,
    RecapError,
    Summary,
)


@pytest.fixture
def r(live: Live) -> Iterator[Recap]:
    probe = httpx.get(
        f"{live.url}/v1/context",
        params={"bot": live.bot, "user_id": live.user},
        headers={"Authorization": f"Bearer {live.token}"},
        timeout=10,
    )
    if probe.status_code == 404 and '"field"' not in probe.text:
        pytest.skip(f"GET /v1/context answers 404 ({probe.text[:80]!r}): this recap has no context endpoint yet")
    with Recap(live.url, token=live.token) as client:
        yield client


def _check_budget(c: Context) -> None:
    assert 0 <= c.tokens <= c.max_tokens, c


def test_open_conversation_verbatim_latest_last(r: Recap, live: Live) -> None:
    c = r.context(live.bot, live.open_user, max_tokens=4000)
    assert (c.bot, c.user_id, c.max_tokens) == (live.bot, live.open_user, 4000)
    _check_budget(c)
    conv = c.conversation
    assert isinstance(conv, Conversation) and conv.open, c
    # fewer messages than CONTEXT_SUMMARY_EVERY: no running summary, every message verbatim, oldest first
    assert conv.summary is None and c.omitted == 0, c
    assert [m.text for m in conv.messages] == live.open_texts, conv.messages
    assert [m.ts for m in conv.messages] == sorted(m.ts for m in conv.messages)
    assert conv.start <= conv.messages[0].ts
    assert all(m.role in ("user", "assistant") and m.point_id and not m.truncated for m in conv.messages)
    assert c.earlier == []  # this user has no closed conversation


def test_a_small_budget_drops_the_oldest_first(r: Recap, live: Live) -> None:
    c = r.context(live.bot, live.open_user, max_tokens=64)
    _check_budget(c)
    assert c.conversation is not None and c.conversation.messages, c
    msgs = c.conversation.messages
    latest = msgs[-1]
    assert latest.text == live.open_texts[-1] or (latest.truncated and live.open_texts[-1].startswith(latest.text[:20]))
    assert c.omitted > 0 and c.omitted + len(msgs) == len(live.open_texts), c
    assert [m.text for m in msgs[:-1]] == live.open_texts[len(live.open_texts) - len(msgs) : -1]


def test_closed_conversation_and_earlier_recaps(r: Recap, live: Live) -> None:
    c = r.context(live.bot, live.user, max_tokens=3000)
    _check_budget(c)
    conv = c.conversation
    assert conv is not None and not conv.open and conv.messages == [], c
    assert conv.summary is not None and conv.summary.text and conv.summary.message_count > 0, conv
    latest = r.recall(live.bot, live.user, since="2000-01-01", limit=1)[0]
    assert conv.start == latest.start and conv.summary.text == latest.text
    assert c.earlier and all(isinstance(s, Summary) and s.user_id == live.user for s in c.earlier), c
    assert latest.id not in [s.id for s in c.earlier]  # the conversation is not repeated
    assert [s.start for s in c.earlier] == sorted((s.start for s in c.earlier), reverse=True)
    # with a query, the most relevant earlier recap first
    q = r.context(live.bot, live.user, max_tokens=3000, query=f"tell me about {live.topic}")
    _check_budget(q)
    assert q.earlier and (live.topic in q.earlier[0].text or live.topic in q.earlier[0].key_topics), q.earlier[0]
    # a smaller budget keeps fewer earlier recaps
    small = r.context(live.bot, live.user, max_tokens=64)
    _check_budget(small)
    assert len(small.earlier) < len(c.earlier), (small, c)


def test_no_history_is_null_not_404(r: Recap, live: Live) -> None:
    c = r.context(live.bot, "nobody-recap-has-seen", max_tokens=600)
    assert c.conversation is None and c.earlier == [] and c.omitted == 0, c


def test_context_errors(r: Recap, live: Live) -> None:
    for bad in (0, 63):
        with pytest.raises(RecapAPIError) as e:
            r.context(live.bot, live.open_user, max_tokens=bad)
        assert 400 <= e.value.status < 500 and e.value.field == "max_tokens", e.value
    with pytest.raises(RecapAPIError) as e:
        r.context(live.bot, "", max_tokens=600)
    assert e.value.field == "user_id", e.value
    with Recap(live.url) as anonymous, pytest.raises(RecapAuthError) as auth:
        anonymous.context(live.bot, live.open_user, max_tokens=600)
    assert auth.value.status == 401


def test_async_context(r: Recap, live: Live) -> None:
    want = r.context(live.bot, live.open_user, max_tokens=4000)

    async def run() -> None:
        async with AsyncRecap(live.url, token=live.token) as a:
            got, closed = await asyncio.gather(
                a.context(live.bot, live.open_user, max_tokens=4000),
                a.context(live.bot, live.user, 3000, f"about {live.topic}"),
            )
            assert got.conversation is not None and want.conversation is not None
            assert got.conversation.messages == want.conversation.messages
            assert closed.conversation is not None and not closed.conversation.open

    asyncio.run(run())


def test_the_readme_prompt_lines(r: Recap, live: Live) -> None:
    """The ~20 lines of README.md ("Python client: a bot's prompt from context()"), as written there."""
    recap = r

    def memory_for_prompt(bot: str, user_id: str, message: str) -> str:
        """What recap knows of this user in at most 800 tokens: this conversation so far, then earlier ones."""
        try:
            ctx = recap.context(bot, user_id, max_tokens=800, query=message)
        except RecapError:
            return ""  # memory is an extra: never fail the reply for it
        parts = [f"- {s.start:%Y-%m-%d}: {s.text}" for s in reversed(ctx.earlier)]
        parts = ["Earlier conversations:", *parts] if parts else []
        conv = ctx.conversation
        if conv is not None and conv.summary is not None:
            when = "This conversation so far" if conv.open else f"Our last conversation ({conv.start:%Y-%m-%d})"
            parts.append(f"{when}: {conv.summary.text}")
        if conv is not None and conv.messages:  # verbatim, oldest first; replaces the bot's own recent-history query
            parts += ["Latest messages:", *(f"{m.role}: {m.text}" for m in conv.messages)]
        return "\n".join(parts)

    talking = memory_for_prompt(live.bot, live.open_user, "which bags?")
    assert talking.startswith("Latest messages:") and talking.endswith(live.open_texts[-1]), talking
    known = memory_for_prompt(live.bot, live.user, f"my {live.topic}")
    assert "Earlier conversations:" in known and "Our last conversation (" in known, known
    assert memory_for_prompt("no-such-bot", live.user, "hi") == ""  # a 404 is a RecapError too
    assert memory_for_prompt(live.bot, "", "hi") == ""
