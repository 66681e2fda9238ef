-- Running summaries of open conversations (issue 23: /v1/context). One row per (bot, user) key: the latest running
-- summary of the key's open window (summary text + its coverage) and whether a new one is due. Not
-- conversation_summaries: its readers expect closed windows. A row is the user's data (the forget deletes it).
CREATE TABLE IF NOT EXISTS recap_running_summaries (
    bot_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    -- the open window the summary belongs to: the stored time of its first message
    window_start TIMESTAMPTZ NOT NULL,
    -- coverage: the point ids the summary covers, and the stored time of the last of them (for display); a summary
    -- is valid for a window only while its coverage is a subset of the window's points and every window point stored
    -- at or before covers_until is in it (else it is discarded)
    point_ids TEXT[] NOT NULL DEFAULT '{}',
    covers_until TIMESTAMPTZ,
    message_count INTEGER NOT NULL DEFAULT 0,
    -- the summary itself (NULL until the first one is written)
    summary TEXT,
    key_topics TEXT[] NOT NULL DEFAULT '{}',
    emotional_tone VARCHAR(50),
    confidence DOUBLE PRECISION,
    summarizer VARCHAR(20),
    model VARCHAR(200),
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd DOUBLE PRECISION,
    -- work: the open window's message count that made a new running summary due (NULL: nothing due)
    due_count INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before TIMESTAMPTZ,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ,
    last_error TEXT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_name, user_id)
);
CREATE INDEX IF NOT EXISTS idx_recap_running_summaries_due
    ON recap_running_summaries (not_before) WHERE due_count IS NOT NULL;
