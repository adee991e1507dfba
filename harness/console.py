"""The operator console as a real process (``python -m service console``) on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.servers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ConsoleServer:
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ConsoleServer:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**self.env, "CONSOLE_HOST": "127.0.0.1", "CONSOLE_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "console"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the console exited with {self.proc.returncode}; see its log")
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200

        wait_for(up, timeout, "the console", fatal=(RuntimeError,))
        return self

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
