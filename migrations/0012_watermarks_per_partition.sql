-- Ingest partitioned by user (NATS_PARTITION_BY=user, issue 18): one bot's events reach every partition, and each
-- partition's watermark of the bot is its own (a partition that restores another's, higher one would close its
-- windows early). The watermark row is per (bot, partition); by bot a bot has one partition, as before (part 0 when
-- unpartitioned).
ALTER TABLE recap_watermarks ADD COLUMN IF NOT EXISTS part INT NOT NULL DEFAULT 0;
ALTER TABLE recap_watermarks DROP CONSTRAINT IF EXISTS recap_watermarks_pkey;
ALTER TABLE recap_watermarks ADD PRIMARY KEY (bot_name, part);
