-- Text search over what was said (issue 23): the words of every summarized window, written in the transaction that
-- writes its summary row (`sink::words`), so a word the user said that the summary does not repeat still finds the
-- row (`recall::text_search`). Keyed by the summary row: replaced when the window is summarized again (a revision, a
-- merge), deleted with its row (a merge deletes the later window's row; ON DELETE CASCADE covers every path that
-- deletes rows), and by forget (`recall::USER_TABLES`: bot_name, user_id). Rollup rows have none: they are not
-- windows.
--
-- `words` is `strip(to_tsvector('english', ...))` of the window's distinct words (the text configuration of
-- `recap_summary_tsv`): no positions, each lexeme once, at most `sink::words::MAX_WORDS` words per window, so its
-- size is bounded by the vocabulary, not by the number of messages.
--
-- Rows summarized before this migration have no words (Qdrant holds the messages, not Postgres, so there is no cheap
-- backfill here): they are found by their summary as before until summarized again (`recap resummarize`).
CREATE TABLE IF NOT EXISTS recap_window_words (
    summary_id INTEGER PRIMARY KEY REFERENCES conversation_summaries (id) ON DELETE CASCADE,
    bot_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    words tsvector NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_recap_window_words_user ON recap_window_words (bot_name, user_id);
