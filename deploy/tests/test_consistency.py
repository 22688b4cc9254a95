"""The image, the chart and the plain manifests agree with each other."""

from __future__ import annotations

import json
import re
import tomllib

import pytest

import manifests
from manifests import Dockerfile, by_name, of_kind, pod_spec, render_chart, render_overlay


def _server(documents: list[dict], name: str = "clm-identity") -> dict:
    return pod_spec(by_name(documents, "Deployment", name))["containers"][0]


def _deployment_names(documents: list[dict]) -> list[str]:
    return sorted(d["metadata"]["name"] for d in documents if d["kind"] == "Deployment")


def _comparable(container: dict) -> dict:
    return {
        "command": container["command"],
        "args": container["args"],
        "ports": container["ports"],
        "probes": {p: container[p]["grpc"] for p in ("startupProbe", "readinessProbe", "livenessProbe")},
        "securityContext": container["securityContext"],
        "env names": sorted(e["name"] for e in container["env"]),
    }


def test_chart_defaults_and_kustomize_deploy_the_same_services() -> None:
    chart = _deployment_names(render_chart())
    for overlay in manifests.OVERLAYS:
        assert _deployment_names(render_overlay(overlay)) == chart, f"overlay {overlay}"
    assert _deployment_names(render_chart(manifests.prod_values())) == chart


@pytest.mark.parametrize("deployment", _deployment_names(render_chart()))
def test_chart_and_kustomize_base_run_the_same_container(deployment: str) -> None:
    chart = _server(render_chart(), deployment)
    dev = _server(render_overlay("dev"), deployment)
    assert chart["image"] == dev["image"], "the chart's default image and the kustomize base image differ"
    assert _comparable(chart) == {
        **_comparable(dev),
        # The chart adds CLM_REDIS_URL only when Redis is configured; the base always references it, optional.
        "env names": sorted(n for n in _comparable(dev)["env names"] if n != "CLM_REDIS_URL"),
    }
    # Plain values (the callee URLs among them) are the same, except what the dev overlay changes.
    chart_env = {e["name"]: e["value"] for e in chart["env"] if "value" in e}
    dev_env = {e["name"]: e["value"] for e in dev["env"] if "value" in e}
    assert {k: v for k, v in chart_env.items() if k != "CLM_LOG_FORMAT"} == {
        k: v for k, v in dev_env.items() if k != "CLM_LOG_FORMAT"
    }


@pytest.mark.parametrize("deployment", _deployment_names(render_chart()))
def test_chart_prod_values_and_prod_overlay_agree(deployment: str) -> None:
    chart_documents = render_chart(manifests.prod_values())
    prod_documents = render_overlay("prod")
    chart = _server(chart_documents, deployment)
    prod = _server(prod_documents, deployment)
    assert chart["image"] == prod["image"]
    assert chart["ports"] == prod["ports"]
    assert chart["resources"] == prod["resources"]
    assert _comparable(chart)["env names"] == _comparable(prod)["env names"]
    chart_env = {e["name"]: e.get("value") for e in chart["env"]}
    prod_env = {e["name"]: e.get("value") for e in prod["env"]}
    for name, value in chart_env.items():
        if value is not None:
            assert prod_env[name] == value, name
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget"):
        chart_object, prod_object = by_name(chart_documents, kind, deployment), by_name(prod_documents, kind, deployment)
        assert (chart_object is None) == (prod_object is None), f"{kind} {deployment}"
        if chart_object is not None:
            assert chart_object["spec"] == prod_object["spec"], f"{kind} {deployment}"


def _policy_shape(policy: dict) -> dict:
    """What a NetworkPolicy allows, independent of rule order and comments."""

    def canonical(rules: list[dict], side: str) -> list[str]:
        key = lambda item: json.dumps(item, sort_keys=True)  # noqa: E731
        return sorted(
            key({"peers": sorted(map(key, rule.get(side, []))), "ports": sorted(map(key, rule.get("ports", [])))})
            for rule in rules
        )

    spec = policy["spec"]
    return {"ingress": canonical(spec.get("ingress", []), "from"), "egress": canonical(spec.get("egress", []), "to")}


