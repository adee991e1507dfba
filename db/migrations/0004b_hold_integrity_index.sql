-- Hold metadata integrity, step 2 of 2: the index the backfill and the audit scan active holds
-- by. Built CONCURRENTLY (SHARE UPDATE EXCLUSIVE: reads and writes of holds go on), which
-- cannot run inside a transaction block.
-- transactional: false
-- depends: 0004_hold_integrity

-- A build interrupted before yoyo recorded this migration leaves an INVALID index behind that
-- IF NOT EXISTS would keep; drop it (also concurrently) and build again.
DROP INDEX CONCURRENTLY IF EXISTS holds_active_id_idx;

CREATE INDEX CONCURRENTLY holds_active_id_idx ON holds (id) WHERE status = 'active';
