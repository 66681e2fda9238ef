//! Finishing windows in one transaction ([`Store::finish_windows`]), the one finish path: the rules apply per window,
//! in a fixed number of set-based statements (`unnest`) whatever the batch size; [`Store::finish_window`] is this
//! finish of a batch of one.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use sqlx::{Postgres, Transaction};

use super::ingest::insert_messages;
use super::windows::{truncate, upsert_summary};
use super::words::Said;
use super::{
    ClaimedWindow, ENRICHMENT_VERSION, Finished, Store, StoreError, WindowOutcome,
    coverage_fingerprint, to_utc,
};
use crate::model::WindowState;

/// A window of the batch the finish writes (its lease is still the owner's, due, at the claimed version).
struct Live<'a> {
    /// Position in the batch.
    at: usize,
    w: &'a ClaimedWindow,
    outcome: &'a WindowOutcome,
}

/// The key a summary row is upserted on (`conversation_summaries`' unique key).
#[derive(PartialEq, Eq, Hash)]
struct SummaryKey {
    user_id: String,
    bot_name: String,
    start: NaiveDateTime,
    end: NaiveDateTime,
}

/// A window recorded as too short: its position in the batch, id and message count.
struct TooShort {
    at: usize,
    id: i64,
    message_count: i32,
}

/// One summary row to write, as its columns.
struct SummaryRow<'a> {
    /// Position in the batch.
    at: usize,
    w: &'a ClaimedWindow,
    start: NaiveDateTime,
    end: NaiveDateTime,
    text: String,
    topics: String,
    tone: String,
    compression: f64,
    confidence: f64,
    kind: &'static str,
    model: Option<String>,
    prompt: Option<i32>,
    completion: Option<i32>,
    latency: Option<i32>,
    cost: Option<f64>,
    coverage: String,
    revision: i32,
    message_count: i32,
}

impl<'a> SummaryRow<'a> {
    fn new(at: usize, w: &'a ClaimedWindow, outcome: &'a WindowOutcome) -> Option<SummaryRow<'a>> {
        let WindowOutcome::Summarized {
            summary: s,
            covered,
            message_count,
            text_chars,
            span,
            ..
        } = outcome
        else {
            return None;
        };
        // strict in what is stored: Postgres rejects NUL in text (a summarizer should have removed it already)
        let clean = |t: &str| t.replace('\0', "");
        let usage = s.usage.as_ref();
        let topics: Vec<String> = s.key_topics.iter().map(|t| clean(t)).collect();
        Some(SummaryRow {
            at,
            w,
            // The row's bounds are the stored points' times; the window keeps its tracker bounds.
            start: to_utc(span.0).naive_utc(),
            end: to_utc(span.1).naive_utc(),
            text: clean(&s.text),
            topics: serde_json::to_string(&topics).unwrap_or_else(|_| "[]".into()),
            tone: clean(&s.emotional_tone),
            compression: *text_chars as f64 / s.text.chars().count().max(1) as f64,
            confidence: s.confidence,
            kind: s.kind.as_str(),
            model: usage.map(|u| clean(&u.model)),
            prompt: usage.map(|u| u.prompt_tokens as i32),
            completion: usage.map(|u| u.completion_tokens as i32),
            latency: usage.map(|u| u.latency_ms as i32),
            cost: usage.and_then(|u| u.cost_usd),
            coverage: coverage_fingerprint(covered),
            revision: w.revision + 1,
            message_count: *message_count,
        })
    }

    fn key(&self) -> SummaryKey {
        SummaryKey {
            user_id: self.w.user_id.clone(),
            bot_name: self.w.bot.clone(),
            start: self.start,
            end: self.end,
        }
    }
}

/// `unnest` of the rows' columns: `x(sid, u, b, text, st, en, mc, topics, tone, comp, conf, rev, kind, model, pt, ct,
/// lat, cost, cov)` from `$1..$19`; `$20` is the enrichment version. Topics travel as JSON arrays (one text per row).
const ROWS_FROM: &str = "unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::timestamp[], $6::timestamp[],
        $7::int[], $8::text[], $9::text[], $10::float8[], $11::float8[], $12::int[], $13::text[], $14::text[],
        $15::int[], $16::int[], $17::int[], $18::float8[], $19::text[])
     AS x(sid, u, b, text, st, en, mc, topics, tone, comp, conf, rev, kind, model, pt, ct, lat, cost, cov)";

