//! What every source hands out ([`Batch`]) and how it is driven ([`Source`]): the types `nats`, `sweep` and
//! `hybrid` share. Each of them depends on this file; it depends on none of them.

use std::future::Future;

use crate::model::SourceCheckpoint;
use crate::sink::{DeadLetter, Lease, NewMessage, Store};

/// One batch of input for one ingest transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<NewMessage>,
    pub dead_letters: Vec<DeadLetter>,
    /// Events that are valid but not messages of any window (`conversation_pair`).
    pub ignored: usize,
    /// Source position to store with the batch.
    pub checkpoint: Option<SourceCheckpoint>,
    /// The source has nothing more right now: the tracker may advance watermarks by the wall clock.
    pub caught_up: bool,
    /// With `caught_up`: the wall-clock time (ms) up to which the source has seen every message, when that is
    /// earlier than now. The sweep's is the start of its last completed cycle (points written after it are unread);
    /// `None` means now (events: nothing undelivered). Watermarks move to at most `horizon - lateness`.
    pub horizon: Option<i64>,
    /// A sweep page whose message times move no watermark (it may come before older points of the same bot:
    /// unordered paging, the first sweep's undated pass, the bot's other collections); only the completed cycle's
    /// `horizon` does (issue 24, case 2). An ordered page of a bot's only collection is not `swept`: every later
    /// page of the bot is at least as late.
    pub swept: bool,
    /// With `horizon`: bots a collection of which the sweep skipped (failing): the horizon does not tick them.
    pub held_back: Vec<String>,
    /// The end of a unit of the source, a sweep collection's last page: a checkpoint is due now (written in the
    /// background while the next collection is read), so the windows this collection closed reach the workers
    /// before the rest of the cycle is read, not at its end. Events never set it.
    pub flush: bool,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.dead_letters.is_empty() && self.ignored == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("qdrant: {0}")]
    Qdrant(#[from] crate::fetch::FetchError),
    #[error("postgres: {0}")]
    Store(#[from] crate::sink::StoreError),
    /// This process no longer leads the partition (its lease ran out by its own clock, or another epoch leads):
    /// it neither pulls nor touches the consumer.
    #[error("not the partition's leader any more")]
    Deposed,
}

/// A source of message batches.
pub trait Source: Send {
    /// The next batch (possibly empty, with `caught_up` set, after waiting a short while for input).
    fn next_batch(&mut self) -> impl Future<Output = Result<Batch, SourceError>> + Send;
    /// The oldest checkpoint [`Source::seal`] marked committed: acknowledge what it covers (with nothing sealed:
    /// everything handed out so far is durable).
    fn commit(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// A checkpoint of everything handed out so far is being written: its acknowledgement is the next
    /// [`Source::commit`]; what comes after belongs to the next checkpoint. Every seal has its commit, also when
    /// nothing was handed out since the last one (that commit then acknowledges nothing).
    fn seal(&mut self) {}
    /// The last batch is applied in memory: read on past it, but acknowledge nothing yet (that waits for the
    /// checkpoint and [`Source::commit`]). Sources whose position lives only in the checkpoint need nothing here.
    fn advance(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// How long an empty [`Source::next_batch`] may wait for input (a source that waits; the hybrid source asks for
    /// less between the pages of a sweep cycle).
    fn set_wait(&mut self, _wait: std::time::Duration) {}
    /// What was handed out since the last commit is lost: it must come again.
    fn abandon(&mut self) -> impl Future<Output = ()> + Send;
    /// This process leads the source's partition under `lease` (`None`: it does not). A source with a position of
    /// its own (a durable consumer) reads, deletes and recreates it only while the lease is current.
    fn lead(&mut self, _lease: Option<Lease>) {}
    /// Whether the source could be read now, without reading anything (NATS: the consumer's info answers). A
    /// partition whose source kept failing is handed back and taken again only once this succeeds.
    fn probe(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }
    /// The ingest state was restored from the last checkpoint: go back to the position stored with it, so
    /// everything after it comes again (and nothing before it does).
    fn rewind(&mut self, _store: &Store) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }
}
