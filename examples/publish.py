#!/usr/bin/env python3
"""What a Python bot adds to tell recap about a message point it stored (the contract: nats/README.md).

Call `await publish_stored(...)` right AFTER the point is written to Qdrant. It never raises and never takes longer
than its timeout: when NATS is down the bot goes on, and recap's periodic scan picks the point up later.

    pip install nats-py
    NATS_URL=nats://127.0.0.1:4222 python3 examples/publish.py --count 10 --bot elena --user u1
"""

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
import uuid
from datetime import datetime, timezone

import nats
from nats.js import JetStreamContext

log = logging.getLogger("recap.publish")

BOT_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")  # one NATS subject token


def user_token(user_id):
    """The subject token for a user (recap's `event::user_token`): the id itself when it is printable ASCII without
    '.', '*' and '>' (Discord ids are digits), else '~' and the 16 hex digits of its FNV-1a 64 hash."""
    user_id = str(user_id)
    if user_id and all(0x21 <= ord(c) <= 0x7E and c not in ".*>" for c in user_id):
        return user_id
    h = 0xCBF29CE484222325
    for b in user_id.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"~{h:016x}"


def subject(bot, user_id=None, prefix="recap.stored"):
    """`<prefix>.<bot>`, or with a user `<prefix>.<bot>.<user token>` (what NATS_PARTITION_BY=user partitions)."""
    return f"{prefix}.{bot}" if user_id is None else f"{prefix}.{bot}.{user_token(user_id)}"


def _rfc3339(ts):
    """datetime (naive = UTC), float seconds or an RFC 3339 string -> '2026-11-20T14:03:11.512Z'."""
    if isinstance(ts, str):
        return ts
    if isinstance(ts, (int, float)):
        ts = datetime.fromtimestamp(ts, timezone.utc)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def publish_stored(nc_or_js, bot, collection, point_id, user_id, role=None, ts=None, timeout=0.5,
                         by_user=False):
    """Publish recap's `stored` event for one point; True when JetStream acknowledged it.

    nc_or_js: a connected nats.aio.client.Client or its JetStreamContext. by_user: publish on
    `recap.stored.<bot>.<user token>` (either subject is accepted; this one lets recap spread one bot's users over its
    partitions). Every error (NATS down, no stream, timeout, a bad bot name) is logged and swallowed; the call returns
    within `timeout` seconds."""
    try:
        if not BOT_TOKEN.match(bot or ""):
            raise ValueError(f"bot name {bot!r} is not one subject token ([A-Za-z0-9_-]+)")
        js = nc_or_js if isinstance(nc_or_js, JetStreamContext) else nc_or_js.jetstream()
        event = {"v": 1, "bot": bot, "point_id": str(point_id), "user_id": str(user_id),
                 "ts": _rfc3339(ts if ts is not None else datetime.now(timezone.utc))}
        if collection:
            event["collection"] = collection
        if role:
            event["role"] = role
        body = json.dumps(event, separators=(",", ":")).encode()
        # Nats-Msg-Id = the point id: JetStream drops a re-publish of the same point within its duplicate window.
        await asyncio.wait_for(
            js.publish(subject(bot, user_id if by_user else None), body, timeout=timeout,
                       headers={"Nats-Msg-Id": str(point_id)}),
            timeout,
        )
        return True
    except asyncio.CancelledError:
        raise  # the bot's own cancellation is not ours to swallow
    except Exception as e:  # noqa: BLE001 - by contract nothing reaches the bot
        log.warning("recap event for point %s not published: %s: %s", point_id, type(e).__name__,
                    str(e) or f"no acknowledgement within {timeout}s")
        return False


async def main():
    ap = argparse.ArgumentParser(description="publish sample recap.stored events")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--bot", default="elena")
    ap.add_argument("--user", default="u1", help="user_id")
    ap.add_argument("--collection", help="default: whisperengine_memory_<bot>")
    ap.add_argument("--role", default="user")
    ap.add_argument("--timeout", type=float, default=0.5, help="seconds per publish (and for the connect)")
    ap.add_argument("--by-user", action="store_true", help="publish on recap.stored.<bot>.<user token>")
    args = ap.parse_args()
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    collection = args.collection or f"whisperengine_memory_{args.bot}"

    async def quiet(_e):  # connection errors are reported once below, not per attempt
        pass

    started = time.monotonic()
    try:
        nc = await asyncio.wait_for(
            # one quick try: nats-py retries a refused server every reconnect_time_wait until attempts run out
            nats.connect(url, connect_timeout=args.timeout, allow_reconnect=False, max_reconnect_attempts=1,
                         reconnect_time_wait=0.05, error_cb=quiet),
            args.timeout * 2,
        )
    except Exception as e:  # noqa: BLE001
        print(f"NATS unreachable at {url} ({type(e).__name__}): publishing skipped, 0 of {args.count} events sent")
        return 0
    acked = 0
    try:
        js = nc.jetstream()
        for _ in range(args.count):
            ok = await publish_stored(js, args.bot, collection, uuid.uuid4(), args.user, args.role,
                                      datetime.now(timezone.utc), timeout=args.timeout, by_user=args.by_user)
            acked += ok
    finally:
        try:
            await asyncio.wait_for(nc.close(), args.timeout)
        except Exception:  # noqa: BLE001
            pass
    print(f"{acked} of {args.count} events acknowledged on {subject(args.bot, args.user if args.by_user else None)} "
          f"in {time.monotonic() - started:.3f}s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main()))
