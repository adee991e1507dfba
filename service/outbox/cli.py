"""``python -m service outbox ...``: run the relay and inspect the outbox."""

from __future__ import annotations

import json
import signal
import threading
import uuid
from datetime import datetime
from typing import Any

import typer

from service.app import App
from service.config import SERVICE
from service.db import Database
from service.observability import heartbeat, serve_metrics
from service.outbox import store
from service.outbox.relay import Relay

app = typer.Typer(
    help="Transactional outbox: relay, inspection and requeueing.", no_args_is_help=True
)

_STATUSES = ("pending", "delivered", "dead", "all")


def _db(ctx: typer.Context) -> Database:
    app_: App = ctx.obj
    app_.settings.require("database_url")
    return app_.db


@app.command()
def relay(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Deliver what is due now, then exit."),
    batch_size: int = typer.Option(10, min=1, max=500, help="Events claimed per statement."),
    lease_seconds: float = typer.Option(
        0, min=0, help="How long a claim lasts (0: derived from the SMTP and webhook timeouts)."
    ),
) -> None:
    """Deliver outbox events; long-running unless --once. Stops cleanly on SIGTERM/SIGINT."""
    app_: App = ctx.obj
    app_.settings.require(*SERVICE)
    worker = Relay(
        app_.db,
        app_.settings,
        app_.outbox_handlers,
        batch_size=batch_size,
        lease_seconds=lease_seconds or None,
    )
    if once:
        result = worker.run_once()
        typer.echo(
            f"claimed {result.claimed}: delivered {result.delivered}, retried {result.retried}, "
            f"dead {result.dead}, lost {result.lost}"
        )
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve_metrics(app_.settings, app_.scrape_sources(queues=False))
    beat = heartbeat(app_.settings, "relay")
    try:
        worker.run_forever(stop, lambda: beat.task("outbox-relay-batch", worker.lease_seconds))
    finally:
        beat.stop()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _json_value(value: Any) -> Any:
    """Lists and mappings (targets) stay structured in ``--json``; the rest as in the table."""
    return value if isinstance(value, list | dict) else _cell(value)


@app.command("list")
def list_events(
    ctx: typer.Context,
    status: str = typer.Option("pending", help="pending, delivered, dead or all."),
    limit: int = typer.Option(50, min=1, max=10_000),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Newest events first (payloads are not shown)."""
    if status not in _STATUSES:
        raise typer.BadParameter(f"status must be one of {', '.join(_STATUSES)}")
    with _db(ctx).transaction() as conn:
        rows = store.list_events(conn, status=None if status == "all" else status, limit=limit)
    columns = (
        "id",
        "event_type",
        "status",
        "attempts",
        "next_attempt_at",
        "created_at",
        "last_error",
    )
    for row in rows:
        if as_json:
            typer.echo(json.dumps({k: _json_value(row[k]) for k in row}))
        else:
            typer.echo("  ".join(_cell(row[c])[:80] for c in columns))


@app.command()
def stats(ctx: typer.Context, as_json: bool = typer.Option(False, "--json")) -> None:
    """Pending, due, claimed, delivered and dead counts, and the oldest pending event's age."""
    with _db(ctx).transaction() as conn:
        numbers = store.stats(conn)
    if as_json:
        typer.echo(json.dumps(numbers))
        return
    for key, value in numbers.items():
        shown = "-" if value is None else (f"{value:.0f}" if isinstance(value, float) else value)
        typer.echo(f"{key}: {shown}")


@app.command()
def requeue(
    ctx: typer.Context, event_id: str = typer.Argument(..., help="Id of a dead event.")
) -> None:
    """Give a dead event a fresh attempt budget and make it due now."""
    try:
        parsed = uuid.UUID(event_id)
    except ValueError:
        raise typer.BadParameter("not a UUID") from None
    with _db(ctx).transaction() as conn:
        done = store.requeue(conn, parsed)
    if not done:
        typer.echo("no dead event with that id", err=True)
        raise typer.Exit(1)
    typer.echo(f"requeued {parsed}")
