"""``make venv`` (the first step of every make target) against broken interpreters and venvs.

Debian and Ubuntu ship ensurepip in python3-venv; without it ``python3 -m venv`` exits 1 and
leaves a virtualenv without pip. These run the real Makefile step on such states.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.tooling import REPO

BASE_PYTHON = os.path.realpath(sys.executable)
APT_HINT = "apt-get install python3-venv"


def make_venv(venv: Path, python: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "-C", str(REPO), "venv", f"VENV={venv}", f"PYTHON={python}"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def pip_runs(venv: Path) -> bool:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, timeout=60
    )
    return done.returncode == 0


def test_a_venv_without_pip_is_rebuilt_and_a_good_one_is_kept(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert (venv / "bin" / "python").exists() and not pip_runs(venv)

    done = make_venv(venv, BASE_PYTHON)
    assert done.returncode == 0, done.stderr
    assert "has no working pip (a half-built virtualenv?)" in done.stderr
    assert pip_runs(venv)

    marker = venv / "kept"
    marker.touch()
    again = make_venv(venv, BASE_PYTHON)
    assert again.returncode == 0 and again.stderr == "" and marker.exists()


def test_a_python_without_ensurepip_gets_the_package_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "no-ensurepip"
    (shadow / "ensurepip").mkdir(parents=True)
    (shadow / "ensurepip" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n"
    )
    venv = tmp_path / ".venv"
    done = make_venv(venv, BASE_PYTHON, PYTHONPATH=str(shadow))
    assert done.returncode != 0
    assert "its venv/ensurepip support is missing" in done.stderr and APT_HINT in done.stderr
    assert not venv.exists()


def test_a_venv_build_that_fails_half_way_leaves_nothing_behind(tmp_path: Path) -> None:
    """Like Debian without python3-venv: ``-m venv`` builds python, no pip, and exits 1."""
    fake = tmp_path / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then\n'
        f'  "{BASE_PYTHON}" -m venv --without-pip "$3"\n'
        '  echo "The virtual environment was not created successfully because ensurepip is '
        'not available." >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec "{BASE_PYTHON}" "$@"\n'
    )
    fake.chmod(0o755)
    venv = tmp_path / ".venv"
    done = make_venv(venv, str(fake))
    assert done.returncode != 0
    assert "ensurepip is not available" in done.stderr
    assert "removed the half-built" in done.stderr and APT_HINT in done.stderr
    assert not venv.exists()
