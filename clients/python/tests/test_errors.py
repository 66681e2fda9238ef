"""Every failure is a RecapError subclass: recap's 4xx naming the field, 401, an unreachable recap, one that does not
answer within the call's timeout, a cancelled call, an answer that is not the API's."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Callable, List, Tuple

import pytest
from conftest import Live, Stub

from recap_client import (
    AsyncRecap,
    Recap,
    RecapAPIError,
    RecapAuthError,
    RecapError,
    RecapInputError,
    RecapResponseError,
    RecapTimeout,
    RecapTransportError,
)


def test_4xx_names_the_field(live: Live) -> None:
    with Recap(live.url, token=live.token) as r:
        cases: List[Tuple[Callable[[], object], str]] = [
            (lambda: r.recall(live.bot, live.user, since="soon"), "since"),
            (lambda: r.recall(live.bot, live.user, tz="Mars/Olympus"), "tz"),
            (lambda: r.recall(live.bot, live.user, limit=0), "limit"),
            (lambda: r.recall(live.bot, ""), "user_id"),
            (lambda: r.recall("no-such-bot", live.user), "bot"),
            (lambda: r.search(live.bot, live.user, vector=[1.0, 2.0]), "vector"),
            (lambda: r.search(live.bot, live.user, text="x", limit=1000), "limit"),
        ]
        for call, field in cases:
            with pytest.raises(RecapAPIError) as e:
                call()
            err = e.value
            assert 400 <= err.status < 500 and err.field == field, (field, err)
            assert err.message and not isinstance(err, RecapAuthError), err


def test_401_without_or_with_a_wrong_token(live: Live) -> None:
    for token in (None, "wrong-token-0123456789"):
        with Recap(live.url, token=token) as r:
            for call in (
                lambda: r.recall(live.bot, live.user),
                lambda: r.search(live.bot, live.user, text="x"),
                lambda: r.forget(live.bot, live.user),
            ):
                with pytest.raises(RecapAuthError) as e:
                    call()
                assert e.value.status == 401 and e.value.field == "authorization", e.value
                assert "wrong-token" not in str(e.value)
    with Recap(live.url, token=live.token) as r:  # the user was not forgotten by the refused DELETE
        assert len(r.recall(live.bot, live.user, limit=100)) == live.windows


def test_client_side_vector_check_sends_nothing(stub: Stub) -> None:
    with Recap(stub.url) as r:
        with pytest.raises(RecapInputError) as e:
            r.search("b", "u", vector=[0.1, float("inf")])
        assert e.value.field == "vector"
    assert stub.requests == 0


def test_transport_failure_to_a_closed_port(closed_port_url: str) -> None:
    with Recap(closed_port_url, timeout=5) as r:
        t = time.monotonic()
        with pytest.raises(RecapTransportError) as e:
            r.recall("b", "u")
        assert not isinstance(e.value, RecapTimeout) and e.value.status is None, e.value
        assert time.monotonic() - t < 2  # refused at once, not timed out

    async def run() -> None:
        async with AsyncRecap(closed_port_url) as a:
            with pytest.raises(RecapTransportError) as e:
                await a.context("b", "u")
            assert not isinstance(e.value, RecapTimeout)

    asyncio.run(run())


def test_timeout_is_one_budget_per_call(silent_url: str) -> None:
    with Recap(silent_url, timeout=0.5) as r:
        t = time.monotonic()
        with pytest.raises(RecapTimeout) as e:
            r.recall("b", "u")
        took = time.monotonic() - t
        assert 0.4 < took < 2.0, took
        err = e.value
        assert isinstance(err, RecapTransportError) and isinstance(err, TimeoutError) and isinstance(err, RecapError)
        t = time.monotonic()
        with pytest.raises(RecapTimeout):
            r.forget("b", "u", timeout=0.2)  # a call's own timeout overrides the client's
        assert time.monotonic() - t < 1.0

    async def run() -> None:
        async with AsyncRecap(silent_url, timeout=0.5) as a:
            t = time.monotonic()
            with pytest.raises(RecapTimeout):
                await a.search("b", "u", text="x")
            assert 0.4 < time.monotonic() - t < 2.0
            t = time.monotonic()
            with pytest.raises(RecapTimeout):
                await a.recall("b", "u", timeout=0.2)
            assert time.monotonic() - t < 1.0

    asyncio.run(run())


def test_async_call_is_cancellable(silent_url: str, live: Live) -> None:
    async def run() -> None:
        async with AsyncRecap(silent_url, timeout=30) as stuck, AsyncRecap(live.url, token=live.token) as ok:
            task = asyncio.ensure_future(stuck.recall("b", "u"))
            await asyncio.sleep(0.2)
            t = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - t < 1.0
            # wait_for's cancellation is a timeout of the caller's choosing: the same
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stuck.recall("b", "u"), 0.2)
            # the other client's pool is unaffected
            assert len(await ok.recall(live.bot, live.user, limit=1)) == 1

    asyncio.run(run())


def test_answers_that_are_not_the_api(stub: Stub) -> None:
    with Recap(stub.url) as r:
        stub.status, stub.body, stub.content_type = 200, b"<html>proxy login</html>", "text/html"
        with pytest.raises(RecapResponseError) as e:
            r.recall("b", "u")
        assert e.value.status == 200
        stub.body, stub.content_type = b'{"items": [{"id": "x"}]}', "application/json"
        with pytest.raises(RecapResponseError):
            r.recall("b", "u")
        stub.status, stub.body, stub.content_type = 502, b"Bad Gateway", "text/plain"
        with pytest.raises(RecapAPIError) as api:
            r.recall("b", "u")
        assert api.value.status == 502 and api.value.field is None and "Bad Gateway" in api.value.message
        stub.status, stub.body = 503, b'{"error": "postgres is unavailable"}'
        with pytest.raises(RecapAPIError) as api:
            r.forget("b", "u")
        assert api.value.status == 503 and api.value.message == "postgres is unavailable"
    assert stub.connections == 1 and stub.requests == 4, stub  # one pooled connection for every call


def test_a_closed_client_raises_a_recap_error(stub: Stub) -> None:
    r = Recap(stub.url)
    r.close()
    with pytest.raises(RecapError):
        r.recall("b", "u")

    async def run() -> None:
        a = AsyncRecap(stub.url)
        await a.aclose()
        with pytest.raises(RecapError):
            await a.recall("b", "u")

    asyncio.run(run())
    assert stub.requests == 0


def test_bad_timeout_is_refused() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RecapInputError):
            Recap("http://127.0.0.1:1", timeout=bad)


def test_bad_base_url_is_refused() -> None:
    for bad in ("127.0.0.1:9464", "ftp://host", "http://"):
        with pytest.raises(RecapInputError) as e:
            Recap(bad)
        assert e.value.field == "base_url"


def _slow_server(head_after: float, body_after: float) -> Tuple[str, threading.Thread]:
    """A server that answers one request: headers after `head_after` s, the 2-byte body `body_after` s later."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(65536)
            time.sleep(head_after)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n")
            time.sleep(body_after)
            try:
                conn.sendall(b"{}")
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", t