/// As `UPDATE_SUMMARY_SQL`, for many rows: a window that already has a row keeps it.
fn update_rows_sql() -> String {
    format!(
        "UPDATE conversation_summaries s SET summary_text = x.text, start_timestamp = x.st, end_timestamp = x.en,
            message_count = x.mc, key_topics = ARRAY(SELECT jsonb_array_elements_text(x.topics::jsonb)),
            emotional_tone = x.tone, compression_ratio = x.comp, confidence_score = x.conf, enrichment_version = $20,
            revision = x.rev, summarizer = x.kind, model = x.model, prompt_tokens = x.pt, completion_tokens = x.ct,
            llm_latency_ms = x.lat,
            cost_usd = CASE WHEN x.cost IS NULL THEN s.cost_usd ELSE coalesce(s.cost_usd, 0) + x.cost END,
            coverage = x.cov, updated_at = now()
         FROM {ROWS_FROM}
         WHERE s.id = x.sid AND s.user_id = x.u AND s.bot_name = x.b
         RETURNING s.id"
    )
}

/// As `UPSERT_SUMMARY_SQL`, for many rows (no two with the same window key).
fn upsert_rows_sql() -> String {
    format!(
        "INSERT INTO conversation_summaries (user_id, bot_name, summary_text, summary_type, start_timestamp,
            end_timestamp, message_count, key_topics, emotional_tone, compression_ratio, confidence_score,
            enrichment_version, revision, summarizer, model, prompt_tokens, completion_tokens, llm_latency_ms, cost_usd,
            coverage, created_at, updated_at)
         SELECT x.u, x.b, x.text, 'time_window', x.st, x.en, x.mc, ARRAY(SELECT jsonb_array_elements_text(x.topics::jsonb)),
            x.tone, x.comp, x.conf, $20, x.rev, x.kind, x.model, x.pt, x.ct, x.lat, x.cost, x.cov, now(), now()
         FROM {ROWS_FROM}
         {}
         RETURNING id, user_id, bot_name, start_timestamp, end_timestamp",
        super::windows::on_window_conflict!()
    )
}

/// Runs `sql` over `rows` (see [`ROWS_FROM`]).
/// A summary row [`update_rows_sql`] wrote (`RETURNING s.id`).
#[derive(sqlx::FromRow)]
struct UpdatedRow {
    id: i32,
}

/// A summary row [`upsert_rows_sql`] wrote, with its window key.
#[derive(sqlx::FromRow)]
struct UpsertedRow {
    id: i32,
    user_id: String,
    bot_name: String,
    start_timestamp: NaiveDateTime,
    end_timestamp: NaiveDateTime,
}

/// A window row locked by the finish.
#[derive(sqlx::FromRow)]
struct LockedWindow {
    id: i64,
    version: i32,
    lease_owner: Option<String>,
    state: WindowState,
}

