"""Producer cost: ``send_booking_email.send()`` against a raw no-op actor's ``.send()``.

Both send to the same Redis (AOF on, as in production) from the same process, in alternating
batches, so that machine noise hits both alike. Ours includes payload validation, the
``email-queue-enabled`` evaluation by the Unleash SDK (a real Unleash server when it can be
started here, else the environment default, said in the results), the request's record in
Postgres (one statement on a pooled autocommit connection) and the metrics. The raw baseline
sends the same two arguments. The record is also timed alone, so that the ratio without it is
reported beside the whole. Target: at most 1.3x the raw time per call (set before requests were
recorded; the record is the price of recovering every email from Postgres).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.common import (
    figure,
    md_table,
    median,
    run_cli,
    save_png,
    say,
    servers,
    service_app,
    verdict,
    write_json,
)

NAME = "producer"
TARGET_RATIO = 1.3
TYPES = ("request_received", "confirmed", "updated", "cancelled")


def _start_unleash(pg: Any) -> tuple[Any, str, dict[str, str]]:
    """A real Unleash with ``email-queue-enabled`` on: (server or None, how flags are
    evaluated, the settings that point the service at it)."""
    try:
        from harness.unleash import UnleashServer

        server = UnleashServer.start_new(pg, timeout=180)
    except Exception as error:
        say(f"no Unleash server ({type(error).__name__}); flags come from the environment default")
        return None, "environment default (Unleash could not be started)", {}
    server.ensure_toggle("email-queue-enabled", True)
    settings = {
        "UNLEASH_URL": server.url,
        "UNLEASH_API_TOKEN": server.client_token,
        "UNLEASH_ENVIRONMENT": "development",
    }
    return server, "Unleash SDK, local evaluation against a real Unleash server", settings


def _timed_batch(call: Callable[[int], Any], n: int) -> float:
    """Seconds per call over ``n`` calls."""
    start = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - start) / n


def run(quick: bool = False) -> dict[str, Any]:
    rounds, batch = (7, 300) if quick else (21, 1000)
    with servers(postgres=True, redis=True, smtp=False) as found:
        assert found.pg is not None and found.redis is not None
        unleash, flag_source, flag_settings = _start_unleash(found.pg)
        if unleash is not None:
            found.stack.callback(unleash.destroy)
        import redis

        from bench.stock_actors import declare, stock_broker
        from service.actors.emails import send_booking_email
        from service.emails import deliveries
        from service.emails.models import EmailPayload
        from service.emails.rules import EmailType

        app = found.stack.enter_context(service_app({**found.env, **flag_settings}))
        flags = app.flags
        stock = declare(stock_broker(found.redis.url))
        found.stack.callback(stock.broker.close)
        noop = stock.noop
        client = flags.holder.get()
        if client is not None and not client.wait_ready(60):
            raise RuntimeError("the Unleash client did not sync within 60 s")
        statuses, _ = flags.status()
        queue_flag = next(s for s in statuses if s.flag.name == "email-queue-enabled")
        say(f"email-queue-enabled = {queue_flag.value} (source: {queue_flag.source})")
        if not queue_flag.value:
            raise RuntimeError("email-queue-enabled is off: the benchmark would not enqueue")

        r = redis.Redis.from_url(found.redis.url)
        ids = [str(uuid.uuid4()) for _ in range(batch)]

        def ours(i: int) -> None:
            send_booking_email.send(ids[i], TYPES[i % 4])

        def raw(i: int) -> None:
            noop.send(ids[i], TYPES[i % 4])

        def flag_only(i: int) -> None:
            flags.email_queue_enabled()

        def validate_only(i: int) -> None:
            EmailPayload.from_call((ids[i], TYPES[i % 4]), None)

        record_ids = [uuid.uuid4() for _ in range(batch)]

        def record_only(i: int) -> None:
            with app.db.autocommit() as conn:
                deliveries.record_request(conn, record_ids[i], EmailType(TYPES[i % 4]), None, None)

        ours_message = send_booking_email.message_with_options(
            kwargs={"booking_id": ids[0], "type": "confirmed"}
        )
        raw_message = noop.message_with_options(args=(ids[0], "confirmed"))

        def ours_enqueue(i: int) -> None:
            send_booking_email.broker.enqueue(ours_message)

        def raw_enqueue(i: int) -> None:
            noop.broker.enqueue(raw_message)

        extras = {
            "flag": flag_only,
            "validate": validate_only,
            "record": record_only,
            "ours_enqueue": ours_enqueue,
            "raw_enqueue": raw_enqueue,
        }
        for fn in (ours, raw, *extras.values()):  # warm up connections, caches, scripts
            _timed_batch(fn, min(batch, 300))
        r.flushdb()
        with app.db.autocommit() as conn:
            conn.execute("DELETE FROM email_deliveries")

        samples: dict[str, list[float]] = {"ours": [], "raw": [], **{k: [] for k in extras}}
        ratios: list[float] = []
        for k in range(rounds):
            order = [("raw", raw), ("ours", ours)] if k % 2 == 0 else [("ours", ours), ("raw", raw)]
            per_call = {label: _timed_batch(fn, batch) for label, fn in order}
            samples["ours"].append(per_call["ours"])
            samples["raw"].append(per_call["raw"])
            ratios.append(per_call["ours"] / per_call["raw"])
            for label, fn in extras.items():
                samples[label].append(_timed_batch(fn, batch))
            r.flushdb()
            with app.db.autocommit() as conn:  # the next round records the same ids again
                conn.execute("DELETE FROM email_deliveries")
            say(
                f"round {k + 1}/{rounds}: ours {per_call['ours'] * 1e6:.0f} us, "
                f"raw {per_call['raw'] * 1e6:.0f} us, ratio {ratios[-1]:.2f}"
            )
        send_booking_email.send(ids[0], "confirmed")
        enqueued_ok = r.llen("dramatiq:pending-booking-emails") == 1
        if client is not None:
            flags.stop(2.0)

    us = {key: [v * 1e6 for v in values] for key, values in samples.items()}
    ratio = median(ratios)
    result = {
        "target_ratio_max": TARGET_RATIO,
        "rounds": rounds,
        "calls_per_round": batch,
        "flag_evaluation": flag_source,
        "us_per_call": {key: {"median": median(v), "samples": v} for key, v in us.items()},
        "ratio_ours_to_raw": {"median": ratio, "samples": ratios},
        "ratio_ours_without_record_to_raw": (median(us["ours"]) - median(us["record"]))
        / median(us["raw"]),
        "met": ratio <= TARGET_RATIO,
        "checked_message_lands_on_queue": enqueued_ok,
    }
    write_json(NAME, result)
    _chart(us, ratios)
    return result


def _chart(us: dict[str, list[float]], ratios: list[float]) -> None:
    fig, (left, right) = figure(ncols=2, width=5.5)
    labels = [
        "raw\n.send()",
        "ours\n.send()",
        "flag\nevaluation",
        "payload\nvalidation",
        "request\nrecord",
        "our broker\nenqueue",
        "stock broker\nenqueue",
    ]
    keys = ["raw", "ours", "flag", "validate", "record", "ours_enqueue", "raw_enqueue"]
    left.boxplot([us[k] for k in keys], showfliers=False)
    left.set_xticks(range(1, len(keys) + 1), labels, fontsize=7)
    left.set_ylabel("microseconds per call")
    left.set_title("Producer cost per call (each round's mean)")
    right.plot(range(1, len(ratios) + 1), ratios, marker="o", label="ours / raw")
    right.axhline(TARGET_RATIO, color="red", linestyle="--", label=f"target {TARGET_RATIO}x")
    right.set_xlabel("round")
    right.set_ylabel("ratio")
    right.set_ylim(bottom=0)
    right.legend()
    right.set_title("Side-by-side ratio per round")
    save_png(NAME, fig)


def markdown(result: dict[str, Any]) -> str:
    us = result["us_per_call"]
    rows = [
        ["raw no-op actor `.send()`", f"{us['raw']['median']:.0f} µs", ""],
        ["`send_booking_email.send()`", f"{us['ours']['median']:.0f} µs", ""],
        ["  of which flag evaluation alone", f"{us['flag']['median']:.1f} µs", ""],
        ["  of which payload validation alone", f"{us['validate']['median']:.1f} µs", ""],
        [
            "  of which the request's record in Postgres alone (one statement)",
            f"{us['record']['median']:.0f} µs",
            "",
        ],
        ["our broker's `enqueue` of a built message", f"{us['ours_enqueue']['median']:.0f} µs", ""],
        [
            "stock broker's `enqueue` of a built message",
            f"{us['raw_enqueue']['median']:.0f} µs",
            "",
        ],
        [
            "**ratio ours / raw**",
            f"**{result['ratio_ours_to_raw']['median']:.2f}x**",
            f"≤ {TARGET_RATIO}x: {verdict(result['met'])}",
        ],
        [
            "ratio (ours - record alone) / raw",
            f"{result['ratio_ours_without_record_to_raw']:.2f}x",
            "",
        ],
    ]
    return (
        "### 1. Producer: `send_booking_email.send()` vs a raw actor's `.send()`\n\n"
        f"Median over {result['rounds']} alternating rounds of {result['calls_per_round']} calls "
        f"each, same Redis; flags: {result['flag_evaluation']}.\n\n"
        + md_table(["measure", "median", "target"], rows)
        + "\n\n![producer](producer.png)\n"
    )


def main() -> None:
    run_cli(__doc__, NAME, run, markdown)


if __name__ == "__main__":
    main()
