#!/usr/bin/env python3
"""Conformance checks for a Qdrant gRPC server: the operations recap uses, asserted.

Runs the Python `qdrant-client` in remote gRPC mode against
  * a server given by `--url http://HOST:GRPC_PORT`, `--host/--port`, or `QDRANT_URL`
    (point it at a real Qdrant's gRPC port, 6334, to check what real Qdrant says), or
  * by default, a fresh `testsupport/qdrant_server.py` that it starts on a free port and stops.

Prints one line per check and closes with `N passed, N failed`; exit status 1 on any failure.
`--bench N` also times upserting N points (3 named 384-d vectors) and scrolling them back.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from urllib.parse import urlparse

import grpc
import numpy as np
from qdrant_client import QdrantClient, models as M
from qdrant_client.grpc import qdrant_pb2 as Q
from qdrant_client.grpc import qdrant_pb2_grpc as QS

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = ("content", "emotion", "semantic")
DIM = 384
USERS = ("111111111111111111", "222222222222222222", "333333333333333333")
EMOTIONS = ("joy", "neutral", "frustration", "curiosity")
BASE = datetime(2026, 11, 20, 8, 0, 0)  # naive UTC, like WhisperEngine writes
RNG = np.random.default_rng(7)


def vec() -> list[float]:
    v = RNG.standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()  # unit length: cosine storage keeps it as is


def make_points(n_exchanges: int) -> list[M.PointStruct]:
    """WhisperEngine-shaped points: user message at T, bot reply at T + 1 ms, every 3rd
    exchange a conversation_pair point; the first 2 exchanges lack timestamp_unix (old data)."""
    points = []
    for i in range(n_exchanges):
        user = USERS[i % len(USERS)]
        t = BASE + timedelta(minutes=7 * i)
        rows = [("user", t, f"question {i}"), ("assistant", t + timedelta(milliseconds=1), f"answer {i}")]
        if i % 3 == 0:
            rows.append(("conversation_pair", t + timedelta(milliseconds=2), f"pair {i}"))
        for role, ts, text in rows:
            payload = {
                "user_id": user, "content": text, "role": role, "source": role,
                "memory_type": "conversation" if i % 10 else "fact",
                "timestamp": ts.isoformat(timespec="microseconds"),
                "emotional_context": EMOTIONS[i % len(EMOTIONS)], "turn": i,
            }
            if i >= 2:
                payload["timestamp_unix"] = ts.replace(tzinfo=timezone.utc).timestamp()
            points.append(M.PointStruct(id=str(uuid.UUID(bytes=RNG.bytes(16), version=4)),
                                        vector={name: vec() for name in VECTORS}, payload=payload))
    return points


class Checks:
    def __init__(self):
        self.passed, self.failed = 0, 0

    def run(self, name, fn):
        try:
            fn()
            self.passed += 1
            print(f"PASS {name}", flush=True)
        except Exception:  # noqa: BLE001
            self.failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)


def expect_error(code: grpc.StatusCode, fn, contains: str = "") -> str:
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        assert contains in e.details(), f"{contains!r} not in {e.details()!r}"
        return e.details()
    raise AssertionError(f"expected a {code} error, got success")


def conformance(client: QdrantClient, address: str, checks: Checks) -> None:
    name = f"conformance_{uuid.uuid4().hex[:8]}"
    flat = f"{name}_flat"
    points = make_points(90)  # 90 exchanges -> 210 points
    by_id = {p.id: p for p in points}
    c = checks

    def health():
        reply = QS.QdrantStub(grpc.insecure_channel(address)).HealthCheck(Q.HealthCheckRequest(), timeout=10)
        assert reply.version and reply.title, reply

    def create():
        assert not client.collection_exists(name)
        client.create_collection(name, vectors_config={
            n: M.VectorParams(size=DIM, distance=M.Distance.COSINE) for n in VECTORS})
        assert client.collection_exists(name)
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.create_collection(
            name, vectors_config=M.VectorParams(size=4, distance=M.Distance.COSINE)), "already exists")
        client.create_payload_index(name, "user_id", M.PayloadSchemaType.KEYWORD, wait=True)
        client.create_payload_index(name, "memory_type", M.PayloadSchemaType.KEYWORD, wait=True)
        client.create_payload_index(name, "timestamp_unix", M.PayloadSchemaType.FLOAT, wait=True)
        client.create_payload_index(name, "timestamp", M.PayloadSchemaType.DATETIME, wait=True)
        client.create_payload_index(name, "turn", M.PayloadSchemaType.INTEGER, wait=True)
        client.create_payload_index(name, "role", M.PayloadSchemaType.KEYWORD, wait=True)
        client.delete_payload_index(name, "role", wait=True)

    def upsert():
        for i in range(0, len(points), 50):
            r = client.upsert(name, points[i:i + 50], wait=True)
            assert r.status == M.UpdateStatus.COMPLETED, r
        assert client.count(name, exact=True).count == len(points)

    def info():
        ci = client.get_collection(name)
        assert ci.points_count == len(points), ci.points_count
        vectors = ci.config.params.vectors
        assert set(vectors) == set(VECTORS), vectors
        assert all(v.size == DIM and v.distance == M.Distance.COSINE for v in vectors.values())
        schema = ci.payload_schema
        assert set(schema) == {"user_id", "memory_type", "timestamp_unix", "timestamp", "turn"}, schema
        assert schema["user_id"].data_type == M.PayloadSchemaType.KEYWORD
        assert schema["timestamp_unix"].data_type == M.PayloadSchemaType.FLOAT
        assert schema["timestamp"].data_type == M.PayloadSchemaType.DATETIME
        assert schema["timestamp_unix"].points == len(points) - 5, schema["timestamp_unix"]
        assert name in [d.name for d in client.get_collections().collections]

    def retrieve():
        ids = [points[5].id, points[17].id, points[200].id]
        got = client.retrieve(name, ids + [str(uuid.uuid4())], with_payload=True, with_vectors=True)
        assert sorted(r.id for r in got) == sorted(ids), [r.id for r in got]
        for r in got:
            assert r.payload == by_id[r.id].payload, (r.payload, by_id[r.id].payload)
            assert set(r.vector) == set(VECTORS)
            np.testing.assert_allclose(r.vector["emotion"], by_id[r.id].vector["emotion"], atol=1e-5)
        only = client.retrieve(name, ids[:1], with_payload=["user_id"], with_vectors=["content"])
        assert only[0].payload == {"user_id": by_id[ids[0]].payload["user_id"]}, only[0].payload
        assert set(only[0].vector) == {"content"}, only[0].vector.keys()
        bare = client.retrieve(name, ids[:1], with_payload=False, with_vectors=False)
        assert not bare[0].payload and not bare[0].vector, bare

    user = USERS[1]
    utc = BASE.replace(tzinfo=timezone.utc)
    lo, hi = (utc + timedelta(hours=2)).timestamp(), (utc + timedelta(hours=8)).timestamp()
    window = M.Filter(must=[
        M.FieldCondition(key="user_id", match=M.MatchValue(value=user)),
        M.FieldCondition(key="timestamp_unix", range=M.Range(gte=lo, lt=hi)),
    ])
    expected = sorted((p.payload["timestamp_unix"], p.id) for p in points if p.payload["user_id"] == user
                      and lo <= p.payload.get("timestamp_unix", -1) < hi)

    def ordered_scroll():
        assert len(expected) > 20, len(expected)
        for direction, exp in ((M.Direction.ASC, expected), (M.Direction.DESC, expected[::-1])):
            got, nxt = client.scroll(name, window, limit=1000, with_payload=True,
                                     order_by=M.OrderBy(key="timestamp_unix", direction=direction))
            assert nxt is None, nxt
            assert [(r.payload["timestamp_unix"], r.id) for r in got] == exp, direction
            by_ts = M.OrderBy(key="timestamp_unix", direction=direction)
            got, nxt = client.scroll(name, window, limit=10, order_by=by_ts)
            assert nxt is None and [r.id for r in got] == [e[1] for e in exp[:10]]
        start = expected[11][0]
        got, _ = client.scroll(name, window, limit=5, order_by=M.OrderBy(key="timestamp_unix", start_from=start))
        assert [r.id for r in got] == [e[1] for e in expected[11:16]], "start_from is inclusive"
        got, _ = client.scroll(name, window, limit=5, order_by=M.OrderBy(
            key="timestamp_unix", direction=M.Direction.DESC, start_from=start))
        assert [r.id for r in got] == [e[1] for e in expected[11::-1][:5]]
        # a datetime index orders the naive ISO strings the same way
        got, _ = client.scroll(name, window, limit=1000, order_by="timestamp")
        assert [r.id for r in got] == [e[1] for e in expected]

    def ordered_scroll_errors():
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.scroll(name, window, order_by="role"),
                     "No range index for `order_by` key")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.scroll(name, window, order_by="user_id"),
                     "No range index for `order_by` key")
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.scroll(
            name, window, order_by="timestamp_unix", offset=expected[0][1]), "offset")

    def paging():
        seen, offset, pages = [], None, 0
        while True:
            got, offset = client.scroll(name, limit=37, offset=offset, with_payload=False)
            seen += [r.id for r in got]
            pages += 1
            if offset is None:
                break
            assert len(got) == 37 and offset not in seen
        assert pages == -(-len(points) // 37), pages
        assert seen == sorted(by_id, key=lambda s: uuid.UUID(s).int), "scroll is in id order"
        got, offset = client.scroll(name, limit=len(points))
        assert len(got) == len(points) and offset is None
        assert got[0].payload and not got[0].vector, "scroll defaults: payload yes, vectors no"

    def filters():
        def count(f):
            n = client.count(name, f, exact=True).count
            got, _ = client.scroll(name, f, limit=1000, with_payload=False)
            assert len(got) == n, (len(got), n)
            return n

        def want(pred):
            return sum(1 for p in points if pred(p.payload, p.id))

        assert count(window) == len(expected)
        f = M.Filter(should=[M.FieldCondition(key="user_id", match=M.MatchValue(value=u)) for u in USERS[:2]],
                     must_not=[M.FieldCondition(key="role", match=M.MatchValue(value="conversation_pair"))])
        assert count(f) == want(lambda p, _: p["user_id"] in USERS[:2] and p["role"] != "conversation_pair")
        f = M.Filter(must=[M.FieldCondition(key="memory_type", match=M.MatchAny(any=["fact"])),
                           M.FieldCondition(key="timestamp_unix", range=M.Range(gt=lo, lte=hi * 2))])
        assert count(f) == want(lambda p, _: p["memory_type"] == "fact" and lo < p.get("timestamp_unix", 0) <= hi * 2)
        ids = [points[i].id for i in (3, 9, 40)]
        assert count(M.Filter(must=[M.HasIdCondition(has_id=ids)])) == 3
        assert count(M.Filter(must=[M.IsEmptyCondition(is_empty=M.PayloadField(key="timestamp_unix"))])) == 5
        assert count(M.Filter(must_not=[M.IsEmptyCondition(is_empty=M.PayloadField(key="timestamp_unix"))])) == 205
        # a numeric range on a string field matches nothing (WhisperEngine's old bug; not asserted for
        # `timestamp` here: with a datetime index, Qdrant's engine reads the numbers as microseconds) ...
        assert count(M.Filter(must=[M.FieldCondition(key="content", range=M.Range(gte=0))])) == 0
        # ... a datetime range on the datetime-indexed ISO string does (naive strings are UTC)
        dt = M.Filter(must=[M.FieldCondition(key="timestamp", range=M.DatetimeRange(
            gte=utc + timedelta(hours=2), lt=utc + timedelta(hours=8)))])
        assert count(dt) == want(lambda p, _: lo <= datetime.fromisoformat(p["timestamp"]).replace(
            tzinfo=timezone.utc).timestamp() < hi)
        assert client.count(name, exact=True).count == len(points)

    def set_payload():
        pid = points[7].id
        client.set_payload(name, {"summarized": True}, points=[pid], wait=True)
        got = client.retrieve(name, [pid], with_payload=True)[0].payload
        assert got["summarized"] is True and got["user_id"] == points[7].payload["user_id"]
        f = M.Filter(must=[M.FieldCondition(key="summarized", match=M.MatchValue(value=True))])
        assert client.count(name, f).count == 1
        client.delete_payload(name, ["summarized"], points=f, wait=True)
        assert client.count(name, f).count == 0
        client.overwrite_payload(name, {"only": 1}, points=[pid], wait=True)
        assert client.retrieve(name, [pid], with_payload=True)[0].payload == {"only": 1}
        client.overwrite_payload(name, points[7].payload, points=[pid], wait=True)

    def search():
        p = points[42]
        hits = client.query_points(name, query=p.vector["semantic"], using="semantic", limit=3).points
        assert hits[0].id == p.id and abs(hits[0].score - 1.0) < 1e-4, hits[0]

    def delete():
        gone = [points[0].id, points[1].id]
        client.delete(name, M.PointIdsList(points=gone), wait=True)
        assert client.retrieve(name, gone) == []
        assert client.count(name).count == len(points) - 2
        user_c = M.Filter(must=[M.FieldCondition(key="user_id", match=M.MatchValue(value=USERS[2]))])
        n_c = client.count(name, user_c).count
        assert n_c > 0
        client.delete(name, M.FilterSelector(filter=user_c), wait=True)
        assert client.count(name, user_c).count == 0
        assert client.count(name).count == len(points) - 2 - n_c

    def single_vector():
        client.create_collection(flat, vectors_config=M.VectorParams(size=4, distance=M.Distance.COSINE))
        client.upsert(flat, [M.PointStruct(id=i, vector=[1.0, 0, 0, float(i)], payload={"n": i})
                             for i in (30, 2, 11)] + [M.PointStruct(id=str(uuid.UUID(int=5)), vector=[0, 1, 0, 0])])
        got, nxt = client.scroll(flat, limit=2)
        assert [r.id for r in got] == [2, 11] and nxt == 30, (got, nxt)
        got, nxt = client.scroll(flat, limit=5, offset=nxt, with_vectors=True)
        assert [r.id for r in got] == [30, str(uuid.UUID(int=5))] and nxt is None, "integer ids first"
        assert isinstance(got[0].vector, list) and len(got[0].vector) == 4
        assert client.get_collection(flat).config.params.vectors.size == 4
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.upsert(
            flat, [M.PointStruct(id=1, vector=[1.0, 2.0])]), "dimension")

    def concurrent():
        col = f"{name}_threads"
        client.create_collection(col, vectors_config=M.VectorParams(size=4, distance=M.Distance.DOT))
        r = client.upsert(col, [M.PointStruct(id=10_000, vector=[1, 0, 0, 0])], wait=False)
        assert r.status == M.UpdateStatus.ACKNOWLEDGED, r

        def work(t):
            for i in range(10):
                client.upsert(col, [M.PointStruct(id=t * 100 + i * 10 + j, vector=[t, i, j, 1.0], payload={"t": t})
                                    for j in range(10)], wait=True)
                client.scroll(col, limit=50)
                client.count(col, M.Filter(must=[M.FieldCondition(key="t", match=M.MatchValue(value=t))]))

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(work, range(6)))
        assert client.count(col).count == 601
        client.delete_collection(col)
        client.create_collection(col, vectors_config=M.VectorParams(size=4, distance=M.Distance.DOT))
        assert client.count(col).count == 0, "a re-created collection starts empty"
        client.delete_collection(col)

    def missing():
        ghost = f"{name}_missing"
        for call in (lambda: client.get_collection(ghost), lambda: client.scroll(ghost),
                     lambda: client.count(ghost), lambda: client.retrieve(ghost, [1]),
                     lambda: client.upsert(ghost, [M.PointStruct(id=1, vector={})])):
            expect_error(grpc.StatusCode.NOT_FOUND, call, "doesn't exist")
        assert client.collection_exists(ghost) is False

    def drop():
        assert client.delete_collection(name) is True
        assert client.delete_collection(flat) is True
        assert not client.collection_exists(name)
        assert client.delete_collection(name) is False
        assert name not in [d.name for d in client.get_collections().collections]

    for fn in (health, create, upsert, info, retrieve, ordered_scroll, ordered_scroll_errors, paging, filters,
               set_payload, search, delete, single_vector, concurrent, missing, drop):
        c.run(fn.__name__, fn)


def bench(client: QdrantClient, n: int) -> None:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    client.create_collection(name, vectors_config={v: M.VectorParams(size=DIM, distance=M.Distance.COSINE)
                                                   for v in VECTORS})
    client.create_payload_index(name, "user_id", M.PayloadSchemaType.KEYWORD)
    client.create_payload_index(name, "timestamp_unix", M.PayloadSchemaType.FLOAT)
    vectors = RNG.standard_normal((n, len(VECTORS), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    pts = [M.PointStruct(id=str(uuid.uuid4()), vector={v: vectors[i, j].tolist() for j, v in enumerate(VECTORS)},
                         payload={"user_id": USERS[i % 3], "timestamp_unix": 1.7e9 + i, "content": f"m{i}"})
           for i in range(n)]
    t = time.perf_counter()
    for i in range(0, n, 500):
        client.upsert(name, pts[i:i + 500], wait=True)
    up = time.perf_counter() - t
    for with_vectors in (False, True):
        t, offset, total = time.perf_counter(), None, 0
        while True:
            got, offset = client.scroll(name, limit=1000, offset=offset, with_vectors=with_vectors)
            total += len(got)
            if offset is None:
                break
        sc = time.perf_counter() - t
        assert total == n
        print(f"BENCH scroll {n} points (pages of 1000, vectors={with_vectors}): {sc:.2f}s = {n / sc:,.0f} points/s")
    f = M.Filter(must=[M.FieldCondition(key="user_id", match=M.MatchValue(value=USERS[0])),
                       M.FieldCondition(key="timestamp_unix", range=M.Range(gte=1.7e9 + n / 2))])
    t = time.perf_counter()
    got, _ = client.scroll(name, f, limit=100, order_by="timestamp_unix")
    ordered = time.perf_counter() - t
    t = time.perf_counter()
    client.retrieve(name, [p.id for p in pts[:100]], with_vectors=True)
    ret = time.perf_counter() - t
    print(f"BENCH upsert {n} points x {len(VECTORS)} x {DIM}-d (batches of 500): {up:.2f}s = {n / up:,.0f} points/s")
    print(f"BENCH filtered order_by scroll (limit 100): {ordered * 1000:.0f} ms; retrieve 100 with vectors: "
          f"{ret * 1000:.0f} ms")
    client.delete_collection(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("QDRANT_URL"), help="http://HOST:GRPC_PORT of the server")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--bench", type=int, default=0, help="also time N points")
    ap.add_argument("--engine", choices=("edge", "local"), help="engine of the server started here")
    args = ap.parse_args()
    server = None
    if args.url:
        u = urlparse(args.url if "://" in args.url else f"http://{args.url}")
        host, port = u.hostname, u.port or 6334
    elif args.port:
        host, port = args.host or "127.0.0.1", args.port
    else:  # start our own server
        cmd = [sys.executable, os.path.join(HERE, "qdrant_server.py"), "--port", "0"]
        server = subprocess.Popen(cmd + (["--engine", args.engine] if args.engine else []),
                                  stdout=subprocess.PIPE, text=True)
        line = server.stdout.readline().strip()
        assert line.startswith("READY port="), f"server said {line!r}"
        host, port = "127.0.0.1", int(line.split("=")[1])
    checks = Checks()
    try:
        client = QdrantClient(host=host, grpc_port=port, prefer_grpc=True, check_compatibility=False, timeout=60)
        conformance(client, f"{host}:{port}", checks)
        if args.bench:
            bench(client, args.bench)
    finally:
        if server:
            server.terminate()
            server.wait(10)
    print(f"{checks.passed} passed, {checks.failed} failed")  # last line, after the server's logs
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
