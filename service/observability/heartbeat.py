"""Per-process heartbeat records: what the liveness probe and the heartbeat metric read.

Each long-running process (every Dramatiq worker process, the outbox relay) owns one JSON file,
``<HEALTH_FILE>.<pid>.json``, rewritten atomically every few seconds by a background thread. A
record says when it was written, which process (and parent process) wrote it, identified by PID
and start time so that a record left by an earlier container is never mistaken for a live one,
whether the process's worker threads are still alive, and which tasks (messages) are running
with their time limits. A frozen process stops rewriting its file; a task stuck past its limit
stays listed with its start time. A record also carries the process's readiness problems
(``report_unready``), e.g. the last SMTP authentication failure, which the readiness probe reads.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.config import Settings
from service.logs import get_logger

log = get_logger(__name__)

SUFFIX = ".json"

_unready: dict[str, str] = {}
_unready_lock = threading.Lock()


def report_unready(name: str, reason: str) -> None:
    """Mark this process not ready because of ``name`` (e.g. ``smtp``) until ``clear_unready``.

    Every heartbeat record this process writes from then on carries ``reason`` under
    ``unready``, and ``python -m service health --readiness`` fails on it.
    """
    with _unready_lock:
        _unready[name] = reason


def clear_unready(name: str) -> None:
    with _unready_lock:
        _unready.pop(name, None)


def unready_reasons() -> dict[str, str]:
    """This process's current readiness problems, by name."""
    with _unready_lock:
        return dict(_unready)


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None when it is not running.

    Zombies (killed but not yet reaped) count as not running.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _exists(pid)
    fields = raw.rsplit(")", 1)[-1].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _exists(pid: int) -> int | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return 0
    return 0


def is_running(pid: int, start_ticks: int | None) -> bool:
    """Whether the process that wrote a record (same PID and start time) still runs."""
    if pid <= 0:
        return False
    current = process_start_ticks(pid)
    if current is None:
        return False
    return start_ticks is None or current == 0 or current == start_ticks


def record_dir_and_prefix(health_file: Path) -> tuple[Path, str]:
    return health_file.parent, health_file.name + "."


def record_path(health_file: Path, pid: int) -> Path:
    directory, prefix = record_dir_and_prefix(health_file)
    return directory / f"{prefix}{pid}{SUFFIX}"


def read_records(health_file: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every heartbeat record under ``health_file`` (unreadable or half-written ones skipped)."""
    directory, prefix = record_dir_and_prefix(health_file)
    found: list[tuple[Path, dict[str, Any]]] = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(directory.glob(f"{prefix}*{SUFFIX}")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("pid"), int):
                found.append((path, data))
    return found


@dataclass
class Task:
    name: str
    queue: str | None
    started: float
    limit_seconds: float | None


@dataclass
class Heartbeat:
    """Writes this process's record every ``interval`` seconds until stopped.

    ``probe`` returns extra fields for each record (thread liveness, held messages...).
    """

    health_file: Path
    role: str
    interval: float
    queues: list[str] = field(default_factory=list)
    probe: Callable[[], dict[str, Any]] | None = None
    _tasks: dict[Any, Task] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _keys: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.pid_start = process_start_ticks(self.pid)
        self.ppid_start = process_start_ticks(self.ppid) if self.ppid > 0 else None

    @property
    def path(self) -> Path:
        return record_path(self.health_file, self.pid)

    def start(self) -> Heartbeat:
        self.health_file.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_records(self.health_file)
        self.beat()
        self._thread = threading.Thread(
            target=self._run, name=f"{self.role}-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing and remove the record (a clean exit is not a failure)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def start_task(
        self, key: Any, name: str, limit_seconds: float | None, queue: str | None = None
    ) -> None:
        with self._lock:
            self._tasks[key] = Task(name, queue, time.time(), limit_seconds)

    def end_task(self, key: Any) -> None:
        with self._lock:
            self._tasks.pop(key, None)

    @contextlib.contextmanager
    def task(self, name: str, limit_seconds: float | None) -> Iterator[None]:
        """Mark a unit of work; liveness fails if it runs past ``limit_seconds`` (plus a margin)."""
        key = next(self._keys)
        self.start_task(key, name, limit_seconds)
        try:
            yield
        finally:
            self.end_task(key)

    def record(self) -> dict[str, Any]:
        with self._lock:
            tasks = [
                {"name": t.name, "queue": t.queue, "started": t.started, "limit": t.limit_seconds}
                for t in self._tasks.values()
            ]
        data: dict[str, Any] = {
            "role": self.role,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "ppid": self.ppid,
            "ppid_start": self.ppid_start,
            "time": time.time(),
            "interval": self.interval,
            "queues": self.queues,
            "tasks": tasks,
            "unready": unready_reasons(),
        }
        if self.probe is not None:
            data.update(self.probe())
        return data

    def beat(self) -> None:
        """Rewrite the record now (atomically: readers never see a half-written file)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.record()))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as error:  # a failed write shows as a stale record, never a crash
                log.warning("heartbeat write failed", error=type(error).__name__)


def remove_stale_records(health_file: Path) -> None:
    """Delete records whose process and parent are both gone (left by an earlier container)."""
    for path, data in read_records(health_file):
        if not record_is_current(data):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def record_is_current(data: dict[str, Any]) -> bool:
    """A record matters while its process runs, or while the parent that supervises it does."""
    if is_running(int(data["pid"]), data.get("pid_start")):
        return True
    ppid = int(data.get("ppid") or 0)
    return data.get("role") == "worker" and is_running(ppid, data.get("ppid_start"))


def interval_for(max_age_seconds: float) -> float:
    """Write often enough that two missed writes still leave the record younger than the limit."""
    return max(0.5, min(5.0, max_age_seconds / 4))


def heartbeat(settings: Settings, role: str = "relay") -> Heartbeat:
    """Start and return a heartbeat for this process, for processes outside Dramatiq.

    Wrap each unit of work in ``beat.task(name, limit_seconds)`` so that the liveness
    probe fails when one hangs past its limit; the record itself is refreshed by a thread.
    """
    return Heartbeat(
        health_file=settings.health_file,
        role=role,
        interval=interval_for(settings.health_max_age_seconds),
    ).start()
