-- Issue 24, cases 11 and 13.
--
-- 1. A replica heartbeats whether it can ingest (its partition sources open and reading); the fair share counts
--    only those, so a replica that heartbeats without reaching NATS (or without a grant) holds no share of the
--    partitions. Rows of replicas older than this migration count, as before.
ALTER TABLE recap_ingest_members ADD COLUMN IF NOT EXISTS can_ingest BOOLEAN NOT NULL DEFAULT true;

-- 2. The partition layout (NATS_PARTITIONS, NATS_PARTITION_BY) whose backlog is in place, per stream: a replica that
--    starts with another layout re-publishes the old layout's unread backlog on the new one's subjects, moves the
--    consumers' positions past it, and only then records the new layout (source/relayout.rs). The row is locked
--    for the whole change, so replicas starting together change it once.
CREATE TABLE IF NOT EXISTS recap_nats_layout (
    stream TEXT PRIMARY KEY,
    layout TEXT NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the stream's last sequence when the layout changed: every consumer of the new layout starts after it
    since_seq BIGINT NOT NULL DEFAULT 0
);
