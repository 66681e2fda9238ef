//! Fetch stage: the points of a closed window from Qdrant (gRPC), mapped from the bots' payloads into
//! [`summarize::Message`](crate::summarize::Message)s.
//!
//! A window's points are read by id (the ids events and sweeps reported) plus one filtered scroll on the user and the
//! window's time range (`timestamp_unix`), which picks up points whose events never arrived. Points that are not
//! conversation messages, `conversation_pair` duplicates and repeated messages are dropped before anything counts them.
//!
//! Files: `fetch.rs` Qdrant access (`Points`: the points of many windows at once, collections per bot);
//! `fetch/mapping.rs` the payload mapping (`PayloadMapping`, `map_point`) and the Qdrant-typed point-id helpers.

mod mapping;

pub use mapping::{
    MappedPoint, PayloadMapping, SkipReason, dedupe_messages, map_point, parse_naive_iso,
    payload_time, point_id_from_str, point_id_string,
};
use mapping::{as_f64, content_vector};

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    Condition, Filter, GetPointsBuilder, PayloadIncludeSelector, PointId, Range, RetrievedPoint,
    ScrollPointsBuilder, VectorsSelector, value::Kind,
};

/// Moved to [`crate::model`] (issue 27); kept here so older paths compile.
pub use crate::model::{canonical_point_id, is_point_id};
use crate::summarize::Message;
use crate::tracker::Millis;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("qdrant: {0}")]
    Qdrant(#[from] qdrant_client::QdrantError),
    #[error("no Qdrant collection maps to bot {0:?} (check COLLECTION_PATTERNS / COLLECTION_MAP)")]
    NoCollection(String),
}

impl FetchError {
    /// Qdrant answered that the request itself is wrong: retrying will not help, so it counts as a failure of the
    /// window (dead after LLM_MAX_ATTEMPTS, with the reason), unlike an unreachable Qdrant.
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, FetchError::Qdrant(qdrant_client::QdrantError::ResponseError { status })
            if status.code() as i32 == 3 /* gRPC INVALID_ARGUMENT */)
    }
}

/// The Qdrant side of recap: collections, window fetch and (for the sweep) scrolls.
pub struct Points {
    client: Qdrant,
    pub mapping: PayloadMapping,
    collections: Mutex<(Option<Instant>, Vec<String>)>,
}

impl Points {
    pub fn new(
        url: &str,
        api_key: Option<&str>,
        mapping: PayloadMapping,
    ) -> Result<Points, FetchError> {
        let mut b = Qdrant::from_url(url)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .skip_compatibility_check();
        if let Some(k) = api_key {
            b = b.api_key(k.to_string());
        }
        Ok(Points {
            client: b.build()?,
            mapping,
            collections: Mutex::new((None, Vec::new())),
        })
    }

    pub fn client(&self) -> &Qdrant {
        &self.client
    }

