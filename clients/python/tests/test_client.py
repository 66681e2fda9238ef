"""Runs the client against a live recap (started by tests/recall.rs): plain script, also collectable by pytest.

Environment: RECAP_URL, RECAP_TOKEN, RECAP_BOT, RECAP_USER (a user with RECAP_WINDOWS summaries, forgotten at the
end), RECAP_VECTOR (JSON list near one window's topic), RECAP_TOPIC (that topic's word).
"""
import asyncio
import json
import os
from datetime import datetime

from recap_client import AsyncRecap, Forgotten, Recap, RecapError, Summary


def test_client() -> None:
    url, token = os.environ["RECAP_URL"], os.environ["RECAP_TOKEN"]
    bot, user = os.environ["RECAP_BOT"], os.environ["RECAP_USER"]
    vector = json.loads(os.environ["RECAP_VECTOR"])
    topic, windows = os.environ["RECAP_TOPIC"], int(os.environ["RECAP_WINDOWS"])
    r = Recap(url, token=token)

    items = r.recall(bot, user, since="2000-01-01", limit=100)
    assert len(items) == windows, items
    assert all(isinstance(s, Summary) and isinstance(s.start, datetime) for s in items)
    assert [s.start for s in items] == sorted((s.start for s in items), reverse=True)
    assert r.recall(bot, user, since="7d") == []  # the seeded data is older

    hits = r.search(bot, user, vector=vector, limit=3)
    assert hits and hits[0].score is not None, hits
    assert topic in hits[0].text or topic in hits[0].key_topics, hits[0]
    hits = r.search(bot, user, text=f"tell me about {topic}", limit=3)
    assert hits and (topic in hits[0].text or topic in hits[0].key_topics), hits
    assert r.search(bot, user, vector=vector, text=topic, limit=1)[0].id == hits[0].id

    for bad, field in ((lambda: r.recall(bot, user, since="soon"), "since"),
                       (lambda: r.search(bot, user, vector=[1.0, 2.0]), "vector"),
                       (lambda: r.recall(bot, user, limit=0), "limit"),
                       (lambda: Recap(url, token="wrong").recall(bot, user), "authorization")):
        try:
            bad()
            raise AssertionError(f"no error for {field}")
        except RecapError as e:
            assert 400 <= e.status < 500 and e.field == field, e

    async def run_async() -> None:
        async with AsyncRecap(url, token=token) as a:
            got, found = await asyncio.gather(a.recall(bot, user, limit=2), a.search(bot, user, text=topic))
            assert len(got) == 2 and found
            gone = await a.forget(bot, user)
            assert isinstance(gone, Forgotten) and gone.deleted["conversation_summaries"] == windows, gone
            assert await a.recall(bot, user) == []

    asyncio.run(run_async())
    assert r.forget(bot, user).deleted["conversation_summaries"] == 0


if __name__ == "__main__":
    test_client()
    print("python client: ok")
