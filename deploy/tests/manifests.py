"""Rendering of the Helm chart and the kustomize overlays, shared by the deploy tests.

The chart is rendered by a `helm` binary when one is on PATH and otherwise by
helm-python-sdk (Helm 4's Go library through ctypes, no binary needed). The
overlays are rendered by `kubectl kustomize`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "clm"
PROD_VALUES = CHART_DIR / "ci" / "prod-values.yaml"
K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"

# Under CI (or the test script) what a test needs must be there: it fails, never skips.
CI = os.environ.get("CI", "").lower() == "true" or os.environ.get("CLM_TEST_REQUIRE_SERVERS", "").lower() in ("1", "true")

RELEASE = "clm"
NAMESPACE = "clm"

def clm_binary() -> Path:
    """The clm binary the tests run: $CLM_BIN, else $CARGO_TARGET_DIR/debug/clm, else <repo>/target/debug/clm."""
    if os.environ.get("CLM_BIN"):
        return Path(os.environ["CLM_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    return target / "debug" / "clm"


@functools.cache
def binary_services() -> list[dict[str, Any]] | None:
    """The binary's own list of its services (`clm services --json`), None without a binary."""
    path = clm_binary()
    if not (path.is_file() and os.access(path, os.X_OK)):
        return None
    result = subprocess.run([str(path), "services", "--json"], check=True, capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout)


# Every clm service the chart knows (those the binary does not contain yet
# stay disabled), and the ones each of them calls.
SERVICE_CALLS = {
    "identity": [],
    "touchpoints": ["identity"],
    "scoring": ["touchpoints", "identity", "feedback"],
    "feedback": ["identity", "touchpoints", "scoring"],
    "metrics": ["touchpoints", "scoring", "feedback", "identity"],
}

WORKLOAD_KINDS = {"Deployment", "Job"}


class RenderError(Exception):
    """The chart refused the values or a template failed; the message is Helm's."""


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def split_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kubernetes_version() -> str:
    """The newest Kubernetes version kubernetes-validate ships schemas for."""
    import kubernetes_validate

    return kubernetes_validate.latest_version()


def helm_binary() -> str | None:
    return shutil.which("helm")


def renderer_name() -> str:
    return "helm binary" if helm_binary() else "helm-python-sdk"


