"""recall, search and forget against the live recap, sync and async."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np
from conftest import Live

from recap_client import AsyncRecap, Forgotten, Recap, Summary


def test_recall(live: Live) -> None:
    with Recap(live.url, token=live.token) as r:
        items = r.recall(live.bot, live.user, since="2000-01-01", limit=100)
        assert len(items) == live.windows, items
        assert all(isinstance(s, Summary) and isinstance(s.start, datetime) and s.start.tzinfo for s in items)
        assert all(s.bot == live.bot and s.user_id == live.user and s.score is None for s in items)
        assert [s.start for s in items] == sorted((s.start for s in items), reverse=True)
        assert r.recall(live.bot, live.user, since="7d") == []  # the seeded data is older
        # positional arguments in the order they always had, and user_id= as the API names it
        assert r.recall(live.bot, live.user, "2000-01-01", None, 2) == items[:2]
        assert r.recall(live.bot, user_id=live.user, limit=3, type="time_window", tz="Europe/Berlin") == items[:3]


def test_search_by_vector_text_both_and_numpy(live: Live) -> None:
    with Recap(live.url, token=live.token) as r:
        hits = r.search(live.bot, live.user, vector=live.vector, limit=3)
        assert hits and all(h.score is not None for h in hits), hits
        assert live.topic in hits[0].text or live.topic in hits[0].key_topics, hits[0]
        # a numpy array (float32, as embedding models return) finds the same window
        arr = np.asarray(live.vector, dtype=np.float32)
        assert r.search(live.bot, live.user, vector=arr, limit=3)[0].id == hits[0].id
        found = r.search(live.bot, live.user, text=f"tell me about {live.topic}", limit=3)
        assert found and (live.topic in found[0].text or live.topic in found[0].key_topics), found
        assert r.search(live.bot, live.user, vector=arr, text=live.topic, limit=1)[0].id == found[0].id


def test_one_client_many_threads(live: Live) -> None:
    with Recap(live.url, token=live.token) as r:
        want = r.recall(live.bot, live.user, limit=5)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda _: r.recall(live.bot, live.user, limit=5), range(32)))
        assert got == [want] * 32


def test_async_methods_concurrently(live: Live) -> None:
    async def run() -> None:
        async with AsyncRecap(live.url, token=live.token) as a:
            t = time.monotonic()
            got, found, near = await asyncio.gather(
                a.recall(live.bot, live.user, limit=2),
                a.search(live.bot, live.user, text=live.topic),
                a.search(live.bot, live.user, vector=np.asarray(live.vector), limit=1),
            )
            assert len(got) == 2 and found and near, (got, found, near)
            assert got == await a.recall(live.bot, user_id=live.user, limit=2)
            assert time.monotonic() - t < 10

    asyncio.run(run())


def test_forget(live: Live) -> None:
    user = live.forget_user
    with Recap(live.url, token=live.token) as r:
        assert len(r.recall(live.bot, user, since="2000-01-01", limit=100)) == live.windows

        async def run() -> Forgotten:
            async with AsyncRecap(live.url, token=live.token) as a:
                gone = await a.forget(live.bot, user)
                assert await a.recall(live.bot, user) == []
                return gone

        gone = asyncio.run(run())
        assert isinstance(gone, Forgotten) and gone.deleted["conversation_summaries"] == live.windows, gone
        again = r.forget(live.bot, user_id=user)  # idempotent
        assert again.deleted["conversation_summaries"] == 0, again
        # ids are path segments: every reserved character is escaped, so this reaches the route (200, nothing held)
        odd = r.forget(live.bot, "a/b c?d=%2F#é")
        assert sum(odd.deleted.values()) == 0 and "conversation_summaries" in odd.deleted, odd
        # the other user is untouched
        assert len(r.recall(live.bot, live.user, since="2000-01-01", limit=100)) == live.windows
