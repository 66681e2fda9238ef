//! The group finish of `run_workers` with the LLM summarizer (issue 25): the batches whose calls returned meanwhile are finished together in
//! one transaction ([`super::finish_batch`]), and their summary vectors synced together after it, off the batches'
//! own path. With the LLM summarizer a claim is at most `LLM_CONCURRENCY` windows (often half of it), so one finish
//! transaction per claim meant several per `LLM_CONCURRENCY` calls, each taking the day's spend row for its
//! settlement; a group of the batches waiting takes it once.
//!
//! Every guarantee of the batch finish holds for a group: each window's lease and version are checked on their own in
//! the transaction, a failed transaction is tried again while Postgres cannot be reached, and any other failure
//! finishes each batch of the group on its own (whose caller then goes one by one), so a row at fault fails only its
//! own window.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::finish_batch;
use crate::pipeline::Context;
use crate::sink::{ClaimedWindow, Finished, StoreError, WindowOutcome};

/// At most this many windows in one group transaction.
const GROUP_MAX: usize = 256;

type Done = oneshot::Sender<Result<Vec<Finished>, StoreError>>;
type Job = (Vec<(ClaimedWindow, WindowOutcome)>, Done);

/// A handle to the finisher task of one worker loop (cloned into every batch's task). The task ends once every
/// handle is dropped and every batch sent is finished and its vectors synced.
#[derive(Clone)]
pub struct Finisher {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Finisher {
    /// Starts the finisher task (and its vector syncer); the handle returned ends with both.
    pub fn start(ctx: &Context, lease: Duration) -> (Finisher, tokio::task::JoinHandle<()>) {
        let (jobs, rx) = mpsc::unbounded_channel::<Job>();
        let task = tokio::spawn(run(ctx.clone(), lease, rx));
        (Finisher { jobs }, task)
    }

    /// Finishes one batch (in a group with the others waiting); the summary vectors of its summarized windows are
    /// synced by the finisher afterwards. Same result as [`super::finish_batch`] for the batch.
    pub async fn finish(
        &self,
        batch: &[(&ClaimedWindow, &WindowOutcome)],
    ) -> Result<Vec<Finished>, StoreError> {
        let owned = batch
            .iter()
            .map(|(w, o)| ((*w).clone(), (*o).clone()))
            .collect();
        let (done, result) = oneshot::channel();
        if self.jobs.send((owned, done)).is_err() {
            return Err(StoreError::Invariant("the window finisher has stopped"));
        }
        result.await.unwrap_or(Err(StoreError::Invariant(
            "the window finisher has stopped",
        )))
    }
}

/// The summary vectors of a finished group's summarized windows.
fn vectors_of(
    batch: &[(&ClaimedWindow, &WindowOutcome)],
    finished: &[Finished],
) -> Vec<(i64, Vec<f32>)> {
    batch
        .iter()
        .zip(finished)
        .filter_map(|((w, o), f)| match (o, f) {
            (
                WindowOutcome::Summarized {
                    centroid: Some(c), ..
                },
                Finished::Done,
            ) => Some((w.id, c.clone())),
            _ => None,
        })
        .collect()
}

async fn run(ctx: Context, lease: Duration, mut rx: mpsc::UnboundedReceiver<Job>) {
    let (vectors, vector_rx) = mpsc::unbounded_channel::<(i64, Vec<f32>)>();
    let syncer = tokio::spawn(sync_vectors(ctx.clone(), vector_rx));
    let send_vectors = |v: Vec<(i64, Vec<f32>)>| {
        for x in v {
            let _ = vectors.send(x);
        }
    };
    while let Some(first) = rx.recv().await {
        let mut n = first.0.len();
        let mut group = vec![first];
        while n < GROUP_MAX {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.0.len();
                    group.push(j);
                }
                Err(_) => break,
            }
        }
        let all: Vec<(&ClaimedWindow, &WindowOutcome)> = group
            .iter()
            .flat_map(|(b, _)| b.iter().map(|(w, o)| (w, o)))
            .collect();
        match finish_batch(&ctx, &all, lease).await {
            Ok(finished) => {
                send_vectors(vectors_of(&all, &finished));
                drop(all);
                let mut finished = finished.into_iter();
                for (b, done) in group {
                    let _ = done.send(Ok(finished.by_ref().take(b.len()).collect()));
                }
            }
            Err(e) if group.len() == 1 => {
                drop(all);
                if let Some((_, done)) = group.pop() {
                    let _ = done.send(Err(e));
                }
            }
            Err(e) if e.is_connection() => {
                // tried again for a lease already: each batch gets the failure (its windows are left to the leases)
                drop(all);
                for (_, done) in group {
                    let _ = done.send(Err(StoreError::Db(sqlx::Error::Io(std::io::Error::other(
                        e.to_string(),
                    )))));
                }
            }
            Err(e) => {
                // a row at fault: each batch on its own, so it fails only its batch (which then goes one by one)
                debug!(error = %e, batches = group.len(), "the group cannot be finished at once; batch by batch");
                drop(all);
                for (b, done) in group {
                    let refs: Vec<(&ClaimedWindow, &WindowOutcome)> =
                        b.iter().map(|(w, o)| (w, o)).collect();
                    let r = finish_batch(&ctx, &refs, lease).await;
                    if let Ok(f) = &r {
                        send_vectors(vectors_of(&refs, f));
                    }
                    let _ = done.send(r);
                }
            }
        }
    }
    drop(vectors);
    let _ = syncer.await;
}

/// Writes the summary vectors of finished windows, those waiting together in one read, upsert and write.
async fn sync_vectors(ctx: Context, mut rx: mpsc::UnboundedReceiver<(i64, Vec<f32>)>) {
    while let Some(first) = rx.recv().await {
        let mut got = vec![first];
        while got.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(v) => got.push(v),
                Err(_) => break,
            }
        }
        let items: Vec<(i64, Option<&[f32]>)> = got
            .iter()
            .map(|(id, v)| (*id, Some(v.as_slice())))
            .collect();
        crate::vectors::on_summarized_many(&ctx.store, ctx.points.client(), &items).await;
    }
}
