"""``python -m service console``: serve the operator console; ``hash-password`` for CONSOLE_USERS."""

from __future__ import annotations

import getpass

import typer
import uvicorn

from service.app import App
from service.config import SERVICE
from service.console.auth import hash_password
from service.console.web import create_app
from service.worker import bind

app = typer.Typer(
    help="The operator console (web): bookings' emails, dead letters, queues, outbox, flags.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
)


def serve(app_: App, host: str | None = None, port: int | None = None) -> None:
    """Run the console over ``app_`` until interrupted (uvicorn, one process)."""
    app_.settings.require(*SERVICE)
    bind(app_)
    web = create_app(app_)
    uvicorn.run(
        web,
        host=host or app_.settings.console_host,
        port=port or app_.settings.console_port,
        access_log=False,  # our access log leaves query strings out
        proxy_headers=False,  # the peer address is what CONSOLE_TRUSTED_PROXIES is checked against
        server_header=False,
        log_config=None,
    )


@app.callback(invoke_without_command=True)
def console(
    ctx: typer.Context,
    host: str | None = typer.Option(None, help="Listen address (default CONSOLE_HOST)."),
    port: int | None = typer.Option(None, min=1, max=65535, help="Port (default CONSOLE_PORT)."),
) -> None:
    """Serve the console on CONSOLE_HOST:CONSOLE_PORT (127.0.0.1:8080) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    serve(ctx.obj, host, port)


@app.command("hash-password")
def hash_password_command() -> None:
    """Read a password (twice, not echoed) and print its scrypt hash for CONSOLE_USERS."""
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        typer.echo("the passwords differ", err=True)
        raise typer.Exit(1)
    if len(first) < 12:
        typer.echo("use at least 12 characters", err=True)
        raise typer.Exit(1)
    typer.echo(hash_password(first))
