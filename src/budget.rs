//! The LLM daily budget shared by every replica, kept in Postgres (`recap_llm_spend`, `recap_llm_reservations`,
//! migration 0005).
//!
//! Invariant: a call starts only after reserving its estimated cost (its prompt at the configured prices plus
//! [`crate::summarize::llm::MAX_OUTPUT_TOKENS`] of completion) while `spent today + active reservations < budget`,
//! checked and reserved under the lock of the day's ledger row. Its actual cost is added to the day and its
//! reservation given back once it returns. So all replicas together spend at most the budget plus the cost of the
//! last call admitted (as long as estimates are not below what the provider charges).
//!
//! Round trips (issue 25): a replica reserves ahead for up to `chunk` calls in one transaction (its reservation row
//! grows by the grant; calls draw their estimates from the local remainder for [`POOL_FRESH`]), and a grant never
//! takes `spent + reserved` past the budget except by one call's estimate (the last one admitted), so the bound
//! holds. Settlements (the actual cost added to the day, the call's reservation given back) are kept locally and
//! written in batches: by the window finish transaction ([`settle_in`]), by the next reservation's transaction, or
//! by [`PgLedger::flush`] (the worker heartbeat). Until then the call's reservation stays in Postgres, so what is
//! not yet written is still counted (at its estimate, at least the actual cost).
//!
//! Reservations are one row per replica (`INSTANCE_ID`), updated and never deleted; a replica that dies leaves a row
//! that stops counting when it expires.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::{PgPool, Postgres, Transaction};

/// How long calls may draw from a replica's reserved remainder after its grant; the reservation row lives this
/// much longer than a call may run, so every call's estimate is covered until it ends.
pub const POOL_FRESH: Duration = Duration::from_secs(5);
/// How long a read of the day's committed spend serves [`SpendLedger::committed_today`] (workers ask before every
/// claim; the reservation itself always reads Postgres).
const COMMITTED_CACHE: Duration = Duration::from_millis(500);

/// What [`SpendLedger::reserve`] decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reserve {
    /// The call may start; `usd` is reserved until it is settled.
    Granted { usd: f64 },
    /// Spent plus reserved today has reached the budget.
    Over { committed_usd: f64 },
}

/// Settlements recorded but not yet written: USD to add to today's spend (and the calls that cost something), and
/// USD of reservations to give back, for the reservation row of `owner`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settlement {
    pub owner: String,
    pub spent_usd: f64,
    pub calls: i64,
    pub release_usd: f64,
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.spent_usd == 0.0 && self.calls == 0 && self.release_usd == 0.0
    }

    fn add(&mut self, other: &Settlement) {
        self.spent_usd += other.spent_usd;
        self.calls += other.calls;
        self.release_usd += other.release_usd;
    }
}

