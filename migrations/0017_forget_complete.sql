-- Forgetting a user, completely (issue 26).
--
-- 1. Dead letters name their (bot, user) key in columns, filled when they are written (`sink::DeadLetter::bot`,
--    `user_id`), so the forget finds every letter of a user by index instead of searching raw bytes (which missed JSON
--    with escaped non-ASCII ids and the `bot/user/point/ts` and `point/user` bodies of ingest and the sweep). NULL
--    when the letter names none (a body that is not JSON, a field that is not there).
ALTER TABLE recap_dead_letters
    ADD COLUMN IF NOT EXISTS bot_name TEXT,
    ADD COLUMN IF NOT EXISTS user_id TEXT;
CREATE INDEX IF NOT EXISTS idx_recap_dead_letters_user ON recap_dead_letters (user_id, bot_name)
    WHERE user_id IS NOT NULL;

-- The key of the letters stored before this migration, from what can be parsed of their raw bytes.
-- A JSON event (source 'nats'): its "bot" and "user_id" strings, escapes decoded; a body cut at 4 KiB (or otherwise
-- not JSON) by a pattern over the text, each string decoded as JSON.
CREATE FUNCTION pg_temp.recap_dead_letter_field(raw BYTEA, field TEXT) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    body TEXT;
    m TEXT[];
BEGIN
    BEGIN
        body := convert_from(raw, 'UTF8');
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
    BEGIN
        RETURN body::jsonb ->> field;
    EXCEPTION WHEN others THEN
        NULL; -- not a JSON object: try the pattern
    END;
    m := regexp_match(body, '"' || field || '"\s*:\s*"((?:[^"\\]|\\.)*)"');
    IF m IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        RETURN ('"' || m[1] || '"')::jsonb #>> '{}';
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END;
END $$;

CREATE FUNCTION pg_temp.recap_dead_letter_text(raw BYTEA) RETURNS TEXT LANGUAGE plpgsql AS $$
BEGIN
    RETURN convert_from(raw, 'UTF8');
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;

UPDATE recap_dead_letters
SET bot_name = pg_temp.recap_dead_letter_field(raw, 'bot'), user_id = pg_temp.recap_dead_letter_field(raw, 'user_id')
WHERE source = 'nats' AND user_id IS NULL;

-- Ingest's far-future messages: `bot/user/point/ts` (a bot name has no '/', a point id neither; the user id may).
UPDATE recap_dead_letters d SET bot_name = m[1], user_id = m[2]
FROM (SELECT id, regexp_match(pg_temp.recap_dead_letter_text(raw), '^([^/]+)/(.*)/([^/]*)/(-?[0-9]+)$') AS m
      FROM recap_dead_letters WHERE source = 'ingest' AND user_id IS NULL) x
WHERE d.id = x.id AND x.m IS NOT NULL;

-- The sweep's invalid points: `point/user` (a point id has no '/'); the bot is the collection's (`subject`), which
-- only the configuration knows: the forget matches these by the bot's collections.
UPDATE recap_dead_letters d SET user_id = m[2]
FROM (SELECT id, regexp_match(pg_temp.recap_dead_letter_text(raw), '^([^/]*)/(.*)$') AS m
      FROM recap_dead_letters WHERE source = 'sweep' AND user_id IS NULL) x
WHERE d.id = x.id AND x.m IS NOT NULL;

DROP FUNCTION pg_temp.recap_dead_letter_field(BYTEA, TEXT);
DROP FUNCTION pg_temp.recap_dead_letter_text(BYTEA);

-- 2. Tombstones list the forgotten user's points: every point id the bot's collections held for the user when the
--    forget listed them, plus the points recap's rows held. Ingest skips exactly those, whatever their stored time
--    or event time (the rule no longer compares a bot host's clock with Postgres `now()`). NULL in a tombstone written
--    before this migration: it keeps the time rule (`forgotten_at`).
ALTER TABLE recap_forgotten ADD COLUMN IF NOT EXISTS point_ids TEXT[];
