"""``python -m service``: the environment is checked before the rest of the service is imported,
so a malformed value stops the process with one line naming it (prometheus_client, imported with
the metrics, already acts on PROMETHEUS_MULTIPROC_DIR)."""

import sys

from service.config import ConfigError, load_settings


def _check_environment(argv: list[str]) -> None:
    if len(argv) < 2 or "--help" in argv or argv[1] == "demo":
        return
    try:
        load_settings()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


_check_environment(sys.argv)

from service.cli import main  # noqa: E402  (only once the environment is known to be sound)

main()
