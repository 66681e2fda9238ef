//! Running summaries of open windows, the worker side: a claimed running summary (marked due by a checkpoint) is
//! built from the key's open points as of the last checkpoint, fetched from Qdrant, incrementally from the last valid
//! running summary; and a closing window's final summary starts from its valid running summary. The rules are in
//! `crate::running`, the SQL in `sink/running.rs`.

use std::time::Duration;

use tracing::{debug, warn};

use super::{Context, jittered};
use crate::running::{current_window_len, uncovered};
use crate::sink::{
    ClaimedRunning, OpenPoints, RunningFinished, RunningOutcome, StoreError, StoredRunning,
};
use crate::summarize::{
    Message, Purpose, SummarizeError, Summarizer, SummarizerKind, Summary, WindowInput,
};

fn retry(ctx: &Context, error: String, delay: Duration, counts: bool) -> RunningOutcome {
    RunningOutcome::Retry {
        error,
        delay,
        counts,
        max_attempts: ctx.cfg.llm.llm_max_attempts as i32,
    }
}

fn input(bot: &str, user_id: &str, messages: Vec<Message>) -> WindowInput {
    let span = match (messages.first(), messages.last()) {
        (Some(f), Some(l)) => (f.ts_ms, l.ts_ms),
        _ => (0, 0),
    };
    WindowInput {
        bot: bot.into(),
        user_id: user_id.into(),
        start_ms: span.0,
        end_ms: span.1,
        messages,
    }
}

/// The summary of `messages` (a window, sorted by stored time) for `purpose`: from `stored` plus the messages it does
/// not cover when it is valid for them and the summarizer is incremental (no call at all when it covers every
/// message), else from all of them. Returns the summary and whether it started from `stored`.
pub async fn summarize_from(
    summarizer: &dyn Summarizer,
    stored: Option<&StoredRunning>,
    bot: &str,
    user_id: &str,
    messages: &[Message],
    purpose: Purpose,
) -> (Result<Summary, SummarizeError>, bool) {
    let rest = stored
        .filter(|_| summarizer.incremental())
        .and_then(|s| Some((s, uncovered(&s.coverage(), messages)?)));
    match rest {
        Some((s, rest)) if rest.is_empty() => (Ok(reuse(s)), true),
        Some((s, rest)) => {
            let new = input(bot, user_id, rest.into_iter().cloned().collect());
            let r = summarizer
                .summarize_incremental(&s.prior(), &new, purpose)
                .await;
            (r, true)
        }
        None => {
            let all = input(bot, user_id, messages.to_vec());
            (summarizer.summarize_for(&all, purpose).await, false)
        }
    }
}

/// A stored running summary that covers a whole window, as its final summary (no call).
fn reuse(s: &StoredRunning) -> Summary {
    Summary {
        text: s.summary.clone(),
        key_topics: s.key_topics.clone(),
        emotional_tone: s.emotional_tone.clone(),
        confidence: s.confidence.unwrap_or(0.5),
        kind: if s.summarizer.as_deref() == Some("llm") {
            SummarizerKind::Llm
        } else {
            SummarizerKind::Extractive
        },
        usage: None,
    }
}

