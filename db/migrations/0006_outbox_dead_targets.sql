-- Per-target outcomes of outbox events: each target (one admin address, the webhook) that will
-- not be delivered, with the reason. A retry skips these; requeue clears them. Adding a column
-- with a constant default is a catalog-only change (no table rewrite).
-- depends: 0003_outbox

ALTER TABLE outbox_events ADD COLUMN dead_targets jsonb NOT NULL DEFAULT '{}'::jsonb;