@pytest.mark.parametrize("deployment", _deployment_names(render_chart()))
def test_chart_and_kustomize_network_policies_agree(deployment: str) -> None:
    """Callers and callees are wired the same way; clients and Redis are compared per rendering."""
    chart = by_name(render_chart(), "NetworkPolicy", deployment)
    dev = by_name(render_overlay("dev"), "NetworkPolicy", deployment)
    assert _policy_shape(chart) == _policy_shape(dev)


@pytest.mark.parametrize("deployment", _deployment_names(render_chart()))
def test_service_ports_agree(deployment: str) -> None:
    chart = by_name(render_chart(), "Service", deployment)["spec"]["ports"]
    dev = by_name(render_overlay("dev"), "Service", deployment)["spec"]["ports"]
    assert chart == dev


def _binary_services() -> list[dict]:
    services = manifests.binary_services()
    if services is None:
        message = f"no clm binary at {manifests.clm_binary()} to list its services"
        if manifests.CI:
            pytest.fail(f"{message}; under CI=true this test must run, not skip")
        pytest.skip(message)
    return services


def test_callee_url_variables_are_ones_the_binary_reads() -> None:
    """A variable pointing at a rendered Service (CLM_IDENTITY_URL=http://clm-identity:50051) is the one the binary
    reads for that callee (`clm services --json`), and the caller calls it; the chart derives it from the callee's
    key, kustomize spells it out."""
    from urllib.parse import urlsplit

    binary = {s["name"]: s for s in _binary_services()}
    for documents in (render_chart(), render_overlay("dev"), render_chart(manifests.prod_values()), render_overlay("prod")):
        services = {service["metadata"]["name"] for service in of_kind(documents, "Service")}
        for deployment in of_kind(documents, "Deployment"):
            caller = deployment["metadata"]["name"].removeprefix("clm-")
            for entry in pod_spec(deployment)["containers"][0]["env"]:
                value = entry.get("value", "")
                hostname = urlsplit(value).hostname if value.startswith(("http://", "https://")) else None
                if hostname in services:
                    callee = hostname.removeprefix("clm-")
                    assert entry["name"] == binary[callee]["url_variable"], (
                        f"{deployment['metadata']['name']}: {entry['name']}={value}, but the binary reads "
                        f"{binary[callee]['url_variable']} for {callee}"
                    )
                    assert callee in binary[caller]["calls"], f"{caller} does not call {callee}"
    touchpoints = _server(render_chart(), "clm-touchpoints")
    assert manifests.env_value(touchpoints, "CLM_IDENTITY_URL") == {
        "name": "CLM_IDENTITY_URL", "value": "http://clm-identity:50051"
    }


# --- the image -----------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.parse()


def test_image_entrypoint_is_the_binary_the_manifests_run(dockerfile: Dockerfile) -> None:
    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    assert entrypoint == ["/usr/local/bin/clm"]
    assert dockerfile.exec_form("CMD") == ["serve"]
    copies = dockerfile.instructions(dockerfile.runtime(), "COPY")
    assert [c for c in copies if c.endswith(" /usr/local/bin/clm")], "the runtime stage must copy the binary"
    assert len(copies) == 1, "the runtime image holds only the clm binary"
    for documents in (render_chart(), render_overlay("dev")):
        assert _server(documents)["command"] == entrypoint


def test_image_user_and_port_match_the_manifests(dockerfile: Dockerfile) -> None:
    runtime = dockerfile.runtime()
    assert dockerfile.instructions(runtime, "USER") == ["65532:65532"]
    assert dockerfile.instructions(runtime, "EXPOSE") == ["50051"]
    server = _server(render_chart())
    assert server["securityContext"]["runAsUser"] == 65532
    assert server["ports"][0]["containerPort"] == 50051
    assert dockerfile.runtime_env()["CLM_LISTEN_ADDR"] == "0.0.0.0:50051"


