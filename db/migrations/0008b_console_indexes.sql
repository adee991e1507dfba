-- The console's lookups: bookings by guest email (case-insensitive) and dead letters by the
-- booking they were for. Built CONCURRENTLY (reads and writes go on), which cannot run inside a
-- transaction block; an interrupted build's INVALID index is dropped and built again.
-- transactional: false
-- depends: 0008_console_audit

DROP INDEX CONCURRENTLY IF EXISTS bookings_guest_email_idx;
CREATE INDEX CONCURRENTLY bookings_guest_email_idx ON bookings (lower(guest_email));

DROP INDEX CONCURRENTLY IF EXISTS dead_letters_booking_idx;
CREATE INDEX CONCURRENTLY dead_letters_booking_idx
    ON dead_letters ((message -> 'kwargs' ->> 'booking_id'));
