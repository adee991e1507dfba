"""A throwaway Redis Sentinel deployment on free loopback ports: one primary, two replicas
(``replicaof``) and three Sentinels (``redis-server --sentinel``), each in a directory of its own
with a generated configuration file (Sentinel and ``CONFIG REWRITE`` keep what they learn there,
so a restarted node comes back in the role Sentinel gave it).

Faults it can inject, for tests and ``bench.failover_redis``:

- ``kill_primary``: ``kill -9`` of the current primary; the Sentinels agree (quorum 2) that it
  is down after ``down_after_ms`` and promote a replica; ``wait_for_failover`` waits for that.
- ``stop_replica`` / ``start_replica``: a replica process stopped (SIGTERM) and started again;
  it resynchronises from the primary.
- ``cut_link`` / ``restore_link``: the replica's link to the primary is cut. There is no
  iptables here, and a network namespace per node would move the nodes off loopback, so the cut
  is done in two real steps: the replica process is frozen (``SIGSTOP``: it neither reads nor
  answers, as behind a partition) and the primary closes its replication connection to that
  replica (``CLIENT KILL ADDR``). The primary then keeps acknowledging writes the replica never
  sees, as in a partition. ``restore_link`` resumes the process (``SIGCONT``): it finds the
  connection closed, reconnects and catches up with a partial resync.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from harness.servers import _find_redis_server, free_port, wait_for
from service.redis_urls import redis_client


@dataclass
class RedisNode:
    """One Redis server of the deployment (a primary or a replica), started from its own file."""

    name: str
    root: Path
    port: int = field(default_factory=free_port)
    replica_of: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    @property
    def conf(self) -> Path:
        return self.root / "redis.conf"

    def write_conf(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.root}"',
            f'logfile "{self.root / "redis.log"}"',
            'save ""',
            "appendonly yes",
            "appendfsync everysec",
            "maxmemory-policy noeviction",
            "repl-diskless-sync yes",
            "repl-diskless-sync-delay 0",
        ]
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_find_redis_server(), str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.frozen = False
        wait_for(lambda: bool(self.client().ping()), 20, f"redis {self.name}")

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def role(self) -> str:
        info = self.client().info("replication")
        return str(info["role"])

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            if self.frozen:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        self.frozen = False

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.frozen = False

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self.frozen:
            self.proc.send_signal(signal.SIGCONT)
        self.frozen = False


@dataclass
class SentinelNode:
    root: Path
    master_name: str
    monitor_port: int
    quorum: int
    down_after_ms: int
    failover_timeout_ms: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.root / "sentinel.conf"

    def write_conf(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = self.master_name
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f'dir "{self.root}"',
                    f'logfile "{self.root / "sentinel.log"}"',
                    f"sentinel monitor {name} 127.0.0.1 {self.monitor_port} {self.quorum}",
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                    f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {name} 1",
                ]
            )
            + "\n"
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [_find_redis_server(), str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: bool(self.client().ping()), 20, "sentinel")

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def primary_port(self) -> int:
        _host, port = self.client().execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
        )
        return int(port)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@dataclass
class SentinelDeployment:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels (quorum 2)."""

    root: Path
    master_name: str = field(default_factory=lambda: f"booking-{secrets.token_hex(4)}")
    replicas: int = 2
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 1000
    failover_timeout_ms: int = 6000
    nodes: list[RedisNode] = field(default_factory=list)
    sentinel_nodes: list[SentinelNode] = field(default_factory=list)

    @classmethod
    def start_new(cls, **options: int) -> SentinelDeployment:
        deployment = cls(root=Path(tempfile.mkdtemp(prefix="booking-sentinel-")), **options)  # type: ignore[arg-type]
        try:
            deployment.start()
        except BaseException:
            deployment.destroy()
            raise
        return deployment

    def start(self) -> None:
        primary = RedisNode("redis-0", self.root / "redis-0")
        self.nodes = [primary] + [
            RedisNode(f"redis-{i}", self.root / f"redis-{i}", replica_of=primary.port)
            for i in range(1, self.replicas + 1)
        ]
        for node in self.nodes:
            node.write_conf()
            node.start()
        wait_for(lambda: self._replicas_online(primary) == self.replicas, 30, "replication")
        self.sentinel_nodes = [
            SentinelNode(
                self.root / f"sentinel-{i}",
                self.master_name,
                primary.port,
                self.quorum,
                self.down_after_ms,
                self.failover_timeout_ms,
            )
            for i in range(self.sentinels)
        ]
        for sentinel in self.sentinel_nodes:
            sentinel.write_conf()
            sentinel.start()
        wait_for(self._sentinels_agree, 60, "the Sentinels to find each other and the replicas")

    def _replicas_online(self, primary: RedisNode) -> int:
        info = primary.client().info("replication")
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        )

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinel_nodes:
            state: Any = sentinel.client().sentinel_master(self.master_name)
            if int(state["num-other-sentinels"]) != self.sentinels - 1:
                return False
            if int(state["num-slaves"]) != self.replicas:
                return False
        return True

    # -- addresses --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinel_nodes)
        return f"redis+sentinel://{hosts}/{self.master_name}/0"

    def sentinel_says(self) -> int:
        """The primary's port as the first live Sentinel answers."""
        for sentinel in self.sentinel_nodes:
            if sentinel.alive:
                with contextlib.suppress(redis.RedisError):
                    return sentinel.primary_port()
        raise RuntimeError("no Sentinel answers")

    def node(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def primary(self) -> RedisNode:
        return self.node(self.sentinel_says())

    def replica_nodes(self) -> list[RedisNode]:
        primary = self.sentinel_says()
        return [n for n in self.nodes if n.port != primary]

    def online_replicas(self) -> list[RedisNode]:
        """The replicas the primary lists as online, in node order."""
        info = self.primary().client().info("replication")
        ports = {
            int(value["port"])
            for key, value in info.items()
            if key.startswith("slave")
            and isinstance(value, dict)
            and value.get("state") == "online"
        }
        return [n for n in self.nodes if n.port in ports and n.alive and not n.frozen]

    def client(self) -> redis.Redis:
        """A client of the current primary (asks the Sentinels on every new connection)."""
        return redis_client(self.url, connect_timeout=2, socket_timeout=2)

    # -- faults -----------------------------------------------------------------------------

    def kill_primary(self) -> RedisNode:
        """``kill -9`` the current primary; returns it (``start`` brings it back as a replica)."""
        victim = self.primary()
        victim.kill()
        return victim

    def wait_for_failover(self, old_port: int, timeout: float = 60) -> RedisNode:
        """Wait until a quorum of Sentinels names a new primary that answers as one."""

        def promoted() -> bool:
            ports = [s.primary_port() for s in self.sentinel_nodes if s.alive]
            if len(ports) < self.quorum or any(p != ports[0] for p in ports):
                return False
            return ports[0] != old_port and self.node(ports[0]).role() == "master"

        wait_for(promoted, timeout, "Sentinel to promote a replica", interval=0.1)
        return self.primary()

    def stop_replica(self, node: RedisNode) -> None:
        node.stop()

    def start_replica(self, node: RedisNode) -> None:
        node.start()

    def cut_link(self, node: RedisNode) -> None:
        """Freeze the replica and close the primary's replication connection to it."""
        primary = self.primary()
        links = node.client().client_list(_type="master")
        node.freeze()
        for link in links:
            with contextlib.suppress(redis.ResponseError):
                primary.client().client_kill_filter(_type="replica", addr=link["laddr"])

    def restore_link(self, node: RedisNode) -> None:
        node.thaw()

    def wait_replicated(self, timeout: float = 30) -> None:
        """Wait until every live replica is online at the primary."""
        primary = self.primary()
        want = sum(1 for n in self.nodes if n.alive and not n.frozen and n is not primary)
        wait_for(lambda: self._replicas_online(primary) >= want, timeout, "replicas online")

    def destroy(self) -> None:
        for sentinel in self.sentinel_nodes:
            sentinel.kill()
        for node in self.nodes:
            node.thaw()
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)
