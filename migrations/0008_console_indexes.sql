-- Indexes for the console and `recap status` (one status snapshot, src/status.rs), so neither reads every row of a
-- table that grows by one row per window:
-- * windows that are not done (due, too_short, dead) are counted exactly from a partial index; `done`, nearly all
--   of a large table, is derived from the table's size estimate (see `Store::window_states`);
-- * LLM spend today / per day and summaries written per hour read a range of `updated_at` (index-only, with the cost
--   and the summary type included).
CREATE INDEX IF NOT EXISTS idx_recap_windows_not_done ON recap_windows (state) WHERE state <> 'done';
CREATE INDEX IF NOT EXISTS idx_conversation_summaries_updated
    ON conversation_summaries (updated_at) INCLUDE (cost_usd, summary_type);
