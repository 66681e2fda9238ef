-- Recall: the read path bots use (GET /v1/recall, POST /v1/recall/search).

-- A (bot, user)'s summaries newest first by start: an index scan, no sort step.
CREATE INDEX IF NOT EXISTS idx_conversation_summaries_recall
    ON conversation_summaries (bot_name, user_id, start_timestamp);

-- Full-text search over a summary's topics (weight A) and text (weight B). IMMUTABLE (explicit configuration), so it
-- can back an expression index if a deployment wants one; recall scans one (bot, user)'s rows, which the index above
-- finds.
CREATE OR REPLACE FUNCTION recap_summary_tsv(summary TEXT, topics TEXT[]) RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT setweight(to_tsvector('english'::regconfig, coalesce(array_to_string(topics, ' '), '')), 'A')
        || setweight(to_tsvector('english'::regconfig, coalesce(summary, '')), 'B')
$$;

-- Which revision of a summary row has its vector in the Qdrant collection `recap_summaries` (point id = row id).
-- The row is the truth: a row whose revision differs from the one here (or that has no entry) has a missing or stale
-- vector, and the repair pass re-syncs it.
CREATE TABLE IF NOT EXISTS recap_summary_vectors (
    summary_id INTEGER PRIMARY KEY,
    bot_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    synced_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_recap_summary_vectors_user ON recap_summary_vectors (bot_name, user_id);
