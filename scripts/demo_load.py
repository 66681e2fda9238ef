#!/usr/bin/env python3
"""Loads demo/conversations.json into Qdrant (WhisperEngine-shaped points) and publishes one
`message stored` event per message point to NATS JetStream, as the bots do.

Usage: scripts/demo_load.py --qdrant http://127.0.0.1:PORT --nats nats://127.0.0.1:PORT [--prefix recap.stored]
Prints the number of windows of 5+ messages it expects recap to summarize.
"""
import argparse, asyncio, datetime as dt, hashlib, json, math, os, uuid

from qdrant_client import QdrantClient, models
import nats

HERE = os.path.dirname(os.path.abspath(__file__))


def embed(text, salt):
    """A deterministic stand-in for all-MiniLM-L6-v2: 384 floats from a hash of the text, unit length."""
    out, seed = [], hashlib.sha256(f"{salt}:{text}".encode()).digest()
    while len(out) < 384:
        seed = hashlib.sha256(seed).digest()
        out.extend((b - 128) / 128 for b in seed)
    out = out[:384]
    n = math.sqrt(sum(x * x for x in out)) or 1.0
    return [x / n for x in out]


def points_for(conv, start):
    pts = []
    for s in conv["sessions"]:
        t = start + dt.timedelta(minutes=s["start_minute"])
        for i, ex in enumerate(s["exchanges"]):
            when = t + dt.timedelta(minutes=2 * i)
            for role, text, ts in (("user", ex["user"], when), ("assistant", ex["bot"], when + dt.timedelta(milliseconds=1)),
                                   ("conversation_pair", ex["user"] + " || " + ex["bot"], when)):
                pts.append(dict(id=str(uuid.uuid4()), role=role, text=text, ts=ts, emotion=ex["emotion"]))
    return pts


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qdrant", required=True)
    ap.add_argument("--nats", required=True)
    ap.add_argument("--prefix", default="recap.stored")
    ap.add_argument("--bot-suffix", default="", help="appended to bot names (and so to collection names), for tests")
    a = ap.parse_args()
    data = json.load(open(os.path.join(HERE, "..", "demo", "conversations.json")))
    start = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)).replace(hour=9, minute=0, second=0, microsecond=0)
    host, port = a.qdrant.split("//")[1].split(":")
    q = QdrantClient(host=host, grpc_port=int(port), prefer_grpc=True)
    nc = await nats.connect(a.nats)
    js = nc.jetstream()
    windows = 0
    for conv in data["conversations"]:
        if a.bot_suffix:
            bot = conv["bot"] + "_" + a.bot_suffix
            conv = dict(conv, bot=bot, collection=conv["collection"].replace(conv["bot"], bot))
        coll = conv["collection"]
        if not q.collection_exists(coll):
            q.create_collection(coll, vectors_config={n: models.VectorParams(size=384, distance=models.Distance.COSINE)
                                                      for n in ("content", "emotion", "semantic")})
            q.create_payload_index(coll, "user_id", models.PayloadSchemaType.KEYWORD)
            q.create_payload_index(coll, "timestamp_unix", models.PayloadSchemaType.FLOAT)
        pts = points_for(conv, start)
        q.upsert(coll, wait=True, points=[models.PointStruct(
            id=p["id"],
            vector={"content": embed(p["text"], 1), "emotion": embed(p["emotion"], 2), "semantic": embed(p["text"], 3)},
            payload={"user_id": conv["user_id"], "content": p["text"], "role": p["role"], "source": p["role"],
                     "memory_type": "conversation", "timestamp": p["ts"].replace(tzinfo=None).isoformat(timespec="microseconds"),
                     "timestamp_unix": p["ts"].timestamp(), "emotional_context": p["emotion"]}) for p in pts])
        for p in pts:  # the bots publish after they stored the point
            body = {"v": 1, "bot": conv["bot"], "collection": coll, "point_id": p["id"], "user_id": conv["user_id"],
                    "role": p["role"], "ts": p["ts"].isoformat(timespec="milliseconds").replace("+00:00", "Z")}
            await js.publish(f"{a.prefix}.{conv['bot']}", json.dumps(body).encode(), headers={"Nats-Msg-Id": p["id"]})
        windows += sum(1 for s in conv["sessions"] if 2 * len(s["exchanges"]) >= 5)
    await nc.close()
    print(windows)


asyncio.run(main())
