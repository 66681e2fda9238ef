//! Summary vectors: the normalized centroid of a window's `content` vectors, kept in the Qdrant collection
//! [`COLLECTION`] (point id = the `conversation_summaries` row id) in step with the row.
//!
//! The row is the truth. `recap_summary_vectors` records which revision of each row has its vector in Qdrant; the
//! worker syncs right after a window's summary commits ([`on_summarized`]), and [`repair`] (every
//! `RECALL_REPAIR_INTERVAL` in `recap run`) re-syncs rows whose vector is missing or stale by fetching the window's
//! points again. `recap status` shows the drift ([`drift`]).

use std::collections::HashMap;
use std::time::Duration;

use chrono::NaiveDateTime;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    Condition, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, DeletePointsBuilder,
    Distance, FieldType, Filter, HnswConfigDiffBuilder, KeywordIndexParamsBuilder,
    PayloadIncludeSelector, PointStruct, Range, SearchPointsBuilder, UpsertPointsBuilder, Value,
    VectorParamsBuilder, vectors_config,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use std::sync::Arc;

use crate::fetch::Points;
use crate::model::state_sql;
use crate::sink::{Store, StoreError};
use crate::summarize::Message;

/// The collection recap owns (never one of the bots').
pub const COLLECTION: &str = "recap_summaries";

/// Errors of the vector side.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    #[error("qdrant: {0}")]
    Qdrant(#[from] qdrant_client::QdrantError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

/// The unit-length mean of the messages' vectors (those of the most common dimension); `None` when no message has
/// a vector or they cancel out.
pub fn centroid(messages: &[Message]) -> Option<Vec<f32>> {
    let mut dims: HashMap<usize, usize> = HashMap::new();
    for m in messages.iter().filter(|m| !m.vector.is_empty()) {
        *dims.entry(m.vector.len()).or_default() += 1;
    }
    let (&dim, _) = dims.iter().max_by_key(|(d, n)| (**n, **d))?;
    let mut sum = vec![0f64; dim];
    for m in messages.iter().filter(|m| m.vector.len() == dim) {
        let norm = m
            .vector
            .iter()
            .map(|x| f64::from(*x).powi(2))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 && norm.is_finite() {
            for (s, x) in sum.iter_mut().zip(&m.vector) {
                *s += f64::from(*x) / norm;
            }
        }
    }
    normalize(&sum)
}

/// `v / |v|` as f32; `None` for a zero or non-finite vector.
pub fn normalize(v: &[f64]) -> Option<Vec<f32>> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (norm > 1e-12 && norm.is_finite()).then(|| v.iter().map(|x| (x / norm) as f32).collect())
}

/// The collection's vector size; `None` when it does not exist yet.
pub async fn collection_dim(client: &Qdrant) -> Result<Option<u64>, VectorError> {
    if !client.collection_exists(COLLECTION).await? {
        return Ok(None);
    }
    let info = client.collection_info(COLLECTION).await?;
    let size = info
        .result
        .and_then(|r| r.config)
        .and_then(|c| c.params)
        .and_then(|p| p.vectors_config)
        .and_then(|v| v.config)
        .and_then(|c| match c {
            vectors_config::Config::Params(p) => Some(p.size),
            vectors_config::Config::ParamsMap(_) => None,
        });
    Ok(size)
}

/// Creates the collection (cosine, `dim`) with keyword indexes on `bot` and `user_id` if it is missing.
///
/// Laid out for multitenancy, as Qdrant's guide has it: every search recap makes is filtered to one (bot, user)
/// (tens to hundreds of summaries), which Qdrant answers from the `user_id` index by scoring the filtered points, so
/// no global HNSW graph is built (`m = 0`: none of the indexing CPU a global graph costs after writes, which competes
/// with searches on a small host), and `user_id` is the tenant key (`is_tenant`: a user's points
/// stored together).
pub async fn ensure_collection(client: &Qdrant, dim: u64) -> Result<(), VectorError> {
    if client.collection_exists(COLLECTION).await? {
        return Ok(());
    }
    let created = client
        .create_collection(
            CreateCollectionBuilder::new(COLLECTION)
                .vectors_config(VectorParamsBuilder::new(dim, Distance::Cosine))
                .hnsw_config(HnswConfigDiffBuilder::default().m(0).payload_m(0)),
        )
        .await;
    if let Err(e) = created {
        // Another replica may have created it meanwhile.
        if !client.collection_exists(COLLECTION).await? {
            return Err(e.into());
        }
    }
    for field in ["bot", "user_id"] {
        client
            .create_field_index(
                CreateFieldIndexCollectionBuilder::new(COLLECTION, field, FieldType::Keyword)
                    .field_index_params(
                        KeywordIndexParamsBuilder::default().is_tenant(field == "user_id"),
                    )
                    .wait(true),
            )
            .await?;
    }
    info!(
        collection = COLLECTION,
        dim, "created the summary vector collection"
    );
    Ok(())
}

