"""requirements.lock (what the image installs) matches pyproject.toml.

Regenerating the lock needs the package index, so this offline check instead requires that
every dependency of ``[project]`` and ``[build-system]`` is pinned in the lock with a version
inside its range, and that every pin is exact and carries hashes. ``make lock`` regenerates
the lock; installing it with ``--require-hashes`` (``make`` and the Dockerfile do) fails when a
transitive dependency is missing.
"""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.tooling import REPO

PYPROJECT = REPO / "pyproject.toml"
LOCK = REPO / "requirements.lock"


def lock_entries(text: str) -> tuple[dict[str, list[Requirement]], list[str]]:
    """Pins by canonical name, and the problems of pins that are not exact or have no hash."""
    entries: dict[str, list[Requirement]] = defaultdict(list)
    problems = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        pins = list(requirement.specifier)
        if len(pins) != 1 or pins[0].operator != "==" or "*" in pins[0].version:
            problems.append(f"{spec.strip()}: not pinned to one exact version")
        if not hashes or not all(h.strip().startswith("sha256:") for h in hashes):
            problems.append(f"{requirement.name}: no sha256 hash")
        entries[canonicalize_name(requirement.name)].append(requirement)
    return entries, problems


def lock_problems(pyproject_text: str, lock_text: str) -> list[str]:
    project = tomllib.loads(pyproject_text)
    wanted = [
        *project["project"]["dependencies"],
        *project["build-system"]["requires"],
    ]
    entries, problems = lock_entries(lock_text)
    for dependency in map(Requirement, wanted):
        pins = entries.get(canonicalize_name(dependency.name))
        if not pins:
            problems.append(f"{dependency}: in pyproject.toml, not in requirements.lock")
            continue
        for pin in pins:
            version = next(iter(pin.specifier)).version
            if not dependency.specifier.contains(version, prereleases=True):
                problems.append(f"{dependency}: the lock pins {version}")
    return problems


def test_the_lock_pins_every_dependency_within_its_range() -> None:
    problems = lock_problems(PYPROJECT.read_text(), LOCK.read_text())
    assert not problems, "requirements.lock is out of date; run `make lock`:\n" + "\n".join(
        problems
    )


def test_the_check_finds_a_stale_lock() -> None:
    lock = LOCK.read_text()
    stale = re.sub(r"^redis==[^ ]+", "redis==4.6.0", lock, flags=re.M)
    stale = re.sub(r"^pika==[^\n]*\n(\s+--hash=[^\n]*\n)+", "", stale, flags=re.M)
    stale = re.sub(r"^(tqdm==[^ ]+) \\\n(\s+--hash=[^\n]*\n)+", r"\1\n", stale, flags=re.M)
    problems = lock_problems(PYPROJECT.read_text(), stale)
    assert "redis<9,>=5: the lock pins 4.6.0" in problems
    assert "pika<2,>=1.3: in pyproject.toml, not in requirements.lock" in problems
    assert "tqdm: no sha256 hash" in problems
    assert len(problems) == 3, problems
