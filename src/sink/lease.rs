//! A leader's lease as its own process knows it ([`Lease`]): the fence, and when the lease runs out by this process's
//! clock. What a leader does outside its checkpoint transaction (pulling from the partition's consumer, deleting
//! and recreating it) is fenced by this: a process that was frozen past its lease, or whose renewal found another
//! epoch, stops at once instead of at its next checkpoint (issue 24, case 12).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Fence, Store, StoreError};

/// A partition lease held by this process (cheap to clone: every clone is the same lease).
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    fence: Fence,
    /// When the lease runs out by this process's clock: the send time of the last renewal that succeeded plus the
    /// lease's term (Postgres set `now() + ttl` after that send, so this is never later than the row's end).
    until: Mutex<Instant>,
    deposed: AtomicBool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("fence", &self.inner.fence)
            .field("current", &self.is_current())
            .finish()
    }
}

impl Lease {
    /// The lease `fence` names, taken by a request sent at `sent`.
    pub fn new(store: Store, fence: Fence, sent: Instant) -> Lease {
        let until = sent + fence.ttl;
        Lease {
            inner: Arc::new(Inner {
                store,
                fence,
                until: Mutex::new(until),
                deposed: AtomicBool::new(false),
            }),
        }
    }

    pub fn fence(&self) -> &Fence {
        &self.inner.fence
    }

    /// A renewal sent at `sent` succeeded (a checkpoint's commit, or [`Lease::renew`]).
    pub fn renewed(&self, sent: Instant) {
        let mut until = self.inner.until.lock().expect("lease");
        *until = (*until).max(sent + self.inner.fence.ttl);
    }

    /// Another epoch leads the partition: this lease is over for good.
    pub fn deposed(&self) {
        self.inner.deposed.store(true, Ordering::Relaxed);
    }

    /// Whether this process may still act as the leader: not deposed and, by its own clock, within the term of its
    /// last successful renewal.
    pub fn is_current(&self) -> bool {
        !self.inner.deposed.load(Ordering::Relaxed)
            && Instant::now() < *self.inner.until.lock().expect("lease")
    }

    /// Renews the lease in Postgres (which checks the epoch). `Err(LostLeadership)` marks it deposed.
    pub async fn renew(&self) -> Result<(), StoreError> {
        let sent = Instant::now();
        match self.inner.store.renew_leader(&self.inner.fence).await {
            Ok(()) => {
                self.renewed(sent);
                Ok(())
            }
            Err(e @ StoreError::LostLeadership(_)) => {
                self.deposed();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Renews the lease before an act only the leader may do (deleting and recreating its consumer): `Ok` only when
    /// Postgres confirmed this epoch still leads.
    pub async fn confirm(&self) -> Result<(), StoreError> {
        if self.inner.deposed.load(Ordering::Relaxed) {
            return Err(StoreError::LostLeadership(self.inner.fence.epoch));
        }
        self.renew().await
    }
}
