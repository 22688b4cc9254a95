"""The proof that the rendered manifests start the product.

The chart is rendered with values-local.yaml (each service's database a fresh
PostgreSQL database on this machine, Redis on this machine). Each rendered
Deployment then becomes a local process of the real `clm` binary:

1. the migration Job of the service runs first, with the Job's own command,
   args and env, and once more (the pre-upgrade hook on a migrated database);
2. each service starts as its own process with exactly the Deployment's
   command, args and env, on top of the image's ENV from deploy/Dockerfile;
   Secret and downward-API references are resolved from the rendered objects
   and $(VAR) references are expanded the way the kubelet does. Two changes,
   both made explicitly: CLM_LISTEN_ADDR binds 127.0.0.1:<free port> instead
   of the pod's 0.0.0.0:<containerPort>, to which the rendered probes' port is
   mapped; and, as there is no cluster DNS here, a CLM_*_URL variable whose
   URL names a rendered Service (CLM_IDENTITY_URL=http://clm-identity:50051)
   is pointed at the local process of the Deployment that Service selects;
3. the startup, readiness and liveness probes run as rendered (grpc.health.v1
   Check with the rendered service name, period, timeout and thresholds);
4. every service answers an RPC found through server reflection, and the
   grpcurl commands of the chart README work against the service its
   port-forward line names;
5. calls that cross services work between the processes: a touchpoint
   recorded with an e-mail on touchpoints is resolved through identity,
   scoring follows touchpoints' log and pushes the customer's new lifecycle
   stage to identity, a survey response recorded with an e-mail on feedback
   is resolved through identity, feedback follows touchpoints' log and
   scoring's transitions and schedules the surveys their entries trigger, and
   scoring follows feedback's log and folds an NPS answer into the stage it
   pushes to identity;
6. SIGTERM stops every process with exit code 0 within the time the pod has
   after its preStop sleep (terminationGracePeriodSeconds minus the sleep).

The binary is $CLM_BIN, else $CARGO_TARGET_DIR/debug/clm, else
<repo>/target/debug/clm. Without it, PostgreSQL or Redis the test skips, but
under CI=true it fails: CI must build the binary first.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

import manifests
from manifests import Dockerfile, by_name, labels_match, of_kind, pod_spec

CI = manifests.CI
LOCAL_VALUES = Path(__file__).with_name("values-local.yaml")


def _host_port(variable: str, default: str) -> tuple[str, int]:
    """Host and port of the test server named by `variable` (as scripts/test.sh sets it)."""
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get(variable) or default)
    return (url.hostname or "127.0.0.1", url.port or 0)


POSTGRES = _host_port("CLM_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS = _host_port("CLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/")
POD_NAMESPACE = "clm-local"
# The ENV the distroless base image brings before deploy/Dockerfile adds its own;
# HOME is what the runtime sets for user 65532 (nonroot), here a local folder.
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
}


@dataclasses.dataclass(frozen=True)
class SmokeCall:
    """One RPC that shows a service works: request as proto JSON, and what the answer must hold."""

    service: str  # the gRPC service
    method: str
    request: dict[str, Any]
    # Checks the response (proto JSON, field names as in the .proto); None: any answer will do.
    check: Callable[[dict[str, Any]], None] | None = None


def _lists_the_built_in_model(response: dict[str, Any]) -> None:
    versions = [model.get("version") for model in response.get("models", [])]
    assert "builtin-1" in versions, f"ListModels should list the built-in default model builtin-1, lists {versions}"


# Checks beyond "it answers" of some services' smoke calls; the calls
# themselves are the binary's (`clm services --json`).
SMOKE_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "scoring": _lists_the_built_in_model,
}


@functools.cache
def _smoke_calls() -> dict[str, SmokeCall]:
    services = manifests.binary_services()
    if services is None:
        _unavailable(f"no clm binary at {manifests.clm_binary()} to list its services")
    return {
        s["name"]: SmokeCall(s["smoke_call"]["service"], s["smoke_call"]["method"], s["smoke_call"]["request"],
                             SMOKE_CHECKS.get(s["name"]))
        for s in services
    }


# The services that call others, and the test below that makes such a call
# cross the processes.
CROSS_SERVICE_CHECKS: dict[str, str] = {
    "touchpoints": "test_touchpoint_recorded_with_an_email_resolves_through_identity",
    "scoring": "test_purchase_on_touchpoints_is_scored_and_pushed_to_identity",
    "feedback": "test_survey_response_recorded_with_an_email_resolves_through_identity",
}


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"{reason}; under CI=true this test must run, not skip")
    pytest.skip(reason)


def _reachable(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=3):
            return True
    except OSError:
        return False


def _redis_answers_ping() -> bool:
    try:
        with socket.create_connection(REDIS, timeout=3) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _merged(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _enabled_services() -> list[str]:
    values = _merged(manifests.chart_default_values(), manifests.load_yaml(LOCAL_VALUES))
    return sorted(name for name, service in values["services"].items() if service["enabled"])


ENABLED = _enabled_services()


# --- the environment a pod's container sees ------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\((\w+)\)")


def _expand(value: str, defined: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: earlier variables only, $$ escapes, unknown names stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return defined.get(name, match.group(0))

    return _REFERENCE.sub(replace, value)


def _lookup(documents: list[dict], kind: str, name: str, key: str, optional: bool, who: str) -> str | None:
    source = by_name(documents, kind, name)
    if source is None:
        if optional:
            return None
        raise AssertionError(f"{who}: {kind} {name} is neither rendered nor given by the test values")
    data = manifests.secret_data(source) if kind == "Secret" else dict(source.get("data") or {})
    if key not in data:
        if optional:
            return None
        raise AssertionError(f"{who}: {kind} {name} has no key {key}")
    return data[key]


def resolve_env(
    container: dict, spec: dict, pod_name: str, documents: list[dict], image_env: dict[str, str]
) -> dict[str, str]:
    """The container's environment: image ENV, then envFrom, then env, as the kubelet builds it."""
    who = f"{pod_name}/{container['name']}"
    environment = dict(image_env)
    declared: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
            if field in source:
                reference = source[field]
                document = by_name(documents, kind, reference["name"])
                if document is None:
                    assert reference.get("optional"), f"{who}: envFrom {kind} {reference['name']} is missing"
                    continue
                data = manifests.secret_data(document) if kind == "Secret" else document.get("data", {})
                declared.update({prefix + key: value for key, value in data.items()})
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            declared[name] = _expand(str(entry["value"]), declared)
            continue
        origin = entry.get("valueFrom", {})
        if "secretKeyRef" in origin or "configMapKeyRef" in origin:
            kind, reference = ("Secret", origin["secretKeyRef"]) if "secretKeyRef" in origin else ("ConfigMap", origin["configMapKeyRef"])
            value = _lookup(documents, kind, reference["name"], reference["key"], bool(reference.get("optional")), who)
            if value is not None:
                declared[name] = value
        elif "fieldRef" in origin:
            field = origin["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": pod_name,
                "metadata.namespace": POD_NAMESPACE,
                "spec.nodeName": "localhost",
                "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
            }
            assert field in fields, f"{who}: fieldRef {field} is not emulated here"
            declared[name] = fields[field]
        else:
            raise AssertionError(f"{who}: env {name} has a source this test does not emulate: {origin}")
    environment.update(declared)
    return environment