/// Writes `s` in `tx`: today's spend and calls grow, `s.owner`'s reservation shrinks. Two statements in this order
/// (the day row, then the reservation row), the order every ledger transaction locks them in: one statement with a
/// data-modifying CTE would leave the order to the executor, and two transactions taking the rows in opposite
/// orders deadlock.
pub async fn settle_in(
    tx: &mut Transaction<'_, Postgres>,
    s: &Settlement,
) -> Result<(), sqlx::Error> {
    if s.spent_usd > 0.0 || s.calls > 0 {
        sqlx::query(
            "INSERT INTO recap_llm_spend (day, spent_usd, calls) VALUES ((now() AT TIME ZONE 'UTC')::date, $1, $2)
             ON CONFLICT (day) DO UPDATE SET spent_usd = recap_llm_spend.spent_usd + EXCLUDED.spent_usd,
                calls = recap_llm_spend.calls + EXCLUDED.calls, updated_at = now()",
        )
        .bind(s.spent_usd)
        .bind(s.calls)
        .execute(&mut **tx)
        .await?;
    }
    if s.release_usd > 0.0 {
        sqlx::query(
            "UPDATE recap_llm_reservations SET usd = greatest(usd - $2, 0) WHERE owner = $1",
        )
        .bind(&s.owner)
        .bind(s.release_usd)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The shared spend ledger an LLM summarizer reserves and records its calls' costs in.
pub trait SpendLedger: Send + Sync {
    /// Reserves `estimate_usd` for one call if today's spend plus active reservations is below `budget_usd`.
    fn reserve(
        &self,
        estimate_usd: f64,
        budget_usd: f64,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Reserve, String>>;
    /// Gives back what [`SpendLedger::reserve`] granted (`None` when nothing was reserved) and adds `actual_usd` to
    /// today's spend (written now, or with a later batch: [`SpendLedger::take_pending`]).
    fn settle(
        &self,
        reserved_usd: Option<f64>,
        actual_usd: f64,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// Today's (UTC) spend plus active reservations, all replicas.
    fn committed_today(&self) -> BoxFuture<'_, Result<f64, String>>;
    /// The settlements recorded and not yet written, taken out to be written in the caller's transaction
    /// ([`settle_in`]); [`SpendLedger::restore_pending`] puts them back when that transaction fails.
    fn take_pending(&self) -> Option<Settlement> {
        None
    }
    fn restore_pending(&self, _s: Settlement) {}
    /// Writes what is pending now.
    fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug)]
struct Local {
    /// Reserved in Postgres for calls not started yet, valid until `pool_until`.
    pool_usd: f64,
    pool_until: Instant,
    pending: Settlement,
    /// The last committed spend read, and when.
    committed: Option<(Instant, f64)>,
}

/// The Postgres ledger.
pub struct PgLedger {
    pool: PgPool,
    owner: String,
    /// Calls of this replica between reserve and settle.
    in_flight: AtomicUsize,
    /// Calls one reservation transaction reserves ahead for (1: each call its own).
    chunk: usize,
    local: Mutex<Local>,
    /// One reservation transaction of this replica at a time: calls that find the remainder used up wait for the
    /// grant under way and draw from it.
    granting: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PgLedger {
    pub fn new(pool: PgPool, owner: impl Into<String>) -> PgLedger {
        let owner = owner.into();
        PgLedger {
            pool,
            in_flight: AtomicUsize::new(0),
            chunk: 1,
            granting: tokio::sync::Mutex::new(()),
            local: Mutex::new(Local {
                pool_usd: 0.0,
                pool_until: Instant::now(),
                pending: Settlement {
                    owner: owner.clone(),
                    ..Settlement::default()
                },
                committed: None,
            }),
            owner,
        }
    }

    /// Reserves ahead for up to `calls` calls per reservation transaction (LLM_CONCURRENCY: one claim's calls).
    pub fn with_chunk(mut self, calls: usize) -> PgLedger {
        self.chunk = calls.max(1);
        self
    }

    /// Calls of this replica that hold a reservation now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Forgets what an earlier process with this replica's name had reserved (its calls are gone).
    pub async fn reset_own(&self) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE recap_llm_reservations SET usd = 0 WHERE owner = $1")
            .bind(&self.owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Writes the settlements recorded so far (one transaction; nothing when none is pending).
    pub async fn flush(&self) -> Result<(), sqlx::Error> {
        let Some(s) = SpendLedger::take_pending(self) else {
            return Ok(());
        };
        let r = async {
            let mut tx = self.pool.begin().await?;
            settle_in(&mut tx, &s).await?;
            tx.commit().await
        }
        .await;
        if r.is_err() {
            SpendLedger::restore_pending(self, s);
        }
        r
    }

    async fn reserve_inner(
        &self,
        estimate: f64,
        budget: f64,
        ttl: Duration,
    ) -> Result<Reserve, sqlx::Error> {
        let draw = || {
            let mut l = lock(&self.local);
            if l.pool_usd >= estimate && Instant::now() < l.pool_until {
                l.pool_usd -= estimate;
                return true;
            }
            false
        };
        if draw() {
            return Ok(Reserve::Granted { usd: estimate });
        }
        let _one = self.granting.lock().await;
        if draw() {
            return Ok(Reserve::Granted { usd: estimate });
        }
        // A new grant: the settlements pending and the unused remainder are written in its transaction.
        let pending = {
            let mut l = lock(&self.local);
            let mut p = std::mem::take(&mut l.pending);
            p.owner = self.owner.clone();
            l.pending.owner = self.owner.clone();
            p.release_usd += std::mem::take(&mut l.pool_usd);
            p
        };
        let r = self.grant(&pending, estimate, budget, ttl).await;
        let mut l = lock(&self.local);
        match r {
            Ok((decision, grant, committed)) => {
                l.committed = Some((Instant::now(), committed + grant));
                if grant > 0.0 {
                    l.pool_usd = grant - estimate;
                    l.pool_until = Instant::now() + POOL_FRESH;
                }
                Ok(decision)
            }
            Err(e) => {
                l.pending.add(&pending);
                Err(e)
            }
        }
    }

    /// One transaction: writes `pending`, then grants a reservation for `estimate` (and up to `chunk - 1` more calls
    /// while the budget has room) if today's spend plus active reservations is below `budget`.
    async fn grant(
        &self,
        pending: &Settlement,
        estimate: f64,
        budget: f64,
        ttl: Duration,
    ) -> Result<(Reserve, f64, f64), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // The day row first (its lock serializes every replica's check-and-reserve), then the pending settlements
        // (the day row again, then this replica's reservation row): every ledger transaction locks the day row
        // before the reservation row.
        let spent: f64 = sqlx::query_scalar(
            "INSERT INTO recap_llm_spend (day) VALUES ((now() AT TIME ZONE 'UTC')::date)
             ON CONFLICT (day) DO UPDATE SET day = EXCLUDED.day RETURNING spent_usd",
        )
        .fetch_one(&mut *tx)
        .await?;
        settle_in(&mut tx, pending).await?;
        let spent = spent + pending.spent_usd;
        // read after the lock is held (a new snapshot): every reservation committed before it is seen
        let reserved: f64 = sqlx::query_scalar(
            "SELECT coalesce(sum(usd), 0)::float8 FROM recap_llm_reservations WHERE expires_at > now()",
        )
        .fetch_one(&mut *tx)
        .await?;
        let committed = spent + reserved;
        if committed >= budget {
            tx.commit().await?;
            return Ok((
                Reserve::Over {
                    committed_usd: committed,
                },
                0.0,
                committed,
            ));
        }
        // Up to `chunk` calls' estimates while that stays within the budget; at least this call's (the one call
        // that may cross it).
        let headroom = budget - committed;
        let want = estimate * self.chunk as f64;
        let grant = if headroom >= want {
            want
        } else {
            headroom.max(estimate)
        };
        sqlx::query(
            "INSERT INTO recap_llm_reservations (owner, usd, expires_at)
             VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (owner) DO UPDATE SET
                usd = CASE WHEN recap_llm_reservations.expires_at > now() THEN recap_llm_reservations.usd ELSE 0 END
                      + EXCLUDED.usd,
                expires_at = EXCLUDED.expires_at",
        )
        .bind(&self.owner)
        .bind(grant)
        .bind((ttl + POOL_FRESH).as_millis() as f64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((Reserve::Granted { usd: estimate }, grant, committed))
    }
}

impl SpendLedger for PgLedger {
    fn reserve(
        &self,
        estimate_usd: f64,
        budget_usd: f64,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Reserve, String>> {
        Box::pin(async move {
            let r = self
                .reserve_inner(estimate_usd.max(0.0), budget_usd, ttl)
                .await
                .map_err(|e| e.to_string())?;
            if matches!(r, Reserve::Granted { .. }) {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
            }
            Ok(r)
        })
    }

    fn settle(
        &self,
        reserved_usd: Option<f64>,
        actual_usd: f64,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if reserved_usd.is_some() {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            let actual = actual_usd.max(0.0);
            let mut l = lock(&self.local);
            l.pending.spent_usd += actual;
            l.pending.calls += i64::from(actual > 0.0);
            l.pending.release_usd += reserved_usd.unwrap_or(0.0);
            Ok(())
        })
    }

    fn committed_today(&self) -> BoxFuture<'_, Result<f64, String>> {
        Box::pin(async move {
            if let Some((at, v)) = lock(&self.local).committed
                && at.elapsed() < COMMITTED_CACHE
            {
                return Ok(v);
            }
            let v: f64 = sqlx::query_scalar(
                "SELECT coalesce((SELECT spent_usd FROM recap_llm_spend WHERE day = (now() AT TIME ZONE 'UTC')::date), 0)
                      + coalesce((SELECT sum(usd) FROM recap_llm_reservations WHERE expires_at > now()), 0)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
            lock(&self.local).committed = Some((Instant::now(), v));
            Ok(v)
        })
    }

    fn take_pending(&self) -> Option<Settlement> {
        let mut l = lock(&self.local);
        if l.pending.is_empty() {
            return None;
        }
        let s = std::mem::take(&mut l.pending);
        l.pending.owner = self.owner.clone();
        Some(s)
    }

    fn restore_pending(&self, s: Settlement) {
        lock(&self.local).pending.add(&s);
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { PgLedger::flush(self).await.map_err(|e| e.to_string()) })
    }
}
