-- Checkpointed operator state (issue 18). Ingest keeps open windows in memory and writes, per checkpoint (each
-- second or CHECKPOINT_MESSAGES messages), one snapshot row per key changed since the last, one row per closed window
-- with its point ids (the coverage), the watermarks and the stream position, in one transaction; acks follow.
-- Messages are no longer written one row each (recap_messages, 2 row writes per message).

-- The open messages of one (bot, user) key, as of the last checkpoint: point ids and their stored times, in time
-- order. A key lives in one ingest partition (`part`), whose owner loads it on takeover.
CREATE TABLE IF NOT EXISTS recap_open_windows (
    bot_name TEXT NOT NULL,
    user_id TEXT NOT NULL,
    part INTEGER NOT NULL DEFAULT 0,
    point_ids TEXT[] NOT NULL,
    point_ts TIMESTAMPTZ[] NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_name, user_id),
    CHECK (cardinality(point_ids) = cardinality(point_ts))
);
CREATE INDEX IF NOT EXISTS idx_recap_open_windows_part ON recap_open_windows (part);

-- A window's coverage: the point ids (and stored times) it was built from, in time order.
ALTER TABLE recap_windows
    ADD COLUMN IF NOT EXISTS point_ids TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS point_ts TIMESTAMPTZ[] NOT NULL DEFAULT '{}';

-- Carry the message-per-row state over: open messages become snapshot rows, assigned ones their window's coverage.
INSERT INTO recap_open_windows (bot_name, user_id, part, point_ids, point_ts)
SELECT bot_name, user_id, 0, array_agg(point_id ORDER BY ts, point_id), array_agg(ts ORDER BY ts, point_id)
FROM recap_messages WHERE window_id IS NULL
GROUP BY bot_name, user_id
ON CONFLICT (bot_name, user_id) DO NOTHING;

UPDATE recap_windows w SET point_ids = m.ids, point_ts = m.ts
FROM (SELECT window_id, array_agg(point_id ORDER BY ts, point_id) AS ids, array_agg(ts ORDER BY ts, point_id) AS ts
      FROM recap_messages WHERE window_id IS NOT NULL GROUP BY window_id) m
WHERE w.id = m.window_id;

DROP TABLE recap_messages;

-- What recap_messages showed, read from the state that replaced it (operators' queries and tests keep working):
-- one row per message, window_id NULL while its window is open.
CREATE VIEW recap_messages AS
    SELECT o.bot_name, p.point_id, o.user_id, p.ts, NULL::bigint AS window_id
    FROM recap_open_windows o CROSS JOIN LATERAL unnest(o.point_ids, o.point_ts) AS p(point_id, ts)
    UNION ALL
    SELECT w.bot_name, p.point_id, w.user_id, p.ts, w.id
    FROM recap_windows w CROSS JOIN LATERAL unnest(w.point_ids, w.point_ts) AS p(point_id, ts);
