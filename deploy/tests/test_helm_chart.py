"""The Helm chart lints, renders, and refuses bad values with a clear message."""

from __future__ import annotations

import re
import shlex

import pytest

import manifests
from manifests import RenderError, by_name, of_kind, pod_spec, render_chart


@pytest.mark.parametrize("values_name", ["defaults", "ci/prod-values.yaml", "all services"])
def test_helm_lint_strict_passes(values_name: str) -> None:
    values = {
        "defaults": None,
        "ci/prod-values.yaml": manifests.prod_values(),
        "all services": manifests.all_services_values(),
    }[values_name]
    assert manifests.lint_chart(values) == []


# The services the binary serves today; the chart turns exactly these on by default.
DEFAULT_SERVICES = ["identity", "touchpoints", "scoring", "feedback"]


def test_default_values_render_the_served_services() -> None:
    documents = render_chart()
    components = {doc["metadata"]["labels"]["app.kubernetes.io/component"] for doc in documents}
    assert components == {c for name in DEFAULT_SERVICES for c in (name, f"{name}-migrate")}
    for name in DEFAULT_SERVICES:
        kinds = sorted(
            doc["kind"] for doc in documents
            if doc["metadata"]["labels"]["app.kubernetes.io/component"] in (name, f"{name}-migrate")
        )
        assert kinds == sorted(
            ["Deployment", "Service", "ServiceAccount", "NetworkPolicy", "PodDisruptionBudget", "Secret", "Job", "NetworkPolicy"]
        ), name


def _pod_peer_services(documents: list[dict], rules: list[dict], side: str) -> list[str]:
    """The services whose rendered Deployments' pods the in-namespace pod peers of these rules select."""
    selectors = [
        peer["podSelector"]["matchLabels"]
        for rule in rules for peer in rule.get(side, []) if "podSelector" in peer and "namespaceSelector" not in peer
    ]
    return sorted(
        deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        for deployment in of_kind(documents, "Deployment")
        if any(manifests.labels_match(s, deployment["spec"]["template"]["metadata"]["labels"]) for s in selectors)
    )