def test_runtime_is_distroless_nonroot_on_the_builders_debian(dockerfile: Dockerfile) -> None:
    build, runtime = dockerfile.stages[0], dockerfile.runtime()
    assert re.fullmatch(r"gcr\.io/distroless/cc-debian(\d+):nonroot", runtime["from"]), runtime["from"]
    debian_release = {"12": "bookworm", "13": "trixie"}[re.search(r"debian(\d+)", runtime["from"]).group(1)]
    assert build["from"].endswith(f"-{debian_release}"), "the binary must link the runtime image's glibc"


def test_build_stage_builds_what_ci_builds(dockerfile: Dockerfile) -> None:
    build = dockerfile.stages[0]
    runs = " ".join(dockerfile.instructions(build, "RUN"))
    assert runs.count("cargo build --release --locked -p clm") == 2, "dependency layer and source layer"
    workspace = tomllib.loads((manifests.REPO_ROOT / "Cargo.toml").read_text(encoding="utf-8"))
    rust_version = workspace["workspace"]["package"]["rust-version"]
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(dockerfile.args["RUST_VERSION"]) >= as_tuple(rust_version)
    assert (manifests.REPO_ROOT / "services" / "clm" / "Cargo.toml").exists()
    copies = dockerfile.instructions(build, "COPY")
    for member in workspace["workspace"]["members"]:
        manifest = f"{member}/Cargo.toml"
        assert f"{manifest} {manifest}" in copies, f"dependency layer misses the workspace member {member}"
    assert "Cargo.toml Cargo.lock ./" in copies
    for member in workspace["workspace"]["members"]:
        if (manifests.REPO_ROOT / member / "build.rs").exists():
            assert f"> {member}/build.rs" in runs, f"the dependency layer lacks a stub build.rs for {member}"
    # The dependency layer must come before any source is copied.
    first_source = min(i for i, (op, text) in enumerate(build["instructions"]) if op == "COPY" and text.startswith(("shared ", "services ")))
    first_build = min(i for i, (op, text) in enumerate(build["instructions"]) if op == "RUN" and "cargo build" in text)
    assert first_build < first_source


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (manifests.REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    for entry in ("target", ".git", "deploy", "k8s"):
        assert entry in ignored
    for needed in ("proto", "shared", "services", "tests", "Cargo.toml", "Cargo.lock"):
        assert needed not in ignored


def test_health_service_names_are_services_of_the_contracts() -> None:
    declared = set()
    for proto in (manifests.REPO_ROOT / "proto").rglob("*.proto"):
        text = proto.read_text(encoding="utf-8")
        package = re.search(r"^package\s+([\w.]+)\s*;", text, flags=re.M)
        for service in re.findall(r"^service\s+(\w+)", text, flags=re.M):
            declared.add(f"{package.group(1)}.{service}")
    for name, service in manifests.chart_default_values()["services"].items():
        assert service["healthService"] in declared, f"services.{name}.healthService names no proto service"
    probe = _server(render_overlay("dev"))["readinessProbe"]["grpc"]["service"]
    assert probe in declared


def test_the_chart_and_the_manifests_deploy_the_binarys_services() -> None:
    """One list of services, the binary's: the chart's entries, the kustomize base and SERVICE_CALLS agree with it."""
    services = _binary_services()
    names = sorted(s["name"] for s in services)
    values = manifests.chart_default_values()["services"]
    assert sorted(n for n, v in values.items() if v["enabled"]) == names, "the chart enables what the binary serves"
    for service in services:
        name = service["name"]
        entry = values[name]
        assert entry["healthService"] == service["grpc_services"][0], f"{name}: probes check the service it serves first"
        assert sorted(entry["calls"]) == sorted(service["calls"]), f"{name}: the chart's calls are the binary's"
        assert sorted(manifests.SERVICE_CALLS[name]) == sorted(service["calls"]), f"{name}: SERVICE_CALLS"
        assert service["url_variable"] == f"CLM_{name.upper()}_URL"
    assert _deployment_names(manifests.render_base()) == sorted(f"clm-{n}" for n in names), "the kustomize base"
