-- Venues, the bookings we read at send time, and one delivery record per booking email.

CREATE TABLE venues (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    timezone     text NOT NULL DEFAULT 'UTC',
    admin_emails text[] NOT NULL DEFAULT '{}',
    webhook_url  text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bookings (
    id                uuid PRIMARY KEY,
    venue_id          uuid NOT NULL REFERENCES venues (id),
    status            text NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled')),
    guest_name        text NOT NULL,
    guest_email       text NOT NULL,
    party_size        integer NOT NULL CHECK (party_size > 0),
    starts_at         timestamptz NOT NULL,
    locale            text NOT NULL DEFAULT 'en',
    notes             text,
    needs_attention   boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    status_changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bookings_status_changed_idx ON bookings (status_changed_at);

-- No foreign key on booking_id: a message for a booking that never became visible still
-- gets a row recording why it died.
CREATE TABLE email_deliveries (
    booking_id      uuid NOT NULL,
    email_type      text NOT NULL
                    CHECK (email_type IN ('request_received', 'confirmed', 'updated', 'cancelled')),
    state           text NOT NULL CHECK (state IN ('pending', 'retrying', 'sent', 'skipped', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    skip_reason     text,
    message_id      text,
    scheduled_for   timestamptz,
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    PRIMARY KEY (booking_id, email_type)
);
CREATE INDEX email_deliveries_open_idx ON email_deliveries (next_attempt_at)
    WHERE state IN ('pending', 'retrying');
