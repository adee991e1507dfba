"""``python -m service dlq list | show | replay | purge``: inspect and drain dead letters."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import typer
from tqdm import tqdm

from service.app import App
from service.config import SERVICE
from service.dlq.operations import DeadLetter, Filters, dead_letters, parse_duration, purge, replay
from service.logs import redact_text
from service.worker import bind

app = typer.Typer(
    help="Dead letters (broker copy and Postgres record): list, show, replay, purge.",
    no_args_is_help=True,
)


def _duration(value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


QUEUE = typer.Option(None, "--queue", "-q", help="Only this queue (e.g. pending-booking-emails).")
TYPE = typer.Option(None, "--type", "-t", help="Only this email type (e.g. confirmed).")
REASON = typer.Option(
    None,
    "--reason",
    help="retries_exhausted, permanent_failure, delivery_limit, invalid_payload or unrecorded.",
)
OLDER = typer.Option(None, "--older-than", help="Dead for at least this long (30m, 2h, 3d).")
NEWER = typer.Option(None, "--newer-than", help="Dead for at most this long (30m, 2h, 3d).")
IDS = typer.Option([], "--id", help="Only these message ids (repeatable).")
LIMIT = typer.Option(1000, "--limit", min=1, max=100_000, help="At most this many letters.")
DRY_RUN = typer.Option(False, "--dry-run", help="Show what would be done; change nothing.")


def _filters(
    queue: str | None,
    email_type: str | None,
    reason: str | None,
    older_than: str | None,
    newer_than: str | None,
    ids: list[str],
    limit: int,
    include_handled: bool = False,
) -> Filters:
    return Filters(
        queue=queue,
        email_type=email_type,
        reason=reason,
        older_than=_duration(older_than),
        newer_than=_duration(newer_than),
        ids=tuple(ids),
        include_handled=include_handled,
        limit=limit,
    )


def _age(when: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _row(letter: DeadLetter) -> list[str]:
    state = "open" if letter.open else ("replayed" if letter.replayed_at else "purged")
    error = redact_text(letter.error or "-").replace("\n", " ")
    return [
        letter.message_id,
        letter.queue,
        letter.actor,
        letter.email_type or "-",
        letter.reason,
        _age(letter.failed_at),
        letter.location,
        state,
        error[:60],
    ]


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _as_json(letter: DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "queue": letter.queue,
        "actor": letter.actor,
        "email_type": letter.email_type,
        "reason": letter.reason,
        "error": redact_text(letter.error) if letter.error else None,
        "failed_at": letter.failed_at.isoformat(),
        "in_db": letter.recorded,
        "in_broker": letter.copy is not None,
        "replayed_at": letter.replayed_at.isoformat() if letter.replayed_at else None,
        "purged_at": letter.purged_at.isoformat() if letter.purged_at else None,
    }


def _progress(total: int, what: str) -> Any:
    def wrap(items: Iterable[DeadLetter]) -> Iterable[DeadLetter]:
        return tqdm(items, total=total, desc=what, unit="msg", file=sys.stderr, disable=None)

    return wrap


def _bound(ctx: typer.Context) -> App:
    """The App with the actors bound: replay sends through them, labels come from them."""
    app_: App = ctx.obj
    app_.settings.require(*SERVICE)
    bind(app_)
    return app_


@app.command("list")
def list_letters(
    ctx: typer.Context,
    queue: str | None = QUEUE,
    email_type: str | None = TYPE,
    reason: str | None = REASON,
    older_than: str | None = OLDER,
    newer_than: str | None = NEWER,
    ids: list[str] = IDS,
    limit: int = LIMIT,
    include_handled: bool = typer.Option(
        False, "--all", help="Include letters already replayed or purged."
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Dead letters, oldest first; LOCATION says whether Postgres, the broker or both hold it."""
    filters = _filters(
        queue, email_type, reason, older_than, newer_than, ids, limit, include_handled
    )
    a = _bound(ctx)
    with dead_letters(a.db, a.broker, a.settings, filters) as (letters, _):
        if as_json:
            for letter in letters:
                typer.echo(json.dumps(_as_json(letter)))
            return
        header = ["MESSAGE_ID", "QUEUE", "ACTOR", "TYPE", "REASON", "AGE", "LOCATION", "STATE"]
        _table([_row(letter) for letter in letters], [*header, "ERROR"])
        typer.echo(f"{len(letters)} dead letter(s)")


