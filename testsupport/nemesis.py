#!/usr/bin/env python3
"""The nemesis on real services (issue 24): the driver `scripts/nemesis` runs (read its header for the usage).

Per schedule (seeded: schedule i uses seed S + i, which decides the fleet, the clocks, the conversations' shapes and
the faults with their times; the services' own timing is real and not replayed):

1. a fresh database (migrated by `recap migrate`, plus a trigger that logs every change of a `recap_leader` row's
   owner or epoch into `nemesis_leader_log`), fresh NATS stream / consumer / subject prefix, fresh Qdrant collections;
2. three `recap run` replicas (NATS_PARTITIONS=8, leases of 3 s, idle gap 4 s, lateness 1 s, sweep every 3 s, the LLM
   test server as their LLM with LLM_CONCURRENCY=2);
3. traffic for T seconds: each user of each bot writes conversations at the wall clock, every exchange a user point
   and an assistant point 1 ms later (plus a conversation_pair point on some bots) upserted into Qdrant, then one
   event per point published (stamped at publish, 0.5 s timeout, dropped on failure as the contract says: the sweep
   reads those). Every bot host has a clock skew: most none, some slow or fast by a few seconds, some fast by more
   than the idle gap;
4. meanwhile the nemesis, at seeded times, one after another: SIGKILL a replica and restart it; SIGSTOP one past
   LEADER_LEASE_SECONDS and SIGCONT it; restart Postgres; restart NATS; change the partition layout with a backlog
   (stop every replica, let traffic pile up, restart them with NATS_PARTITIONS 8 -> 4 or NATS_PARTITION_BY bot ->
   user); forget a user during traffic (DELETE /v1/users/{bot}/{user} on a live replica);
5. quiesce (faults over, every replica up): poll until no open window, no due window, every expected message in a
   window, stable over two polls; then check the invariants (see `check`) and print each with its figures.
"""

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone

import nats
from qdrant_client import AsyncQdrantClient, models

# ------------------------------------------------------------------ the schedule's fixed timing (scaled, as the live
# tests do: production idle gap 1 min, lateness 5 s, sweep 20 s)
GAP_MS = 4000
LATENESS_S = 1
SWEEP_S = 3
LEASE_S = 3  # LEASE_SECONDS and LEADER_LEASE_SECONDS
PARTITIONS = 8
REPLICAS = 3
LLM_CONCURRENCY = 2
LLM_LATENCY_MS = 30
MIN_MESSAGES = 5
RATIO_BOUND = 1.02
QUIESCE_TIMEOUT_S = 150
DIM = 384

PSQL = shutil.which("psql") or "/usr/bin/psql"


def now_ms():
    return int(time.time() * 1000)


def log(msg):
    print(msg, flush=True)