    /// All collection names, cached for 30 s.
    pub async fn collections(&self, refresh: bool) -> Result<Vec<String>, FetchError> {
        {
            let c = self.collections.lock().expect("lock");
            if !refresh && c.0.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
                return Ok(c.1.clone());
            }
        }
        let list = self.client.list_collections().await?;
        let mut names: Vec<String> = list.collections.into_iter().map(|c| c.name).collect();
        names.sort();
        *self.collections.lock().expect("lock") = (Some(Instant::now()), names.clone());
        Ok(names)
    }

    /// The collections of one bot, by `bot_for_collection`.
    pub async fn collections_for(
        &self,
        bot: &str,
        bot_for_collection: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Vec<String>, FetchError> {
        for refresh in [false, true] {
            let found: Vec<String> = self
                .collections(refresh)
                .await?
                .into_iter()
                .filter(|c| bot_for_collection(c).as_deref() == Some(bot))
                .collect();
            if !found.is_empty() {
                return Ok(found);
            }
        }
        Err(FetchError::NoCollection(bot.to_string()))
    }

    /// The messages of one window: the points its events named (`ids`, whatever their stored time) plus a scroll over
    /// the user and the stored-time range those points span (`range_ms`, the tracker's range, when none was found by
    /// id). Event times may differ from stored times (a publisher stamps `ts` when it publishes, a host's clock may
    /// be fast), so no named point is filtered by time. Returns the deduplicated messages, oldest first, and the
    /// count of points skipped per reason. [`Points::fetch_windows`] for one window.
    pub async fn fetch_window(
        &self,
        collections: &[String],
        ids: &[String],
        user_id: &str,
        range_ms: (Millis, Millis),
    ) -> Result<Fetched, FetchError> {
        let mut out = self
            .fetch_windows(
                collections,
                &[WindowQuery {
                    ids,
                    user_id,
                    range_ms,
                }],
            )
            .await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// The messages of many windows of one bot (see [`Points::fetch_window`] for one), in a fixed number of requests
    /// per collection whatever the number of windows: one retrieve by id for all the windows' points (in chunks of
    /// [`RETRIEVE_CHUNK`]) and one scroll whose filter is the union of the windows' user and time-range filters (in
    /// chunks of [`SCROLL_WINDOWS`] windows), its points given back to the windows whose filter they match. The
    /// requests run concurrently. Returns one result per window, in the order given.
    pub async fn fetch_windows(
        &self,
        collections: &[String],
        windows: &[WindowQuery<'_>],
    ) -> Result<Vec<Fetched>, FetchError> {
        let n = windows.len();
        let mut skipped: Vec<HashMap<SkipReason, usize>> = vec![HashMap::new(); n];
        let mut msgs: Vec<Vec<Message>> = vec![Vec::new(); n];
        // A point found both by id and by the window's filter is one point: map and count it once per window.
        let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); n];
        // One id Qdrant cannot parse fails the whole request (InvalidArgument) and the window would wait forever:
        // leave such ids (stored before events were checked) out, counted.
        let mut wanted: Vec<Vec<String>> = Vec::with_capacity(n);
        for (i, w) in windows.iter().enumerate() {
            let (ok, bad): (Vec<&String>, Vec<&String>) =
                w.ids.iter().partition(|i| is_point_id(i));
            if !bad.is_empty() {
                skipped[i].insert(SkipReason::BadPointId, bad.len());
            }
            wanted.push(ok.into_iter().map(|i| canonical_id(i)).collect());
        }
        let mut all: Vec<&String> = wanted.iter().flatten().collect();
        all.sort_unstable();
        all.dedup();
        let selector = &VectorsSelector {
            names: vec![self.mapping.content_vector.clone()],
        };
        let gets = collections.iter().flat_map(|coll| {
            all.chunks(RETRIEVE_CHUNK).map(move |chunk| {
                let pids: Vec<PointId> = chunk.iter().map(|i| point_id_from_str(i)).collect();
                self.client.get_points(
                    GetPointsBuilder::new(coll, pids)
                        .with_payload(self.payload_fields())
                        .with_vectors(selector.clone()),
                )
            })
        });
        // The first collection that has an id wins (collections in their order, as one by one).
        let mut by_id: HashMap<String, RetrievedPoint> = HashMap::new();
        for r in futures::future::try_join_all(gets).await? {
            for p in r.result {
                if let Some(id) = &p.id {
                    by_id.entry(point_id_string(id)).or_insert(p);
                }
            }
        }
        for (i, ids) in wanted.iter().enumerate() {
            for id in ids {
                let Some(p) = by_id.get(id) else {
                    *skipped[i].entry(SkipReason::NotFound).or_default() += 1;
                    continue;
                };
                if !seen[i].insert(id.clone()) {
                    continue;
                }
                match map_point(&self.mapping, p) {
                    Ok(mp) if mp.user_id == windows[i].user_id => msgs[i].push(mp.message),
                    Ok(_) => {}
                    Err(reason) => *skipped[i].entry(reason).or_default() += 1,
                }
            }
        }
        drop(by_id);
        // The scroll covers the stored times of the named points (the window as stored), else the tracker's range.
        let ranges: Vec<(Millis, Millis)> = msgs
            .iter()
            .zip(windows)
            .map(|(m, w)| {
                match (
                    m.iter().map(|m| m.ts_ms).min(),
                    m.iter().map(|m| m.ts_ms).max(),
                ) {
                    (Some(lo), Some(hi)) => (lo, hi),
                    _ => w.range_ms,
                }
            })
            .collect();
        let (ranges, wanted) = (&ranges, &wanted);
        let bounds = |r: (Millis, Millis)| (r.0 as f64 / 1000.0, (r.1 + 1) as f64 / 1000.0);
        let order: Vec<usize> = (0..n).collect();
        let scrolls = collections.iter().flat_map(|coll| {
            order.chunks(SCROLL_WINDOWS).map(move |chunk| {
                // Per window: its user and range, minus the points it has by id already; for all: no
                // `conversation_pair` duplicates (never messages).
                let filter = Filter {
                    should: chunk
                        .iter()
                        .map(|&i| {
                            let (gte, lt) = bounds(ranges[i]);
                            Condition::from(Filter {
                                must: vec![
                                    Condition::matches(
                                        self.mapping.user.clone(),
                                        windows[i].user_id.to_string(),
                                    ),
                                    Condition::range(
                                        self.mapping.timestamp_unix.clone(),
                                        Range {
                                            gte: Some(gte),
                                            lt: Some(lt),
                                            ..Default::default()
                                        },
                                    ),
                                ],
                                must_not: if wanted[i].is_empty() {
                                    vec![]
                                } else {
                                    vec![Condition::has_id(
                                        wanted[i].iter().map(|id| point_id_from_str(id)),
                                    )]
                                },
                                ..Default::default()
                            })
                        })
                        .collect(),
                    must_not: vec![Condition::matches(
                        self.mapping.role.clone(),
                        "conversation_pair".to_string(),
                    )],
                    ..Default::default()
                };
                self.scroll_all(coll, filter)
            })
        });
        let pages = futures::future::try_join_all(scrolls).await?;
        // Which windows a scrolled point belongs to: same user, stored time within the window's scroll range.
        let mut by_user: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, w) in windows.iter().enumerate() {
            by_user.entry(w.user_id).or_default().push(i);
        }
        // Messages found only by the scroll (no event or sweep named them): their vectors, read after.
        let mut pending: Vec<(usize, usize, String)> = Vec::new();
        for p in pages.iter().flatten() {
            let payload = &p.payload;
            let user = match payload
                .get(&self.mapping.user)
                .and_then(|v| v.kind.as_ref())
            {
                Some(Kind::StringValue(s)) => s.clone(),
                Some(Kind::IntegerValue(i)) => i.to_string(),
                _ => continue,
            };
            let Some(secs) = as_f64(payload.get(&self.mapping.timestamp_unix)) else {
                continue;
            };
            let Some(cands) = by_user.get(user.as_str()) else {
                continue;
            };
            let id = p.id.as_ref().map(point_id_string);
            let mut mapped = None;
            for &i in cands {
                let (gte, lt) = bounds(ranges[i]);
                if !(secs >= gte && secs < lt) {
                    continue;
                }
                if let Some(id) = &id
                    && !seen[i].insert(id.clone())
                {
                    continue;
                }
                let (lo, hi) = ranges[i];
                match mapped.get_or_insert_with(|| map_point(&self.mapping, p)) {
                    Ok(mp)
                        if mp.user_id == windows[i].user_id
                            && mp.message.ts_ms >= lo
                            && mp.message.ts_ms <= hi =>
                    {
                        if let Some(id) = &id {
                            pending.push((i, msgs[i].len(), id.clone()));
                        }
                        msgs[i].push(mp.message.clone())
                    }
                    Ok(_) => {}
                    Err(reason) => *skipped[i].entry(*reason).or_default() += 1,
                }
            }
        }
        if !pending.is_empty() {
            let mut want: Vec<&String> = pending.iter().map(|p| &p.2).collect();
            want.sort_unstable();
            want.dedup();
            let gets = collections.iter().flat_map(|coll| {
                want.chunks(RETRIEVE_CHUNK).map(move |chunk| {
                    let pids: Vec<PointId> = chunk.iter().map(|i| point_id_from_str(i)).collect();
                    self.client.get_points(
                        GetPointsBuilder::new(coll, pids)
                            .with_payload(false)
                            .with_vectors(selector.clone()),
                    )
                })
            });
            let mut vectors: HashMap<String, Vec<f32>> = HashMap::new();
            for r in futures::future::try_join_all(gets).await? {
                for p in r.result {
                    if let Some(id) = &p.id {
                        vectors
                            .entry(point_id_string(id))
                            .or_insert_with(|| content_vector(&p, &self.mapping.content_vector));
                    }
                }
            }
            for (i, at, id) in pending {
                if let Some(v) = vectors.get(&id) {
                    msgs[i][at].vector = v.clone();
                }
            }
        }
        Ok(msgs.into_iter().map(dedupe_messages).zip(skipped).collect())
    }

    /// The payload fields a point is mapped from (the rest of a bot's payload is never read).
    pub fn payload_fields(&self) -> PayloadIncludeSelector {
        let m = &self.mapping;
        let mut fields: Vec<String> = [
            &m.user,
            &m.content,
            &m.role,
            &m.memory_type,
            &m.timestamp,
            &m.timestamp_unix,
            &m.emotion,
        ]
        .into_iter()
        .cloned()
        .collect();
        fields.push("source".into());
        fields.sort();
        fields.dedup();
        PayloadIncludeSelector { fields }
    }

    /// Every point of `filter` in `coll`, page by page, with payloads and without vectors (most of them were read
    /// by id already).
    /// Every point matching `filter` in `coll` (payload fields only, no vectors), page after page.
    pub(crate) async fn scroll_all(
        &self,
        coll: &str,
        filter: Filter,
    ) -> Result<Vec<RetrievedPoint>, FetchError> {
        let mut out = Vec::new();
        let mut offset: Option<PointId> = None;
        loop {
            let mut req = ScrollPointsBuilder::new(coll)
                .filter(filter.clone())
                .limit(SCROLL_PAGE)
                .with_payload(self.payload_fields())
                .with_vectors(false);
            if let Some(o) = offset.take() {
                req = req.offset(o);
            }
            let page = self.client.scroll(req).await?;
            out.extend(page.result);
            match page.next_page_offset {
                Some(o) => offset = Some(o),
                None => return Ok(out),
            }
        }
    }
}

/// Ids per retrieve request.
pub const RETRIEVE_CHUNK: usize = 1024;
/// Windows per scroll filter.
pub const SCROLL_WINDOWS: usize = 64;
/// Points per scroll page.
const SCROLL_PAGE: u32 = 1024;

/// One window's messages and the points skipped per reason.
pub type Fetched = (Vec<Message>, HashMap<SkipReason, usize>);

/// What [`Points::fetch_windows`] needs of a window: its stored point ids, its user and the tracker's time range.
#[derive(Debug, Clone, Copy)]
pub struct WindowQuery<'a> {
    pub ids: &'a [String],
    pub user_id: &'a str,
    pub range_ms: (Millis, Millis),
}

/// A point id in the form Qdrant answers with, so a stored id finds its point ([`canonical_point_id`]).
fn canonical_id(id: &str) -> String {
    canonical_point_id(id).unwrap_or_else(|| id.to_string())
}