/// The row a vector is written for (read by name: `ROW_COLUMNS`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SummaryRef {
    pub id: i32,
    pub bot: String,
    pub user_id: String,
    pub start: NaiveDateTime,
    pub end: NaiveDateTime,
    pub revision: i32,
    pub summary_type: String,
}

/// A summary row with the window it belongs to (`w.id AS window_id`, then [`ROW_COLUMNS`]).
#[derive(Debug, sqlx::FromRow)]
struct WindowSummary {
    window_id: i64,
    #[sqlx(flatten)]
    summary: SummaryRef,
}

/// The point id of a summary's vector: a UUID derived from (bot, user, row id), so databases sharing one Qdrant
/// (staging and production, tests) never overwrite each other's points. The row id is in the payload.
pub fn point_id(bot: &str, user_id: &str, summary_id: i32) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{bot}\u{0}{user_id}\u{0}{summary_id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

fn payload(r: &SummaryRef) -> HashMap<String, Value> {
    HashMap::from([
        ("summary_id".to_string(), i64::from(r.id).into()),
        ("bot".to_string(), r.bot.clone().into()),
        ("user_id".to_string(), r.user_id.clone().into()),
        ("start".to_string(), r.start.and_utc().timestamp().into()),
        ("end".to_string(), r.end.and_utc().timestamp().into()),
        ("revision".to_string(), i64::from(r.revision).into()),
        ("summary_type".to_string(), r.summary_type.clone().into()),
    ])
}

/// Upserts one summary's vector and records the synced revision (only while the row still exists).
pub async fn upsert(
    store: &Store,
    client: &Qdrant,
    r: &SummaryRef,
    vector: Vec<f32>,
) -> Result<(), VectorError> {
    ensure_collection(client, vector.len() as u64).await?;
    client
        .upsert_points(
            UpsertPointsBuilder::new(
                COLLECTION,
                vec![PointStruct::new(
                    point_id(&r.bot, &r.user_id, r.id),
                    vector,
                    payload(r),
                )],
            )
            .wait(true),
        )
        .await?;
    sqlx::query(
        "INSERT INTO recap_summary_vectors (summary_id, bot_name, user_id, revision)
         SELECT id, bot_name, user_id, $2 FROM conversation_summaries WHERE id = $1
         ON CONFLICT (summary_id) DO UPDATE SET revision = EXCLUDED.revision, synced_at = now()",
    )
    .bind(r.id)
    .bind(r.revision)
    .execute(store.pool())
    .await?;
    drop_orphans(store, client, &[(r.id, r.bot.clone(), r.user_id.clone())]).await?;
    metrics::counter!("recap_summary_vectors_synced_total").increment(1);
    Ok(())
}

/// The columns of a [`SummaryRef`] (named as its fields) from `conversation_summaries s`.
const ROW_COLUMNS: &str = "s.id, s.bot_name AS bot, s.user_id, s.start_timestamp AS start, s.end_timestamp AS \"end\", \
    s.revision, coalesce(s.summary_type, 'time_window') AS summary_type";

/// Called by the worker after a window's summary committed: writes the summary's vector. Failures are logged and
/// left to [`repair`]; they never fail the window. [`on_summarized_many`] for one window.
pub async fn on_summarized(
    store: &Store,
    client: &Qdrant,
    window_id: i64,
    centroid: Option<&[f32]>,
) {
    on_summarized_many(store, client, &[(window_id, centroid)]).await
}

/// Called by the worker after a batch of windows' summaries committed: writes their vectors in one Qdrant upsert
/// (and one query to read the rows, one to record the synced revisions). Failures are logged and left to [`repair`];
/// they never fail a window.
pub async fn on_summarized_many(store: &Store, client: &Qdrant, windows: &[(i64, Option<&[f32]>)]) {
    let mut vectors: HashMap<i64, &[f32]> = HashMap::new();
    for (id, v) in windows {
        match v {
            Some(v) => {
                vectors.insert(*id, v);
            }
            None => debug!(window_id = id, "no content vectors; no summary vector"),
        }
    }
    if vectors.is_empty() {
        return;
    }
    let ids: Vec<i64> = vectors.keys().copied().collect();
    let r = async {
        let rows: Vec<WindowSummary> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT w.id AS window_id, {ROW_COLUMNS} FROM recap_windows w
             JOIN conversation_summaries s ON s.id = w.summary_id WHERE w.id = ANY($1)"
        )))
        .bind(&ids)
        .fetch_all(store.pool())
        .await?;
        let items: Vec<(SummaryRef, Vec<f32>)> = rows
            .into_iter()
            .filter_map(|row| {
                vectors
                    .get(&row.window_id)
                    .map(|v| (row.summary, v.to_vec()))
            })
            .collect();
        upsert_many(store, client, items).await
    }
    .await;
    if let Err(e) = r {
        metrics::counter!("recap_summary_vector_errors_total").increment(ids.len() as u64);
        warn!(windows = ids.len(), error = %e, "summary vectors not written; the repair pass will retry");
    }
}

