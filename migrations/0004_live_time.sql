-- Dead letters without a stream sequence (a far-future point, an invalid swept payload) are stored once: the sweep
-- reads their point again every cycle, and the insert checks this index first (not unique: rows stored before this
-- migration may repeat).
CREATE INDEX IF NOT EXISTS idx_recap_dead_letters_raw ON recap_dead_letters (source, md5(raw))
    WHERE stream_seq IS NULL;
