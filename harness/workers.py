"""Real ``python -m service worker`` process groups, for crash tests, the demo and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_pids(pid: int) -> list[int]:
    try:
        out = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        children = Path(f"/proc/{pid}/task/{pid}/children")
        out = children.read_text() if children.exists() else ""
    return [int(p) for p in out.split()]


@dataclass
class WorkerGroup:
    """One Dramatiq parent (PID of ``python -m service worker``) and its worker processes."""

    env: dict[str, str]
    processes: int = 2
    threads: int = 4
    queues: tuple[str, ...] = ()
    log_path: Path | None = None
    module: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, wait_for_children: bool = True) -> WorkerGroup:
        if self.module:
            cmd = [
                sys.executable,
                "-m",
                "dramatiq",
                self.module,
                "--processes",
                str(self.processes),
                "--threads",
                str(self.threads),
            ]
        else:
            cmd = [
                sys.executable,
                "-m",
                "service",
                "worker",
                "--processes",
                str(self.processes),
                "--threads",
                str(self.threads),
            ]
            for q in self.queues:
                cmd += ["--queue", q]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=ROOT, stdout=out, stderr=out, start_new_session=True
        )
        if wait_for_children:
            deadline = time.monotonic() + 30
            while len(self.children()) < self.processes and time.monotonic() < deadline:
                time.sleep(0.05)
            if len(self.children()) < self.processes:
                raise RuntimeError("worker processes did not start; see the worker log")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        return child_pids(self.pid) if self.proc and self.proc.poll() is None else []

    def kill_child(self) -> int:
        """``kill -9`` one worker process; returns its PID."""
        victim = self.children()[0]
        os.kill(victim, signal.SIGKILL)
        return victim

    def wait_exit(self, timeout: float = 60) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        if self.wait_exit(timeout) is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)

    def kill_all(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(10)


def service_command(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m service <args>`` to completion, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_service(
    env: dict[str, str], *args: str, stderr: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """Start ``python -m service <args>`` (a relay, say); stdout discarded, stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
