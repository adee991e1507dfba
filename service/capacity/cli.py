"""``python -m service holds ...``: repair hold metadata and audit it."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any

import typer
from tqdm import tqdm

from service.app import App
from service.capacity.audit import audit as run_audit
from service.capacity.backfill import Backfill
from service.db import Database

app = typer.Typer(help="Hold metadata integrity: backfill and audit.", no_args_is_help=True)


def _db(ctx: typer.Context) -> Database:
    app_: App = ctx.obj
    app_.settings.require("database_url")
    return app_.db


def _venue(value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"not a venue id: {value!r}") from None


def _print_summary(summary: dict[str, Any]) -> None:
    verb = "would be " if summary["dryRun"] else ""
    typer.echo(
        f"scanned {summary['scanned']} active hold(s) in {summary['seconds']:.2f} s "
        f"({summary['holdsPerSecond']:.0f}/s)"
    )
    reasons = ", ".join(f"{k} {v}" for k, v in summary["irreparableReasons"].items())
    rows = [
        ("already valid", str(summary["alreadyValid"])),
        (f"{verb}repaired", str(summary["repaired"])),
        (
            f"irreparable, {verb}released",
            f"{summary['irreparable']}" + (f" ({reasons})" if reasons else ""),
        ),
        (f"expired, {verb}released", str(summary["expiredReleased"])),
        ("left by others meanwhile", str(summary["gone"])),
        ("still locked by others", str(summary["busy"])),
    ]
    if not summary["dryRun"]:
        rows.append(
            (
                "lock time per batch",
                f"max {summary['maxBatchLockMs']:.1f} ms, p95 {summary['p95BatchLockMs']:.1f} ms "
                f"over {summary['writeBatches']} batch(es)",
            )
        )
    rows.append(("check constraint", summary["constraint"]))
    for label, value in rows:
        typer.echo(f"  {label + ':':<32} {value}")
    for hold in summary["irreparableHolds"][:50]:
        typer.echo(
            f"  {verb}released hold {hold['holdId']} (booking {hold['bookingId']}, "
            f"venue {hold['venueId']}): {hold['reason']}"
        )
    if len(summary["irreparableHolds"]) > 50:
        typer.echo(f"  ... and {len(summary['irreparableHolds']) - 50} more (see --json)")
    typer.echo(f"  run id {summary['runId']} (table hold_metadata_repairs)")


@app.command()
def backfill(
    ctx: typer.Context,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Report what would change; change nothing."
    ),
    batch_size: int = typer.Option(
        500, min=1, max=10_000, help="Holds per batch; one batch's UPDATE holds its row locks."
    ),
    venue: str | None = typer.Option(None, "--venue", help="Only this venue's holds."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Repair active holds with incomplete metadata; release and report the irreparable ones."""
    run = Backfill(_db(ctx), batch_size=batch_size, dry_run=dry_run, venue_id=_venue(venue))
    with tqdm(
        total=run.total_active(),
        unit="hold",
        desc="dry run" if dry_run else "backfill",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        run.progress = bar.update
        summary = run.run().as_dict()
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)


@app.command()
def audit(
    ctx: typer.Context,
    venue: str | None = typer.Option(None, "--venue", help="Only this venue's holds."),
    show: int = typer.Option(20, min=0, help="List up to this many invalid holds."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Count active holds by metadata validity; exit 1 when any unexpired one is invalid."""
    with _db(ctx).transaction() as conn:
        report = run_audit(conn, venue_id=_venue(venue), sample=show)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        typer.echo(f"active holds: {report.valid} valid, {report.invalid} invalid")
        typer.echo(
            f"expired, not yet released: {report.expired_valid} valid, "
            f"{report.expired_invalid} invalid"
        )
        for path, count in sorted(report.problems.items()):
            typer.echo(f"  {count} hold(s) with a problem at {path}")
        for hold_id, venue_id in report.invalid_holds:
            typer.echo(f"  invalid: hold {hold_id} (venue {venue_id})")
        state = {None: "absent", True: "validated", False: "not validated"}
        typer.echo(f"constraint holds_active_metadata_object: {state[report.constraint_validated]}")
    if report.invalid:
        raise typer.Exit(1)