def test_slow_steps_add_up_to_one_timeout() -> None:
    """Headers after 0.8 s and the body 0.8 s later: each step is within the 1 s timeout, the call is not (per-step
    timeouts would end it at 1.6 s)."""
    url, t = _slow_server(0.8, 0.8)
    with Recap(url, timeout=1.0) as r:
        start = time.monotonic()
        with pytest.raises(RecapTimeout):
            r.forget("b", "u")
        assert time.monotonic() - start < 1.4
    t.join(2)

    async def run() -> None:
        url, t = _slow_server(0.8, 0.8)
        async with AsyncRecap(url, timeout=1.0) as a:
            start = time.monotonic()
            with pytest.raises(RecapTimeout):
                await a.forget("b", "u")
            assert time.monotonic() - start < 1.4
        t.join(2)

    asyncio.run(run())


def test_arguments_that_cannot_be_sent(stub: Stub) -> None:
    with Recap(stub.url) as r:
        calls: List[Callable[[], object]] = [
            lambda: r.recall("b", "\ud800"),
            lambda: r.forget("b", "\ud800"),
            lambda: r.context("\udfff", "u"),
        ]
        for call in calls:
            with pytest.raises(RecapInputError):
                call()
        stub.body = b'{"items": [[1, 2]]}'
        with pytest.raises(RecapResponseError):
            r.recall("b", "u")
        stub.body = b'{"deleted": [1]}'
        with pytest.raises(RecapResponseError):
            r.forget("b", "u")
    with pytest.raises(RecapInputError) as e:
        Recap(stub.url, token="t\u00e9st\n")
    assert e.value.field == "token" and "t\u00e9st" not in str(e.value)
    assert stub.requests == 2
