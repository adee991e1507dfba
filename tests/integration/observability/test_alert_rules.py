"""The alert rules, their promtool unit tests, the runbooks and the Grafana dashboard agree.

promtool comes from scripts/install-promtool.sh (Debian's prometheus package, extracted into
.cache/tools); set PROMTOOL to use another binary. When it cannot be obtained the promtool tests
fail: an unchecked rule file must not look green.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
FILES = ROOT / "helm" / "booking-service" / "files"
RULES = FILES / "alerts.rules.yaml"
RULE_TESTS = FILES / "alerts.tests.yaml"
DASHBOARD = FILES / "dashboard.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
INSTALL_SCRIPT = ROOT / "scripts" / "install-promtool.sh"

SEVERITIES = {"page", "ticket"}


# --------------------------------------------------------------------------- promtool


@dataclass(frozen=True)
class PromtoolInstall:
    path: Path | None
    problem: str = ""

    def require(self) -> Path:
        if self.path is None:
            pytest.fail(
                f"promtool is required to check the alert rules: {self.problem}", pytrace=False
            )
        return self.path


@pytest.fixture(scope="session")
def promtool_install() -> PromtoolInstall:
    override = os.environ.get("PROMTOOL")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            return PromtoolInstall(None, f"PROMTOOL={override} is not an executable file")
        return PromtoolInstall(path)
    try:
        done = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return PromtoolInstall(None, f"{INSTALL_SCRIPT.name} could not run: {error}")
    if done.returncode != 0:
        return PromtoolInstall(
            None,
            f"{INSTALL_SCRIPT.name} exited with {done.returncode}; it needs apt-get and dpkg-deb "
            f"(Debian) and access to the Debian mirror. Its output:\n{done.stderr.strip()}",
        )
    lines = done.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if path is None or not path.is_file():
        return PromtoolInstall(
            None, f"{INSTALL_SCRIPT.name} printed no usable path: {done.stdout!r}"
        )
    return PromtoolInstall(path)


def run_promtool(promtool: Path, *args: str, cwd: Path = FILES) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --------------------------------------------------------------------------- file parsing


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alert_rules()]


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_sections(path: Path) -> dict[str, str]:
    """Anchor -> body text of every heading in a Markdown file (fenced code skipped)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            current = sections.setdefault(github_anchor(match.group(1)), [])
        elif current is not None:
            current.append(line)
    return {anchor: "\n".join(body).strip() for anchor, body in sections.items()}


