"""The start of a worker process: ``dramatiq service.worker:start`` (``python -m service worker``).

Dramatiq's CLI calls ``start`` in each worker process it forks; this is where a worker's App is
built, logging configured (before any middleware hook logs), and the actors bound to the broker,
which becomes Dramatiq's global broker in this process only.
"""

from __future__ import annotations

import atexit
import sys

import dramatiq
import dramatiq.cli

from service.actors import ACTORS
from service.app import App
from service.config import load_settings
from service.logs import configure


def bind(app: App) -> dramatiq.Broker:
    """Declare every actor on ``app.broker`` and return it."""
    for actor in ACTORS:
        actor.bind(app)
    return app.broker


def start() -> None:
    app = App.for_worker()
    configure(app.settings.log_level, app.settings.log_format)
    dramatiq.set_broker(bind(app))
    atexit.register(app.close)  # after Dramatiq's shutdown: pool, SMTP connections, flag client


def main(argv: list[str] | None = None) -> int:
    """``python -m service.worker <dramatiq options>``: Dramatiq's CLI with our logging.

    Logging is configured before Dramatiq starts and Dramatiq is told not to set up its own, so
    every line the parent and its children print is in the configured format.
    """
    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    parser = dramatiq.cli.make_argument_parser()
    args = parser.parse_args(["service.worker:start", "--skip-logging", *(argv or sys.argv[1:])])
    return int(dramatiq.cli.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
