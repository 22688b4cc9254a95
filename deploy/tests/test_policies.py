"""Policies every rendering must keep: probes, limits, hardening, wiring, tags."""

from __future__ import annotations

import re
from typing import Any

import pytest

import manifests
from manifests import RenderSet, all_containers, labels_match, of_kind, pod_spec

SET_NAMES = [s.name for s in manifests.render_sets()]


def _set(name: str) -> RenderSet:
    return next(s for s in manifests.render_sets() if s.name == name)


def _workloads(render_set: RenderSet) -> list[dict[str, Any]]:
    return [doc for doc in render_set.documents if doc["kind"] in manifests.WORKLOAD_KINDS]


def _deployments(render_set: RenderSet) -> list[dict[str, Any]]:
    return of_kind(render_set.documents, "Deployment")


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_every_server_container_has_grpc_probes(set_name: str) -> None:
    for deployment in _deployments(_set(set_name)):
        for container in pod_spec(deployment)["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where} has no {probe}"
                assert container[probe]["grpc"]["port"] == grpc_port, f"{where} {probe} checks another port"
            assert container["readinessProbe"]["grpc"].get("service"), f"{where}: readiness must name its health service"


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_every_container_has_requests_and_limits(set_name: str) -> None:
    for workload in _workloads(_set(set_name)):
        for container in all_containers(workload):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                    f"{workload['metadata']['name']}/{container['name']} lacks {kind}"
                )


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_every_pod_is_hardened(set_name: str) -> None:
    for workload in _workloads(_set(set_name)):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec.get("enableServiceLinks") is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in all_containers(workload):
            where = f"{name}/{container['name']}"
            context = container.get("securityContext", {})
            assert context.get("runAsNonRoot") is True, where
            assert context.get("runAsUser") == 65532, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{where} needs an emptyDir at /tmp"


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_service_accounts_mount_no_token(set_name: str) -> None:
    for account in of_kind(_set(set_name).documents, "ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_no_latest_or_untagged_image(set_name: str) -> None:
    for workload in _workloads(_set(set_name)):
        for container in all_containers(workload):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), f"{image} has no tag"
            assert not image.endswith(":latest"), image


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_every_service_has_a_deployment_and_a_network_policy(set_name: str) -> None:
    documents = _set(set_name).documents
    services = of_kind(documents, "Service")
    assert services
    for service in services:
        selector = service["spec"]["selector"]
        name = service["metadata"]["name"]
        matching = [
            d for d in _deployments(_set(set_name))
            if labels_match(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} Deployments"
        deployment = matching[0]
        ports = {p["name"]: p["containerPort"] for c in pod_spec(deployment)["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["name"] == "grpc", f"Service {name} port must be named grpc"
            assert port["targetPort"] in ports or port["targetPort"] in ports.values(), name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        policies = [
            p for p in of_kind(documents, "NetworkPolicy")
            if p["spec"]["podSelector"].get("matchLabels") and labels_match(p["spec"]["podSelector"]["matchLabels"], labels)
        ]
        assert len(policies) == 1, f"Service {name} pods are selected by {len(policies)} NetworkPolicies"
        assert set(policies[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        for rule in policies[0]["spec"].get("ingress", []):
            assert rule.get("from"), f"{name}: an ingress rule without `from` admits everyone"


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_termination_grace_covers_prestop_and_drain(set_name: str) -> None:
    for deployment in _deployments(_set(set_name)):
        spec = pod_spec(deployment)
        container = spec["containers"][0]
        drain = int(manifests.env_value(container, "CLM_SHUTDOWN_GRACE_SECONDS")["value"])
        delay = int(manifests.env_value(container, "CLM_SHUTDOWN_DELAY_SECONDS")["value"])
        sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert sleep > 0, "a preStop sleep lets endpoints drop the pod before SIGTERM"
        assert spec["terminationGracePeriodSeconds"] >= sleep + delay + drain + 1, deployment["metadata"]["name"]
        readiness = container["readinessProbe"]
        noticed_after = readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)
        assert delay >= noticed_after, (
            f"{deployment['metadata']['name']}: the listener must stay open until the readiness "
            f"probe can notice NOT_SERVING ({noticed_after} s)"
        )


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_env_references_point_backwards(set_name: str) -> None:
    """Kubernetes expands $(VAR) only for variables defined earlier in the list."""
    for workload in _workloads(_set(set_name)):
        for container in all_containers(workload):
            seen: set[str] = set()
            for entry in container.get("env", []):
                for reference in re.findall(r"(?<!\$)\$\((\w+)\)", entry.get("value", "")):
                    assert reference in seen, f"{container['name']}: {entry['name']} uses $({reference}) before it is set"
                seen.add(entry["name"])


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_serving_pods_do_not_migrate_on_start(set_name: str) -> None:
    for deployment in _deployments(_set(set_name)):
        container = pod_spec(deployment)["containers"][0]
        assert manifests.env_value(container, "CLM_MIGRATE_ON_START")["value"] == "false"
        assert container["args"][0] == "serve"


@pytest.mark.parametrize("set_name", SET_NAMES)
def test_disruption_budgets_and_autoscalers_target_real_deployments(set_name: str) -> None:
    documents = _set(set_name).documents
    deployments = {d["metadata"]["name"]: d for d in _deployments(_set(set_name))}
    for budget in of_kind(documents, "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(labels_match(selector, d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values())
    for autoscaler in of_kind(documents, "HorizontalPodAutoscaler"):
        target = autoscaler["spec"]["scaleTargetRef"]["name"]
        assert target in deployments
        assert "replicas" not in deployments[target]["spec"], f"{target}: replicas fights the autoscaler"