/// Upserts many summaries' vectors (one request) and records the synced revisions (only while the rows still exist).
pub async fn upsert_many(
    store: &Store,
    client: &Qdrant,
    items: Vec<(SummaryRef, Vec<f32>)>,
) -> Result<(), VectorError> {
    let Some(dim) = items.first().map(|(_, v)| v.len() as u64) else {
        return Ok(());
    };
    let (ids, revisions): (Vec<i32>, Vec<i32>) =
        items.iter().map(|(r, _)| (r.id, r.revision)).unzip();
    let keys: Vec<(i32, String, String)> = items
        .iter()
        .map(|(r, _)| (r.id, r.bot.clone(), r.user_id.clone()))
        .collect();
    let points: Vec<PointStruct> = items
        .into_iter()
        .map(|(r, v)| PointStruct::new(point_id(&r.bot, &r.user_id, r.id), v, payload(&r)))
        .collect();
    let n = points.len() as u64;
    // The collection nearly always exists: created (then tried again) only when the upsert fails.
    if client
        .upsert_points(UpsertPointsBuilder::new(COLLECTION, points.clone()).wait(true))
        .await
        .is_err()
    {
        ensure_collection(client, dim).await?;
        client
            .upsert_points(UpsertPointsBuilder::new(COLLECTION, points).wait(true))
            .await?;
    }
    sqlx::query(
        "INSERT INTO recap_summary_vectors (summary_id, bot_name, user_id, revision)
         SELECT s.id, s.bot_name, s.user_id, x.rev
         FROM unnest($1::int[], $2::int[]) AS x(id, rev) JOIN conversation_summaries s ON s.id = x.id
         ON CONFLICT (summary_id) DO UPDATE SET revision = EXCLUDED.revision, synced_at = now()",
    )
    .bind(&ids)
    .bind(&revisions)
    .execute(store.pool())
    .await?;
    drop_orphans(store, client, &keys).await?;
    metrics::counter!("recap_summary_vectors_synced_total").increment(n);
    Ok(())
}

/// Deletes the vectors of `rows` (summary id, bot, user) from [`COLLECTION`].
async fn delete_vectors(
    client: &Qdrant,
    rows: impl Iterator<Item = &(i32, String, String)>,
) -> Result<(), VectorError> {
    let ids: Vec<qdrant_client::qdrant::PointId> = rows
        .map(|(id, bot, user)| point_id(bot, user, *id).into())
        .collect();
    client
        .delete_points(
            DeletePointsBuilder::new(COLLECTION)
                .points(qdrant_client::qdrant::PointsIdsList { ids })
                .wait(true),
        )
        .await?;
    Ok(())
}

/// After an upsert: deletes the vectors just written whose row is gone (a forget, or a merge, that committed after
/// the sync read its rows). Read after the upsert, so whichever order the two take, no vector outlives its row: a
/// row still there now is deleted later, and its deleter removes the vectors afterwards (`recall::forget_user`).
async fn drop_orphans(
    store: &Store,
    client: &Qdrant,
    written: &[(i32, String, String)],
) -> Result<(), VectorError> {
    let ids: Vec<i32> = written.iter().map(|k| k.0).collect();
    let gone: Vec<i32> = sqlx::query_scalar(
        "SELECT x.id FROM unnest($1::int[]) AS x(id)
         WHERE NOT EXISTS (SELECT 1 FROM conversation_summaries s WHERE s.id = x.id)",
    )
    .bind(&ids)
    .fetch_all(store.pool())
    .await?;
    if gone.is_empty() {
        return Ok(());
    }
    delete_vectors(client, written.iter().filter(|k| gone.contains(&k.0))).await?;
    debug!(
        rows = gone.len(),
        "vectors of rows deleted meanwhile removed"
    );
    Ok(())
}

