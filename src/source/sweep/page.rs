//! One collection's pages: the cursor, the scroll request, the prefetch of the next page and the reading of a page
//! into a [`Batch`] (see the parent module's docs).

use std::sync::Arc;
use std::time::Duration;

use qdrant_client::QdrantError;
use qdrant_client::qdrant::{
    Condition, CreateFieldIndexCollectionBuilder, Direction, FieldType, Filter, OrderByBuilder,
    PayloadIncludeSelector, PayloadSchemaType, PointId, Range, RetrievedPoint, ScrollPoints,
    ScrollPointsBuilder, ScrollResponse, order_value, payload_index_params::IndexParams,
    start_from, value::Kind,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{Batch, Pending, SweepError, SweepSource};
use crate::fetch::{PayloadMapping, Points, SkipReason, map_point};
use crate::model::{Position, SourceCheckpoint, SweepPos};
use crate::sink::NewMessage;

/// Where a collection's scroll stands: the request for its next page.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cursor {
    /// First sweep only: points whose `timestamp_unix` is empty.
    Undated { offset: Option<PointId> },
    /// `timestamp_unix >= from`, ascending, minus `seen` (the ids already returned at exactly `from`).
    Ordered { from: f64, seen: Vec<PointId> },
    /// `timestamp_unix >= start`, in id order from `offset`.
    Unordered { offset: Option<PointId> },
}

/// One collection being swept.
#[derive(Debug)]
pub(super) struct Sweep {
    pub(super) collection: String,
    pub(super) bot: String,
    pub(super) ordered: bool,
    pub(super) start: f64,
    /// The lowest checkpoint this sweep stores: `start + overlap`, so that the next `start` is never later than this one.
    pub(super) floor: f64,
    /// Largest `timestamp_unix` in the committed pages.
    pub(super) max_seen: f64,
    /// The wall clock (seconds) when this collection's scroll began: an unordered scroll reads every point visible
    /// then, but a point written since, with an id below the cursor, is not read by it (issue 24, case 3).
    pub(super) opened: f64,
    /// The committed position.
    pub(super) cursor: Cursor,
    /// The request for the page after the one last read, already on its way.
    pub(super) prefetch: Option<Prefetch>,
}

/// A prefetched page is used only while it is at most this old; an older one is discarded and its page read again (so
/// a page handed out after an outage or a slow `apply` is never older than this, plus the time of one read).
const PREFETCH_MAX_AGE: Duration = Duration::from_secs(10);

/// The scroll for one page, started before the page was needed (see the module docs). Dropping it cancels the request
/// if it is still in flight.
#[derive(Debug)]
pub(super) struct Prefetch {
    /// The cursor the request was made for: it is used only for a page read from exactly this cursor.
    pub(super) cursor: Cursor,
    started: Instant,
    pub(super) task: JoinHandle<Result<ScrollResponse, QdrantError>>,
}

impl Prefetch {
    fn start(points: &Arc<Points>, req: ScrollPoints, cursor: Cursor) -> Prefetch {
        let points = points.clone();
        Prefetch {
            cursor,
            started: Instant::now(),
            task: tokio::spawn(async move { points.client().scroll(req).await }),
        }
    }

    /// Drops a prefetch that will not be used; returns the points it read (0 if it was still in flight: cancelled).
    async fn discard(mut self) -> u64 {
        if !self.task.is_finished() {
            return 0; // the drop cancels it
        }
        match (&mut self.task).await {
            Ok(Ok(page)) => page.result.len() as u64,
            _ => 0,
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.task.abort(); // no-op once it finished
    }
}

/// The page handed out and not yet committed or abandoned.
/// A payload number (`timestamp_unix` is a float, sometimes an integer).
fn number(p: &RetrievedPoint, key: &str) -> Option<f64> {
    match p.payload.get(key)?.kind.as_ref()? {
        Kind::DoubleValue(d) => Some(*d),
        Kind::IntegerValue(i) => Some(*i as f64),
        _ => None,
    }
}

/// A point's `timestamp_unix` as the index holds it: the scroll's `order_value` (ordered scrolls), else the payload.
/// The cursor must use the indexed value: a payload float read back can differ from it in the last bit, and
/// `start_from` and range filters compare against the index — a cursor one ulp too high loses the points tied with it.
fn order_of(p: &RetrievedPoint, key: &str) -> Option<f64> {
    match p.order_value.as_ref().and_then(|v| v.variant.as_ref()) {
        Some(order_value::Variant::Float(f)) => Some(*f),
        Some(order_value::Variant::Int(i)) => Some(*i as f64),
        None => number(p, key),
    }
}

impl SweepSource {
    /// Whether the collection has a range index on `timestamp_unix` (what `order_by` needs).
    async fn has_range_index(&self, collection: &str) -> Result<bool, SweepError> {
        let info = self.points.client().collection_info(collection).await?;
        let Some(schema) = info.result.and_then(|r| {
            r.payload_schema
                .get(&self.points.mapping.timestamp_unix)
                .cloned()
        }) else {
            return Ok(false);
        };
        let params = schema.params.and_then(|p| p.index_params);
        Ok(match PayloadSchemaType::try_from(schema.data_type) {
            Ok(PayloadSchemaType::Float) => true,
            Ok(PayloadSchemaType::Integer) => {
                !matches!(params, Some(IndexParams::IntegerIndexParams(p)) if p.range == Some(false))
            }
            _ => false,
        })
    }

