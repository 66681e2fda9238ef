//! What a Rust bot adds to tell recap about a message point it stored (the contract: nats/README.md).
//!
//! Self-contained: the bot needs no part of recap, only these crates (the versions recap builds with):
//! `async-nats = { version = "0.51", features = ["jetstream"] }`, `serde = { version = "1", features = ["derive"] }`,
//! `serde_json = "1"`, `tokio = { version = "1", features = ["time"] }`, `tracing = "0.1"`; the demo `main` below also
//! uses `chrono`, `uuid` (v4) and `tracing-subscriber`.
//!
//! Call `publish_stored(..)` right AFTER the point is written to Qdrant. It never fails the bot and never takes
//! longer than PUBLISH_TIMEOUT: when NATS is down the bot goes on, and recap's periodic scan picks the point up later.
//!
//!     NATS_URL=nats://127.0.0.1:4222 cargo run --example publish -- --count 10 --bot elena --user u1
//!
//! Flags: --count N, --bot B, --user U, --prefix P (default recap.stored), --point-id ID (the same id for every
//! event: JetStream keeps one, the others are acknowledged as duplicates), --by-user (publish on
//! `<prefix>.<bot>.<user token>`).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};

/// The whole publish, PubAck included.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// recap's `message stored` event, contract version 1 (nats/README.md). Unknown fields are ignored by recap.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredEvent {
    /// Always 1.
    pub v: u32,
    /// The bot's name, one subject token: only `[A-Za-z0-9_-]`.
    pub bot: String,
    /// The Qdrant collection the point was written to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// The Qdrant point id (a UUID), as written.
    pub point_id: String,
    /// The payload's `user_id`, a string (e.g. a Discord snowflake).
    pub user_id: String,
    /// `user`, `assistant` or `conversation_pair`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// When the message was written, RFC 3339 with a zone, e.g. `2026-11-20T14:03:11.512Z`.
    pub ts: String,
}

/// The subject token for a user (nats/README.md): the id itself when it is printable ASCII without `.`, `*` and `>`,
/// else `~` and the 16 hex digits of its FNV-1a 64 hash.
pub fn user_token(user_id: &str) -> String {
    let plain = !user_id.is_empty()
        && user_id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'));
    if plain {
        return user_id.to_string();
    }
    let hash = user_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("~{hash:016x}")
}

/// Publishes recap's `stored` event for one point on `<prefix>.<bot>` with `Nats-Msg-Id` = the point id.
/// True when JetStream acknowledged it (a duplicate counts: the event is stored). Errors are logged, never returned.
pub async fn publish_stored(js: &jetstream::Context, prefix: &str, event: &StoredEvent) -> bool {
    publish_on(js, format!("{prefix}.{}", event.bot), event).await
}

/// The same on `<prefix>.<bot>.<user token>`: recap accepts either subject; this one lets it spread one bot's users
/// over its ingest partitions (`NATS_PARTITION_BY=user`).
pub async fn publish_stored_by_user(
    js: &jetstream::Context,
    prefix: &str,
    event: &StoredEvent,
) -> bool {
    let subject = format!("{prefix}.{}.{}", event.bot, user_token(&event.user_id));
    publish_on(js, subject, event).await
}

async fn publish_on(js: &jetstream::Context, subject: String, event: &StoredEvent) -> bool {
    let bot_ok = (1..=100).contains(&event.bot.len())
        && event
            .bot
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !bot_ok {
        tracing::warn!(point_id = %event.point_id, "recap event not published: bot must be 1-100 of [A-Za-z0-9_-]");
        return false;
    }
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(point_id = %event.point_id, "recap event not published: {e}");
            return false;
        }
    };
    let msg = PublishMessage::build()
        .payload(body.into())
        .message_id(&event.point_id);
    let publish = async { js.send_publish(subject, msg).await?.await };
    match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
        Ok(Ok(_ack)) => true,
        Ok(Err(e)) => {
            tracing::warn!(point_id = %event.point_id, "recap event not published: {e}");
            false
        }
        Err(_) => {
            tracing::warn!(point_id = %event.point_id, "recap event not acknowledged within {PUBLISH_TIMEOUT:?}");
            false
        }
    }
}

// ---- a demo bot: publishes --count events and says how many were acknowledged ----

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let (mut count, mut bot, mut user) = (1usize, "elena".to_string(), "u1".to_string());
    let (mut prefix, mut point_id) = ("recap.stored".to_string(), None::<String>);
    let mut by_user = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--by-user" {
            by_user = true;
            continue;
        }
        let value = args.next().unwrap_or_default();
        match flag.as_str() {
            "--count" => count = value.parse().expect("--count takes a number"),
            "--bot" => bot = value,
            "--user" => user = value,
            "--prefix" => prefix = value,
            "--point-id" => point_id = Some(value),
            other => {
                panic!(
                    "unknown flag {other} (use --count, --bot, --user, --prefix, --point-id, --by-user)"
                )
            }
        }
    }
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let started = Instant::now();

    // Connect once, at start; reconnects are on (forever) once connected.
    let client = match async_nats::ConnectOptions::new()
        .name(format!("bot-{bot}"))
        .connection_timeout(PUBLISH_TIMEOUT)
        .connect(&url)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            println!(
                "NATS unreachable at {url} ({e}): publishing skipped, 0 of {count} events sent"
            );
            return;
        }
    };
    let js = jetstream::new(client);
    let mut acked = 0;
    for _ in 0..count {
        let event = StoredEvent {
            v: 1,
            bot: bot.clone(),
            collection: Some(format!("whisperengine_memory_{bot}")),
            point_id: point_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            user_id: user.clone(),
            role: Some("user".into()),
            ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        acked += if by_user {
            publish_stored_by_user(&js, &prefix, &event).await
        } else {
            publish_stored(&js, &prefix, &event).await
        } as usize;
    }
    let subject = if by_user {
        format!("{prefix}.{bot}.{}", user_token(&user))
    } else {
        format!("{prefix}.{bot}")
    };
    println!(
        "{acked} of {count} events acknowledged on {subject} in {:.3}s",
        started.elapsed().as_secs_f64()
    );
}
