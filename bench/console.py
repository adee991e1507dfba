"""Console lookups: p99 latency of 50 concurrent booking lookups against 100,000 delivery rows.

Seeds 25,000 bookings with four delivery rows each (100,000 rows in ``email_deliveries``) and a
dead letter for every twentieth booking, starts the console as its own process
(``python -m service console``, one uvicorn process) and runs 50 client threads at once, each
doing lookups by booking id (``GET /bookings/<id>``: the booking, its rows, its dead letters)
and by guest email (``POST /bookings/search``). The baseline, measured in the same run at the
same concurrency, is ``GET /healthz`` (the server and HTTP stack alone). Target: p99 of the
lookups under 200 ms.
"""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg

from bench.common import (
    figure,
    md_table,
    median,
    percentile,
    run_cli,
    save_png,
    say,
    servers,
    verdict,
    write_json,
)
from harness.console import ConsoleServer

NAME = "console"
TARGET_P99_MS = 200.0
CLIENTS = 50
TOKEN = "bench-operator-token-0123456789"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def seed(database_url: str, bookings: int) -> list[tuple[str, str]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO venues (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'Bench')"
        )
        conn.execute(
            """
            INSERT INTO bookings (id, venue_id, status, guest_name, guest_email, party_size, starts_at)
            SELECT md5('b' || i)::uuid, '00000000-0000-0000-0000-000000000001',
                   (ARRAY['pending', 'confirmed', 'cancelled'])[1 + i %% 3], 'Guest ' || i,
                   'guest' || (i %% (%s / 2)) || '@bench.example', 2, now() + interval '3 days'
            FROM generate_series(1, %s) AS i
            """,
            (bookings, bookings),
        )
        conn.execute(
            """
            INSERT INTO email_deliveries
                (booking_id, email_type, revision, state, attempts, message_id, sent_at)
            SELECT b.id, t.email_type, 1, 'sent', 1,
                   '<' || b.id || '.' || t.email_type || '@bench>', now()
            FROM bookings b
            CROSS JOIN unnest(ARRAY['request_received', 'confirmed', 'updated', 'cancelled'])
                 AS t(email_type)
            """
        )
        conn.execute(
            """
            INSERT INTO dead_letters (message_id, queue_name, actor_name, message, reason, email_type)
            SELECT 'bench-' || i, 'pending-booking-emails', 'send_booking_email',
                   jsonb_build_object('message_id', 'bench-' || i,
                                      'kwargs', jsonb_build_object('booking_id', md5('b' || i)::uuid::text,
                                                                   'type', 'confirmed')),
                   'retries_exhausted', 'confirmed'
            FROM generate_series(1, %s, 20) AS i
            """,
            (bookings,),
        )
        conn.execute("ANALYZE")
        rows = conn.execute("SELECT id::text, guest_email FROM bookings").fetchall()
        count = conn.execute("SELECT count(*) FROM email_deliveries").fetchone()
    say(f"seeded {len(rows):,} bookings, {count[0] if count else 0:,} delivery rows")
    return [(r[0], r[1]) for r in rows]


