-- A durable record of every dead-lettered message: the broker keeps its copy for 7 days only.

CREATE TABLE dead_letters (
    message_id  text PRIMARY KEY,
    queue_name  text NOT NULL,
    actor_name  text NOT NULL,
    message     jsonb NOT NULL,
    reason      text NOT NULL,
    error       text,
    email_type  text,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz,
    purged_at   timestamptz
);
CREATE INDEX dead_letters_open_idx ON dead_letters (queue_name, failed_at)
    WHERE replayed_at IS NULL AND purged_at IS NULL;
