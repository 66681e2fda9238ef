-- recap's own state. Additive only: new columns on conversation_summaries are nullable or defaulted, so rows
-- written by the old worker survive untouched.

ALTER TABLE conversation_summaries
    ADD COLUMN IF NOT EXISTS revision INTEGER NOT NULL DEFAULT 1,
    ADD COLUMN IF NOT EXISTS summarizer VARCHAR(20),
    ADD COLUMN IF NOT EXISTS model VARCHAR(200),
    ADD COLUMN IF NOT EXISTS prompt_tokens INTEGER,
    ADD COLUMN IF NOT EXISTS completion_tokens INTEGER,
    ADD COLUMN IF NOT EXISTS llm_latency_ms INTEGER,
    ADD COLUMN IF NOT EXISTS cost_usd DOUBLE PRECISION,
    ADD COLUMN IF NOT EXISTS coverage VARCHAR(64);

-- One row per window, keyed by (bot, user, start). The tracker closes windows into here; workers claim them
-- with a lease and finish them (done / too_short / dead) in the transaction that writes the summary row.
CREATE TABLE IF NOT EXISTS recap_windows (
    id BIGSERIAL PRIMARY KEY,
    bot_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    start_ts TIMESTAMPTZ NOT NULL,
    end_ts TIMESTAMPTZ NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('due', 'done', 'too_short', 'dead')),
    message_count INTEGER NOT NULL,
    -- bumped whenever messages are added to a closed window (a late message); a worker's result only lands if the
    -- version it read is still current.
    version INTEGER NOT NULL DEFAULT 1,
    -- summary revisions written for this window (1 after the first summary).
    revision INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before TIMESTAMPTZ,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    last_error TEXT,
    summary_id INTEGER,
    coverage VARCHAR(64),
    closed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    CONSTRAINT uq_recap_windows_key UNIQUE (bot_name, user_id, start_ts)
);
CREATE INDEX IF NOT EXISTS idx_recap_windows_due ON recap_windows (not_before, id) WHERE state = 'due';
CREATE INDEX IF NOT EXISTS idx_recap_windows_key_time ON recap_windows (bot_name, user_id, start_ts, end_ts);

-- Every message recap has seen, once (the primary key makes redeliveries and duplicate sweeps no-ops).
-- window_id IS NULL: the message is in an open window (the tracker's state, rebuilt from here on start).
CREATE TABLE IF NOT EXISTS recap_messages (
    bot_name TEXT NOT NULL,
    point_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    window_id BIGINT REFERENCES recap_windows (id),
    PRIMARY KEY (bot_name, point_id)
);
CREATE INDEX IF NOT EXISTS idx_recap_messages_window ON recap_messages (window_id);
CREATE INDEX IF NOT EXISTS idx_recap_messages_open ON recap_messages (bot_name, user_id, ts) WHERE window_id IS NULL;

-- Event-time watermark per bot (monotonic).
CREATE TABLE IF NOT EXISTS recap_watermarks (
    bot_name TEXT PRIMARY KEY,
    watermark TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Source positions: the JetStream stream sequence last committed, and the sweep's high-water mark per collection.
CREATE TABLE IF NOT EXISTS recap_checkpoints (
    name TEXT PRIMARY KEY,
    position DOUBLE PRECISION NOT NULL,
    points_read BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

-- Input recap could not use: raw bytes and the reason.
CREATE TABLE IF NOT EXISTS recap_dead_letters (
    id BIGSERIAL PRIMARY KEY,
    source TEXT NOT NULL,
    subject TEXT,
    stream_seq BIGINT,
    raw BYTEA NOT NULL,
    reason TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE UNIQUE INDEX IF NOT EXISTS uq_recap_dead_letters_seq ON recap_dead_letters (source, stream_seq)
    WHERE stream_seq IS NOT NULL;

-- Single-writer fencing for the ingest side (tracker + sources). Every ingest transaction renews the lease by
-- epoch; a replica that lost it cannot commit.
CREATE TABLE IF NOT EXISTS recap_leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
