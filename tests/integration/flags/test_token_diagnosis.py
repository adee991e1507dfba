"""``python -m service flags`` against a real Unleash that refuses the token: it says why."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from harness.unleash import ENVIRONMENT, PROJECT, UnleashServer

pytestmark = [pytest.mark.unleash, pytest.mark.usefixtures("no_thread_outlives_the_test")]

REPO = Path(__file__).resolve().parents[3]
ADVICE = "it must be a client (backend) token, not an admin, personal or frontend token"


def flags_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service", "flags", "--wait", "1", *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_an_unknown_token_is_reported_as_401_with_what_to_check(
    unleash_env: dict[str, str],
) -> None:
    secret = secrets.token_hex(16)
    out = flags_cli({**unleash_env, "UNLEASH_API_TOKEN": f"{PROJECT}:{ENVIRONMENT}.{secret}"})
    assert "(REFUSES the token: HTTP 401;" in out
    assert "Problem: HTTP 401 Unauthorized: Unleash does not accept UNLEASH_API_TOKEN" in out
    assert f"project '{PROJECT}', environment '{ENVIRONMENT}'" in out
    assert ADVICE in out
    assert secret not in out


def test_an_admin_token_is_reported_as_403_with_the_servers_reason(
    unleash_server: UnleashServer, unleash_env: dict[str, str]
) -> None:
    report = json.loads(
        flags_cli({**unleash_env, "UNLEASH_API_TOKEN": unleash_server.admin_token}, "--json")
    )
    assert report["synced"] is False and report["http_status"] == 403
    problem = report["problem"]
    assert problem.startswith("HTTP 403 Forbidden: UNLEASH_API_TOKEN may not read the client API")
    assert "all projects, all environments" in problem
    assert "Unleash says: invalid token: expected a different token type" in problem
    assert ADVICE in problem
    assert unleash_server.admin_token.partition(".")[2] not in problem


def test_a_missing_token_is_reported_as_401(unleash_env: dict[str, str]) -> None:
    env = {key: value for key, value in unleash_env.items() if key != "UNLEASH_API_TOKEN"}
    env["UNLEASH_API_TOKEN"] = ""
    out = flags_cli(env)
    assert (
        "HTTP 401 Unauthorized: this Unleash requires a token and UNLEASH_API_TOKEN is not set"
        in out
    )


def test_flags_the_token_cannot_see_are_named(
    unleash_server: UnleashServer, unleash_env: dict[str, str]
) -> None:
    unleash_server.ensure_toggle("email-queue-enabled", True)
    unleash_server.delete_toggle("policy-requote-enabled")
    try:
        out = flags_cli(unleash_env)
    finally:
        unleash_server.ensure_toggle("policy-requote-enabled", True)
    assert "(reachable;" in out
    assert "Problem:" not in out
    assert "Not in Unleash for this token: policy-requote-enabled" in out
    assert f"project '{PROJECT}', environment '{ENVIRONMENT}'" in out
