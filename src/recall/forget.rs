//! Forgetting a user (`DELETE /v1/users/{bot}/{user_id}`), completely, whatever runs at the same time (issue 26).
//!
//! [`forget_user`] lists the user's points in the bot's collections ([`list_points`]), deletes every row of theirs
//! in one transaction ([`forget_rows`]) and then their summary vectors. The transaction takes its locks in the order
//! every other writer of a key does, so it neither deadlocks with them nor misses what they commit:
//!
//! 1. the leader row of the ingest partition that owns the key (`recap_leader`, id = partition + 1), bumping its
//!    epoch: the first lock of every checkpoint of that partition (the fence), so a checkpoint of this user either
//!    committed before (and the deletes below see its rows) or fails its fence after (and its leader restores from
//!    Postgres, with the tombstone). Only that partition restarts;
//! 2. the user's window rows (`FOR UPDATE`, by id): the first lock of a worker's finish, so a finish of their window
//!    either committed before (its summary row is seen below) or finds the window gone after (and writes nothing);
//! 3. their rollup rows, then their summary rows (the order of the rollup builder: rollup, then summary);
//! 4. the deletes, every [`super::USER_TABLES`] table (dead letters by their key columns, migration 0017), and the
//!    tombstone.
//!
//! The tombstone (`recap_forgotten`: a hash of bot and user id, never the id) lists the user's points: what the bot's
//! collections held for them when the forget listed them, plus the points recap's rows held. Ingest skips exactly
//! those points, read again in whatever way (the sweep's overlap, a backfill, a replay, a redelivery, a restored
//! snapshot row), and nothing else: the rule compares point ids, never a bot host's clock with Postgres' clock.

use std::sync::Arc;

use qdrant_client::qdrant::{Condition, Filter, PointId, ScrollPointsBuilder};

use super::Deleted;
use super::vectors::{self, VectorError};
use crate::config::Config;
use crate::fetch::{FetchError, Points, point_id_string};
use crate::sink::{Store, StoreError};
use crate::source::nats::PartitionBy;

/// The bot a collection belongs to (`Config::bot_for_collection`), or `None`.
pub type BotForCollection = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What a forget needs of the configuration: the partition layout (which leader to fence) and which collections
/// are a bot's (where its points are listed).
#[derive(Clone)]
pub struct ForgetScope {
    pub by: PartitionBy,
    pub partitions: u32,
    pub bot_for_collection: BotForCollection,
}

impl ForgetScope {
    /// The scope `recap run` serves with: `NATS_PARTITION_BY`, `NATS_PARTITIONS`, `COLLECTION_PATTERNS`/`_MAP`.
    pub fn from_config(cfg: Arc<Config>) -> ForgetScope {
        ForgetScope {
            by: cfg.nats.nats_partition_by,
            partitions: cfg.nats.nats_partitions.max(1),
            bot_for_collection: Arc::new(move |c: &str| cfg.bot_for_collection(c)),
        }
    }

    /// The ingest partition that owns a (bot, user) key.
    pub fn owner(&self, bot: &str, user_id: &str) -> u32 {
        crate::source::nats::owner(self.by, self.partitions, bot, user_id)
    }
}

impl Default for ForgetScope {
    /// One partition and the default collection patterns (or those of the environment).
    fn default() -> ForgetScope {
        #[derive(clap::Parser)]
        struct Sweep {
            #[command(flatten)]
            sweep: crate::config::SweepConfig,
        }
        let sweep = <Sweep as clap::Parser>::try_parse_from(["recap"]).ok();
        ForgetScope {
            by: PartitionBy::Bot,
            partitions: 1,
            bot_for_collection: Arc::new(move |c: &str| {
                sweep.as_ref().and_then(|s| s.sweep.bot_for_collection(c))
            }),
        }
    }
}