async fn write_rows<T>(
    tx: &mut Transaction<'_, Postgres>,
    sql: &str,
    rows: &[&SummaryRow<'_>],
) -> Result<Vec<T>, StoreError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let col =
        |f: &dyn Fn(&SummaryRow) -> String| rows.iter().map(|r| f(r)).collect::<Vec<String>>();
    let sid: Vec<Option<i32>> = rows.iter().map(|r| r.w.summary_id).collect();
    let users = col(&|r| r.w.user_id.clone());
    let bots = col(&|r| r.w.bot.clone());
    let texts = col(&|r| r.text.clone());
    let starts: Vec<NaiveDateTime> = rows.iter().map(|r| r.start).collect();
    let ends: Vec<NaiveDateTime> = rows.iter().map(|r| r.end).collect();
    let counts: Vec<i32> = rows.iter().map(|r| r.message_count).collect();
    let topics = col(&|r| r.topics.clone());
    let tones = col(&|r| r.tone.clone());
    let comps: Vec<f64> = rows.iter().map(|r| r.compression).collect();
    let confs: Vec<f64> = rows.iter().map(|r| r.confidence).collect();
    let revs: Vec<i32> = rows.iter().map(|r| r.revision).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
    let models: Vec<Option<String>> = rows.iter().map(|r| r.model.clone()).collect();
    let prompts: Vec<Option<i32>> = rows.iter().map(|r| r.prompt).collect();
    let completions: Vec<Option<i32>> = rows.iter().map(|r| r.completion).collect();
    let latencies: Vec<Option<i32>> = rows.iter().map(|r| r.latency).collect();
    let costs: Vec<Option<f64>> = rows.iter().map(|r| r.cost).collect();
    let coverages = col(&|r| r.coverage.clone());
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(sid)
        .bind(users)
        .bind(bots)
        .bind(texts)
        .bind(starts)
        .bind(ends)
        .bind(counts)
        .bind(topics)
        .bind(tones)
        .bind(comps)
        .bind(confs)
        .bind(revs)
        .bind(kinds)
        .bind(models)
        .bind(prompts)
        .bind(completions)
        .bind(latencies)
        .bind(costs)
        .bind(coverages)
        .bind(ENRICHMENT_VERSION)
        .fetch_all(&mut **tx)
        .await?)
}

impl Store {
    /// Writes the workers' results for many windows in one transaction, the rules applied to each window on its
    /// own: a window whose lease is no longer `owner`'s or that is no longer due is
    /// [`Finished::Stale`] and untouched, one whose version changed since the claim is `Stale` with its lease given
    /// back, and the others are written (the summary row updated by `summary_id` or upserted on the window key,
    /// `revision + 1`, coverage, `cost_usd` added; too_short; retry or dead). Returns one [`Finished`] per window, in
    /// the order given. An error fails the whole transaction (nothing written): the caller finishes the windows one
    /// by one then, so that a row that cannot be stored fails only its own window.
    pub async fn finish_windows(
        &self,
        owner: &str,
        batch: &[(&ClaimedWindow, &WindowOutcome)],
    ) -> Result<Vec<Finished>, StoreError> {
        self.finish_windows_settling(owner, batch, None).await
    }

