-- Closed points that were stamped far ahead of the clock when read (a bot host whose clock is fast, issue 24 case 1):
-- they were windowed at their arrival time, so a read at their own stamp (the sweep once the clock passed it, a
-- replay, a takeover's first sweep) would not be related to their window by time. A restored ingest state loads the
-- rows younger than a day and treats those points as duplicates. Kept a day past their stored time (`stored_ts`).
CREATE TABLE IF NOT EXISTS recap_clamped_points (
    bot_name TEXT NOT NULL,
    point_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    stored_ts TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (bot_name, point_id)
);
CREATE INDEX IF NOT EXISTS idx_recap_clamped_points_stored ON recap_clamped_points (stored_ts);