@pytest.mark.parametrize(
    ("service", "health_service"),
    [
        ("touchpoints", "clm.touchpoint.v1.TouchpointService"),
        ("scoring", "clm.scoring.v1.LifecycleService"),
        ("feedback", "clm.feedback.v1.SurveyService"),
    ],
)
def test_default_service_calls_its_callees_and_nothing_else(service: str, health_service: str) -> None:
    """Redis configured, yet the service gets neither it nor identity's hash key; only its callers and callees are wired."""
    documents = render_chart({"redis": {"url": "redis://redis:6379/"}})
    callees = sorted(manifests.SERVICE_CALLS[service])
    callers = sorted(c for c in DEFAULT_SERVICES if service in manifests.SERVICE_CALLS[c])
    deployment = by_name(documents, "Deployment", f"clm-{service}")
    container = pod_spec(deployment)["containers"][0]
    assert container["args"] == ["serve", service]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": health_service}
    env = {entry["name"]: entry for entry in container["env"]}
    for callee in callees:
        name = f"CLM_{callee.upper()}_URL"
        assert env[name] == {"name": name, "value": f"http://clm-{callee}:50051"}
    assert env["CLM_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"clm-{service}", "key": "database-url"}
    assert "CLM_REDIS_URL" not in env and "CLM_IDENTITY_HASH_KEY" not in env
    assert set(manifests.secret_data(by_name(documents, "Secret", f"clm-{service}"))) == {"database-url"}
    assert "CLM_REDIS_URL" in {e["name"] for e in pod_spec(by_name(documents, "Deployment", "clm-identity"))["containers"][0]["env"]}
    job = by_name(documents, "Job", f"clm-{service}-migrate")
    assert pod_spec(job)["containers"][0]["args"] == ["migrate", service]

    for callee in callees:
        callee_ingress = by_name(documents, "NetworkPolicy", f"clm-{callee}")["spec"]["ingress"]
        assert service in _pod_peer_services(documents, callee_ingress, "from"), f"{callee} must admit {service}"
    policy = by_name(documents, "NetworkPolicy", f"clm-{service}")["spec"]
    assert _pod_peer_services(documents, policy["ingress"], "from") == callers
    if not callers:
        assert policy["ingress"] == [], f"nothing calls {service} by default"
    assert _pod_peer_services(documents, policy["egress"], "to") == callees
    for rule in policy["egress"]:
        if any("podSelector" in peer and "namespaceSelector" not in peer for peer in rule.get("to", [])):
            assert rule["ports"] == [{"protocol": "TCP", "port": 50051}]
    egress_ports = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    assert egress_ports == {53, 5432, 50051}, f"no route to Redis for {service}"


def test_default_deployment_runs_one_service_with_grpc_probes() -> None:
    deployment = by_name(render_chart(), "Deployment", "clm-identity")
    assert deployment is not None
    container = pod_spec(deployment)["containers"][0]
    assert container["command"] == ["/usr/local/bin/clm"]
    assert container["args"] == ["serve", "identity"]
    assert container["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": "clm.identity.v1.CustomerService"}
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["CLM_LISTEN_ADDR"]["value"] == "0.0.0.0:50051"
    assert env["CLM_MIGRATE_ON_START"]["value"] == "false"
    assert env["CLM_LOG_FORMAT"]["value"] == "json"
    assert env["CLM_IDENTITY_HASH_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "clm-identity"


def test_prod_values_take_every_secret_from_existing_secrets() -> None:
    documents = render_chart(manifests.prod_values())
    assert of_kind(documents, "Secret") == [], "production values must not make the chart render a Secret"
    deployment = by_name(documents, "Deployment", "clm-identity")
    assert "replicas" not in deployment["spec"], "with an HPA the Deployment must leave replicas alone"
    env = {entry["name"]: entry for entry in pod_spec(deployment)["containers"][0]["env"]}
    assert env["CLM_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "clm-identity-database", "key": "url"}
    assert env["CLM_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "clm-redis", "key": "url"}
    assert env["CLM_IDENTITY_HASH_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "clm-identity-hash-key", "key": "hash-key"}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http://otel-collector")
    assert env["OTEL_SERVICE_NAME"]["value"] == "clm-identity"
    assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    hpa = by_name(documents, "HorizontalPodAutoscaler", "clm-identity")
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 12
    policy = by_name(documents, "NetworkPolicy", "clm-identity")
    peers = policy["spec"]["ingress"][0]["from"]
    namespaces = [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in peers if "namespaceSelector" in peer]
    assert namespaces == ["web-shop", "support-desk"]
    callers = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in peers if "namespaceSelector" not in peer]
    assert callers == ["feedback", "scoring", "touchpoints"]
    for service in ("touchpoints", "scoring", "feedback"):
        deployment = by_name(documents, "Deployment", f"clm-{service}")
        assert "replicas" not in deployment["spec"], service
        env = {entry["name"]: entry for entry in pod_spec(deployment)["containers"][0]["env"]}
        assert env["CLM_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": f"clm-{service}-database", "key": "url"}
        for callee in manifests.SERVICE_CALLS[service]:
            assert env[f"CLM_{callee.upper()}_URL"]["value"] == f"http://clm-{callee}:50051"
        assert env["OTEL_SERVICE_NAME"]["value"] == f"clm-{service}"
        assert "CLM_REDIS_URL" not in env, service
        assert by_name(documents, "HorizontalPodAutoscaler", f"clm-{service}") is not None


def test_all_services_wire_callers_and_callees() -> None:
    documents = render_chart(manifests.all_services_values())
    for name, calls in manifests.SERVICE_CALLS.items():
        deployment = by_name(documents, "Deployment", f"clm-{name}")
        assert deployment is not None, name
        env = {entry["name"]: entry.get("value") for entry in pod_spec(deployment)["containers"][0]["env"]}
        urls = {k: v for k, v in env.items() if re.fullmatch(r"CLM_[A-Z]+_URL", k) and k[4:-4].lower() in manifests.SERVICE_CALLS}
        assert urls == {f"CLM_{callee.upper()}_URL": f"http://clm-{callee}:50051" for callee in calls}
        policy = by_name(documents, "NetworkPolicy", f"clm-{name}")
        egress_components = {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for rule in policy["spec"]["egress"]
            for peer in rule.get("to", [])
            if "podSelector" in peer and "namespaceSelector" not in peer
        }
        assert egress_components == set(calls), name
        callers = {caller for caller, callees in manifests.SERVICE_CALLS.items() if name in callees}
        ingress_components = {
            peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for rule in policy["spec"]["ingress"]
            for peer in rule.get("from", [])
        }
        assert ingress_components == callers, name


# scoring and feedback call each other: they are on together or off together.
@pytest.mark.parametrize(
    "enabled", [["identity"], ["identity", "touchpoints"], ["identity", "touchpoints", "scoring", "feedback"]]
)
def test_disabled_services_render_nothing(enabled: list[str]) -> None:
    values = {"services": {name: {"enabled": name in enabled} for name in manifests.SERVICE_CALLS}}
    names = {doc["metadata"]["name"] for doc in render_chart(values)}
    disabled = [name for name in manifests.SERVICE_CALLS if name not in enabled]
    assert not [name for name in names if any(other in name for other in disabled)]


@pytest.mark.parametrize(
    ("disabled", "message"),
    [
        (["touchpoints", "feedback"], r"services\.scoring calls touchpoints, but services\.touchpoints\.enabled is false"),
        (["identity", "scoring", "feedback"], r"services\.touchpoints calls identity, but services\.identity\.enabled is false"),
        (["identity", "touchpoints", "scoring"], r"services\.feedback calls identity, but services\.identity\.enabled is false"),
        (["touchpoints"], r"services\.feedback calls touchpoints, but services\.touchpoints\.enabled is false"),
        (["scoring"], r"services\.feedback calls scoring, but services\.scoring\.enabled is false"),
        (["feedback"], r"services\.scoring calls feedback, but services\.feedback\.enabled is false"),
    ],
)
def test_calling_a_disabled_service_is_refused(disabled: list[str], message: str) -> None:
    values = {"services": {name: {"enabled": False} for name in disabled}}
    with pytest.raises(RenderError, match=message):
        render_chart(values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"services": {"identity": {"replicas": "three"}}}, [r"services.identity.replicas|services/identity/replicas", r"integer"]),
        ({"services": {"identiy": {"enabled": True}}}, [r"identiy", r"not allowed|additional"]),
        ({"config": {"logFormat": "xml"}}, [r"logFormat", r"text.*json|one of"]),
        ({"services": {"identity": {"podDisruptionBudget": {"maxUnavailble": 1}}}}, [r"maxUnavailble"]),
        ({"redis": {"url": "localhost:6379"}}, [r"redis.url|redis/url"]),
        ({"image": {"tag": "latest"}}, [r"latest.*not allowed"]),
    ],
    ids=["replicas-string", "unknown-service", "bad-log-format", "misspelt-key", "redis-url-scheme", "latest-tag"],
)
def test_bad_values_fail_with_a_clear_message(values: dict, expected: list[str]) -> None:
    with pytest.raises(RenderError) as caught:
        render_chart(values)
    message = str(caught.value)
    for pattern in expected:
        assert re.search(pattern, message), f"{pattern!r} not in Helm's message:\n{message}"


