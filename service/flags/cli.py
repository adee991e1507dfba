"""``python -m service flags``: each flag's effective value and where it came from."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import typer

from service.config import Settings
from service.flags import Flags, Source
from service.flags.client import ClientState, Diagnosis, describe_token, diagnose

app = typer.Typer(
    help="Feature flags: effective values and their source (unleash, cache, environment default).",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)


def _diagnose(settings: Settings, state: ClientState | None) -> Diagnosis | None:
    """Why this process has no fresh flags, from one direct request to Unleash."""
    if state is None or state.fresh:
        return None
    diagnosis = diagnose(settings)
    if diagnosis.answered:
        return Diagnosis(
            True, 200, "Unleash answers now, but this process had no answer within --wait seconds"
        )
    return diagnosis


def _reach(state: ClientState, diagnosis: Diagnosis | None) -> str:
    if state.fresh:
        return "reachable"
    if diagnosis is not None and diagnosis.status in (401, 403):
        return f"REFUSES the token: HTTP {diagnosis.status}"
    if diagnosis is not None and diagnosis.status is not None and not diagnosis.answered:
        return f"answers HTTP {diagnosis.status}"
    return "NOT reachable"


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
    diagnosis = _diagnose(app_flags.settings, state)
    problem = diagnosis.problem if diagnosis else None
    undefined = [row.flag.name for row in rows if row.source is Source.DEFAULT]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "unleash_url": state.url if state else None,
                    "synced": state.fresh if state else None,
                    "http_status": diagnosis.status if diagnosis else None,
                    "problem": problem,
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
            reach = _reach(state, diagnosis)
            typer.echo(f"Unleash: {state.url} ({reach}; environment {state.environment})")
            if problem:
                typer.echo(f"Problem: {problem}")
            elif state.fresh and undefined:
                token = app_flags.settings.unleash_api_token
                scope = describe_token(token.get_secret_value() if token else None)
                typer.echo(
                    f"Not in Unleash for this token: {', '.join(undefined)} (the environment "
                    f"default applies). Create them, or check the token's project and "
                    f"environment (token {scope})"
                )
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