def _write_values(values: dict[str, Any] | None, directory: str) -> list[str]:
    if values is None:
        return []
    path = os.path.join(directory, "values.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(values, handle)
    return ["--values", path]


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """`helm template` of the chart: every document, hooks included."""
    binary = helm_binary()
    if binary:
        with tempfile.TemporaryDirectory() as directory:
            command = [
                binary, "template", release, str(CHART_DIR), "--namespace", namespace,
                "--kube-version", kubernetes_version(), *_write_values(values, directory),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RenderError(result.stderr.strip())
        return split_documents(result.stdout)

    rendered = _render_with_sdk(values, release, namespace)
    documents: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith((".yaml", ".yml")):
            documents.extend(split_documents(rendered[path]))
    return documents


def _render_with_sdk(values: dict[str, Any] | None, release: str, namespace: str) -> dict[str, str]:
    """Every template of the chart, rendered by helm-python-sdk as for an install: path -> text."""
    import helm_python

    try:
        with helm_python.Chart.load(CHART_DIR) as chart:
            return chart.render(values, name=release, namespace=namespace, is_install=True)
    except helm_python.HelmError as error:
        raise RenderError(str(error)) from error


def render_notes(values: dict[str, Any] | None = None) -> str:
    """NOTES.txt as `helm install` prints it. Always helm-python-sdk: `helm template` leaves the notes out."""
    rendered = _render_with_sdk(values, RELEASE, NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("/NOTES.txt"))


def lint_chart(values: dict[str, Any] | None = None) -> list[str]:
    """`helm lint --strict`: the findings that make it fail (empty when it passes)."""
    binary = helm_binary()
    if binary:
        with tempfile.TemporaryDirectory() as directory:
            command = [
                binary, "lint", "--strict", str(CHART_DIR),
                "--kube-version", kubernetes_version(), *_write_values(values, directory),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        return [] if result.returncode == 0 else [result.stdout + result.stderr]

    import helm_python

    report = helm_python.lint(
        CHART_DIR, values, strict=True, kube_version="v" + kubernetes_version()
    )
    # Severity 1 is INFO (e.g. "icon is recommended"); strict mode fails on WARNING (2) and ERROR (3).
    findings = [
        f"{message['path']}: {message['error']}"
        for message in report["messages"]
        if message["severity"] >= 2
    ]
    return findings + list(report["errors"])


def chart_default_values() -> dict[str, Any]:
    return load_yaml(CHART_DIR / "values.yaml")


def prod_values() -> dict[str, Any]:
    return load_yaml(PROD_VALUES)


def all_services_values() -> dict[str, Any]:
    """Every service on, as the chart will be once all of them exist."""
    return {"services": {name: {"enabled": True} for name in SERVICE_CALLS}, "redis": {"url": "redis://redis:6379/"}}


def readme_sh_commands(path: Path = CHART_DIR / "README.md") -> list[str]:
    """The lines of a README's ```sh blocks, with backslash-continued lines joined."""
    text = path.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


_PORT_FORWARD = re.compile(r"\bport-forward svc/([a-z0-9-]+) (\d+):grpc\b")


def port_forwards(lines: Iterable[str]) -> dict[int, str]:
    """Local port -> Service name, from `kubectl port-forward svc/<name> <local>:grpc` lines."""
    forwards: dict[int, str] = {}
    for line in lines:
        match = _PORT_FORWARD.search(line)
        if match:
            port = int(match.group(2))
            assert forwards.get(port, match.group(1)) == match.group(1), f"two Services are forwarded to {port}"
            forwards[port] = match.group(1)
    return forwards


@functools.lru_cache(maxsize=None)
def _kustomize(overlay_dir: str) -> str:
    result = subprocess.run(
        ["kubectl", "kustomize", overlay_dir], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {overlay_dir} failed:\n{result.stderr}")
    return result.stdout


def render_overlay(overlay: str) -> list[dict[str, Any]]:
    return split_documents(_kustomize(str(K8S_DIR / "overlays" / overlay)))


def render_base() -> list[dict[str, Any]]:
    return split_documents(_kustomize(str(K8S_DIR / "base")))


@dataclasses.dataclass(frozen=True)
class RenderSet:
    """One rendering of the manifests that the policy tests check."""

    name: str
    source: str  # "chart" or "kustomize"
    documents: tuple[dict[str, Any], ...]


@functools.lru_cache(maxsize=None)
def render_sets() -> tuple[RenderSet, ...]:
    sets = [
        RenderSet("chart-defaults", "chart", tuple(render_chart())),
        RenderSet("chart-prod-values", "chart", tuple(render_chart(prod_values()))),
        RenderSet("chart-all-services", "chart", tuple(render_chart(all_services_values()))),
    ]
    sets += [RenderSet(f"kustomize-{overlay}", "kustomize", tuple(render_overlay(overlay))) for overlay in OVERLAYS]
    return tuple(sets)


def of_kind(documents: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc.get("kind") == kind]


def by_name(documents: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for doc in of_kind(documents, kind):
        if doc["metadata"]["name"] == name:
            return doc
    return None


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def is_hook(doc: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def env_value(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry
    return None


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


@dataclasses.dataclass(frozen=True)
class Dockerfile:
    """The parts of deploy/Dockerfile the tests reason about."""

    args: dict[str, str]
    stages: list[dict[str, Any]]  # each: {"from": str, "name": str|None, "instructions": [(op, text)]}

    @classmethod
    def parse(cls, path: Path = DOCKERFILE) -> "Dockerfile":
        logical: list[str] = []
        pending = ""
        for raw in path.read_text(encoding="utf-8").splitlines():
            stripped = raw.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if stripped.startswith("#"):
                continue
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            logical.append(pending + stripped)
            pending = ""
        args: dict[str, str] = {}
        stages: list[dict[str, Any]] = []
        for line in logical:
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op == "ARG" and not stages:
                name, _, default = rest.partition("=")
                args[name.strip()] = default.strip()
            elif op == "FROM":
                parts = rest.split()
                image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
                name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
                stages.append({"from": image, "name": name, "instructions": []})
            elif stages:
                stages[-1]["instructions"].append((op, rest.strip()))
        return cls(args, stages)

    def runtime(self) -> dict[str, Any]:
        return self.stages[-1]

    def instructions(self, stage: dict[str, Any], op: str) -> list[str]:
        return [text for name, text in stage["instructions"] if name == op]

    def exec_form(self, op: str) -> list[str]:
        texts = self.instructions(self.runtime(), op)
        return json.loads(texts[-1]) if texts else []

    def runtime_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for text in self.instructions(self.runtime(), "ENV"):
            for pair in text.split():
                key, _, value = pair.partition("=")
                env[key] = value
        return env
