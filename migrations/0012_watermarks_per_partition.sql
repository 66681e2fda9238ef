-- Ingest partitioned by user (NATS_PARTITION_BY=user, issue 18): one bot's events reach every partition, and each
-- partition's watermark of the bot is its own (a partition that restores another's, higher one would close its
-- windows early). The watermark row is per (bot, partition); by bot a bot has one partition, as before (part 0 when
-- unpartitioned).
ALTER TABLE recap_watermarks ADD COLUMN IF NOT EXISTS part INT NOT NULL DEFAULT 0;
ALTER TABLE recap_watermarks DROP CONSTRAINT IF EXISTS recap_watermarks_pkey;
ALTER TABLE recap_watermarks ADD PRIMARY KEY (bot_name, part);

-- A snapshot row records the partition layout it was written under ('1', 'bot/8', 'user/8'). A partition restores
-- its own rows of the current layout by index, and of any other layout (the partition count or key changed since)
-- every row whose key it owns now, so a key's open messages follow it to its new partition.
ALTER TABLE recap_open_windows ADD COLUMN IF NOT EXISTS layout TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS idx_recap_open_windows_layout ON recap_open_windows (layout, part);
