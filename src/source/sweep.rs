//! The sweep source: a periodic Qdrant scroll that finds the messages events missed, and the whole input when recap
//! runs without NATS. It produces the same [`Batch`]es as the event source, so the tracker cannot tell them apart and
//! a point seen by both is one message (the store de-duplicates by point id).
//!
//! # A cycle
//! Every `interval` (the first at once) the sweep lists the collections (fresh, so new bots appear) and keeps those
//! that map to a bot. Per collection it scrolls only the points with `timestamp_unix >= start`, where `start` is the
//! collection's checkpoint `sweep:<collection>` minus `overlap` — or now minus `lookback` on its first sweep — so the
//! cost of a cycle grows with the points added since the last one, not with the history. Each page is one batch; its
//! checkpoint commits in the same transaction as the tracker state, then [`Source::commit`] moves the cursor on, and
//! [`Source::abandon`] makes the next call read the same page again.
//!
//! * **Ordered** (the collection has a float or integer range index on `timestamp_unix`): `order_by` ascending with
//!   `start_from` (inclusive, so no range condition repeats it); the next page starts from the last value seen and
//!   excludes the ids already returned at exactly that value. Every page's checkpoint is the largest value in it, so
//!   an interrupted sweep resumes where it stopped.
//! * **Unordered** (no such index): a filtered scroll with `offset` paging, in id order. The checkpoint stays at the
//!   collection's start until its last page, which stores the largest value seen: an interrupted sweep of such a
//!   collection starts it over (re-read points are no-ops in the store). recap creates the index only when told to
//!   (`create_index`); it never changes the bots' collections otherwise.
//! * **Points without `timestamp_unix`** (old data) cannot match a range filter. On a collection's first sweep (no
//!   checkpoint yet) one extra pass reads the points where that field is empty (`is_empty`), dates them by the naive
//!   ISO `timestamp` ([`payload_time`](crate::fetch::payload_time)) and keeps those not older than `start`. That pass
//!   stores no checkpoint, so an interrupted first sweep repeats it. Limitation: such points written *after* a
//!   collection's first sweep are found only through their events (or a backfill), never by later sweeps.
//! * The checkpoint never moves past the wall clock: a point dated in the future cannot hide the points after it (it
//!   is re-read each cycle until its time has come).
//!
//! # Prefetch
//! As soon as a page arrives, the request for the page after it goes out (a spawned task): its cursor is known at
//! once (`order_by`: the last value and the ids at it; offset paging: `next_page_offset`), so the next round trip
//! overlaps the mapping, applying and committing of the current page. At most one page is ahead, and only within a
//! collection (the last page of a collection starts nothing). What the source hands out is unchanged:
//! * A prefetched page is used only by a read from exactly the cursor it was made for, and at most once.
//! * [`Source::abandon`] (or a page neither committed nor abandoned) leaves the cursor where it was: the next call
//!   reads that page again from Qdrant, never from a prefetch. The prefetch of the page after it is kept meanwhile;
//!   if the page read again leads to the same cursor (nothing changed), it is used; else it is discarded and the
//!   right page requested. A discarded prefetch that had arrived counts in `points_read` (it was the cost); one still
//!   in flight is cancelled and counts nothing.
//! * A prefetched page older than 10 s when it is needed (a slow `apply`, an outage) is discarded and read again, so
//!   a page is never much older than it would be without prefetch (late writes are what `overlap` is for).
//! * A prefetch that failed fails the call that needs its page, exactly as if that call had read it (a deleted
//!   collection is skipped, any other error is returned and the page is read again on the next call).
//!
//! `caught_up` is set only on the last page of a cycle and on the empty batches handed out (about once a second)
//! while waiting for the next cycle, so the ingest loop keeps ticking and renewing its lease. Those batches carry the
//! sweep's horizon, the start of the last completed cycle ([`Batch::horizon`]): the wall clock may move watermarks
//! only to what that cycle could have seen, never to "now" between cycles (points written since are unread).
//!
//! Swept payloads pass the same field checks as events ([`crate::event::check_message`]); a point that fails them is
//! a dead letter with its reason (stored once however often the point is read again).

//! The paging of one collection (cursor, scroll request, prefetch, a page into a batch) is in `sweep/page.rs`.

mod page;

use page::{Cursor, Sweep};

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use qdrant_client::QdrantError;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::batch::{Batch, Source, SourceError};
use crate::fetch::{FetchError, Points};
use crate::sink::{Store, StoreError};