def iso_naive(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def rfc3339(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def user_token(user_id):
    """recap's `event::user_token`."""
    if user_id and all(0x21 <= ord(c) <= 0x7E and c not in ".*>" for c in user_id):
        return user_id
    h = 0xCBF29CE484222325
    for b in user_id.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"~{h:016x}"


def pseudo_vector(text):
    r = random.Random(text)
    v = [r.uniform(-1, 1) for _ in range(DIM)]
    n = sum(x * x for x in v) ** 0.5 or 1.0
    return [x / n for x in v]


TOPICS = [
    "learning the guitar every evening after work",
    "a hiking trip in the mountains with my sister",
    "the new job at the bakery that starts on monday",
    "a small grey kitten called Pepper from the shelter",
    "marine biology and the coral reefs near the coast",
    "training for the marathon while my knee recovers",
    "repotting tomato seedlings on the balcony",
    "the pottery class and centering the clay",
]


# ------------------------------------------------------------------ Postgres through psql
class Pg:
    def __init__(self, url):
        self.url = url

    async def run(self, query, timeout=30):
        p = await asyncio.create_subprocess_exec(
            PSQL, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url, "-c", query,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(p.communicate(), timeout)
        except asyncio.TimeoutError:
            p.kill()
            await p.wait()
            raise RuntimeError("psql timed out")
        if p.returncode != 0:
            raise RuntimeError(f"psql: {err.decode().strip()[:500]}")
        return out.decode().strip()

    async def json(self, query, timeout=60):
        out = await self.run(f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({query}) t", timeout)
        return json.loads(out or "[]")

    async def scalar(self, query):
        return await self.run(query)


LEADER_LOG_SQL = """
CREATE TABLE IF NOT EXISTS nemesis_leader_log (
    n BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(), id INT NOT NULL, op TEXT NOT NULL,
    old_owner TEXT, old_epoch BIGINT, old_until TIMESTAMPTZ, new_owner TEXT, new_epoch BIGINT, new_until TIMESTAMPTZ);
CREATE OR REPLACE FUNCTION nemesis_leader_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO nemesis_leader_log (id, op, new_owner, new_epoch, new_until)
        VALUES (NEW.id, 'insert', NEW.owner, NEW.epoch, NEW.lease_until);
    ELSIF NEW.owner IS DISTINCT FROM OLD.owner OR NEW.epoch IS DISTINCT FROM OLD.epoch THEN
        INSERT INTO nemesis_leader_log (id, op, old_owner, old_epoch, old_until, new_owner, new_epoch, new_until)
        VALUES (NEW.id, 'update', OLD.owner, OLD.epoch, OLD.lease_until, NEW.owner, NEW.epoch, NEW.lease_until);
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS nemesis_leader_log ON recap_leader;
CREATE TRIGGER nemesis_leader_log AFTER INSERT OR UPDATE ON recap_leader
    FOR EACH ROW EXECUTE FUNCTION nemesis_leader_log();
"""


# ------------------------------------------------------------------ the fleet
class Bot:
    def __init__(self, name, collection, skew_ms, pairs, float_index, by_user_subject):
        self.name = name
        self.collection = collection
        self.skew_ms = skew_ms
        self.pairs = pairs
        self.float_index = float_index
        self.by_user_subject = by_user_subject
        self.users = []


class User:
    def __init__(self, bot, user_id, seed):
        self.bot = bot
        self.id = user_id
        self.seed = seed

    @property
    def key(self):
        return (self.bot.name, self.id)


class Msg:
    """One point written: a message (role user/assistant) or a conversation_pair point."""
    __slots__ = ("id", "q", "bot", "user", "role", "stored_ms", "wall_ms", "done_ms", "event_ms", "event_ok")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def record(self):
        return {k: getattr(self, k) for k in self.__slots__}


# ------------------------------------------------------------------ the replicas
class Replica:
    def __init__(self, sched, index):
        self.sched = sched
        self.name = f"r{index}"  # stable across restarts, as a StatefulSet's pod names are
        self.proc = None
        self.generation = 0
        self.port = None
        self.stopped = False
        self.logs = []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        assert not self.alive()
        self.generation += 1
        self.port = free_port()
        path = os.path.join(self.sched.dir, f"{self.name}-g{self.generation}.log")
        self.logs.append(path)
        env = self.sched.recap_env(self.name, self.port)
        with open(path, "ab") as f:
            self.proc = subprocess.Popen([self.sched.run.recap, "run"], env=env, stdin=subprocess.DEVNULL,
                                         stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.stopped = False
        self.sched.run.note_pid(self.proc.pid)

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self):
        if self.alive():
            if self.stopped:
                os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stopped = False

    async def terminate(self, grace_s=10):
        if not self.alive():
            return
        if self.stopped:
            self.signal(signal.SIGCONT)
            self.stopped = False
        self.signal(signal.SIGTERM)
        t0 = time.time()
        while self.alive() and time.time() - t0 < grace_s:
            await asyncio.sleep(0.1)
        self.kill()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------ one schedule
class Schedule:
    def __init__(self, run, seed):
        self.run = run
        self.seed = seed
        self.rng = random.Random(seed)
        self.seconds = run.args.seconds
        self.tag = f"s{seed}x{uuid.uuid4().hex[:6]}"
        self.dir = os.path.join(run.args.out, f"{seed}-{self.tag}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.partitions = PARTITIONS
        self.partition_by = "bot"
        self.layouts = [(0, PARTITIONS, "bot")]
        self.msgs = []
        self.by_q = {}
        self.q = 0
        self.faults = []  # (start ms, end ms, kind, detail)
        self.forgets = []  # {bot, user, start_ms, end_ms, response}
        self.events_dropped = 0
        self.stop_traffic = asyncio.Event()
        self.failures = []
        self.figures = {}
        self.plan_fleet()

    # ---- the seeded plan
    def plan_fleet(self):
        rng = self.rng
        nbots = rng.randint(4, 6)
        skews = []
        for b in range(nbots):
            r = rng.random()
            if b == 0:  # at least one host fast by more than the idle gap (issue 24 case 1)
                skews.append(int(rng.uniform(1.5, 3.0) * GAP_MS))
            elif b == 1:  # at least one slow host (past the lateness, under the gap)
                skews.append(-int(rng.uniform(1.5, 3.5) * 1000))
            elif r < 0.45:
                skews.append(0)
            elif r < 0.65:
                skews.append(int(rng.uniform(0.5, 3.0) * 1000))
            elif r < 0.8:
                skews.append(-int(rng.uniform(0.5, 3.0) * 1000))
            else:
                skews.append(int(rng.uniform(1.5, 4.0) * GAP_MS))
        self.bots = []
        for b in range(nbots):
            name = f"nb{b}{self.tag}"
            collection = f"whisperengine_memory_{name}_7d" if b % 3 else f"chat_memories_{name}"
            bot = Bot(name, collection, skews[b], pairs=rng.random() < 0.5, float_index=rng.random() < 0.7,
                      by_user_subject=rng.random() < 0.5)
            for u in range(rng.randint(3, 5)):
                if u == 4:
                    uid = f"user.{b}@example.com"  # not a subject token: hashed
                else:
                    uid = str(310_000_000_000_000_000 + self.seed * 1000 + b * 10 + u)
                bot.users.append(User(bot, uid, rng.randrange(1 << 30)))
            self.bots.append(bot)
        self.users = [u for b in self.bots for u in b.users]
        # the faults: seeded kinds at seeded times, one after another
        kinds = ["kill", "kill", "kill", "pause", "pause", "pg", "nats", "layout", "forget", "forget"]
        allowed = self.run.args.faults
        kinds = [k for k in kinds if allowed == "all" or k in allowed.split(",")]
        self.plan = []
        t = rng.uniform(4, 8)
        layout_done = False
        forgets = 0
        while kinds and t < self.seconds - 6:
            kind = rng.choice(kinds)
            if kind == "layout" and layout_done or kind == "forget" and forgets >= 3:
                continue
            layout_done |= kind == "layout"
            forgets += kind == "forget"
            p = {"at": round(t, 2), "kind": kind}
            if kind == "kill":
                p.update(replica=rng.randrange(REPLICAS), down_s=round(rng.uniform(0.2, 4.0), 2))
            elif kind == "pause":
                p.update(replica=rng.randrange(REPLICAS), stop_s=round(LEASE_S + rng.uniform(1.0, 3.0), 2))
            elif kind in ("pg", "nats"):
                p.update(down_s=round(rng.uniform(0.5, 4.0), 2))
            elif kind == "layout":
                p.update(to=rng.choice([(4, "bot"), (PARTITIONS, "user")]), down_s=round(rng.uniform(3, 6), 2),
                         sigkill=rng.random() < 0.5)
            elif kind == "forget":
                p.update(user=rng.randrange(len(self.users)), replica=rng.randrange(REPLICAS))
            self.plan.append(p)
            t += rng.uniform(5, 11)

    # ---- environment
    def recap_env(self, name, port):
        e = self.run.env
        return {
            "PATH": os.environ.get("PATH", ""),
            "DATABASE_URL": self.db_url,
            "QDRANT_URL": e["QDRANT_URL"],
            "NATS_URL": e["NATS_URL"],
            "NATS_STREAM": self.stream,
            "NATS_CONSUMER": self.consumer,
            "NATS_SUBJECT_PREFIX": self.prefix,
            "NATS_PARTITIONS": str(self.partitions),
            "NATS_PARTITION_BY": self.partition_by,
            "INSTANCE_ID": name,
            "HTTP_ADDR": f"127.0.0.1:{port}",
            "LEASE_SECONDS": str(LEASE_S),
            "LEADER_LEASE_SECONDS": str(LEASE_S),
            "IDLE_GAP": f"{GAP_MS}ms",
            "ALLOWED_LATENESS_SECONDS": str(LATENESS_S),
            "ENRICHMENT_INTERVAL_SECONDS": str(SWEEP_S),
            "LOOKBACK_DAYS": "1",
            "COLLECTION_PATTERNS": ",".join(b.collection for b in self.bots),
            "COLLECTION_MAP": ",".join(f"{b.collection}={b.name}" for b in self.bots),
            "MIN_MESSAGES_FOR_SUMMARY": str(MIN_MESSAGES),
            "SUMMARIZER": "llm",
            "LLM_BASE_URL": e["LLM_BASE_URL"],
            "LLM_API_KEY": "sk-nemesis-test-key",
            "LLM_MODEL": "test/model",
            "LLM_CONCURRENCY": str(LLM_CONCURRENCY),
            "LLM_REQUESTS_PER_SECOND": "50",
            "LLM_TIMEOUT": "2s",
            "RECALL_REPAIR_INTERVAL": "5s",
            "SHUTDOWN_GRACE": "3s",
            "LOG_FORMAT": "json",
            "RUST_LOG": "info,sqlx=warn,async_nats=warn,h2=warn,tower=warn",
        }

    # ---- set up
    async def setup(self):
        e = self.run.env
        admin = Pg(e["DATABASE_URL"])
        dbname = f"nemesis_{self.tag}".lower()
        await admin.run(f"CREATE DATABASE {dbname}")
        base = e["DATABASE_URL"].rsplit("/", 1)[0]
        self.db_url = f"{base}/{dbname}"
        self.pg = Pg(self.db_url)
        self.stream = f"NEM_{self.tag}"
        self.consumer = f"nem_{self.tag}"
        self.prefix = f"nem{self.tag}.stored"
        env = self.recap_env("migrate", free_port())
        r = subprocess.run([self.run.recap, "migrate"], env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"recap migrate failed: {r.stderr[-2000:]}")
        await self.pg.run(LEADER_LOG_SQL)
        q = self.run.qdrant
        for b in self.bots:
            await q.create_collection(b.collection, vectors_config={
                v: models.VectorParams(size=DIM, distance=models.Distance.COSINE)
                for v in ("content", "emotion", "semantic")})
            await q.create_payload_index(b.collection, "user_id", models.PayloadSchemaType.KEYWORD, wait=True)
            await q.create_payload_index(b.collection, "memory_type", models.PayloadSchemaType.KEYWORD, wait=True)
            if b.float_index:
                await q.create_payload_index(b.collection, "timestamp_unix", models.PayloadSchemaType.FLOAT,
                                             wait=True)
        await self.run.llm("/control/reset", {})
        await self.run.llm("/control", {"latency_ms": LLM_LATENCY_MS})
        async def quiet(_e=None):  # NATS restarts are the nemesis' doing: no traceback per reconnect attempt
            pass

        self.nc = await nats.connect(e["NATS_URL"], max_reconnect_attempts=-1, reconnect_time_wait=0.3,
                                     connect_timeout=2, allow_reconnect=True, error_cb=quiet,
                                     disconnected_cb=quiet, reconnected_cb=quiet)
        self.js = self.nc.jetstream(timeout=0.5)
        self.replicas = [Replica(self, i) for i in range(REPLICAS)]
        for r in self.replicas:
            r.start()
        await self.wait_leading(self.partitions, 60)

    async def wait_leading(self, n, timeout):
        t0 = time.time()
        while True:
            try:
                led = int(await self.pg.scalar("SELECT count(*) FROM recap_leader WHERE lease_until > now()"))
                if led >= n:
                    return time.time() - t0
            except RuntimeError:
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{n} partitions not led within {timeout}s")
            await asyncio.sleep(0.2)

    # ---- traffic
    async def user_loop(self, u):
        rng = random.Random(u.seed)
        await asyncio.sleep(rng.uniform(0, 3))
        conv = 0
        while not self.stop_traffic.is_set():
            n = rng.choice([1, 2, 2, 3, 3, 4, 5, 6, 8, 12])  # exchanges: 2 messages each
            for i in range(n):
                if self.stop_traffic.is_set():
                    return
                await self.exchange(u, conv, i, rng)
                pause = rng.uniform(0.2, 1.5) if rng.random() < 0.8 else rng.uniform(1.5, 3.3)
                await self.sleep_traffic(pause)
            conv += 1
            pause = rng.uniform(1.2 * GAP_MS, 2.5 * GAP_MS) / 1000 if rng.random() < 0.85 else rng.uniform(0.5, 3)
            await self.sleep_traffic(pause)

    async def sleep_traffic(self, s):
        try:
            await asyncio.wait_for(self.stop_traffic.wait(), s)
        except asyncio.TimeoutError:
            pass

    def next_q(self):
        self.q += 1
        return self.q

    async def exchange(self, u, conv, i, rng):
        bot = u.bot
        wall = now_ms()
        host = wall + bot.skew_ms
        topic = TOPICS[(u.seed + conv) % len(TOPICS)]
        pts = []
        texts = [("user", f"I keep thinking about {topic}, part {i} (ref q{{q}})", host),
                 ("assistant", f"That sounds lovely, tell me more about {topic.split()[1]} (ref q{{q}})", host + 1)]
        for role, text, ts in texts:
            q = self.next_q()
            pts.append((Msg(id=str(uuid.uuid4()), q=q, bot=bot.name, user=u.id, role=role, stored_ms=ts,
                            wall_ms=wall), text.replace("{q}", str(q))))
        if bot.pairs:
            q = self.next_q()
            pts.append((Msg(id=str(uuid.uuid4()), q=q, bot=bot.name, user=u.id, role="conversation_pair",
                            stored_ms=host, wall_ms=wall), f"{pts[0][1]} || {pts[1][1]}"))
        points = []
        for m, text in pts:
            payload = {"user_id": u.id, "content": text, "role": m.role, "source": m.role,
                       "memory_type": "conversation", "timestamp": iso_naive(m.stored_ms),
                       "timestamp_unix": m.stored_ms / 1000.0, "emotional_context": "neutral"}
            if m.role == "conversation_pair":
                payload.update(user_message=pts[0][1], bot_response=pts[1][1])
            v = pseudo_vector(text)
            points.append(models.PointStruct(id=m.id, vector={"content": v, "emotion": v, "semantic": v},
                                             payload=payload))
        for attempt in range(20):
            try:
                await self.run.qdrant.upsert(bot.collection, points=points, wait=True)
                break
            except Exception as e:  # noqa: BLE001 (Qdrant is not faulted; retry a hiccup)
                if attempt == 19:
                    raise
                log(f"    qdrant upsert retry: {e}")
                await asyncio.sleep(0.5)
        done = now_ms()
        for m, _ in pts:
            m.done_ms = done
            self.msgs.append(m)
            self.by_q[m.q] = m
        for m, _ in pts:
            ev_ms = now_ms() + bot.skew_ms
            m.event_ms = ev_ms
            body = json.dumps({"v": 1, "bot": bot.name, "collection": bot.collection, "point_id": m.id,
                               "user_id": u.id, "role": m.role, "ts": rfc3339(ev_ms)}).encode()
            subject = (f"{self.prefix}.{bot.name}.{user_token(u.id)}" if bot.by_user_subject
                       else f"{self.prefix}.{bot.name}")
            try:
                await self.js.publish(subject, body, timeout=0.5, headers={"Nats-Msg-Id": m.id})
                m.event_ok = True
            except Exception:  # noqa: BLE001 (the contract: log and drop; the sweep reads the point)
                m.event_ok = False
                self.events_dropped += 1

    # ---- the nemesis
    def fault(self, kind, start, detail):
        end = now_ms()
        self.faults.append({"kind": kind, "at_s": round((start - self.t0) / 1000, 2),
                            "for_s": round((end - start) / 1000, 2), **detail})
        log(f"    t={((start - self.t0) / 1000):6.2f}s {kind:<7} {json.dumps(detail)} ({(end - start) / 1000:.2f}s)")

    async def services(self, action, name):
        p = await asyncio.create_subprocess_exec(os.path.join(self.run.repo, "scripts", "services"), action, name,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"scripts/services {action} {name}: {err.decode()[-500:]}")

    async def nemesis(self):
        for p in self.plan:
            wait = self.t0 / 1000 + p["at"] - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            start = now_ms()
            kind = p["kind"]
            if kind == "kill":
                r = self.replicas[p["replica"]]
                r.kill()
                await asyncio.sleep(p["down_s"])
                r.start()
                self.fault("kill", start, {"replica": r.name, "down_s": p["down_s"]})
            elif kind == "pause":
                r = self.replicas[p["replica"]]
                if not r.alive():
                    continue
                r.signal(signal.SIGSTOP)
                r.stopped = True
                await asyncio.sleep(p["stop_s"])
                r.signal(signal.SIGCONT)
                r.stopped = False
                self.fault("pause", start, {"replica": r.name, "stopped_s": p["stop_s"]})
            elif kind in ("pg", "nats"):
                name = "postgres" if kind == "pg" else "nats"
                await self.services("stop", name)
                await asyncio.sleep(p["down_s"])
                await self.services("start", name)
                self.fault(kind, start, {"down_s": p["down_s"]})
            elif kind == "layout":
                if p["sigkill"]:
                    for r in self.replicas:
                        r.kill()
                else:
                    await asyncio.gather(*(r.terminate() for r in self.replicas))
                await asyncio.sleep(p["down_s"])
                before = (self.partitions, self.partition_by)
                self.partitions, self.partition_by = p["to"]
                self.layouts.append((now_ms(), self.partitions, self.partition_by))
                for r in self.replicas:
                    r.start()
                self.fault("layout", start, {"from": list(before), "to": list(p["to"]), "sigkill": p["sigkill"],
                                             "down_s": p["down_s"]})
            elif kind == "forget":
                u = self.users[p["user"]]
                live = [r for r in self.replicas if r.alive() and not r.stopped]
                r = self.replicas[p["replica"]] if self.replicas[p["replica"]] in live else (live or [None])[0]
                if r is None:
                    continue
                resp = await self.forget(r, u)
                self.forgets.append({"bot": u.bot.name, "user": u.id, "start_ms": start, "end_ms": now_ms(),
                                     "response": resp})
                self.fault("forget", start, {"replica": r.name, "bot": u.bot.name, "user": u.id,
                                             "deleted": (resp or {}).get("deleted")})

    async def forget(self, r, u):
        url = f"http://127.0.0.1:{r.port}/v1/users/{u.bot.name}/{urllib.request.quote(u.id, safe='')}"

        def call():
            req = urllib.request.Request(url, method="DELETE")
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())

        t0 = time.time()
        while True:
            try:
                return await asyncio.to_thread(call)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if time.time() - t0 > 60:
                    raise RuntimeError(f"forget on {r.name} failed for 60 s: {e}")
                await asyncio.sleep(0.5)

    # ---- the run
    async def execute(self):
        log(f"SCHEDULE seed={self.seed} tag={self.tag} bots={len(self.bots)} users={len(self.users)} "
            f"seconds={self.seconds}")
        for b in self.bots:
            log(f"    bot {b.name}: skew {b.skew_ms / 1000:+.1f}s, {len(b.users)} users, pairs={b.pairs}, "
                f"timestamp index={b.float_index}, subject={'bot.user' if b.by_user_subject else 'bot'}")
        log(f"    plan: {json.dumps(self.plan)}")
        t_setup = time.time()
        await self.setup()
        log(f"    up: 3 replicas lead {PARTITIONS} partitions after {time.time() - t_setup:.1f}s")
        self.t0 = now_ms()
        users = [asyncio.create_task(self.user_loop(u)) for u in self.users]
        nem = asyncio.create_task(self.nemesis())
        await asyncio.sleep(self.seconds)
        self.stop_traffic.set()
        await asyncio.gather(*users)
        self.last_write = max((m.done_ms for m in self.msgs), default=now_ms())
        await nem
        for r in self.replicas:  # faults over: every replica runs, none stopped
            if r.stopped:
                r.signal(signal.SIGCONT)
                r.stopped = False
            if not r.alive():
                r.start()
        log(f"    traffic over: {sum(m.role != 'conversation_pair' for m in self.msgs)} messages, "
            f"{sum(m.role == 'conversation_pair' for m in self.msgs)} pair points, {self.events_dropped} events "
            f"dropped (NATS down); {len(self.faults)} faults")
        t_q = time.time()
        quiet = await self.quiesce()
        log(f"    quiesced={quiet} after {time.time() - t_q:.1f}s")
        await self.check()
        await self.teardown()
        if self.failures:  # the database as it ended, for the post-mortem
            dump = os.path.join(self.dir, "db.sql")
            r = subprocess.run([shutil.which("pg_dump") or "pg_dump", "-d", self.db_url, "-f", dump],
                               capture_output=True, text=True)
            log(f"    database dumped to {dump}" if r.returncode == 0 else f"    pg_dump failed: {r.stderr[:300]}")
        with open(os.path.join(self.dir, "record.json"), "w") as f:
            json.dump({"seed": self.seed, "tag": self.tag, "plan": self.plan, "faults": self.faults,
                       "forgets": self.forgets, "layouts": self.layouts, "failures": self.failures,
                       "figures": self.figures, "messages": [m.record() for m in self.msgs]}, f)
        return not self.failures

    async def teardown(self):
        await asyncio.gather(*(r.terminate() for r in self.replicas))
        try:
            await self.nc.drain()
        except Exception:  # noqa: BLE001
            pass

    # ---- quiesce
    async def tombstones(self):
        rows = await self.pg.json("SELECT bot_name, point_ids FROM recap_forgotten")
        gone = set()
        for r in rows:
            gone.update(r["point_ids"] or [])
        return gone

    async def coverage_ids(self):
        rows = await self.pg.json("SELECT unnest(point_ids) AS id FROM recap_windows")
        return Counter(r["id"] for r in rows)

    async def quiesce(self):
        fast = max(0, max(b.skew_ms for b in self.bots))
        floor = self.last_write / 1000 + fast / 1000 + GAP_MS / 1000 + LATENESS_S + 2 * SWEEP_S + 2
        t0 = time.time()
        stable = 0
        while True:
            if time.time() >= floor:
                try:
                    open_n = int(await self.pg.scalar(
                        "SELECT coalesce(sum(cardinality(point_ids)), 0) FROM recap_open_windows"))
                    due = int(await self.pg.scalar("SELECT count(*) FROM recap_windows WHERE state = 'due'"))
                    gone = await self.tombstones()
                    cov = await self.coverage_ids()
                    missing = sum(1 for m in self.msgs if m.role != "conversation_pair" and m.id not in gone
                                  and m.id not in cov)
                    if open_n == 0 and due == 0 and missing == 0:
                        stable += 1
                        if stable >= 2:
                            return True
                    else:
                        stable = 0
                except RuntimeError:
                    stable = 0
            if time.time() - t0 > QUIESCE_TIMEOUT_S:
                return False
            await asyncio.sleep(2)

    # ---- the invariants
    def ok(self, name, good, text):
        log(f"    {'ok  ' if good else 'FAIL'} {name}: {text}")
        if not good:
            self.failures.append(f"{name}: {text}")

    async def check(self):
        pg = self.pg
        windows = await pg.json(
            "SELECT id, bot_name, user_id, state, version, revision, summary_id, "
            "(extract(epoch FROM start_ts) * 1000)::bigint AS start_ms, (extract(epoch FROM end_ts) * 1000)::bigint AS "
            "end_ms, point_ids, ARRAY(SELECT (extract(epoch FROM x) * 1000)::bigint FROM unnest(point_ts) WITH "
            "ORDINALITY u(x, o) ORDER BY o) AS point_ms FROM recap_windows ORDER BY id")
        open_rows = await pg.json("SELECT bot_name, user_id, point_ids FROM recap_open_windows")
        forgotten = await pg.json("SELECT bot_name, point_ids FROM recap_forgotten")
        gone = set()
        for r in forgotten:
            gone.update(r["point_ids"] or [])
        msgs = {m.id: m for m in self.msgs}
        messages = [m for m in self.msgs if m.role != "conversation_pair"]
        expected = {m.id for m in messages if m.id not in gone}

        # 1. coverage: every message (not forgotten before its forget) in exactly one window
        cov = Counter()
        where = defaultdict(list)
        for w in windows:
            for pid in w["point_ids"]:
                cov[pid] += 1
                where[pid].append(w["id"])
        open_ids = [pid for r in open_rows for pid in r["point_ids"]]
        missing = [i for i in expected if cov[i] == 0]
        doubled = [i for i in expected if cov[i] > 1]
        forgotten_kept = [i for i in cov if i in gone] + [i for i in open_ids if i in gone]
        pairs_in = [i for i in cov if i in msgs and msgs[i].role == "conversation_pair"]
        foreign = [i for i in cov if i not in msgs]
        self.figures.update(messages=len(messages), expected=len(expected), windows=len(windows),
                            forgotten_points=len(gone), missing=len(missing), doubled=len(doubled))
        self.ok("coverage", not (missing or doubled or forgotten_kept or pairs_in or foreign or open_ids),
                f"{len(messages)} messages written ({len(messages) - len(expected)} of forgotten users before their "
                f"forget), {len(expected) - len(missing) - len(doubled)} in exactly one window, {len(doubled)} in "
                f"two or more, {len(missing)} in none, {len(open_ids)} still open; {len(forgotten_kept)} forgotten, "
                f"{len(pairs_in)} conversation_pair and {len(foreign)} unknown points in a window")
        for i in (missing[:5] + doubled[:5]):
            m = msgs[i]
            log(f"         {i} {m.bot}/{m.user} {m.role} stored={m.stored_ms} wall={m.wall_ms} event_ok={m.event_ok} "
                f"windows={where.get(i)}")
        by_id = {w["id"]: w for w in windows}
        for wid in sorted({x for i in doubled for x in where[i]})[:6]:
            w = by_id[wid]
            log(f"         window {wid} {w['bot_name']}/{w['user_id']} {w['state']} v{w['version']} r{w['revision']} "
                f"{w['start_ms']}..{w['end_ms']} {len(w['point_ids'])} points, times {w['point_ms']}")

        # 2. windows = the definition, by the effective times recap recorded
        by_key = defaultdict(list)
        for w in windows:
            by_key[(w["bot_name"], w["user_id"])].append(w)
        overlaps, gaps_inside, gaps_between, bad_time = [], [], [], []
        for key, ws in by_key.items():
            pts = sorted((t, w["id"]) for w in ws for t in w["point_ms"])
            spans = sorted((min(w["point_ms"]), max(w["point_ms"]), w["id"]) for w in ws if w["point_ms"])
            for a, b in zip(spans, spans[1:]):
                if b[0] <= a[1]:
                    overlaps.append((key, a[2], b[2]))
            for (t1, w1), (t2, w2) in zip(pts, pts[1:]):
                if w1 == w2 and t2 - t1 >= GAP_MS:
                    gaps_inside.append((key, w1, t2 - t1))
                elif w1 != w2 and t2 - t1 < GAP_MS:
                    gaps_between.append((key, w1, w2, t2 - t1))
            for w in ws:
                for pid, t in zip(w["point_ids"], w["point_ms"]):
                    m = msgs.get(pid)
                    if m is None:
                        continue
                    lo = min(m.stored_ms, m.wall_ms) - 2
                    hi = max(m.stored_ms, m.event_ms or m.stored_ms) + 2
                    if not lo <= t <= hi:
                        bad_time.append((pid, t, lo, hi))
        fast_keys = sum(1 for k in by_key if any(b.name == k[0] and b.skew_ms > 0 for b in self.bots))
        self.ok("definition", not (overlaps or gaps_inside or gaps_between or bad_time),
                f"{len(by_key)} keys ({fast_keys} on fast hosts), {len(windows)} windows: {len(overlaps)} overlapping "
                f"pairs, {len(gaps_inside)} gaps >= {GAP_MS} ms inside a window, {len(gaps_between)} windows of a key "
                f"less than the gap apart (the definition joins them), {len(bad_time)} recorded times outside "
                f"[min(stamp, write), max(stamp, event stamp)]")
        for x in (overlaps[:3] + gaps_inside[:3] + gaps_between[:3] + bad_time[:3]):
            log(f"         {x}")

        # 3. one summary row per done window, none for too_short, none left for forgotten points
        states = Counter(w["state"] for w in windows)
        rows = await pg.json("SELECT id, bot_name, user_id, revision FROM conversation_summaries")
        row_by_id = {r["id"]: r for r in rows}
        done = [w for w in windows if w["state"] == "done"]
        no_row = [w["id"] for w in done if w["summary_id"] not in row_by_id]
        wrong_key = [w["id"] for w in done if w["summary_id"] in row_by_id and
                     (row_by_id[w["summary_id"]]["bot_name"], row_by_id[w["summary_id"]]["user_id"]) !=
                     (w["bot_name"], w["user_id"])]
        linked = Counter(w["summary_id"] for w in done if w["summary_id"] is not None)
        shared = [s for s, n in linked.items() if n > 1]
        orphans = [r["id"] for r in rows if r["id"] not in linked]
        short_rows = [w["id"] for w in windows if w["state"] == "too_short" and w["summary_id"] is not None]
        short_big = [w["id"] for w in windows if w["state"] == "too_short" and len(w["point_ids"]) >= MIN_MESSAGES]
        done_small = [w["id"] for w in done if len(w["point_ids"]) < MIN_MESSAGES]
        dead = states.get("dead", 0)
        self.ok("rows", not (no_row or wrong_key or shared or orphans or short_rows or short_big or done_small
                             or dead),
                f"windows {dict(states)}; {len(rows)} summary rows: {len(no_row)} done windows without their row, "
                f"{len(shared)} rows shared, {len(orphans)} rows of no done window, {len(wrong_key)} of another key, "
                f"{len(short_rows)} too_short windows with a row, {len(short_big)} too_short with >= {MIN_MESSAGES} "
                f"messages, {len(done_small)} done with fewer")
        # forgotten: no row anywhere holds a forgotten point; dead letters none (all input is valid)
        held = {}
        held["recap_open_windows"] = sum(1 for i in open_ids if i in gone)
        held["recap_windows"] = sum(1 for i in cov if i in gone)
        clamped = await pg.json("SELECT point_id FROM recap_clamped_points")
        held["recap_clamped_points"] = sum(1 for r in clamped if r["point_id"] in gone)
        running = await pg.json("SELECT point_ids FROM recap_running_summaries WHERE point_ids IS NOT NULL")
        held["recap_running_summaries"] = sum(1 for r in running for i in (r["point_ids"] or []) if i in gone)
        letters = await pg.json("SELECT source, reason, bot_name, user_id FROM recap_dead_letters")
        vec_orphans = await pg.json(
            "SELECT v.summary_id, v.bot_name, v.user_id, v.revision, v.synced_at FROM recap_summary_vectors v LEFT JOIN conversation_summaries s ON s.id = v.summary_id "
            "WHERE s.id IS NULL")
        words_orphans = int(await pg.scalar(
            "SELECT count(*) FROM recap_window_words w LEFT JOIN conversation_summaries s ON s.id = w.summary_id "
            "WHERE s.id IS NULL"))
        qdrant_orphans, qdrant_forgotten = await self.summary_vector_orphans(row_by_id)
        fkeys = {(f["bot"], f["user"]) for f in self.forgets}
        forgotten_rows = [r["id"] for r in rows if (r["bot_name"], r["user_id"]) in fkeys and r["id"] not in linked]
        fvec = sum(1 for v in vec_orphans if (v["bot_name"], v["user_id"]) in fkeys)
        self.ok("forgotten", not (any(held.values()) or letters or words_orphans or qdrant_forgotten or fvec
                                  or forgotten_rows),
                f"{len(self.forgets)} forgets, {len(gone)} points in tombstones; rows holding one: {held}; "
                f"{len(forgotten_rows)} summary rows of theirs not from a window after the forget; dead letters "
                f"{len(letters)}; recap_window_words of no row {words_orphans}; recap_summary_vectors rows and "
                f"recap_summaries vectors of a forgotten user's gone row: {fvec}, {qdrant_forgotten}")
        # no vector outlives its row (a forget, or a merge that deleted the later window's row)
        self.ok("vectors", not (vec_orphans or qdrant_orphans),
                f"recap_summary_vectors rows of no summary row {len(vec_orphans)}, recap_summaries vectors of no "
                f"summary row {qdrant_orphans} (summary rows {len(rows)})")
        for v in vec_orphans[:3]:
            log(f"         {v}")
        for x in letters[:3]:
            log(f"         dead letter {x}")
        # the tombstone lists every point written before the forget began
        for f in self.forgets:
            before = [m.id for m in self.msgs if m.bot == f["bot"] and m.user == f["user"]
                      and m.done_ms < f["start_ms"]]
            unlisted = [i for i in before if i not in gone]
            self.ok("tombstone", not unlisted,
                    f"{f['bot']}/{f['user']}: {len(before)} points written before the forget, {len(unlisted)} not in "
                    f"its tombstone")

        # 4. LLM calls per window version, window calls told apart from running summaries and rollups
        stats = await self.run.llm_get("/stats?calls=1")
        calls = stats.get("calls", [])
        by_purpose = Counter(c.get("purpose") for c in calls)
        key_calls = Counter()
        key_times = defaultdict(list)  # (bot, user) -> [(start_ms, end_ms)] of its window calls at the server
        unattributed = forgotten_calls = 0
        for c in calls:
            if c.get("purpose") != "window":
                continue
            qs = {int(x) for x in re.findall(r"\(ref q(\d+)\)", c.get("prompt", ""))}
            ms = [self.by_q[x] for x in qs if x in self.by_q]
            if not ms:
                unattributed += 1
                continue
            if all(m.id in gone for m in ms if m.role != "conversation_pair"):
                forgotten_calls += 1
                continue
            key_calls[(ms[0].bot, ms[0].user)] += 1
            end_ms = c.get("time", 0) * 1000
            key_times[(ms[0].bot, ms[0].user)].append((end_ms - c.get("duration_ms", 0), end_ms))
        versions = Counter()
        for w in done:
            versions[(w["bot_name"], w["user_id"])] += w["revision"]
        window_calls = sum(key_calls.values())
        summarized = sum(versions.values())
        ratio = window_calls / summarized if summarized else 0.0
        over = sorted(((k, key_calls[k], versions[k]) for k in key_calls if key_calls[k] > versions[k]),
                      key=lambda x: x[2] - x[1])
        # A call a fault interrupted is paid and lost by design, and its window summarized again: the replica was
        # killed (SIGKILL, also the layout change's) or frozen (SIGSTOP past its lease) while the call was in flight,
        # or Postgres went away as the call returned, so its finish could not be written before the lease ended.
        # Such extra calls are told apart, as the simulation counts a frozen worker's call apart: an extra call of a
        # key is explained when one of its calls was in flight within half a second of a kill, pause or layout
        # change striking, or returned between a second before a Postgres outage and its end. The bound holds for
        # the calls no fault explains.
        spans = []
        for f in self.faults:
            at = self.t0 + f["at_s"] * 1000
            if f["kind"] in ("kill", "pause", "layout"):
                spans.append(("flight", at - 500, at + 500))
            elif f["kind"] == "pg":
                spans.append(("return", at - 1000, at + f["for_s"] * 1000))

        def interrupted(a, b):
            return any((a <= hi and b >= lo) if how == "flight" else (lo <= b <= hi) for how, lo, hi in spans)
        explained = 0
        for k, c, v in over:
            near = sum(1 for a, b in key_times[k] if interrupted(a, b))
            explained += min(c - v, near)
        unexplained = (window_calls - explained) / summarized if summarized else 0.0
        failed = sum(1 for c in calls if c.get("mode") != "ok")
        self.figures.update(window_calls=window_calls, versions=summarized, ratio=round(ratio, 4),
                            explained_calls=explained, ratio_unexplained=round(unexplained, 4))
        self.ok("llm calls", unexplained <= RATIO_BOUND and summarized > 0 and unattributed == 0,
                f"{window_calls} window calls / {summarized} window versions summarized = {ratio:.3f}, "
                f"{unexplained:.3f} without the {explained} extra calls a fault interrupted (bound {RATIO_BOUND}); "
                f"{forgotten_calls} calls for windows forgotten since, {unattributed} unattributed; "
                f"calls by purpose {dict(by_purpose)}, {failed} failed at the server; keys with more calls than "
                f"versions: {len(over)}")
        for k, c, v in over[:5]:
            log(f"         {k[0]}/{k[1]}: {c} calls, {v} versions")

        # 5. leaders: one leader per partition and epoch; a new owner only after the old lease ended
        llog = await pg.json("SELECT n, (extract(epoch FROM at) * 1000)::bigint AS at_ms, id, op, old_owner, "
                             "old_epoch, (extract(epoch FROM old_until) * 1000)::bigint AS old_until_ms, new_owner, "
                             "new_epoch FROM nemesis_leader_log ORDER BY n")
        epochs = defaultdict(set)
        non_increasing, early = [], []
        last = {}
        for e in llog:
            epochs[(e["id"], e["new_epoch"])].add(e["new_owner"])
            if e["id"] in last and e["new_epoch"] <= last[e["id"]]:
                non_increasing.append(e)
            last[e["id"]] = e["new_epoch"]
            if e["op"] == "update" and e["old_owner"] != e["new_owner"] and e["old_until_ms"] > e["at_ms"]:
                early.append(e)
        claims = defaultdict(set)
        for r in self.replicas:
            for path in r.logs:
                for line in open(path, errors="replace"):
                    if '"ingest leader"' not in line:
                        continue
                    try:
                        j = json.loads(line)
                    except ValueError:
                        continue
                    f = j.get("fields", j)
                    if "partition" in f and "epoch" in f:
                        claims[(int(f["partition"]), int(f["epoch"]))].add(os.path.basename(path))
        twice = {k: v for k, v in claims.items() if len(v) > 1}
        multi = {k: v for k, v in epochs.items() if len(v) > 1}
        # 6. every partition led again within 2 x LEADER_LEASE_SECONDS of its leader's lease ending (a crash, a
        # pause, a hand-back), counted from the end of any outage in between that no replica can lead through
        # (Postgres or NATS down, the layout change's stop of every replica)
        outages = [(self.t0 + f["at_s"] * 1000, self.t0 + (f["at_s"] + f["for_s"]) * 1000)
                   for f in self.faults if f["kind"] in ("pg", "nats", "layout")]
        releads = []
        for e in llog:
            if e["op"] != "update" or e["old_until_ms"] is None or e["old_until_ms"] > e["at_ms"]:
                continue  # a first lease, or a fence bump of a lease still running
            since = e["old_until_ms"]
            for a, b in outages:
                if a <= e["at_ms"] and b >= since:
                    since = max(since, b)
            releads.append((e["at_ms"] - since, e))
        slow = [(gap, e) for gap, e in releads if gap > 2 * LEASE_S * 1000]
        worst = max((gap for gap, _ in releads), default=0)
        self.figures["relead_ms_max"] = worst
        self.ok("re-led", not slow,
                f"{len(releads)} leases ended and taken again, the slowest {worst} ms after the lease ended (or its "
                f"outage did; at most {2 * LEASE_S * 1000} ms): {len(slow)} slower")
        for gap, e in slow[:3]:
            log(f"         partition {e['id'] - 1}: {gap} ms: {e}")
        takeovers = sum(1 for e in llog if e["op"] == "update" and e["old_owner"] != e["new_owner"])
        self.ok("leaders", not (twice or multi or non_increasing or early) and claims,
                f"{len(llog)} owner/epoch changes of recap_leader ({takeovers} takeovers by another replica), "
                f"{len(claims)} (partition, epoch) leads in the replicas' logs: {len(twice)} epochs led by two "
                f"processes, {len(multi)} epochs with two owners, {len(non_increasing)} epochs not increasing, "
                f"{len(early)} takeovers before the old lease ended")
        for x in (list(twice.items())[:3] + early[:3]):
            log(f"         {x}")

    async def summary_vector_orphans(self, row_by_id):
        """recap_summaries vectors of this schedule's bots whose row is gone: (all, of a forgotten user)."""
        q = self.run.qdrant
        if not await q.collection_exists("recap_summaries"):
            return 0, 0
        fkeys = {(f["bot"], f["user"]) for f in self.forgets}
        orphans = forgotten = 0
        for b in self.bots:
            offset = None
            while True:
                pts, offset = await q.scroll("recap_summaries", scroll_filter=models.Filter(must=[
                    models.FieldCondition(key="bot", match=models.MatchValue(value=b.name))]), limit=256,
                    offset=offset, with_payload=True, with_vectors=False)
                for p in pts:
                    sid = p.payload.get("summary_id")
                    if sid not in row_by_id:
                        orphans += 1
                        forgotten += (b.name, p.payload.get("user_id")) in fkeys
                if offset is None:
                    break
        return orphans, forgotten


# ------------------------------------------------------------------ the run
class Run:
    def __init__(self, args):
        self.args = args
        self.recap = args.recap
        self.repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = {k: os.environ[k] for k in ("DATABASE_URL", "NATS_URL", "QDRANT_URL", "LLM_BASE_URL")}
        self.llm_base = self.env["LLM_BASE_URL"].rsplit("/v1", 1)[0]
        grpc = int(self.env["QDRANT_URL"].rsplit(":", 1)[1])
        self.qdrant = AsyncQdrantClient(host="127.0.0.1", grpc_port=grpc, prefer_grpc=True, timeout=30)
        open(args.pids, "w").close()

    def note_pid(self, pid):
        with open(self.args.pids, "a") as f:
            f.write(f"{pid}\n")

    async def llm(self, path, body):
        def call():
            req = urllib.request.Request(self.llm_base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        return await asyncio.to_thread(call)

    async def llm_get(self, path):
        def call():
            with urllib.request.urlopen(self.llm_base + path, timeout=30) as r:
                return json.loads(r.read())
        return await asyncio.to_thread(call)


async def main_async(args):
    run = Run(args)
    seed0 = args.seed if args.seed is not None else random.randrange(1, 1_000_000)
    failed = []
    results = []
    t_all = time.time()
    for i in range(args.schedules):
        seed = seed0 + i
        s = Schedule(run, seed)
        t0 = time.time()
        try:
            good = await s.execute()
        except BaseException:
            for r in getattr(s, "replicas", []):
                r.kill()
            raise
        dt = time.time() - t0
        results.append((seed, good, dt, s.figures))
        log(f"SCHEDULE seed={seed} {'passed' if good else 'FAILED'} in {dt:.0f}s: {json.dumps(s.figures)}")
        if not good:
            failed.append(seed)
            faults = "" if args.faults == "all" else f" --faults {args.faults}"
            log(f"    replay: scripts/nemesis --schedules 1 --seed {seed} --seconds {args.seconds:g}{faults}  "
                f"(logs and record: {s.dir})")
    ratios = [f.get("ratio", 0) for _, _, _, f in results]
    calls = sum(f.get("window_calls", 0) for _, _, _, f in results)
    versions = sum(f.get("versions", 0) for _, _, _, f in results)
    log(f"NEMESIS schedules={len(results)} passed={len(results) - len(failed)} failed={failed} "
        f"seconds_total={time.time() - t_all:.0f} max_calls_per_version={max(ratios, default=0):.3f} "
        f"calls_per_version_all={calls / versions if versions else 0:.3f}")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description="recap's nemesis on real services (run it through scripts/nemesis)")
    ap.add_argument("--schedules", type=int, default=1)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--faults", default="all",
                    help="the fault kinds the nemesis may pick, comma-separated (kill, pause, pg, nats, layout, "
                         "forget), or none; default all")
    ap.add_argument("--recap", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pids", required=True)
    args = ap.parse_args()
    if args.schedules < 1 or args.seconds < 10:
        ap.error("--schedules must be at least 1 and --seconds at least 10")

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        sys.exit(asyncio.run(main_async(args)))
    except KeyboardInterrupt:
        log("nemesis: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