def timed_requests(
    url: str, work: list[tuple[str, str]], kind: str, clients: int
) -> tuple[list[float], int]:
    """Run ``work`` spread over ``clients`` threads; latencies (ms) and non-200 answers."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    chunks = [work[i::clients] for i in range(clients)]
    start = threading.Barrier(clients)

    def client(items: list[tuple[str, str]]) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            match = CSRF.search(http.get("/").text)
            csrf = match.group(1) if match else ""
            start.wait()
            for booking_id, address in items:
                began = time.perf_counter()
                if kind == "id":
                    response = http.get(f"/bookings/{booking_id}")
                elif kind == "email":
                    response = http.post(
                        "/bookings/search", data={"email": address, "csrf_token": csrf}
                    )
                else:
                    response = http.get("/healthz")
                took = (time.perf_counter() - began) * 1000
                with lock:
                    latencies.append(took)
                    if response.status_code != 200:
                        errors[0] += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, chunks))
    return latencies, errors[0]


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "n": len(latencies),
        "p50": median(latencies),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
    }


def run(quick: bool) -> dict[str, Any]:
    bookings = 2_500 if quick else 25_000
    per_client = 4 if quick else 20
    with servers(smtp=False) as found:
        seeded = seed(found.database_url, bookings)
        env = {
            **found.env,
            "CONSOLE_OPERATOR_TOKEN": TOKEN,
            "CONSOLE_LOOKUPS_PER_MINUTE": "1000000",
            "CONSOLE_LOOKUP_BURST": "1000000",
            "DB_POOL_MAX_SIZE": "16",
        }
        console = ConsoleServer(env).start()
        try:
            rng = random.Random(7)
            total = CLIENTS * per_client
            results: dict[str, Any] = {}
            for kind in ("baseline", "id", "email"):
                work = [rng.choice(seeded) for _ in range(total)]
                timed_requests(console.url, work[: CLIENTS * 2], kind, CLIENTS)  # warm-up
                latencies, errors = timed_requests(console.url, work, kind, CLIENTS)
                results[kind] = {**summary(latencies), "errors": errors, "raw": latencies}
                say(f"{kind}: p50 {results[kind]['p50']:.1f} ms, p99 {results[kind]['p99']:.1f} ms")
        finally:
            console.stop()
    worst = max(results["id"]["p99"], results["email"]["p99"])
    result = {
        "bookings": bookings,
        "delivery_rows": bookings * 4,
        "clients": CLIENTS,
        "requests_per_kind": CLIENTS * per_client,
        "baseline": {k: v for k, v in results["baseline"].items() if k != "raw"},
        "by_id": {k: v for k, v in results["id"].items() if k != "raw"},
        "by_email": {k: v for k, v in results["email"].items() if k != "raw"},
        "p99_ratio_to_baseline": worst / results["baseline"]["p99"],
        "met": worst < TARGET_P99_MS
        and results["id"]["errors"] == 0
        and results["email"]["errors"] == 0,
    }
    write_json(NAME, result)
    fig, axes = figure()
    ax = axes[0]
    for kind, label in (("baseline", "/healthz"), ("id", "by booking id"), ("email", "by email")):
        ordered = sorted(results[kind]["raw"])
        ax.plot(ordered, [100 * (i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    ax.axvline(TARGET_P99_MS, color="red", linestyle=":", label="p99 target")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("percentile")
    ax.set_title(f"console, {CLIENTS} concurrent clients, {bookings * 4:,} delivery rows")
    ax.legend()
    save_png(NAME, fig)
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for key, label in (
        ("baseline", "`GET /healthz` (baseline)"),
        ("by_id", "lookup by booking id"),
        ("by_email", "lookup by guest email"),
    ):
        r = result[key]
        rows.append(
            [
                label,
                f"{r['p50']:.1f}",
                f"{r['p90']:.1f}",
                f"**{r['p99']:.1f}**",
                f"{r['max']:.1f}",
                str(r["errors"]),
            ]
        )
    return (
        "### 6. Operator console lookups\n\n"
        f"{result['clients']} concurrent clients, {result['requests_per_kind']:,} requests of "
        f"each kind, {result['delivery_rows']:,} delivery rows ({result['bookings']:,} bookings); "
        "one console process. Latencies in ms.\n\n"
        + md_table(["request", "p50", "p90", "p99", "max", "errors"], rows)
        + f"\n\np99 of the lookups < {TARGET_P99_MS:.0f} ms: {verdict(result['met'])} "
        f"({result['p99_ratio_to_baseline']:.1f} times the baseline's p99).\n\n![console](console.png)\n"
    )


def main() -> None:
    run_cli(__doc__, NAME, run, markdown)


if __name__ == "__main__":
    main()
