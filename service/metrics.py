"""Every metric the service exports, defined in one place.

Counters and histograms work in Prometheus multiprocess mode (PROMETHEUS_MULTIPROC_DIR set
before the workers fork). Values read from the broker or the database at scrape time are
declared here too (``ScrapeGauge``) and filled in by the collectors of ``service.observability``.
The docs/metrics.md page lists each metric with its labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

EMAILS = Counter(
    "booking_emails_total",
    "Booking emails by type and outcome "
    "(sent, sent_immediate, skipped, duplicate, superseded, in_progress, retried, failed, dead).",
    ["type", "outcome"],
)
EMAIL_SEND_SECONDS = Histogram(
    "booking_email_send_seconds",
    "Time to load, render and hand one booking email to SMTP.",
    ["type"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EMAIL_PRODUCER_DECISIONS = Counter(
    "booking_email_producer_decisions_total",
    "What send_booking_email.send() did: queued, immediate_flag_off, immediate_broker_down, "
    "recorded_pending; unrecorded: sent on without a request row (Postgres unreachable).",
    ["decision"],
)
REENQUEUE_FAILURES = Counter(
    "booking_email_reenqueue_failures_total",
    "Retries whose re-enqueue failed (broker unreachable); the delivery row keeps them for "
    "the reconciler.",
)
REQUEUED_AFTER_RECONNECT = Counter(
    "booking_redis_requeued_after_reconnect_total",
    "Messages a worker had fetched from Redis and lost from memory with a dropped connection "
    "(delayed messages and retries, mostly), returned to their queue when it reconnected.",
    ["queue"],
)
RECONCILER_REQUEUED = Counter(
    "booking_reconciler_requeued_total",
    "Emails the reconciler enqueued again because no delivery completed.",
    ["type", "reason"],
)
OUTBOX_EVENTS = Counter(
    "booking_outbox_events_total",
    "Outbox events by type and outcome (delivered, retried, dead).",
    ["event_type", "outcome"],
)
POLICY_DRIFT = Counter(
    "booking_policy_drift_total",
    "Policy drift at confirmation by outcome (detected, recovered, escalated).",
    ["outcome"],
)
CONFIRMATIONS = Counter(
    "booking_confirmations_total",
    "Hold confirmations by outcome (confirmed, recovered, escalated, rejected).",
    ["outcome"],
)
HOLDS_REJECTED = Counter(
    "booking_holds_rejected_total",
    "Holds rejected at creation or confirmation, by error code.",
    ["reason"],
)
CONFIRM_INCOMPLETE_METADATA = Counter(
    "booking_confirmations_incomplete_metadata_total",
    "Confirmations attempted on a hold with incomplete metadata (should stay at zero).",
)
FLAG_ENABLED = Gauge(
    "booking_flag_enabled",
    "Last evaluated value of each feature flag (1 on, 0 off).",
    ["flag"],
    multiprocess_mode="liveall",
)
DEAD_LETTERS_RECORDED = Counter(
    "booking_dead_letters_recorded_total",
    "Messages recorded as dead letters in Postgres, by queue and reason.",
    ["queue", "reason"],
)
OUTBOX_RECIPIENTS = Counter(
    "booking_outbox_recipients_total",
    "Outbox email recipients per delivery attempt, by outcome (delivered, deferred: will be "
    "retried, refused: dead for that recipient).",
    ["outcome"],
)
for _outcome in ("delivered", "deferred", "refused"):
    OUTBOX_RECIPIENTS.labels(_outcome)
SMTP_AUTH_FAILURES = Counter(
    "booking_smtp_auth_failures_total",
    "SMTP servers refusing our credentials (535, or AUTH required but refused): a configuration "
    "error, never retried.",
)


# -- read at scrape time (by the collectors in service.observability.collectors) -------------


@dataclass(frozen=True)
class ScrapeGauge:
    """A gauge whose value is read from the broker, Postgres or heartbeat records per scrape."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()

    def family(self, value: float | None = None) -> GaugeMetricFamily:
        """A fresh family to fill in this scrape (``value`` when it has no labels)."""
        if self.labels:
            return GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        return GaugeMetricFamily(self.name, self.documentation, value=value)


QUEUE_DEPTH = ScrapeGauge(
    "booking_queue_depth",
    "Messages per queue and state (ready, in_flight, delayed, dead), read at scrape time.",
    ("queue", "state"),
)
QUEUE_OLDEST_AGE = ScrapeGauge(
    "booking_queue_oldest_message_age_seconds",
    "Age of the oldest ready message of the queue; 0 when none is ready.",
    ("queue",),
)
OUTBOX_PENDING = ScrapeGauge("booking_outbox_pending", "Outbox events not yet delivered.")
OUTBOX_OLDEST_AGE = ScrapeGauge(
    "booking_outbox_oldest_age_seconds",
    "Age of the oldest undelivered outbox event; 0 when none is pending.",
)
HOLDS_INVALID_ACTIVE = ScrapeGauge(
    "booking_holds_invalid_active",
    "Active (unexpired, unconfirmed) holds whose metadata fails validation.",
)
COLLECTOR_UP = ScrapeGauge(
    "booking_collector_up",
    "1 when the scrape-time collector answered in this scrape, else 0.",
    ("collector",),
)
COLLECTOR_DURATION = ScrapeGauge(
    "booking_collector_duration_seconds",
    "How long the scrape-time collector took in this scrape.",
    ("collector",),
)
COLLECTOR_ERRORS_NAME = "booking_collector_errors"
COLLECTOR_ERRORS_HELP = (
    "Scrape-time collections that failed or timed out, since the exposition server started."
)


def heartbeat_gauge(role: str) -> ScrapeGauge:
    """``booking_<role>_last_heartbeat_timestamp_seconds`` (role: worker, relay)."""
    return ScrapeGauge(
        f"booking_{role}_last_heartbeat_timestamp_seconds",
        f"Unix time of the last heartbeat of each {role} process of this pod.",
        ("pid",),
    )
