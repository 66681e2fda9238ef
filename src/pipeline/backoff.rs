//! Shared retry helpers of the shell loops: jittered delays, a never-ending back-off, and a sleep that shutdown ends.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// `d` plus up to `d` of random jitter, so windows and replicas that failed together do not retry together.
pub fn jittered(d: Duration) -> Duration {
    use backon::BackoffBuilder;
    backon::ConstantBuilder::default()
        .with_delay(d)
        .with_jitter()
        .build()
        .next()
        .unwrap_or(d)
}

/// The back-off of the worker and service loops while something they need is unavailable (Postgres, the LLM, the
/// budget): exponential from `min` to `max`, jittered, never giving up.
pub fn loop_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps `d` unless `shutdown` comes first; true when it did.
pub async fn sleep_or_shutdown(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
