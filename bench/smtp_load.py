"""Plain SMTP clients sending one pre-rendered message over and over: the SMTP-server-alone load.

``python -m bench.smtp_load --port P --message FILE --count N --threads T``: T threads, each
with one persistent ``smtplib`` connection, send N messages in total between them.
"""

from __future__ import annotations

import argparse
import smtplib
import threading
from pathlib import Path

SENDER = "bookings@bench.example"
RECIPIENT = "guest@guests.example"


def _send(port: int, message: bytes, count: int, errors: list[BaseException]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as conn:
            for _ in range(count):
                conn.sendmail(SENDER, [RECIPIENT], message)
    except (smtplib.SMTPException, OSError) as error:
        errors.append(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    message = args.message.read_bytes()
    errors: list[BaseException] = []
    shares = [
        args.count // args.threads + (i < args.count % args.threads) for i in range(args.threads)
    ]
    threads = [
        threading.Thread(target=_send, args=(args.port, message, share, errors)) for share in shares
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    if errors:
        raise SystemExit(f"{len(errors)} SMTP client(s) failed: {errors[0]!r}")


if __name__ == "__main__":
    main()
