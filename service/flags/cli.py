"""``python -m service flags``: each flag's effective value and where it came from."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import typer

from service.flags import Flags

app = typer.Typer(
    help="Feature flags: effective values and their source (unleash, cache, environment default).",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)


def _age(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"{moment.isoformat(timespec='seconds')} ({seconds:.0f}s ago)"


@app.callback(invoke_without_command=True)
def show(
    ctx: typer.Context,
    venue: str | None = typer.Option(None, help="Evaluate for this venue id (per-venue rollout)."),
    wait: float = typer.Option(
        5.0, min=0, help="Seconds to wait for a first answer from Unleash before reporting."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print each flag's effective value and where it came from."""
    if ctx.invoked_subcommand is not None:
        return
    for noisy in ("UnleashClient", "urllib3", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    app_flags: Flags = ctx.obj.flags
    rows, state = app_flags.status(venue, wait=wait)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "unleash_url": state.url if state else None,
                    "last_sync": state.last_sync.isoformat() if state and state.last_sync else None,
                    "flags": [
                        {
                            "name": row.flag.name,
                            "enabled": row.value,
                            "source": str(row.source),
                            "default": row.default,
                            "env_var": row.flag.env_var,
                            "type": row.flag.kind,
                        }
                        for row in rows
                    ],
                },
                indent=2,
            )
        )
    else:
        if state is None:
            typer.echo("Unleash: not configured (UNLEASH_URL unset): environment defaults apply")
        else:
            reach = "reachable" if state.fresh else "NOT reachable"
            typer.echo(f"Unleash: {state.url} ({reach}; environment {state.environment})")
            typer.echo(f"Last sync by this process: {_age(state.last_sync)}")
            cache = state.cache_dir if state.cache_persistent else f"{state.cache_dir} (UNWRITABLE)"
            typer.echo(f"Cache: {cache}, saved {_age(state.cache_saved_at)}")
        if venue is not None:
            typer.echo(f"Venue: {venue}")
        typer.echo("")
        header = ("FLAG", "VALUE", "SOURCE", "DEFAULT", "TYPE")
        table = [
            (
                row.flag.name,
                "on" if row.value else "off",
                str(row.source),
                f"{row.flag.env_var}={'true' if row.default else 'false'}",
                row.flag.kind,
            )
            for row in rows
        ]
        widths = [max(len(line[i]) for line in (header, *table)) for i in range(len(header))]
        for line in (header, *table):
            typer.echo(
                "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            )
    app_flags.stop()