# PromQL words that are not metric names.
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a small tokenizer; enough for our rules)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # grouping label lists
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from the tables of docs/metrics.md (`| `name` | type | ...`)."""
    documented: dict[str, str] = {}
    for line in METRICS_DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\|\s*`([A-Za-z_:][\w:]*)`\s*\|\s*([\w ]+?)\s*\|", line)
        if match:
            documented[match.group(1)] = match.group(2).strip().lower()
    return documented


def undocumented(names: set[str], documented: dict[str, str]) -> set[str]:
    missing = set()
    for name in names:
        if name in documented:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base != name and documented.get(base) == "histogram":
            continue
        missing.add(name)
    return missing


# --------------------------------------------------------------------------- the rule file


def test_rule_file_is_a_plain_prometheus_rules_file() -> None:
    data = load_yaml(RULES)
    assert set(data) == {"groups"}, "the chart embeds this file as-is: only a top-level `groups:`"
    names = [group["name"] for group in data["groups"]]
    assert len(names) == len(set(names))
    assert alert_names(), "no alerts found"
    assert len(alert_names()) == len(set(alert_names())), "alert names must be unique"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_annotations_and_runbook(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert "for" in rule, f"{name}: state its `for:` explicitly (0m when it must fire at once)"
    assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity page|ticket"
    annotations = rule.get("annotations", {})
    for key in ("summary", "description", "runbook_url"):
        assert annotations.get(key, "").strip(), f"{name}: missing annotation {key}"
    assert annotations["runbook_url"] == f"docs/runbooks.md#{name.lower()}"


def test_rules_use_only_documented_metrics() -> None:
    documented = documented_metrics()
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            label = rule.get("alert") or rule.get("record")
            missing = undocumented(metric_names(rule["expr"]), documented)
            assert not missing, f"{label} uses metrics missing from docs/metrics.md: {missing}"


def test_every_alert_has_a_runbook_section() -> None:
    sections = markdown_sections(RUNBOOKS)
    for name in alert_names():
        anchor = name.lower()
        assert anchor in sections, f"docs/runbooks.md has no section `## {name}` (#{anchor})"
        body = sections[anchor]
        assert len(body.splitlines()) >= 5, f"runbook section {name} is too thin"
    assert any("dead" in anchor and "replay" in anchor for anchor in sections), (
        "docs/runbooks.md needs a DLQ drain/replay section"
    )


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (namespace, le) (rate(booking_email_send_seconds_bucket{type="x"}[5m])) '
        "/ on (namespace) group_left max without (pod) (booking:queue_ready:max) "
        'or absent(up{job=~".*worker.*"}) and time() - foo_seconds offset 5m > bool 3'
    )
    assert metric_names(expr) == {
        "booking_email_send_seconds_bucket",
        "booking:queue_ready:max",
        "up",
        "foo_seconds",
    }


# --------------------------------------------------------------------------- promtool


def test_install_script_is_idempotent(promtool_install: PromtoolInstall) -> None:
    if os.environ.get("PROMTOOL"):
        pytest.skip("PROMTOOL points at a binary; the install script is not used")
    path = promtool_install.require()
    again = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=30, check=True
    )
    assert again.stdout.strip().splitlines()[-1] == str(path)
    assert "downloading" not in again.stderr, "a cached promtool must not be downloaded again"


def test_promtool_check_rules(promtool_install: PromtoolInstall) -> None:
    done = run_promtool(promtool_install.require(), "check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_pass(promtool_install: PromtoolInstall) -> None:
    done = run_promtool(promtool_install.require(), "test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr


def alert_cases(test_group: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [case for case in test_group.get("alert_rule_test", []) if case["alertname"] == name]


def test_every_alert_has_firing_and_silent_cases() -> None:
    tests = load_yaml(RULE_TESTS)["tests"]
    names = set(alert_names())
    tested = {case["alertname"] for group in tests for case in group.get("alert_rule_test", [])}
    assert not tested - names, (
        f"tests for alerts that do not exist (they pass vacuously): {tested - names}"
    )
    for name in sorted(names):
        cases = [case for group in tests for case in alert_cases(group, name)]
        firing = [case for case in cases if case.get("exp_alerts")]
        silent = [case for case in cases if not case.get("exp_alerts")]
        assert firing, f"{name}: no test case where it fires"
        assert silent, f"{name}: no test case where it stays silent"
        for case in firing:
            for alert in case["exp_alerts"]:
                assert alert.get("exp_labels", {}).get("severity"), f"{name}: check its labels"
                assert set(alert.get("exp_annotations", {})) >= {
                    "summary",
                    "description",
                    "runbook_url",
                }, f"{name}: check all its annotations"


def mutated_suite(tmp: Path, name: str, expr: str, *, firing: bool) -> Path:
    """A rules file where alert `name` has `expr`, and the tests of that alert only."""
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                rule["expr"] = expr
    tests = load_yaml(RULE_TESTS)
    kept = []
    for group in tests["tests"]:
        cases = [
            case for case in alert_cases(group, name) if bool(case.get("exp_alerts")) == firing
        ]
        if cases:
            group = copy.deepcopy(group)
            group["alert_rule_test"] = cases
            group.pop("promql_expr_test", None)
            kept.append(group)
    rules_path = tmp / f"{name}.{firing}.rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    tests["rule_files"] = [str(rules_path)]
    tests["tests"] = kept
    tests_path = tmp / f"{name}.{firing}.tests.yaml"
    tests_path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    return tests_path


def test_each_alert_test_can_fail(promtool_install: PromtoolInstall, tmp_path: Path) -> None:
    """Break each alert both ways; its own test cases must notice.

    Never firing (`vector(1) < 0`) must fail its firing cases; always firing (`vector(1)`) must
    fail its silent cases.
    """
    promtool = promtool_install.require()
    jobs = []
    for name in alert_names():
        jobs.append(
            (name, "never fires", mutated_suite(tmp_path, name, "vector(1) < 0", firing=True))
        )
        jobs.append(
            (name, "always fires", mutated_suite(tmp_path, name, "vector(1)", firing=False))
        )

    def run(job: tuple[str, str, Path]) -> tuple[str, str, int]:
        name, mutation, path = job
        return (
            name,
            mutation,
            run_promtool(promtool, "test", "rules", str(path), cwd=tmp_path).returncode,
        )

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, jobs))
    survived = [f"{name} ({mutation})" for name, mutation, code in results if code == 0]
    assert not survived, f"alert tests still pass with a broken rule: {survived}"


# --------------------------------------------------------------------------- the dashboard


def dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target.get("expr", "")


def test_dashboard_is_valid_and_uses_documented_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("uid") and dashboard.get("title")
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    documented = documented_metrics()
    targets = list(dashboard_targets(dashboard))
    assert len(targets) >= 10
    used: set[str] = set()
    for title, expr in targets:
        assert expr.strip(), f"panel {title!r} has an empty query"
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        missing = undocumented(names, documented)
        assert not missing, f"panel {title!r} uses metrics missing from docs/metrics.md: {missing}"
        used |= names

    def check_datasources(node: Any) -> None:
        if isinstance(node, dict):
            if "datasource" in node and isinstance(node["datasource"], dict):
                assert node["datasource"].get("uid") == "${datasource}", node["datasource"]
            for value in node.values():
                check_datasources(value)
        elif isinstance(node, list):
            for value in node:
                check_datasources(value)

    check_datasources(dashboard["panels"])
    # The panels the runbooks point at.
    for name in (
        "booking_queue_depth",
        "booking_emails_total",
        "booking_email_send_seconds_bucket",
        "booking_policy_drift_total",
        "booking_outbox_pending",
        "booking_outbox_oldest_age_seconds",
        "booking_flag_enabled",
        "booking_dead_letters_recorded_total",
    ):
        assert name in used, f"the dashboard has no panel on {name}"


def test_metrics_doc_lists_every_service_metric() -> None:
    from prometheus_client.registry import REGISTRY

    import service.metrics  # noqa: F401  (registers the metrics)

    documented = documented_metrics()
    defined = {family.name for family in REGISTRY.collect() if family.name.startswith("booking_")}
    assert defined, "service.metrics defined nothing?"
    for name in defined:
        # Counters are collected under their name without the _total suffix.
        assert name in documented or f"{name}_total" in documented, (
            f"{name} is not in docs/metrics.md"
        )