@app.command()
def show(
    ctx: typer.Context, message_id: str = typer.Argument(..., help="The dead message's id.")
) -> None:
    """One dead letter in full: record, error and the message (args, kwargs, options)."""
    a = _bound(ctx)
    selection = Filters(ids=(message_id,), include_handled=True, limit=1)
    with dead_letters(a.db, a.broker, a.settings, selection) as (found, _):
        if not found:
            typer.echo(f"no dead letter {message_id}", err=True)
            raise typer.Exit(1)
        letter = found[0]
        details = _as_json(letter)
        source = letter.copy.message if letter.copy is not None else letter.message
        message = {k: v for k, v in source.items() if k != "options"}
        options = dict(source.get("options") or {})
        traceback = options.pop("traceback", None)
        details["message"] = {**message, "options": options}
        typer.echo(redact_text(json.dumps(details, indent=2, default=str)))
        if traceback:
            typer.echo("traceback of the last attempt:")
            typer.echo(redact_text(str(traceback)))


@app.command("replay")
def replay_letters(
    ctx: typer.Context,
    message_ids: list[str] = typer.Argument(None, help="Message ids (default: every match)."),
    queue: str | None = QUEUE,
    email_type: str | None = TYPE,
    reason: str | None = REASON,
    older_than: str | None = OLDER,
    newer_than: str | None = NEWER,
    limit: int = LIMIT,
    from_db: bool = typer.Option(
        False, "--from-db", help="Replay the Postgres record even where the broker has a copy."
    ),
    dry_run: bool = DRY_RUN,
) -> None:
    """Send matching dead letters again with a fresh retry budget.

    Uses the broker's copy when it has one, else the Postgres record; removes the broker copy
    and marks the record replayed. Emails already sent are not sent again.
    """
    filters = _filters(queue, email_type, reason, older_than, newer_than, message_ids or [], limit)
    a = _bound(ctx)
    with dead_letters(a.db, a.broker, a.settings, filters) as (letters, queues):
        if dry_run:
            for letter in letters:
                source = "db" if from_db or letter.copy is None else "broker"
                typer.echo(f"would replay {letter.message_id} ({letter.actor}, from {source})")
            typer.echo(f"would replay {len(letters)} dead letter(s)")
            return
        outcome = replay(
            a.db,
            a.broker,
            letters,
            queues,
            from_db=from_db,
            progress=_progress(len(letters), "replay"),
        )
    for letter, error in outcome.failed:
        typer.echo(f"failed {letter.message_id}: {redact_text(error)}", err=True)
    typer.echo(f"replayed {len(outcome.done)} dead letter(s), {len(outcome.failed)} failed")
    if outcome.failed:
        raise typer.Exit(1)


@app.command("purge")
def purge_letters(
    ctx: typer.Context,
    message_ids: list[str] = typer.Argument(None, help="Message ids (default: every match)."),
    queue: str | None = QUEUE,
    email_type: str | None = TYPE,
    reason: str | None = REASON,
    older_than: str | None = OLDER,
    newer_than: str | None = NEWER,
    limit: int = LIMIT,
    dry_run: bool = DRY_RUN,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete matching dead letters from the broker; the Postgres record stays, marked purged."""
    filters = _filters(queue, email_type, reason, older_than, newer_than, message_ids or [], limit)
    a = _bound(ctx)
    with dead_letters(a.db, a.broker, a.settings, filters) as (letters, queues):
        if dry_run:
            for letter in letters:
                typer.echo(f"would purge {letter.message_id} ({letter.actor}, {letter.location})")
            typer.echo(f"would purge {len(letters)} dead letter(s)")
            return
        if letters and not yes:
            typer.confirm(f"purge {len(letters)} dead letter(s)?", abort=True)
        outcome = purge(a.db, letters, queues, progress=_progress(len(letters), "purge"))
    typer.echo(f"purged {len(outcome.done)} dead letter(s)")