/// The bot a collection belongs to, or `None` for collections recap does not read.
pub type BotForCollection = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Whether a (bot, user) key's points are this sweep's.
pub type KeepUser = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// How the sweep runs (see the module docs).
#[derive(Clone)]
pub struct SweepSettings {
    /// Time between the starts of two cycles.
    pub interval: Duration,
    /// How far back the first sweep of a collection starts.
    pub lookback: Duration,
    /// How far before its checkpoint a collection's next sweep starts (late writes, clock skew).
    pub overlap: Duration,
    /// Points per scroll page (and per batch).
    pub page_size: u32,
    /// The bot a collection belongs to, or `None` for collections recap does not read.
    pub bot_for_collection: BotForCollection,
    /// Create a float index on `timestamp_unix` where it is missing (changes the bots' collections).
    pub create_index: bool,
    /// Only the points of these (bot, user) keys become messages (`None`: all): a partition's keys when ingest is
    /// partitioned by user and every partition sweeps every collection.
    pub keep_user: Option<KeepUser>,
    /// Checkpoint names are `<prefix>:<collection>`: `sweep` for the service, `backfill` for `recap backfill` (so a
    /// backfill resumes where it stopped without moving the service's sweep).
    pub checkpoint_prefix: String,
}

impl fmt::Debug for SweepSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SweepSettings")
            .field("interval", &self.interval)
            .field("lookback", &self.lookback)
            .field("overlap", &self.overlap)
            .field("page_size", &self.page_size)
            .field("create_index", &self.create_index)
            .finish_non_exhaustive()
    }
}

/// What one cycle read, per collection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepReport {
    pub collections: Vec<CollectionReport>,
    pub duration: Duration,
}