/// Removes the vectors (and their entries) of rows deleted without their vectors: a late message that bridges two
/// windows deletes the later one's summary row in the checkpoint transaction, which does not reach Qdrant (nemesis
/// finding 2). Up to `limit` per call; returns how many were removed. A search never returns such a vector (it reads
/// the rows by id), but it would stay for good without this.
pub async fn drop_deleted(
    store: &Store,
    client: &Qdrant,
    limit: i64,
) -> Result<usize, VectorError> {
    let gone: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT v.summary_id, v.bot_name, v.user_id FROM recap_summary_vectors v
         WHERE NOT EXISTS (SELECT 1 FROM conversation_summaries s WHERE s.id = v.summary_id)
         ORDER BY v.summary_id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    if gone.is_empty() {
        return Ok(0);
    }
    delete_vectors(client, gone.iter()).await?;
    let ids: Vec<i32> = gone.iter().map(|g| g.0).collect();
    sqlx::query(
        "DELETE FROM recap_summary_vectors v WHERE v.summary_id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM conversation_summaries s WHERE s.id = v.summary_id)",
    )
    .bind(&ids)
    .execute(store.pool())
    .await?;
    Ok(gone.len())
}

/// Summary vectors out of step with their rows (windows summarized by recap only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Drift {
    /// Rows without a vector.
    pub missing: i64,
    /// Rows whose vector is of an older revision.
    pub stale: i64,
}

/// The rows out of step with their vectors (`{done}`: see `model::state_sql`).
fn drift_from() -> &'static str {
    state_sql!(
        "FROM recap_windows w JOIN conversation_summaries s ON s.id = w.summary_id
     LEFT JOIN recap_summary_vectors v ON v.summary_id = s.id
     WHERE w.state = {done} AND (v.summary_id IS NULL OR v.revision <> s.revision)"
    )
}

pub async fn drift(store: &Store) -> Result<Drift, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE v.summary_id IS NULL) AS missing,
                count(*) FILTER (WHERE v.summary_id IS NOT NULL) AS stale {}",
        drift_from()
    )))
    .fetch_one(store.pool())
    .await?)
}

/// Which bot a Qdrant collection belongs to, if any.
pub type BotForCollection = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What the repair pass needs (not the whole pipeline context): the store, the bots' points (whose client also holds
/// [`COLLECTION`]), which bot a collection belongs to, and how often it runs.
#[derive(Clone)]
pub struct Repair {
    pub store: Store,
    pub points: Arc<Points>,
    /// The bot a Qdrant collection belongs to (`COLLECTION_MAP` / `COLLECTION_PATTERNS`: `Config::bot_for_collection`).
    pub bot_for_collection: BotForCollection,
    /// `RECALL_REPAIR_INTERVAL`.
    pub every: Duration,
}

/// Re-syncs up to `limit` rows whose vector is missing or stale; returns how many were written.
pub async fn repair(ctx: &Repair, limit: i64) -> Result<usize, VectorError> {
    let rows: Vec<WindowSummary> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT w.id AS window_id, {ROW_COLUMNS} {} ORDER BY s.id LIMIT $1",
        drift_from()
    )))
    .bind(limit)
    .fetch_all(ctx.store.pool())
    .await?;
    let mut written = 0;
    for WindowSummary {
        window_id,
        summary: r,
    } in rows
    {
        let ids = ctx.store.window_points(window_id).await?;
        let bot_for = |c: &str| (ctx.bot_for_collection)(c);
        let fetched = match ctx.points.collections_for(&r.bot, &bot_for).await {
            Ok(colls) => {
                let range = (
                    r.start.and_utc().timestamp_millis(),
                    r.end.and_utc().timestamp_millis(),
                );
                ctx.points
                    .fetch_window(&colls, &ids, &r.user_id, range)
                    .await
            }
            Err(e) => Err(e),
        };
        match fetched {
            Ok((messages, _)) => {
                if let Some(v) = centroid(&messages) {
                    upsert(&ctx.store, ctx.points.client(), &r, v).await?;
                    written += 1;
                }
            }
            Err(e) => {
                debug!(summary = r.id, error = %e, "cannot fetch the window's points for its vector")
            }
        }
    }
    Ok(written)
}