    /// [`Store::finish_windows`], also writing the LLM spend `settlement` (the costs of the calls behind these
    /// results and any others recorded since the last write, [`crate::budget::settle_in`]) in the same transaction:
    /// a summary and what it cost commit together, with no round trip of their own.
    pub async fn finish_windows_settling(
        &self,
        owner: &str,
        batch: &[(&ClaimedWindow, &WindowOutcome)],
        settlement: Option<&crate::budget::Settlement>,
    ) -> Result<Vec<Finished>, StoreError> {
        let mut out = vec![Finished::Stale; batch.len()];
        if batch.is_empty() && settlement.is_none() {
            return Ok(out);
        }
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = batch.iter().map(|(w, _)| w.id).collect();
        // Locked in id order (as every multi-window writer should), so two batches never wait on each other in a
        // circle.
        let locked: Vec<LockedWindow> = sqlx::query_as(
            "SELECT id, version, lease_owner, state FROM recap_windows WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let now: HashMap<i64, LockedWindow> = locked.into_iter().map(|r| (r.id, r)).collect();
        let mut changed = Vec::new();
        let mut live = Vec::new();
        let mut seen = HashSet::new();
        for (at, (w, outcome)) in batch.iter().enumerate() {
            if !seen.insert(w.id) {
                continue; // the same window twice: written once
            }
            match now.get(&w.id) {
                Some(l)
                    if l.lease_owner.as_deref() != Some(owner) || l.state != WindowState::Due => {}
                None => {}
                Some(l) if l.version != w.version => changed.push(w.id),
                Some(_) => live.push(Live { at, w, outcome }),
            }
        }
        if !changed.is_empty() {
            sqlx::query(
                "UPDATE recap_windows SET lease_owner = NULL, lease_until = NULL WHERE id = ANY($1)",
            )
            .bind(&changed)
            .execute(&mut *tx)
            .await?;
        }
        // Points found in Qdrant that no event or sweep reported (rare).
        for Live { w, outcome, .. } in &live {
            if let WindowOutcome::Summarized { extra, .. } = outcome
                && !extra.is_empty()
            {
                insert_messages(&mut tx, extra, Some(w.id)).await?;
            }
        }
        // Summary rows: by row id where the window has one, else upserted on the window key; a second row of the
        // same key or the same row id in this batch is written on its own, after the others (the set-based upsert
        // cannot touch one row twice).
        let rows: Vec<SummaryRow> = live
            .iter()
            .filter_map(|l| SummaryRow::new(l.at, l.w, l.outcome))
            .collect();
        let mut summary_ids: HashMap<usize, i32> = HashMap::new();
        let (mut keys, mut sids) = (HashSet::new(), HashSet::new());
        let (mut by_id, mut by_key, mut alone) = (Vec::new(), Vec::new(), Vec::new());
        for r in &rows {
            let unique = keys.insert(r.key()) && r.w.summary_id.is_none_or(|s| sids.insert(s));
            match (unique, r.w.summary_id) {
                (false, _) => alone.push(r),
                (true, Some(_)) => by_id.push(r),
                (true, None) => by_key.push(r),
            }
        }
        if !by_id.is_empty() {
            let updated: HashSet<i32> =
                write_rows::<UpdatedRow>(&mut tx, &update_rows_sql(), &by_id)
                    .await?
                    .iter()
                    .map(|r| r.id)
                    .collect();
            for r in by_id {
                match r.w.summary_id.filter(|s| updated.contains(s)) {
                    Some(s) => {
                        summary_ids.insert(r.at, s);
                    }
                    None => by_key.push(r), // the row is gone: upserted on its key
                }
            }
        }
        if !by_key.is_empty() {
            let at_key: HashMap<_, usize> = by_key.iter().map(|r| (r.key(), r.at)).collect();
            for row in write_rows::<UpsertedRow>(&mut tx, &upsert_rows_sql(), &by_key).await? {
                let key = SummaryKey {
                    user_id: row.user_id,
                    bot_name: row.bot_name,
                    start: row.start_timestamp,
                    end: row.end_timestamp,
                };
                if let Some(at) = at_key.get(&key) {
                    summary_ids.insert(*at, row.id);
                }
            }
        }
        for r in alone {
            let Live { outcome, .. } = live
                .iter()
                .find(|l| l.at == r.at)
                .ok_or(StoreError::Invariant("a batch row without its window"))?;
            let WindowOutcome::Summarized {
                summary,
                message_count,
                text_chars,
                ..
            } = outcome
            else {
                return Err(StoreError::Invariant("a summary row without a summary"));
            };
            let id = upsert_summary(
                &mut tx,
                r.w,
                r.start,
                r.end,
                summary,
                *message_count,
                *text_chars,
                r.revision,
                &r.coverage,
            )
            .await?;
            summary_ids.insert(r.at, id);
        }
        if summary_ids.len() != rows.len() {
            return Err(StoreError::Invariant(
                "a summary row was not written or not found",
            ));
        }
        super::words::write(
            &mut tx,
            live.iter().filter_map(|l| match l.outcome {
                WindowOutcome::Summarized { words, .. } => Some(Said {
                    summary_id: *summary_ids.get(&l.at)?,
                    bot: &l.w.bot,
                    user_id: &l.w.user_id,
                    words,
                }),
                _ => None,
            }),
        )
        .await?;
        // The windows' new states: done, too_short, retry or dead.
        let done: Vec<&SummaryRow> = rows.iter().collect();
        if !done.is_empty() {
            sqlx::query(
                "UPDATE recap_windows w SET state = $6, revision = x.rev, summary_id = x.sid, coverage = x.cov,
                    attempts = 0, message_count = x.mc, lease_owner = NULL, lease_until = NULL, last_error = NULL,
                    updated_at = now()
                 FROM unnest($1::bigint[], $2::int[], $3::int[], $4::text[], $5::int[]) AS x(id, rev, sid, cov, mc)
                 WHERE w.id = x.id",
            )
            .bind(done.iter().map(|r| r.w.id).collect::<Vec<i64>>())
            .bind(done.iter().map(|r| r.revision).collect::<Vec<i32>>())
            .bind(done.iter().map(|r| summary_ids[&r.at]).collect::<Vec<i32>>())
            .bind(done.iter().map(|r| r.coverage.clone()).collect::<Vec<String>>())
            .bind(done.iter().map(|r| r.message_count).collect::<Vec<i32>>())
            .bind(WindowState::Done)
            .execute(&mut *tx)
            .await?;
            for r in &done {
                out[r.at] = Finished::Done;
            }
            let summarized: Vec<_> = done.iter().map(|r| (r.w, batch[r.at].1)).collect();
            super::running::consume_windows(&mut tx, &summarized).await?;
        }
        let short: Vec<TooShort> = live
            .iter()
            .filter_map(|l| match l.outcome {
                WindowOutcome::TooShort { message_count } => Some(TooShort {
                    at: l.at,
                    id: l.w.id,
                    message_count: *message_count,
                }),
                _ => None,
            })
            .collect();
        if !short.is_empty() {
            sqlx::query(
                "UPDATE recap_windows w SET state = $3, message_count = x.mc, lease_owner = NULL,
                    lease_until = NULL, updated_at = now()
                 FROM unnest($1::bigint[], $2::int[]) AS x(id, mc) WHERE w.id = x.id",
            )
            .bind(short.iter().map(|s| s.id).collect::<Vec<i64>>())
            .bind(short.iter().map(|s| s.message_count).collect::<Vec<i32>>())
            .bind(WindowState::TooShort)
            .execute(&mut *tx)
            .await?;
            for s in &short {
                out[s.at] = Finished::TooShort;
            }
        }
        /// A window put back (or dead): its position in the batch, id, new state, attempts, error and delay.
        struct Retry {
            at: usize,
            id: i64,
            state: WindowState,
            attempts: i32,
            error: String,
            delay_ms: f64,
        }
        let retry: Vec<Retry> = live
            .iter()
            .filter_map(|Live { at, w, outcome }| match outcome {
                WindowOutcome::Retry {
                    error,
                    delay,
                    counts,
                    max_attempts,
                } => {
                    let super::NextAttempt { attempts, dead } =
                        super::windows::next_attempt(w.attempts, *counts, *max_attempts);
                    let error = truncate(&error.replace('\0', ""), 2000).to_string();
                    Some(Retry {
                        at: *at,
                        id: w.id,
                        state: if dead {
                            WindowState::Dead
                        } else {
                            WindowState::Due
                        },
                        attempts,
                        error,
                        delay_ms: delay.as_millis() as f64,
                    })
                }
                _ => None,
            })
            .collect();
        if !retry.is_empty() {
            sqlx::query(
                "UPDATE recap_windows w SET state = x.state, attempts = x.attempts, last_error = x.err,
                    not_before = now() + x.delay * interval '1 millisecond', lease_owner = NULL, lease_until = NULL,
                    updated_at = now()
                 FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::float8[])
                     AS x(id, state, attempts, err, delay)
                 WHERE w.id = x.id",
            )
            .bind(retry.iter().map(|r| r.id).collect::<Vec<i64>>())
            .bind(
                retry
                    .iter()
                    .map(|r| r.state.as_str())
                    .collect::<Vec<&str>>(),
            )
            .bind(retry.iter().map(|r| r.attempts).collect::<Vec<i32>>())
            .bind(retry.iter().map(|r| r.error.clone()).collect::<Vec<String>>())
            .bind(retry.iter().map(|r| r.delay_ms).collect::<Vec<f64>>())
            .execute(&mut *tx)
            .await?;
            for r in &retry {
                out[r.at] = if r.state == WindowState::Dead {
                    Finished::Dead
                } else {
                    Finished::Retrying
                };
            }
        }
        // Last, so the day row of the ledger is locked only for the commit.
        if let Some(s) = settlement {
            crate::budget::settle_in(&mut tx, s).await?;
        }
        tx.commit().await?;
        Ok(out)
    }
}
