"""The kustomize base and overlays render, and each overlay is what it says."""

from __future__ import annotations

import re
import subprocess

import pytest

import manifests
from manifests import by_name, of_kind, pod_spec, render_overlay


def test_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(manifests.OVERLAYS)


@pytest.mark.parametrize("target", ["base", *[f"overlays/{o}" for o in manifests.OVERLAYS]])
def test_kubectl_kustomize_renders(target: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(manifests.K8S_DIR / target)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "kind: Deployment" in result.stdout


# The services the chart turns on by default; the kustomize base holds the same ones.
SERVICES = sorted(name for name, service in manifests.chart_default_values()["services"].items() if service["enabled"])


def _secret_keys(documents: list[dict], name: str) -> set[str]:
    """Keys of the (hash-suffixed) generated Secret a Deployment's env refers to as `name`."""
    deployment = by_name(documents, "Deployment", name)
    names = {
        entry["valueFrom"]["secretKeyRef"]["name"]
        for entry in pod_spec(deployment)["containers"][0]["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert len(names) == 1 and next(iter(names)).startswith(f"{name}-"), names
    return set(manifests.secret_data(by_name(documents, "Secret", names.pop())))


def test_dev_is_one_small_replica_without_autoscaler() -> None:
    documents = render_overlay("dev")
    assert sorted(d["metadata"]["name"] for d in of_kind(documents, "Deployment")) == [f"clm-{s}" for s in SERVICES]
    for deployment in of_kind(documents, "Deployment"):
        assert deployment["spec"]["replicas"] == 1
        limits = pod_spec(deployment)["containers"][0]["resources"]["limits"]
        assert limits["memory"] in {"128Mi", "256Mi"}
    assert of_kind(documents, "HorizontalPodAutoscaler") == []
    assert all(doc["metadata"].get("namespace", "clm-dev") == "clm-dev" for doc in documents if doc["kind"] != "Namespace")
    assert {"database-url", "CLM_IDENTITY_HASH_KEY"} <= _secret_keys(documents, "clm-identity")
    for service in SERVICES:
        if service != "identity":
            assert _secret_keys(documents, f"clm-{service}") == {"database-url"}, service


def _clm_callers(policy: dict) -> list[str]:
    """The clm services a NetworkPolicy admits (in-namespace pod peers), sorted."""
    return sorted(
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for rule in policy["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" not in peer
    )


def test_prod_has_autoscaler_budget_and_policies() -> None:
    documents = render_overlay("prod")
    base = manifests.render_base()
    for service in SERVICES:
        name = f"clm-{service}"
        deployment = by_name(documents, "Deployment", name)
        assert "replicas" not in deployment["spec"], name
        assert by_name(documents, "HorizontalPodAutoscaler", name) is not None
        assert by_name(documents, "PodDisruptionBudget", name) is not None
        policy = by_name(documents, "NetworkPolicy", name)
        namespaces = {
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for rule in policy["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer
        }
        assert namespaces == {"web-shop"}, f"prod lets the client team call {name}"
        egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
        assert {53, 5432, 4317} <= egress_ports, name
        assert (6379 in egress_ports) == (service == "identity"), "only identity uses Redis"
        callers = sorted(c for c in SERVICES if service in manifests.SERVICE_CALLS[c])
        assert _clm_callers(policy) == _clm_callers(by_name(base, "NetworkPolicy", name)) == callers, (
            f"{name}: the prod patch must keep the callers the base admits"
        )
        env = {e["name"] for e in pod_spec(deployment)["containers"][0]["env"]}
        assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"} <= env
    assert of_kind(documents, "Secret") == [], "production Secrets are created outside the repository"


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
@pytest.mark.parametrize("service", SERVICES)
def test_migrations_run_before_the_server_with_the_same_env(overlay: str, service: str) -> None:
    deployment = by_name(render_overlay(overlay), "Deployment", f"clm-{service}")
    spec = pod_spec(deployment)
    (migrate,) = spec["initContainers"]
    (server,) = spec["containers"]
    assert migrate["args"] == ["migrate", service]
    assert server["args"] == ["serve", service]
    assert migrate["command"] == server["command"]
    assert migrate["image"] == server["image"]
    assert sorted(migrate["env"], key=lambda e: e["name"]) == sorted(server["env"], key=lambda e: e["name"])


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_namespace_enforces_restricted_pod_security(overlay: str) -> None:
    (namespace,) = of_kind(render_overlay(overlay), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_readme_documents_the_apply_path_and_its_targets_render() -> None:
    readme = (manifests.K8S_DIR / "README.md").read_text(encoding="utf-8")
    assert "kubectl apply -k k8s/overlays/dev" in readme
    targets = set(re.findall(r"kubectl (?:apply -k|kustomize) (k8s/[\w/.-]*\w)", readme))
    assert {"k8s/overlays/dev", "k8s/overlays/prod"} <= targets
    for target in targets:
        result = subprocess.run(
            ["kubectl", "kustomize", str(manifests.REPO_ROOT / target)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{target}: {result.stderr}"
