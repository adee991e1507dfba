"""The operator CLI: ``python -m service <command> --help``."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import typer

from service.actors import send_booking_email
from service.app import App
from service.capacity import cli as holds_cli
from service.config import SERVICE, ConfigError, load_settings
from service.console import cli as console_cli
from service.db import migrate as apply_migrations
from service.dlq import cli as dlq_cli
from service.emails import reconcile as rec
from service.emails.models import EmailPayload
from service.flags import cli as flags_cli
from service.logs import configure
from service.observability import prepare_worker_environment
from service.observability.health import health as health_command
from service.outbox import cli as outbox_cli
from service.worker import bind

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
app.add_typer(console_cli.app, name="console")
app.command("health")(health_command)


@app.callback()
def _setup(ctx: typer.Context) -> None:
    """Every command starts here: settings read and checked, logging configured, the App
    (the composition root) handed to the command as ``ctx.obj``."""
    if "--help" in sys.argv or ctx.invoked_subcommand == "demo":
        return
    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    ctx.obj = App(settings)
    ctx.call_on_close(ctx.obj.close)


def _app(ctx: typer.Context, *needs: str) -> App:
    """The command's App, after checking the settings it needs."""
    app_: App = ctx.obj
    app_.settings.require(*needs)
    return app_


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Apply pending database migrations (safe to run concurrently; a no-op when up to date)."""
    settings = _app(ctx, "database_url").settings
    applied = apply_migrations(settings.secret("database_url"), settings.migrations_dir)
    typer.echo(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")


@app.command()
def worker(
    ctx: typer.Context,
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
    _app(ctx, *SERVICE)
    args = [
        sys.executable,
        "-m",
        "service.worker",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
        "--worker-shutdown-timeout",
        str(shutdown_timeout_ms),
    ]
    if queues:
        args += ["--queues", *queues]
    prepare_worker_environment()
    sys.stdout.flush()
    os.execv(sys.executable, args)


@app.command()
def reconcile(
    ctx: typer.Context,
    grace_seconds: int | None = typer.Option(
        None, min=0, help="Only emails older than this (default RECONCILE_GRACE_SECONDS)."
    ),
    limit: int = typer.Option(1000, min=1, help="At most this many emails per kind in one run."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Show what would be sent again; change nothing."
    ),
) -> None:
    """Send again every booking email that is missing or stuck (safe to run from several places)."""
    app_ = _app(ctx, *SERVICE)
    grace = timedelta(seconds=grace_seconds) if grace_seconds is not None else None
    if dry_run:
        report = rec.preview(app_.db, app_.settings, limit, grace)
    else:
        bind(app_)

        def enqueue(payload: EmailPayload) -> None:
            send_booking_email.send(**payload.as_kwargs())

        report = rec.reconcile(app_.db, app_.settings, enqueue, limit, grace)
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
    root = Path(__file__).resolve().parents[1]
    if not (root / "scripts" / "demo.py").exists() or not (root / "harness").is_dir():
        typer.echo(
            "error: the demo runs from a source checkout (scripts/demo.py and harness/ are not here)",
            err=True,
        )
        raise typer.Exit(2)
    args = [
        sys.executable,
        "-m",
        "scripts.demo",
        "--bookings",
        str(bookings),
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]
    os.chdir(root)
    os.execv(sys.executable, args)


def main() -> None:
    try:
        app()
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None
