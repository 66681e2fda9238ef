//! The leader lease renewed while a long step runs.

use std::time::Duration;

use tracing::warn;

use crate::sink::{Lease, StoreError};

/// Runs `fut` while renewing the leader lease every third of its term, so a long step (a tracker rebuild, a slow
/// scroll) never lets the lease lapse. Returns `Err` only when the lease was lost; a renewal that fails for an outage
/// is logged and tried again at the next period (the ingest transaction is the fence in any case).
pub async fn renewing<T>(
    lease: &Lease,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, StoreError> {
    tokio::pin!(fut);
    let period = (lease.fence().ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = tokio::time::sleep(period) => match lease.renew().await {
                Ok(()) => {}
                Err(e @ StoreError::LostLeadership(_)) => return Err(e),
                Err(e) => warn!(error = %e, "could not renew the ingest lease; retrying"),
            },
        }
    }
}
