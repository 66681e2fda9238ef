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
mod report;

use page::{Cursor, Sweep};
pub use report::{CollectionReport, SweepReport};

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use qdrant_client::QdrantError;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::batch::{Batch, Source, SourceError};
use crate::fetch::{FetchError, Points};
use crate::model::{Clock, SystemClock};
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

/// What [`SweepSource::prefetch_probe`] shows of a prefetch: the cursor it was made for (opaque, comparable) and
/// whether its page has arrived.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct PrefetchProbe {
    pub cursor: String,
    pub arrived: bool,
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
    /// The wall clock of cycle starts, the first sweep's lookback and the checkpoints' cap (the system clock; a
    /// virtual one in the simulation).
    clock: Arc<dyn Clock>,
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
            clock: Arc::new(SystemClock),
        }
    }

    /// The same source reading `clock` as the wall clock (tests and the simulation: a virtual one).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> SweepSource {
        self.clock = clock;
        self
    }

    /// The clock's monotonic instant (cycle intervals, collection back-offs).
    fn now(&self) -> Instant {
        Instant::from_std(self.clock.instant())
    }

    /// The wall clock, in seconds (the unit of `timestamp_unix`).
    fn now_secs(&self) -> f64 {
        self.clock.now_ms() as f64 / 1e3
    }

    /// Points read in the last completed cycle.
    /// Starts the first cycle one interval from now instead of at once (hybrid mode: at start-up the durable consumer
    /// replays what was missed; the sweep is the safety net after that).
    pub fn delay_first_cycle(mut self) -> SweepSource {
        self.next_cycle = self.now() + self.settings.interval;
        self
    }

    /// True while a cycle is under way or the next one is due: the hybrid source asks before it reads events.
    pub fn wants_batch(&self) -> bool {
        self.cycle.is_some() || self.now() >= self.next_cycle
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

    /// For the tests (`tests/it/sweep.rs`): the prefetch of the collection being read, if one is out.
    #[doc(hidden)]
    pub fn prefetch_probe(&self) -> Option<PrefetchProbe> {
        let p = self.cycle.as_ref()?.current.as_ref()?.prefetch.as_ref()?;
        Some(PrefetchProbe {
            cursor: format!("{:?}", p.cursor),
            arrived: p.task.is_finished(),
        })
    }

    /// For the tests (`tests/it/sweep.rs`): whether `collection` is left out as failing (issue 24, case 6).
    #[doc(hidden)]
    pub fn is_failing(&self, collection: &str) -> bool {
        self.failing.contains_key(collection)
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
        let started = self.now();
        self.next_cycle = started + self.settings.interval;
        self.cycle = Some(Cycle {
            queue,
            current: None,
            report: SweepReport::default(),
            started,
            started_ms: self.clock.now_ms(),
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
            let now = self.now();
            let Some(cycle) = self.cycle.as_mut() else {
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
                .is_some_and(|(_, retry)| now < *retry)
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
        let now = self.now();
        let entry = self
            .failing
            .entry(collection.to_string())
            .or_insert((0, now));
        entry.0 += 1;
        let wait = collection_backoff(entry.0);
        entry.1 = now + wait;
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
            self.next_cycle = self.now();
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
