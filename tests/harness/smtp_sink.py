"""A real SMTP server (aiosmtpd) that stores every accepted message as a file.

Recipients steer it, so that tests can provoke each SMTP outcome through guest data:
``...+reject@...`` gets 550 at RCPT, ``...+tempfail@...`` always 451, ``...+flakyN@...`` 451
for its first N deliveries then 250. ``--delay`` waits before accepting each recipient, i.e.
before any message data moves, so a client killed during the wait leaves nothing stored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

_FLAKY = re.compile(r"\+flaky(\d+)@")


class StoringHandler:
    def __init__(self, store: Path, delay: float = 0.0) -> None:
        self.store = store
        self.delay = delay
        self.seen: Counter[str] = Counter()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if "+reject@" in address:
            return "550 5.1.1 mailbox unavailable"
        if "+tempfail@" in address:
            return "451 4.3.0 try again later"
        match = _FLAKY.search(address)
        if match:
            self.seen[address] += 1
            if self.seen[address] <= int(match.group(1)):
                return "451 4.3.0 flaky, try again"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        name = f"{uuid.uuid4().hex}.eml"
        tmp = self.store / f"{name}.partial"
        tmp.write_bytes(envelope.original_content or envelope.content)
        os.replace(tmp, self.store / name)
        return "250 Message accepted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    args.store.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        StoringHandler(args.store, args.delay),
        hostname="127.0.0.1",
        port=args.port,
        server_kwargs={"data_size_limit": 10_000_000},
    )
    controller.start()
    try:
        asyncio.run(asyncio.Event().wait())
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
