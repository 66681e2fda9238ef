-- Users forgotten through the recall API (`DELETE /v1/users/{bot}/{user_id}`): one tombstone per (bot, user), keyed by
-- a SHA-256 of the bot and the user id (never the id in clear text). The bots' collections keep their points, so the
-- sweep's overlap, a backfill or a stream replay can read the user's old messages again: ingest skips every message of
-- a forgotten user stored at or before `forgotten_at`; later messages start fresh.
CREATE TABLE IF NOT EXISTS recap_forgotten (
    bot_name VARCHAR(100) NOT NULL,
    user_key TEXT NOT NULL,
    forgotten_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_name, user_key)
);