impl SweepReport {
    /// Points read in the cycle (re-reads of abandoned pages and prefetched pages discarded included: this is the cost).
    pub fn points_read(&self) -> u64 {
        self.collections.iter().map(|c| c.points_read).sum()
    }
    /// Messages delivered in committed pages.
    pub fn messages(&self) -> u64 {
        self.collections.iter().map(|c| c.messages).sum()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectionReport {
    pub collection: String,
    pub bot: String,
    /// Whether the ordered (`order_by`) path was used.
    pub ordered: bool,
    /// Where the scroll started (`timestamp_unix`, seconds).
    pub start: f64,
    pub points_read: u64,
    pub messages: u64,
    pub pages: u64,
}

/// Why the sweep could not go on (the cycle resumes from the same place on the next call).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Qdrant(#[from] FetchError),
    #[error("reading the sweep checkpoint: {0}")]
    Store(#[from] StoreError),
}

impl From<QdrantError> for SweepError {
    fn from(e: QdrantError) -> Self {
        SweepError::Qdrant(e.into())
    }
}
#[derive(Debug)]
struct Pending {
    /// `None`: this was the collection's last page.
    next: Option<Cursor>,
    max_seen: f64,
    messages: u64,
}

#[derive(Debug)]
struct Cycle {
    /// Collections still to sweep, with their bots.
    queue: VecDeque<(String, String)>,
    current: Option<Sweep>,
    report: SweepReport,
    started: Instant,
    /// The wall clock (ms) when the cycle started: every point visible in Qdrant then is read by this cycle.
    started_ms: i64,
    /// Bots with a collection this cycle skipped (failing, see [`SweepSource::isolate`]): its horizon is not theirs.
    held_back: Vec<String>,
    /// Bots with more than one collection in this cycle: their pages never move a watermark (issue 24, case 2).
    shared_bots: std::collections::HashSet<String>,
}

/// How long a failing collection is left out of the sweep after its `n`-th failure in a row: 10 s, doubling, at most
/// 10 minutes.
pub fn collection_backoff(failures: u32) -> Duration {
    Duration::from_secs(
        10u64
            .saturating_mul(1u64 << failures.saturating_sub(1).min(6))
            .min(600),
    )
}

/// The sweep source (see the module docs).
pub struct SweepSource {
    points: Arc<Points>,
    store: Store,
    settings: SweepSettings,
    next_cycle: Instant,
    cycle: Option<Cycle>,
    pending: Option<Pending>,
    cycles: u64,
    last_report: SweepReport,
    /// The start (wall clock, ms) of the last completed cycle: the sweep's horizon (see [`Batch::horizon`]).
    horizon: Option<i64>,
    /// Bots the last completed cycle skipped a collection of: the horizon does not tick them.
    held_back: Vec<String>,
    /// Collections that failed, by name: failures in a row and when to try again (issue 24, case 6).
    failing: HashMap<String, (u32, Instant)>,
}

fn now_secs() -> f64 {
    chrono::Utc::now().timestamp_micros() as f64 / 1e6
}

impl SweepSource {
    pub fn new(points: Arc<Points>, store: Store, settings: SweepSettings) -> SweepSource {
        SweepSource {
            points,
            store,
            settings,
            next_cycle: Instant::now(),
            cycle: None,
            pending: None,
            cycles: 0,
            last_report: SweepReport::default(),
            horizon: None,
            held_back: Vec::new(),
            failing: HashMap::new(),
        }
    }

    /// Points read in the last completed cycle.
    /// Starts the first cycle one interval from now instead of at once (hybrid mode: at start-up the durable consumer
    /// replays what was missed; the sweep is the safety net after that).
    pub fn delay_first_cycle(mut self) -> SweepSource {
        self.next_cycle = Instant::now() + self.settings.interval;
        self
    }

    /// True while a cycle is under way or the next one is due: the hybrid source asks before it reads events.
    pub fn wants_batch(&self) -> bool {
        self.cycle.is_some() || Instant::now() >= self.next_cycle
    }

    /// True while a cycle is under way (its remaining pages may belong to open windows).
    pub fn in_cycle(&self) -> bool {
        self.cycle.is_some()
    }

    pub fn last_cycle_points_read(&self) -> u64 {
        self.last_report.points_read()
    }

    /// The report of the last completed cycle.
    pub fn last_report(&self) -> &SweepReport {
        &self.last_report
    }

    /// Cycles completed since this source was made.
    pub fn cycles_completed(&self) -> u64 {
        self.cycles
    }

    fn checkpoint_name(&self, collection: &str) -> String {
        format!("{}:{collection}", self.settings.checkpoint_prefix)
    }

    /// Starts a cycle now: lists the collections that map to a bot.
    async fn begin_cycle(&mut self) -> Result<(), SweepError> {
        let queue: VecDeque<(String, String)> = self
            .points
            .collections(true)
            .await?
            .into_iter()
            .filter_map(|c| (self.settings.bot_for_collection)(&c).map(|bot| (c, bot)))
            .collect();
        debug!(collections = queue.len(), "sweep cycle starts");
        let mut per_bot: HashMap<&str, usize> = HashMap::new();
        for (_, bot) in &queue {
            *per_bot.entry(bot.as_str()).or_default() += 1;
        }
        let shared_bots = per_bot
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(b, _)| b.to_string())
            .collect();
        let started = Instant::now();
        self.next_cycle = started + self.settings.interval;
        self.cycle = Some(Cycle {
            queue,
            current: None,
            report: SweepReport::default(),
            started,
            started_ms: chrono::Utc::now().timestamp_millis(),
            held_back: Vec::new(),
            shared_bots,
        });
        Ok(())
    }

    fn finish_cycle(&mut self) {
        let Some(mut cycle) = self.cycle.take() else {
            return;
        };
        cycle.report.duration = cycle.started.elapsed();
        self.cycles += 1;
        self.horizon = Some(cycle.started_ms);
        self.held_back = std::mem::take(&mut cycle.held_back);
        let read = cycle.report.points_read();
        metrics::counter!("recap_sweep_cycles_total").increment(1);
        metrics::gauge!("recap_sweep_points_read_last_cycle").set(read as f64);
        info!(
            collections = cycle.report.collections.len(),
            points_read = read,
            messages = cycle.report.messages(),
            seconds = cycle.report.duration.as_secs_f64(),
            "sweep cycle done"
        );
        self.last_report = cycle.report;
    }
    /// The next batch, or why there is none; the cycle is resumed from the same place on the next call.
    async fn try_next_batch(&mut self) -> Result<Batch, SweepError> {
        self.pending = None; // a page neither committed nor abandoned is read again
        loop {
            let Some(cycle) = self.cycle.as_mut() else {
                let now = Instant::now();
                if now >= self.next_cycle {
                    self.begin_cycle().await?;
                    continue;
                }
                tokio::time::sleep((self.next_cycle - now).min(Duration::from_secs(1))).await;
                // Caught up only to the start of the last completed cycle: points written since are unread.
                return Ok(Batch {
                    caught_up: self.horizon.is_some(),
                    horizon: self.horizon,
                    held_back: self.held_back.clone(),
                    ..Batch::default()
                });
            };
            if let Some(current) = &cycle.current {
                let (collection, bot) = (current.collection.clone(), current.bot.clone());
                match self.read_page().await {
                    Ok(mut b) => {
                        // the cycle's last page: its horizon is not the skipped collections' bots'
                        if b.caught_up
                            && let Some(c) = &self.cycle
                        {
                            b.held_back = c.held_back.clone();
                        }
                        return Ok(b);
                    }
                    Err(e) => {
                        self.skip_if_gone(&collection, e)
                            .await
                            .or_else(|e| self.isolate(&collection, &bot, e))?;
                        continue;
                    }
                }
            }
            let Some((collection, bot)) = cycle.queue.front().cloned() else {
                self.finish_cycle();
                return Ok(Batch {
                    caught_up: true,
                    horizon: self.horizon,
                    held_back: self.held_back.clone(),
                    ..Batch::default()
                });
            };
            if self
                .failing
                .get(&collection)
                .is_some_and(|(_, retry)| Instant::now() < *retry)
            {
                // still backing off: left out of this cycle, its bot held back
                cycle.queue.pop_front();
                cycle.held_back.push(bot);
                continue;
            }
            let sweep = match self.open(&collection, &bot).await {
                Ok(s) => s,
                Err(e) => {
                    self.skip_if_gone(&collection, e)
                        .await
                        .or_else(|e| self.isolate(&collection, &bot, e))?;
                    continue;
                }
            };
            let cycle = self.cycle.as_mut().expect("cycle");
            cycle.queue.pop_front();
            cycle.report.collections.push(CollectionReport {
                collection,
                bot,
                ordered: sweep.ordered,
                start: sweep.start,
                ..CollectionReport::default()
            });
            cycle.current = Some(sweep);
        }
    }

    /// A collection that fails (Qdrant answers with an error for it, or cannot be reached) is left out of this cycle
    /// and of the next ones for a back-off ([`collection_backoff`]), so the other collections, and the cycle's end
    /// (the horizon, hybrid mode's event-time ticks), go on; its bot is held back (the horizon does not tick it, so
    /// none of its windows closes while its points are unread). Its checkpoint stays: it resumes from there. A
    /// Postgres error is not the collection's: it is returned.
    fn isolate(&mut self, collection: &str, bot: &str, e: SweepError) -> Result<(), SweepError> {
        if let SweepError::Store(_) = e {
            return Err(e);
        }
        let entry = self
            .failing
            .entry(collection.to_string())
            .or_insert((0, Instant::now()));
        entry.0 += 1;
        let wait = collection_backoff(entry.0);
        entry.1 = Instant::now() + wait;
        metrics::counter!("recap_sweep_collection_failures_total", "collection" => collection.to_string())
            .increment(1);
        warn!(
            collection,
            bot,
            failures = entry.0,
            retry_in_s = wait.as_secs(),
            error = %e,
            "sweep of a collection failed; skipped, the others go on"
        );
        self.pending = None;
        if let Some(cycle) = self.cycle.as_mut() {
            cycle.queue.retain(|(c, _)| c != collection);
            if cycle
                .current
                .as_ref()
                .is_some_and(|s| s.collection == collection)
            {
                cycle.current = None;
            }
            cycle.held_back.push(bot.to_string());
        }
        Ok(())
    }

    /// After an error on a collection: if it was deleted meanwhile, drop it from this cycle; else report the error.
    async fn skip_if_gone(&mut self, collection: &str, e: SweepError) -> Result<(), SweepError> {
        if let SweepError::Qdrant(_) = e
            && let Ok(false) = self.points.client().collection_exists(collection).await
        {
            warn!(collection, "collection vanished during the sweep; skipped");
            let cycle = self.cycle.as_mut().expect("cycle");
            cycle.queue.retain(|(c, _)| c != collection);
            if cycle
                .current
                .as_ref()
                .is_some_and(|s| s.collection == collection)
            {
                cycle.current = None;
            }
            return Ok(());
        }
        Err(e)
    }

    /// Adds points read (pages handed out and prefetched pages discarded) to the current collection's figures.
    fn count_read(&mut self, read: u64) {
        let Some(cycle) = self.cycle.as_mut() else {
            return;
        };
        if let Some(r) = cycle.report.collections.last_mut() {
            r.points_read += read;
            metrics::counter!("recap_sweep_points_read_total", "collection" => r.collection.clone())
                .increment(read);
        }
    }
}

impl Source for SweepSource {
    /// The next page of the current cycle, or (between cycles) an empty caught-up batch after at most a second.
    /// Postgres errors do not surface as [`SourceError`] (it has no variant for them): they are logged and an empty,
    /// not caught-up batch comes back after a second; the next call retries from the same place.
    async fn next_batch(&mut self) -> Result<Batch, SourceError> {
        match self.try_next_batch().await {
            Ok(b) => Ok(b),
            Err(SweepError::Qdrant(e)) => Err(SourceError::Qdrant(e)),
            Err(SweepError::Store(e)) => {
                warn!(error = %e, "sweep cannot read its checkpoint; retrying");
                metrics::counter!("recap_sweep_errors_total", "kind" => "postgres").increment(1);
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(Batch::default())
            }
        }
    }

