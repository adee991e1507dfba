-- Capacity: versioned policies, table slots, holds and table assignments.
-- Policy versions and adjacency hashes are computed by the application (service.capacity.policy)
-- and only stored here; nothing in SQL recomputes them.
-- depends: 0001_core

-- Every change to a venue's policy is a new revision; revisions are never updated.
CREATE TABLE capacity_policy_revisions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    venue_id       uuid NOT NULL REFERENCES venues (id),
    revision       integer NOT NULL CHECK (revision > 0),
    version        text NOT NULL,
    adjacency_hash text NOT NULL,
    policy         jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (venue_id, revision),
    UNIQUE (id, venue_id)
);
CREATE INDEX capacity_policy_revisions_version_idx
    ON capacity_policy_revisions (venue_id, version);

-- The revision in force for each venue.
CREATE TABLE capacity_current_policies (
    venue_id    uuid PRIMARY KEY REFERENCES venues (id),
    revision_id bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (revision_id, venue_id) REFERENCES capacity_policy_revisions (id, venue_id)
);

-- A stable integer per (venue, table id): the exclusion constraint below ranges over it.
CREATE TABLE capacity_table_slots (
    slot     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    venue_id uuid NOT NULL REFERENCES venues (id),
    table_id text NOT NULL,
    UNIQUE (venue_id, table_id),
    UNIQUE (venue_id, table_id, slot)
);

CREATE TABLE holds (
    id                 uuid PRIMARY KEY,
    booking_id         uuid NOT NULL REFERENCES bookings (id),
    venue_id           uuid NOT NULL REFERENCES venues (id),
    table_ids          text[] NOT NULL CHECK (cardinality(table_ids) > 0),
    starts_at          timestamptz NOT NULL,
    ends_at            timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    status             text NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'consumed', 'released')),
    metadata           jsonb NOT NULL,
    policy_revision_id bigint REFERENCES capacity_policy_revisions (id),
    replaced_by        uuid REFERENCES holds (id),
    release_reason     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    consumed_at        timestamptz,
    released_at        timestamptz,
    CHECK (ends_at > starts_at),
    CHECK ((status = 'consumed') = (consumed_at IS NOT NULL)),
    CHECK ((status = 'released') = (released_at IS NOT NULL))
);
CREATE INDEX holds_active_idx ON holds (venue_id, starts_at) WHERE status = 'active';
CREATE INDEX holds_booking_idx ON holds (booking_id);

-- One row per table of a confirmed booking. The exclusion constraint is the guarantee that no
-- table is assigned to two overlapping bookings, whatever the application does: it uses only
-- the built-in GiST range operator classes (no btree_gist).
CREATE TABLE table_assignments (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    booking_id  uuid NOT NULL REFERENCES bookings (id),
    hold_id     uuid NOT NULL REFERENCES holds (id),
    venue_id    uuid NOT NULL,
    table_id    text NOT NULL,
    table_slot  bigint NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    released_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at),
    FOREIGN KEY (venue_id, table_id, table_slot)
        REFERENCES capacity_table_slots (venue_id, table_id, slot),
    CONSTRAINT table_assignments_no_overlap EXCLUDE USING gist (
        int8range(table_slot, table_slot + 1) WITH &&,
        tstzrange(starts_at, ends_at) WITH &&
    ) WHERE (released_at IS NULL)
);
CREATE INDEX table_assignments_venue_idx ON table_assignments (venue_id, starts_at)
    WHERE released_at IS NULL;
CREATE INDEX table_assignments_booking_idx ON table_assignments (booking_id);
