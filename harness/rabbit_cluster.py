"""A three-node RabbitMQ cluster whose links can really be cut, for HA tests and failover runs.

Each node runs in a network namespace of its own (``ip netns``), created here and deleted by
``destroy``. Two kinds of veth links:

- a *cluster* link from each node's namespace to a bridge in a hub namespace (also ours): the
  Erlang distribution between the nodes goes over it, and ``partition`` cuts it
  (``ip link set down`` on the hub's end) so the node loses both other nodes at once;
- a *client* link from each node's namespace to this machine's namespace, a /30 of its own:
  producers and workers here reach the node's AMQP port over it; it is never cut.

No firewall rule, route or address of the machine's own interfaces is touched: the only things
added here are the three client veth ends and their /30s, removed with the namespaces.

Node names are Erlang long names on the cluster link's address (``rabbit@10.255.0.2``,
``RABBITMQ_USE_LONGNAME=true``), so nothing needs ``/etc/hosts``. Inside its namespace a node
uses the standard ports (AMQP 5672, epmd 4369, distribution 25672): the namespace is private,
nothing else listens there. Management is off. ``cluster_partition_handling = pause_minority``:
with three nodes, the side of a partition that sees only itself pauses (closes its clients'
connections, stops listening) instead of going on with a divergent view, so clients move to
the majority and the node rejoins without an operator when the link comes back. (``autoheal``
would restart the losing side and may drop what it accepted meanwhile; ``ignore`` needs an
operator.) ``net_ticktime`` is 10 s (60 s by default) so that a cut is noticed within ~10-15 s.

Needs root (namespaces, veth) and the Debian ``rabbitmq-server`` package.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from harness.servers import (
    RabbitServer,
    RabbitUnavailable,
    _find_rabbitmq_server,
    _is_root,
    _user_exists,
    wait_for,
)

RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
HUB_NET = "10.255.0"
"""The cluster links' /24; it exists only inside our namespaces."""
AMQP_PORT = 5672


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _client_subnet() -> ipaddress.IPv4Network:
    """A /28 in 10.0.0.0/8 that no route of this machine covers or is covered by."""
    routes = []
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("broadcast", "local", "unicast"):
            first = line.split()[1]
        with contextlib.suppress(ValueError):
            routes.append(ipaddress.ip_network("0.0.0.0/0" if first == "default" else first))
    for _ in range(200):
        net = ipaddress.ip_network(
            f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.{random.randint(0, 15) * 16}/28"
        )
        if not any(net.overlaps(r) for r in routes if r.prefixlen > 0):
            return net
    raise RabbitUnavailable("no free private subnet for the client links")


