-- The operator console's audit log: one row for every action an operator or viewer takes
-- (replay, purge, requeue, lookups by guest email, logins), with its outcome. Items are ids
-- (message ids, event ids, booking ids), never guest data.
-- depends: 0006_outbox_dead_targets

CREATE TABLE console_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    role        text NOT NULL,
    action      text NOT NULL,
    items       text[] NOT NULL DEFAULT '{}',
    outcome     text NOT NULL,
    detail      text,
    client_addr text
);
CREATE INDEX console_audit_at_idx ON console_audit (at DESC);
