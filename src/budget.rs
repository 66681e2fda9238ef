//! The LLM daily budget shared by every replica, kept in Postgres (`recap_llm_spend`, `recap_llm_reservations`,
//! migration 0005).
//!
//! Invariant: a call starts only after reserving its estimated cost (its prompt at the configured prices plus
//! [`crate::summarize::llm::MAX_OUTPUT_TOKENS`] of completion) while `spent today + active reservations < budget`,
//! checked and reserved under the lock of the day's ledger row. Its actual cost is added to the day and its
//! reservation given back once it returns. So all replicas together spend at most the budget plus the cost of the
//! last call admitted (as long as estimates are not below what the provider charges).
//!
//! Reservations are one row per replica (`INSTANCE_ID`), updated and never deleted; a replica that dies leaves a row
//! that stops counting when it expires.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;

/// What [`SpendLedger::reserve`] decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reserve {
    /// The call may start; `usd` is reserved until it is settled.
    Granted { usd: f64 },
    /// Spent plus reserved today has reached the budget.
    Over { committed_usd: f64 },
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
    /// today's spend.
    fn settle(
        &self,
        reserved_usd: Option<f64>,
        actual_usd: f64,
    ) -> BoxFuture<'_, Result<(), String>>;
    /// Today's (UTC) spend plus active reservations, all replicas.
    fn committed_today(&self) -> BoxFuture<'_, Result<f64, String>>;
}

/// The Postgres ledger.
pub struct PgLedger {
    pool: PgPool,
    owner: String,
    /// Calls of this replica between reserve and settle.
    in_flight: AtomicUsize,
}

impl PgLedger {
    pub fn new(pool: PgPool, owner: impl Into<String>) -> PgLedger {
        PgLedger {
            pool,
            owner: owner.into(),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Forgets what an earlier process with this replica's name had reserved (its calls are gone).
    /// Calls of this replica that hold a reservation now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Writes the settlements recorded so far (none are pending: each is written when its call returns).
    pub async fn flush(&self) -> Result<(), sqlx::Error> {
        Ok(())
    }

    pub async fn reset_own(&self) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE recap_llm_reservations SET usd = 0 WHERE owner = $1")
            .bind(&self.owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn reserve_inner(
        &self,
        estimate: f64,
        budget: f64,
        ttl: Duration,
    ) -> Result<Reserve, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO recap_llm_spend (day) VALUES ((now() AT TIME ZONE 'UTC')::date) ON CONFLICT (day) DO NOTHING",
        )
        .execute(&mut *tx)
        .await?;
        // the day row's lock serializes every replica's check-and-reserve
        let spent: f64 = sqlx::query_scalar(
            "SELECT spent_usd FROM recap_llm_spend WHERE day = (now() AT TIME ZONE 'UTC')::date FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await?;
        let reserved: f64 = sqlx::query_scalar(
            "SELECT coalesce(sum(usd), 0)::float8 FROM recap_llm_reservations WHERE expires_at > now()",
        )
        .fetch_one(&mut *tx)
        .await?;
        let committed = spent + reserved;
        if committed >= budget {
            tx.commit().await?;
            return Ok(Reserve::Over {
                committed_usd: committed,
            });
        }
        sqlx::query(
            "INSERT INTO recap_llm_reservations (owner, usd, expires_at)
             VALUES ($1, $2, now() + $3 * interval '1 millisecond')
             ON CONFLICT (owner) DO UPDATE SET
                usd = CASE WHEN recap_llm_reservations.expires_at > now() THEN recap_llm_reservations.usd ELSE 0 END
                      + EXCLUDED.usd,
                expires_at = EXCLUDED.expires_at",
        )
        .bind(&self.owner)
        .bind(estimate)
        .bind(ttl.as_millis() as f64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Reserve::Granted { usd: estimate })
    }

    async fn settle_inner(&self, reserved: Option<f64>, actual: f64) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if actual > 0.0 {
            sqlx::query(
                "INSERT INTO recap_llm_spend (day, spent_usd, calls) VALUES ((now() AT TIME ZONE 'UTC')::date, $1, 1)
                 ON CONFLICT (day) DO UPDATE SET spent_usd = recap_llm_spend.spent_usd + EXCLUDED.spent_usd,
                    calls = recap_llm_spend.calls + 1, updated_at = now()",
            )
            .bind(actual)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(reserved) = reserved {
            sqlx::query(
                "UPDATE recap_llm_reservations SET usd = greatest(usd - $2, 0) WHERE owner = $1",
            )
            .bind(&self.owner)
            .bind(reserved)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
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
            self.settle_inner(reserved_usd, actual_usd.max(0.0))
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn committed_today(&self) -> BoxFuture<'_, Result<f64, String>> {
        Box::pin(async move {
            sqlx::query_scalar(
                "SELECT coalesce((SELECT spent_usd FROM recap_llm_spend WHERE day = (now() AT TIME ZONE 'UTC')::date), 0)
                      + coalesce((SELECT sum(usd) FROM recap_llm_reservations WHERE expires_at > now()), 0)",
            )
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())
        })
    }
}
