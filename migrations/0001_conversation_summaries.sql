-- The table the bots already read (see ../shared/whisperengine-data.md). Created exactly as the existing deployments
-- have it; on a database that already has it, every statement here is a no-op and no row is touched.
CREATE TABLE IF NOT EXISTS conversation_summaries (
    id SERIAL PRIMARY KEY,
    user_id VARCHAR(255) NOT NULL,
    bot_name VARCHAR(100) NOT NULL,
    summary_text TEXT NOT NULL,
    summary_type VARCHAR(50) DEFAULT 'time_window',
    start_timestamp TIMESTAMP NOT NULL,
    end_timestamp TIMESTAMP NOT NULL,
    message_count INTEGER NOT NULL,
    key_topics TEXT[],
    emotional_tone VARCHAR(50),
    compression_ratio FLOAT,
    confidence_score FLOAT DEFAULT 0.5,
    enrichment_version VARCHAR(20) DEFAULT 'v1.0',
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW(),
    CONSTRAINT uq_conversation_summaries_window UNIQUE (user_id, bot_name, start_timestamp, end_timestamp)
);

-- An existing table missing the window constraint gets it (recap's upserts rely on it).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conname = 'uq_conversation_summaries_window'
          AND conrelid = 'conversation_summaries'::regclass
    ) THEN
        ALTER TABLE conversation_summaries
            ADD CONSTRAINT uq_conversation_summaries_window
            UNIQUE (user_id, bot_name, start_timestamp, end_timestamp);
    END IF;
END $$;

-- The indexes the deployed table has; an existing database may have them under other names, so each is created only
-- when no index on the same columns exists yet (no duplicate indexes after an upgrade).
DO $$
DECLARE
    wanted TEXT[][] := ARRAY[
        ['idx_conversation_summaries_user_bot', 'btree', '(user_id, bot_name)'],
        ['idx_conversation_summaries_time', 'btree', '(start_timestamp, end_timestamp)'],
        ['idx_conversation_summaries_created', 'btree', '(created_at)'],
        ['idx_conversation_summaries_topics', 'gin', '(key_topics)']
    ];
    i INT;
BEGIN
    FOR i IN 1 .. array_length(wanted, 1) LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_indexes
            WHERE tablename = 'conversation_summaries'
              AND indexdef ILIKE '%USING ' || wanted[i][2] || ' ' || wanted[i][3]
        ) THEN
            EXECUTE format('CREATE INDEX %I ON conversation_summaries USING %s %s', wanted[i][1], wanted[i][2], wanted[i][3]);
        END IF;
    END LOOP;
END $$;
