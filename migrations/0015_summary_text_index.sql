-- no-transaction
-- Full-text search over summaries (POST /v1/recall/search with `text`, `recall::text_search`): an expression index on
-- the same IMMUTABLE function the search's WHERE clause calls (migration 0006), so Postgres can answer
-- `recap_summary_tsv(summary_text, key_topics) @@ q` from the index instead of computing the tsvector of each of the
-- user's rows. Built CONCURRENTLY (hence no transaction around this file), so an upgrade over a large
-- conversation_summaries does not block the workers' writes while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_conversation_summaries_tsv
    ON conversation_summaries USING gin (recap_summary_tsv(summary_text, key_topics));
