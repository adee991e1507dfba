-- Hold metadata integrity, step 1 of 2 (transactional; the index is step 2, 0004b).
-- Safe on a live, busy holds table: see docs/holds-rollout.md for what each statement locks.
-- depends: 0002_capacity

-- Give up instead of queueing: an ACCESS EXCLUSIVE request waiting behind a long transaction
-- would stall every reader and writer of holds queued after it. A timeout fails the migration
-- cleanly; run `migrate` again.
SET LOCAL lock_timeout = '3s';

-- An active hold's metadata must at least be a JSON object (not null, a string such as
-- double-encoded JSON, or an array). NOT VALID: enforced at once for every insert and update,
-- existing rows are not scanned here. `holds backfill` validates it once no active hold breaks
-- it. Everything finer (keys, ids, hashes) is the validator's job in Python.
ALTER TABLE holds
    ADD CONSTRAINT holds_active_metadata_object
    CHECK (status <> 'active' OR jsonb_typeof(metadata) = 'object') NOT VALID;

-- What `holds backfill` changed, one row per hold it repaired or released: the metadata it
-- replaced and the validator's problems with it. No foreign key to holds: adding one would
-- lock holds (SHARE ROW EXCLUSIVE) and holds are never deleted.
CREATE TABLE hold_metadata_repairs (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id             uuid NOT NULL,
    hold_id            uuid NOT NULL,
    venue_id           uuid NOT NULL,
    action             text NOT NULL CHECK (action IN ('repaired', 'released')),
    reason             text NOT NULL,
    policy_revision_id bigint,
    problems           jsonb NOT NULL,
    previous_metadata  jsonb NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hold_metadata_repairs_hold_idx ON hold_metadata_repairs (hold_id);
CREATE INDEX hold_metadata_repairs_run_idx ON hold_metadata_repairs (run_id);
