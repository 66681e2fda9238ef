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
}
