//! What a sweep cycle read (`SweepReport`, per collection `CollectionReport`), as `sweep --once` prints it.

use std::fmt;
use std::time::Duration;

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