impl std::fmt::Debug for ForgetScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgetScope")
            .field("by", &self.by)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Points(#[from] FetchError),
    #[error(transparent)]
    Vectors(#[from] VectorError),
}

/// Forgets a user: lists their points in the bot's collections, deletes their rows (see the module docs), then their
/// summary vectors. Safe to retry (and idempotent).
pub async fn forget_user(
    store: &Store,
    points: &Points,
    scope: &ForgetScope,
    bot: &str,
    user_id: &str,
) -> Result<Deleted, ForgetError> {
    let collections = match points
        .collections_for(bot, &*scope.bot_for_collection)
        .await
    {
        Ok(c) => c,
        Err(FetchError::NoCollection(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let listed = list_points(points, &collections, user_id).await?;
    let part = scope.owner(bot, user_id) as i32;
    let deleted = forget_rows(store, bot, user_id, part, &listed, &collections).await?;
    // After the rows: a vector whose row is gone is never returned, and a vector sync that raced this forget removes
    // the vector it wrote for a row that is gone (`vectors::upsert_many`).
    vectors::delete_user(points.client(), bot, user_id).await?;
    Ok(deleted)
}

/// The ids of every point of `user_id` in `collections` (by the payload mapping's user field), read now.
pub async fn list_points(
    points: &Points,
    collections: &[String],
    user_id: &str,
) -> Result<Vec<String>, FetchError> {
    let filter = Filter::must([Condition::matches(
        points.mapping.user.clone(),
        user_id.to_string(),
    )]);
    let mut out = Vec::new();
    for coll in collections {
        let mut offset: Option<PointId> = None;
        loop {
            let mut req = ScrollPointsBuilder::new(coll)
                .filter(filter.clone())
                .limit(4096)
                .with_payload(false)
                .with_vectors(false);
            if let Some(o) = offset.take() {
                req = req.offset(o);
            }
            let page = points.client().scroll(req).await?;
            out.extend(
                page.result
                    .iter()
                    .filter_map(|p| p.id.as_ref().map(point_id_string)),
            );
            match page.next_page_offset {
                Some(o) => offset = Some(o),
                None => break,
            }
        }
    }
    Ok(out)
}

/// Deletes everything recap holds about one (bot, user) in Postgres, in one transaction, in the lock order of the
/// module docs: the leader row of partition `part` (its epoch bumped), the user's windows, rollups and summaries,
/// then their rows in every [`super::USER_TABLES`] table (dead letters by their key, and the sweep's letters stored
/// before migration 0017 by the user and one of the bot's `collections`), and the tombstone listing `listed` (the
/// points the bot's collections held for them) and the points their rows held.
pub async fn forget_rows(
    store: &Store,
    bot: &str,
    user_id: &str,
    part: i32,
    listed: &[String],
    collections: &[String],
) -> Result<Deleted, StoreError> {
    let mut tx = store.pool().begin().await?;
    // 1. The owning partition's fence, first (as a checkpoint takes it). A partition that never had a leader gets a
    // lapsed lease row, so a replica taking it now waits for this transaction and restores after it.
    sqlx::query(
        "INSERT INTO recap_leader (id, owner, epoch, lease_until) VALUES ($1 + 1, '', 1, now() - interval '1 second')
         ON CONFLICT (id) DO UPDATE SET epoch = recap_leader.epoch + 1",
    )
    .bind(part)
    .execute(&mut *tx)
    .await?;
    // 2. and 3. The rows other writers lock first, in their order.
    for table in ["recap_windows", "recap_rollups", "conversation_summaries"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM {table} WHERE bot_name = $1 AND user_id = $2 ORDER BY id FOR UPDATE"
        )))
        .bind(bot)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    }
    // The points recap's rows hold (some may be gone from the collection, or not listed by a lagging replica).
    let known: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT p FROM (
             SELECT unnest(point_ids) AS p FROM recap_windows WHERE bot_name = $1 AND user_id = $2
             UNION ALL SELECT unnest(point_ids) FROM recap_open_windows WHERE bot_name = $1 AND user_id = $2
             UNION ALL SELECT unnest(point_ids) FROM recap_running_summaries WHERE bot_name = $1 AND user_id = $2) x",
    )
    .bind(bot)
    .bind(user_id)
    .fetch_all(&mut *tx)
    .await?;
    // 4. The deletes.
    let mut deleted = Vec::new();
    for table in super::USER_TABLES {
        let n = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE bot_name = $1 AND user_id = $2"
        )))
        .bind(bot)
        .bind(user_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        deleted.push((table.to_string(), n));
    }
    // Dead letters naming the user but no bot: the sweep's stored before migration 0017 (their bot is their
    // collection's), and events whose body had no bot (their subject names it).
    let n = sqlx::query(
        "DELETE FROM recap_dead_letters WHERE user_id = $2 AND bot_name IS NULL
             AND (subject = ANY($3) OR $1 = ANY(string_to_array(subject, '.')))",
    )
    .bind(bot)
    .bind(user_id)
    .bind(collections)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if let Some(d) = deleted.iter_mut().find(|(t, _)| t == "recap_dead_letters") {
        d.1 += n;
    }
    let mut points: Vec<&str> = listed.iter().chain(&known).map(String::as_str).collect();
    points.sort_unstable();
    points.dedup();
    sqlx::query(
        "INSERT INTO recap_forgotten (bot_name, user_key, forgotten_at, point_ids) VALUES ($1, $2, now(), $3)
         ON CONFLICT (bot_name, user_key) DO UPDATE SET forgotten_at = now(),
             point_ids = ARRAY(SELECT DISTINCT unnest(coalesce(recap_forgotten.point_ids, '{}') || EXCLUDED.point_ids))",
    )
    .bind(bot)
    .bind(crate::model::user_key(bot, user_id))
    .bind(&points)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted)
}
