-- Rollups (issue 15): day -> week -> month summaries per (bot, user), built from the finer summaries and stored as
-- conversation_summaries rows with summary_type 'day' | 'week' | 'month'. This table is their state: one row per
-- (bot, user, period, period start), dirty while the finer summaries it was built from changed.
CREATE TABLE IF NOT EXISTS recap_rollups (
    id BIGSERIAL PRIMARY KEY,
    bot_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    period TEXT NOT NULL CHECK (period IN ('day', 'week', 'month')),
    -- [period_start, period_end) in UTC; the summary row's end_timestamp is period_end - 1 microsecond.
    period_start TIMESTAMPTZ NOT NULL,
    period_end TIMESTAMPTZ NOT NULL,
    dirty BOOLEAN NOT NULL DEFAULT TRUE,
    dirty_since TIMESTAMPTZ DEFAULT now(),
    -- revisions written (1 after the first build); the summary row carries the same revision.
    revision INTEGER NOT NULL DEFAULT 0,
    summary_id INTEGER,
    -- the direct inputs the current revision was built from, as 'summary id:revision' (windows for a day, days for a
    -- week or a month), sorted.
    inputs TEXT[] NOT NULL DEFAULT '{}',
    -- the time_window summary ids the rollup covers (for a week or a month: the union of its days'), sorted.
    covered_ids BIGINT[] NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before TIMESTAMPTZ,
    last_error TEXT,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_recap_rollups_period UNIQUE (bot_name, user_id, period, period_start)
);
CREATE INDEX IF NOT EXISTS idx_recap_rollups_dirty ON recap_rollups (dirty_since, id) WHERE dirty;

-- Change detection: the rollup task reads window rows written since its last scan (keyset on updated_at, id).
CREATE INDEX IF NOT EXISTS idx_conversation_summaries_window_updated ON conversation_summaries (updated_at, id)
    WHERE summary_type = 'time_window';