    /// Opens a collection for this cycle: its checkpoint, start and path.
    pub(super) async fn open(&self, collection: &str, bot: &str) -> Result<Sweep, SweepError> {
        let stored = self
            .store
            .sweep_position(&self.checkpoint_name(collection))
            .await?;
        let overlap = self.settings.overlap.as_secs_f64();
        let start = match stored {
            Some(SweepPos(position)) => position - overlap,
            None => self.now_secs() - self.settings.lookback.as_secs_f64(),
        };
        let mut ordered = self.has_range_index(collection).await?;
        if !ordered && self.settings.create_index {
            let field = self.points.mapping.timestamp_unix.clone();
            info!(
                collection,
                field, "creating a float index (create_index is set)"
            );
            self.points
                .client()
                .create_field_index(
                    CreateFieldIndexCollectionBuilder::new(collection, field, FieldType::Float)
                        .wait(true),
                )
                .await?;
            ordered = true;
        }
        let cursor = if stored.is_none() {
            Cursor::Undated { offset: None }
        } else {
            Self::ranged(ordered, start)
        };
        debug!(
            collection,
            bot,
            ordered,
            start,
            first = stored.is_none(),
            "sweeping collection"
        );
        Ok(Sweep {
            collection: collection.into(),
            bot: bot.into(),
            ordered,
            start,
            floor: start + overlap,
            max_seen: f64::MIN,
            opened: self.now_secs(),
            cursor,
            prefetch: None,
        })
    }

    pub(super) fn ranged(ordered: bool, start: f64) -> Cursor {
        if ordered {
            Cursor::Ordered {
                from: start,
                seen: Vec::new(),
            }
        } else {
            Cursor::Unordered { offset: None }
        }
    }