    async fn commit(&mut self) -> Result<(), SourceError> {
        self.advance().await;
        Ok(())
    }

    async fn advance(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let Some(cycle) = self.cycle.as_mut() else {
            return;
        };
        let Some(sweep) = cycle.current.as_mut() else {
            return;
        };
        sweep.max_seen = p.max_seen;
        if let Some(r) = cycle.report.collections.last_mut() {
            r.messages += p.messages;
            r.pages += 1;
        }
        match p.next {
            Some(cursor) => sweep.cursor = cursor,
            None => {
                self.failing.remove(&sweep.collection);
                cycle.current = None;
                if cycle.queue.is_empty() {
                    self.finish_cycle();
                }
            }
        }
    }

    async fn abandon(&mut self) {
        // The committed cursor did not move: the next call reads the same page again.
        self.pending = None;
    }

    async fn rewind(&mut self, _store: &Store) -> Result<(), SourceError> {
        // Pages applied since the last checkpoint are lost with the state: start a cycle again now, from the stored
        // checkpoints, and tick nothing until it completes (the old horizon counted pages no longer applied).
        self.pending = None;
        if self.cycle.take().is_some() || self.horizon.is_some() {
            self.horizon = None;
            self.next_cycle = Instant::now();
        }
        Ok(())
    }
}

/// Runs one full cycle now (`recap sweep --once`): every page goes through `apply` (e.g. `pipeline::Ingest::apply`),
/// and is committed once `apply` succeeded. Returns what the cycle read per collection. A failed `apply` abandons the
/// page and ends the run with its error; the stored checkpoints keep what was committed.
///
/// ```ignore
/// let report = sweep_once(&mut source, async |b| ingest.apply(b, now_ms()).await.map(drop)).await?;
/// ```
pub async fn sweep_once<E>(
    source: &mut SweepSource,
    mut apply: impl AsyncFnMut(&Batch) -> Result<(), E>,
) -> anyhow::Result<SweepReport>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let done = source.cycles;
    if source.cycle.is_none() {
        source.begin_cycle().await?;
    }
    while source.cycles == done {
        let batch = source.try_next_batch().await?;
        if let Err(e) = apply(&batch).await {
            source.abandon().await;
            return Err(e.into());
        }
        source.commit().await?;
    }
    Ok(source.last_report.clone())
}

