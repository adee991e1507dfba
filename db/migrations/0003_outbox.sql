-- Transactional outbox: events written in the same transaction as the state change they
-- announce, delivered at least once by the relay (python -m service outbox relay).
-- depends: 0001_core

CREATE TABLE outbox_events (
    id                uuid PRIMARY KEY,
    event_type        text NOT NULL,
    dedupe_key        text NOT NULL UNIQUE,
    venue_id          uuid,
    payload           jsonb NOT NULL,
    status            text NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    locked_until      timestamptz,
    claim_token       uuid,
    delivered_targets text[] NOT NULL DEFAULT '{}',
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    dead_at           timestamptz,
    CHECK ((status = 'delivered') = (delivered_at IS NOT NULL)),
    CHECK ((status = 'dead') = (dead_at IS NOT NULL))
);
CREATE INDEX outbox_events_due_idx ON outbox_events (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_events_dead_idx ON outbox_events (dead_at) WHERE status = 'dead';