/// Builds one claimed running summary; returns what to write.
async fn build(ctx: &Context, c: &ClaimedRunning) -> Result<RunningOutcome, StoreError> {
    let every = ctx.cfg.windows.context_summary_every as usize;
    let Some(OpenPoints { ids, times }) = ctx.store.open_points(&c.bot, &c.user_id).await? else {
        return Ok(RunningOutcome::Nothing); // the window closed (or was forgotten) meanwhile
    };
    let n = current_window_len(&ctx.tracker_config(), &times);
    if every == 0 || n < every {
        return Ok(RunningOutcome::Nothing);
    }
    let (ids, times) = (&ids[ids.len() - n..], &times[times.len() - n..]);
    let bot_for = |coll: &str| ctx.cfg.bot_for_collection(coll);
    let range = (times[0], times[n - 1]);
    let fetched = match ctx.points.collections_for(&c.bot, &bot_for).await {
        Ok(colls) => {
            ctx.points
                .fetch_window(&colls, ids, &c.user_id, range)
                .await
        }
        Err(e) => Err(e),
    };
    let messages = match fetched {
        // Only the checkpoint's points: the coverage must stay a subset of the open window's points.
        Ok((ms, _)) => {
            let known: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
            ms.into_iter()
                .filter(|m| known.contains(m.point_id.as_str()))
                .collect::<Vec<_>>()
        }
        Err(e) => {
            metrics::counter!("recap_fetch_errors_total").increment(1);
            return Ok(retry(
                ctx,
                e.to_string(),
                jittered(Duration::from_secs(5)),
                false,
            ));
        }
    };
    if messages.len() < every {
        return Ok(RunningOutcome::Nothing);
    }
    // One call per multiple of N the window crossed since the last running summary, never more (a window of n
    // messages costs at most floor(n / N) running calls): the last one was built when the window had
    // `message_count + 1` messages (it leaves the latest out, below).
    if let Some(s) = &c.stored
        && uncovered(&s.coverage(), &messages).is_some()
        && messages.len() / every <= (s.message_count.max(0) as usize + 1) / every
    {
        return Ok(RunningOutcome::Nothing);
    }
    // The latest message stays out of the running summary: `GET /v1/context` shows it verbatim (a bot's prompt
    // always ends with what the user said last), and the next summary or the close starts from it.
    let messages = &messages[..messages.len() - 1];
    if let Some(s) = &c.stored
        && uncovered(&s.coverage(), messages).is_some_and(|rest| rest.is_empty())
    {
        return Ok(RunningOutcome::Nothing); // nothing new since the last one
    }
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    if ctx.summarizer.kind() == SummarizerKind::Llm
        && !ctx
            .store
            .extend_running_lease(&ctx.instance, c, lease)
            .await?
    {
        return Ok(retry(
            ctx,
            "lease lost before the summarizer call".into(),
            Duration::ZERO,
            false,
        ));
    }
    let (r, from_prior) = summarize_from(
        ctx.summarizer.as_ref(),
        c.stored.as_ref(),
        &c.bot,
        &c.user_id,
        messages,
        Purpose::Running,
    )
    .await;
    if c.stored.is_some() && !from_prior {
        metrics::counter!("recap_running_summaries_total", "outcome" => "invalidated").increment(1);
        debug!(bot = %c.bot, user = %c.user_id, "the running summary no longer fits its window; built from the whole window");
    }
    Ok(match r {
        Ok(summary) => RunningOutcome::Written {
            summary,
            point_ids: messages.iter().map(|m| m.point_id.clone()).collect(),
            covers_until_ms: messages.last().map_or(0, |m| m.ts_ms),
            window_start_ms: messages.first().map_or(0, |m| m.ts_ms),
        },
        Err(SummarizeError::Empty) => RunningOutcome::Nothing,
        Err(SummarizeError::Unavailable(e)) => {
            retry(ctx, e, jittered(Duration::from_secs(5)), false)
        }
        Err(e) => retry(
            ctx,
            e.to_string(),
            Duration::from_secs(5u64 << c.attempts.clamp(0, 7)).min(Duration::from_secs(600)),
            true,
        ),
    })
}

/// Claims up to `limit` due running summaries and builds and writes them, one after another. Returns how many were
/// claimed. Workers call this only when no window was due (window work keeps priority).
pub async fn run_due_running(ctx: &Context, limit: usize) -> Result<usize, StoreError> {
    if ctx.cfg.windows.context_summary_every == 0 || limit == 0 {
        return Ok(0);
    }
    let lease = Duration::from_secs(ctx.cfg.service.lease_seconds.into());
    let claimed = ctx
        .store
        .claim_running(&ctx.instance, lease, limit as i64)
        .await?;
    let n = claimed.len();
    let work = claimed.iter().map(|c| async move {
        let outcome = match build(ctx, c).await {
            Ok(o) => o,
            Err(e) if e.is_connection() => return Err(e),
            Err(e) => retry(ctx, e.to_string(), jittered(Duration::from_secs(5)), false),
        };
        let finished = ctx.store.finish_running(&ctx.instance, c, &outcome).await?;
        let label = match finished {
            RunningFinished::Written => "written",
            RunningFinished::Discarded => "discarded",
            RunningFinished::Nothing => "nothing",
            RunningFinished::Retrying => "retrying",
            RunningFinished::GaveUp => "failed",
            RunningFinished::Stale => "stale",
        };
        metrics::counter!("recap_running_summaries_total", "outcome" => label).increment(1);
        if let RunningOutcome::Retry { error, .. } = &outcome {
            warn!(bot = %c.bot, user = %c.user_id, %error, "running summary not written; retrying later");
        }
        Ok(())
    });
    for r in futures::future::join_all(work).await {
        r?;
    }
    Ok(n)
}
