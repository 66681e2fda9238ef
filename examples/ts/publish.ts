// What a Node bot (TypeScript, nats.js) adds to tell recap about a message point it stored. The contract:
// nats/README.md. Needs only nats.js (`npm install @nats-io/transport-node @nats-io/jetstream`), nothing of recap.
//
// Call `publishStored(js, event)` right AFTER the point is written to Qdrant. It never throws and never takes longer
// than PUBLISH_TIMEOUT_MS: when NATS is down the bot goes on, and recap's periodic scan picks the point up later.
//
//   npm ci && npx tsc -p . && NATS_URL=nats://127.0.0.1:4222 node dist/publish.js --count 10 --bot elena --user u1
//
// Flags of the demo below: --count N, --bot B, --user U, --prefix P (default recap.stored), --point-id ID (the same id
// for every event: JetStream keeps one, the others are acknowledged as duplicates), --by-user (publish on
// `<prefix>.<bot>.<user token>`).

import { randomUUID } from "node:crypto";
import { pathToFileURL } from "node:url";
import { connect } from "@nats-io/transport-node";
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";

/** The whole publish, PubAck included. */
export const PUBLISH_TIMEOUT_MS = 500;

/** recap's `message stored` event, contract version 1 (nats/README.md). Unknown fields are ignored by recap. */
export interface StoredEvent {
  v: 1;
  /** The bot's name, one subject token: only [A-Za-z0-9_-]. */
  bot: string;
  /** The Qdrant collection the point was written to. */
  collection?: string;
  /** The Qdrant point id (a UUID), as written. */
  point_id: string;
  /** The payload's user_id, a string (e.g. a Discord snowflake). */
  user_id: string;
  role?: "user" | "assistant" | "conversation_pair";
  /** When the message was written, RFC 3339 with a zone: `new Date().toISOString()`. */
  ts: string;
}

const BOT_TOKEN = /^[A-Za-z0-9_-]{1,100}$/;

/**
 * The subject token for a user (nats/README.md): the id itself when it is printable ASCII without `.`, `*` and `>`,
 * else `~` and the 16 hex digits of its FNV-1a 64 hash.
 */
export function userToken(userId: string): string {
  const bytes = new TextEncoder().encode(userId);
  const plain =
    bytes.length > 0 && bytes.every((b) => b >= 0x21 && b <= 0x7e && b !== 0x2e && b !== 0x2a && b !== 0x3e);
  if (plain) return userId;
  let h = 0xcbf29ce484222325n;
  for (const b of bytes) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return `~${h.toString(16).padStart(16, "0")}`;
}

/**
 * Publishes recap's `stored` event for one point on `<prefix>.<bot>` (with `byUser`, `<prefix>.<bot>.<user token>`:
 * recap accepts either; this one lets it spread one bot's users over its ingest partitions) with `Nats-Msg-Id` = the
 * point id. Resolves to true when JetStream acknowledged it (a duplicate counts: the event is stored). Errors are
 * logged, never thrown.
 */
export async function publishStored(
  js: JetStreamClient,
  event: StoredEvent,
  prefix = "recap.stored",
  byUser = false,
): Promise<boolean> {
  if (!BOT_TOKEN.test(event.bot)) {
    console.warn(`recap event not published (${event.point_id}): bot must be 1-100 of [A-Za-z0-9_-]`);
    return false;
  }
  try {
    const subject = byUser ? `${prefix}.${event.bot}.${userToken(event.user_id)}` : `${prefix}.${event.bot}`;
    await js.publish(subject, JSON.stringify(event), {
      msgID: event.point_id,
      timeout: PUBLISH_TIMEOUT_MS,
      retries: 0, // no stream ("no responders"): give up at once, recap's scan finds the point
    });
    return true;
  } catch (e) {
    console.warn(`recap event not published (${event.point_id}): ${(e as Error).message}`);
    return false;
  }
}

// ---- a demo bot: publishes --count events and says how many were acknowledged ----

async function main(): Promise<void> {
  let count = 1;
  let bot = "elena";
  let user = "u1";
  let prefix = "recap.stored";
  let pointId: string | undefined;
  let byUser = false;
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--by-user") {
      byUser = true;
      continue;
    }
    const value = args[i + 1] ?? "";
    switch (args[i++]) {
      case "--count": count = Number.parseInt(value, 10); break;
      case "--bot": bot = value; break;
      case "--user": user = value; break;
      case "--prefix": prefix = value; break;
      case "--point-id": pointId = value; break;
      default: throw new Error(`unknown flag ${args[i - 1]} (use --count, --bot, --user, --prefix, --point-id, --by-user)`);
    }
  }
  const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
  const started = performance.now();

  // Connect once, at start; reconnects are on (forever) once connected.
  let nc;
  try {
    nc = await connect({ servers: url, name: `bot-${bot}`, timeout: PUBLISH_TIMEOUT_MS, maxReconnectAttempts: -1 });
  } catch (e) {
    console.log(`NATS unreachable at ${url} (${(e as Error).message}): publishing skipped, 0 of ${count} events sent`);
    // connect() gave up after `timeout`, but against a server that accepts and never answers nats.js leaves that
    // socket open, which would keep this demo alive; a bot simply goes on (and connects later, or not).
    process.exit(0);
  }
  const js = jetstream(nc);
  let acked = 0;
  for (let i = 0; i < count; i++) {
    const event: StoredEvent = {
      v: 1,
      bot,
      collection: `whisperengine_memory_${bot}`,
      point_id: pointId ?? randomUUID(),
      user_id: user,
      role: "user",
      ts: new Date().toISOString(),
    };
    if (await publishStored(js, event, prefix, byUser)) acked++;
  }
  await nc.close();
  const secs = (performance.now() - started) / 1000;
  const subject = byUser ? `${prefix}.${bot}.${userToken(user)}` : `${prefix}.${bot}`;
  console.log(`${acked} of ${count} events acknowledged on ${subject} in ${secs.toFixed(3)}s`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
