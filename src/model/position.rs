//! Source positions stored with a checkpoint (`recap_checkpoints.position`, a `double precision` column): a JetStream
//! stream sequence ([`StreamSeq`], an integer end to end in Rust) or a sweep's high-water mark ([`SweepPos`], seconds
//! of `timestamp_unix`, read back by `Store::sweep_position`). The column stays a double: it holds every sequence below 2^53 exactly, and
//! [`StreamSeq::from_column`] refuses anything else instead of rounding.

use std::fmt;

/// A JetStream stream sequence (1 is the stream's first message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamSeq(pub u64);

/// The largest integer a `double precision` column holds exactly (2^53).
pub const MAX_EXACT_SEQ: u64 = 1 << 53;

impl StreamSeq {
    /// The sequence after this one (where a consumer recreated after it starts).
    pub fn next(self) -> StreamSeq {
        StreamSeq(self.0.saturating_add(1))
    }

    /// The value stored in `recap_checkpoints.position` (exact: sequences stay below 2^53).
    pub fn to_column(self) -> f64 {
        self.0 as f64
    }

    /// A stored position read back as a sequence: `None` unless it is a whole number in `0..=2^53` (a position
    /// written by the sweep under a stream's name, or a corrupt row, is refused rather than rounded).
    pub fn from_column(v: f64) -> Option<StreamSeq> {
        (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= MAX_EXACT_SEQ as f64)
            .then_some(StreamSeq(v as u64))
    }
}

impl fmt::Display for StreamSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A sweep position: the `timestamp_unix` (seconds since the Unix epoch, fractional) a collection's sweep has read
/// up to.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct SweepPos(pub f64);

/// Where a source has read up to: a JetStream stream's sequence or a collection's sweep mark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Position {
    Stream(StreamSeq),
    Sweep(SweepPos),
}

impl Position {
    /// The value stored in `recap_checkpoints.position`.
    pub fn to_column(self) -> f64 {
        match self {
            Position::Stream(s) => s.to_column(),
            Position::Sweep(p) => p.0,
        }
    }

    /// The later of two positions of one source (as the column keeps them: `GREATEST`). Two kinds under one name
    /// (no source of recap's writes both) compare as their stored values.
    pub fn later(self, other: Position) -> Position {
        match (self, other) {
            (Position::Stream(a), Position::Stream(b)) => Position::Stream(a.max(b)),
            (Position::Sweep(a), Position::Sweep(b)) => Position::Sweep(SweepPos(a.0.max(b.0))),
            (a, b) => {
                if a.to_column().max(b.to_column()) == a.to_column() {
                    a
                } else {
                    b
                }
            }
        }
    }
}

impl From<StreamSeq> for Position {
    fn from(s: StreamSeq) -> Position {
        Position::Stream(s)
    }
}

impl From<SweepPos> for Position {
    fn from(p: SweepPos) -> Position {
        Position::Sweep(p)
    }
}

/// A source position to store with an ingest checkpoint (a `recap_checkpoints` row): the checkpoint's name
/// (`nats:<stream>:<consumer>`, `sweep:<collection>`, ...), where the source has read up to, and how many points it
/// read since the last one.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceCheckpoint {
    pub name: String,
    pub position: Position,
    pub points_read: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_sequence_round_trips_the_column_exactly_or_is_refused() {
        for s in [
            0,
            1,
            7,
            150_000,
            u64::from(u32::MAX) + 1,
            MAX_EXACT_SEQ - 1,
            MAX_EXACT_SEQ,
        ] {
            assert_eq!(
                StreamSeq::from_column(StreamSeq(s).to_column()),
                Some(StreamSeq(s))
            );
        }
        for v in [
            -1.0,
            0.5,
            1.0e20,
            f64::NAN,
            f64::INFINITY,
            (MAX_EXACT_SEQ as f64) * 2.0,
        ] {
            assert_eq!(StreamSeq::from_column(v), None, "{v}");
        }
        assert_eq!(StreamSeq(41).next(), StreamSeq(42));
    }

    #[test]
    fn the_later_position_is_kept_as_the_column_keeps_it() {
        let s = |n| Position::Stream(StreamSeq(n));
        let w = |t| Position::Sweep(SweepPos(t));
        assert_eq!(s(7).later(s(9)), s(9));
        assert_eq!(s(9).later(s(7)), s(9));
        // above 2^53 a double cannot tell these apart; the sequence can
        assert_eq!(
            s(MAX_EXACT_SEQ + 1).later(s(MAX_EXACT_SEQ + 2)),
            s(MAX_EXACT_SEQ + 2)
        );
        assert_eq!(w(1.5).later(w(1.25)), w(1.5));
        assert_eq!(w(1.25).later(w(1.5)), w(1.5));
        assert_eq!(w(f64::NAN).later(w(2.0)), w(2.0));
        assert_eq!(s(3).later(w(2.5)), s(3));
        assert_eq!(s(3).later(w(3.5)), w(3.5));
        assert_eq!(s(12).to_column(), 12.0);
        assert_eq!(w(1.75).to_column(), 1.75);
    }
}
