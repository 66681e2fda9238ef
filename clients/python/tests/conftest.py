"""Fixtures: the live recap that tests/it/python_client.rs starts (seeded data described by RECAP_* variables), and
local stand-ins for what recap cannot be made to do on demand (a closed port, a server that never answers, one that
answers garbage).

Environment (set by tests/it/python_client.rs):
- RECAP_URL, RECAP_TOKEN: a `recap run` with the recall API and its RECALL_TOKEN.
- RECAP_BOT; RECAP_USER: a user with RECAP_WINDOWS closed windows, all older than 7 days, only read here;
  RECAP_FORGET_USER: another user with as many windows, forgotten by the tests.
- RECAP_VECTOR (a JSON list) near the topic RECAP_TOPIC, which one of RECAP_USER's windows is about.
- RECAP_OPEN_USER: a user talking right now (no closed window); RECAP_OPEN_TEXTS: their messages, oldest first.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, List

import pytest


@dataclass(frozen=True)
class Live:
    url: str
    token: str
    bot: str
    user: str
    forget_user: str
    windows: int
    vector: List[float]
    topic: str
    open_user: str
    open_texts: List[str]


def _env(name: str) -> str:
    v = os.environ.get(name)
    if not v:
        pytest.fail(f"{name} is not set: these tests run against a live recap; run `cargo test --test it python_client::`")
    return v


@pytest.fixture(scope="session")
def live() -> Live:
    return Live(
        url=_env("RECAP_URL"),
        token=_env("RECAP_TOKEN"),
        bot=_env("RECAP_BOT"),
        user=_env("RECAP_USER"),
        forget_user=_env("RECAP_FORGET_USER"),
        windows=int(_env("RECAP_WINDOWS")),
        vector=[float(x) for x in json.loads(_env("RECAP_VECTOR"))],
        topic=_env("RECAP_TOPIC"),
        open_user=_env("RECAP_OPEN_USER"),
        open_texts=[str(t) for t in json.loads(_env("RECAP_OPEN_TEXTS"))],
    )


@pytest.fixture
def closed_port_url() -> str:
    """A loopback port nothing listens on (bound by the kernel, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


@dataclass
class Stub:
    """A local HTTP/1.1 server answering every request with (`status`, `body`); counts connections and requests."""

    url: str
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    connections: int = 0
    requests: int = 0
    last_path: str = ""


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so a pooled client sends many requests over one connection

        def setup(self) -> None:
            super().setup()
            state.connections += 1

        def _answer(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            state.requests += 1
            state.last_path = self.path
            self.send_response(state.status)
            self.send_header("Content-Type", state.content_type)
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


