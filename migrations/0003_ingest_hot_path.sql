-- The ingest hot path. recap_messages.window_id is written only by the ingest transaction, with ids it inserted into
-- recap_windows in that same transaction, and windows are never deleted: the foreign key checked nothing the code
-- does not already guarantee, yet cost a lookup and a KEY SHARE lock on recap_windows for every message assigned to a
-- window (a third of the assignment's time in a profile, and a lock that made ingest and a worker finishing the same
-- window wait for each other).
ALTER TABLE recap_messages DROP CONSTRAINT IF EXISTS recap_messages_window_id_fkey;
