-- Revision-aware booking emails: every guest-visible change of a booking gets a new revision,
-- and every email request is one row per (booking, email type, revision); history is kept.
-- Adding columns with constant defaults is a catalog-only change (no table rewrite).
-- depends: 0001_core 0006_outbox_dead_targets

ALTER TABLE bookings ADD COLUMN revision bigint NOT NULL DEFAULT 1;

-- A real change of a guest-visible column bumps the revision, unless the UPDATE itself set a
-- higher one (a booking service keeping its own version may write it); it never goes back.
CREATE FUNCTION bookings_bump_revision() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.revision > OLD.revision THEN
        RETURN NEW;
    END IF;
    IF (NEW.status, NEW.starts_at, NEW.party_size, NEW.guest_name, NEW.guest_email, NEW.notes,
        NEW.locale, NEW.venue_id)
       IS DISTINCT FROM
       (OLD.status, OLD.starts_at, OLD.party_size, OLD.guest_name, OLD.guest_email, OLD.notes,
        OLD.locale, OLD.venue_id) THEN
        NEW.revision := OLD.revision + 1;
    ELSE
        NEW.revision := OLD.revision;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER bookings_revision BEFORE UPDATE ON bookings
    FOR EACH ROW EXECUTE FUNCTION bookings_bump_revision();

-- Existing rows get revision 1, the revision every existing booking now has, so they keep
-- de-duplicating the messages of before this migration (which carry no revision). Revision 0
-- is a request recorded while its booking was not visible yet; the worker resolves it.
ALTER TABLE email_deliveries
    ADD COLUMN revision bigint NOT NULL DEFAULT 1 CHECK (revision >= 0),
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN lease_token uuid,
    ADD COLUMN superseded_by bigint,
    ADD COLUMN requested_at timestamptz;
ALTER TABLE email_deliveries
    ALTER COLUMN revision DROP DEFAULT,
    ALTER COLUMN requested_at SET DEFAULT now();

ALTER TABLE email_deliveries DROP CONSTRAINT email_deliveries_pkey;
ALTER TABLE email_deliveries ADD PRIMARY KEY (booking_id, email_type, revision);

ALTER TABLE email_deliveries DROP CONSTRAINT email_deliveries_state_check;
ALTER TABLE email_deliveries ADD CONSTRAINT email_deliveries_state_check
    CHECK (state IN ('pending', 'sending', 'retrying', 'sent', 'skipped', 'superseded', 'dead'));
ALTER TABLE email_deliveries ADD CONSTRAINT email_deliveries_superseded_check
    CHECK ((state = 'superseded') = (superseded_by IS NOT NULL));

-- The reconciler scans the open rows only.
DROP INDEX email_deliveries_open_idx;
CREATE INDEX email_deliveries_open_idx ON email_deliveries (state, updated_at)
    WHERE state IN ('pending', 'sending', 'retrying');