/// The periodic repair pass of `recap run`.
pub async fn run_repair(ctx: Repair, shutdown: CancellationToken) -> anyhow::Result<()> {
    let every = ctx.every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        match repair(&ctx, 500).await {
            Ok(n) if n > 0 => info!(written = n, "summary vectors re-synced"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "summary vector repair failed; next pass in {every:?}"),
        }
        match drop_deleted(&ctx.store, ctx.points.client(), 500).await {
            Ok(n) if n > 0 => info!(removed = n, "vectors of deleted summary rows removed"),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "removing vectors of deleted rows failed; next pass in {every:?}")
            }
        }
        if let Ok(d) = drift(&ctx.store).await {
            metrics::gauge!("recap_summary_vector_drift", "kind" => "missing")
                .set(d.missing as f64);
            metrics::gauge!("recap_summary_vector_drift", "kind" => "stale").set(d.stale as f64);
        }
    }
}

/// The filter selecting one (bot, user)'s points, optionally overlapping `[since, until)` (unix seconds).
pub fn user_filter(bot: &str, user_id: &str, since: Option<i64>, until: Option<i64>) -> Filter {
    let mut must = vec![
        Condition::matches("bot", bot.to_string()),
        Condition::matches("user_id", user_id.to_string()),
    ];
    if let Some(s) = since {
        must.push(Condition::range(
            "end",
            Range {
                gt: Some(s as f64),
                ..Default::default()
            },
        ));
    }
    if let Some(u) = until {
        must.push(Condition::range(
            "start",
            Range {
                lt: Some(u as f64),
                ..Default::default()
            },
        ));
    }
    Filter::must(must)
}

/// The nearest summary ids of one (bot, user), best first, with their cosine scores.
pub async fn search(
    client: &Qdrant,
    filter: Filter,
    vector: Vec<f32>,
    limit: u64,
) -> Result<Vec<(i32, f32)>, VectorError> {
    let res = client
        .search_points(
            SearchPointsBuilder::new(COLLECTION, vector, limit)
                .filter(filter)
                .with_payload(PayloadIncludeSelector {
                    fields: vec!["summary_id".to_string()],
                }),
        )
        .await?;
    Ok(res
        .result
        .into_iter()
        .filter_map(|p| {
            let id = p.payload.get("summary_id")?.as_integer()?;
            i32::try_from(id).ok().map(|id| (id, p.score))
        })
        .collect())
}

/// Deletes one (bot, user)'s summary vectors (nothing to do when the collection does not exist).
pub async fn delete_user(client: &Qdrant, bot: &str, user_id: &str) -> Result<(), VectorError> {
    if !client.collection_exists(COLLECTION).await? {
        return Ok(());
    }
    client
        .delete_points(
            DeletePointsBuilder::new(COLLECTION)
                .points(user_filter(bot, user_id, None, None))
                .wait(true),
        )
        .await?;
    Ok(())
}

/// How long the repair pass waits between runs when none is configured.
pub const DEFAULT_REPAIR_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(v: Vec<f32>) -> Message {
        Message {
            point_id: "1".into(),
            role: "user".into(),
            text: "x".into(),
            ts_ms: 0,
            emotion: None,
            vector: v,
        }
    }

    #[test]
    fn centroid_is_the_unit_mean_of_unit_vectors() {
        let c = centroid(&[msg(vec![2.0, 0.0]), msg(vec![0.0, 5.0]), msg(vec![])]).unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((c[0] - h).abs() < 1e-6 && (c[1] - h).abs() < 1e-6, "{c:?}");
        assert!(centroid(&[msg(vec![])]).is_none());
        assert!(centroid(&[msg(vec![1.0, 0.0]), msg(vec![-1.0, 0.0])]).is_none());
        // the most common dimension wins; others are ignored
        let c = centroid(&[
            msg(vec![1.0, 0.0, 0.0]),
            msg(vec![0.0, 1.0]),
            msg(vec![0.0, 1.0]),
        ])
        .unwrap();
        assert_eq!(c.len(), 2);
    }
}
