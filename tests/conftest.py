"""Shared fixtures come from the plugins in ``tests/support`` (one module per area), so that
unit, integration and end-to-end tests use them without importing across folders. Servers start
only when a test asks for one: ``tests/unit`` needs none."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

pytest_plugins = [
    "tests.support.servers",
    "tests.support.sentinel",
    "tests.support.emails",
    "tests.support.capacity",
    "tests.support.flags",
    "tests.support.tooling",
    "tests.support.rabbit_cluster",
    "tests.support.console",
]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A terminated run (SIGTERM, e.g. a CI timeout) still tears its servers down."""
    signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs a CLI command in-process configures logging onto the stream pytest
    captured for it; put the root logger back, so later records never reach a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
