"""A real SMTP server (aiosmtpd) that stores every accepted message as a file, and beside it
(``<name>.rcpt``) the envelope recipients it accepted for that message, one a line.

Recipients steer it, so that tests can provoke each SMTP outcome through guest data:
``...+reject@...`` gets 550 at RCPT, ``...+tempfail@...`` always 451, ``...+flakyN@...`` 451
for its first N deliveries then 250. ``--delay`` waits before accepting each recipient, i.e.
before any message data moves, so a client killed during the wait leaves nothing stored.
``--data-delay`` waits (an asyncio sleep, other conversations go on) before answering each
DATA, like a remote server that takes its time to accept a message. ``--reuse-port`` binds with
SO_REUSEPORT, so that several sink processes share one port (the kernel spreads connections
between them): one Python process parsing every message would otherwise be the bottleneck of a
benchmark.
``--auth USER:PASSWORD`` requires AUTH (PLAIN or LOGIN, allowed without TLS on loopback) and
answers 535 to any other credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

_FLAKY = re.compile(r"\+flaky(\d+)@")


class StoringHandler:
    def __init__(self, store: Path, delay: float = 0.0, data_delay: float = 0.0) -> None:
        self.store = store
        self.delay = delay
        self.data_delay = data_delay
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
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        name = uuid.uuid4().hex
        (self.store / f"{name}.rcpt").write_text("\n".join(envelope.rcpt_tos))
        tmp = self.store / f"{name}.eml.partial"
        tmp.write_bytes(envelope.original_content or envelope.content)
        os.replace(tmp, self.store / f"{name}.eml")
        return "250 Message accepted"


class Credentials:
    """An aiosmtpd authenticator accepting one login and password."""

    def __init__(self, login: str, password: str) -> None:
        self.expected = (login.encode(), password.encode())

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == self.expected
        return AuthResult(success=ok, handled=False)


async def serve(
    port: int, handler: StoringHandler, reuse_port: bool, ready: Path | None, **kwargs: Any
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, **kwargs), host="127.0.0.1", port=port, reuse_port=reuse_port
    )
    if ready is not None:
        ready.mkdir(parents=True, exist_ok=True)
        (ready / str(os.getpid())).touch()  # listening: the harness may count this process
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--data-delay", type=float, default=0.0)
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--ready-dir", type=Path, default=None, help="touch <pid> once bound")
    parser.add_argument("--auth", default=None, help="USER:PASSWORD that AUTH must present")
    args = parser.parse_args()
    args.store.mkdir(parents=True, exist_ok=True)
    auth: dict[str, Any] = {}
    if args.auth:
        login, _, password = args.auth.partition(":")
        auth = {
            "authenticator": Credentials(login, password),
            "auth_required": True,
            "auth_require_tls": False,
        }
    handler = StoringHandler(args.store, args.delay, args.data_delay)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C in a terminal reaches it too
        asyncio.run(
            serve(
                args.port,
                handler,
                args.reuse_port,
                args.ready_dir,
                data_size_limit=10_000_000,
                **auth,
            )
        )


if __name__ == "__main__":
    main()
