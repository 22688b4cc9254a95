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


def test_dev_is_one_small_replica_without_autoscaler() -> None:
    documents = render_overlay("dev")
    deployment = by_name(documents, "Deployment", "clm-identity")
    assert deployment["spec"]["replicas"] == 1
    assert of_kind(documents, "HorizontalPodAutoscaler") == []
    limits = pod_spec(deployment)["containers"][0]["resources"]["limits"]
    assert limits["memory"] in {"128Mi", "256Mi"}
    assert all(doc["metadata"].get("namespace", "clm-dev") == "clm-dev" for doc in documents if doc["kind"] != "Namespace")
    secret = of_kind(documents, "Secret")[0]
    assert {"database-url", "CLM_IDENTITY_HASH_KEY"} <= set(manifests.secret_data(secret))


def test_prod_has_autoscaler_budget_and_policies() -> None:
    documents = render_overlay("prod")
    deployment = by_name(documents, "Deployment", "clm-identity")
    assert "replicas" not in deployment["spec"]
    assert by_name(documents, "HorizontalPodAutoscaler", "clm-identity") is not None
    assert by_name(documents, "PodDisruptionBudget", "clm-identity") is not None
    policy = by_name(documents, "NetworkPolicy", "clm-identity")
    assert policy["spec"]["ingress"], "prod lets the client team in"
    egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert {53, 5432, 6379, 4317} <= egress_ports
    assert of_kind(documents, "Secret") == [], "production Secrets are created outside the repository"
    env = {e["name"] for e in pod_spec(deployment)["containers"][0]["env"]}
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"} <= env


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_migrations_run_before_the_server_with_the_same_env(overlay: str) -> None:
    deployment = by_name(render_overlay(overlay), "Deployment", "clm-identity")
    spec = pod_spec(deployment)
    (migrate,) = spec["initContainers"]
    (server,) = spec["containers"]
    assert migrate["args"] == ["migrate", "identity"]
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