@dataclass
class ClusterNode(RabbitServer):
    """One node: a ``RabbitServer`` started inside its network namespace."""

    netns: str = ""
    dist_ip: str = ""
    client_ip: str = ""
    uid_gid: tuple[int, int] | None = None

    @property
    def nodename(self) -> str:
        return f"rabbit@{self.dist_ip}"

    @property
    def host_port(self) -> str:
        return f"{self.client_ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host_port}/%2F"

    def _node_env(self) -> dict[str, str]:
        env = super()._node_env()
        for name in ("RABBITMQ_NODE_IP_ADDRESS", "ERL_EPMD_ADDRESS"):
            env.pop(name)
        env["RABBITMQ_USE_LONGNAME"] = "true"
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = ""
        return env

    def in_netns(self, cmd: list[str]) -> list[str]:
        """``cmd`` run in the node's namespace, as the node's user."""
        prefix = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if self.uid_gid is not None:
            prefix += ["--setuid", str(self.uid_gid[0]), "--setgid", str(self.uid_gid[1])]
        return [*prefix, "--", *cmd]

    def _spawn(self, cmd: list[str], out: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.in_netns(cmd),
            cwd=self.root,
            env=self._node_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _epmd_command(self, epmd: str) -> list[str]:
        return [epmd, "-port", str(self.epmd_port)]

    def _epmd_answers(self, epmd: str) -> bool:
        self._alive(self.epmd)
        names = self.in_netns([epmd, "-port", str(self.epmd_port), "-names"])
        return subprocess.run(names, capture_output=True, timeout=5, check=False).returncode == 0

    def ctl(self, *args: str, timeout: float = 60, tool: str = RABBITMQCTL) -> str:
        """Run ``rabbitmqctl ARGS`` (or another CLI tool) against this node; its stdout."""
        done = subprocess.run(
            self.in_netns([tool, "-n", self.nodename, *args]),
            cwd=self.root,
            env=self._node_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(tool).name} {' '.join(args)} on {self.nodename} exited with "
                f"{done.returncode}: {(done.stderr or done.stdout).strip()[-800:]}"
            )
        return done.stdout

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill_9(self) -> None:
        """``kill -9`` the node (its whole process group: beam and its helpers); epmd stays."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 120) -> None:
        """Start the node again on its data directory; it rejoins the cluster by itself."""
        self.kill_9()
        self.start(timeout)

    def end(self) -> None:
        self._end(self.proc, 20)
        self.proc = None
        self._end(self.epmd, 5)
        self.epmd = None


@dataclass
class RabbitCluster:
    """Three clustered nodes with quorum-queue-ready defaults; see the module docstring."""

    nodes: list[ClusterNode]
    tag: str
    root: Path
    hub: str
    _destroyed: bool = False
    _cut: set[int] = field(default_factory=set)

    @classmethod
    def start_new(cls, size: int = 3, timeout: float = 180, attempts: int = 2) -> RabbitCluster:
        """Start and join ``size`` nodes; a failed start (a join refused while the first node
        was still settling, on a loaded machine) is reported on stderr and tried again on fresh
        namespaces, ``attempts`` times in all."""
        for attempt in range(1, attempts + 1):
            try:
                return cls._start(size, timeout)
            except RabbitUnavailable as error:
                if attempt == attempts or "could not start" not in str(error):
                    raise
                print(
                    f"cluster start {attempt}/{attempts} failed, retrying: {error}", file=sys.stderr
                )
        raise AssertionError("unreachable")

    @classmethod
    def _start(cls, size: int, timeout: float) -> RabbitCluster:
        binary = _find_rabbitmq_server()
        if binary is None or not Path(RABBITMQCTL).exists():
            raise RabbitUnavailable("no rabbitmq-server: install the 'rabbitmq-server' package")
        if not _is_root() or shutil.which("nsenter") is None or shutil.which("ip") is None:
            raise RabbitUnavailable("a RabbitMQ cluster needs root, ip (iproute2) and nsenter")
        tag = secrets.token_hex(3)
        root = Path(tempfile.mkdtemp(prefix="booking-rabbit-cluster-"))
        root.chmod(0o755)
        uid_gid = None
        if _user_exists("rabbitmq"):
            import pwd

            pw = pwd.getpwnam("rabbitmq")
            uid_gid = (pw.pw_uid, pw.pw_gid)
        cookie = secrets.token_hex(20).upper()
        name = f"booking-cluster-{tag}"
        subnet = _client_subnet()
        hosts = list(subnet.hosts())
        nodes = []
        for i in range(size):
            node_root = root / f"node{i + 1}"
            node_root.mkdir()
            nodes.append(
                ClusterNode(
                    root=node_root,
                    binary=binary,
                    port=AMQP_PORT,
                    dist_port=25672,
                    epmd_port=4369,
                    cluster_name=name,
                    cookie=cookie,
                    extra_config="cluster_partition_handling = pause_minority\n",
                    netns=f"rbq{tag}n{i + 1}",
                    dist_ip=f"{HUB_NET}.{i + 2}",
                    client_ip=str(hosts[4 * i + 1]),
                    uid_gid=uid_gid,
                )
            )
        cluster = cls(nodes=nodes, tag=tag, root=root, hub=f"rbq{tag}hub")
        try:
            cluster._make_network(subnet)
            for node in nodes:
                (node.root / "advanced.config").write_text("[{kernel, [{net_ticktime, 10}]}].\n")
            _parallel([lambda n=n: n.start(timeout) for n in nodes])  # type: ignore[misc]
            first = nodes[0]
            _parallel([lambda n=n: cluster._join(n, first) for n in nodes[1:]])  # type: ignore[misc]
            wait_for(lambda: cluster.cluster_size() == size, 60, "all nodes in the cluster", 0.5)
        except Exception as error:
            tails = "\n".join(f"{n.nodename}:\n{n.log_tail(1500)}" for n in nodes)
            cluster.destroy()
            raise RabbitUnavailable(  # the cause last, where a truncated log still shows it
                f"could not start a {size}-node RabbitMQ cluster (node logs follow the cause):\n"
                f"{tails}\ncause: {type(error).__name__}: {error}"
            ) from None
        return cluster

    # -- network ----------------------------------------------------------------------------

    def _make_network(self, subnet: ipaddress.IPv4Network) -> None:
        hosts = list(subnet.hosts())
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes, 1):
            ns = node.netns
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # the cluster link: node <-> hub bridge
            _ip(
                "link", "add", "d0", "netns", ns, "type", "veth", "peer", f"d{i}", "netns", self.hub
            )
            _ip("-n", self.hub, "link", "set", f"d{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{node.dist_ip}/24", "dev", "d0")
            _ip("-n", ns, "link", "set", "d0", "up")
            # the client link: this machine <-> node
            outside = f"rbq{self.tag}c{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "c0", "netns", ns)
            _ip("addr", "add", f"{hosts[4 * (i - 1)]}/30", "dev", outside)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{node.client_ip}/30", "dev", "c0")
            _ip("-n", ns, "link", "set", "c0", "up")

    def _join(self, node: ClusterNode, to: ClusterNode) -> None:
        node.ctl("stop_app")
        node.ctl("reset")
        for attempt in range(5):
            try:
                node.ctl("join_cluster", to.nodename)
                break
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(2)
        node.ctl("start_app")

    # -- what the tests use -----------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node, in node order."""
        return [n.url for n in self.nodes]

    def broker_url(self, order: list[int] | None = None) -> str:
        """``BROKER_URL`` listing the nodes (0-based indexes, default all in order)."""
        picked = [self.nodes[i] for i in (order if order is not None else range(len(self.nodes)))]
        return "amqp://guest:guest@" + ",".join(n.host_port for n in picked) + "/%2F"

    def live_nodes(self) -> list[ClusterNode]:
        return [n for i, n in enumerate(self.nodes) if n.running and i not in self._cut]

    def ctl(self, *args: str, timeout: float = 30, tool: str = RABBITMQCTL) -> str:
        """Run a CLI command on the first live node that answers."""
        error: Exception | None = None
        for node in self.live_nodes():
            try:
                return node.ctl(*args, timeout=timeout, tool=tool)
            except (RuntimeError, subprocess.TimeoutExpired) as failure:
                error = failure
        raise RuntimeError(f"no live node answered: {error}")

    def cluster_size(self) -> int:
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        return len(status.get("running_nodes", []))

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue of the default vhost: name -> type, leader, members, messages."""
        out = self.ctl(
            "list_queues",
            "name",
            "type",
            "leader",
            "members",
            "messages",
            "arguments",
            "--formatter",
            "json",
        )
        return {q["name"]: q for q in json.loads(out)}

    def leader_of(self, queue: str) -> int:
        """The index of the node leading quorum queue ``queue``."""
        leader = self.queues()[queue]["leader"]
        for i, node in enumerate(self.nodes):
            if node.nodename == leader:
                return i
        raise RuntimeError(f"{queue} is led by an unknown node {leader!r}")

    def kill_9(self, index: int) -> None:
        self.nodes[index].kill_9()

    def restart(self, index: int, timeout: float = 120) -> None:
        self.nodes[index].restart(timeout)

    def cut(self, index: int) -> None:
        """Cut node ``index`` off from the others (its cluster link down); clients still see it."""
        _ip("-n", self.hub, "link", "set", f"d{index + 1}", "down")
        self._cut.add(index)

    def heal(self, index: int) -> None:
        _ip("-n", self.hub, "link", "set", f"d{index + 1}", "up")
        self._cut.discard(index)

    @contextlib.contextmanager
    def partitioned(self, index: int) -> Iterator[None]:
        self.cut(index)
        try:
            yield
        finally:
            self.heal(index)

    def partition(self, index: int, seconds: float) -> None:
        """Cut node ``index`` off from the other two for ``seconds``, then heal the link."""
        with self.partitioned(index):
            time.sleep(seconds)

    def wait_running(self, timeout: float = 120) -> None:
        """Until every node is running and clustered again (after a restart or a partition)."""
        wait_for(lambda: self.cluster_size() == len(self.nodes), timeout, "the whole cluster", 1.0)

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.end()
        for ns in [n.netns for n in self.nodes] + [self.hub]:
            _ip("netns", "del", ns, check=False)
        for i in range(1, len(self.nodes) + 1):  # gone with their peers; just in case
            _ip("link", "del", f"rbq{self.tag}c{i}", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    stop = destroy


def _parallel(tasks: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def run(task: Callable[[], None]) -> None:
        try:
            task()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