def test_lint_reports_a_schema_violation() -> None:
    findings = manifests.lint_chart({"services": {"identity": {"replicas": "three"}}})
    assert findings and any("replicas" in finding for finding in findings)


def test_generated_secret_is_a_hook_before_the_migration_job() -> None:
    documents = render_chart()
    secret = by_name(documents, "Secret", "clm-identity")
    job = by_name(documents, "Job", "clm-identity-migrate")
    weight = lambda doc: int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])  # noqa: E731
    for doc in (secret, job):
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert weight(secret) < weight(job)
    assert "hook-succeeded" not in secret["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
    assert set(manifests.secret_data(secret)) == {"database-url", "CLM_IDENTITY_HASH_KEY"}
    assert len(manifests.secret_data(secret)["CLM_IDENTITY_HASH_KEY"]) == 48
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate", "identity"]


def test_every_value_is_documented_in_the_readme() -> None:
    readme = (manifests.CHART_DIR / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([A-Za-z0-9_.<>\-]+)`", readme))
    missing: list[str] = []

    # Maps documented as one value rather than key by key.
    whole_maps = ("resources", "secretEnv", "resourceAttributes", "podLabels")

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict) and node and not prefix.endswith(whole_maps):
            for key, child in node.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
            return
        key = re.sub(r"^services\.[a-z]+\.", "services.<name>.", prefix)
        if key not in documented:
            missing.append(key)

    walk("", manifests.chart_default_values())
    assert sorted(set(missing)) == [], "values without a row in deploy/helm/clm/README.md"


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


@pytest.mark.parametrize("verb", ["install", "upgrade"])
def test_readme_helm_commands_render(verb: str) -> None:
    import helm_python

    commands = [shlex.split(c) for c in manifests.readme_sh_commands() if c.startswith(f"helm {verb} ")]
    assert commands, f"the chart README shows no `helm {verb}`"
    for command in commands:
        assert command[2:4] == ["clm", "deploy/helm/clm"], command
        values: dict = {}
        arguments = iter(command[4:])
        for argument in arguments:
            if argument in ("--set",):
                values = _deep_merge(values, helm_python.parse_set_string(next(arguments)))
            elif argument in ("-f", "--values"):
                values = _deep_merge(values, manifests.load_yaml(manifests.REPO_ROOT / next(arguments)))
            elif argument in ("--namespace", "-n"):
                assert next(arguments) == manifests.NAMESPACE
        assert manifests.lint_chart(values) == [], command
        assert render_chart(values), command


@pytest.mark.parametrize("values_name", ["defaults", "all services"])
def test_notes_forward_each_service_to_the_port_the_readme_uses(values_name: str) -> None:
    """NOTES.txt forwards every enabled service to its own local port, the one the README forwards it to."""
    values = {"defaults": None, "all services": manifests.all_services_values()}[values_name]
    enabled = {
        name for name, service in _deep_merge(manifests.chart_default_values(), values or {})["services"].items()
        if service["enabled"]
    }
    notes = manifests.port_forwards(manifests.render_notes(values).splitlines())
    assert sorted(notes.values()) == sorted(f"clm-{name}" for name in enabled)
    readme = manifests.port_forwards(manifests.readme_sh_commands())
    assert readme, "the chart README forwards no Service"
    for port, service in readme.items():
        assert notes.get(port) == service, f"the README forwards {service} to {port}, NOTES.txt {notes}"