/// Points read per collection, as `sweep --once` prints them.
impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.collections {
            let path = if c.ordered { "ordered" } else { "unordered" };
            writeln!(
                f,
                "{}\tbot={}\t{path}\tpoints_read={}\tmessages={}",
                c.collection, c.bot, c.points_read, c.messages
            )?;
        }
        write!(
            f,
            "total\tpoints_read={}\tmessages={}\t{:.1}s",
            self.points_read(),
            self.messages(),
            self.duration.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::page::Prefetch;
    use super::*;
    use qdrant_client::qdrant::{CreateFieldIndexCollectionBuilder, FieldType, Value};
    use std::collections::HashMap;

    // ---- with the services (DATABASE_URL, QDRANT_URL: `eval "$(scripts/services up)"`)

    fn env(name: &str) -> String {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: this test needs the real services; start them with `eval \"$(scripts/services up)\"`")
        })
    }

    /// A fresh database with recap's schema; returns it and its name (to drop it).
    async fn fresh_store() -> (Store, String) {
        let opts: sqlx::postgres::PgConnectOptions =
            env("DATABASE_URL").parse().expect("DATABASE_URL");
        let admin = Store::connect(opts.clone(), 1).await.expect("connect");
        let db = format!("recap_unit_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(admin.pool())
            .await
            .expect("create database");
        admin.pool().close().await;
        let store = Store::connect(opts.database(&db), 2)
            .await
            .expect("connect");
        store.migrate().await.expect("migrations");
        (store, db)
    }

    async fn drop_db(store: Store, db: &str) {
        store.pool().close().await;
        let opts: sqlx::postgres::PgConnectOptions =
            env("DATABASE_URL").parse().expect("DATABASE_URL");
        let admin = Store::connect(opts, 1).await.expect("connect");
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
        )))
        .execute(admin.pool())
        .await;
    }

    /// A message point with an integer id (so its place in id order is known).
    fn message(id: u64, ts: f64) -> qdrant_client::qdrant::PointStruct {
        let s = |v: &str| Value::from(v.to_string());
        let iso = chrono::DateTime::from_timestamp_micros((ts * 1e6).round() as i64)
            .unwrap()
            .naive_utc()
            .format("%Y-%m-%dT%H:%M:%S%.6f")
            .to_string();
        let payload: HashMap<String, Value> = [
            ("user_id", s("u1")),
            ("content", s(&format!("message {id}"))),
            ("role", s("user")),
            ("source", s("user_message")),
            ("memory_type", s("conversation")),
            ("timestamp", s(&iso)),
            ("timestamp_unix", Value::from(ts)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        qdrant_client::qdrant::PointStruct::new(id, vec![0.5f32, 0.5], payload)
    }

    async fn upsert(points: &Points, coll: &str, ps: Vec<qdrant_client::qdrant::PointStruct>) {
        points
            .client()
            .upsert_points(qdrant_client::qdrant::UpsertPointsBuilder::new(coll, ps).wait(true))
            .await
            .expect("upsert");
    }

    fn prefetch_of(source: &SweepSource) -> Option<&Prefetch> {
        source.cycle.as_ref()?.current.as_ref()?.prefetch.as_ref()
    }

    /// Waits until the prefetch (there must be one) has its page.
    async fn prefetch_arrived(source: &SweepSource) {
        let until = Instant::now() + Duration::from_secs(10);
        while !prefetch_of(source).expect("a prefetch").task.is_finished() {
            assert!(Instant::now() < until, "the prefetch never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn ids(b: &Batch) -> Vec<String> {
        b.messages.iter().map(|m| m.point_id.clone()).collect()
    }

    /// With prefetch on, an abandoned page is read again exactly and the cycle goes on from it: no point lost, none
    /// delivered twice. Both when the page read again is unchanged (the prefetched next page is used) and when a
    /// point was added to it meanwhile (its next page starts elsewhere: the prefetched one is discarded, counted as
    /// read, never delivered) — on the ordered and the unordered path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_page_is_read_again_exactly_with_prefetch() {
        use qdrant_client::qdrant::{CreateCollectionBuilder, Distance, VectorParamsBuilder};
        let (store, db) = fresh_store().await;
        let points = Arc::new(
            Points::new(
                &env("QDRANT_URL"),
                None,
                crate::fetch::PayloadMapping::default(),
            )
            .expect("QDRANT_URL"),
        );
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        for ordered in [true, false] {
            for changed in [false, true] {
                let coll = format!("sweep_unit_{tag}_{ordered}_{changed}");
                points
                    .client()
                    .create_collection(
                        CreateCollectionBuilder::new(&coll)
                            .vectors_config(VectorParamsBuilder::new(2, Distance::Cosine)),
                    )
                    .await
                    .expect("create collection");
                if ordered {
                    points
                        .client()
                        .create_field_index(
                            CreateFieldIndexCollectionBuilder::new(
                                &coll,
                                "timestamp_unix",
                                FieldType::Float,
                            )
                            .wait(true),
                        )
                        .await
                        .expect("index");
                }
                // 30 points: ids 100, 110, ... and times t0, t0 + 10 s, ...: id order is time order
                let t0 = now_secs() - 3600.0;
                let at = |i: u64| (100 + 10 * i, t0 + 10.0 * i as f64);
                upsert(
                    &points,
                    &coll,
                    (0..30).map(|i| message(at(i).0, at(i).1)).collect(),
                )
                .await;
                let c = coll.clone();
                let settings = SweepSettings {
                    interval: Duration::from_secs(3600),
                    lookback: Duration::from_secs(86_400),
                    overlap: Duration::from_secs(15),
                    page_size: 10,
                    bot_for_collection: Arc::new(move |n: &str| (n == c).then(|| "b".to_string())),
                    create_index: false,
                    checkpoint_prefix: "sweep".into(),
                    keep_user: None,
                };
                let mut source = SweepSource::new(points.clone(), store.clone(), settings);
                let what = format!("ordered={ordered} changed={changed}");
                let expect_ids = |r: std::ops::Range<u64>| -> Vec<String> {
                    r.map(|i| at(i).0.to_string()).collect()
                };

                let undated = source.next_batch().await.unwrap();
                assert!(undated.messages.is_empty() && !undated.caught_up, "{what}");
                source.commit().await.unwrap();
                let mut committed = Vec::new();
                let p1 = source.next_batch().await.unwrap();
                assert_eq!(ids(&p1), expect_ids(0..10), "{what}");
                source.commit().await.unwrap();
                committed.extend(ids(&p1));

                let p2 = source.next_batch().await.unwrap();
                assert_eq!(ids(&p2), expect_ids(10..20), "{what}");
                prefetch_arrived(&source).await; // page 3 is here, not handed out
                let page3 = prefetch_of(&source).unwrap().cursor.clone();
                source.abandon().await;
                if changed {
                    // a point inside page 2, in time and in id order
                    upsert(&points, &coll, vec![message(255, t0 + 155.0)]).await;
                }
                let again = source.next_batch().await.unwrap();
                let next = prefetch_of(&source).expect("a prefetch").cursor.clone();
                if changed {
                    let mut want = expect_ids(10..16);
                    want.push("255".into());
                    want.extend(expect_ids(16..19));
                    assert_eq!(ids(&again), want, "{what}: page 2 as it is now");
                    assert_ne!(next, page3, "{what}: the prefetched page 3 was discarded");
                } else {
                    assert_eq!(
                        ids(&again),
                        ids(&p2),
                        "{what}: the abandoned page comes again"
                    );
                    assert_eq!(again.checkpoint, p2.checkpoint, "{what}");
                    assert_eq!(next, page3, "{what}: the prefetched page 3 is kept");
                }
                source.commit().await.unwrap();
                committed.extend(ids(&again));
                loop {
                    let b = source.next_batch().await.unwrap();
                    source.commit().await.unwrap();
                    committed.extend(ids(&b));
                    if b.caught_up {
                        break;
                    }
                }
                let mut want = expect_ids(0..30);
                if changed {
                    want.insert(16, "255".into());
                }
                if ordered {
                    assert_eq!(committed, want, "{what}: every point once, in time order");
                } else {
                    let mut sorted = committed.clone();
                    sorted.sort_by_key(|i| i.parse::<u64>().unwrap());
                    assert_eq!(sorted, want, "{what}: every point once");
                }
                assert_eq!(source.cycles_completed(), 1, "{what}");
                // 30 (or 31) points + page 2 read again (+ the discarded page 3)
                let read = if changed { 31 + 10 + 10 } else { 30 + 10 };
                assert_eq!(source.last_cycle_points_read(), read, "{what}");
                let _ = points.client().delete_collection(&coll).await;
            }
        }
        drop_db(store, &db).await;
    }

    /// Issue 24, case 3: an unordered sweep (no `timestamp_unix` range index) whose scroll takes longer than the
    /// overlap stores a checkpoint from which the next cycle still reads a point written during the scroll with an id
    /// below the cursor (this cycle could not see it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unordered_sweep_never_checkpoints_past_a_point_written_behind_its_cursor() {
        use qdrant_client::qdrant::{CreateCollectionBuilder, Distance, VectorParamsBuilder};
        let (store, db) = fresh_store().await;
        let points = Arc::new(
            Points::new(
                &env("QDRANT_URL"),
                None,
                crate::fetch::PayloadMapping::default(),
            )
            .expect("QDRANT_URL"),
        );
        let coll = format!(
            "sweep_unit_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        points
            .client()
            .create_collection(
                CreateCollectionBuilder::new(&coll)
                    .vectors_config(VectorParamsBuilder::new(2, Distance::Cosine)),
            )
            .await
            .expect("create collection");
        let t0 = now_secs() - 60.0;
        upsert(
            &points,
            &coll,
            (0..30u64)
                .map(|i| message(100 + 10 * i, t0 + i as f64 * 0.1))
                .collect(),
        )
        .await;
        let c = coll.clone();
        let overlap = Duration::from_secs(1);
        let settings = SweepSettings {
            interval: Duration::from_secs(3600),
            lookback: Duration::from_secs(86_400),
            overlap,
            page_size: 10,
            bot_for_collection: Arc::new(move |n: &str| (n == c).then(|| "b".to_string())),
            create_index: false,
            checkpoint_prefix: "sweep".into(),
            keep_user: None,
        };
        let mut source = SweepSource::new(points.clone(), store.clone(), settings);
        let mut read = Vec::new();
        loop {
            let b = source.next_batch().await.unwrap();
            source.commit().await.unwrap();
            read.extend(ids(&b));
            if read.len() >= 10 {
                break;
            }
        }
        // written during the scroll, behind its cursor; then the scroll goes on for longer than the overlap and reads
        // a newer point
        let x_ts = now_secs();
        upsert(&points, &coll, vec![message(5, x_ts)]).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        upsert(&points, &coll, vec![message(1000, now_secs())]).await;
        let last = loop {
            let b = source.next_batch().await.unwrap();
            source.commit().await.unwrap();
            read.extend(ids(&b));
            if b.caught_up {
                break b;
            }
        };
        assert!(!read.contains(&"5".to_string()), "behind the cursor");
        assert!(read.contains(&"1000".to_string()));
        let (_, position, _) = last.checkpoint.expect("a checkpoint");
        assert!(
            position - overlap.as_secs_f64() <= x_ts,
            "the next cycle starts at {} and never reads the point written at {x_ts}",
            position - overlap.as_secs_f64()
        );
        let _ = points.client().delete_collection(&coll).await;
        drop_db(store, &db).await;
    }

    /// A TCP proxy to Qdrant that cuts every connection on which a request names `poison` (a collection): that
    /// collection's requests fail as a broken collection's would, the others pass.
    async fn poisoning_proxy(target: String, poison: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (target, poison) = (target.clone(), poison.clone());
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = out.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut ro, &mut wi).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = ri.read(&mut buf).await {
                        if n == 0
                            || buf[..n]
                                .windows(poison.len())
                                .any(|w| w == poison.as_bytes())
                        {
                            break;
                        }
                        if wo.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    back.abort();
                });
            }
        });
        format!("http://127.0.0.1:{port}")
    }

    /// Issue 24, case 6: a collection whose every request fails is skipped with a back-off; the others are read and
    /// the cycle completes (its horizon, and in hybrid mode the event-time ticks, go on), holding back only the
    /// failing collection's bot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_collection_is_skipped_and_the_cycle_goes_on() {
        use qdrant_client::qdrant::{CreateCollectionBuilder, Distance, VectorParamsBuilder};
        let (store, db) = fresh_store().await;
        let direct = Points::new(
            &env("QDRANT_URL"),
            None,
            crate::fetch::PayloadMapping::default(),
        )
        .expect("QDRANT_URL");
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let (bad, good) = (
            format!("sweep_unit_{tag}_a_bad"),
            format!("sweep_unit_{tag}_b_good"),
        );
        for coll in [&bad, &good] {
            direct
                .client()
                .create_collection(
                    CreateCollectionBuilder::new(coll)
                        .vectors_config(VectorParamsBuilder::new(2, Distance::Cosine)),
                )
                .await
                .expect("create collection");
            let t0 = now_secs() - 60.0;
            upsert(
                &direct,
                coll,
                (0..5u64).map(|i| message(100 + i, t0 + i as f64)).collect(),
            )
            .await;
        }
        let target = env("QDRANT_URL").trim_start_matches("http://").to_string();
        let url = poisoning_proxy(target, bad.clone()).await;
        let points = Arc::new(
            Points::new(&url, None, crate::fetch::PayloadMapping::default()).expect("proxy url"),
        );
        let (b2, g2) = (bad.clone(), good.clone());
        let settings = SweepSettings {
            interval: Duration::from_secs(3600),
            lookback: Duration::from_secs(86_400),
            overlap: Duration::from_secs(15),
            page_size: 10,
            bot_for_collection: Arc::new(move |n: &str| {
                if n == b2 {
                    Some("badbot".to_string())
                } else if n == g2 {
                    Some("goodbot".to_string())
                } else {
                    None
                }
            }),
            create_index: false,
            checkpoint_prefix: "sweep".into(),
            keep_user: None,
        };
        let mut source = SweepSource::new(points.clone(), store.clone(), settings);
        let mut read: Vec<String> = Vec::new();
        let mut last = None;
        for _ in 0..20 {
            match source.next_batch().await {
                Ok(b) => {
                    source.commit().await.unwrap();
                    read.extend(b.messages.iter().map(|m| m.bot.clone()));
                    if b.caught_up {
                        last = Some(b);
                        break;
                    }
                }
                Err(e) => {
                    source.abandon().await;
                    println!("sweep error: {e}");
                }
            }
        }
        let last = last.expect("the cycle completes despite the failing collection");
        assert_eq!(source.cycles_completed(), 1);
        assert_eq!(
            read,
            vec!["goodbot".to_string(); 5],
            "the good collection is read"
        );
        assert!(last.horizon.is_some());
        assert_eq!(
            last.held_back,
            vec!["badbot".to_string()],
            "only the failing bot held back"
        );
        assert!(source.failing.contains_key(&bad));
        for coll in [&bad, &good] {
            let _ = direct.client().delete_collection(coll).await;
        }
        drop_db(store, &db).await;
    }
}
