"""``python -m bench [NAME ...] [--only NAME] [--quick]``: run the benchmarks, each in its own process.

Each benchmark starts its own throwaway servers, writes ``bench/results/<name>.json`` and
``<name>.png``, and prints its markdown; this collects them into ``bench/results/summary.md``.
A benchmark that fails is reported as failed in the summary, with no figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, machine, say

BENCHMARKS = ("producer", "render", "throughput", "recovery", "capacity", "backfill", "console")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(BENCHMARKS)}")
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="repeatable")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and messages")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    chosen = [*args.names, *(args.only or [])] or list(BENCHMARKS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for name in chosen:
        say(f"=== {name} ===")
        started = time.monotonic()
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if args.quick else [])]
        code = subprocess.run(cmd, cwd=ROOT, check=False, timeout=3600).returncode
        say(f"{name}: exit {code} after {time.monotonic() - started:.0f} s")
        if code:
            failed.append(name)
            (RESULTS / f"{name}.md").write_text(
                f"### {name}\n\n**FAILED** (exit {code}) in the last run: no figures; see the "
                f"output of `python -m bench --only {name}`.\n"
            )
    m = machine()
    sections = [
        (RESULTS / f"{name}.md").read_text()
        for name in BENCHMARKS
        if (RESULTS / f"{name}.md").exists()
    ]
    header = (
        "# Benchmarks\n\n"
        f"`python -m bench{' --quick' if args.quick else ''}` (`make bench`), last run "
        f"{m['when']} on {m['cpus']} CPUs, Python {m['python']}, {m['platform']}. Every figure "
        "is a median over several runs, and every ratio was measured side by side in the same "
        "run against its baseline on the same machine (a shared, noisy one: compare ratios, "
        "not absolute times).\n\n"
    )
    (RESULTS / "summary.md").write_text(header + "\n".join(sections))
    say(f"summary: {RESULTS / 'summary.md'}")
    if failed:
        say(f"failed: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
