"""The operator CLI: ``python -m service <command> --help``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from service.capacity import cli as holds_cli
from service.config import ConfigError, get_settings
from service.dlq import cli as dlq_cli
from service.flags import cli as flags_cli
from service.logs import configure
from service.observability.health import health as health_command
from service.outbox import cli as outbox_cli

app = typer.Typer(
    help="Booking durability service: workers, migrations and operations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# Sub-command groups, one per feature area, each defined beside the code it operates.
# (Add `app.add_typer(<module>.app, name="<group>")` lines here.)
app.add_typer(outbox_cli.app, name="outbox")
app.add_typer(flags_cli.app, name="flags")
app.add_typer(holds_cli.app, name="holds")
app.add_typer(dlq_cli.app, name="dlq")
app.command("health")(health_command)


@app.callback()
def _setup(ctx: typer.Context) -> None:
    if "--help" in sys.argv or ctx.invoked_subcommand == "demo":
        return
    try:
        settings = get_settings()
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    configure(settings.log_level, settings.log_format)


@app.command()
def migrate() -> None:
    """Apply pending database migrations (safe to run concurrently; a no-op when up to date)."""
    from service.db import migrate as apply

    applied = apply()
    typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@app.command()
def worker(
    processes: int = typer.Option(
        ..., min=1, help="Worker processes (set it: the default would be the host's CPU count)."
    ),
    threads: int = typer.Option(..., min=1, help="Threads per worker process."),
    queues: list[str] = typer.Option(
        [], "--queue", "-Q", help="Only consume these queues (repeatable); all by default."
    ),
    shutdown_timeout_ms: int = typer.Option(
        25_000,
        help="How long a stopping worker waits for running jobs; keep it below the pod's grace period.",
    ),
) -> None:
    """Run the Dramatiq workers in place of this process (exec, so Dramatiq becomes PID 1)."""
    args = [
        sys.executable,
        "-m",
        "dramatiq",
        "service.actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--worker-shutdown-timeout",
        str(shutdown_timeout_ms),
    ]
    if queues:
        args += ["--queues", *queues]
    from service.observability import prepare_worker_environment

    prepare_worker_environment()
    sys.stdout.flush()
    os.execv(sys.executable, args)


@app.command()
def reconcile(
    grace_seconds: int | None = typer.Option(
        None, min=0, help="Only emails older than this (default RECONCILE_GRACE_SECONDS)."
    ),
    limit: int = typer.Option(1000, min=1, help="At most this many emails per kind in one run."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would be sent again; change nothing."
    ),
) -> None:
    """Send again every booking email that is missing or stuck (safe to run from several places)."""
    from datetime import timedelta

    from service.emails import reconcile as rec

    grace = timedelta(seconds=grace_seconds) if grace_seconds is not None else None
    report = rec.preview(limit, grace) if dry_run else rec.reconcile(limit, grace)
    verb = "would re-enqueue" if dry_run else "re-enqueued"
    typer.echo(
        f"{verb} {report.total} email(s): {len(report.missing)} missing, {len(report.stuck)} stuck"
    )


@app.command()
def demo(
    bookings: int = typer.Option(400, min=4, help="Bookings to seed and email."),
    processes: int = typer.Option(2, min=1, help="Worker processes."),
    threads: int = typer.Option(4, min=1, help="Threads per worker process."),
) -> None:
    """Run the end-to-end demo on throwaway servers (from a source checkout; same as `make demo`)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
    if not script.exists():
        typer.echo(
            "error: the demo runs from a source checkout (scripts/demo.py is not here)", err=True
        )
        raise typer.Exit(2)
    args = [
        sys.executable,
        str(script),
        "--bookings",
        str(bookings),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]
    os.execv(sys.executable, args)


def main() -> None:
    app()
