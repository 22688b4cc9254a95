"""The image, the chart and the plain manifests agree with each other."""

from __future__ import annotations

import re
import tomllib

import pytest

import manifests
from manifests import Dockerfile, by_name, pod_spec, render_chart, render_overlay


def _server(documents: list[dict]) -> dict:
    return pod_spec(by_name(documents, "Deployment", "clm-identity"))["containers"][0]


def _comparable(container: dict) -> dict:
    return {
        "command": container["command"],
        "args": container["args"],
        "ports": container["ports"],
        "probes": {p: container[p]["grpc"] for p in ("startupProbe", "readinessProbe", "livenessProbe")},
        "securityContext": container["securityContext"],
        "env names": sorted(e["name"] for e in container["env"]),
    }


def test_chart_and_kustomize_base_run_the_same_container() -> None:
    chart = _server(render_chart())
    dev = _server(render_overlay("dev"))
    assert chart["image"] == dev["image"], "the chart's default image and the kustomize base image differ"
    assert _comparable(chart) == {
        **_comparable(dev),
        # The chart adds CLM_REDIS_URL only when Redis is configured; the base always references it, optional.
        "env names": sorted(n for n in _comparable(dev)["env names"] if n != "CLM_REDIS_URL"),
    }


def test_chart_prod_values_and_prod_overlay_agree() -> None:
    chart = _server(render_chart(manifests.prod_values()))
    prod = _server(render_overlay("prod"))
    assert chart["image"] == prod["image"]
    assert chart["ports"] == prod["ports"]
    assert chart["resources"] == prod["resources"]
    assert _comparable(chart)["env names"] == _comparable(prod)["env names"]
    chart_env = {e["name"]: e.get("value") for e in chart["env"]}
    prod_env = {e["name"]: e.get("value") for e in prod["env"]}
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_ENDPOINT", "CLM_PHONE_DEFAULT_REGION"):
        assert chart_env[name] == prod_env[name], name


def test_service_ports_agree() -> None:
    chart = by_name(render_chart(), "Service", "clm-identity")["spec"]["ports"]
    dev = by_name(render_overlay("dev"), "Service", "clm-identity")["spec"]["ports"]
    assert chart == dev


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
