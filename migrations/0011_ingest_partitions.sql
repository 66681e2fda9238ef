-- Partitioned ingest (issue 18): one lease row per ingest partition in recap_leader (id = partition + 1; the
-- unpartitioned leader is id 1 as before), and a heartbeat per replica taking part in ingest, so each can take its
-- fair share of the partitions (ceil(partitions / live replicas)).
ALTER TABLE recap_leader DROP CONSTRAINT IF EXISTS recap_leader_id_check;
ALTER TABLE recap_leader ADD CONSTRAINT recap_leader_id_positive CHECK (id >= 1);

CREATE TABLE IF NOT EXISTS recap_ingest_members (
    instance TEXT PRIMARY KEY,
    seen_until TIMESTAMPTZ NOT NULL
);
