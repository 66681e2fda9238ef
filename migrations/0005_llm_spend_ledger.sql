-- The LLM daily budget is one number across replicas (LLM_DAILY_BUDGET_USD): what was spent per UTC day, and what
-- calls in flight have reserved. A call starts only after reserving its estimated cost while
-- spent + active reservations < budget (under the day row's lock), so N replicas together spend at most the budget
-- plus one call's cost. Reservations are kept per replica (INSTANCE_ID): rows are updated, never deleted, and those of
-- a replica that died expire by themselves.
CREATE TABLE IF NOT EXISTS recap_llm_spend (
    day DATE PRIMARY KEY,
    spent_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    calls BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS recap_llm_reservations (
    owner TEXT PRIMARY KEY,
    usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL
);