def container_argv(container: dict, dockerfile: Dockerfile, binary: Path) -> list[str]:
    """command/args as the container runtime combines them with the image's ENTRYPOINT/CMD."""
    if "command" in container:
        argv = list(container["command"]) + list(container.get("args", []))
    else:
        argv = dockerfile.exec_form("ENTRYPOINT") + list(container.get("args", dockerfile.exec_form("CMD")))
    image_binary = dockerfile.exec_form("ENTRYPOINT")[0]
    assert argv[0] == image_binary, f"the container runs {argv[0]}, the image only has {image_binary}"
    return [str(binary)] + argv[1:]


# --- gRPC --------------------------------------------------------------------------------------


def grpc_health(port: int, service: str, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def call_through_reflection(port: int, service: str, method: str, body: dict[str, Any]) -> tuple[list[str], dict]:
    """Lists the services via reflection, then calls one method with messages built from reflection."""
    import grpc
    from google.protobuf import json_format, message_factory
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        descriptor = DescriptorPool(database).FindServiceByName(service).methods_by_name[method]
        request_class = message_factory.GetMessageClass(descriptor.input_type)
        response_class = message_factory.GetMessageClass(descriptor.output_type)
        rpc = channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = rpc(json_format.ParseDict(body, request_class()), timeout=15)
    return services, json_format.MessageToDict(response, preserving_proto_field_name=True)


def _grpcurl() -> str | None:
    """$GRPCURL, else grpcurl on PATH, else the one pip installed beside this Python."""
    if os.environ.get("GRPCURL"):
        return os.environ["GRPCURL"]
    beside_python = Path(sys.executable).with_name("grpcurl")
    return shutil.which("grpcurl") or (str(beside_python) if beside_python.exists() else None)


def _require_grpcurl() -> str:
    grpcurl = _grpcurl()
    if grpcurl is None:
        _unavailable("grpcurl is not installed (pip install -r deploy/tests/requirements.txt, or set GRPCURL)")
    return grpcurl


def _grpcurl_run(port: int, method: str, body: dict[str, Any]) -> tuple[list[str], subprocess.CompletedProcess]:
    argv = [_require_grpcurl(), "-plaintext", "-d", json.dumps(body), f"127.0.0.1:{port}", method]
    return argv, subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def grpcurl_call(port: int, method: str, body: dict[str, Any]) -> dict[str, Any]:
    """One unary call through grpcurl and reflection; the response as grpcurl prints it (lowerCamelCase JSON)."""
    argv, result = _grpcurl_run(port, method, body)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def grpcurl_eventually(
    port: int, method: str, body: dict[str, Any], accept: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
) -> dict[str, Any]:
    """Repeats a call (errors such as NOT_FOUND included) until `accept` takes the response: for work done in the background."""
    deadline = time.monotonic() + timeout
    while True:
        argv, result = _grpcurl_run(port, method, body)
        if result.returncode == 0 and accept(response := json.loads(result.stdout)):
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s; last answer of {shlex.join(argv)}:\n{result.stdout}{result.stderr}")
        time.sleep(0.5)


def readme_grpcurl_commands() -> list[str]:
    return [line for line in manifests.readme_sh_commands() if line.startswith("grpcurl ")]


# --- Services without cluster DNS ----------------------------------------------------------------

_SERVICE_URL_VARIABLE = re.compile(r"CLM_[A-Z0-9_]+_URL")


def service_backends(documents: list[dict], namespace: str) -> dict[tuple[str, int], str]:
    """(host, port) a rendered Service is reached at in the cluster -> the Deployment it selects."""
    deployments = of_kind(documents, "Deployment")
    backends: dict[tuple[str, int], str] = {}
    for service in of_kind(documents, "Service"):
        name = service["metadata"]["name"]
        selected = [
            d["metadata"]["name"] for d in deployments
            if labels_match(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"Service {name} selects {selected}"
        for port in service["spec"]["ports"]:
            for host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
                backends[(host, port["port"])] = selected[0]
    return backends


def rewrite_service_urls(
    env: dict[str, str], backends: dict[tuple[str, int], str], local_ports: dict[str, int]
) -> dict[str, tuple[str, str]]:
    """Points each CLM_*_URL that names a rendered Service at the local process of its Deployment.

    Only those variables change, and only their host and port; any other
    variable (database, Redis, OTLP) keeps its rendered value. Returns
    {variable: (rendered value, local value)}.
    """
    rewritten: dict[str, tuple[str, str]] = {}
    for name, value in sorted(env.items()):
        if not _SERVICE_URL_VARIABLE.fullmatch(name):
            continue
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            continue
        port = url.port or (443 if url.scheme == "https" else 80)
        backend = backends.get((url.hostname, port))
        if backend is None:
            # A bare name can only be an in-cluster Service: then it must be one the chart renders.
            assert "." in url.hostname or url.hostname == "localhost", (
                f"{name}={value} names no Service of this rendering (or the wrong port)"
            )
            continue
        local = urlunsplit((url.scheme, f"127.0.0.1:{local_ports[backend]}", url.path, url.query, url.fragment))
        env[name] = local
        rewritten[name] = (value, local)
    return rewritten


# --- the local pods ----------------------------------------------------------------------------


@dataclasses.dataclass
class LocalPod:
    service: str
    deployment: dict
    argv: list[str]
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen | None = None
    # CLM_*_URL variables pointed at a local process: {name: (rendered, local)}.
    rewritten: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def container(self) -> dict:
        return pod_spec(self.deployment)["containers"][0]

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


def _image_env(dockerfile: Dockerfile, workdir: Path) -> dict[str, str]:
    return {**BASE_IMAGE_ENV, "HOME": str(workdir), **dockerfile.runtime_env()}


def _run_job(job: dict, documents: list[dict], dockerfile: Dockerfile, binary: Path, workdir: Path) -> None:
    spec = pod_spec(job)
    (container,) = spec["containers"]
    name = f"{job['metadata']['name']}-local"
    env = resolve_env(container, spec, name, documents, _image_env(dockerfile, workdir))
    argv = container_argv(container, dockerfile, binary)
    deadline = min(int(job["spec"].get("activeDeadlineSeconds", 300)), 300)
    result = subprocess.run(
        argv, env=env, cwd=workdir, capture_output=True, text=True, timeout=deadline, check=False
    )
    assert result.returncode == 0, (
        f"{shlex.join(argv)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def _wait_for_probe(pod: LocalPod, probe_name: str) -> None:
    probe = pod.container[probe_name]
    container_port = next(p["containerPort"] for p in pod.container["ports"] if p["name"] == "grpc")
    assert probe["grpc"]["port"] == container_port, f"{probe_name} checks a port the server does not listen on"
    service = probe["grpc"].get("service", "")
    period = probe.get("periodSeconds", 10)
    timeout = probe.get("timeoutSeconds", 1)
    attempts = probe.get("failureThreshold", 3)
    needed = probe.get("successThreshold", 1)
    time.sleep(probe.get("initialDelaySeconds", 0))
    successes, last = 0, ""
    for attempt in range(attempts + needed - 1):
        assert pod.process and pod.process.poll() is None, (
            f"clm serve {pod.service} exited with {pod.process.returncode} before its {probe_name} passed:\n{pod.tail()}"
        )
        last = grpc_health(pod.port, service, timeout)
        successes = successes + 1 if last == "SERVING" else 0
        if successes >= needed:
            return
        if attempt + 1 < attempts + needed - 1:
            time.sleep(period)
    raise AssertionError(
        f"{probe_name} of {pod.service} (grpc.health.v1 {service!r}) failed {attempts} times, last: {last}\n{pod.tail()}"
    )


@pytest.fixture(scope="module")
def binary() -> Path:
    path = manifests.clm_binary()
    if not (path.is_file() and os.access(path, os.X_OK)):
        _unavailable(f"no clm binary at {path} (build it with `cargo build -p clm` or set CLM_BIN)")
    return path


@pytest.fixture(scope="module")
def local_backends() -> None:
    if not _reachable(POSTGRES):
        _unavailable(f"PostgreSQL is not reachable at {POSTGRES[0]}:{POSTGRES[1]}")
    if not _redis_answers_ping():
        _unavailable(f"Redis does not answer PING at {REDIS[0]}:{REDIS[1]}")
    if shutil.which("psql") is None:
        _unavailable("psql is needed to create the test databases")


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-h", POSTGRES[0], "-p", str(POSTGRES[1]), "-U", "postgres", "-d", "postgres",
         "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
        check=True, capture_output=True, text=True, timeout=60, env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )


@pytest.fixture(scope="module")
def rendered(local_backends: None) -> Iterator[list[dict]]:
    """The chart rendered with values-local.yaml, each service on a fresh database."""
    run = uuid.uuid4().hex[:8]
    values = manifests.load_yaml(LOCAL_VALUES)
    databases = []
    for service in ENABLED:
        database = f"clm_deploy_{service}_{run}"
        _psql(f'CREATE DATABASE "{database}"')
        databases.append(database)
        values = _merged(values, {"redis": {"url": f"redis://{REDIS[0]}:{REDIS[1]}/"}})
        values = _merged(values, {"services": {service: {"database": {
            "url": f"postgres://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{database}"}}}})
    try:
        yield manifests.render_chart(values, namespace=POD_NAMESPACE)
    finally:
        for database in databases:
            _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pods(binary: Path, rendered: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalPod]]:
    dockerfile = Dockerfile.parse()
    workdir = tmp_path_factory.mktemp("pods")
    started: dict[str, LocalPod] = {}
    try:
        deployments = of_kind(rendered, "Deployment")
        assert sorted(d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments) == ENABLED
        # Migrations first, for every service, as the pre-install hooks run before any pod.
        for deployment in deployments:
            service = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            job = by_name(rendered, "Job", f"{deployment['metadata']['name']}-migrate")
            assert job is not None, f"no migration Job rendered for {service}"
            _run_job(job, rendered, dockerfile, binary, workdir)
            _run_job(job, rendered, dockerfile, binary, workdir)  # pre-upgrade on a migrated database
        # Every pod's local port first, so that callers can be pointed at their callees.
        local_ports: dict[str, int] = {}
        for deployment in deployments:
            port = _free_port()
            while port in local_ports.values():
                port = _free_port()
            local_ports[deployment["metadata"]["name"]] = port
        backends = service_backends(rendered, POD_NAMESPACE)
        for deployment in deployments:
            service = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            spec = pod_spec(deployment)
            container = spec["containers"][0]
            pod_name = f"{deployment['metadata']['name']}-local-0"
            env = resolve_env(container, spec, pod_name, rendered, _image_env(dockerfile, workdir))
            container_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
            assert env.get("CLM_LISTEN_ADDR") == f"0.0.0.0:{container_port}", "the pod must listen on its container port"
            port = local_ports[deployment["metadata"]["name"]]
            env["CLM_LISTEN_ADDR"] = f"127.0.0.1:{port}"
            rewritten = rewrite_service_urls(env, backends, local_ports)
            pod = LocalPod(service, deployment, container_argv(container, dockerfile, binary), env, port,
                           workdir / f"{service}.log", rewritten=rewritten)
            with open(pod.log, "wb") as log:
                pod.process = subprocess.Popen(pod.argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
            started[service] = pod
        for pod in started.values():
            _wait_for_probe(pod, "startupProbe")
        yield started
    finally:
        for pod in started.values():
            if pod.process and pod.process.poll() is None:
                pod.process.kill()
                pod.process.wait(timeout=10)


def test_every_enabled_service_has_a_smoke_call() -> None:
    assert ENABLED, "values-local.yaml enables no service"
    missing = [service for service in ENABLED if service not in _smoke_calls()]
    assert missing == [], f"values-local.yaml enables {missing}, which the binary does not contain"
    for service in ENABLED:
        if manifests.SERVICE_CALLS[service]:
            assert service in CROSS_SERVICE_CHECKS, f"{service} calls other services: add a call that crosses them"
    for service, check in CROSS_SERVICE_CHECKS.items():
        assert service in ENABLED, f"values-local.yaml must enable {service}, or {check} never runs"
        assert callable(globals().get(check)), f"CROSS_SERVICE_CHECKS names {check}, which is no test here"


@pytest.mark.parametrize("service", ENABLED)
def test_rendered_probes_pass(pods: dict[str, LocalPod], service: str) -> None:
    pod = pods[service]
    _wait_for_probe(pod, "readinessProbe")
    _wait_for_probe(pod, "livenessProbe")


@pytest.mark.parametrize("service", ENABLED)
def test_service_answers_through_reflection(pods: dict[str, LocalPod], service: str) -> None:
    call = _smoke_calls()[service]
    services, response = call_through_reflection(pods[service].port, call.service, call.method, call.request)
    assert call.service in services, f"reflection lists {services}"
    assert "grpc.health.v1.Health" in services, "grpcurl needs the health service in reflection"
    assert isinstance(response, dict)
    if call.check:
        call.check(response)


def test_readme_grpcurl_commands_work(pods: dict[str, LocalPod]) -> None:
    """Each README grpcurl command goes to the service the README forwards its localhost port to."""
    grpcurl = _require_grpcurl()
    commands = readme_grpcurl_commands()
    assert commands, "the chart README shows no grpcurl command"
    forwards = manifests.port_forwards(manifests.readme_sh_commands())
    by_service_name = {pod.deployment["metadata"]["name"]: pod for pod in pods.values()}
    packages = {
        name: service["healthService"].rsplit(".", 1)[0] + "."
        for name, service in manifests.chart_default_values()["services"].items()
    }
    answered: set[str] = set()
    for command in commands:
        address = re.search(r"\blocalhost:(\d+)\b", command)
        assert address, f"{command}: no localhost:<port> to send it to"
        target = forwards.get(int(address.group(1)))
        assert target, f"{command}: the README forwards no Service to localhost:{address.group(1)}"
        pod = by_service_name.get(target)
        if pod is None:
            continue  # a service values-local.yaml leaves off
        wrong = [name for name, package in packages.items() if name != pod.service and package in command]
        assert not wrong, f"{command}: a call for {wrong} sent to {target}"
        argv = shlex.split(command.replace(address.group(0), f"127.0.0.1:{pod.port}"))
        result = subprocess.run([grpcurl, *argv[1:]], capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if argv[-1] == "list":
            assert _smoke_calls()[pod.service].service in result.stdout.split()
        answered.add(pod.service)
    assert answered == set(pods), f"the chart README shows no grpcurl command for {sorted(set(pods) - answered)}"


def test_callers_reach_their_callees_through_the_rewritten_urls(pods: dict[str, LocalPod]) -> None:
    """The rewrite is narrow: only Service URLs changed, each to the port of the pod behind that Service."""
    ports = {pod.deployment["metadata"]["name"]: pod.port for pod in pods.values()}
    for pod in pods.values():
        rendered = {e["name"]: e.get("value") for e in pod.container["env"]}
        calls = manifests.SERVICE_CALLS[pod.service]
        assert sorted(pod.rewritten) == sorted(f"CLM_{callee.upper()}_URL" for callee in calls), pod.service
        for name, (before, after) in pod.rewritten.items():
            assert rendered[name] == before
            callee = urlsplit(before).hostname
            assert after == f"http://127.0.0.1:{ports[callee]}", f"{pod.service}: {name}"
            assert pod.env[name] == after


def test_touchpoint_recorded_with_an_email_resolves_through_identity(pods: dict[str, LocalPod]) -> None:
    """touchpoints resolves the e-mail through the identity process: identity then knows that customer."""
    if "touchpoints" not in pods:
        pytest.skip("values-local.yaml leaves touchpoints off")
    identity, touchpoints = pods["identity"], pods["touchpoints"]
    # touchpoints serves nothing of identity's, so its only way there is CLM_IDENTITY_URL.
    assert touchpoints.env["CLM_IDENTITY_URL"] == f"http://127.0.0.1:{identity.port}"
    run = uuid.uuid4().hex[:12]
    email, event_id = f"deploy-check-{run}@example.com", f"deploy-check-{run}"
    request = {"touchpoint": {
        "event_id": event_id,
        "customer": {"identity_keys": {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": email}]}},
        "channel": "CHANNEL_WEB",
        "type": "page_view",
    }}
    recorded = grpcurl_call(touchpoints.port, "clm.touchpoint.v1.TouchpointService/RecordTouchpoint", request)
    assert not recorded.get("duplicate"), recorded
    customer_id = recorded["touchpoint"].get("customerId")
    assert customer_id, f"RecordTouchpoint returned no customer_id: {recorded}"

    # identity lists exactly one customer with that e-mail: the touchpoint's.
    holders, token = [], ""
    for _ in range(100):
        page = grpcurl_call(identity.port, "clm.identity.v1.CustomerService/ListCustomers",
                            {"page_size": 100, "page_token": token, "filter": {"identified_only": True}})
        holders += [c["id"] for c in page.get("customers", []) if email in c.get("emails", [])]
        token = page.get("nextPageToken", "")
        if not token:
            break
    assert holders == [customer_id], f"identity's customers with {email}: {holders}, touchpoint's: {customer_id}"
    resolved = grpcurl_call(identity.port, "clm.identity.v1.CustomerService/ResolveCustomer",
                            {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": email}]})
    assert resolved["customer"]["id"] == customer_id
    assert not resolved.get("created"), "identity created the customer only now: touchpoints never reached it"

    # The timeline on touchpoints holds the touchpoint under that customer, and a retry stores nothing new.
    timeline = grpcurl_call(touchpoints.port, "clm.touchpoint.v1.TouchpointService/ListTouchpoints",
                            {"customer_id": customer_id})
    assert [t["eventId"] for t in timeline.get("touchpoints", [])] == [event_id]
    again = grpcurl_call(touchpoints.port, "clm.touchpoint.v1.TouchpointService/RecordTouchpoint", request)
    assert again.get("duplicate") is True and again["touchpoint"]["customerId"] == customer_id


def test_purchase_on_touchpoints_is_scored_and_pushed_to_identity(pods: dict[str, LocalPod]) -> None:
    """scoring follows the touchpoints process's log and pushes the new lifecycle to the identity process."""
    if "scoring" not in pods:
        pytest.skip("values-local.yaml leaves scoring off")
    identity, touchpoints, scoring, feedback = pods["identity"], pods["touchpoints"], pods["scoring"], pods["feedback"]
    # scoring serves nothing of touchpoints', identity's or feedback's: its only ways there are these URLs.
    assert scoring.env["CLM_TOUCHPOINTS_URL"] == f"http://127.0.0.1:{touchpoints.port}"
    assert scoring.env["CLM_IDENTITY_URL"] == f"http://127.0.0.1:{identity.port}"
    assert scoring.env["CLM_FEEDBACK_URL"] == f"http://127.0.0.1:{feedback.port}"
    run = uuid.uuid4().hex[:12]
    recorded = grpcurl_call(touchpoints.port, "clm.touchpoint.v1.TouchpointService/RecordTouchpoint", {"touchpoint": {
        "event_id": f"deploy-scoring-{run}",
        "customer": {"identity_keys": {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": f"deploy-scoring-{run}@example.com"}]}},
        "channel": "CHANNEL_WEB",
        "type": "purchase",
    }})
    customer_id = recorded["touchpoint"]["customerId"]

    # The built-in model's "converted" rule: one purchase makes a customer CONVERSION.
    converted = lambda snapshot: (snapshot or {}).get("stage") == "LIFECYCLE_STAGE_CONVERSION"  # noqa: E731
    lifecycle = grpcurl_eventually(
        scoring.port, "clm.scoring.v1.LifecycleService/GetLifecycle", {"customer_id": customer_id},
        lambda response: converted(response.get("lifecycle", {}).get("lifecycle")),
        f"scoring scores the purchase of {customer_id} recorded on touchpoints",
    )["lifecycle"]
    assert lifecycle["customerId"] == customer_id
    assert lifecycle["lifecycle"]["modelVersion"] == "builtin-1"
    grpcurl_eventually(
        identity.port, "clm.identity.v1.CustomerService/GetCustomer", {"customer_id": customer_id},
        lambda response: converted(response["customer"].get("lifecycle")),
        f"identity holds the lifecycle scoring computed for {customer_id}",
    )


def test_survey_response_recorded_with_an_email_resolves_through_identity(pods: dict[str, LocalPod]) -> None:
    """feedback resolves the respondent's e-mail through the identity process: identity then knows that customer."""
    if "feedback" not in pods:
        pytest.skip("values-local.yaml leaves feedback off")
    identity, touchpoints, scoring, feedback = pods["identity"], pods["touchpoints"], pods["scoring"], pods["feedback"]
    # feedback serves nothing of identity's, touchpoints' or scoring's: its only ways there are these URLs.
    assert feedback.env["CLM_IDENTITY_URL"] == f"http://127.0.0.1:{identity.port}"
    assert feedback.env["CLM_TOUCHPOINTS_URL"] == f"http://127.0.0.1:{touchpoints.port}"
    assert feedback.env["CLM_SCORING_URL"] == f"http://127.0.0.1:{scoring.port}"
    run = uuid.uuid4().hex[:12]
    email, response_id = f"deploy-feedback-{run}@example.com", f"deploy-feedback-{run}"
    survey = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/CreateSurvey", {
        "request_id": f"deploy-feedback-survey-{run}",
        "survey": {
            "display_name": "Deploy check",
            "kind": "SURVEY_KIND_NPS",
            "questions": [{"id": "recommend", "text": "How likely are you to recommend us?",
                           "type": "QUESTION_TYPE_NPS", "required": True}],
        },
    })["survey"]
    request = {"response": {
        "response_id": response_id,
        "survey_id": survey["id"],
        "customer": {"identity_keys": {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": email}]}},
        "answers": [{"question_id": "recommend", "score": 9}],
    }}
    recorded = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/RecordResponse", request)
    assert not recorded.get("duplicate"), recorded
    customer_id = recorded["response"].get("customerId")
    assert customer_id, f"RecordResponse returned no customer_id: {recorded}"

    # identity knows that e-mail as the response's customer, and did before this call.
    resolved = grpcurl_call(identity.port, "clm.identity.v1.CustomerService/ResolveCustomer",
                            {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": email}]})
    assert resolved["customer"]["id"] == customer_id
    assert not resolved.get("created"), "identity created the customer only now: feedback never reached it"

    # feedback lists the response under that customer, and a retry stores nothing new.
    listed = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/ListResponses",
                          {"filter": {"customer_id": customer_id}})
    assert [r["responseId"] for r in listed.get("responses", [])] == [response_id]
    again = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/RecordResponse", request)
    assert again.get("duplicate") is True and again["response"]["customerId"] == customer_id


def test_purchase_on_touchpoints_triggers_surveys_on_feedback_from_both_logs(pods: dict[str, LocalPod]) -> None:
    """feedback follows the touchpoints process's log and the scoring process's transitions: a purchase triggers both."""
    if "feedback" not in pods:
        pytest.skip("values-local.yaml leaves feedback off")
    touchpoints, scoring, feedback = pods["touchpoints"], pods["scoring"], pods["feedback"]
    assert feedback.env["CLM_TOUCHPOINTS_URL"] == f"http://127.0.0.1:{touchpoints.port}"
    assert feedback.env["CLM_SCORING_URL"] == f"http://127.0.0.1:{scoring.port}"
    run = uuid.uuid4().hex[:12]
    # One trigger on each log; no consent purpose, sampling or delay stands in the way.
    survey = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/CreateSurvey", {
        "request_id": f"deploy-feedback-triggers-{run}",
        "survey": {
            "display_name": "Deploy trigger check",
            "kind": "SURVEY_KIND_NPS",
            "questions": [{"id": "recommend", "text": "How likely are you to recommend us?",
                           "type": "QUESTION_TYPE_NPS", "required": True}],
            "triggers": [
                {"name": "purchased", "source": "TRIGGER_SOURCE_TOUCHPOINT", "condition": "event.type == 'purchase'"},
                {"name": "converted", "source": "TRIGGER_SOURCE_TRANSITION", "condition": "event.to_stage == 'CONVERSION'"},
            ],
        },
    })["survey"]
    recorded = grpcurl_call(touchpoints.port, "clm.touchpoint.v1.TouchpointService/RecordTouchpoint", {"touchpoint": {
        "event_id": f"deploy-feedback-purchase-{run}",
        "customer": {"identity_keys": {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": f"deploy-feedback-purchase-{run}@example.com"}]}},
        "channel": "CHANNEL_WEB",
        "type": "purchase",
    }})["touchpoint"]
    customer_id = recorded["customerId"]

    triggered = lambda response: {d.get("triggerName") for d in response.get("dispatches", [])} == {"purchased", "converted"}  # noqa: E731
    dispatches = grpcurl_eventually(
        feedback.port, "clm.feedback.v1.SurveyService/ListDispatches",
        {"filter": {"survey_id": survey["id"], "customer_id": customer_id}}, triggered,
        f"feedback schedules the survey for {customer_id} from touchpoints' log and from scoring's transitions",
    )["dispatches"]
    assert len(dispatches) == 2, f"one dispatch per trigger and log entry: {dispatches}"
    by_trigger = {d["triggerName"]: d for d in dispatches}
    assert by_trigger["purchased"]["sourceEntryId"] == recorded["id"], "the touchpoint trigger names the touchpoint"
    assert by_trigger["converted"]["sourceEntryId"] != recorded["id"], "the transition trigger names scoring's transition"


def test_nps_answer_on_feedback_is_folded_by_scoring_and_pushed_to_identity(pods: dict[str, LocalPod]) -> None:
    """scoring follows the feedback process's log: a promoter's NPS answer makes a converted customer an advocate."""
    if "scoring" not in pods or "feedback" not in pods:
        pytest.skip("values-local.yaml leaves scoring or feedback off")
    identity, touchpoints, scoring, feedback = pods["identity"], pods["touchpoints"], pods["scoring"], pods["feedback"]
    assert scoring.env["CLM_FEEDBACK_URL"] == f"http://127.0.0.1:{feedback.port}"
    run = uuid.uuid4().hex[:12]
    email = f"deploy-scoring-nps-{run}@example.com"
    customer = {"identity_keys": {"keys": [{"kind": "IDENTITY_KIND_EMAIL", "value": email}]}}
    recorded = grpcurl_call(touchpoints.port, "clm.touchpoint.v1.TouchpointService/RecordTouchpoint", {"touchpoint": {
        "event_id": f"deploy-scoring-nps-purchase-{run}",
        "customer": customer,
        "channel": "CHANNEL_WEB",
        "type": "purchase",
    }})
    customer_id = recorded["touchpoint"]["customerId"]
    stage_is = lambda stage: lambda snapshot: (snapshot or {}).get("stage") == stage  # noqa: E731
    grpcurl_eventually(
        scoring.port, "clm.scoring.v1.LifecycleService/GetLifecycle", {"customer_id": customer_id},
        lambda response: stage_is("LIFECYCLE_STAGE_CONVERSION")(response.get("lifecycle", {}).get("lifecycle")),
        f"scoring scores the purchase of {customer_id} recorded on touchpoints",
    )

    survey = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/CreateSurvey", {
        "request_id": f"deploy-scoring-nps-survey-{run}",
        "survey": {
            "display_name": "Deploy NPS fold check",
            "kind": "SURVEY_KIND_NPS",
            "questions": [{"id": "recommend", "text": "How likely are you to recommend us?",
                           "type": "QUESTION_TYPE_NPS", "required": True}],
        },
    })["survey"]
    response = grpcurl_call(feedback.port, "clm.feedback.v1.SurveyService/RecordResponse", {"response": {
        "response_id": f"deploy-scoring-nps-{run}",
        "survey_id": survey["id"],
        "customer": customer,
        "answers": [{"question_id": "recommend", "score": 10}],
    }})["response"]
    assert response["customerId"] == customer_id, "feedback resolved the e-mail to the purchase's customer"

    # The built-in model's "advocate" rule: a converted customer whose NPS is 9 or more.
    advocate = stage_is("LIFECYCLE_STAGE_ADVOCACY")
    lifecycle = grpcurl_eventually(
        scoring.port, "clm.scoring.v1.LifecycleService/GetLifecycle", {"customer_id": customer_id},
        lambda response: advocate(response.get("lifecycle", {}).get("lifecycle")),
        f"scoring folds the NPS answer of {customer_id} recorded on feedback",
    )["lifecycle"]
    assert lifecycle["customerId"] == customer_id
    grpcurl_eventually(
        identity.port, "clm.identity.v1.CustomerService/GetCustomer", {"customer_id": customer_id},
        lambda response: advocate(response["customer"].get("lifecycle")),
        f"identity holds the stage scoring derived from the NPS answer of {customer_id}",
    )


@pytest.mark.parametrize("service", ENABLED)
def test_logs_follow_the_rendered_format(pods: dict[str, LocalPod], service: str) -> None:
    pod = pods[service]
    if pod.env.get("CLM_LOG_FORMAT") != "json":
        pytest.skip("the rendered log format is not json")
    lines = [line for line in pod.output().splitlines() if line.strip()]
    assert lines, f"clm serve {service} logged nothing"
    for line in lines:
        assert isinstance(json.loads(line), dict), f"not a JSON log line: {line}"


def test_sigterm_stops_every_service_within_its_grace(pods: dict[str, LocalPod]) -> None:
    for pod in pods.values():
        assert pod.process and pod.process.poll() is None, f"{pod.service} died early:\n{pod.tail()}"
        pod.process.send_signal(signal.SIGTERM)
    for pod in pods.values():
        spec = pod_spec(pod.deployment)
        sleep = pod.container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        budget = spec.get("terminationGracePeriodSeconds", 30) - sleep
        try:
            code = pod.process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{pod.service} still runs {budget}s after SIGTERM (the kubelet would SIGKILL it)\n{pod.tail()}")
        assert code == 0, f"{pod.service} exited {code} on SIGTERM\n{pod.tail()}"