    /// Reads the current collection's next page into a batch: from its prefetch when one was made for this cursor,
    /// else now; then starts the prefetch of the page after it.
    pub(super) async fn read_page(&mut self) -> Result<Batch, SweepError> {
        let page_size = self.settings.page_size.max(1);
        let now = self.now_secs();
        let mapping = &self.points.mapping;
        let cycle = self.cycle.as_mut().expect("cycle");
        let sweep = cycle.current.as_mut().expect("collection");
        let mut discarded = 0;
        let prefetched = match sweep.prefetch.take() {
            Some(p) if p.cursor == sweep.cursor && p.started.elapsed() <= PREFETCH_MAX_AGE => {
                Some(p)
            }
            // too old: read the page again
            Some(p) if p.cursor == sweep.cursor => {
                discarded += p.discard().await;
                None
            }
            // made for another cursor (the page before was abandoned): kept in case the page read now leads to it
            other => {
                sweep.prefetch = other;
                None
            }
        };
        let result = match prefetched {
            Some(mut p) => match (&mut p.task).await {
                Ok(r) => r,
                // the task panicked or was cancelled: read the page now
                Err(_) => {
                    let req = scroll_request(mapping, page_size, sweep, &sweep.cursor);
                    self.points.client().scroll(req).await
                }
            },
            None => {
                let req = scroll_request(mapping, page_size, sweep, &sweep.cursor);
                self.points.client().scroll(req).await
            }
        };
        let page = match result {
            Ok(p) => p,
            Err(e) => {
                let collection = sweep.collection.clone();
                if discarded > 0 {
                    self.count_read(discarded);
                }
                return self
                    .skip_if_gone(&collection, e.into())
                    .await
                    .map(|()| Batch::default());
            }
        };

        let key = &mapping.timestamp_unix;
        let read = page.result.len() as u64;
        let full = read >= u64::from(page_size);
        let next = match &sweep.cursor {
            Cursor::Undated { .. } => Some(match &page.next_page_offset {
                Some(o) => Cursor::Undated {
                    offset: Some(o.clone()),
                },
                None => Self::ranged(sweep.ordered, sweep.start),
            }),
            Cursor::Ordered { from, seen } => {
                match page.result.last().and_then(|p| order_of(p, key)) {
                    Some(last) if full => {
                        let at_last = page
                            .result
                            .iter()
                            .filter(|p| order_of(p, key) == Some(last))
                            .filter_map(|p| p.id.clone());
                        let seen = if last == *from {
                            seen.iter().cloned().chain(at_last).collect()
                        } else {
                            at_last.collect()
                        };
                        Some(Cursor::Ordered { from: last, seen })
                    }
                    _ => None,
                }
            }
            Cursor::Unordered { .. } => page.next_page_offset.as_ref().map(|o| Cursor::Unordered {
                offset: Some(o.clone()),
            }),
        };
        // The next page's request goes out now, while this one is mapped, handed out, applied and committed.
        match (&next, sweep.prefetch.take()) {
            // already on its way (this page was read again after an abandon and leads to the same place)
            (Some(n), Some(p)) if p.cursor == *n => sweep.prefetch = Some(p),
            (_, old) => {
                if let Some(old) = old {
                    discarded += old.discard().await;
                }
                if let Some(n) = &next {
                    let req = scroll_request(mapping, page_size, sweep, n);
                    sweep.prefetch = Some(Prefetch::start(&self.points, req, n.clone()));
                }
            }
        }

        // Only an ordered page of a bot's only collection may move its watermark by its times (every later page of
        // the bot is at least as late); an unordered page, the first sweep's undated pass and a bot with two
        // collections hold it until the cycle's horizon (issue 24, case 2).
        let ordered_alone = matches!(sweep.cursor, Cursor::Ordered { .. })
            && !cycle.shared_bots.contains(&sweep.bot);
        let mut batch = Batch {
            swept: !ordered_alone,
            ..Batch::default()
        };
        let start_ms = (sweep.start * 1000.0).floor() as i64;
        let mut page_max = sweep.max_seen;
        for p in &page.result {
            if let Some(t) = order_of(p, key) {
                page_max = page_max.max(t);
            }
            let mapped = map_point(mapping, p);
            if let (Ok(mp), Some(keep)) = (&mapped, &self.settings.keep_user)
                && !keep(&sweep.bot, &mp.user_id)
            {
                // another partition's key (NATS_PARTITION_BY=user: every partition reads every collection)
                metrics::counter!("recap_sweep_points_skipped_total", "reason" => "other_partition").increment(1);
                continue;
            }
            let checked = mapped.map(|mp| {
                let valid =
                    crate::event::check_message(&sweep.bot, &mp.message.point_id, &mp.user_id);
                (mp, valid)
            });
            match checked {
                // A payload no event could carry (a user id over 255 bytes, a control character): a dead letter with
                // its reason, as an event would be, never a message (it could not be stored or summarized).
                Ok((mp, Err(e))) => {
                    metrics::counter!("recap_sweep_points_skipped_total", "reason" => e.kind()).increment(1);
                    batch.dead_letters.push(crate::sink::DeadLetter {
                        source: "sweep",
                        bot: Some(sweep.bot.clone()),
                        user_id: Some(mp.user_id.clone()),
                        subject: Some(sweep.collection.clone()),
                        stream_seq: None,
                        raw: format!("{}/{}", mp.message.point_id, mp.user_id)
                            .chars()
                            .take(1024)
                            .collect::<String>()
                            .into_bytes(),
                        reason: format!("swept point: {e}"),
                    });
                }
                Ok((mp, Ok(()))) if mp.message.ts_ms >= start_ms => batch.messages.push(NewMessage {
                    bot: sweep.bot.clone(),
                    user_id: mp.user_id,
                    point_id: mp.message.point_id,
                    ts_ms: mp.message.ts_ms,
                }),
                // an undated point older than the sweep's start: outside its range, as a range filter would have it
                Ok((_, Ok(()))) => metrics::counter!("recap_sweep_points_skipped_total", "reason" => "before_start").increment(1),
                Err(reason) => {
                    batch.ignored += usize::from(reason == SkipReason::ConversationPair);
                    metrics::counter!("recap_sweep_points_skipped_total", "reason" => reason.as_str()).increment(1);
                }
            }
        }

        let done = next.is_none();
        // Never past the wall clock; unordered pages hold the floor until the collection's last page, and then store
        // no more than the time the scroll began: points written during it may lie behind the cursor (a lower id),
        // and the next cycle must still read them (its start is this minus the overlap).
        let position = match sweep.cursor {
            Cursor::Undated { .. } => None,
            Cursor::Ordered { .. } => Some(page_max),
            Cursor::Unordered { .. } => Some(if done {
                page_max.min(sweep.opened)
            } else {
                sweep.floor
            }),
        }
        .map(|p| p.min(now).max(sweep.floor));
        let checkpoint = format!("{}:{}", self.settings.checkpoint_prefix, sweep.collection);
        batch.checkpoint = position.map(|p| SourceCheckpoint {
            name: checkpoint,
            position: Position::Sweep(SweepPos(p)),
            points_read: read as i64,
        });
        batch.flush = done;
        batch.caught_up = done && cycle.queue.is_empty();
        if batch.caught_up {
            batch.horizon = Some(cycle.started_ms);
        }

        self.count_read(read + discarded);
        self.pending = Some(Pending {
            next,
            max_seen: page_max,
            messages: batch.messages.len() as u64,
        });
        Ok(batch)
    }
}

/// The scroll request for one page of `sweep` from `cursor`.
fn scroll_request(
    m: &PayloadMapping,
    page_size: u32,
    sweep: &Sweep,
    cursor: &Cursor,
) -> ScrollPoints {
    let key = m.timestamp_unix.clone();
    // Only what mapping a point needs (not the conversation_pair texts, not the emotion).
    let fields = [
        &m.user,
        &m.content,
        &m.role,
        &m.memory_type,
        &m.timestamp,
        &m.timestamp_unix,
    ]
    .map(|f| f.to_string());
    let req = ScrollPointsBuilder::new(&sweep.collection)
        .limit(page_size)
        .with_payload(PayloadIncludeSelector {
            fields: fields.into_iter().chain(["source".to_string()]).collect(),
        })
        .with_vectors(false);
    let req = match cursor {
        Cursor::Undated { offset } => {
            let req = req.filter(Filter::must([Condition::is_empty(key)]));
            match offset {
                Some(o) => req.offset(o.clone()),
                None => req,
            }
        }
        Cursor::Ordered { from, seen } => {
            // `start_from` is inclusive (`timestamp_unix >= from`, on the index): a range condition repeating it only
            // cost time (about a tenth of each page on the test server's engine, which is Qdrant's own).
            let req = if seen.is_empty() {
                req
            } else {
                req.filter(Filter::must_not([Condition::has_id(seen.clone())]))
            };
            req.order_by(
                OrderByBuilder::new(key)
                    .direction(Direction::Asc as i32)
                    .start_from(start_from::Value::Float(*from)),
            )
        }
        Cursor::Unordered { offset } => {
            let req = req.filter(Filter::must([Condition::range(
                key,
                Range {
                    gte: Some(sweep.start),
                    ..Range::default()
                },
            )]));
            match offset {
                Some(o) => req.offset(o.clone()),
                None => req,
            }
        }
    };
    req.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdrant_client::qdrant::Value;
    use std::collections::HashMap;

    fn point(ts: Option<f64>) -> RetrievedPoint {
        let mut payload = HashMap::new();
        if let Some(t) = ts {
            payload.insert(
                "timestamp_unix".to_string(),
                Value {
                    kind: Some(Kind::DoubleValue(t)),
                },
            );
        }
        RetrievedPoint {
            payload,
            ..Default::default()
        }
    }

    #[test]
    fn the_cursor_uses_the_indexed_value_before_the_payload() {
        assert_eq!(order_of(&point(Some(12.5)), "timestamp_unix"), Some(12.5));
        assert_eq!(order_of(&point(None), "timestamp_unix"), None);
        // a payload read back one ulp above the indexed value: the order value wins
        let mut p = point(Some(1_794_308_728.909_248));
        p.order_value = Some(qdrant_client::qdrant::OrderValue {
            variant: Some(order_value::Variant::Float(1_794_308_728.909_247_9)),
        });
        assert_eq!(
            order_of(&p, "timestamp_unix"),
            Some(1_794_308_728.909_247_9)
        );
        p.order_value = Some(qdrant_client::qdrant::OrderValue {
            variant: Some(order_value::Variant::Int(7)),
        });
        assert_eq!(order_of(&p, "timestamp_unix"), Some(7.0));
    }
}
